"""Throughput of kissray against the decode floor and the one-clip-at-a-time baseline.

Generates its own H.264 + AAC film, then measures in one run on this machine:
  decode_floor_s  ffmpeg decoding every frame to null
  decode_s        kissray's decode path alone (all clips, windows decoded in parallel)
  model_s         the fused model alone on the same number of clips (batched, inference mode)
  e2e_single_s    score_film in one process
  e2e_ray_s       the Ray Data job on a local Ray (Ray start-up, incl. Ray Data's system actors, apart)
  naive_s         the paper's way: decode one clip, forward batch 1, next clip

  python benchmarks/throughput.py --quick --json benchmarks/results/throughput-quick.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from kissray.media.ffmpeg import ffmpeg_exe, run_ffmpeg


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


ROLES = {  # process role -> what its /proc cmdline contains (Ray sets actor/task process titles)
    "model_actor": "MapBatches(Classifier)",
    "writer_actor": "MapBatches(TitleWriter)",
    "decode_task": "MapBatches(decode_window)",
    "decoder_child": "kissray.media.child",
}


class RssMonitor:
    """Samples the RSS of the driver and of every Ray worker / decoder child by role, every
    ``period_s``; ``summary()`` gives per-role peak MB and the private-memory peak in the first
    and last tenth of the time that role was seen (growth over time shows as last > first)."""

    def __init__(self, period_s: float = 0.5):
        import threading

        self.period_s, self.samples = period_s, []  # (t, role, rss_mb)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "RssMonitor":
        self.started = time.monotonic()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        me = os.getpid()
        while not self._stop.is_set():
            t = time.monotonic() - self.started
            for pid in (int(d) for d in os.listdir("/proc") if d.isdigit()):
                role = "driver" if pid == me else self._role(pid)
                rss = rss_mb(pid) if role else None
                if rss is not None:
                    self.samples.append((t, role, rss, rss_mb(pid, "RssAnon") or 0.0))
            self._stop.wait(self.period_s)

    @staticmethod
    def _role(pid: int) -> str | None:
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmdline = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            return None
        return next((role for role, key in ROLES.items() if key in cmdline), None)

    def summary(self) -> dict:
        if not self.samples:
            return {}
        out = {}
        for role in sorted({s[1] for s in self.samples}):
            rows = [(t, v, anon) for t, r, v, anon in self.samples if r == role]
            lo, hi = rows[0][0], rows[-1][0]  # tenths of the time this role was alive, not of the job
            first = [anon for t, _, anon in rows if t <= lo + 0.1 * (hi - lo)]
            last = [anon for t, _, anon in rows if t >= hi - 0.1 * (hi - lo)]
            out[role] = {"peak_rss_mb": round(max(v for _, v, _ in rows), 1),
                         "peak_anon_mb": round(max(a for _, _, a in rows), 1),
                         "anon_first_tenth_mb": round(max(first), 1), "anon_last_tenth_mb": round(max(last), 1),
                         "samples": len(rows)}
        return out


def rss_mb(pid: int, field: str = "VmRSS") -> float | None:
    """A process's resident memory in MB from /proc (``RssAnon``: its private heap, without the
    shared object-store pages a Ray process maps)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


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


def naive(path: str, model, clip_indices: list[int], size: int) -> None:
    """The paper's loop: open the film at clip i, decode it, forward a batch of one, next clip."""
    from kissray.media import iter_clips
    from kissray.score import Scorer

    for i in clip_indices:
        Scorer(model, batch_size=1).predict_clips(list(iter_clips(path, i, i + 1, size=size)))


def start_ray(num_cpus: int) -> float:
    """The start-up reported apart from the job: ``ray.init``, importing Ray Data, and Ray Data's
    once-per-cluster system actors (stats, autoscaling coordinator: ~2.4 CPU-s on first use),
    started by a one-row dataset as any earlier job on a long-lived cluster would have."""
    import logging

    import ray

    start = time.perf_counter()
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False
    ray.data.range(1).map_batches(lambda batch: batch).take_all()
    return time.perf_counter() - start


def e2e_ray(paths: list[str], checkpoint: str, out: str, window_s: int, batch_size: int,
            threads: int) -> dict:
    """One Ray Data job over ``paths`` on a fresh local Ray of ``threads`` CPUs."""
    import ray

    from kissray import pipeline

    r = {"ray_start_s": start_ray(threads)}
    try:
        with RssMonitor() as rss:
            r["e2e_ray_s"], summary = timed(pipeline.score_library, paths, checkpoint, out, window_s=window_s,
                                            batch_size=batch_size, progress=False)
    finally:
        ray.shutdown()
    assert summary.all_ok and summary.n_ok == len(paths), str(summary)
    r["rss"] = rss.summary()
    return r


def run(args) -> dict:
    import torch

    from kissray.model import ModelConfig, init_model, save_model

    torch.set_num_threads(args.threads)
    os.makedirs(args.workdir, exist_ok=True)
    name = f"film-{args.seconds}s-{args.width}x{args.height}-g{args.gop}-b{args.bframes}.mp4"
    film = make_film(os.path.join(args.workdir, name), args.seconds, args.width, args.height, args.gop, args.bframes)
    model = init_model(ModelConfig(image_size=args.size))  # seed 0: the same weights every run
    checkpoint = os.path.join(args.workdir, f"ck-{args.size}")
    if not os.path.isdir(checkpoint):
        save_model(model, checkpoint)
    if args.device.startswith("cuda"):  # what the Classifier actor does on a GPU
        model.prepare(args.device, dtype=torch.float16, channels_last=True)
    else:  # what load_model does for the Classifier actor and score_film
        model.prepare(args.device)
    n_clips = args.seconds
    r = {"film_seconds": args.seconds, "clips": n_clips, "device": args.device, "threads": args.threads,
         "size": args.size, "resolution": f"{args.width}x{args.height}", "gop": args.gop, "bframes": args.bframes,
         "window_s": args.window_s, "batch_size": args.batch_size}
    if not args.ray_only:
        measure_parts(r, film, model, args)
    if not args.skip_ray:
        out = tempfile.mkdtemp(prefix="out-", dir=args.workdir)  # fresh: finished titles would be skipped
        try:
            r.update(e2e_ray([film], checkpoint, out, args.window_s, args.batch_size, args.threads))
        finally:
            shutil.rmtree(out, ignore_errors=True)
    if not args.ray_only:
        naive_clips = min(n_clips, args.naive_clips)
        sample = np.linspace(0, n_clips - 1, naive_clips).round().astype(int).tolist()  # spread over the film
        naive_s, _ = timed(naive, film, model, sample, args.size)
        r["naive_s"] = naive_s * n_clips / naive_clips  # extrapolated from naive_clips clips
        r["naive_clips_measured"] = naive_clips
    r["versions"] = versions()
    return r


def measure_parts(r: dict, film: str, model, args) -> None:
    """decode floor, decode alone, model alone, and score_film in this process."""
    from kissray.score import score_film

    r["decode_floor_s"], _ = timed(decode_floor, film, args.threads)
    r["decode_s"], decoded = timed(decode_windows, film, r["clips"], args.window_s, args.threads, args.size)
    assert decoded == r["clips"], (decoded, r["clips"])
    r["model_s"], _ = timed(model_only, model, r["clips"], args.size, args.batch_size)
    r["e2e_single_s"], _ = timed(score_film, film, model, batch_size=args.batch_size)


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
    rows = [f"{r['film_seconds']} s {r['resolution']} film, {r['size']} px stills, {r['device']}, "
            f"{r['threads']} threads, window {r['window_s']} s, batch {r['batch_size']}", "",
            "| measure | seconds | clips/s | real-time factor |", "|---|---:|---:|---:|"]
    for key in ("decode_floor_s", "decode_s", "model_s", "e2e_single_s", "e2e_ray_s", "naive_s"):
        if key in r:
            rows.append(f"| {key} | {r[key]:.2f} | {r['clips'] / r[key]:.1f} | {r['film_seconds'] / r[key]:.1f}x |")
    rows.append("")
    if "e2e_ray_s" in r and "decode_s" in r:
        rows.append(f"e2e_ray_s / (decode_s + model_s) = {r['e2e_ray_s'] / (r['decode_s'] + r['model_s']):.2f} "
                    f"(target <= 1.2); naive_s / e2e_ray_s = {r['naive_s'] / r['e2e_ray_s']:.1f} (target >= 5)")
    if "decode_s" in r:
        rows.append(f"decode_s / decode_floor_s = {r['decode_s'] / r['decode_floor_s']:.2f}")
    if "ray_start_s" in r:
        rows.append(f"Ray start-up (not in e2e_ray_s): {r['ray_start_s']:.1f} s")
    for role, m in r.get("rss", {}).items():
        rows.append(f"{role}: peak RSS {m['peak_rss_mb']:.0f} MB, private {m['peak_anon_mb']:.0f} MB "
                    f"(private peak, first / last tenth of its life: {m['anon_first_tenth_mb']:.0f} / "
                    f"{m['anon_last_tenth_mb']:.0f} MB)")
    return "\n".join(rows)


def write_json(result: dict, path: str | None) -> None:
    """Write a benchmark's results to ``path`` (creating its folder); nothing when no path."""
    if path:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as f:
            json.dump(result, f, indent=2)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="112-px stills, 10 naive clips (the default 10-minute film; < 3 min on 2 cores)")
    p.add_argument("--seconds", type=int, default=600, help="film length (default 10 minutes)")
    p.add_argument("--width", type=int, default=640)
    p.add_argument("--height", type=int, default=360)
    p.add_argument("--gop", type=int, default=250, help="keyframe interval in frames")
    p.add_argument("--bframes", type=int, default=3)
    p.add_argument("--size", type=int, default=224, help="still size fed to ResNet-18")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--window-s", type=int, default=120, help="seconds of film per decode task (pipeline default)")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="thread/worker budget")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--naive-clips", type=int, default=20,
                   help="clips timed for the naive baseline (spread over the film; the total is extrapolated)")
    p.add_argument("--skip-ray", action="store_true")
    p.add_argument("--ray-only", action="store_true",
                   help="only the Ray job and its processes' memory (e.g. a 2-hour film)")
    p.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "kissray-bench"),
                   help="where generated films and checkpoints are cached")
    p.add_argument("--json", default=None, help="write the results here")
    args = p.parse_args(argv)
    if args.quick:
        args.size, args.naive_clips = min(args.size, 112), min(args.naive_clips, 10)
    r = run(args)
    write_json(r, args.json)
    print(table(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
