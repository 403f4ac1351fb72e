"""Latency and throughput of the Serve app (``kissray serve``) on this machine, over real HTTP.

Generates a 10-s H.264 + AAC film and a random-weight checkpoint, starts Ray Serve on 127.0.0.1,
then for each concurrency level sends ``--requests`` uploads of the film from that many client
threads and reports p50/p95 latency per request and requests/s, as a markdown table:

  python benchmarks/serve_latency.py --image-size 224 --concurrency 1,4,8 --requests 24 \\
      --json benchmarks/results/serve-latency.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from kissray.media.ffmpeg import run_ffmpeg


def make_film(path: str, seconds: int, width: int, height: int) -> str:
    """A moving test pattern with a tone (same recipe as benchmarks/throughput.py)."""
    run_ffmpeg(["-f", "lavfi", "-i", f"testsrc2=s={width}x{height}:r=25:d={seconds}",
                "-f", "lavfi", "-i", f"sine=f=660:d={seconds}", "-c:v", "libx264", "-preset", "veryfast",
                "-pix_fmt", "yuv420p", "-c:a", "aac", "-b:a", "64k", "-shortest", path])
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_app(checkpoint: str, args) -> str:
    import ray
    from ray import serve

    from kissray.serve import ServeConfig, build_app

    ray.init(address="local", num_cpus=args.ray_cpus, include_dashboard=False, log_to_driver=False, configure_logging=False)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    config = ServeConfig(model=checkpoint, classifier_cpus=args.classifier_cpus, num_gpus=args.num_gpus,
                         max_batch_size=args.max_batch_size)
    serve.run(build_app(config), name="kissray-bench", route_prefix="/")
    return f"http://127.0.0.1:{port}"


def measure(url: str, film: bytes, concurrency: int, n_requests: int, seconds: int) -> dict:
    """Latency percentiles (s) and requests/s for ``n_requests`` uploads from ``concurrency`` threads."""
    import httpx

    def one(i: int) -> float:
        start = time.perf_counter()
        while (r := httpx.post(f"{url}/v1/score", files={"file": (f"bench{i}.mp4", film, "video/mp4")},
                               timeout=600)).status_code == 503:  # busy: retry when told, as a client should
            time.sleep(float(r.headers.get("retry-after", 1)))
        r.raise_for_status()
        return time.perf_counter() - start

    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        latencies = np.array(list(pool.map(one, range(n_requests))))
    wall_s = time.perf_counter() - start
    return {"concurrency": concurrency, "requests": n_requests, "p50_s": float(np.percentile(latencies, 50)),
            "p95_s": float(np.percentile(latencies, 95)), "requests_per_s": n_requests / wall_s,
            "clips_per_s": n_requests * seconds / wall_s}


def score_film_baseline_s(path: str, checkpoint: str, threads: int, repeats: int = 3) -> float:
    """Median seconds of score_film on the same film in this process, with the classifier's threads."""
    import torch

    from kissray.model import load_model
    from kissray.score import score_film

    torch.set_num_threads(threads)
    model = load_model(checkpoint)
    score_film(path, model)  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        score_film(path, model)
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--image-size", type=int, default=224, help="model input size, px (default 224)")
    p.add_argument("--film-size", default="320x240", help="film WxH (default 320x240)")
    p.add_argument("--seconds", type=int, default=10, help="film length (default 10)")
    p.add_argument("--concurrency", default="1,4,8", help="client threads, comma-separated")
    p.add_argument("--requests", type=int, default=24, help="requests per concurrency level")
    p.add_argument("--ray-cpus", type=int, default=os.cpu_count(), help="CPUs Ray may schedule")
    p.add_argument("--classifier-cpus", type=float, default=1.0, help="CPUs (torch threads) per classifier")
    p.add_argument("--num-gpus", type=float, default=None, help="GPUs per classifier (default: auto)")
    p.add_argument("--max-batch-size", type=int, default=16)
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args()

    from kissray.model import ModelConfig, init_model, save_model

    with tempfile.TemporaryDirectory() as tmp:
        width, height = map(int, args.film_size.split("x"))
        path = make_film(f"{tmp}/film.mp4", args.seconds, width, height)
        film = open(path, "rb").read()
        checkpoint = f"{tmp}/ck"
        save_model(init_model(ModelConfig(image_size=args.image_size)), checkpoint)
        baseline_s = score_film_baseline_s(path, checkpoint, max(1, int(args.classifier_cpus)))
        url = start_app(checkpoint, args)
        measure(url, film, 2, 4, args.seconds)  # warm-up: replicas, decoder imports, torch kernels
        rows = [measure(url, film, int(c), args.requests, args.seconds) for c in args.concurrency.split(",")]
    load = os.getloadavg()[0]  # this machine is shared: say how busy it was
    print(f"\n{args.seconds}-s {args.film_size} film, {args.image_size}-px av model, "
          f"{os.cpu_count()} CPUs ({platform.processor() or platform.machine()}), classifier "
          f"cpus={args.classifier_cpus} gpus={args.num_gpus if args.num_gpus is not None else 'auto'}, "
          f"load average {load:.1f}\n")
    print(f"score_film in one process (no Serve, same torch threads): {baseline_s:.2f} s per film\n")
    print("| concurrency | requests | p50 latency (s) | p95 latency (s) | requests/s | clips/s |")
    print("|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['concurrency']} | {r['requests']} | {r['p50_s']:.2f} | {r['p95_s']:.2f} | "
              f"{r['requests_per_s']:.2f} | {r['clips_per_s']:.1f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "load_average": load, "score_film_s": baseline_s, "rows": rows}, f,
                      indent=2)


if __name__ == "__main__":
    main()
