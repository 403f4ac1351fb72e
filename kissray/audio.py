"""Audio: the VGGish log-mel frontend, exactly as the AudioSet reference (`mel_features.py`, `vggish_input.py`).

Periodic Hann STFT magnitudes -> 64 HTK-mel bands from 125 to 7500 Hz -> `log(mel + 0.01)`, cut into 96-frame
patches. Each 1-second clip `i` gets the patch over the 15,600 samples ending at `(i + 1) * 16000` (SPEC 2).
numpy only at import time: the decoder process imports this module; torchaudio is loaded only to resample.
"""

from __future__ import annotations

import numpy as np


def exact_div(x: int, y: int) -> int:
    """x / y for constants that must divide exactly."""
    assert x % y == 0, (x, y)
    return x // y


SAMPLE_RATE_HZ = 16000
STFT_WINDOW_SAMPLES = exact_div(SAMPLE_RATE_HZ * 25, 1000)  # 400 samples: 25 ms
STFT_HOP_SAMPLES = exact_div(SAMPLE_RATE_HZ * 10, 1000)  # 160 samples: 10 ms
FFT_LENGTH = 1 << (STFT_WINDOW_SAMPLES - 1).bit_length()  # 512: the next power of two
NUM_SPECTROGRAM_BINS = FFT_LENGTH // 2 + 1  # 257 rfft bins, 0 to 8000 Hz
NUM_MEL_BINS = 64
MEL_MIN_HZ = 125.0
MEL_MAX_HZ = 7500.0
MEL_BREAK_HZ = 700.0  # HTK mel scale: 1127 ln(1 + f / 700)
MEL_HIGH_Q = 1127.0
LOG_OFFSET = 0.01  # log(mel + 0.01), so silence is log(0.01)
EXAMPLE_FRAMES = 96  # 0.96 s of frames in one VGGish patch
EXAMPLE_SAMPLES = STFT_WINDOW_SAMPLES + (EXAMPLE_FRAMES - 1) * STFT_HOP_SAMPLES  # 15,600 samples per patch
EXAMPLE_HOP_SAMPLES = EXAMPLE_FRAMES * STFT_HOP_SAMPLES  # 15,360: examples do not overlap
CLIP_SAMPLES = SAMPLE_RATE_HZ  # 16,000 samples: one 1-second clip
PATCH_OFFSET_SAMPLES = CLIP_SAMPLES - EXAMPLE_SAMPLES  # 400: a clip's patch starts this far into the clip
MAX_CHANNELS = 64  # more "channels" than this is a [samples, channels] array passed the wrong way round
_CHUNK_PATCHES = 16  # patches per batched FFT: ~1,500 frames keep the buffers in cache


def hertz_to_mel(frequencies_hz: np.ndarray | float) -> np.ndarray:
    """HTK mel scale, as the reference's `hertz_to_mel`."""
    return MEL_HIGH_Q * np.log(1.0 + (frequencies_hz / MEL_BREAK_HZ))


def mel_matrix() -> np.ndarray:
    """float64[257, 64] triangular mel weights of the reference's `spectrogram_to_mel_matrix` (DC row 0)."""
    bins_mel = hertz_to_mel(np.linspace(0.0, SAMPLE_RATE_HZ / 2, NUM_SPECTROGRAM_BINS))[:, None]
    edges_mel = np.linspace(hertz_to_mel(MEL_MIN_HZ), hertz_to_mel(MEL_MAX_HZ), NUM_MEL_BINS + 2)
    lower, center, upper = edges_mel[:-2], edges_mel[1:-1], edges_mel[2:]
    rising = (bins_mel - lower) / (center - lower)
    falling = (upper - bins_mel) / (upper - center)
    weights = np.maximum(0.0, np.minimum(rising, falling))
    weights[0, :] = 0.0
    return weights


def _read_only(array: np.ndarray) -> np.ndarray:
    array.setflags(write=False)
    return array


_WINDOW = _read_only(0.5 - (0.5 * np.cos(2 * np.pi / STFT_WINDOW_SAMPLES * np.arange(STFT_WINDOW_SAMPLES))))
_MEL_MATRIX = _read_only(mel_matrix())


def _patch_frames(signal: np.ndarray, n_patches: int, patch_hop_samples: int) -> np.ndarray:
    """Read-only view [n_patches, 96, 400]: frame j of patch k starts at k * patch_hop + j * 160."""
    needed = (n_patches - 1) * patch_hop_samples + EXAMPLE_SAMPLES
    assert signal.ndim == 1 and signal.flags.c_contiguous and (n_patches == 0 or signal.size >= needed)
    step = signal.strides[0]
    return np.lib.stride_tricks.as_strided(
        signal, (n_patches, EXAMPLE_FRAMES, STFT_WINDOW_SAMPLES),
        (patch_hop_samples * step, STFT_HOP_SAMPLES * step, step), writeable=False)


def _log_mel_patches(signal: np.ndarray, n_patches: int, patch_hop_samples: int) -> np.ndarray:
    """float32[n_patches, 96, 64]: patch k is the log-mel of signal[k * hop:k * hop + 15,600] (float64 inside)."""
    frames = _patch_frames(signal, n_patches, patch_hop_samples)
    out = np.empty((n_patches, EXAMPLE_FRAMES, NUM_MEL_BINS), dtype=np.float32)
    for k in range(0, n_patches, _CHUNK_PATCHES):
        magnitude = np.abs(np.fft.rfft(frames[k:k + _CHUNK_PATCHES] * _WINDOW, FFT_LENGTH))
        out[k:k + _CHUNK_PATCHES] = np.log(magnitude @ _MEL_MATRIX + LOG_OFFSET)
    return out


def _as_float(waveform, ndims: tuple[int, ...]) -> np.ndarray:
    audio = np.asarray(waveform)
    if audio.ndim not in ndims:
        dims = " or ".join(map(str, ndims))
        raise ValueError(f"expected a waveform with {dims} dimensions, got shape {audio.shape}")
    if not (np.issubdtype(audio.dtype, np.floating) or audio.size == 0):
        raise ValueError(f"expected float samples in [-1, 1], got dtype {audio.dtype} (scale integer PCM first)")
    return audio


def _mono(waveform) -> np.ndarray:
    """Contiguous float64 mono: 1-D as is, [channels, samples] averaged over channels."""
    audio = _as_float(waveform, (1, 2))
    if audio.ndim == 2:
        if audio.shape[0] > MAX_CHANNELS:
            raise ValueError(f"expected [channels, samples] with at most {MAX_CHANNELS} channels, got shape "
                             f"{audio.shape}; transpose [samples, channels] input")
        audio = audio.mean(axis=0, dtype=np.float64)
    return np.ascontiguousarray(audio, dtype=np.float64)


def _resample(signal: np.ndarray, sample_rate: int) -> np.ndarray:
    import torch  # heavy: only when the audio is not already at 16 kHz
    import torchaudio.functional

    resampled = torchaudio.functional.resample(torch.from_numpy(signal), sample_rate, SAMPLE_RATE_HZ)
    return np.ascontiguousarray(resampled.numpy(), dtype=np.float64)


def log_mel_examples(waveform, sample_rate: int) -> np.ndarray:
    """VGGish examples of a whole waveform: float32[N, 96, 64], non-overlapping 96-frame patches.

    `waveform` holds float samples in [-1, 1], 1-D mono or [channels, samples] (averaged to mono); it is
    resampled to 16 kHz with torchaudio when `sample_rate` differs. N = frames // 96, where
    frames = 1 + (samples - 400) // 160 at 16 kHz (0 when shorter than one 400-sample window).
    """
    if isinstance(sample_rate, bool) or not sample_rate > 0 or int(sample_rate) != sample_rate:
        raise ValueError(f"sample_rate must be a positive integer number of Hz, got {sample_rate!r}")
    signal = _mono(waveform)
    if sample_rate != SAMPLE_RATE_HZ and signal.size:
        signal = _resample(signal, int(sample_rate))
    n_frames = 0 if signal.size < STFT_WINDOW_SAMPLES else 1 + (signal.size - STFT_WINDOW_SAMPLES) // STFT_HOP_SAMPLES
    return _log_mel_patches(signal, n_frames // EXAMPLE_FRAMES, EXAMPLE_HOP_SAMPLES)


def _timeline_slice(samples: np.ndarray, start: int, length: int) -> np.ndarray:
    """float64 samples[start:start + length], zeros wherever that range leaves the array."""
    out = np.zeros(length, dtype=np.float64)
    lo, hi = max(start, 0), min(start + length, samples.size)
    if lo < hi:
        out[lo - start:hi - start] = samples[lo:hi]
    return out


def clip_log_mels(samples_16k: np.ndarray, first_clip: int, n_clips: int, offset_samples: int = 0) -> np.ndarray:
    """Log-mel patches of clips first_clip .. first_clip + n_clips - 1: float32[n_clips, 96, 64].

    The patch of clip i covers the 15,600 samples ending at (i + 1) * 16000 on the film's timeline;
    `samples_16k[0]` (mono, 16 kHz) sits at timeline sample `offset_samples`; samples outside it are zeros.
    """
    samples = _as_float(samples_16k, (1,))
    if n_clips < 0:
        raise ValueError(f"n_clips must be >= 0, got {n_clips}")
    out = np.empty((n_clips, EXAMPLE_FRAMES, NUM_MEL_BINS), dtype=np.float32)
    for k in range(0, n_clips, _CHUNK_PATCHES):
        count = min(_CHUNK_PATCHES, n_clips - k)
        start = (first_clip + k) * CLIP_SAMPLES + PATCH_OFFSET_SAMPLES - offset_samples
        chunk = _timeline_slice(samples, start, (count - 1) * CLIP_SAMPLES + EXAMPLE_SAMPLES)
        out[k:k + count] = _log_mel_patches(chunk, count, CLIP_SAMPLES)
    return out


# The patch of all-zero audio: films without (decodable) audio get this for every clip.
SILENCE_LOG_MEL = _read_only(_log_mel_patches(np.zeros(EXAMPLE_SAMPLES), 1, EXAMPLE_SAMPLES)[0])
