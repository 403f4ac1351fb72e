"""The decoders behind :mod:`kissray.media`: decord's frame index + PyAV for stills, PyAV for audio.

Normally run as a child process (``python -m kissray.decode``) that reads requests, one JSON line
each, from stdin and answers each with framed messages on stdout: a little-endian uint32 header
length, a JSON header, then ``header["payload"]`` bytes. Messages: ``info`` (the film's
MediaInfo), ``clip`` (frames + log-mel bytes), ``gap``, then ``end``; or ``error`` (a MediaError
type name and a one-line reason). A child serves one request after another.
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
SEEK_ATTEMPTS = 3  # keyframes tried, latest first, before decoding a window from the film's start
AUDIO_FRAMES_PER_RUN = 64  # audio frames (~1.5 s of AAC at 44.1 kHz) resampled in one call
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
        height, width = VideoTrack(path, uri, None, threads=1, sequential=False).reader[0].shape[:2]
    except Exception:
        raise pyav_error from None
    return _Container(width, height, 0.0, None)


class VideoTrack:
    """decord's frame index of one film, with presentation times relative to the first frame.

    decord is the authority on which frames exist and when (``pts_s``, ``duration_s``); the pixels
    of the stills come from :class:`SequentialStills` where it can match decord's frames, and from
    decord's own ``get_batch`` otherwise.
    """

    def __init__(self, path: str, uri: str, size: int | None, threads: int = 0, sequential: bool = True):
        self.uri, self._path, self._size, self._threads = uri, path, size, threads
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
        self._key_indices = np.asarray(self.reader.get_key_indices())
        self._sequential: SequentialStills | None = None
        self.sequential = sequential  # stills still come from SequentialStills (False: decord from now on)
        if sequential:  # its demuxer and index (~35 MB for a 2-hour film) come back only for a fallback
            self.reader = None

    def still_indices(self, clip_indices: np.ndarray, frames_per_clip: int) -> np.ndarray:
        """int[n, K]: for each clip, the last frame with pts <= i + (k + 0.5)/K."""
        times = clip_indices[:, None] + (np.arange(frames_per_clip) + 0.5) / frames_per_clip
        idx = np.searchsorted(self.pts_s, times + float32_tolerance(times), side="right") - 1
        return np.clip(idx, 0, len(self.pts_s) - 1)

    def _open(self, threads: int):
        import decord

        resize = {"width": self._size, "height": self._size} if self._size else {}
        return decord.VideoReader(self._path, ctx=decord.cpu(0), num_threads=threads, **resize)

    def close(self) -> None:
        if self._sequential is not None:
            self._sequential.close()

    def stills(self, indices: np.ndarray, first_clip: int) -> Iterator[np.ndarray | DecodeError]:
        """Per clip, uint8[K, H, W, 3] RGB stills, or a DecodeError for a clip that cannot be
        decoded (``indices``: int[n, K] of consecutive clips from ``first_clip``, calls in order).

        First choice: decoding forward with :class:`SequentialStills` (1.6x less CPU than decord
        for 1 still per second: decord converts every decoded frame, benchmarks/NOTES.md). When
        that cannot vouch for a frame, this window falls back to decord.
        """
        unique, inverse = np.unique(indices, return_inverse=True)
        batch = self._sequential_batch(unique)
        if batch is None:
            yield from self._decord_stills(indices, unique, inverse, first_clip)
            return
        yield from batch[inverse.reshape(indices.shape)]

    def _sequential_batch(self, unique: np.ndarray) -> np.ndarray | None:
        if not self.sequential:
            return None
        if self._sequential is None:
            self._sequential = SequentialStills(self._path, self.pts_s + self.first_pts_s, self._key_indices,
                                                self._size, self._threads)
        batch = self._sequential.take(unique)
        if batch is None:  # from now on decord decodes this window
            self._sequential.close()
            self._sequential, self.sequential = None, False
        return batch

    def _decord_stills(self, indices: np.ndarray, unique: np.ndarray, inverse: np.ndarray,
                       first_clip: int) -> Iterator[np.ndarray | DecodeError]:
        """One ``get_batch`` per group, then ``seek(0)``: decord's threaded decoder otherwise keeps
        decoding ahead while the caller is busy (measured: 1.5 GB RSS and +40% CPU on a 2-hour
        film; benchmarks/NOTES.md). A damaged packet leaves that decoder in an error state, so a
        failed group is redone clip by clip, reopening the reader after each failure.
        """
        try:
            if self.reader is None:
                self.reader = self._open(self._threads)
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


def float32_tolerance(times_s: np.ndarray | float) -> np.ndarray:
    """decord reports times as float32 seconds: values closer than this are the same time."""
    return np.maximum(1e-6, np.abs(times_s) * 2.0**-22)


class SequentialStills:
    """Stills of one film by decoding forward with PyAV and converting only the stills.

    Every frame from the keyframe before the first still on is decoded (as any reader must), but
    only the stills are converted to RGB and resized (bilinear: within ~1 level of decord's). Each
    decoded frame is matched to decord's frame index by its presentation time; :meth:`take` returns None
    instead of guessing when a frame cannot be vouched for (no pts, a frame decord does not list,
    a seek that landed past the still, a decode error), and the caller falls back to decord.
    """

    def __init__(self, path: str, index_pts_s: np.ndarray, key_indices: np.ndarray, size: int | None,
                 threads: int):
        self._path, self._index_pts_s, self._key_indices = path, index_pts_s, np.sort(key_indices)
        self._size, self._threads = size, threads
        self._container = None
        self._frames: Iterator[tuple[int, object]] | None = None
        self._last: tuple[int, np.ndarray] | None = None  # a still may serve the next group too
        self._next = 0  # the index the next decoded frame most likely has

    def close(self) -> None:
        if self._container is not None:
            self._container.close()
            self._container = None

    def take(self, wanted: np.ndarray) -> np.ndarray | None:
        """uint8[len(wanted), H, W, 3]: decord frames ``wanted`` (sorted, unique, after earlier calls')."""
        try:
            if self._frames is None:
                self._frames = self._decode_from(int(wanted[0]))
            return np.stack([self._still(int(i)) for i in wanted])
        except Exception:  # _Unmatched, or a decode error that decord redoes (reporting what it cannot decode)
            return None

    def _still(self, i: int) -> np.ndarray:
        if self._last is not None and self._last[0] == i:
            return self._last[1]
        for j, frame in self._frames:
            if j == i:
                size = {"width": self._size, "height": self._size} if self._size else {}
                rgb = frame.reformat(format="rgb24", interpolation="BILINEAR", **size).to_ndarray()
                self._last = (i, rgb)
                return rgb
            if j > i:
                break
        raise _Unmatched  # frame i never came: decoded out of step with decord's index

    def _decode_from(self, first: int) -> Iterator[tuple[int, object]]:
        """(decord index, frame) from a frame at or before ``first`` on. After a seek, frames count
        only from the first keyframe decoded (earlier ones may reference frames never decoded); a
        seek that lands past ``first`` (imprecise in MPEG-TS, AVI) is retried from an earlier
        keyframe of decord's index, and finally from the start of the film."""
        keys = [int(k) for k in self._key_indices if k <= first][::-1][:SEEK_ATTEMPTS] if first > 0 else []
        for key in keys + [None]:
            frames = self._open_at(key)
            if key is None:
                yield from frames
                return
            for j, frame in frames:
                if frame.key_frame:
                    if j > first:
                        break  # landed too late: try an earlier keyframe
                    yield j, frame
                    yield from frames
                    return
        raise _Unmatched

    def _open_at(self, key: int | None) -> Iterator[tuple[int, object]]:
        import av

        self.close()
        self._container = av.open(self._path, metadata_errors="ignore")
        stream = self._container.streams.video[0]
        stream.thread_type, stream.thread_count = "AUTO", self._threads
        time_base, start = stream.time_base, stream.start_time or 0
        if key is not None:  # decord's times are relative to the stream's start time
            self._container.seek(start + int(self._index_pts_s[key] / time_base), stream=stream, backward=True)
        for frame in self._container.decode(stream):
            if frame.pts is None:
                raise _Unmatched
            yield self._index_of(float((frame.pts - start) * time_base)), frame

    def _index_of(self, t_s: float) -> int:
        """decord's index of the frame at ``t_s``; -1 (skip) before the first; _Unmatched if none."""
        pts, j, tolerance = self._index_pts_s, self._next, float32_tolerance(t_s) + 1e-6
        if not (j < len(pts) and abs(pts[j] - t_s) <= tolerance):  # not simply the next frame
            j = int(np.searchsorted(pts, t_s))
            j = next((k for k in (j - 1, j) if 0 <= k < len(pts) and abs(pts[k] - t_s) <= tolerance), None)
            if j is None:
                if t_s < pts[0]:
                    return -1
                raise _Unmatched
        self._next = j + 1
        return j


class _Unmatched(Exception):
    """A decoded frame that decord's index does not list where expected."""


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
        run: list = []  # back-to-back frames of one format, downmixed and resampled as one
        head, run_end_s = None, 0.0  # (pts, time_base, rate, format, layout) of the run's first frame; its end
        for frame in self._container.decode(stream):
            start_s = None if frame.pts is None else float(frame.pts * frame.time_base)
            kind = (frame.sample_rate, frame.format.name, len(frame.layout.channels))
            if run and (start_s is None or kind != head[2:] or len(run) >= AUDIO_FRAMES_PER_RUN
                        or abs(start_s - run_end_s) * SAMPLE_RATE_HZ > PTS_JITTER_SAMPLES):
                yield from self._resample(resampler, run, *head[:3])
                run = []
            if not run:
                head = (frame.pts, frame.time_base, *kind)
            run.append(frame)
            run_end_s = (start_s or 0.0) + frame.samples / frame.sample_rate
        if run:
            yield from self._resample(resampler, run, *head[:3])

    def _resample(self, resampler, run: list, pts, time_base, rate: int) -> Iterator[tuple[int, np.ndarray]]:
        """Downmix and resample a run of frames in one call: per-frame calls cost more than decoding AAC."""
        import av

        mono = av.AudioFrame.from_ndarray(_mean_of_channels(run)[None, :], format="flt", layout="mono")
        mono.sample_rate, mono.pts, mono.time_base = rate, pts, time_base
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


def _mean_of_channels(frames: list) -> np.ndarray:
    """float32[samples]: the mean of the channels of back-to-back audio frames of one format, in [-1, 1]."""
    fmt = frames[0].format.name.rstrip("p")
    channels = len(frames[0].layout.channels)
    if frames[0].format.is_planar:
        data = np.concatenate([f.to_ndarray() for f in frames], axis=1)
    else:
        data = np.concatenate([f.to_ndarray().reshape(-1, channels) for f in frames]).T
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
        video.close()
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
    """Serve requests, one JSON line each on stdin, until stdin closes (the parent exited or
    retired this child). Every request ends with exactly one ``end`` or ``error`` message."""
    protocol = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # anything the C libraries print goes to stderr, never into the protocol

    def send(header: dict, payload: bytes) -> None:
        data = json.dumps({**header, "payload": len(payload)}).encode()
        protocol.write(struct.pack("<I", len(data)) + data + payload)
        protocol.flush()

    for line in sys.stdin.buffer:
        try:
            _serve(json.loads(line), send)
        except BrokenPipeError:
            return 0
        except MediaError as e:
            send({"type": "error", "error": type(e).__name__, "reason": e.reason}, b"")
        except Exception as e:  # anything else is a decode failure of this film, never a traceback
            send({"type": "error", "error": "DecodeError", "reason": f"{type(e).__name__}: {short_reason(e)}"}, b"")
    return 0


if __name__ == "__main__":
    sys.exit(main())
