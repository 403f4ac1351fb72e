"""Where a cut may start decoding, and whether what was cut shows the film (SPEC 13).

A keyframe flag is the container's (or the parser's) word, not a promise: an H.264 stream with
periodic intra refresh, or a mislabelled frame, has "keyframes" that need earlier frames, and a
decoder started there shows garbage until the picture recovers. So before cutting at ``t`` we
check the candidate start, the last keyframe at or before ``t``, the only way that works for any
codec: decode the frame at ``t`` from that keyframe and from the one before it (or the film's
first frame). A clean start gives the same pixels either way; otherwise the earlier keyframe
becomes the candidate, up to :data:`MAX_CANDIDATES` of them, then the film's start (always clean).
After cutting, :func:`psnr` of the output's first frame against the frame decoded from the clean
start tells whether the cut shows the film.

Times here are a film's own (t = 0 at its first frame, as scoring uses); ``first_s`` converts them
to the stream's timestamps.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

MAX_CANDIDATES = 4  # keyframes tried, latest first, before decoding from the film's start
SAME_PSNR_DB = 50.0  # two decodes of one frame this close are the same picture (bit-exact is typical)
MIN_PSNR_DB = 25.0  # an excerpt's first frame this far from the film's is not the film (garbage: 5-13 dB)


@dataclass(frozen=True)
class CleanStart:
    """A verified decode start for a cut at ``t_s``, and the frame on screen at ``t_s``."""

    from_s: float | None  # a keyframe's film time, or None: decode from the film's start
    frame: np.ndarray | None  # RGB uint8[H, W, 3] of the frame at t_s, decoded from the clean start


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """Peak signal-to-noise ratio in dB of two RGB frames (``b`` resampled to ``a``'s size)."""
    if a.shape != b.shape:  # nearest-neighbour resampling: enough to tell a picture from garbage
        rows = np.arange(a.shape[0]) * b.shape[0] // a.shape[0]
        cols = np.arange(a.shape[1]) * b.shape[1] // a.shape[1]
        b = b[rows][:, cols]
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0 ** 2 / mse)


def frame_at(path: str, t_s: float, first_s: float, from_s: float | None) -> np.ndarray | None:
    """RGB of the frame on screen at film time ``t_s`` (the last with pts <= t_s), decoding from
    the keyframe at film time ``from_s`` (None: from the film's start); None when the decoder
    gives no such frame (it may drop frames it cannot reconstruct, or the data may end before)."""
    import av

    with av.open(path, metadata_errors="ignore") as container:
        stream = container.streams.video[0]
        tb = float(stream.time_base)
        frame_s = 1.0 / float(stream.average_rate or stream.guessed_rate or 25)
        if from_s is not None:
            container.seek(int(round((from_s + first_s) / tb)), stream=stream, backward=True, any_frame=False)
        shown, shown_s = None, -np.inf
        try:
            for frame in container.decode(stream):
                if frame.pts is None:
                    continue
                if frame.pts * tb - first_s > t_s + 1e-6:
                    return None if shown is None else shown.to_ndarray(format="rgb24")
                shown, shown_s = frame, frame.pts * tb - first_s
        except av.FFmpegError:  # a decoder that cannot go on from here: no frame, not a crash
            pass
        # the frames ended: the last one is on screen at t_s only if t_s falls within it
        return shown.to_ndarray(format="rgb24") if shown is not None and t_s < shown_s + 1.5 * frame_s else None


def clean_start(path: str, t_s: float, keyframes_s: np.ndarray, first_s: float) -> CleanStart:
    """The latest keyframe at or before ``t_s`` from which the frame at ``t_s`` decodes as it
    does from an earlier start (see the module docstring), with that frame."""
    candidates = [float(k) for k in np.asarray(keyframes_s)[np.asarray(keyframes_s) <= t_s + 1e-6][::-1]
                  if k > 0][:MAX_CANDIDATES]
    if not candidates:
        return CleanStart(None, frame_at(path, t_s, first_s, None))
    later = frame_at(path, t_s, first_s, candidates[0])
    for i, start in enumerate(candidates):
        earlier_start = candidates[i + 1] if i + 1 < len(candidates) else None
        earlier = frame_at(path, t_s, first_s, earlier_start)
        if later is not None and earlier is not None and psnr(earlier, later) >= SAME_PSNR_DB:
            return CleanStart(start, later)
        later = earlier
    return CleanStart(None, later)  # none of the keyframes tried: from the film's start


def first_frame(path: str) -> np.ndarray | None:
    """RGB of the first frame of a written excerpt or thumbnail (None when there is none)."""
    import av

    try:
        with av.open(path) as container:
            for frame in container.decode(video=0):
                return frame.to_ndarray(format="rgb24")
    except av.FFmpegError:
        return None
    return None
