"""The ffmpeg executable (imageio-ffmpeg's bundled build) and film writing for synthetic media.

Commands are always argument lists, never shell strings.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import wave
from typing import Callable, Sequence

import numpy as np

H264_ARGS = ("-c:v", "libx264", "-preset", "veryfast", "-pix_fmt", "yuv420p")
LOSSLESS_RGB_ARGS = ("-c:v", "libx264rgb", "-preset", "veryfast", "-crf", "0")
AAC_ARGS = ("-c:a", "aac", "-b:a", "96k")


def ffmpeg_exe() -> str:
    """Path of the ffmpeg binary: $KISSRAY_FFMPEG, imageio-ffmpeg's bundled one, or the system's."""
    if os.environ.get("KISSRAY_FFMPEG"):
        return os.environ["KISSRAY_FFMPEG"]
    try:
        import imageio_ffmpeg

        return imageio_ffmpeg.get_ffmpeg_exe()
    except (ImportError, RuntimeError):
        found = shutil.which("ffmpeg")
        if not found:
            raise RuntimeError("no ffmpeg: pip install imageio-ffmpeg or set KISSRAY_FFMPEG") from None
        return found


def run_ffmpeg(args: Sequence[str], timeout_s: float | None = None, stdin: bytes | None = None) -> None:
    """Run ``ffmpeg -nostdin -y -v error ARGS``; raise RuntimeError with ffmpeg's message on failure."""
    argv = [ffmpeg_exe(), "-hide_banner", *([] if stdin is not None else ["-nostdin"]), "-y", "-v", "error", *args]
    proc = subprocess.run(argv, input=stdin, capture_output=True, timeout=timeout_s)
    if proc.returncode != 0:
        raise RuntimeError(f"ffmpeg failed ({proc.returncode}): {proc.stderr.decode(errors='replace')[-500:]}")


def write_wav(path: str, samples: np.ndarray, sample_rate: int) -> None:
    """samples: float [n] or [n, channels] in [-1, 1] -> 16-bit PCM WAV."""
    samples = samples if samples.ndim == 2 else samples[:, None]
    pcm = (np.clip(samples, -1, 1) * 32767).astype("<i2")
    with wave.open(path, "wb") as f:
        f.setnchannels(samples.shape[1])
        f.setsampwidth(2)
        f.setframerate(sample_rate)
        f.writeframes(pcm.tobytes())


def write_film(path: str, frame_at: Callable[[int], np.ndarray], n_frames: int, fps: str | float,
               audio: np.ndarray | None = None, sample_rate: int = 48000,
               video_args: Sequence[str] = H264_ARGS, audio_args: Sequence[str] = AAC_ARGS,
               extra_args: Sequence[str] = ()) -> str:
    """Encode frames (``frame_at(n)`` -> uint8[H, W, 3] RGB) and optional audio into ``path``.

    ``fps`` may be a rational string such as ``"30000/1001"``. Frames are piped raw, so what a
    test asserts about pixel values is exactly what went in (up to the codec).
    """
    first = frame_at(0)
    height, width = first.shape[:2]
    with tempfile.TemporaryDirectory(prefix="kissray-film-") as tmp:
        raw = os.path.join(tmp, "video.rgb")
        with open(raw, "wb") as f:
            for n in range(n_frames):
                f.write(np.ascontiguousarray(frame_at(n) if n else first, np.uint8).tobytes())
        args = ["-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{width}x{height}", "-r", str(fps), "-i", raw]
        if audio is not None:
            wav = os.path.join(tmp, "audio.wav")
            write_wav(wav, audio, sample_rate)
            args += ["-i", wav, *audio_args]
        run_ffmpeg([*args, *video_args, *extra_args, path])
    return path
