"""A long film on a local S3 server: windowed range reads vs whole-film staging (issue 15).

The server is moto's (``tests/s3_server.py``: 127.0.0.1, behind a relay that counts the bytes it
sends). For one film, each way of reading it reports bytes fetched from the server, the most
local disk used for staged copies, time to the first clip and wall time:

  download only     ``fs.get_file`` of the object: the floor of moving its bytes (no decoding)
  ranged GETs only  the object read by 1 MiB ranged GETs one after another, nothing decoded: the
                    floor of reading it by ranges from this server (moto's cost per ranged GET grows
                    with the object's size, ~130 ms for 235 MB here; S3's does not)
  staged, 1 window  what kissray did before: the decode task copies the whole film to local disk
                    (``media.local_path``), then one decoder reads all of it
  ranges, N windows a probe, then N windows each in a fresh decoder (as on N nodes), reading only
                    their byte ranges (``kissray.media.ranges``); run one after another here (2 cores)
  ranges, 1 window  one decoder reading the whole film by ranges (and again without read-ahead)

Every response waits ``--latency-ms`` (default 30) before its first byte, as a cloud store's
time to first byte does; moto on 127.0.0.1 answers in about a millisecond.

  python benchmarks/remote.py [--minutes 10] [--windows 4] [--latency-ms 30] [--json benchmarks/results/remote.json]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.join(os.path.dirname(HERE), "tests")]

from s3_server import S3Server, environment, free_port  # noqa: E402
from throughput import write_json  # noqa: E402


def make_film(path: str, minutes: float, size: str, bitrate: str) -> str:
    from kissray.media.ffmpeg import run_ffmpeg

    if not os.path.exists(path):
        run_ffmpeg(["-f", "lavfi", "-i", f"testsrc2=size={size}:rate=25,noise=alls=20:allf=t", "-f", "lavfi",
                    "-i", "sine=frequency=440:sample_rate=48000", "-t", str(minutes * 60), "-c:v", "libx264",
                    "-preset", "ultrafast", "-b:v", bitrate, "-g", "50", "-c:a", "aac", "-b:a", "128k",
                    "-pix_fmt", "yuv420p", path])
    return path


class DiskWatch(threading.Thread):
    """The most bytes found in ``folder`` (sampled every 50 ms) while running."""

    def __init__(self, folder: str):
        super().__init__(daemon=True)
        self.folder, self.peak, self._done = folder, 0, threading.Event()

    def run(self) -> None:
        while not self._done.wait(0.05):
            total = 0
            for name in os.listdir(self.folder):
                try:
                    total += os.path.getsize(os.path.join(self.folder, name))
                except OSError:
                    pass
            self.peak = max(self.peak, total)

    def stop(self) -> int:
        self._done.set()
        self.join()
        return self.peak


def measure(name: str, server: S3Server, stage_dir: str, run) -> dict:
    before, watch = server.bytes_down, DiskWatch(stage_dir)
    watch.start()
    t0 = time.perf_counter()
    first = run()
    wall = time.perf_counter() - t0
    row = {"mode": name, "bytes_fetched": server.bytes_down - before, "local_disk_peak": watch.stop(),
           "first_clip_s": None if first is None else round(first - t0, 2), "wall_s": round(wall, 2)}
    print(row, flush=True)
    return row


def decode(uri: str, windows: list[tuple[int, int]], size: int, stage: bool) -> float | None:
    """Decode ``windows`` of the film, each in a fresh decoder; the time of the first clip."""
    from kissray.media import DECODERS, REMOTE_DECODERS, ClipReader, local_path

    first = None
    for start, stop in windows:
        DECODERS.close()
        REMOTE_DECODERS.close()
        with local_path(uri, staging_dir=os.environ["KISSRAY_STAGE_DIR"]) if stage else _nothing(uri) as film:
            with ClipReader(film, start, stop, size=size) as reader:
                for _ in reader:
                    first = first or time.perf_counter()
    return first


def ranged_gets(key: str, size: int) -> None:
    import fsspec

    from kissray.media.ranges import BLOCK_BYTES

    fs = fsspec.filesystem("s3")
    for start in range(0, size, BLOCK_BYTES):
        fs.cat_file(key, start=start, end=min(size, start + BLOCK_BYTES))


class _nothing:
    def __init__(self, value):
        self.value = value

    def __enter__(self):
        return self.value

    def __exit__(self, *exc):
        return False


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--frame-size", default="640x360")
    parser.add_argument("--bitrate", default="3M")
    parser.add_argument("--windows", type=int, default=4)
    parser.add_argument("--latency-ms", type=float, default=30.0, help="time to first byte of every response")
    parser.add_argument("--size", type=int, default=224, help="still size, pixels (the default checkpoint's)")
    parser.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "kissray-bench-remote"))
    parser.add_argument("--json")
    args = parser.parse_args()

    os.makedirs(args.workdir, exist_ok=True)
    film = make_film(os.path.join(args.workdir, f"film-{args.minutes:g}min.mp4"), args.minutes, args.frame_size,
                     args.bitrate)
    port = free_port()
    os.environ.update(environment(port))
    stage_dir = tempfile.mkdtemp(prefix="kissray-bench-stage-")
    os.environ["KISSRAY_STAGE_DIR"] = stage_dir
    server = S3Server(port, args.latency_ms / 1000).start()
    try:
        import fsspec

        from kissray.media import probe

        server.make_bucket("films")
        fsspec.filesystem("s3").put_file(film, "films/long.mp4")
        uri, size = "s3://films/long.mp4", os.path.getsize(film)
        n_clips = probe(film).n_clips
        step = -(-n_clips // args.windows)
        windows = [(a, min(a + step, n_clips)) for a in range(0, n_clips, step)]
        rows = [measure("download only", server, stage_dir,
                        lambda: fsspec.filesystem("s3").get_file("films/long.mp4", os.path.join(stage_dir, "copy"))
                        or None)]
        os.unlink(os.path.join(stage_dir, "copy"))
        rows.append(measure("ranged GETs only", server, stage_dir, lambda: ranged_gets("films/long.mp4", size)))
        rows.append(measure("staged, 1 window", server, stage_dir, lambda: decode(uri, [(0, None)], args.size, True)))
        rows.append(measure(f"ranges, {len(windows)} windows", server, stage_dir,
                            lambda: (probe(uri), decode(uri, windows, args.size, False))[1]))
        rows.append(measure("ranges, 1 window", server, stage_dir, lambda: decode(uri, [(0, None)], args.size, False)))
        os.environ["KISSRAY_RANGE_READ_AHEAD"] = "0"  # decoder children started from now on
        rows.append(measure("ranges, 1, no read-ahead", server, stage_dir,
                            lambda: decode(uri, [(0, None)], args.size, False)))
        del os.environ["KISSRAY_RANGE_READ_AHEAD"]
        for row in rows:
            row["x_film_size"] = round(row["bytes_fetched"] / size, 3)
        print(f"\nfilm: {args.minutes:g} min {args.frame_size} {args.bitrate}, {size / 1e6:.1f} MB, {n_clips} clips, "
              f"{args.latency_ms:g} ms to first byte, {args.size}-px stills")
        print(f"{'mode':<26} {'fetched MB':>10} {'x size':>7} {'disk MB':>8} {'1st clip s':>10} {'wall s':>7}")
        for r in rows:
            first = "-" if r["first_clip_s"] is None else f"{r['first_clip_s']:.1f}"
            print(f"{r['mode']:<26} {r['bytes_fetched'] / 1e6:>10.1f} {r['x_film_size']:>7.3f} "
                  f"{r['local_disk_peak'] / 1e6:>8.1f} {first:>10} {r['wall_s']:>7.1f}")
        if args.json:
            write_json({"film": {"minutes": args.minutes, "frame_size": args.frame_size,
                                            "bitrate": args.bitrate, "bytes": size, "clips": n_clips},
                        "latency_ms": args.latency_ms,
                        "still_px": args.size, "rows": rows}, args.json)
    finally:
        server.stop()
        shutil.rmtree(stage_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
