"""One way to score (SPEC section 3): the one :class:`Scorer` and the one result assembly.

A film's path: :class:`kissray.media.ClipReader` decodes clips (a child process) -> :class:`Scorer`
(the checkpoint on a device, with the one precision policy of :func:`kissray.model.load_model`,
batched forward passes) -> :func:`assemble_film` (per-second ``(second, p)`` pieces and the
decoder's outcome -> NaN for unscored seconds, status, error, has_audio, segments) ->
:class:`FilmResult`. :func:`score_film` is that path in one process; the Ray job
(:mod:`kissray.batch.stages`), the Serve app and ``kissray eval`` use the same two pieces.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Iterable, Iterator

import numpy as np

from kissray.defaults import BATCH_SIZE, MIN_FRACTION, MIN_LEN_S, THRESHOLD
from kissray.errors import DecodeError
from kissray.media import DEFAULT_TIMEOUT_S, Clip, ClipReader
from kissray.names import title_id_for
from kissray.segment import find_segments

DEFAULT_BATCH_SIZE = BATCH_SIZE


@dataclass(frozen=True)
class SegmentParams:
    """The segmenter's knobs (SPEC section 5); the paper's values are the defaults."""

    threshold: float = THRESHOLD
    min_len: int = MIN_LEN_S
    min_fraction: float = MIN_FRACTION


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
        """ok; partial (some seconds scored); failed (none)."""
        if self.error is None and self.n_scored == self.n_clips:
            return "ok"
        return "partial" if self.n_scored else "failed"


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


class Scorer:
    """The one scorer: a checkpoint loaded once on a device (the precision policy is
    :func:`kissray.model.load_model`'s: fp16 + channels_last on CUDA, fp32 + channels_last on CPU),
    scoring clips in batches of ``batch_size``. ``model``: a checkpoint URI or a loaded model."""

    def __init__(self, model, *, device: str | None = None, batch_size: int = DEFAULT_BATCH_SIZE,
                 num_threads: int | None = None):
        import torch

        from kissray.model import load_model

        if num_threads:  # Ray pins an actor to its CPU request; a CPU model may use more
            torch.set_num_threads(num_threads)
        if isinstance(model, (str, os.PathLike)):
            model = load_model(str(model), device=device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model, self.batch_size = model, int(batch_size)

    @property
    def config(self):
        return self.model.config

    @property
    def labels(self) -> list[str]:
        return list(self.model.config.labels)

    def predict(self, frames: np.ndarray, log_mel: np.ndarray) -> np.ndarray:
        """float32[n, n_labels] for stills uint8[n, K, S, S, 3] and log-mels float32[n, 96, 64]."""
        return self.model.predict_proba(frames, log_mel, batch_size=self.batch_size)

    def predict_and_embed(self, frames: np.ndarray, log_mel: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`predict` plus the head's input vectors (float16[n, feature_dim]) of the same pass."""
        return self.model.predict_and_embed(frames, log_mel, batch_size=self.batch_size)

    def predict_clips(self, clips: list[Clip]) -> np.ndarray:
        frames = np.stack([c.frames for c in clips]) if clips else np.zeros((0,), np.uint8)
        log_mel = np.stack([c.log_mel for c in clips]) if clips else np.zeros((0, 96, 64), np.float32)
        return self.predict(frames, log_mel)


def assemble_film(title_id: str, uri: str, labels: list[str], n_clips: int, duration_s: float, has_audio: bool,
                  pieces: Iterable[tuple[int, np.ndarray]], errors: Iterable[str] = (),
                  params: SegmentParams = SegmentParams()) -> FilmResult:
    """The one result assembly: ``(second, p[n_labels])`` pieces in any order -> one row per
    second (NaN where none came), the first error of the decoder / classifier (or how many
    seconds are missing), and the segments. Status follows (:attr:`FilmResult.status`)."""
    probs = np.full((max(0, int(n_clips)), len(labels)), np.nan, np.float32)
    for second, p in pieces:
        if 0 <= second < len(probs):
            probs[second] = p
    error = next((e for e in errors if e), None)
    n_scored = int(np.isfinite(probs).all(axis=1).sum())
    if error is None and n_scored < len(probs):
        error = f"{len(probs) - n_scored} second(s) were not scored"
    return FilmResult(title_id=title_id, uri=str(uri), duration_s=duration_s, n_clips=len(probs),
                      has_audio=has_audio, labels=list(labels), probs=probs,
                      segments=segments_by_label(probs, labels, params), error=error)


def segments_by_label(probs: np.ndarray, labels: list[str], params: SegmentParams = SegmentParams()) -> Segments:
    """Run the segmenter on each label's column; segments sorted by label order, then start."""
    segments = Segments()
    for j, label in enumerate(labels):
        column = probs[:, j]
        for s, e in find_segments(column, params.threshold, params.min_len, params.min_fraction):
            segments.append(Segment(label, int(s), int(e), float(np.nanmean(column[s:e]))))
    return segments


def score_film(uri: str, model, *, title_id: str | None = None, threshold: float = THRESHOLD,
               min_len: int = MIN_LEN_S, min_fraction: float = MIN_FRACTION, batch_size: int = DEFAULT_BATCH_SIZE,
               timeout_s: float = DEFAULT_TIMEOUT_S, stills: str = "exact", progress=None) -> FilmResult:
    """Score every second of one film with ``model`` (a loaded model, a :class:`Scorer` or a
    checkpoint URI) and segment the result.

    Raises :class:`MediaError` when the film cannot be opened. Seconds that cannot be decoded
    are NaN rows of ``probs`` (below any threshold for the segmenter); ``result.error`` says why
    and the status is ``partial``. ``stills``: one of ``media.STILLS_MODES`` (SPEC 2).
    """
    scorer = model if isinstance(model, Scorer) else Scorer(model, batch_size=batch_size)
    config = scorer.config
    pieces, errors = [], []
    with ClipReader(uri, frames_per_clip=config.frames_per_clip, size=config.image_size,
                    timeout_s=timeout_s, stills=stills) as reader:
        info, has_audio = reader.info, reader.info.has_audio
        try:
            for batch in batched(reader, scorer.batch_size):
                pieces += zip((c.index for c in batch), scorer.predict_clips(batch))
                has_audio = has_audio and all(c.has_audio for c in batch)
                if progress is not None:
                    progress(len(batch))
        except DecodeError as e:
            errors.append(e.reason)
    return assemble_film(title_id or title_id_for(uri), uri, scorer.labels, info.n_clips, info.duration_s, has_audio,
                         pieces, errors, SegmentParams(threshold, min_len, min_fraction))
