"""A library of 30 odd and broken files, made with ffmpeg, for the library job's end-to-end test
(tests/test_odd_library.py) and by hand (``python tests/odd_library.py DIR``).

Each entry: (file name, what it is, the status ``kissray score`` must give it). The odd ones that a
user's player plays must score ``ok``; damaged ones ``partial`` or ``failed`` with a reason.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from conftest import make_film  # noqa: E402
from kissray.media.ffmpeg import run_ffmpeg  # noqa: E402

OK, PARTIAL, FAILED = "ok", "partial", "failed"
SIZE = (64, 48)


def _film(path: Path, seconds: float = 4, **kwargs) -> str:
    return make_film(path, seconds, size=kwargs.pop("size", SIZE), **kwargs)


def _remux(src: str, dst: Path, *args: str) -> str:
    run_ffmpeg(["-i", src, *args, str(dst)])
    return str(dst)


def build(root: Path) -> dict[str, str]:
    """Write the library under ``root``; returns file name -> expected status."""
    root.mkdir(parents=True, exist_ok=True)
    base = _film(root / "plain.mp4", 5)
    expected = {"plain.mp4": OK}

    def add(name: str, status: str, make) -> None:
        make(root / name)
        expected[name] = status

    add("bframes-open-gop.mp4", OK, lambda p: _film(p, 5, extra_args=("-bf", "3", "-g", "7", "-x264opts", "open-gop=1")))
    add("matroska.mkv", OK, lambda p: _film(p, 4, video_args=("-c:v", "libx264", "-pix_fmt", "yuv420p", "-bf", "2")))
    add("vp9-opus.webm", OK, lambda p: _film(p, 4, video_args=("-c:v", "libvpx-vp9", "-deadline", "realtime",
                                                                  "-cpu-used", "8"), audio_args=("-c:a", "libopus")))
    add("quicktime-ntsc.mov", OK, lambda p: _film(p, 4, fps="30000/1001", channels=2, sample_rate=44100))
    add("mpeg4-ac3.avi", OK, lambda p: _film(p, 5, video_args=("-c:v", "mpeg4", "-q:v", "5", "-bf", "2"),
                                             audio_args=("-c:a", "ac3")))
    add("xvid-packed.avi", OK, lambda p: _film(p, 5, video_args=("-c:v", "mpeg4", "-vtag", "XVID", "-bf", "2",
                                                                 "-q:v", "4"), audio_args=("-c:a", "ac3")))
    add("transport.ts", OK, lambda p: _film(p, 4, extra_args=("-f", "mpegts")))
    add("mjpeg-pcm.avi", OK, lambda p: _film(p, 3, video_args=("-c:v", "mjpeg", "-q:v", "3"),
                                             audio_args=("-c:a", "pcm_s16le")))
    add("flash.flv", OK, lambda p: _film(p, 3, video_args=("-c:v", "flv1")))
    add("no-audio.mp4", OK, lambda p: _film(p, 4, audio=False))
    add("surround-7.1.mkv", OK, lambda p: _film(p, 3, channels=8, audio_args=("-c:a", "flac")))
    add("low-rate-8k.mp4", OK, lambda p: _film(p, 3, sample_rate=8000))
    add("odd-size-65x49.mkv", OK, lambda p: _film(p, 3, size=(65, 49), video_args=("-c:v", "libx264", "-pix_fmt",
                                                                                   "yuv444p")))
    add("ts-offset-1e6.mkv", OK, lambda p: _remux(base, p, "-c", "copy", "-output_ts_offset", "1000000"))
    add("ts-offset-neg.mp4", OK, lambda p: _remux(base, p, "-c", "copy", "-output_ts_offset", "-2"))
    add("vfr-frames.mkv", OK, lambda p: _remux(base, p, "-c:v", "libx264", "-vf", "select='not(mod(n\\,3))'",
                                               "-fps_mode", "vfr", "-c:a", "copy"))
    add("one-second.mp4", OK, lambda p: _film(p, 1.0))
    add("unicode-名前 [1942].mp4", OK, lambda p: _film(p, 3))
    add("too-short.mp4", FAILED, lambda p: _film(p, 0.3))
    add("empty.mp4", FAILED, lambda p: p.write_bytes(b""))
    add("text.mkv", FAILED, lambda p: p.write_text("not a film\n" * 100))
    add("audio-only.mp4", FAILED, lambda p: run_ffmpeg(["-f", "lavfi", "-i", "sine=frequency=440:duration=3",
                                                        "-c:a", "aac", str(p)]))
    add("png-renamed.mp4", FAILED, lambda p: run_ffmpeg(["-f", "lavfi", "-i", "color=c=red:s=64x48", "-frames:v",
                                                         "1", "-f", "image2", "-c:v", "png", str(p)]))
    add("header-only.mp4", FAILED, lambda p: p.write_bytes(Path(base).read_bytes()[:64]))
    faststart = _film(root / "faststart.mp4", 20, extra_args=("-movflags", "+faststart"))
    expected["faststart.mp4"] = OK
    add("truncated-half.mp4", PARTIAL, lambda p: p.write_bytes(Path(faststart).read_bytes()[: Path(faststart).stat()
                                                                                             .st_size // 2]))
    add("truncated.mkv", PARTIAL, lambda p: p.write_bytes(_mkv_bytes(root, faststart)))
    add("garbage-middle.ts", OK, lambda p: p.write_bytes(_with_garbage(_film(root / "src.ts.tmp", 6,
                                                                             extra_args=("-f", "mpegts")))))
    (root / "src.ts.tmp").unlink()
    return expected


def _mkv_bytes(root: Path, src: str) -> bytes:
    full = _remux(src, root / "full.mkv.tmp", "-c", "copy", "-f", "matroska")
    data = Path(full).read_bytes()
    Path(full).unlink()
    return data[: len(data) * 6 // 10]


def _with_garbage(path: str) -> bytes:
    """An MPEG-TS whose middle 4 KiB are overwritten: the demuxer resyncs, the decoder conceals."""
    data = bytearray(Path(path).read_bytes())
    middle = len(data) // 2
    data[middle:middle + 4096] = bytes((i * 37) % 256 for i in range(4096))
    return bytes(data)


if __name__ == "__main__":
    for name, status in build(Path(sys.argv[1])).items():
        print(f"{status:8s} {name}")
