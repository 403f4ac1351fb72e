"""Time `find_segments` on a 3-hour film (10,800 seconds): uniform random and blocky realistic probabilities.

Run: `python benchmarks/bench_segment.py` (SPEC 5 asks for well under 0.1 s per film).
"""

from __future__ import annotations

import time

import numpy as np

from kissray.segment import find_segments

FILM_SECONDS = 3 * 60 * 60  # 10,800 per-second probabilities
REPEATS = 5


def blocky_probs(rng: np.random.Generator, n: int = FILM_SECONDS, n_scenes: int = 40) -> np.ndarray:
    """Low noisy background with `n_scenes` high-probability scenes of 5-120 s, each with a few dips."""
    probs = rng.beta(1, 8, n)
    for start, length in zip(rng.integers(0, n, n_scenes), rng.integers(5, 121, n_scenes)):
        probs[start:start + length] = rng.beta(8, 2, len(probs[start:start + length]))
    return probs


def best_time_s(probs: np.ndarray, **params) -> tuple[float, int]:
    """Best wall time of REPEATS calls, and the number of segments found."""
    times = []
    for _ in range(REPEATS):
        start = time.perf_counter()
        segments = find_segments(probs, **params)
        times.append(time.perf_counter() - start)
    return min(times), len(segments)


def main() -> None:
    rng = np.random.default_rng(0)
    cases = {
        "random, defaults": (rng.random(FILM_SECONDS), {}),
        "blocky, defaults": (blocky_probs(rng), {}),
        "random, min_len=1 min_fraction=1": (rng.random(FILM_SECONDS), {"min_len": 1, "min_fraction": 1.0}),
        "random, min_fraction=0.5": (rng.random(FILM_SECONDS), {"min_fraction": 0.5}),
    }
    for name, (probs, params) in cases.items():
        seconds, n_segments = best_time_s(probs, **params)
        print(f"{name:36s} n={probs.size}  {seconds * 1e3:7.2f} ms  ({n_segments} segments)")


if __name__ == "__main__":
    main()
