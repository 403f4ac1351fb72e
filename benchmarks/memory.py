"""Memory of the decode path on a long film: peak RSS of the decoder child and of the consumer,
and whether the child's RSS grows over the film (decord is known to leak).

  python benchmarks/memory.py --hours 2 --json benchmarks/results/memory-2h.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import threading
import time

from kissray.media.ffmpeg import run_ffmpeg


def make_long_film(path: str, seconds: int) -> str:
    """Cheap to make: 320x180 test pattern at a low bitrate, AAC stereo."""
    if not os.path.exists(path):
        run_ffmpeg(["-f", "lavfi", "-i", f"testsrc2=s=320x180:r=25:d={seconds}",
                    "-f", "lavfi", "-i", f"sine=f=440:d={seconds}", "-ac", "2",
                    "-c:v", "libx264", "-preset", "ultrafast", "-crf", "35", "-g", "250",
                    "-c:a", "aac", "-b:a", "32k", "-shortest", path])
    return path


def rss_mb(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def sample_child(reader, samples: list, stop: threading.Event) -> None:
    while not stop.is_set():
        child = getattr(reader, "_child", None)
        if child is not None:
            value = rss_mb(child._proc.pid)
            if value is not None:
                samples.append((reader.n_delivered, value))
        time.sleep(0.5)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hours", type=float, default=2.0)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--workdir", default="/tmp/kissray-bench")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    os.makedirs(args.workdir, exist_ok=True)
    seconds = int(args.hours * 3600)
    film = make_long_film(os.path.join(args.workdir, f"long-{seconds}s.mp4"), seconds)

    from kissray.media import ClipReader

    samples, stop = [], threading.Event()
    start = time.perf_counter()
    with ClipReader(film, size=args.size, timeout_s=120) as reader:
        watcher = threading.Thread(target=sample_child, args=(reader, samples, stop), daemon=True)
        watcher.start()
        n = sum(1 for _ in reader)
    stop.set()
    wall_s = time.perf_counter() - start
    tenth = [mb for i, mb in samples if i <= n * 0.1] or [samples[0][1]]
    last = [mb for i, mb in samples if i >= n * 0.9] or [samples[-1][1]]
    result = {
        "film_seconds": seconds, "clips": n, "wall_s": round(wall_s, 1), "size": args.size,
        "child_peak_rss_mb": round(max(mb for _, mb in samples), 1),
        "child_rss_first_10pct_mb": round(max(tenth), 1), "child_rss_last_10pct_mb": round(max(last), 1),
        "consumer_peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "film_bytes": os.path.getsize(film),
    }
    print(json.dumps(result, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
