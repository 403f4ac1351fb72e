"""One film in, per-second probabilities and segments out: :func:`score_film`.

The batch job, the Serve app and evaluation all use the pieces here: :func:`predict_clips`
(clips -> probabilities) and :func:`segments_by_label` (probabilities -> segments).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Iterable, Iterator

import numpy as np

from kissray.errors import DecodeError
from kissray.media import DEFAULT_TIMEOUT_S, Clip, ClipReader
from kissray.segment import find_segments

DEFAULT_BATCH_SIZE = 32  # clips per forward pass


@dataclass(frozen=True)
class SegmentParams:
    """The segmenter's knobs (SPEC section 5); the paper's values are the defaults."""

    threshold: float = 0.5
    min_len: int = 10
    min_fraction: float = 0.7


@dataclass(frozen=True)
class Segment:
    label: str
    start_s: int  # first second of the segment
    end_s: int  # one past the last second (half-open)
    mean_p: float  # mean probability of the label over the segment

    @property
    def n_seconds(self) -> int:
        return self.end_s - self.start_s


class Segments(list):
    """A film's segments in label order, then by start. ``segments["kiss"]`` gives one label's."""

    def __getitem__(self, key):
        if isinstance(key, str):
            return [s for s in self if s.label == key]
        return super().__getitem__(key)

    def by_label(self, labels: list[str]) -> dict[str, list[Segment]]:
        return {label: self[label] for label in labels}


@dataclass
class FilmResult:
    title_id: str
    uri: str
    duration_s: float
    n_clips: int
    has_audio: bool
    labels: list[str]
    probs: np.ndarray  # float32[n_clips, n_labels]; row i is second [i, i+1), NaN where not scored
    segments: Segments = field(default_factory=Segments)  # also indexable by label
    error: str | None = None  # set when decoding stopped early (status "partial")

    @property
    def n_scored(self) -> int:
        return int(np.isfinite(self.probs).all(axis=1).sum())

    @property
    def status(self) -> str:
        return "ok" if self.error is None and self.n_scored == self.n_clips else "partial"


def title_id_for(uri: str) -> str:
    """The default title id: the file name without its extension."""
    name = os.path.basename(str(uri).rstrip("/").split("?")[0])
    return os.path.splitext(name)[0] or name


def batched(clips: Iterable[Clip], batch_size: int) -> Iterator[list[Clip]]:
    """Lists of up to ``batch_size`` clips. If decoding fails, the clips decoded before the
    failure are still delivered, then the :class:`DecodeError` is raised."""
    batch: list[Clip] = []
    try:
        for clip in clips:
            batch.append(clip)
            if len(batch) == batch_size:
                yield batch
                batch = []
    except DecodeError:
        if batch:
            yield batch
        raise
    if batch:
        yield batch


def predict_clips(model, clips: list[Clip], batch_size: int = DEFAULT_BATCH_SIZE) -> np.ndarray:
    """float32[len(clips), n_labels] for a list of clips, in one or more batched forward passes."""
    frames = np.stack([c.frames for c in clips]) if clips else np.zeros((0,), np.uint8)
    log_mel = np.stack([c.log_mel for c in clips]) if clips else np.zeros((0, 96, 64), np.float32)
    return model.predict_proba(frames, log_mel, batch_size=batch_size)


def segments_by_label(probs: np.ndarray, labels: list[str], params: SegmentParams = SegmentParams()) -> Segments:
    """Run the segmenter on each label's column; segments sorted by label order, then start."""
    segments = Segments()
    for j, label in enumerate(labels):
        column = probs[:, j]
        for s, e in find_segments(column, params.threshold, params.min_len, params.min_fraction):
            segments.append(Segment(label, int(s), int(e), float(np.nanmean(column[s:e]))))
    return segments


def score_film(uri: str, model, *, title_id: str | None = None, threshold: float = 0.5,
               min_len: int = 10, min_fraction: float = 0.7, batch_size: int = DEFAULT_BATCH_SIZE,
               timeout_s: float = DEFAULT_TIMEOUT_S, stills: str = "exact", progress=None) -> FilmResult:
    """Score every second of one film with ``model`` and segment the result.

    Raises :class:`MediaError` when the film cannot be opened. Seconds that cannot be decoded
    are NaN rows of ``probs`` (below any threshold for the segmenter); ``result.error`` says why
    and the status is ``partial``. ``stills``: one of ``media.STILLS_MODES`` (SPEC 2).
    """
    config = model.config
    with ClipReader(uri, frames_per_clip=config.frames_per_clip, size=config.image_size,
                    timeout_s=timeout_s, stills=stills) as reader:
        info = reader.info
        probs = np.full((info.n_clips, len(config.labels)), np.nan, np.float32)
        has_audio, error = info.has_audio, None
        try:
            for batch in batched(reader, batch_size):
                probs[[c.index for c in batch]] = predict_clips(model, batch, batch_size)
                has_audio = has_audio and all(c.has_audio for c in batch)
                if progress is not None:
                    progress(len(batch))
        except DecodeError as e:
            error = e.reason
    return FilmResult(
        title_id=title_id or title_id_for(uri), uri=str(uri), duration_s=info.duration_s,
        n_clips=info.n_clips, has_audio=has_audio, labels=list(config.labels), probs=probs,
        segments=segments_by_label(probs, config.labels, SegmentParams(threshold, min_len, min_fraction)),
        error=error)
