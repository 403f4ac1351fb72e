"""Throughput of kissray against the decode floor and the one-clip-at-a-time baseline.

Generates its own H.264 + AAC film, then measures in one run on this machine:
  decode_floor_s  ffmpeg decoding every frame to null
  decode_s        kissray's decode path alone (all clips, windows decoded in parallel)
  model_s         the fused model alone on the same number of clips (batched, inference mode)
  e2e_single_s    score_film in one process
  e2e_ray_s       the Ray Data job on a local Ray (Ray start-up reported separately)
  naive_s         the paper's way: decode one clip, forward batch 1, next clip

  python benchmarks/throughput.py --quick --json benchmarks/results/throughput-quick.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from kissray.ffmpeg import ffmpeg_exe, run_ffmpeg


def make_film(path: str, seconds: int, width: int, height: int, gop: int, bframes: int) -> str:
    """A moving test pattern with a tone: cheap to make, realistic to decode."""
    if not os.path.exists(path):
        run_ffmpeg(["-f", "lavfi", "-i", f"testsrc2=s={width}x{height}:r=25:d={seconds}",
                     "-f", "lavfi", "-i", f"sine=f=660:d={seconds}",
                     "-c:v", "libx264", "-preset", "veryfast", "-pix_fmt", "yuv420p", "-g", str(gop),
                     "-bf", str(bframes), "-c:a", "aac", "-b:a", "64k", "-shortest", path])
    return path


def timed(fn, *args, **kwargs):
    start = time.perf_counter()
    value = fn(*args, **kwargs)
    return time.perf_counter() - start, value


def decode_floor(path: str, threads: int) -> None:
    subprocess.run([ffmpeg_exe(), "-v", "error", "-threads", str(threads), "-i", path, "-f", "null", "-"],
                   check=True)


def decode_windows(path: str, n_clips: int, window_s: int, workers: int, size: int) -> int:
    from kissray.media import iter_clips

    def window(start: int) -> int:
        return sum(1 for _ in iter_clips(path, start, start + window_s, size=size))

    with ThreadPoolExecutor(workers) as pool:
        return sum(pool.map(window, range(0, n_clips, window_s)))


def model_only(model, n_clips: int, size: int, batch_size: int) -> None:
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, (batch_size, 1, size, size, 3), dtype=np.uint8)
    log_mel = rng.normal(size=(batch_size, 96, 64)).astype(np.float32)
    for lo in range(0, n_clips, batch_size):
        n = min(batch_size, n_clips - lo)
        model.predict_proba(frames[:n], log_mel[:n], batch_size=batch_size)


def naive(path: str, model, n_clips: int, size: int) -> None:
    from kissray.media import iter_clips
    from kissray.score import predict_clips

    for i in range(n_clips):
        predict_clips(model, list(iter_clips(path, i, i + 1, size=size)), batch_size=1)


def e2e_ray(path: str, checkpoint: str, out: str, window_s: int, batch_size: int):
    import ray

    from kissray import pipeline

    ray_start_s, _ = timed(ray.init, include_dashboard=False, log_to_driver=False)
    try:
        seconds, _ = timed(pipeline.score_library, [path], checkpoint, out, window_s=window_s,
                           batch_size=batch_size, progress=False)
    finally:
        ray.shutdown()
    return ray_start_s, seconds


def run(args) -> dict:
    import torch

    from kissray.model import ModelConfig, init_model, save_model
    from kissray.score import score_film

    torch.set_num_threads(args.threads)
    work = args.workdir or tempfile.mkdtemp(prefix="kissray-bench-")
    os.makedirs(work, exist_ok=True)
    film = make_film(os.path.join(work, f"film-{args.seconds}s-{args.width}x{args.height}-g{args.gop}-b{args.bframes}.mp4"),
                     args.seconds, args.width, args.height, args.gop, args.bframes)
    model = init_model(ModelConfig(image_size=args.size)).prepare(args.device)
    checkpoint = os.path.join(work, f"ck-{args.size}")
    save_model(model, checkpoint)
    n_clips = args.seconds
    r = {"film_seconds": args.seconds, "clips": n_clips, "device": args.device, "threads": args.threads,
         "size": args.size, "resolution": f"{args.width}x{args.height}", "window_s": args.window_s}
    r["decode_floor_s"], _ = timed(decode_floor, film, args.threads)
    r["decode_s"], decoded = timed(decode_windows, film, n_clips, args.window_s, args.threads, args.size)
    assert decoded == n_clips, (decoded, n_clips)
    r["model_s"], _ = timed(model_only, model, n_clips, args.size, args.batch_size)
    r["e2e_single_s"], _ = timed(score_film, film, model, batch_size=args.batch_size)
    if not args.skip_ray:
        r["ray_start_s"], r["e2e_ray_s"] = e2e_ray(film, checkpoint, os.path.join(work, "out"),
                                                   args.window_s, args.batch_size)
    naive_clips = min(n_clips, args.naive_clips)
    naive_s, _ = timed(naive, film, model, naive_clips, args.size)
    r["naive_s"] = naive_s * n_clips / naive_clips  # extrapolated from the first naive_clips clips
    r["naive_clips_measured"] = naive_clips
    r["versions"] = versions()
    return r


def versions() -> dict:
    import decord
    import torch

    out = {"python": platform.python_version(), "torch": torch.__version__, "decord": decord.__version__,
           "machine": platform.machine(), "cpus": os.cpu_count()}
    try:
        import ray

        out["ray"] = ray.__version__
    except ImportError:
        pass
    return out


def table(r: dict) -> str:
    rows = ["| measure | seconds | clips/s | real-time factor |", "|---|---:|---:|---:|"]
    for key in ("decode_floor_s", "decode_s", "model_s", "e2e_single_s", "e2e_ray_s", "naive_s"):
        if key in r:
            rows.append(f"| {key} | {r[key]:.2f} | {r['clips'] / r[key]:.1f} | {r['film_seconds'] / r[key]:.1f}x |")
    if "e2e_ray_s" in r:
        rows.append("")
        rows.append(f"e2e_ray_s / (decode_s + model_s) = {r['e2e_ray_s'] / (r['decode_s'] + r['model_s']):.2f} "
                    f"(target <= 1.2); naive_s / e2e_ray_s = {r['naive_s'] / r['e2e_ray_s']:.1f} (target >= 5); "
                    f"Ray start-up {r['ray_start_s']:.1f} s")
    rows.append(f"decode_s / decode_floor_s = {r['decode_s'] / r['decode_floor_s']:.2f}")
    return "\n".join(rows)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="a 2-minute film (finishes in < 3 min here)")
    p.add_argument("--seconds", type=int, default=600, help="film length (default 10 minutes)")
    p.add_argument("--width", type=int, default=640)
    p.add_argument("--height", type=int, default=360)
    p.add_argument("--gop", type=int, default=250, help="keyframe interval in frames")
    p.add_argument("--bframes", type=int, default=3)
    p.add_argument("--size", type=int, default=224, help="still size fed to ResNet-18")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--window-s", type=int, default=60, help="clip window length for parallel decode")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="thread/worker budget")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--naive-clips", type=int, default=20, help="clips timed for the naive baseline")
    p.add_argument("--skip-ray", action="store_true")
    p.add_argument("--workdir", default=None, help="where films and checkpoints are cached")
    p.add_argument("--json", default=None, help="write the results here")
    args = p.parse_args(argv)
    if args.quick:
        args.seconds, args.size = min(args.seconds, 120), min(args.size, 112)
    r = run(args)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(r, f, indent=2)
    print(table(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
