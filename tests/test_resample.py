"""kissray.media.resample: 16 kHz samples on the grid of the stream's timestamps, the same however
the input is cut (SPEC 3: a window's audio equals the whole film's)."""

from __future__ import annotations

import numpy as np
import pytest

from kissray.media.resample import GridResampler


def resampled(rate: int, pieces: list[tuple[int, np.ndarray]]) -> tuple[int, np.ndarray]:
    resampler = GridResampler(rate)
    chunks = [chunk for m, samples in pieces for chunk in resampler.push(m, samples)] + resampler.flush()
    assert all(a[0] + len(a[1]) == b[0] for a, b in zip(chunks, chunks[1:]))  # one contiguous stretch
    return chunks[0][0], np.concatenate([samples for _, samples in chunks])


@pytest.mark.parametrize("rate", [8000, 22050, 44100, 48000])
def test_a_tone_is_the_same_tone_at_16_khz(rate):
    x = np.sin(2 * np.pi * 1000 * np.arange(2 * rate) / rate).astype(np.float32)
    first, y = resampled(rate, [(0, x)])
    expected = np.sin(2 * np.pi * 1000 * (first + np.arange(len(y))) / 16000)
    assert first == 0 and abs(len(y) - 32000) <= 1
    assert np.abs(y - expected)[100:-100].max() < 1e-4  # the edges border on silence


@pytest.mark.parametrize("rate", [44100, 48000])
def test_output_does_not_depend_on_how_the_input_is_cut_or_where_it_starts(rate):
    """Chunks of any size give the one-piece output bit for bit; a stream that starts mid-way (a
    seek) gives the same samples once past the filter's reach, on the same output indices."""
    x = np.random.default_rng(1).standard_normal(3 * rate).astype(np.float32)
    first, whole = resampled(rate, [(0, x)])
    cuts = [0, 1, 441, 1000, 12_345, 50_000, len(x)]
    _, cut = resampled(rate, [(a, x[a:b]) for a, b in zip(cuts, cuts[1:])])
    assert np.array_equal(cut, whole)
    seek = 70_001  # any input sample
    late_first, late = resampled(rate, [(seek, x[seek:])])
    reach = 64  # output samples the filter needs before a stretch's start is forgotten
    assert late_first == -(-seek * 16000 // rate)
    np.testing.assert_array_equal(late[reach:-reach], whole[late_first + reach - first:len(whole) - reach])


def test_a_gap_in_the_input_starts_a_new_stretch():
    x = np.ones(48000, np.float32)
    resampler = GridResampler(48000)
    chunks = resampler.push(0, x) + resampler.push(96000, x) + resampler.flush()
    starts = [n for n, _ in chunks]
    assert 32000 in starts  # the second stretch starts on its own grid point (96000 / 3)
    assert all(np.abs(samples[40:-40] - 1).max() < 1e-4 for _, samples in chunks if len(samples) > 80)
