"""kissray.segment: the exact rule of SPEC 5, checked against a literal brute force."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kissray.segment import find_segments

FRACTIONS = [0.0, 0.1, 0.5, 2 / 3, 0.7, 0.9, 1.0]


def brute_force_segments(probs, threshold=0.5, min_len=10, min_fraction=0.7) -> list[tuple[int, int]]:
    """SPEC 5 read literally: every window tested with np.mean; each pick scans all free valid windows."""
    y = np.asarray(probs, dtype=np.float64) >= threshold
    n = len(y)
    valid = [(s, e) for s in range(n) for e in range(s + max(min_len, 1) - 1, n)
             if y[s] and y[e] and np.mean(y[s:e + 1]) >= min_fraction]
    taken: list[tuple[int, int]] = []
    while True:
        free = [(s, e) for s, e in valid if all(e < a or s > b for a, b in taken)]
        if not free:
            return sorted((s, e + 1) for s, e in taken)
        taken.append(min(free, key=lambda w: (w[0] - w[1], w[0])))  # longest, then earliest


def ones(pattern: str) -> np.ndarray:
    """'1101' -> probabilities 1.0 / 0.0 (readable hand cases)."""
    return np.array([float(c) for c in pattern.replace(" ", "")])


# Probabilities: uniform floats, or a few values that sit exactly on the thresholds used (and NaN).
EDGE_VALUES = [0.0, 0.3, 0.5, 0.7, 1.0, math.nan]
prob_values = st.one_of(st.sampled_from(EDGE_VALUES), st.floats(0.0, 1.0))
thresholds = st.one_of(st.sampled_from([0.5, 0.3, 0.7]), st.floats(0.0, 1.0))
fractions = st.one_of(st.sampled_from(FRACTIONS), st.floats(0.0, 1.0))


@st.composite
def blocky(draw) -> list[float]:
    """Runs of equal probabilities, as a classifier produces around scenes."""
    runs = draw(st.lists(st.tuples(st.sampled_from(EDGE_VALUES[:-1]), st.integers(1, 12)), max_size=12))
    return [p for p, length in runs for _ in range(length)][:80]


@settings(max_examples=1500, deadline=None)
@given(st.lists(prob_values, max_size=80), thresholds, st.integers(1, 15), fractions)
def test_matches_brute_force(probs, threshold, min_len, min_fraction):
    assert find_segments(probs, threshold, min_len, min_fraction) == \
        brute_force_segments(probs, threshold, min_len, min_fraction)


@settings(max_examples=1500, deadline=None)
@given(blocky(), st.sampled_from([0.5, 0.3, 0.7]), st.integers(1, 15), fractions)
def test_matches_brute_force_on_blocks(probs, threshold, min_len, min_fraction):
    assert find_segments(probs, threshold, min_len, min_fraction) == \
        brute_force_segments(probs, threshold, min_len, min_fraction)


@pytest.mark.parametrize("seed", range(4))
def test_matches_brute_force_on_longer_films(seed):
    rng = np.random.default_rng(seed)
    probs = np.repeat(rng.random(60) ** 0.5, rng.integers(1, 9, 60))[:250]
    for min_len, min_fraction in [(10, 0.7), (3, 0.9), (1, 1.0), (5, 2 / 3)]:
        assert find_segments(probs, 0.5, min_len, min_fraction) == \
            brute_force_segments(probs, 0.5, min_len, min_fraction)


def test_paper_defaults_on_a_clear_block():
    probs = np.full(60, 0.1)
    probs[12:30] = 0.9
    assert find_segments(probs) == [(12, 30)]


def test_two_blocks():
    probs = np.full(80, 0.1)
    probs[5:20] = probs[40:62] = 0.8
    assert find_segments(probs) == [(5, 20), (40, 62)]


def test_short_gap_is_bridged_long_gap_splits():
    assert find_segments(ones("0 11111 00 11111111 0")) == [(1, 16)]  # 13/15 >= 0.7
    assert find_segments(ones("1111111111 0000000000 1111111111")) == [(0, 10), (20, 30)]  # 20/30 < 0.7


def test_longer_later_window_beats_earlier_overlapping_one():
    # [0, 10) is valid (8/10) but the longest valid window is [3, 19): the paper's code kept [0, 10).
    probs = ones("1001111111 1001010110")
    assert brute_force_segments(probs) == find_segments(probs) == [(3, 19)]


def test_ties_take_the_earliest_start():
    # [0, 4) and [2, 6) are both valid (3/4), their union is not (4/6): the earlier wins.
    assert find_segments(ones("101101"), min_len=4, min_fraction=0.75) == [(0, 4)]


def test_probability_equal_to_threshold_counts():
    assert find_segments([0.5] * 10) == [(0, 10)]
    assert find_segments([np.nextafter(0.5, 0)] * 10) == []


def test_nan_counts_as_below_threshold():
    probs = np.full(12, 0.9)
    probs[[0, 5]] = np.nan
    assert find_segments(probs) == [(1, 12)]  # 10/11 >= 0.7, must start on a positive


@pytest.mark.parametrize("probs", [[], np.zeros(0), [0.9] * 9])
def test_nothing_to_find(probs):
    assert find_segments(probs) == []


def test_parameter_edges():
    probs = ones("1 0 1 0 1")
    assert find_segments(probs, min_len=0, min_fraction=1.0) == [(0, 1), (2, 3), (4, 5)]
    assert find_segments(probs, min_len=-3, min_fraction=0.0) == [(0, 5)]
    assert find_segments(probs, min_len=1, min_fraction=-1.0) == [(0, 5)]
    assert find_segments([1.0] * 20, min_len=1, min_fraction=1.5) == []
    assert find_segments(np.array([0.9] * 10, dtype=np.float32), min_len=np.int64(10)) == [(0, 10)]


@pytest.mark.parametrize("kwargs, message", [
    ({"threshold": math.nan}, "threshold"),
    ({"threshold": math.inf}, "threshold"),
    ({"threshold": "0.5"}, "threshold"),
    ({"min_len": 2.5}, "min_len"),
    ({"min_len": True}, "min_len"),
    ({"min_fraction": math.nan}, "min_fraction"),
    ({"min_fraction": None}, "min_fraction"),
])
def test_bad_parameters(kwargs, message):
    with pytest.raises(ValueError, match=message):
        find_segments([0.9] * 12, **kwargs)


def test_two_dimensional_input_is_an_error():
    with pytest.raises(ValueError, match="1-D"):
        find_segments(np.ones((12, 2)))
