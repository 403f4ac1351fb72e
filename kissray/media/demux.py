"""What a film's container says: its streams and sizes (:func:`inspect_container`), and its video
packets, demuxed without decoding, as a checked :class:`~kissray.media.timeline.FrameIndex`
(:func:`read_index`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from fractions import Fraction

import numpy as np

from kissray.errors import MediaOpenError
from kissray.media.ranges import CHECKED_PACKETS, NotRangeReadable, ReadPolicy
from kissray.media.source import Film, local_file, open_container
from kissray.media.timeline import MAX_FPS, MIN_FPS, NOPTS, FrameIndex, build_index, index_from_times

TRUNCATION_MIN_S = 2.0  # video this much (and 10 %) shorter than the container declares: maybe cut short
TAIL_PROBE_S, TAIL_PROBE_PACKETS = 10.0, 2000  # how far before the declared end, and how much, is read to check


@dataclass(frozen=True)
class Container:
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


def inspect_container(path: str | Film, uri: str) -> Container:
    """The container header's description of the film; :class:`MediaOpenError` when it has no video."""
    import av

    try:
        with open_container(path, ReadPolicy.BLANKED) as container:
            if not container.streams.video:
                kind = "audio-only file" if container.streams.audio else "no video stream"
                raise MediaOpenError(uri, f"not a video: {kind}")
            video = container.streams.video[0]
            audio = container.streams.audio[0].index if container.streams.audio else None
            if video.duration is not None:
                declared = float(video.duration * video.time_base)
            else:
                declared = container.duration / 1e6 if container.duration else None
            return Container(video.codec_context.width, video.codec_context.height, audio, declared,
                             video.frames or 0)
    except av.FFmpegError as e:
        raise MediaOpenError(uri, f"not a readable media file ({short_reason(e)})") from e


def read_index(path: str | Film, uri: str) -> FrameIndex:
    """Demux the first video stream of a film (no decoding) and build its checked index.
    ``path``: a local file, or a :class:`~kissray.media.source.Film` (a remote MP4's packets are listed
    from its ``moov`` with the media data blanked, then the first ones checked against their bytes)."""
    import av

    try:
        container = open_container(path, ReadPolicy.BLANKED)
    except av.FFmpegError as e:
        raise MediaOpenError(uri, f"not a readable media file ({e})") from e
    with container:
        if not container.streams.video:
            raise MediaOpenError(uri, "no video stream")
        stream = only_first_video(container)
        columns, truncated = _demux(container, stream)
        if not columns[0]:
            raise MediaOpenError(uri, "no video packets")
        declared_frames = stream.frames or 0
        declared_s = container.duration / 1e6 if container.duration else None
        fps = _declared_fps(stream)
        time_base = stream.time_base
    if getattr(path, "source", None) is not None:
        _check_blanked(path, columns)
    pts, dts, pos, durations = (np.array(c, np.int64) for c in columns[:4])
    truncated = truncated or declared_frames > len(pts) or _cut_short(path, declared_s, pts, time_base)
    return build_index(pts, dts, pos, durations, np.array(columns[4], bool), Fraction(time_base), fps, uri,
                       truncated, hidden=np.array(columns[5], bool))


def only_first_video(container):
    """The first video stream, with every other stream discarded (the demuxer skips their data)."""
    from av.stream import Discard

    video = container.streams.video[0]
    for stream in container.streams:
        if stream.index != video.index:
            stream.discard = Discard.all
    return video


def _demux(container, stream, limit: int | None = None) -> tuple[tuple[list, ...], bool]:
    """Lists of pts, dts, pos, duration, keyframe, hidden of the non-empty video packets (the first
    ``limit``); True if reading broke off (one list per column: ~1 s for a 2-hour film's 180,000 packets)."""
    import av

    columns = pts, dts, pos, durations, keyframes, hidden = [], [], [], [], [], []
    try:
        for packet in container.demux(stream):
            if limit is not None and len(pts) >= limit:
                break
            if packet.size:
                pts.append(NOPTS if packet.pts is None else packet.pts)
                dts.append(NOPTS if packet.dts is None else packet.dts)
                pos.append(-1 if packet.pos is None else packet.pos)
                durations.append(packet.duration or 0)
                keyframes.append(packet.is_keyframe)
                hidden.append(bool(getattr(packet, "is_discard", False)))  # an edit list's pre-roll
    except av.FFmpegError:  # damaged data: the index is what could be read
        return columns, True
    return columns, False


def _check_blanked(film: Film, columns: tuple[list, ...]) -> None:
    """Compare the first packets listed with the media data blanked with the same packets demuxed
    with their bytes: a demuxer that parses the data (not only ``moov``) lists other packets, and
    then the film must be read whole (raises :class:`~kissray.media.ranges.NotRangeReadable`)."""
    listed = list(zip(*(column[:CHECKED_PACKETS] for column in columns[:5])))
    with open_container(film, ReadPolicy.RANGES) as container:
        real, _ = _demux(container, only_first_video(container), limit=len(listed))
    if list(zip(*real[:5])) != listed:
        raise NotRangeReadable("the packets listed without the media data are not the packets in it")


def _cut_short(path: str | Film, declared_s: float | None, pts: np.ndarray, time_base) -> bool:
    """True when the container declares much more than its video has and no stream has data near
    the declared end: a file cut short (e.g. an interrupted Matroska download, whose demuxer reports
    no error). Video that ends before the audio is not cut short: the audio reaches the end."""
    known = pts[pts != NOPTS]
    if declared_s is None or not np.isfinite(declared_s) or not len(known):
        return False
    missing_s = declared_s - float((known.max() - known.min()) * time_base)
    if missing_s <= max(TRUNCATION_MIN_S, 0.1 * declared_s):
        return False
    return _data_end_s(path, declared_s) < declared_s - missing_s / 2


def _data_end_s(path: str | Film, declared_s: float) -> float:
    """Where the data of any stream ends (seconds from the container's start), read near the end."""
    import av

    end_s = 0.0
    with open_container(path, ReadPolicy.BLANKED) as container:
        start_s = container.start_time / 1e6 if container.start_time else 0.0
        try:
            container.seek(int((start_s + max(0.0, declared_s - TAIL_PROBE_S)) * 1e6), any_frame=True)
            for n, packet in enumerate(container.demux()):
                if packet.pts is not None and packet.time_base:
                    end_s = max(end_s, float((packet.pts + (packet.duration or 0)) * packet.time_base) - start_s)
                if n >= TAIL_PROBE_PACKETS:
                    break
        except av.FFmpegError:
            pass  # what was read is the evidence
    return end_s


def _declared_fps(stream) -> float | None:
    for rate in (stream.average_rate, stream.guessed_rate, stream.base_rate):
        if rate and MIN_FPS <= float(rate) <= MAX_FPS:
            return float(rate)
    return None


def open_decord(path: str | Film, size: int | None, threads: int):
    """A decord VideoReader of the film (a local file: a remote one is staged), resized to ``size``."""
    import decord

    resize = {"width": size, "height": size} if size else {}
    return decord.VideoReader(local_file(path), ctx=decord.cpu(0), num_threads=threads, **resize)


def decord_index(path: str | Film, uri: str, pyav_error: MediaOpenError) -> tuple[Container, FrameIndex]:
    """When PyAV cannot read the container but decord can read the video: its index, under the
    same checks as the packets' (kissray.media.timeline), and no audio."""
    try:
        reader = open_decord(path, None, 1)
        n = len(reader)
        times = np.asarray(reader.get_frame_timestamp(np.arange(n)), np.float64) if n else None
        height, width = reader[0].shape[:2]
        keys, fps = np.asarray(reader.get_key_indices()), float(reader.get_avg_fps())
    except Exception:
        raise pyav_error from None
    if times is None:
        raise MediaOpenError(uri, "no decodable video frames")
    return Container(width, height, None), index_from_times(times[:, 0], times[:, 1], keys, fps, uri)
