"""kissray.audio: the VGGish log-mel frontend against a plain re-reading of the AudioSet reference."""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest

from kissray.audio import SILENCE_LOG_MEL, clip_log_mels, log_mel_examples

RATE = 16000
LOG_SILENCE = np.float32(math.log(0.01))


def reference_examples(samples_16k: np.ndarray) -> np.ndarray:
    """mel_features.py / vggish_input.py written out plainly: one rfft per frame, one loop per mel band."""
    x = np.asarray(samples_16k, dtype=np.float64)
    window = np.array([0.5 - 0.5 * math.cos(2 * math.pi * i / 400) for i in range(400)])
    n_frames = 1 + (len(x) - 400) // 160 if len(x) >= 400 else 0
    spectrogram = np.zeros((n_frames, 257))
    for f in range(n_frames):
        spectrogram[f] = np.abs(np.fft.rfft(x[f * 160:f * 160 + 400] * window, 512))
    bin_mel = 1127 * np.log(1 + np.linspace(0, 8000, 257) / 700)
    edges = np.linspace(1127 * math.log(1 + 125 / 700), 1127 * math.log(1 + 7500 / 700), 66)
    weights = np.zeros((257, 64))
    for band in range(64):
        lower, center, upper = edges[band:band + 3]
        for b in range(1, 257):  # bin 0 (DC) keeps weight 0
            weights[b, band] = max(0.0, min((bin_mel[b] - lower) / (center - lower),
                                            (upper - bin_mel[b]) / (upper - center)))
    log_mel = np.log(spectrogram @ weights + 0.01)
    n_examples = n_frames // 96
    return log_mel[:n_examples * 96].reshape(n_examples, 96, 64)


def tone(freq_hz: float, seconds: float, rate: int = RATE, amplitude: float = 0.5) -> np.ndarray:
    return amplitude * np.sin(2 * np.pi * freq_hz * np.arange(int(seconds * rate)) / rate)


def band_centers_hz() -> np.ndarray:
    edges = np.linspace(1127 * math.log(1 + 125 / 700), 1127 * math.log(1 + 7500 / 700), 66)
    return 700 * (np.exp(edges[1:-1] / 1127) - 1)


def loudest_band(examples: np.ndarray) -> int:
    return int(np.argmax(examples.mean(axis=(0, 1))))


def test_matches_reference_on_noise_and_tones():
    rng = np.random.default_rng(0)
    waveform = 0.1 * rng.standard_normal(3 * RATE) + tone(440, 3) + tone(3000, 3, amplitude=0.2)
    examples = log_mel_examples(waveform, RATE)
    assert examples.shape == (3, 96, 64) and examples.dtype == np.float32
    np.testing.assert_allclose(examples, reference_examples(waveform), rtol=1e-5, atol=1e-4)


def test_silence_is_log_offset_everywhere():
    assert np.all(log_mel_examples(np.zeros(2 * RATE), RATE) == LOG_SILENCE)
    assert SILENCE_LOG_MEL.shape == (96, 64) and SILENCE_LOG_MEL.dtype == np.float32
    assert np.all(SILENCE_LOG_MEL == LOG_SILENCE)
    assert not SILENCE_LOG_MEL.flags.writeable


def test_tone_peaks_in_the_band_centred_nearest_it():
    nearest = int(np.argmin(np.abs(band_centers_hz() - 1000)))
    assert loudest_band(log_mel_examples(tone(1000, 2), RATE)) == nearest


@pytest.mark.parametrize("n_samples, n_examples", [
    (0, 0), (399, 0), (15599, 0), (15600, 1), (30959, 1), (30960, 2), (31200, 2),
])
def test_number_of_examples(n_samples, n_examples):
    assert log_mel_examples(np.zeros(n_samples), RATE).shape == (n_examples, 96, 64)


def test_stereo_is_the_mean_of_channels():
    rng = np.random.default_rng(1)
    left, right = tone(500, 1), 0.2 * rng.standard_normal(RATE)
    np.testing.assert_allclose(log_mel_examples(np.stack([left, right]), RATE),
                               log_mel_examples((left + right) / 2, RATE), rtol=1e-6, atol=1e-5)


def test_resamples_from_44_1_khz():
    examples = log_mel_examples(tone(1000, 2, rate=44100).astype(np.float32), 44100)
    assert examples.shape == (2, 96, 64)
    assert loudest_band(examples) == int(np.argmin(np.abs(band_centers_hz() - 1000)))
    np.testing.assert_allclose(examples, log_mel_examples(tone(1000, 2), RATE), atol=0.05)


def timeline_patch(samples: np.ndarray, clip: int, offset: int) -> np.ndarray:
    """The 15,600 timeline samples ending at (clip + 1) * 16000, taken from a zero-padded timeline."""
    end = (clip + 1) * RATE
    padded = np.zeros(15600)
    for t in range(end - 15600, end):
        if 0 <= t - offset < len(samples):
            padded[t - (end - 15600)] = samples[t - offset]
    return padded


@pytest.mark.parametrize("offset", [0, 5000, -2000, 3 * RATE])
def test_clip_patches_match_whole_waveform_examples(offset):
    samples = 0.1 * np.random.default_rng(2).standard_normal(int(4.5 * RATE)) + tone(700, 4.5)
    first, n = -1, 9  # from before the timeline's start to well past the audio's end
    patches = clip_log_mels(samples.astype(np.float32), first, n, offset_samples=offset)
    assert patches.shape == (n, 96, 64) and patches.dtype == np.float32
    expected = np.stack([log_mel_examples(timeline_patch(samples.astype(np.float32), i, offset), RATE)[0]
                         for i in range(first, first + n)])
    np.testing.assert_allclose(patches, expected, rtol=1e-6, atol=1e-5)


def test_clip_patches_outside_the_audio_are_silence():
    samples = tone(440, 2)
    patches = clip_log_mels(samples, 5, 20)  # far past the end
    assert np.array_equal(patches, np.broadcast_to(SILENCE_LOG_MEL, patches.shape))
    assert clip_log_mels(samples, 3, 0).shape == (0, 96, 64)


def test_clip_patches_in_many_chunks_match_one_at_a_time():
    samples = 0.1 * np.random.default_rng(3).standard_normal(40 * RATE)
    batch = clip_log_mels(samples, 0, 40)
    single = np.stack([clip_log_mels(samples, i, 1)[0] for i in range(40)])
    np.testing.assert_allclose(batch, single, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("waveform, sample_rate, message", [
    (np.zeros((2, 3, RATE)), RATE, "dimensions"),
    (np.zeros((RATE, 2)), RATE, "channels"),
    (np.zeros(RATE, dtype=np.int16), RATE, "float"),
    (np.zeros(RATE), 0, "sample_rate"),
    (np.zeros(RATE), 22050.5, "sample_rate"),
])
def test_bad_input(waveform, sample_rate, message):
    with pytest.raises(ValueError, match=message):
        log_mel_examples(waveform, sample_rate)


def test_import_stays_light():
    code = "import sys, kissray.audio; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
