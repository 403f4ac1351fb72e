"""Segmenter: per-second probabilities -> non-overlapping segments (SPEC 5, exact rule).

`y[i] = p[i] >= threshold`. A window `[s, e]` is valid when `y[s]`, `y[e]`, `e - s + 1 >= min_len` and
`mean(y[s..e]) >= min_fraction` (the float64 mean, as `np.mean` computes it). The greedy takes the longest
valid window that overlaps none taken so far (ties: earliest start) until none is left.

How it stays exact and fast (O(n log n) per round, few rounds):
- The float test `k / L >= min_fraction` is monotone in the real `k / L`, so over all lengths `L <= n` it equals
  one exact rational test `k / L >= p / q` (`_rational_threshold`). With prefix counts `c`, the integer
  `h[i] = q * c[i] - p * i` makes a window valid iff `h[e + 1] >= h[s]` (plus the end and length tests).
- The greedy decomposes: after taking the best window of a free interval, its left and right remainders are
  independent. The right remainder keeps the interval's right bound, so the longest window of every start,
  computed once per interval, still holds there: a chain of picks follows a suffix argmax. Only left
  remainders are recomputed, all of one round at once. Along any chain of nested left remainders the picked
  lengths strictly decrease, so there are at most about sqrt(2 n) rounds (a handful in practice).
"""

from __future__ import annotations

import bisect
import math
import numbers
from fractions import Fraction

import numpy as np

MAX_SECONDS = 2**20  # ~12 days; keeps the packed int64 keys below (n + 2)**3 < 2**63


def find_segments(probs, threshold: float = 0.5, min_len: int = 10,
                  min_fraction: float = 0.7) -> list[tuple[int, int]]:
    """Return the segments of `probs` as half-open `(start_s, end_s)` pairs, sorted by start.

    `probs` is a 1-D sequence of per-second probabilities (NaN counts as below `threshold`; values are
    compared in float64). `min_len <= 0` means 1; `min_fraction > 1` finds nothing.
    """
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim != 1:
        raise ValueError(f"probs must be 1-D (one probability per second), got shape {p.shape}")
    threshold, min_len, min_fraction = _check_params(threshold, min_len, min_fraction)
    n = p.size
    if n > MAX_SECONDS:
        raise ValueError(f"at most {MAX_SECONDS} probabilities are supported, got {n}")
    if n < min_len or min_fraction > 1.0:
        return []
    y = p >= threshold  # NaN >= t is False
    num, den = _rational_threshold(min_fraction, min_len, n)
    counts = np.concatenate(([0], np.cumsum(y, dtype=np.int64)))
    h = den * counts - num * np.arange(n + 1, dtype=np.int64)  # |h| <= n**2
    rank = np.unique(h, return_inverse=True)[1].astype(np.int64)  # same order, values in [0, n]
    hits = np.flatnonzero(y)
    segments: list[tuple[int, int]] = []
    intervals = [(0, n - 1)]
    while intervals:
        intervals = _round(intervals, hits, rank, min_len, n, segments)
    return sorted(segments)


def _check_params(threshold, min_len, min_fraction) -> tuple[float, int, float]:
    if isinstance(threshold, bool) or not isinstance(threshold, numbers.Real) or not math.isfinite(threshold):
        raise ValueError(f"threshold must be a finite real number, got {threshold!r}")
    if isinstance(min_len, bool) or not isinstance(min_len, numbers.Integral):
        raise ValueError(f"min_len must be an integer number of seconds, got {min_len!r}")
    if isinstance(min_fraction, bool) or not isinstance(min_fraction, numbers.Real) or math.isnan(min_fraction):
        raise ValueError(f"min_fraction must be a real number, got {min_fraction!r}")
    return float(threshold), max(int(min_len), 1), float(min_fraction)


def _rational_threshold(min_fraction: float, min_len: int, n: int) -> tuple[int, int]:
    """(p, q), q <= n: for every L in [min_len, n] and k in [0, L], `k / L >= min_fraction` iff `k * q >= p * L`."""
    if min_fraction <= 0.0:
        return 0, 1
    length = np.arange(min_len, n + 1, dtype=np.int64)
    need = np.clip(np.ceil(min_fraction * length), 0, length).astype(np.int64)
    while True:  # least k with float(k / L) >= min_fraction; k = L always passes as min_fraction <= 1
        lower = (need > 0) & ((need - 1) / length >= min_fraction)
        higher = need / length < min_fraction
        if not (lower.any() or higher.any()):
            break
        need += higher.astype(np.int64) - lower.astype(np.int64)
    ratio = need / length  # float rounding is monotone: the exact minimum has the least float
    tied = ratio == ratio.min()
    g = np.gcd(need[tied], length[tied])
    pairs = set(zip((need[tied] // g).tolist(), (length[tied] // g).tolist()))
    best = min(Fraction(a, b) for a, b in pairs)
    return best.numerator, best.denominator


def _round(intervals: list[tuple[int, int]], hits: np.ndarray, rank: np.ndarray, min_len: int, n: int,
           segments: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Pick along the right-remainder chains of all free `intervals` (inclusive bounds), appending to
    `segments`; return the left remainders, which need a fresh round."""
    pos, seg, bounds = _gather(intervals, hits)
    start, length = _longest_from(pos, seg, rank, min_len, n)
    pos_l, start_l, length_l = pos.tolist(), start.tolist(), length.tolist()
    remainders = []
    for (a, b), (lo, hi) in zip(intervals, bounds):
        cur = a
        while cur <= b:
            j = bisect.bisect_left(pos_l, cur, lo, hi)
            if j == hi or length_l[j] == 0:
                break
            s, e = start_l[j], start_l[j] + length_l[j] - 1
            segments.append((s, e + 1))
            if s - cur >= min_len:
                remainders.append((cur, s - 1))
            cur = e + 1
    return remainders


def _gather(intervals: list[tuple[int, int]],
            hits: np.ndarray) -> tuple[np.ndarray, np.ndarray, list[tuple[int, int]]]:
    """Positive seconds of all intervals, concatenated: positions, interval ids, and each interval's slice."""
    a, b = np.array(intervals, dtype=np.int64).T
    lo, hi = np.searchsorted(hits, a, "left"), np.searchsorted(hits, b, "right")
    sizes = hi - lo
    first = np.cumsum(sizes) - sizes
    seg = np.repeat(np.arange(len(intervals), dtype=np.int64), sizes)
    pos = hits[np.arange(sizes.sum(), dtype=np.int64) - np.repeat(first - lo, sizes)]
    return pos, seg, list(zip(first.tolist(), (first + sizes).tolist()))


def _longest_from(pos: np.ndarray, seg: np.ndarray, rank: np.ndarray, min_len: int,
                  n: int) -> tuple[np.ndarray, np.ndarray]:
    """For each position j: the best window (longest, earliest) starting at or after pos[j] in its interval.

    Returns (start, length) arrays, length 0 when there is none. Intervals are kept apart by packing the
    interval id above the value: later intervals sort lower, so running maxima restart at each interval.
    """
    last = seg[-1] if seg.size else 0
    width = n + 2  # ranks are in [0, n]
    # Longest window per start: last end e >= s in the interval with rank[e + 1] >= rank[s].
    climb = np.maximum.accumulate(((last - seg) * width + rank[pos + 1])[::-1])  # non-decreasing
    at = np.searchsorted(climb, (last - seg) * width + rank[pos], "left")
    end = pos[pos.size - 1 - at]
    own = end - pos + 1
    own[own < min_len] = 0
    # Suffix argmax of (length, -start) per interval.
    key = ((last - seg) * width + own) * width + (n - pos)
    best = np.maximum.accumulate(key[::-1])[::-1] % (width * width)
    return n - best % width, best // width
