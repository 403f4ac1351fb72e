"""Resampling a film's audio to 16 kHz on a grid fixed by its timestamps (SPEC 3).

Output sample ``n`` is the signal at stream time ``n / 16000`` s exactly, a windowed-sinc
interpolation of the input samples around it (input sample ``m`` sits at ``m / rate`` s). Each
output is a fixed function of the input samples near it, so a window that seeks into a film and
resamples from there gets bit for bit the samples of a decode of the whole film (a streaming
resampler started wherever a seek landed does not: its phase and its history differ). Pure numpy.
"""

from __future__ import annotations

import math

import numpy as np
from numpy.lib.stride_tricks import as_strided

from kissray.audio import SAMPLE_RATE_HZ

ZERO_CROSSINGS = 16  # of the sinc, each side of an output sample (at the lower of the two rates)
ROLLOFF = 0.945  # cutoff as a fraction of the lower Nyquist frequency (resampy's kaiser_best: 0.9475)
KAISER_BETA = 8.6  # the window's side lobes: ~ -85 dB


class GridResampler:
    """Mono float32 samples at ``rate`` Hz in, 16 kHz samples on the stream's grid out.

    :meth:`push` takes samples starting at input index ``m`` (the stream time ``m / rate`` s);
    a ``m`` that does not continue the last push starts a new stretch (the last one is finished
    as if followed by silence). Returns ``(n, samples)`` chunks, ``n`` the first output index.
    """

    def __init__(self, rate: int):
        g = math.gcd(int(rate), SAMPLE_RATE_HZ)
        self.rate, self.up, self.down = int(rate), SAMPLE_RATE_HZ // g, int(rate) // g
        self.taps, self.half = _taps(self.up, self.down)
        self._buf = np.zeros(0, np.float32)
        self._start: int | None = None  # input index of _buf[0]
        self._next = 0  # next output index

    @property
    def end(self) -> int | None:
        """The input index the next push continues from (None before the first)."""
        return None if self._start is None else self._start + len(self._buf)

    def push(self, m: int, samples: np.ndarray) -> list[tuple[int, np.ndarray]]:
        out = []
        if self._start is not None and m != self.end:
            out += self.flush()
        if self._start is None:  # silence before a stretch: its first outputs need no earlier input
            self._start, self._buf = m - self.half, np.zeros(self.half, np.float32)
            self._next = -(-m * self.up // self.down)  # the first output at or after input m
        self._buf = np.concatenate([self._buf, np.asarray(samples, np.float32)])
        return out + self._emit()

    def flush(self) -> list[tuple[int, np.ndarray]]:
        """The rest of this stretch, as if silence followed; the next push starts afresh."""
        if self._start is None:
            return []
        self._buf = np.concatenate([self._buf, np.zeros(self.half, np.float32)])
        out = self._emit()
        self._start, self._buf = None, np.zeros(0, np.float32)
        return out

    def _emit(self) -> list[tuple[int, np.ndarray]]:
        """Every output whose inputs are all in the buffer; then drop what no later output needs.
        Outputs of one phase (n mod up) read inputs ``down`` apart: one strided view and one
        ``einsum`` per phase (a fixed order of products and sums per output, whatever the buffer)."""
        end = self._start + len(self._buf)
        last = -(-(end - self.half) * self.up // self.down) - 1  # base(n) + half <= end - 1
        if last < self._next:
            return []
        first, n_out = self._next, last + 1 - self._next
        samples = np.empty(n_out, np.float32)
        item = self._buf.itemsize
        for k in range(min(self.up, n_out)):
            base, phase = divmod((first + k) * self.down, self.up)  # output first + k sits at input base + phase / up
            count = (n_out - k + self.up - 1) // self.up
            offset = base - self.half + 1 - self._start
            windows = as_strided(self._buf[offset:], shape=(count, 2 * self.half),
                                 strides=(self.down * item, item), writeable=False)
            samples[k::self.up] = np.einsum("ij,j->i", windows, self.taps[phase])
        self._next = last + 1
        keep_from = (self._next * self.down) // self.up - self.half + 1
        self._buf, self._start = self._buf[keep_from - self._start:], keep_from
        return [(first, samples)]


def _taps(up: int, down: int) -> tuple[np.ndarray, int]:
    """float32[up, 2 * half]: per phase, the Kaiser-windowed sinc taps of inputs base - half + 1 ..
    base + half (each row sums to 1: a constant stays that constant); and ``half``."""
    cutoff = ROLLOFF * 0.5 * min(1.0, up / down)  # cycles per input sample
    half = math.ceil(ZERO_CROSSINGS / (2 * cutoff))
    offsets = np.arange(up)[:, None] / up - np.arange(-half + 1, half + 1)[None, :]  # output - input, in inputs
    window = np.i0(KAISER_BETA * np.sqrt(np.clip(1 - (offsets / half) ** 2, 0, None))) / np.i0(KAISER_BETA)
    taps = 2 * cutoff * np.sinc(2 * cutoff * offsets) * window
    return (taps / taps.sum(axis=1, keepdims=True)).astype(np.float32), half
