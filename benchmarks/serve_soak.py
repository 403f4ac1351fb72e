"""Soak the Serve app on 127.0.0.1: N clients send a mix of good and bad requests for a fixed time.

Starts its own local Ray + Serve (API key, one Ingress replica of 2 CPUs: 2 decode slots, and
Serve's queue of ``max_queued_requests`` beyond them; an upload dir),
then each client loops over a fixed request mix until ``--duration-s`` (or ``--max-requests``):
a good upload, a truncated one (200 ``partial``), a text file (400), a wrong key (401), and a
client that hangs up part-way (no answer). A 503 is answered by sleeping its Retry-After. Every
``--sample-s`` the RSS of each Serve process (replicas, proxy, controller) and the Ingress's
decoder children is sampled. Reports latency p50/p95/p99 of good requests, the status mix, RSS of
the first vs the last tenth of the run, and what was left in the upload dir at the end:

  python benchmarks/serve_soak.py --duration-s 600 --clients 4 --json benchmarks/results/serve-soak.json

Loopback only; bounded in time and count.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import socket
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from serve_latency import free_port, make_film  # noqa: E402  (same film recipe as the latency benchmark)

MIX = ("good", "good", "good", "partial", "bad", "unauthorised", "gone")  # one client's round
SERVE_PROCESSES = ("ray::ServeReplica", "ray::ProxyActor", "ray::ServeController")


def start_app(workdir: Path, checkpoint: str, key_file: Path, args) -> str:
    import ray
    from ray import serve

    from kissray.serve import ServeConfig, build_app
    from kissray.serve.app import http_options

    ray.init(address="local", num_cpus=args.ray_cpus, include_dashboard=False, log_to_driver=False,
             configure_logging=False)
    port = free_port()
    config = ServeConfig(model=checkpoint, num_gpus=0, upload_dir=str(workdir / "uploads"),
                         api_key_file=str(key_file), max_upload_mb=64, request_timeout_s=300, ingress_cpus=2)
    serve.start(http_options=http_options(config, "127.0.0.1", port))
    serve.run(build_app(config), name="kissray-soak", route_prefix="/")
    return f"http://127.0.0.1:{port}"


def stop_app() -> None:
    import ray
    from ray import serve

    serve.shutdown()
    ray.shutdown()


def processes() -> dict[int, str]:
    """pid -> command line of every process on this machine."""
    found = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                found[int(entry.name)] = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
            except OSError:
                pass
    return found


def rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def parent(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return -1


def descends_from_us(pid: int) -> bool:
    """True for processes of the Ray this script started (other people's Rays may run here too)."""
    for _ in range(6):
        pid = parent(pid)
        if pid == os.getpid():
            return True
        if pid <= 1:
            return False
    return False


def sample_memory() -> dict[str, float]:
    """RSS (MB) of every Serve process of ours, and of the Ingress's decoder children together."""
    procs = processes()
    serve_pids = {pid: cmd.split()[0].split(".")[0] for pid, cmd in procs.items()  # title: actor[.method]
                  if cmd.startswith(SERVE_PROCESSES) and descends_from_us(pid)}
    sample = {f"{name} ({pid})": rss_mb(pid) for pid, name in serve_pids.items()}
    decoders = [pid for pid, cmd in procs.items() if "kissray.media.child" in cmd and parent(pid) in serve_pids]
    sample["decoder children (sum)"] = sum(rss_mb(pid) or 0 for pid in decoders)
    sample["decoder children (count, not MB)"] = len(decoders)
    return {k: v for k, v in sample.items() if v is not None}


class Client:
    """One client thread: rounds of MIX until the deadline; records (kind, status, seconds)."""

    def __init__(self, url: str, key: str, films: dict[str, bytes], seed: int):
        self.url, self.key, self.films = url, key, films
        self.rng = random.Random(seed)
        self.records: list[tuple[str, int | str, float]] = []

    def run(self, deadline: float, budget: "Budget") -> None:
        import httpx

        with httpx.Client(timeout=600) as http:
            while time.monotonic() < deadline:
                for kind in self.rng.sample(MIX, len(MIX)):
                    if time.monotonic() >= deadline or not budget.take():
                        return
                    start = time.perf_counter()
                    status = self.send(http, kind)
                    self.records.append((kind, status, time.perf_counter() - start))

    def send(self, http, kind: str) -> int | str:
        if kind == "gone":
            return self.hang_up()
        key = "wrong" if kind == "unauthorised" else self.key
        payloads = {"good": ("good.mp4", self.films["good"]), "partial": ("cut.mp4", self.films["partial"]),
                    "bad": ("text.mp4", b"not a film\n" * 100), "unauthorised": ("good.mp4", self.films["good"])}
        name, data = payloads[kind]
        try:
            r = http.post(f"{self.url}/v1/score", files={"file": (name, data, "video/mp4")},
                          headers={"authorization": f"Bearer {key}"})
        except Exception as e:  # noqa: BLE001 - a transport error is a result too
            return type(e).__name__
        if r.status_code == 503:
            time.sleep(float(r.headers.get("retry-after", 1)))
        elif r.status_code == 200:
            body = r.json()
            return f"200 {body['status']}"
        return r.status_code

    def hang_up(self) -> str:
        body = self.films["good"]
        boundary = "soak"
        payload = (f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="gone.mp4"\r\n\r\n'
                   .encode() + body + f"\r\n--{boundary}--\r\n".encode())
        head = (f"POST /v1/score HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {self.key}\r\n"
                f"Content-Type: multipart/form-data; boundary={boundary}\r\n"
                f"Content-Length: {len(payload)}\r\n\r\n").encode()
        cut = self.rng.choice([self.rng.randrange(1, len(payload)), len(payload)])
        with socket.create_connection(("127.0.0.1", int(self.url.rsplit(":", 1)[1])), timeout=30) as s:
            s.sendall(head + payload[:cut])
            time.sleep(self.rng.uniform(0, 1.5))
        return "hung up"


class Budget:
    """At most ``n`` requests in all (thread-safe)."""

    def __init__(self, n: int):
        self.left, self._lock = n, threading.Lock()

    def take(self) -> bool:
        with self._lock:
            self.left -= 1
            return self.left >= 0


def tenth_means(samples: list[tuple[float, dict]]) -> dict[str, tuple[float, float]]:
    """Per process: mean RSS over the first and the last tenth of the samples."""
    n = max(1, len(samples) // 10)
    first, last = samples[:n], samples[-n:]
    names = set(first[0][1]) & set(last[-1][1]) if samples else set()
    return {name: (float(np.mean([s[name] for _, s in first if name in s])),
                   float(np.mean([s[name] for _, s in last if name in s]))) for name in sorted(names)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--duration-s", type=float, default=60, help="how long the clients send (default 60)")
    p.add_argument("--max-requests", type=int, default=100_000, help="stop after this many requests in all")
    p.add_argument("--clients", type=int, default=4, help="client threads (default 4)")
    p.add_argument("--warmup-requests", type=int, default=12, help="sent before memory is tracked")
    p.add_argument("--sample-s", type=float, default=5, help="RSS sampling period (default 5 s)")
    p.add_argument("--image-size", type=int, default=224, help="model input size, px (default 224)")
    p.add_argument("--seconds", type=int, default=10, help="length of the good film (default 10)")
    p.add_argument("--ray-cpus", type=int, default=4, help="CPUs Ray may schedule (default 4)")
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args()

    from kissray.model import ModelConfig, init_model, save_model

    with tempfile.TemporaryDirectory(prefix="kissray-soak-") as tmp:
        workdir = Path(tmp)
        (workdir / "uploads").mkdir()
        key = os.urandom(16).hex()
        (workdir / "key").write_text(key)
        good = make_film(str(workdir / "good.mp4"), args.seconds, 320, 240)
        faststart = workdir / "faststart.mp4"
        from kissray.media.ffmpeg import run_ffmpeg

        run_ffmpeg(["-i", good, "-c", "copy", "-movflags", "+faststart", str(faststart)])
        data = faststart.read_bytes()
        films = {"good": Path(good).read_bytes(), "partial": data[: len(data) // 2]}
        checkpoint = str(workdir / "ck")
        save_model(init_model(ModelConfig(image_size=args.image_size)), checkpoint)
        url = start_app(workdir, checkpoint, workdir / "key", args)

        warm = Client(url, key, films, seed=-1)
        warm.run(time.monotonic() + 600, Budget(args.warmup_requests))
        samples: list[tuple[float, dict]] = []
        stop = threading.Event()

        def sampler():
            start = time.monotonic()
            while not stop.is_set():
                samples.append((time.monotonic() - start, sample_memory()))
                stop.wait(args.sample_s)

        sampling = threading.Thread(target=sampler, daemon=True)
        sampling.start()
        clients = [Client(url, key, films, seed=i) for i in range(args.clients)]
        deadline, budget = time.monotonic() + args.duration_s, Budget(args.max_requests)
        started = time.perf_counter()
        threads = [threading.Thread(target=c.run, args=(deadline, budget)) for c in clients]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall_s = time.perf_counter() - started
        time.sleep(3)  # hung-up requests finish cleaning up
        stop.set()
        sampling.join()
        samples.append((wall_s + 3, sample_memory()))
        leftovers = sorted(p.name for p in (workdir / "uploads").iterdir())
        stop_app()
        report(args, clients, samples, wall_s, leftovers)


def report(args, clients: list[Client], samples, wall_s: float, leftovers: list[str]) -> None:
    records = [r for c in clients for r in c.records]
    mix = Counter(f"{kind}: {status}" for kind, status, _ in records)
    good = np.array([s for kind, status, s in records if kind == "good" and status == "200 ok"])
    memory = tenth_means(samples)
    load = os.getloadavg()[0]
    print(f"\n{len(records)} requests from {args.clients} clients in {wall_s:.0f} s, load average {load:.1f}; "
          f"{args.seconds}-s 320x240 film, {args.image_size}-px model\n")
    if len(good):
        print(f"good uploads answered 200 ok: {len(good)}; latency p50 {np.percentile(good, 50):.2f} s, "
              f"p95 {np.percentile(good, 95):.2f} s, p99 {np.percentile(good, 99):.2f} s\n")
    print("| request: answer | count |\n|---|---:|")
    for name, count in sorted(mix.items()):
        print(f"| {name} | {count} |")
    print("\n| process | RSS first tenth (MB) | RSS last tenth (MB) | change |\n|---|---:|---:|---:|")
    for name, (first, last) in memory.items():
        change = f"{100 * (last - first) / first:+.1f} %" if first else "-"
        print(f"| {name} | {first:.0f} | {last:.0f} | {change} |")
    print(f"\nleft in the upload dir at the end: {leftovers or 'nothing'}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "wall_s": wall_s, "load_average": load, "mix": dict(mix),
                       "good_latency_s": {q: float(np.percentile(good, q)) for q in (50, 95, 99)} if len(good) else {},
                       "rss_mb_first_last_tenth": memory, "samples": samples, "leftovers": leftovers}, f, indent=1)


if __name__ == "__main__":
    main()
