"""Many short titles through the Ray job: titles/hour, per-title overhead, driver memory.

A library is thousands of titles, so fixed per-title costs (probe, decoder start-up, tiny blocks,
per-title files, driver bookkeeping) matter as much as clips/s. This generates ONE short film
(H.264 + AAC, ffmpeg lavfi) and hard-links it under N different names (a copy where links are not
possible): every title is decoded for real, but generating 1,000 of them takes a second.

Measured in one run, on one local Ray of ``--threads`` CPUs:
  wall_s             the Ray Data job (``score_library``) over all titles, Ray start-up excluded
  work_s             decode + model for the same titles, each measured alone with the same
                     thread budget (decode: all titles' clips, titles in parallel; model: batched),
                     on a sample of ``--sample`` titles, scaled to N
  overhead_s/title   (wall_s - work_s) / N
  driver peak RSS    sampled every 0.5 s during the job (``--check-growth`` also runs N/10 titles
                     first, in the same process, to show the peak does not grow with N)

  python benchmarks/many_titles.py --titles 1000 --json benchmarks/results/many-titles-1000.json
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from throughput import (RssMonitor, decode_windows, make_film, model_only, start_ray, timed,  # noqa: E402
                        versions, write_json)


def make_titles(work: str, n_titles: int, seconds: int, width: int, height: int) -> str:
    """A folder of ``n_titles`` films, hard links to one generated film."""
    base = make_film(os.path.join(work, f"base-{seconds}s-{width}x{height}.mp4"), seconds, width, height,
                     gop=50, bframes=2)
    folder = os.path.join(work, f"titles-{n_titles}-{seconds}s-{width}x{height}")
    if not os.path.isdir(folder) or len(os.listdir(folder)) != n_titles:
        shutil.rmtree(folder, ignore_errors=True)
        os.makedirs(folder)
        for i in range(n_titles):
            target = os.path.join(folder, f"title-{i:05d}.mp4")
            try:
                os.link(base, target)
            except OSError:
                shutil.copyfile(base, target)
    return folder


def run_job(folder: str, checkpoint: str, work: str, args) -> dict:
    """One ``score_library`` run over every film in ``folder``, into a fresh output folder."""
    from kissray import pipeline

    out = tempfile.mkdtemp(prefix="out-", dir=work)
    with RssMonitor() as rss:
        wall_s, summary = timed(pipeline.score_library, [folder], checkpoint, out, window_s=args.window_s,
                                batch_size=args.batch_size, progress=False)
    assert summary.all_ok, str(summary)
    roles = rss.summary()
    shutil.rmtree(out, ignore_errors=True)
    return {"titles": summary.n_ok, "wall_s": wall_s, "driver_peak_rss_mb": roles.get("driver", {}).get("peak_rss_mb"),
            "driver_peak_anon_mb": roles.get("driver", {}).get("peak_anon_mb"),
            "rss": roles}


def work_per_title(folder: str, model, args) -> tuple[float, float]:
    """Seconds of decode and of model per title, measured alone on ``args.sample`` titles."""
    films = sorted(os.listdir(folder))[:args.sample]
    decode_s, n = timed(decode_titles, [os.path.join(folder, f) for f in films], args.threads, args.size)
    model_s, _ = timed(model_only, model, n, args.size, args.batch_size)
    return decode_s / len(films), model_s / len(films)


def decode_titles(paths: list[str], workers: int, size: int) -> int:
    """Every clip of every title, ``workers`` titles at a time (kissray's decode path)."""
    from concurrent.futures import ThreadPoolExecutor

    from kissray.media import iter_clips

    def one(path: str) -> int:
        return sum(1 for _ in iter_clips(path, size=size))

    with ThreadPoolExecutor(workers) as pool:
        return sum(pool.map(one, paths))


def make_checkpoint(path: str, size: int) -> str:
    """A random-weight checkpoint, made in a child process so this driver never imports torch
    before the job (its RSS is what is measured)."""
    import subprocess

    if not os.path.isdir(path):
        code = ("import sys; from kissray.model import ModelConfig, init_model, save_model; "
                "save_model(init_model(ModelConfig(image_size=int(sys.argv[2]))), sys.argv[1])")
        subprocess.run([sys.executable, "-c", code, path, str(size)], check=True)
    return path


def run(args) -> dict:
    import ray

    work = args.workdir or tempfile.mkdtemp(prefix="kissray-titles-")
    os.makedirs(work, exist_ok=True)
    checkpoint = make_checkpoint(os.path.join(work, f"ck-{args.size}"), args.size)
    r = {"titles": args.titles, "title_seconds": args.seconds, "resolution": f"{args.width}x{args.height}",
         "size": args.size, "threads": args.threads, "window_s": args.window_s, "batch_size": args.batch_size,
         "device": "cpu", "films": "one generated film hard-linked under N names"}
    folder = make_titles(work, args.titles, args.seconds, args.width, args.height)
    small = make_titles(work, max(1, args.titles // 10), args.seconds, args.width, args.height)
    r["ray_start_s"] = start_ray(args.threads)
    try:
        if args.check_growth:
            r["small_run"] = run_job(small, checkpoint, work, args)
        r.update(run_job(folder, checkpoint, work, args))
    finally:
        ray.shutdown()
    import torch

    from kissray.model import load_model

    torch.set_num_threads(args.threads)
    r["decode_s_per_title"], r["model_s_per_title"] = work_per_title(folder, load_model(checkpoint), args)
    r["work_s"] = (r["decode_s_per_title"] + r["model_s_per_title"]) * args.titles
    r["overhead_s_per_title"] = (r["wall_s"] - r["work_s"]) / args.titles
    r["titles_per_hour"] = 3600 * args.titles / r["wall_s"]
    r["versions"] = versions()
    return r


def table(r: dict) -> str:
    per_title = r["decode_s_per_title"] + r["model_s_per_title"]

    def row(run: dict) -> str:
        n, wall_s = run["titles"], run["wall_s"]
        return (f"| {n} | {wall_s:.1f} | {3600 * n / wall_s:,.0f} | {per_title:.3f} | {wall_s / n - per_title:.3f} "
                f"| {run['driver_peak_rss_mb']:.0f} ({run['driver_peak_anon_mb']:.0f}) |")

    rows = ["| titles | wall s | titles/hour | decode+model s/title | overhead s/title "
            "| driver peak RSS (private) MB |", "|---:|---:|---:|---:|---:|---:|"]
    rows += [row(run) for run in (r.get("small_run"), r) if run]
    return "\n".join(rows)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--titles", type=int, default=1000)
    p.add_argument("--seconds", type=int, default=10, help="length of each title")
    p.add_argument("--width", type=int, default=160)
    p.add_argument("--height", type=int, default=90)
    p.add_argument("--size", type=int, default=64, help="still size of the (random-weight) checkpoint")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--window-s", type=int, default=120)
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="CPUs of the local Ray")
    p.add_argument("--sample", type=int, default=20, help="titles timed alone for decode and model")
    p.add_argument("--check-growth", action="store_true", help="first run titles/10, to compare driver RSS")
    p.add_argument("--workdir", default=None)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    r = run(args)
    write_json(r, args.json)
    print(table(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
