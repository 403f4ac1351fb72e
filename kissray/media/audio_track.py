"""A film's audio on its timeline: mono 16 kHz samples decoded forward on demand with PyAV.

Used by the decoder child (:mod:`kissray.media.child`); the log-mel of those samples is :mod:`kissray.audio`.
"""

from __future__ import annotations

import math
from fractions import Fraction
from typing import Callable, Iterator

import numpy as np

from kissray.audio import SAMPLE_RATE_HZ
from kissray.media.ranges import ReadPolicy
from kissray.media.resample import GridResampler
from kissray.media.source import Film, open_container
from kissray.media.timeline import MAX_FRAME_GAP_S

AUDIO_SEEK_MARGIN_S = 1.0  # seek this far before the first sample needed, then decode forward
AUDIO_FRAMES_PER_RUN = 64  # audio frames (~1.5 s of AAC at 44.1 kHz) resampled in one call
PTS_JITTER_SAMPLES = 2  # audio frame timestamps closer than this to "contiguous" are contiguous
AUDIO_MAX_OVERLAP_S = 1.0  # audio jumping back further than this is a timestamp discontinuity


class AudioTrack:
    """Mono 16 kHz samples on the film's timeline, decoded forward on demand with PyAV.

    ``read(a, b)`` returns timeline samples ``[a, b)`` (calls must not go backwards); samples the
    film does not have are zeros. What the film's own bytes cause is silence: a packet that does
    not decode is its stretch of silence (``on_damaged(from_s, to_s, reason)`` is told), data
    that cannot be demuxed any further ends the audio there, and audio that never decoded at all
    sets ``failed`` (the film has no usable audio). Anything else (the store failing under a read,
    a bug) is raised: it is not the film's, and silence would hide it (SPEC 3).

    Resampling is anchored to the stream's timestamps (:mod:`kissray.media.resample`), so a
    window that seeks into the film gets the samples of a decode of the whole film (SPEC 3).
    """

    def __init__(self, path: str | Film, stream_index: int, origin_s: float, first_sample: int,
                 on_damaged: Callable[[float, float, str], None] | None = None):
        self._container = open_container(path, ReadPolicy.RANGES)
        self._stream = self._container.streams[stream_index]
        self._origin_s = origin_s  # absolute time of the film's t = 0
        self._on_damaged = on_damaged or (lambda from_s, to_s, reason: None)
        self._buf = np.zeros(0, np.float32)
        self._buf_start = first_sample  # timeline sample index of _buf[0]
        self.failed = False
        self._exhausted = False
        self._decoded_any = False  # some audio came out of the decoder
        self._refused = False  # the decoder refused a packet
        self._chunks = self._decode(first_sample)
        self._held: tuple[int | None, np.ndarray] | None = None  # a decoded chunk that starts after the last read
        self._shift = 0  # samples added to timestamps after discontinuities (the timeline splices video alike)
        self._placed = False  # a chunk has been placed: later jumps are discontinuities, not the start
        self._resampler: GridResampler | None = None
        self._grid_offset = round(-origin_s * SAMPLE_RATE_HZ)  # output n of the grid is timeline sample n + this

    def close(self) -> None:
        self._container.close()

    def _decode(self, first_sample: int) -> Iterator[tuple[int, np.ndarray]]:
        import av

        seek_s = self._origin_s + first_sample / SAMPLE_RATE_HZ - AUDIO_SEEK_MARGIN_S
        stream = self._stream
        if stream.start_time is not None and seek_s > float(stream.start_time * stream.time_base):
            self._container.seek(int(seek_s / stream.time_base), stream=stream)
        run: list = []  # back-to-back frames of one format, downmixed and resampled as one
        head, run_end_s = None, 0.0  # (pts, time_base, rate, format, layout) of the run's first frame; its end
        try:  # mono first (SPEC: the mean of the channels), then resampled
            for frame in self._frames(stream):
                start_s = None if frame.pts is None else float(frame.pts * frame.time_base)
                kind = (frame.sample_rate, frame.format.name, len(frame.layout.channels))
                if run and (start_s is None or kind != head[2:] or len(run) >= AUDIO_FRAMES_PER_RUN
                            or abs(start_s - run_end_s) * SAMPLE_RATE_HZ > PTS_JITTER_SAMPLES):
                    yield from self._resample(run, *head[:3])
                    run = []
                if not run:
                    head = (frame.pts, frame.time_base, *kind)
                run.append(frame)
                run_end_s = (start_s or 0.0) + frame.samples / frame.sample_rate
        except av.FFmpegError:  # the data cannot be demuxed further (a file cut short): what decoded is kept
            if run:
                yield from self._resample(run, *head[:3])
            yield from self._flush()
            raise
        if run:
            yield from self._resample(run, *head[:3])
        yield from self._flush()

    def _frames(self, stream) -> Iterator:
        """The stream's decoded frames; packets the decoder refuses are skipped (their stretch is a
        gap, so silence) and reported, one stretch per run of them. Demuxing errors and a read
        callback's exception propagate."""
        import av

        damage: list = []  # [from_s, to_s, reason] of the refused packets since the last good one
        try:
            for packet in self._container.demux(stream):
                try:
                    frames = packet.decode()
                except av.FFmpegError as e:
                    self._refused, stretch = True, self._stretch(packet)
                    damage = [damage[0] if damage else stretch[0], stretch[1], _reason(e)]
                    continue
                if frames and damage:
                    self._on_damaged(*damage)
                    damage = []
                yield from frames
        finally:
            if damage:
                self._on_damaged(*damage)

    def _stretch(self, packet) -> tuple[float, float]:
        """A packet's seconds on the film's timeline (NaN when it has no timestamp)."""
        if packet.pts is None or packet.time_base is None:
            return math.nan, math.nan
        from_s = float(packet.pts * packet.time_base) - self._origin_s + self._shift / SAMPLE_RATE_HZ
        return from_s, from_s + float((packet.duration or 0) * packet.time_base)

    def _resample(self, run: list, pts, time_base, rate: int) -> Iterator[tuple[int, np.ndarray]]:
        """Downmix a run of frames and resample it in one call: per-frame calls cost more than decoding AAC."""
        if self._resampler is None or self._resampler.rate != rate:
            yield from self._flush()
            self._resampler = GridResampler(rate)
        first = self._input_index(pts, time_base, rate, run[0].samples)
        for n, samples in self._resampler.push(first, _mean_of_channels(run)):
            yield n + self._grid_offset, samples

    def _flush(self) -> Iterator[tuple[int, np.ndarray]]:
        for n, samples in self._resampler.flush() if self._resampler is not None else []:
            yield n + self._grid_offset, samples

    def _input_index(self, pts, time_base, rate: int, frame_samples: int) -> int:
        """The input sample index (stream time x rate) of a frame. Timestamps coarser than a sample
        (Matroska's milliseconds) are read as continuing the last frame where they agree within
        their precision, and the first frame after a seek is put on the frames' lattice from the
        stream's start (frames of one size: AAC's 1024 samples), as a decode from the start has it."""
        end = self._resampler.end
        if pts is None:
            return end if end is not None else 0
        m = round(Fraction(pts) * Fraction(time_base) * rate)
        tolerance = max(math.ceil(PTS_JITTER_SAMPLES * rate / SAMPLE_RATE_HZ), math.ceil(Fraction(time_base) * rate))
        if end is not None:
            return end if abs(m - end) <= tolerance else m
        start = self._stream.start_time
        zero = round(Fraction(start) * Fraction(self._stream.time_base) * rate) if start is not None else 0
        on_lattice = zero + round((m - zero) / frame_samples) * frame_samples if frame_samples else m
        return on_lattice if abs(on_lattice - m) <= tolerance else m

    def read(self, a: int, b: int) -> np.ndarray:
        import av

        pending, end = [self._buf], self._buf_start + len(self._buf)
        while not (self.failed or self._exhausted) and end < b:
            try:
                at, samples = self._held or next(self._chunks)
            except StopIteration:  # the audio ended: the rest is zeros (no audio if the decoder refused all)
                self._exhausted, self.failed = True, self._refused and not self._decoded_any
                break
            except av.FFmpegError:  # the film's data cannot be demuxed further: the rest is silence
                # after audio decoded (a file cut short, a damaged tail) the audio stopped, as at
                # its end; audio that never decoded is no audio (has_audio = false). Any other
                # error (the store, a read callback's) is not the film's: it propagates
                self._exhausted, self.failed = self._decoded_any, not self._decoded_any
                break
            self._decoded_any = True
            placed, used = self._place(at, end, b, samples)
            self._held = None if used else (at, samples)
            pending.append(placed)
            end += len(placed)
        self._buf = np.concatenate(pending) if len(pending) > 1 else self._buf
        out = np.zeros(b - a, np.float32)
        lo, hi = max(a, self._buf_start), min(b, end)
        if hi > lo:
            out[lo - a:hi - a] = self._buf[lo - self._buf_start:hi - self._buf_start]
        keep = max(0, a - self._buf_start)  # later reads never look before a
        self._buf, self._buf_start = self._buf[keep:], self._buf_start + keep
        return out

    def _place(self, at: int | None, end: int, b: int, samples: np.ndarray) -> tuple[np.ndarray, bool]:
        """What to append after the buffer's ``end`` for a chunk decoded at timeline sample ``at``,
        and whether the chunk is used up. Timestamps are evidence: after the first chunk, a jump
        back by more than AUDIO_MAX_OVERLAP_S or forward by more than MAX_FRAME_GAP_S is a
        discontinuity and the audio carries on where it was. Silence is never allocated past this
        read's end ``b`` (a chunk that starts later waits), whatever the timestamps say."""
        if at is None:
            return samples, True
        at += self._shift
        if self._placed and (at - end > MAX_FRAME_GAP_S * SAMPLE_RATE_HZ
                             or end - at > AUDIO_MAX_OVERLAP_S * SAMPLE_RATE_HZ):
            self._shift, at = self._shift + end - at, end
        if at - end > PTS_JITTER_SAMPLES and at >= b:  # starts after this read: silence up to b
            return np.zeros(max(0, b - end), np.float32), False
        if not self._placed and at + len(samples) <= end:  # before the first sample wanted: the seek's pre-roll
            return samples[:0], True
        self._placed = True
        if abs(at - end) <= PTS_JITTER_SAMPLES:
            return samples, True
        if at > end:  # a gap in the audio: silence
            return np.concatenate([np.zeros(at - end, np.float32), samples]), True
        return samples[end - at:], True  # overlaps what we have (decoded from before the seek target)


def _reason(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0][:200] if text else type(error).__name__


_PCM_SCALE = {"u8": 128.0, "s16": 32768.0, "s32": 2147483648.0, "s64": 9223372036854775808.0}


def _mean_of_channels(frames: list) -> np.ndarray:
    """float32[samples]: the mean of the channels of back-to-back audio frames of one format, in [-1, 1]."""
    fmt = frames[0].format.name.rstrip("p")
    channels = len(frames[0].layout.channels)
    if frames[0].format.is_planar:
        data = np.concatenate([f.to_ndarray() for f in frames], axis=1)
    else:
        data = np.concatenate([f.to_ndarray().reshape(-1, channels) for f in frames]).T
    data = data.astype(np.float32)
    if fmt == "u8":
        data -= 128.0
    if fmt in _PCM_SCALE:
        data /= _PCM_SCALE[fmt]
    return np.ascontiguousarray(data.mean(axis=0, dtype=np.float32))
