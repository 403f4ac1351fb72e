"""The decoder's CPU time next to ffmpeg's own full decode of the same film (issue 12).

For each film, CPU seconds (user + system) of:
  ffmpeg -threads 1   ``ffmpeg -threads 1 -i FILM -f null -``: every video and audio frame decoded
  exact / keyframe    kissray's decoder (``decode_clips``: index, stills, audio, log-mel), 1 thread,
                      224-px stills, 1 per second, stills="exact" / "keyframe", in this process
  stills dense / exact / keyframe
                      the stills alone (``SparseStills``): dense = every packet from the window's
                      first keyframe decoded (what the decoder did before), then the two modes
  index               demuxing every video packet to build the frame index (no decoding)

Films (generated once into --workdir): 1080p H.264 crf 23, 3 B-frames, GOP 2 s (60 s); 1080p
MJPEG, intra-only (30 s); with --long a 2-hour 320x180 H.264 (GOP 10 s, 3 B-frames). All 25 fps
with AAC audio. ``--scores`` also scores each film in both modes with a random-init model (seed 0)
and reports how far keyframe-mode probabilities and segments move from exact ones (not on the
2-hour film: 14,400 clips through the model on a CPU).

  python benchmarks/decode_bench.py [--long] [--scores] [--json benchmarks/results/decode-bench.json]
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time

for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):  # as in the decoder child
    os.environ.setdefault(_var, "1")

import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from throughput import write_json  # noqa: E402

from kissray.media.child import IndexCache, decode_clips  # noqa: E402
from kissray.media.ffmpeg import ffmpeg_exe, run_ffmpeg  # noqa: E402
from kissray.media.demux import read_index  # noqa: E402
from kissray.media.video import SparseStills  # noqa: E402

TARGETS = {("h264", "exact"): 0.9, ("mjpeg", "exact"): 0.25, ("h264", "keyframe"): 0.25,  # issue 12, 1080p
           ("mjpeg", "keyframe"): 0.25}


def cpu_s() -> float:
    """CPU seconds of this process and its reaped children."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def measured(fn, *args) -> dict:
    cpu0, wall0 = cpu_s(), time.perf_counter()
    fn(*args)
    return {"cpu_s": round(cpu_s() - cpu0, 3), "wall_s": round(time.perf_counter() - wall0, 3)}


def make_films(args) -> dict[str, str]:
    """name -> path; each generated once (testsrc2 moves everywhere: a hard film for the codec)."""
    size, d = f"{args.width}x{args.height}", args.workdir
    specs = {
        "h264": (f"h264-{size}-{args.seconds}s-g50-b3.mp4", size, args.seconds,
                 ["-c:v", "libx264", "-preset", "veryfast", "-crf", "23", "-pix_fmt", "yuv420p", "-g", "50", "-bf", "3"]),
        "mjpeg": (f"mjpeg-{size}-{args.mjpeg_seconds}s.avi", size, args.mjpeg_seconds,
                  ["-c:v", "mjpeg", "-q:v", "3", "-pix_fmt", "yuvj420p"]),
    }
    if args.long:
        specs["long"] = (f"h264-320x180-{args.long_seconds}s-g250-b3.mp4", "320x180", args.long_seconds,
                         ["-c:v", "libx264", "-preset", "veryfast", "-pix_fmt", "yuv420p", "-g", "250", "-bf", "3"])
    films = {}
    for name, (file, resolution, seconds, video) in specs.items():
        path = films[name] = os.path.join(d, file)
        if not os.path.exists(path):
            part = os.path.join(d, "part-" + file)
            run_ffmpeg(["-f", "lavfi", "-i", f"testsrc2=s={resolution}:r=25:d={seconds}",
                        "-f", "lavfi", "-i", f"sine=f=660:d={seconds}", *video,
                        "-c:a", "aac", "-b:a", "64k", "-shortest", part])
            os.replace(part, path)
    return films


def ffmpeg_full_decode(path: str) -> None:
    subprocess.run([ffmpeg_exe(), "-v", "error", "-nostdin", "-threads", "1", "-i", path, "-f", "null", "-"], check=True)


def decoder(path: str, size: int, mode: str) -> None:
    info, clips = decode_clips(path, path, 0, None, size=size, threads=1, stills=mode, indexes=IndexCache())
    n = sum(1 for clip in clips if not isinstance(clip, Exception))
    assert n == info.n_clips, (n, info.n_clips)


def stills_only(path: str, size: int, mode: str) -> None:
    index = read_index(path, path)
    positions = index.still_positions(np.arange(int(np.floor(index.duration_s + 0.5))), 1, mode == "keyframe")
    stills = SparseStills(path, index, positions, size, 1, dense=mode == "dense")
    for p in positions.ravel():
        stills.still(int(p))
    stills.close()


def score_changes(path: str, model) -> dict:
    """Keyframe-mode scores against exact ones: mean / max |dp|, and the segments of each."""
    from kissray.score import SegmentParams, score_film, segments_by_label

    exact, keyframe = (score_film(path, model, stills=mode) for mode in ("exact", "keyframe"))
    dp = np.abs(exact.probs - keyframe.probs)
    seg = [[(s.start_s, s.end_s) for s in r.segments] for r in (exact, keyframe)]
    threshold = float(np.median(exact.probs))  # random weights: put the threshold where segments can form
    at_median = [[(s.start_s, s.end_s) for s in segments_by_label(r.probs, r.labels, SegmentParams(threshold))]
                 for r in (exact, keyframe)]
    return {"mean_abs_dp": round(float(dp.mean()), 5), "max_abs_dp": round(float(dp.max()), 5),
            "segments_exact": len(seg[0]), "segments_keyframe": len(seg[1]),
            "segments_changed": len(set(seg[0]) ^ set(seg[1])), "median_threshold": round(threshold, 4),
            "segments_at_median_exact": len(at_median[0]), "segments_at_median_keyframe": len(at_median[1]),
            "segments_at_median_changed": len(set(at_median[0]) ^ set(at_median[1]))}


def bench_film(name: str, path: str, args) -> dict:
    r = {"film": os.path.basename(path), "ffmpeg_threads1": measured(ffmpeg_full_decode, path),
         "index": measured(read_index, path, path)}
    for mode in ("exact", "keyframe"):
        r[mode] = measured(decoder, path, args.size, mode)
    for mode in ("dense", "exact", "keyframe"):
        r[f"stills_{mode}"] = measured(stills_only, path, args.size, mode)
    floor = r["ffmpeg_threads1"]["cpu_s"]
    for key, m in r.items():
        if isinstance(m, dict):
            m["x_ffmpeg"] = round(m["cpu_s"] / floor, 3) if floor else None
    return r


def table(results: dict) -> str:
    rows = ["| film | path | CPU s | wall s | x ffmpeg -threads 1 | target |", "|---|---|---:|---:|---:|---:|"]
    for name, r in results.items():
        if not isinstance(r, dict) or "ffmpeg_threads1" not in r:
            continue
        for key, m in r.items():
            if isinstance(m, dict) and "cpu_s" in m:
                target = TARGETS.get((name, key))
                rows.append(f"| {name} | {key} | {m['cpu_s']:.2f} | {m['wall_s']:.2f} | {m['x_ffmpeg']:.3f} | "
                            f"{'<= %.2f' % target if target else ''} |")
    return "\n".join(rows)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--width", type=int, default=1920)
    p.add_argument("--height", type=int, default=1080)
    p.add_argument("--seconds", type=int, default=60, help="length of the H.264 film")
    p.add_argument("--mjpeg-seconds", type=int, default=30)
    p.add_argument("--long", action="store_true", help="also the 2-hour 320x180 film (~10 min the first time)")
    p.add_argument("--long-seconds", type=int, default=7200)
    p.add_argument("--size", type=int, default=224, help="still size in pixels")
    p.add_argument("--scores", action="store_true", help="also compare keyframe-mode scores with exact ones")
    p.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "kissray-bench"))
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    os.makedirs(args.workdir, exist_ok=True)
    films = make_films(args)
    results: dict = {"size": args.size}
    for name, path in films.items():
        results[name] = bench_film(name, path, args)
    if args.scores:
        import torch

        from kissray.model import ModelConfig, init_model

        torch.set_num_threads(2)
        model = init_model(ModelConfig(image_size=args.size)).prepare("cpu")  # seed 0, random weights
        for name, path in films.items():
            if name != "long":  # 2 x 7,200 clips through ResNet-18 on CPU: not here
                results[name]["scores"] = score_changes(path, model)
    write_json(results, args.json)
    print(table(results))
    for name, r in results.items():
        if isinstance(r, dict) and "scores" in r:
            print(f"{name}: keyframe vs exact scores {r['scores']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
