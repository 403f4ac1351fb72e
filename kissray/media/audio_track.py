"""A film's audio on its timeline: mono 16 kHz samples decoded forward on demand with PyAV.

Used by the decoder child (:mod:`kissray.media.child`); the log-mel of those samples is :mod:`kissray.audio`.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np

from kissray.audio import SAMPLE_RATE_HZ
from kissray.media.ranges import ReadPolicy
from kissray.media.source import Film, open_container
from kissray.media.timeline import MAX_FRAME_GAP_S

AUDIO_SEEK_MARGIN_S = 1.0  # seek this far before the first sample needed, then decode forward
AUDIO_FRAMES_PER_RUN = 64  # audio frames (~1.5 s of AAC at 44.1 kHz) resampled in one call
PTS_JITTER_SAMPLES = 2  # audio frame timestamps closer than this to "contiguous" are contiguous
AUDIO_MAX_OVERLAP_S = 1.0  # audio jumping back further than this is a timestamp discontinuity


class AudioTrack:
    """Mono 16 kHz samples on the film's timeline, decoded forward on demand with PyAV.

    ``read(a, b)`` returns timeline samples ``[a, b)`` (calls must not go backwards); samples the
    film does not have are zeros. If decoding fails, ``failed`` is set and the rest is silence.
    """

    def __init__(self, path: str | Film, stream_index: int, origin_s: float, first_sample: int):
        self._container = open_container(path, ReadPolicy.RANGES)
        self._stream = self._container.streams[stream_index]
        self._origin_s = origin_s  # absolute time of the film's t = 0
        self._buf = np.zeros(0, np.float32)
        self._buf_start = first_sample  # timeline sample index of _buf[0]
        self.failed = False
        self._exhausted = False
        self._decoded_any = False  # some audio came out of the decoder
        self._chunks = self._decode(first_sample)
        self._held: tuple[int | None, np.ndarray] | None = None  # a decoded chunk that starts after the last read
        self._shift = 0  # samples added to timestamps after discontinuities (kissray.media.timeline splices video alike)
        self._placed = False  # a chunk has been placed: later jumps are discontinuities, not the start

    def close(self) -> None:
        self._container.close()

    def _decode(self, first_sample: int) -> Iterator[tuple[int, np.ndarray]]:
        import av

        seek_s = self._origin_s + first_sample / SAMPLE_RATE_HZ - AUDIO_SEEK_MARGIN_S
        stream = self._stream
        # mono first (SPEC: the mean of the channels), then resample: swresample's own downmix
        # is not a mean, and it crashes on some 7.1 layouts
        resampler = av.AudioResampler(format="flt", layout="mono", rate=SAMPLE_RATE_HZ)
        if stream.start_time is not None and seek_s > float(stream.start_time * stream.time_base):
            self._container.seek(int(seek_s / stream.time_base), stream=stream)
        run: list = []  # back-to-back frames of one format, downmixed and resampled as one
        head, run_end_s = None, 0.0  # (pts, time_base, rate, format, layout) of the run's first frame; its end
        try:
            for frame in self._container.decode(stream):
                start_s = None if frame.pts is None else float(frame.pts * frame.time_base)
                kind = (frame.sample_rate, frame.format.name, len(frame.layout.channels))
                if run and (start_s is None or kind != head[2:] or len(run) >= AUDIO_FRAMES_PER_RUN
                            or abs(start_s - run_end_s) * SAMPLE_RATE_HZ > PTS_JITTER_SAMPLES):
                    yield from self._resample(resampler, run, *head[:3])
                    run = []
                if not run:
                    head = (frame.pts, frame.time_base, *kind)
                run.append(frame)
                run_end_s = (start_s or 0.0) + frame.samples / frame.sample_rate
        except av.FFmpegError:  # e.g. a truncated file: what decoded before the error is kept
            if run:
                yield from self._resample(resampler, run, *head[:3])
            raise
        if run:
            yield from self._resample(resampler, run, *head[:3])

    def _resample(self, resampler, run: list, pts, time_base, rate: int) -> Iterator[tuple[int, np.ndarray]]:
        """Downmix and resample a run of frames in one call: per-frame calls cost more than decoding AAC."""
        import av

        mono = av.AudioFrame.from_ndarray(_mean_of_channels(run)[None, :], format="flt", layout="mono")
        mono.sample_rate, mono.pts, mono.time_base = rate, pts, time_base
        for out in resampler.resample(mono):
            yield self._timeline_sample(out), out.to_ndarray()[0]

    def _timeline_sample(self, frame) -> int | None:
        if frame.pts is None:
            return None
        return int(round((float(frame.pts * frame.time_base) - self._origin_s) * SAMPLE_RATE_HZ))

    def read(self, a: int, b: int) -> np.ndarray:
        pending, end = [self._buf], self._buf_start + len(self._buf)
        while not (self.failed or self._exhausted) and end < b:
            try:
                at, samples = self._held or next(self._chunks)
            except StopIteration:  # the audio ended: the rest is zeros, still has_audio
                self._exhausted = True
                break
            except Exception:  # damaged audio: the rest of the film is silence
                # after audio decoded (a file cut short, a damaged tail) the audio stopped, as at
                # its end; audio that never decoded is no audio (has_audio = false)
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
