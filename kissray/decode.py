"""The decoders behind :mod:`kissray.media`: decord for stills, PyAV for audio.

Normally run as a child process (``python -m kissray.decode REQUEST_JSON``) that writes framed
messages to stdout: a little-endian uint32 header length, a JSON header, then ``header["payload"]``
bytes. Messages: ``info`` (the film's MediaInfo), ``clip`` (frames + log-mel bytes), ``end``, or
``error`` (a MediaError type name and a one-line reason).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import struct
import subprocess
import sys
from dataclasses import asdict, dataclass
from typing import Callable, Iterator

import numpy as np

from kissray.audio import CLIP_SAMPLES, PATCH_OFFSET_SAMPLES, SAMPLE_RATE_HZ, SILENCE_LOG_MEL, clip_log_mels
from kissray.errors import DecodeError, MediaError, MediaOpenError, TooShortError
from kissray.ffmpeg import ffmpeg_exe
from kissray.media import Clip, MediaInfo, n_clips_for

AUDIO_SEEK_MARGIN_S = 1.0  # seek this far before the first sample needed, then decode forward
CLIP_GROUP = 32  # clips decoded together: one decord get_batch, one batched log-mel FFT
PTS_JITTER_SAMPLES = 2  # audio frame timestamps closer than this to "contiguous" are contiguous


@dataclass(frozen=True)
class _Container:
    """What PyAV reads from the container header."""

    width: int
    height: int
    video_start_s: float  # absolute start of the video stream (decord's timestamps are relative to it)
    audio_stream: int | None  # index of the first audio stream, if any
    duration_s: float | None = None  # what the container declares (a truncated file declares more than it has)


def short_reason(error: BaseException) -> str:
    """One readable line from a decord/FFmpeg exception (drops log prefixes and C++ frames)."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    text = re.sub(r"\[[\d:]+\] \S+:\d+: ", "", text)  # decord's "[hh:mm:ss] file.cc:123: " prefixes
    return text[:300]


def _inspect_container(path: str, uri: str) -> _Container:
    import av

    try:
        with av.open(path, metadata_errors="ignore") as container:
            if not container.streams.video:
                kind = "audio-only file" if container.streams.audio else "no video stream"
                raise MediaOpenError(uri, f"not a video: {kind}")
            video = container.streams.video[0]
            start = float(video.start_time * video.time_base) if video.start_time is not None else 0.0
            audio = container.streams.audio[0].index if container.streams.audio else None
            if video.duration is not None:
                declared = float(video.duration * video.time_base)
            else:
                declared = container.duration / 1e6 if container.duration else None
            return _Container(video.codec_context.width, video.codec_context.height, start, audio, declared)
    except av.FFmpegError as e:
        raise MediaOpenError(uri, f"not a readable media file ({short_reason(e)})") from e


def _inspect_with_decord(path: str, uri: str, pyav_error: MediaOpenError) -> _Container:
    """When PyAV cannot read the container but decord can read the video, score without audio."""
    try:
        height, width = VideoTrack(path, uri, None, threads=1).reader[0].shape[:2]
    except Exception:
        raise pyav_error from None
    return _Container(width, height, 0.0, None)


class VideoTrack:
    """decord's frame index of one film, with presentation times relative to the first frame."""

    def __init__(self, path: str, uri: str, size: int | None, threads: int = 0):
        self.uri, self._path, self._size = uri, path, size
        try:
            self.reader = self._open(threads)
            n = len(self.reader)
            times = self.reader.get_frame_timestamp(np.arange(n)) if n else np.zeros((0, 2))
        except Exception as e:  # decord raises DECORDError / RuntimeError with C++ log text
            raise MediaOpenError(uri, f"cannot open video: {short_reason(e)}") from e
        if n == 0:
            raise MediaOpenError(uri, "no decodable video frames")
        times = np.asarray(times, np.float64)
        self.first_pts_s = float(times[:, 0].min())
        self.pts_s = times[:, 0] - self.first_pts_s  # sorted by decord
        self.duration_s = float(times[:, 1].max()) - self.first_pts_s
        self.fps = float(self.reader.get_avg_fps())

    def still_indices(self, clip_indices: np.ndarray, frames_per_clip: int) -> np.ndarray:
        """int[n, K]: for each clip, the last frame with pts <= i + (k + 0.5)/K."""
        times = clip_indices[:, None] + (np.arange(frames_per_clip) + 0.5) / frames_per_clip
        # decord reports float32 times: compare at that precision, not below it
        eps = np.maximum(1e-6, np.abs(times) * 2.0**-22)
        idx = np.searchsorted(self.pts_s, times + eps, side="right") - 1
        return np.clip(idx, 0, len(self.pts_s) - 1)

    def _open(self, threads: int):
        import decord

        resize = {"width": self._size, "height": self._size} if self._size else {}
        return decord.VideoReader(self._path, ctx=decord.cpu(0), num_threads=threads, **resize)

    def stills(self, indices: np.ndarray, first_clip: int) -> Iterator[np.ndarray | DecodeError]:
        """Per clip, uint8[K, H, W, 3] RGB stills, or a DecodeError for a clip that cannot be
        decoded (``indices``: int[n, K] of consecutive clips from ``first_clip``).

        One ``get_batch`` per group, then ``seek(0)``: decord's threaded decoder otherwise keeps
        decoding ahead while the caller is busy (measured: 1.5 GB RSS and +40% CPU on a 2-hour
        film; benchmarks/NOTES.md). A damaged packet leaves that decoder in an error state, so a
        failed group is redone clip by clip, reopening the reader after each failure.
        """
        unique, inverse = np.unique(indices, return_inverse=True)
        try:
            batch = self.reader.get_batch(unique.tolist()).asnumpy()
            self.reader.seek(0)
        except Exception:
            yield from self._stills_one_by_one(indices, first_clip)
            return
        yield from batch[inverse.reshape(indices.shape)]

    def _stills_one_by_one(self, indices: np.ndarray, first_clip: int) -> Iterator[np.ndarray | DecodeError]:
        self.reader = self._open(threads=1)
        for row, clip_indices in enumerate(indices):
            try:
                yield self.reader.get_batch(clip_indices.tolist()).asnumpy()
            except Exception as e:
                yield DecodeError(self.uri, f"clip {first_clip + row}: {short_reason(e)}")
                self.reader = self._open(threads=1)
        self.reader.seek(0)


class AudioTrack:
    """Mono 16 kHz samples on the film's timeline, decoded forward on demand with PyAV.

    ``read(a, b)`` returns timeline samples ``[a, b)`` (calls must not go backwards); samples the
    film does not have are zeros. If decoding fails, ``failed`` is set and the rest is silence.
    """

    def __init__(self, path: str, stream_index: int, origin_s: float, first_sample: int):
        import av

        self._container = av.open(path, metadata_errors="ignore")
        self._stream = self._container.streams[stream_index]
        self._origin_s = origin_s  # absolute time of the film's t = 0
        self._buf = np.zeros(0, np.float32)
        self._buf_start = first_sample  # timeline sample index of _buf[0]
        self.failed = False
        self._exhausted = False
        self._chunks = self._decode(first_sample)

    def close(self) -> None:
        self._container.close()

    def _decode(self, first_sample: int) -> Iterator[tuple[int, np.ndarray]]:
        import av

        seek_s = self._origin_s + first_sample / SAMPLE_RATE_HZ - AUDIO_SEEK_MARGIN_S
        stream = self._stream
        # mono first (SPEC: the mean of the channels), then resample: swresample's own downmix
        # is not a mean, and it crashes on some 7.1 layouts
        resampler = av.AudioResampler(format="flt", layout="mono", rate=SAMPLE_RATE_HZ)
        if stream.start_time is not None and seek_s > float(stream.start_time * stream.time_base):
            self._container.seek(int(seek_s / stream.time_base), stream=stream)
        for frame in self._container.decode(stream):
            mono = av.AudioFrame.from_ndarray(_mean_of_channels(frame)[None, :], format="flt", layout="mono")
            mono.sample_rate, mono.pts, mono.time_base = frame.sample_rate, frame.pts, frame.time_base
            for out in resampler.resample(mono):
                yield self._timeline_sample(out), out.to_ndarray()[0]

    def _timeline_sample(self, frame) -> int | None:
        if frame.pts is None:
            return None
        return int(round((float(frame.pts * frame.time_base) - self._origin_s) * SAMPLE_RATE_HZ))

    def read(self, a: int, b: int) -> np.ndarray:
        pending, end = [self._buf], self._buf_start + len(self._buf)
        while not (self.failed or self._exhausted) and end < b:
            try:
                at, samples = next(self._chunks)
            except StopIteration:  # the audio ended: the rest is zeros, still has_audio
                self._exhausted = True
                break
            except Exception:  # undecodable audio: the rest of the film is silence
                self.failed = True
                break
            samples = self._align(at, end, samples)
            pending.append(samples)
            end += len(samples)
        self._buf = np.concatenate(pending) if len(pending) > 1 else self._buf
        out = np.zeros(b - a, np.float32)
        lo, hi = max(a, self._buf_start), min(b, end)
        if hi > lo:
            out[lo - a:hi - a] = self._buf[lo - self._buf_start:hi - self._buf_start]
        keep = max(0, a - self._buf_start)  # later reads never look before a
        self._buf, self._buf_start = self._buf[keep:], self._buf_start + keep
        return out

    @staticmethod
    def _align(at: int | None, end: int, samples: np.ndarray) -> np.ndarray:
        """Place a decoded chunk that starts at timeline sample ``at`` after the buffer's ``end``."""
        if at is None or abs(at - end) <= PTS_JITTER_SAMPLES:
            return samples
        if at > end:  # a gap in the audio: silence
            return np.concatenate([np.zeros(at - end, np.float32), samples])
        return samples[end - at:]  # overlaps what we have (decoded from before the seek target)


_PCM_SCALE = {"u8": 128.0, "s16": 32768.0, "s32": 2147483648.0, "s64": 9223372036854775808.0}


def _mean_of_channels(frame) -> np.ndarray:
    """float32[samples]: the mean of an audio frame's channels, in [-1, 1]."""
    data = frame.to_ndarray()
    fmt = frame.format.name.rstrip("p")
    channels = len(frame.layout.channels)
    if not frame.format.is_planar:
        data = data.reshape(-1, channels).T
    data = data.astype(np.float32)
    if fmt == "u8":
        data -= 128.0
    if fmt in _PCM_SCALE:
        data /= _PCM_SCALE[fmt]
    return np.ascontiguousarray(data.mean(axis=0, dtype=np.float32))


def decode_clips(path: str, uri: str, start: int = 0, stop: int | None = None, *,
                 frames_per_clip: int = 1, size: int = 224, threads: int = 0,
                 scratch_dir: str | None = None) -> tuple[MediaInfo, Iterator[Clip]]:
    """Open a local film; return its MediaInfo and an iterator over clips ``[start, stop)``.

    The iterator yields a :class:`DecodeError` in place of a clip that cannot be decoded.

    A file decord cannot index (typically truncated: its index lists frames its data lacks) is
    remuxed into ``scratch_dir`` up to the first unreadable packet; the clips of that readable part
    are delivered, then a :class:`DecodeError` says how much of the declared duration was missing.
    """
    try:
        container = _inspect_container(path, uri)
    except MediaOpenError as e:
        container = _inspect_with_decord(path, uri, e)  # PyAV refused (e.g. a broken audio config)
    try:
        video, readable_to_s = VideoTrack(path, uri, size or None, threads), None
    except MediaOpenError:
        path = _salvage(path, uri, container, scratch_dir)  # re-raises when nothing is salvageable
        container = dataclasses.replace(_inspect_container(path, uri), duration_s=container.duration_s)
        video = VideoTrack(path, uri, size or None, threads)
        readable_to_s = video.duration_s
    duration_s = video.duration_s if readable_to_s is None else max(container.duration_s, readable_to_s)
    info = MediaInfo(round(duration_s, 6), video.fps, container.width, container.height,
                     container.audio_stream is not None, n_clips_for(duration_s))
    if info.n_clips < 1:
        raise TooShortError(uri, f"too short: {duration_s:.3f} s of video (at least 0.5 s needed)")
    stop = info.n_clips if stop is None else min(int(stop), info.n_clips)
    start = max(0, int(start))
    clips = _clips(video, container, path, start, stop, frames_per_clip)
    if readable_to_s is not None:
        clips = _then_truncated(clips, uri, n_clips_for(readable_to_s), stop, readable_to_s, duration_s)
    return info, clips


def _salvage(path: str, uri: str, container: _Container, scratch_dir: str | None) -> str:
    """Remux the readable packets of a damaged film into a Matroska file decord can index."""
    if not (scratch_dir and container.duration_s):
        raise MediaOpenError(uri, "cannot open video: decord could not index the file")
    out = os.path.join(scratch_dir, "salvaged.mkv")
    subprocess.run([ffmpeg_exe(), "-nostdin", "-y", "-v", "quiet", "-err_detect", "ignore_err",
                    "-fflags", "+genpts+discardcorrupt", "-i", path, "-map", "0:v:0", "-map", "0:a:0?",
                    "-c", "copy", "-f", "matroska", out], stdin=subprocess.DEVNULL, check=False)
    if not os.path.exists(out) or os.path.getsize(out) == 0:
        raise MediaOpenError(uri, "cannot open video: damaged beyond repair")
    return out


def _then_truncated(clips: Iterator[Clip], uri: str, readable_clips: int, stop: int,
                    readable_to_s: float, declared_s: float) -> Iterator[Clip]:
    for clip in clips:
        if getattr(clip, "index", -1) >= readable_clips:
            break
        yield clip
    if stop > readable_clips:
        raise DecodeError(uri, f"truncated or damaged: only the first {readable_to_s:.1f} s of "
                               f"{declared_s:.1f} s could be decoded")


def _clips(video: VideoTrack, container: _Container, path: str, start: int, stop: int,
           frames_per_clip: int) -> Iterator[Clip]:
    if stop <= start:
        return
    audio = None
    if container.audio_stream is not None:
        origin_s = container.video_start_s + video.first_pts_s
        try:
            audio = AudioTrack(path, container.audio_stream, origin_s, start * CLIP_SAMPLES + PATCH_OFFSET_SAMPLES)
        except Exception:  # the stream exists but cannot be opened: silence
            audio = None
    indices = video.still_indices(np.arange(start, stop), frames_per_clip)
    try:
        for group in range(start, stop, CLIP_GROUP):
            group_stop = min(group + CLIP_GROUP, stop)
            log_mels, has_audio = _group_log_mels(audio, group, group_stop)
            stills = video.stills(indices[group - start:group_stop - start], group)
            for i, frames in enumerate(stills, start=group):
                if isinstance(frames, DecodeError):
                    yield frames  # a gap: the caller records it and goes on
                else:
                    yield Clip(i, np.ascontiguousarray(frames), log_mels[i - group], has_audio)
    finally:
        if audio is not None:
            audio.close()


def _group_log_mels(audio: AudioTrack | None, start: int, stop: int) -> tuple[np.ndarray, bool]:
    """The VGGish patches of clips [start, stop) in one batched FFT (silence without audio)."""
    if audio is None:
        return np.broadcast_to(SILENCE_LOG_MEL, (stop - start, *SILENCE_LOG_MEL.shape)), False
    first = start * CLIP_SAMPLES + PATCH_OFFSET_SAMPLES
    samples = audio.read(first, stop * CLIP_SAMPLES)
    return clip_log_mels(samples, start, stop - start, offset_samples=first), not audio.failed


def _serve(request: dict, send: Callable[[dict, bytes], None]) -> None:
    info, clips = decode_clips(request["path"], request["uri"], request["start"], request["stop"],
                               frames_per_clip=request["frames_per_clip"], size=request["size"],
                               threads=request["threads"], scratch_dir=request.get("scratch_dir"))
    send({"type": "info", "info": asdict(info)}, b"")
    for clip in clips:
        if isinstance(clip, DecodeError):
            send({"type": "gap", "reason": clip.reason}, b"")
            continue
        payload = clip.frames.tobytes() + np.ascontiguousarray(clip.log_mel, np.float32).tobytes()
        send({"type": "clip", "index": clip.index, "has_audio": clip.has_audio}, payload)
    send({"type": "end"}, b"")


def main() -> int:
    request = json.loads(sys.argv[1])
    protocol = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # anything the C libraries print goes to stderr, never into the protocol

    def send(header: dict, payload: bytes) -> None:
        data = json.dumps({**header, "payload": len(payload)}).encode()
        protocol.write(struct.pack("<I", len(data)) + data + payload)
        protocol.flush()

    try:
        _serve(request, send)
    except BrokenPipeError:
        return 0
    except MediaError as e:
        send({"type": "error", "error": type(e).__name__, "reason": e.reason}, b"")
    except Exception as e:  # anything else is a decode failure of this film, never a traceback
        send({"type": "error", "error": "DecodeError", "reason": f"{type(e).__name__}: {short_reason(e)}"}, b"")
    return 0


if __name__ == "__main__":
    sys.exit(main())
