"""Which frames a film has, when, and which packet holds each: the frame index (SPEC 2).

Pure numpy, no I/O: :mod:`kissray.media.demux` lists the video stream's packets (nothing decoded),
this module builds the index from them. Each packet's pts is one frame's presentation time, its
keyframe flag says where decoding can start. Timestamps are evidence, not truth: before anything
is built on them they are checked and repaired from the packets themselves:

- a packet without a pts gets ``dts + (the stream's usual pts - dts)``, or the previous one's
  pts plus one frame when it has no dts either;
- a pts that disagrees with its neighbours in decode order by more than B-frame reordering allows
  (a lone garbage value) is treated as missing;
- a jump back by more than reordering allows, or forward by more than ``MAX_FRAME_GAP_S``, is a
  discontinuity: what follows is spliced on one frame after what came before;
- frames that share a pts are spread one tick apart, so every frame keeps its own time.

What is left must span at most ``MAX_DURATION_S``, or the film is refused with that reason.
Memory is proportional to the number of packets actually demuxed, never to a declared duration.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from fractions import Fraction

import numpy as np

from kissray.errors import MediaOpenError

MAX_DURATION_S = 7 * 24 * 3600.0  # longer than any film: a timeline beyond this is broken metadata
MAX_FRAME_GAP_S = 60.0  # no frame for this long (in decode order) is a timestamp discontinuity
REORDER_FRAMES = 16  # B-frame reordering moves a pts at most this many frames from decode order
MIN_FPS, MAX_FPS = 0.1, 1000.0  # frame rates a container may declare and be believed
NOPTS = np.iinfo(np.int64).min  # a missing timestamp in the raw arrays


@dataclass
class FrameIndex:
    """Every video packet of a film, in decode order, with its repaired presentation time.

    ``pts[d]`` (stream ticks) is the presentation time of the frame that packet ``d`` holds;
    frames in presentation order are ``order`` (``order[j]`` = the packet of the j-th frame).
    ``raw_pts``/``raw_dts``/``pos`` are what the demuxer said, to recognise a packet after a seek.
    """

    time_base: Fraction
    pts: np.ndarray  # int64[n], repaired, decode order
    keyframe: np.ndarray  # bool[n], decode order
    raw_pts: np.ndarray  # int64[n] (NOPTS when missing)
    raw_dts: np.ndarray  # int64[n] (NOPTS when missing)
    pos: np.ndarray  # int64[n], byte offset in the file (-1 when unknown)
    end_ticks: int  # end of the last frame (its pts + its duration)
    fps: float
    repairs: list[str] = field(default_factory=list)  # what was repaired, one line each
    truncated: bool = False  # the container lists more than could be read
    hidden: np.ndarray | None = None  # bool[n], decode order: frames an edit list hides (decoded, never shown)

    def __post_init__(self):
        self.order = np.argsort(self.pts, kind="stable")
        shown = np.ones(len(self.pts), bool) if self.hidden is None or self.hidden.all() else ~self.hidden
        # t = 0 is the first frame a player shows; frames an edit list hides before it keep
        # negative times (they are decoded as references, never chosen as stills)
        self.first_ticks = int(self.pts[shown].min())
        self.pts_s = (self.pts[self.order] - self.first_ticks) * float(self.time_base)  # presentation order
        self.duration_s = (self.end_ticks - self.first_ticks) * float(self.time_base)
        self.first_s = self.first_ticks * float(self.time_base)  # absolute time of the film's t = 0
        self.key_positions = np.flatnonzero((self.keyframe & shown)[self.order])  # presentation positions of shown keyframes
        if not np.isfinite(self.duration_s) or self.duration_s > MAX_DURATION_S:
            raise ValueError(f"video timestamps span {self.duration_s:.3g} s, more than {MAX_DURATION_S:.0f} s")

    def __len__(self) -> int:
        return len(self.pts)

    def still_positions(self, clip_indices: np.ndarray, frames_per_clip: int, keyframes_only: bool) -> np.ndarray:
        """int[n, K]: presentation positions of the stills of each clip: the last frame (or the
        last keyframe) whose pts <= i + (k + 0.5)/K; the first one for times before it."""
        times = clip_indices[:, None] + (np.arange(frames_per_clip) + 0.5) / frames_per_clip
        if not keyframes_only or len(self.key_positions) == 0:
            idx = np.searchsorted(self.pts_s, times + 1e-6, side="right") - 1
            return np.clip(idx, 0, len(self.pts_s) - 1)
        key_s = self.pts_s[self.key_positions]
        idx = np.searchsorted(key_s, times + 1e-6, side="right") - 1
        return self.key_positions[np.clip(idx, 0, len(key_s) - 1)]

    def raw_offset_s(self, t_s: float) -> float:
        """What the container's own timestamps add to the index's around timeline time ``t_s``
        (0 unless a repair moved them there): other streams, placed by their own timestamps, are
        read from ``first_s + raw_offset_s(t) + t`` (median over the frames nearby: robust to a stray pts)."""
        j = int(np.searchsorted(self.pts_s, t_s))
        near = self.order[max(0, j - REORDER_FRAMES):j + REORDER_FRAMES + 1]
        raw = self.raw_pts[near]
        known = raw != NOPTS
        if not known.any():
            return 0.0
        return float(np.median(raw[known] - self.pts[near][known])) * float(self.time_base)

    def packet_of(self, raw_pts: int, raw_dts: int, pos: int) -> int | None:
        """The decode-order number of a demuxed packet, recognised by position and timestamps."""
        same = (self.raw_pts == raw_pts) & (self.raw_dts == raw_dts)
        if pos >= 0:
            same &= self.pos == pos
        hits = np.flatnonzero(same)
        return int(hits[0]) if len(hits) == 1 else None


def build_index(raw_pts: np.ndarray, raw_dts: np.ndarray, pos: np.ndarray, durations: np.ndarray,
                keyframe: np.ndarray, time_base: Fraction, fps: float | None, uri: str,
                truncated: bool = False, hidden: np.ndarray | None = None) -> FrameIndex:
    """Check and repair the packets' timestamps (module docstring) and build the index."""
    repairs: list[str] = []
    frame = _frame_ticks(raw_pts, time_base, fps)
    pts = _fill_missing(raw_pts, raw_dts, frame, repairs)
    pts = _splice_discontinuities(pts, frame, time_base, repairs)
    pts = _unique(pts, repairs)
    shown = pts if hidden is None or hidden.all() else np.where(hidden, np.iinfo(np.int64).min, pts)
    last = int(np.argmax(shown))  # the end of the last frame shown
    last_duration = int(durations[last]) if 0 < durations[last] <= 10 * frame else frame
    end = int(pts[last]) + last_duration
    fps = fps or (len(pts) / max((end - int(pts.min())) * float(time_base), 1e-9))
    try:
        return FrameIndex(time_base, pts, keyframe, raw_pts, raw_dts, pos, end, fps, repairs, truncated,
                          None if hidden is None or not hidden.any() else hidden)
    except ValueError as e:
        raise MediaOpenError(uri, f"broken timestamps: {e}") from e


def _frame_ticks(raw_pts: np.ndarray, time_base: Fraction, fps: float | None) -> int:
    """One frame's duration in ticks: the usual step between sorted pts, else the declared rate."""
    steps = np.diff(np.sort(raw_pts[raw_pts != NOPTS]))
    steps = steps[steps > 0]
    if len(steps) >= 2:
        return max(1, int(np.median(steps)))
    return max(1, round(1 / ((fps or 25.0) * time_base)))


def _fill_missing(raw_pts: np.ndarray, raw_dts: np.ndarray, frame: int, repairs: list[str]) -> np.ndarray:
    """pts for packets with none or a lone outlier: from dts where it is sane, else one frame on."""
    pts = raw_pts.copy()
    bad = (pts == NOPTS) | _outliers(pts, frame)
    if not bad.any():
        return pts
    has_dts = (raw_dts != NOPTS) & ~_outliers(raw_dts, frame)
    both = ~bad & has_dts
    offset = int(np.median(pts[both] - raw_dts[both])) if both.any() else 0
    from_dts = bad & has_dts
    pts[from_dts] = raw_dts[from_dts] + offset
    rest = np.flatnonzero(bad & ~has_dts)
    pts[rest] = NOPTS  # rare: neither timestamp usable; one frame after the packet before it
    known = np.flatnonzero(pts != NOPTS)
    if len(known) == 0:  # not one usable timestamp: a constant frame rate from 0
        pts = np.arange(len(pts), dtype=np.int64) * frame
    for d in rest if len(known) else []:  # (before the first usable one: a frame before the next)
        pts[d] = pts[known[0]] - (known[0] - d) * frame if d < known[0] else pts[d - 1] + frame
    repairs.append(f"{int(bad.sum())} of {len(pts)} video packets had a missing or stray pts "
                   f"({int(from_dts.sum())} placed by dts, {len(rest)} by frame rate)")
    return pts


def _outliers(ts: np.ndarray, frame: int) -> np.ndarray:
    """Lone garbage timestamps: a spike above the packets after it, or a dip below those before
    it, by more than reordering allows, that is out of line with the other side too (missing
    ones are not outliers).

    Each side is the median of up to REORDER_FRAMES known neighbours in decode order, never a
    window that straddles the packet: a valid variable frame rate (a slideshow, a title or end
    card, a still held for seconds, also at the film's first and last packets) only ever climbs,
    so no packet of it is above what follows or below what precedes it. The two sides of a
    timestamp discontinuity are left to :func:`_splice_discontinuities`. Only packets that differ
    from a neighbour by more than reordering allows are examined: a clean film costs one ``diff``.
    """
    tolerance, half = (REORDER_FRAMES + 1) * frame, REORDER_FRAMES
    values = np.where(ts != NOPTS, ts, 0).astype(np.float64)
    values[ts == NOPTS] = np.nan
    with np.errstate(invalid="ignore"):
        far = np.abs(np.diff(values)) > tolerance
    candidates = np.flatnonzero(np.concatenate([far, [False]]) | np.concatenate([[False], far]))
    out = np.zeros(len(ts), bool)
    for d in candidates:
        before, after = _known(values[max(0, d - half):d]), _known(values[d + 1:d + half + 1])
        below = [values[d] < np.median(side) - tolerance for side in (before, after) if len(side)]
        above = [values[d] > np.median(side) + tolerance for side in (after, before) if len(side)]
        out[d] = (len(before) > 0 and all(below)) or (len(after) > 0 and all(above))
    return out


def _known(values: np.ndarray) -> np.ndarray:
    return values[~np.isnan(values)]


def _splice_discontinuities(pts: np.ndarray, frame: int, time_base: Fraction, repairs: list[str]) -> np.ndarray:
    """Splice out jumps back beyond reordering, or forward beyond MAX_FRAME_GAP_S, in decode order.

    Reordering moves a frame at most REORDER_FRAMES packets, whatever the frame rate: so a jump
    back is measured from the packets before those (a B-frame of a slideshow comes seconds after
    the P-frame decoded before it, and is no discontinuity)."""
    tolerance, max_gap = (REORDER_FRAMES + 1) * frame, max(frame, round(MAX_FRAME_GAP_S / time_base))
    running_max = np.maximum.accumulate(pts)
    prev = np.concatenate([[pts[0]], running_max[:-1]])
    lag = REORDER_FRAMES + 1
    settled = np.concatenate([np.full(min(lag, len(pts)), np.iinfo(np.int64).min), running_max[:-lag]])
    jumps = np.flatnonzero((pts < settled - tolerance) | (pts > prev + max_gap))
    if len(jumps) == 0:
        return pts
    out, shift, top, spliced = pts.copy(), 0, int(pts[0]), 0
    cuts, settled_top = set(int(j) for j in jumps), -math.inf  # the top of the packets before the last `lag`
    for d in range(len(pts)):  # jumps are rare; shifts accumulate, so this is a walk
        if d >= lag:
            settled_top = max(settled_top, int(out[d - lag]))
        value = int(pts[d]) + shift
        if d in cuts and (value < settled_top - tolerance or value > top + max_gap):
            shift += top + frame - value
            value, spliced = top + frame, spliced + 1
        out[d] = value
        top = max(top, value)
    if spliced:
        repairs.append(f"{spliced} timestamp discontinuit{'y' if spliced == 1 else 'ies'} spliced out")
    return out


def _unique(pts: np.ndarray, repairs: list[str]) -> np.ndarray:
    """Frames that share a pts are spread one tick apart (later in decode order = later)."""
    order = np.argsort(pts, kind="stable")
    ranked = pts[order]
    steps = np.arange(len(ranked), dtype=np.int64)
    spread = np.maximum.accumulate(ranked - steps) + steps
    if (spread == ranked).all():
        return pts
    out = pts.copy()
    out[order] = spread
    repairs.append(f"{int((spread != ranked).sum())} frames shared a timestamp")
    return out


def index_from_times(start_s: np.ndarray, end_s: np.ndarray, keyframe_positions: np.ndarray, fps: float,
                     uri: str) -> FrameIndex:
    """An index from per-frame times (decord's, in presentation order), under the same checks."""
    time_base = Fraction(1, 1_000_000)
    n = len(start_s)
    ticks = np.where(np.isfinite(start_s) & (np.abs(start_s) < MAX_DURATION_S * 4), start_s * 1e6, np.nan)
    raw = np.where(np.isnan(ticks), NOPTS, np.nan_to_num(ticks)).astype(np.int64)
    keyframe = np.zeros(n, bool)
    keyframe[np.asarray(keyframe_positions, int)] = True
    durations = np.clip(np.nan_to_num((end_s - start_s) * 1e6), 0, None).astype(np.int64)
    return build_index(raw, raw.copy(), np.arange(n, dtype=np.int64), durations, keyframe, time_base,
                       fps if fps and MIN_FPS <= fps <= MAX_FPS else None, uri)
