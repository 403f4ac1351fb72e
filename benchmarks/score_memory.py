"""Peak memory of `kissray score` over N synthetic films: the sum of PSS over the CLI process and
every descendant (Ray GCS, raylet, workers, decoder children), sampled every 0.2 s.

  python benchmarks/score_memory.py --films 50 --model CKPT   (CKPT: kissray init --image-size 64)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

SAMPLE_EVERY_S = 0.2


def make_films(folder: Path, n: int, seconds: int) -> None:
    """n films of 160x90 H.264 + AAC, seconds .. seconds + 6 long (made once)."""
    from kissray.media.ffmpeg import run_ffmpeg
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        path = folder / f"film{i:03d}.mp4"
        if not path.exists():
            run_ffmpeg(["-f", "lavfi", "-i", f"testsrc2=s=160x90:r=25:d={seconds + i % 7}",
                        "-f", "lavfi", "-i", f"sine=f={200 + 20 * i}:d={seconds + i % 7}",
                        "-c:v", "libx264", "-preset", "ultrafast", "-g", "50", "-c:a", "aac", "-shortest", str(path)])


def tree_pss_mb(root: int) -> float:
    """Sum of PSS (MB) over ``root`` and all its descendants."""
    parents = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                parents[int(d)] = int(open(f"/proc/{d}/stat").read().rsplit(")", 1)[1].split()[1])
            except OSError:
                pass
    tree, grew = {root}, True
    while grew:
        new = {p for p, pp in parents.items() if pp in tree and p not in tree}
        tree |= new
        grew = bool(new)
    total = 0
    for pid in tree:
        try:
            for line in open(f"/proc/{pid}/smaps_rollup"):
                if line.startswith("Pss:"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total / 1024


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--films", type=int, default=50)
    ap.add_argument("--seconds", type=int, default=30)
    ap.add_argument("--model", required=True)
    ap.add_argument("--work", default="benchmarks/work-score-memory")
    args = ap.parse_args()
    work = Path(args.work)
    films = work / f"films{args.films}"
    make_films(films, args.films, args.seconds)
    out = work / f"out{args.films}-{int(time.time())}"
    cmd = [sys.executable, "-m", "kissray.cli", "score", str(films), "--model", args.model, "--out", str(out),
           "--address", "local", "--no-progress"]
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, env={**os.environ, "RAY_ADDRESS": ""})
    peak, samples = 0.0, []
    while proc.poll() is None:
        mb = tree_pss_mb(proc.pid)
        samples.append(mb)
        peak = max(peak, mb)
        time.sleep(SAMPLE_EVERY_S)
    wall = time.monotonic() - t0
    print(json.dumps({"films": args.films, "exit": proc.returncode, "wall_s": round(wall, 1),
                      "peak_pss_mb": round(peak, 1), "median_pss_mb": round(float(np.median(samples)), 1)}))


if __name__ == "__main__":
    main()
