"""The decoder child behind :class:`kissray.media.ClipReader`: a film's video (index + stills) and audio.

Run as a child process (``python -m kissray.media.child``) that serves requests one after another
in the framing of :mod:`kissray.media.protocol`. A request's ``path`` is a local file, or null for a
remote film the child reads itself (:class:`~kissray.media.source.Film`).

Video: :mod:`kissray.media.demux` (which frames exist and when, from the demuxed packets) and
:mod:`kissray.media.video` (decode only what the stills depend on); decord only where PyAV cannot.
Audio: :mod:`kissray.media.audio_track` (samples on the film's timeline) and :mod:`kissray.audio` (log-mel).
The parent sets one BLAS thread in this process's environment (benchmarks/NOTES.md section 24).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from dataclasses import asdict
from typing import Callable, Iterator

import numpy as np

from kissray.audio import CLIP_SAMPLES, PATCH_OFFSET_SAMPLES, SILENCE_LOG_MEL, clip_log_mels
from kissray.errors import DecodeError, MediaError, MediaOpenError, TooShortError
from kissray.media.audio_track import AudioTrack
from kissray.media.demux import Container, decord_index, inspect_container, read_index, short_reason
from kissray.media.info import Clip, MediaInfo, n_clips_for
from kissray.media.protocol import PARENT_VARIABLE, MessageWriter
from kissray.media.ranges import NotRangeReadable, RangeSource
from kissray.media.source import Film
from kissray.media.timeline import MAX_DURATION_S, FrameIndex
from kissray.media.video import CLIP_GROUP, VideoTrack

PARENT_POLL_S = 1.0  # how often the child looks whether its parent is still there
WATCHDOG_S = 900  # a child whose parent-watch thread is starved this long ends (SIGALRM)


class IndexCache:
    """The last film's index, kept by a decoder child: the windows of one film go to one child
    in turn, and reading the index demuxes the whole film. ``source``: the last remote film's
    byte-range reader, reused (with its cached metadata) by the next window of the same film."""

    def __init__(self):
        self._key, self._value = None, None
        self.source: RangeSource | None = None

    def get(self, path: str | Film, uri: str) -> tuple[Container, FrameIndex, bool]:
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


def _read(path: str | Film, uri: str) -> tuple[Container, FrameIndex, bool]:
    try:
        container = inspect_container(path, uri)
    except MediaOpenError as e:
        if "not a video" in e.reason:
            raise
        return (*decord_index(path, uri, e), True)  # PyAV refused (e.g. a broken audio config)
    try:
        return container, read_index(path, uri), False
    except NotRangeReadable as e:  # a remote film whose index is not in its metadata alone: read it whole
        path.stage(str(e))
        return _read(path, uri)


def decode_clips(path: str | Film, uri: str, start: int = 0, stop: int | None = None, *,
                 frames_per_clip: int = 1, size: int = 224, threads: int = 0, stills: str = "exact",
                 indexes: IndexCache | None = None,
                 on_fallback: Callable[[str, str, int], None] | None = None,
                 on_damaged: Callable[[float, float, str], None] | None = None) -> tuple[MediaInfo, Iterator[Clip]]:
    """Open a film (a local path, or a :class:`~kissray.media.source.Film`); return its MediaInfo and an
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
    clips = _clips(video, container, path, start, stop, frames_per_clip, on_damaged)
    if duration_s > readable_s:
        clips = _then_truncated(clips, uri, n_clips_for(readable_s), stop, readable_s, duration_s)
    return info, clips


def _declared_s(container: Container, index: FrameIndex) -> float:
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


def _clips(video: VideoTrack, container: Container, path: str | Film, start: int, stop: int,
           frames_per_clip: int, on_damaged: Callable[[float, float, str], None] | None) -> Iterator[Clip]:
    import av

    if stop <= start:
        return
    audio = None
    if container.audio_stream is not None:
        try:
            origin_s = video.index.first_s + video.index.raw_offset_s(start)  # where the audio's clock is
            audio = AudioTrack(path, container.audio_stream, origin_s, start * CLIP_SAMPLES + PATCH_OFFSET_SAMPLES,
                               on_damaged)
        except av.FFmpegError:  # the film's stream exists but cannot be opened: silence (the store's errors propagate)
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

    def damaged(from_s: float, to_s: float, reason: str) -> None:
        send({"type": "damaged", "from_s": from_s, "to_s": to_s, "reason": reason}, b"")

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
                               indexes=indexes, on_fallback=fell_back, on_damaged=damaged)
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
    send = MessageWriter(os.fdopen(os.dup(1), "wb")).send
    os.dup2(2, 1)  # anything the C libraries print goes to stderr, never into the protocol
    _watch_parent(int(os.environ.get(PARENT_VARIABLE) or os.getppid()))
    indexes = IndexCache()

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
        except Exception as e:  # never a traceback: the film's failure, or the store's (retried)
            fail(_error_kind(e), f"{type(e).__name__}: {short_reason(e)}")
        finally:
            for f in film:
                f.close()
    return 0


def _error_kind(error: Exception) -> str:
    """A failure that is not a MediaError: libavcodec's or decord's about the film's bytes is a
    ``DecodeError``; an OSError of Python's (a read that failed under PyAV or fsspec) is the
    store's, a ``StorageError`` (SPEC 3: retried, never the title's ``partial``)."""
    import av

    return "StorageError" if isinstance(error, OSError) and not isinstance(error, av.FFmpegError) else "DecodeError"


def _watch_parent(parent_pid: int) -> None:
    """Never outlive the parent, even hung. A thread exits the process once the parent is gone
    (this process is re-parented), and keeps re-arming an alarm whose default action ends the
    process: should the thread itself be starved (a library stuck holding the GIL), the alarm
    fires. Not PR_SET_PDEATHSIG: it fires when the parent *thread* that started this child ends,
    and the pool hands children from thread to thread."""
    def watch() -> None:
        while os.getppid() == parent_pid:
            signal.alarm(WATCHDOG_S)
            time.sleep(PARENT_POLL_S)
        os._exit(0)

    signal.signal(signal.SIGALRM, signal.SIG_DFL)
    threading.Thread(target=watch, name="kissray-parent-watch", daemon=True).start()


if __name__ == "__main__":
    sys.exit(main())
