"""CPU and wall time of each way to get one still per second, and of the audio path, on one film.

  ffmpeg_video_floor   ffmpeg decoding the video stream to null (``-an``), 1 thread
  decord               decord's ``get_batch`` per 32 clips + ``seek(0)`` (the fallback path)
  exact                PyAV, only what the stills depend on (stills="exact", the default)
  keyframe             PyAV, keyframes only (stills="keyframe")
  audio                PyAV AAC decode, mean of channels, 16 kHz resample, VGGish log-mel

Each runs in this process (the decoder child does the same work), on the film that
``throughput.py`` generates, at ``--size`` px and 1 and 2 decoder threads.

  python benchmarks/decode_paths.py [--seconds 600] [--json benchmarks/results/decode-paths.json]
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from throughput import make_film, write_json  # noqa: E402

from kissray.media.audio_track import AudioTrack  # noqa: E402
from kissray.media.child import IndexCache, _group_log_mels  # noqa: E402
from kissray.media.video import CLIP_GROUP, VideoTrack  # noqa: E402
from kissray.media.ffmpeg import ffmpeg_exe  # noqa: E402


def measured(fn, *args) -> dict:
    """CPU seconds (this process and its children) and wall seconds of ``fn(*args)``."""
    def cpu() -> float:
        own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime

    cpu0, wall0 = cpu(), time.perf_counter()
    fn(*args)
    return {"cpu_s": round(cpu() - cpu0, 2), "wall_s": round(time.perf_counter() - wall0, 2)}


def ffmpeg_video_floor(path: str) -> None:
    subprocess.run([ffmpeg_exe(), "-v", "error", "-threads", "1", "-i", path, "-an", "-f", "null", "-"], check=True)


def stills(path: str, size: int, threads: int, mode: str) -> None:
    _, index, _ = IndexCache().get(path, path)
    track = VideoTrack(path, path, index, size, threads, "exact" if mode == "decord" else mode)
    n = int(np.floor(index.duration_s + 0.5))
    indices = track.still_indices(np.arange(n), 1)
    paths = track._decord_stills(indices, 0, "benchmark") if mode == "decord" else track.stills(indices, 0)
    for still in paths:
        assert isinstance(still, np.ndarray), still
    assert track.fallbacks == []  # no silent fallback


def audio(path: str) -> None:
    container, index, _ = IndexCache().get(path, path)
    n = int(np.floor(index.duration_s + 0.5))
    samples = AudioTrack(path, container.audio_stream, index.first_s, 400)
    for start in range(0, n, CLIP_GROUP):
        _group_log_mels(samples, start, min(start + CLIP_GROUP, n))
    samples.close()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=int, default=600)
    p.add_argument("--size", type=int, default=112)
    p.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "kissray-bench"))
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    os.makedirs(args.workdir, exist_ok=True)
    film = make_film(os.path.join(args.workdir, f"film-{args.seconds}s-640x360-g250-b3.mp4"),
                     args.seconds, 640, 360, 250, 3)
    r = {"film": os.path.basename(film), "size": args.size,
         "ffmpeg_video_floor": measured(ffmpeg_video_floor, film)}
    for threads in (1, 2):
        for mode in ("decord", "exact", "keyframe"):
            r[f"{mode}_{threads}t"] = measured(stills, film, args.size, threads, mode)
    r["audio"] = measured(audio, film)
    write_json(r, args.json)
    print("| path | CPU s | wall s |\n|---|---:|---:|")
    for key, m in r.items():
        if isinstance(m, dict):
            print(f"| {key} | {m['cpu_s']:.2f} | {m['wall_s']:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
