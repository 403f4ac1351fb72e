"""The decoder child behind :mod:`kissray.media`: a film's video (index + stills) and audio.

Normally run as a child process (``python -m kissray.decode``) that reads requests, one JSON line
each, from stdin and answers each with framed messages on stdout: a little-endian uint32 header
length, a JSON header, then ``header["payload"]`` bytes. Messages: ``info`` (the film's
MediaInfo), ``clip`` (frames + log-mel bytes), ``gap``, ``fallback`` (a window decoded by decord,
or a film read from a staged copy, and why), ``staging`` (a heartbeat while a copy downloads),
then ``end`` (with the bytes a remote film took); or ``error`` (a MediaError type name and a
one-line reason). A child serves one request after another. A request's ``path`` is a local
file, or null for a remote film the child reads itself (:class:`kissray.remote.Film`).

Video: :mod:`kissray.index` (which frames exist and when, from the demuxed packets) and
:mod:`kissray.stills` (decode only what the stills depend on); decord only where PyAV cannot.
Audio: :mod:`kissray.audio_track` (samples on the film's timeline) and :mod:`kissray.audio` (log-mel).
"""

from __future__ import annotations

import json
import os
import re
import struct
import sys
from dataclasses import asdict, dataclass
from typing import Callable, Iterator

if __name__ == "__main__":  # the decoder child, before numpy loads: one BLAS thread (NOTES.md section 24)
    for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(_var, "1")

import numpy as np  # noqa: E402

from kissray.audio import CLIP_SAMPLES, PATCH_OFFSET_SAMPLES, SILENCE_LOG_MEL, clip_log_mels  # noqa: E402
from kissray.audio_track import AudioTrack  # noqa: E402
from kissray.errors import DecodeError, MediaError, MediaOpenError, TooShortError  # noqa: E402
from kissray.index import MAX_DURATION_S, FrameIndex, index_from_times, read_index  # noqa: E402
from kissray.media import STILLS_MODES, Clip, MediaInfo, n_clips_for  # noqa: E402
from kissray.remote import Film, NotRangeReadable, RangeSource, local_file, open_container  # noqa: E402
from kissray.stills import SparseStills, StillDecodeError, Unvouched  # noqa: E402

CLIP_GROUP = 32  # clips decoded together: one batched log-mel FFT, one decord get_batch
DECORD_MATCH_S = 2e-3  # decord's frame times (float32) agree with the index within this


@dataclass(frozen=True)
class _Container:
    """What PyAV reads from the container header."""

    width: int
    height: int
    audio_stream: int | None  # index of the first audio stream, if any
    duration_s: float | None = None  # what the container declares (a truncated file declares more than it has)
    frames: int = 0  # frames the container declares (0: unknown)


def short_reason(error: BaseException) -> str:
    """One readable line from a decord/FFmpeg exception (drops log prefixes and C++ frames)."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    text = re.sub(r"\[[\d:]+\] \S+:\d+: ", "", text)  # decord's "[hh:mm:ss] file.cc:123: " prefixes
    return text[:300]


def _inspect_container(path: str | Film, uri: str) -> _Container:
    import av

    try:
        with open_container(path, "index") as container:
            if not container.streams.video:
                kind = "audio-only file" if container.streams.audio else "no video stream"
                raise MediaOpenError(uri, f"not a video: {kind}")
            video = container.streams.video[0]
            audio = container.streams.audio[0].index if container.streams.audio else None
            if video.duration is not None:
                declared = float(video.duration * video.time_base)
            else:
                declared = container.duration / 1e6 if container.duration else None
            return _Container(video.codec_context.width, video.codec_context.height, audio, declared,
                              video.frames or 0)
    except av.FFmpegError as e:
        raise MediaOpenError(uri, f"not a readable media file ({short_reason(e)})") from e


def _open_decord(path: str | Film, size: int | None, threads: int):
    import decord

    resize = {"width": size, "height": size} if size else {}
    return decord.VideoReader(local_file(path), ctx=decord.cpu(0), num_threads=threads, **resize)


def _decord_index(path: str | Film, uri: str, pyav_error: MediaOpenError) -> tuple[_Container, FrameIndex]:
    """When PyAV cannot read the container but decord can read the video: its index, under the
    same checks as the packets' (kissray.index), and no audio."""
    try:
        reader = _open_decord(path, None, 1)
        n = len(reader)
        times = np.asarray(reader.get_frame_timestamp(np.arange(n)), np.float64) if n else None
        height, width = reader[0].shape[:2]
        keys, fps = np.asarray(reader.get_key_indices()), float(reader.get_avg_fps())
    except Exception:
        raise pyav_error from None
    if times is None:
        raise MediaOpenError(uri, "no decodable video frames")
    return _Container(width, height, None), index_from_times(times[:, 0], times[:, 1], keys, fps, uri)


class IndexCache:
    """The last film's index, kept by a decoder child: the windows of one film go to one child
    in turn, and reading the index demuxes the whole film. ``source``: the last remote film's
    byte-range reader, reused (with its cached metadata) by the next window of the same film."""

    def __init__(self):
        self._key, self._value = None, None
        self.source: RangeSource | None = None

    def get(self, path: str | Film, uri: str) -> tuple[_Container, FrameIndex, bool]:
        """(container, index, decord_only) of the film at ``path`` (a local path or a Film)."""
        if isinstance(path, str):
            stat = os.stat(path)
            key = (path, stat.st_ino, stat.st_size, stat.st_mtime_ns)
        else:
            key = path.key
        if key != self._key:
            self._key, self._value = None, _read(path, uri)
            self._key = key
        return self._value


def _read(path: str | Film, uri: str) -> tuple[_Container, FrameIndex, bool]:
    try:
        container = _inspect_container(path, uri)
    except MediaOpenError as e:
        if "not a video" in e.reason:
            raise
        return (*_decord_index(path, uri, e), True)  # PyAV refused (e.g. a broken audio config)
    try:
        return container, read_index(path, uri), False
    except NotRangeReadable as e:  # a remote film whose index is not in its metadata alone: read it whole
        path.stage(str(e))
        return _read(path, uri)


class VideoTrack:
    """A film's video: its :class:`~kissray.index.FrameIndex` and the stills of one window.

    Stills come from :class:`~kissray.stills.SparseStills`. When it cannot vouch for a still, the
    rest of the window is decoded again without skipping anything, and if that cannot vouch for one
    either, by decord (provided decord's frame index agrees with the packets'; otherwise those
    clips are gaps). Each such step calls ``on_fallback(to, reason, n_clips)``; the caller logs
    and counts it. A decode error libavcodec reports is that clip's gap, never a fallback.
    """

    def __init__(self, path: str | Film, uri: str, index: FrameIndex, size: int | None, threads: int = 0,
                 stills: str = "exact", decord_only: bool = False,
                 on_fallback: Callable[[str, str, int], None] | None = None):
        if stills not in STILLS_MODES:
            raise ValueError(f"stills must be one of {STILLS_MODES}, not {stills!r}")
        self.uri, self.index, self._path, self._size, self._threads = uri, index, path, size, threads
        self.keyframes_only, self.decord_only = stills == "keyframe", decord_only
        self._on_fallback = on_fallback or (lambda to, reason, n_clips: None)
        self.fallbacks: list[str] = []  # "to: reason" of each fallback in this track's windows

    def still_indices(self, clip_indices: np.ndarray, frames_per_clip: int) -> np.ndarray:
        """int[n, K]: for each clip, the presentation positions of its stills (SPEC 2)."""
        return self.index.still_positions(clip_indices, frames_per_clip, self.keyframes_only)

    def stills(self, indices: np.ndarray, first_clip: int) -> Iterator[np.ndarray | DecodeError]:
        """Per clip, uint8[K, H, W, 3] RGB stills, or a DecodeError for a clip that cannot be decoded
        (``indices``: int[n, K], the stills of consecutive clips from ``first_clip``)."""
        if self.decord_only:
            self._fell_back("decord", "PyAV cannot read this container", len(indices))
            yield from self._decord_stills(indices, first_clip, "PyAV cannot read this container")
            return
        row, dense = 0, False
        while row < len(indices):
            stills = SparseStills(self._path, self.index, indices[row:].ravel(), self._size, self._threads, dense)
            try:
                for row in range(row, len(indices)):
                    try:
                        yield np.stack([stills.still(int(p)) for p in indices[row]])
                    except StillDecodeError as e:
                        yield DecodeError(self.uri, f"clip {first_clip + row}: {e}")
                row = len(indices)
            except Unvouched as e:
                self._fell_back("decord" if dense else "full decode", str(e), len(indices) - row)
                if dense:
                    yield from self._decord_stills(indices[row:], first_clip + row, str(e))
                    return
                dense = True
            finally:
                stills.close()

    def _fell_back(self, to: str, reason: str, n_clips: int) -> None:
        self.fallbacks.append(f"{to}: {reason}")
        self._on_fallback(to, reason, n_clips)

    def _decord_stills(self, indices: np.ndarray, first_clip: int, why: str) -> Iterator[np.ndarray | DecodeError]:
        """decord's ``get_batch`` per group of clips, then ``seek(0)``: its threaded decoder
        otherwise keeps decoding ahead while the caller is busy (benchmarks/NOTES.md section 2).
        A failed group is redone clip by clip, reopening the reader after each failure."""
        try:
            reader = self._agreeing_decord()
        except Exception as e:  # decord cannot open it, or its index is not the packets'
            for row in range(len(indices)):
                yield DecodeError(self.uri, f"clip {first_clip + row}: {why}; decord: {short_reason(e)}")
            return
        for lo in range(0, len(indices), CLIP_GROUP):
            group = indices[lo:lo + CLIP_GROUP]
            unique, inverse = np.unique(group, return_inverse=True)
            try:
                batch = reader.get_batch(unique.tolist()).asnumpy()
                reader.seek(0)
            except Exception:
                yield from self._stills_one_by_one(group, first_clip + lo)
                reader = _open_decord(self._path, self._size, self._threads)
                continue
            yield from batch[inverse.reshape(group.shape)]

    def _agreeing_decord(self):
        reader = _open_decord(self._path, self._size, self._threads)
        if self.decord_only:
            return reader
        times = np.asarray(reader.get_frame_timestamp(np.arange(len(reader))), np.float64)[:, 0]
        if len(times) != len(self.index) or not np.all(np.abs(times - times[0] - self.index.pts_s) <= DECORD_MATCH_S):
            raise MediaOpenError(self.uri, "decord's frame index disagrees with the packets")
        return reader

    def _stills_one_by_one(self, indices: np.ndarray, first_clip: int) -> Iterator[np.ndarray | DecodeError]:
        reader = _open_decord(self._path, self._size, 1)
        for row, clip_indices in enumerate(indices):
            try:
                yield reader.get_batch(clip_indices.tolist()).asnumpy()
            except Exception as e:
                yield DecodeError(self.uri, f"clip {first_clip + row}: {short_reason(e)}")
                reader = _open_decord(self._path, self._size, 1)


def decode_clips(path: str | Film, uri: str, start: int = 0, stop: int | None = None, *,
                 frames_per_clip: int = 1, size: int = 224, threads: int = 0, stills: str = "exact",
                 indexes: IndexCache | None = None,
                 on_fallback: Callable[[str, str, int], None] | None = None) -> tuple[MediaInfo, Iterator[Clip]]:
    """Open a film (a local path, or a :class:`kissray.remote.Film`); return its MediaInfo and an
    iterator over clips ``[start, stop)``.

    The iterator yields a :class:`DecodeError` in place of a clip that cannot be decoded. A file
    whose container lists more than can be read (typically truncated) delivers the clips of the
    readable part, then raises a :class:`DecodeError` saying how much of the declared duration
    was missing.
    """
    container, index, decord_only = (indexes or IndexCache()).get(path, uri)
    video = VideoTrack(path, uri, index, size or None, threads, stills, decord_only, on_fallback)
    readable_s = index.duration_s
    duration_s = max(readable_s, _declared_s(container, index)) if index.truncated else readable_s
    info = MediaInfo(round(duration_s, 6), round(index.fps, 6), container.width, container.height,
                     container.audio_stream is not None, n_clips_for(duration_s), "; ".join(index.repairs))
    if info.n_clips < 1:
        raise TooShortError(uri, f"too short: {duration_s:.3f} s of video (at least 0.5 s needed)")
    stop = info.n_clips if stop is None else min(int(stop), info.n_clips)
    start = max(0, int(start))
    clips = _clips(video, container, path, start, stop, frames_per_clip)
    if duration_s > readable_s:
        clips = _then_truncated(clips, uri, n_clips_for(readable_s), stop, readable_s, duration_s)
    return info, clips


def _declared_s(container: _Container, index: FrameIndex) -> float:
    """The container's declared duration where the evidence allows it: finite, at most
    MAX_DURATION_S, and (when it declares a frame count) at most twice what those frames last."""
    declared = container.duration_s
    if declared is None or not np.isfinite(declared) or not 0 < declared <= MAX_DURATION_S:
        return 0.0
    if container.frames and declared > 2 * container.frames / index.fps + 1:
        return 0.0
    return declared


def _then_truncated(clips: Iterator[Clip], uri: str, readable_clips: int, stop: int,
                    readable_to_s: float, declared_s: float) -> Iterator[Clip]:
    for clip in clips:
        if getattr(clip, "index", -1) >= readable_clips:
            break
        yield clip
    if stop > readable_clips:
        raise DecodeError(uri, f"truncated or damaged: only the first {readable_to_s:.1f} s of "
                               f"{declared_s:.1f} s could be decoded")


def _clips(video: VideoTrack, container: _Container, path: str | Film, start: int, stop: int,
           frames_per_clip: int) -> Iterator[Clip]:
    if stop <= start:
        return
    audio = None
    if container.audio_stream is not None:
        try:
            origin_s = video.index.first_s + video.index.raw_offset_s(start)  # where the audio's clock is
            audio = AudioTrack(path, container.audio_stream, origin_s, start * CLIP_SAMPLES + PATCH_OFFSET_SAMPLES)
        except Exception:  # the stream exists but cannot be opened: silence
            audio = None
    stills = video.stills(video.still_indices(np.arange(start, stop), frames_per_clip), start)
    try:
        for group in range(start, stop, CLIP_GROUP):
            group_stop = min(group + CLIP_GROUP, stop)
            # stills first: a remote film's audio samples then come from the blocks the video read
            group_stills = [next(stills) for _ in range(group, group_stop)]
            log_mels, has_audio = _group_log_mels(audio, group, group_stop)
            for i, frames in zip(range(group, group_stop), group_stills):
                if isinstance(frames, DecodeError):
                    yield frames  # a gap: the caller records it and goes on
                else:
                    yield Clip(i, np.ascontiguousarray(frames), log_mels[i - group], has_audio)
    finally:
        stills.close()
        if audio is not None:
            audio.close()


def _group_log_mels(audio: AudioTrack | None, start: int, stop: int) -> tuple[np.ndarray, bool]:
    """The VGGish patches of clips [start, stop) in one batched FFT (silence without audio)."""
    if audio is None:
        return np.broadcast_to(SILENCE_LOG_MEL, (stop - start, *SILENCE_LOG_MEL.shape)), False
    first = start * CLIP_SAMPLES + PATCH_OFFSET_SAMPLES
    samples = audio.read(first, stop * CLIP_SAMPLES)
    return clip_log_mels(samples, start, stop - start, offset_samples=first), not audio.failed


def _serve(request: dict, send: Callable[[dict, bytes], None], indexes: IndexCache, film: list) -> None:
    """One request. ``film`` gets the :class:`Film` of a remote request (its local copy, if one
    is staged, is named in errors as the user's URI)."""
    def fell_back(to: str, reason: str, n_clips: int) -> None:
        send({"type": "fallback", "to": to, "reason": reason, "clips": n_clips}, b"")

    def staging(n_bytes: int) -> None:  # a heartbeat: a long copy is not a hung decoder
        send({"type": "staging", "bytes": n_bytes}, b"")

    path, read_before = request["path"], 0
    if path is None:  # a remote film, read by ranges (or staged once per node)
        read_before = indexes.source.bytes_read if indexes.source is not None else 0
        path = Film(request["uri"], previous=indexes.source, on_progress=staging,
                    on_stage=lambda why: fell_back("a staged copy", why, 0))
        film.append(path)
        if path.source is not indexes.source:
            read_before = 0
        indexes.source = path.source
    info, clips = decode_clips(path, request["uri"], request["start"], request["stop"],
                               frames_per_clip=request["frames_per_clip"], size=request["size"],
                               threads=request["threads"], stills=request.get("stills", "exact"),
                               indexes=indexes, on_fallback=fell_back)
    send({"type": "info", "info": asdict(info)}, b"")
    for clip in clips:
        if isinstance(clip, DecodeError):
            send({"type": "gap", "reason": clip.reason}, b"")
            continue
        payload = clip.frames.tobytes() + np.ascontiguousarray(clip.log_mel, np.float32).tobytes()
        send({"type": "clip", "index": clip.index, "has_audio": clip.has_audio}, payload)
    send({"type": "end", "bytes_read": film[0].bytes_read - read_before if film else 0}, b"")


def main() -> int:
    """Serve requests, one JSON line each on stdin, until stdin closes (the parent exited or
    retired this child). Every request ends with exactly one ``end`` or ``error`` message."""
    protocol = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # anything the C libraries print goes to stderr, never into the protocol
    indexes = IndexCache()

    def send(header: dict, payload: bytes) -> None:
        data = json.dumps({**header, "payload": len(payload)}).encode()
        protocol.write(struct.pack("<I", len(data)) + data + payload)
        protocol.flush()

    for line in sys.stdin.buffer:
        request = json.loads(line)
        film: list[Film] = []

        def fail(kind: str, reason: str) -> None:  # errors name the user's film, never a staged copy
            for local in [request["path"]] + [f.path for f in film]:
                reason = reason.replace(local, request["uri"]) if local else reason
            send({"type": "error", "error": kind, "reason": reason}, b"")

        try:
            _serve(request, send, indexes, film)
        except BrokenPipeError:
            return 0
        except MediaError as e:
            fail(type(e).__name__, e.reason)
        except Exception as e:  # anything else is a decode failure of this film, never a traceback
            fail("DecodeError", f"{type(e).__name__}: {short_reason(e)}")
        finally:
            for f in film:
                f.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
