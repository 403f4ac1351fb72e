"""A film's video: the stills of one window, decoding only the packets they depend on (SPEC 2, stills modes).

For each still (a frame of :class:`~kissray.media.timeline.FrameIndex`) decoding must start at the last
keyframe before it in decode order whose pts is not after it (an open GOP's leading frames need
the GOP before). So the packets sent to the decoder are the union of the runs [that keyframe,
the still's packet]; everything else is demuxed and dropped:

- ``exact``: inside a run, a packet that is not a still is sent with ``skip_frame = NONREF``, so
  libavcodec decodes it only if other frames reference it, for the codecs whose "non-reference"
  is never referenced (``NONREF_SAFE_CODECS``; HEVC's sub-layer non-reference pictures may be
  referenced by higher temporal layers, so HEVC and unknown codecs decode every packet sent);
  the GOP's tail after its last still and GOPs without a still are never sent. In an intra-only
  stream (MJPEG, ProRes: every packet a keyframe) each run is just the still's own packet.
- ``keyframe``: the stills are keyframes, each run is one packet.

Every packet sent is stamped with the index's repaired pts, and a decoded frame is a still only if
its pts is a still's, so which frame a still is never depends on what was skipped; a frame the
decoder flags corrupt (decoded with a missing reference) is an error, never a still.
:class:`VideoTrack` falls back to a full decode, then to decord, where this cannot vouch for a still.
"""

from __future__ import annotations

from typing import Callable, Iterator

import numpy as np

from kissray.defaults import STILLS_MODES
from kissray.errors import DecodeError, MediaOpenError
from kissray.media.demux import only_first_video, open_decord, short_reason
from kissray.media.ranges import ReadPolicy
from kissray.media.source import Film, open_container
from kissray.media.timeline import NOPTS, FrameIndex

# codecs whose skip_frame=NONREF drops only frames no other frame references (H.264's nal_ref_idc 0,
# MPEG-1/2/4 and H.263 B-frames, VP8/VP9 frames that refresh no reference)
NONREF_SAFE_CODECS = frozenset({"h264", "mpeg1video", "mpeg2video", "mpeg4", "msmpeg4v3", "h263", "vp8", "vp9"})
CLIP_GROUP = 32  # clips decoded together: one batched log-mel FFT, one decord get_batch
DECORD_MATCH_S = 2e-3  # decord's frame times (float32) agree with the index within this
SEEK_ATTEMPTS = 3  # keyframes tried, latest first, before demuxing a window from the film's start
MAX_PENDING_STILLS = 64  # stills decoded past a missing one before it is declared missing


class Unvouched(Exception):
    """A still this decoder cannot vouch for (it never came out, or the packets were out of step
    with the index): the caller may decode the window another way."""


class StillDecodeError(Exception):
    """A still that did not come out because libavcodec reported an error decoding its packets."""


class SparseStills:
    """RGB stills (uint8[H, W, 3]) of presentation positions ``wanted``, asked for in order.

    ``dense``: decode every packet from the first run's start to the last still, skipping nothing
    (what any forward reader does; the retry when the sparse decoder cannot vouch for a still).
    """

    def __init__(self, path: str | Film, index: FrameIndex, wanted: np.ndarray, size: int | None, threads: int,
                 dense: bool = False):
        self._path, self._index, self._size, self._threads = path, index, size, threads
        self._wanted_pts = set(index.pts[index.order[np.unique(wanted)]].tolist())
        self._runs = decode_runs(index, index.order[np.unique(wanted)])
        self._dense = dense
        if dense:
            self._runs = np.array([[self._runs[0, 0], self._runs[-1, 1]]], np.int64)
        self._ready: dict[int, np.ndarray] = {}  # pts -> still decoded but not yet taken
        self._errors: list[str] = []  # decode errors libavcodec reported in this window
        self._container = None
        self._frames = None
        self.sent = 0  # packets sent to the decoder (the rest were demuxed and dropped)
        self.skips_nonref: bool | None = None  # whether packets that are not stills went with skip_frame=NONREF

    def close(self) -> None:
        if self._container is not None:
            self._container.close()
            self._container = None

    def still(self, position: int) -> np.ndarray:
        """The still at presentation ``position``; raises Unvouched or StillDecodeError."""
        packet = int(self._index.order[position])
        pts = int(self._index.pts[packet])
        if self._frames is None:
            self._frames = self._decode()
        while pts not in self._ready:
            if len([p for p in self._ready if p > pts]) > MAX_PENDING_STILLS:
                self._missing(packet, "was not decoded in order")
            try:
                at, rgb = next(self._frames)
            except StopIteration:
                self._missing(packet, "was never decoded")
            self._ready[at] = rgb
        rgb = self._ready[pts]
        for done in [p for p in self._ready if p < pts]:  # taken, or skipped by the caller
            del self._ready[done]
        return rgb

    def _missing(self, packet: int, why: str):
        """Raise for a still that did not come out: a decode error (the caller's gap, and the
        next stills still come from here) or Unvouched (the caller decodes another way)."""
        seconds = (int(self._index.pts[packet]) - self._index.first_ticks) * float(self._index.time_base)
        what = f"frame at {seconds:.3f} s {why}"
        if not self._index.keyframe[:packet + 1].any():
            raise StillDecodeError(f"{what}: no keyframe before it (the film starts mid-GOP)")
        if self._errors:
            raise StillDecodeError(f"{what}: {self._errors[-1]}")
        raise Unvouched(what)

    def _decode(self):
        """(pts, rgb) of each still, in the decoder's output order."""
        import av

        stream = self._open()
        codec = stream.codec_context
        sizes = {"width": self._size, "height": self._size} if self._size else {}
        runs, is_still = self._runs, np.isin(self._index.pts, list(self._wanted_pts))
        skip_nonref = self.skips_nonref = not self._dense and codec.name in NONREF_SAFE_CODECS
        run, last_sent = 0, None
        for d, packet in self._packets(stream, int(runs[0][0])):
            while run < len(runs) and d > runs[run][1]:
                run += 1
            if run == len(runs):
                break
            if d < runs[run][0]:
                continue  # between runs: nothing later depends on it
            if last_sent is not None and d > last_sent + 1:  # restart as after a seek (a non-IDR
                yield from self._stills_of(self._drain(codec), sizes)  # "keyframe" fails otherwise)
                codec.flush_buffers()
            last_sent = d
            packet.pts = int(self._index.pts[d])
            self.sent += 1
            codec.skip_frame = "NONREF" if skip_nonref and not is_still[d] else "DEFAULT"
            try:
                frames = codec.decode(packet)
            except av.FFmpegError as e:
                self._errors.append(f"packet {d}: {e}")
                continue
            yield from self._stills_of(frames, sizes)
        yield from self._stills_of(self._drain(codec), sizes)

    def _drain(self, codec) -> list:
        import av

        try:
            return codec.decode(None)
        except av.FFmpegError as e:
            self._errors.append(f"end of stream: {e}")
            return []

    def _stills_of(self, frames, sizes: dict):
        for frame in frames:
            if frame.pts in self._wanted_pts and frame.is_corrupt:  # a reference was missing: not the still
                self._errors.append(f"the frame at pts {frame.pts} decoded with a missing reference")
            elif frame.pts in self._wanted_pts:
                yield frame.pts, frame.reformat(format="rgb24", interpolation="BILINEAR", **sizes).to_ndarray()

    def _open(self):
        self.close()
        self._container = open_container(self._path, ReadPolicy.BLOCKS)
        if getattr(self._path, "source", None) is not None:  # a remote film: no read-ahead past the last run
            after = int(self._runs[-1, 1]) + 1
            self._path.source.read_ahead_until = int(self._index.pos[after]) if after < len(self._index) else None
        stream = only_first_video(self._container)
        stream.thread_type, stream.thread_count = "AUTO", self._threads
        return stream

    def _packets(self, stream, first: int):
        """(decode-order number, packet) from packet ``first`` (a keyframe, or 0) on. A seek that
        lands past it is retried from earlier keyframes, then the film is read from its start."""
        keys = np.flatnonzero(self._index.keyframe[:first + 1])[::-1][:SEEK_ATTEMPTS] if first > 0 else []
        for key in [int(k) for k in keys] + [None]:
            if key is not None:
                target = self._index.raw_dts[key] if self._index.raw_dts[key] != NOPTS else self._index.raw_pts[key]
                if target == NOPTS:
                    continue
                self._container.seek(int(target), stream=stream, backward=True)
            else:
                stream = self._open()
            packets = self._recognised(self._container.demux(stream), key is None)
            d, packet = next(packets, (None, None))
            if d is not None and d <= first:
                yield d, packet
                yield from packets
                return
        raise Unvouched("cannot find the window's first packet")

    def _recognised(self, demuxed, from_start: bool):
        """Non-empty packets numbered in decode order; Unvouched when one is not the index's next."""
        index, d = self._index, 0 if from_start else None
        for packet in demuxed:
            if not packet.size:
                continue
            raw = (NOPTS if packet.pts is None else packet.pts, NOPTS if packet.dts is None else packet.dts)
            if d is None:
                d = index.packet_of(*raw, packet.pos if packet.pos is not None else -1)
                if d is None:
                    return  # landed on a packet the index does not know: try elsewhere
            elif d >= len(index) or raw != (index.raw_pts[d], index.raw_dts[d]):
                raise Unvouched(f"packet {d} is not the one the index lists")
            yield d, packet
            d += 1


def decode_runs(index: FrameIndex, still_packets: np.ndarray) -> np.ndarray:
    """int[m, 2]: inclusive decode-order runs [start, end] to send so that ``still_packets`` decode.

    A run starts at the last keyframe at or before the still in decode order whose pts is not after
    the still's (so an open GOP's leading frames start one GOP earlier), or at packet 0.
    """
    keys = np.flatnonzero(index.keyframe)
    runs = []
    for d in np.sort(still_packets):
        k = int(np.searchsorted(keys, d, side="right")) - 1
        while k >= 0 and index.pts[keys[k]] > index.pts[d]:
            k -= 1
        runs.append((int(keys[k]) if k >= 0 else 0, int(d)))
    merged: list[list[int]] = []
    for start, end in sorted(runs):
        if merged and start <= merged[-1][1] + 1:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return np.array(merged, np.int64).reshape(-1, 2)


class VideoTrack:
    """A film's video: its :class:`~kissray.media.timeline.FrameIndex` and the stills of one window.

    Stills come from :class:`SparseStills`. When it cannot vouch for a still, the
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
                reader = open_decord(self._path, self._size, self._threads)
                continue
            yield from batch[inverse.reshape(group.shape)]

    def _agreeing_decord(self):
        reader = open_decord(self._path, self._size, self._threads)
        if self.decord_only:
            return reader
        times = np.asarray(reader.get_frame_timestamp(np.arange(len(reader))), np.float64)[:, 0]
        if len(times) != len(self.index) or not np.all(np.abs(times - times[0] - self.index.pts_s) <= DECORD_MATCH_S):
            raise MediaOpenError(self.uri, "decord's frame index disagrees with the packets")
        return reader

    def _stills_one_by_one(self, indices: np.ndarray, first_clip: int) -> Iterator[np.ndarray | DecodeError]:
        reader = open_decord(self._path, self._size, 1)
        for row, clip_indices in enumerate(indices):
            try:
                yield reader.get_batch(clip_indices.tolist()).asnumpy()
            except Exception as e:
                yield DecodeError(self.uri, f"clip {first_clip + row}: {short_reason(e)}")
                reader = open_decord(self._path, self._size, 1)
