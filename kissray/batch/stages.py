"""The steps of the library job, as plain functions and callable classes for Ray Data.

titles -> :func:`probe_windows` (one row per window of a film) -> :func:`decode_window` (clip rows
plus one *trailer* row per window saying how it ended) -> :class:`Classifier` (probabilities) ->
:class:`TitleWriter` (per-title reduce: segments, three Parquet files, one summary row).
Nothing here raises for a bad film: errors travel as the ``error`` column of trailer rows.
Only :class:`Classifier` touches the model; none of this imports Ray.
"""

from __future__ import annotations

import hashlib
import math
import pickle
import uuid
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np
import pyarrow as pa

from kissray.audio import SILENCE_LOG_MEL
from kissray.batch.faults import NO_FAULTS, FaultPlan
from kissray.batch.ledger import MAX_DEATHS, NO_LEDGER, DeathLedger, died_error
from kissray.batch.tables import ResultStore, TitleRecord, scores_table, segments_table
from kissray.embeddings import EmbeddingsMeta, embeddings_table
from kissray.errors import StorageError, one_line
from kissray.media import ClipReader, probe
from kissray.media.source import is_remote
from kissray.score import SegmentParams, assemble_film
from kissray.uris import is_local

CLIPS_PER_BLOCK = 32  # clips per output batch of a decode task (bounds block size)
MIN_WINDOW_S = 30  # a film is not cut finer than this to fill idle CPUs
WHOLE_FILM = -1  # a window's stop when the film is decoded in one piece (its length learnt on opening)
# What the writer sends back to the driver: one "title" row per finished title, and one "progress"
# row per batch (clips scored, seconds of film newly known) so the driver's bar moves within titles.
SUMMARY_SCHEMA = pa.schema([
    ("kind", pa.string()), ("title_id", pa.string()), ("status", pa.string()), ("error", pa.string()),
    ("n_clips", pa.int32()), ("n_scored", pa.int32()),
    ("clips", pa.int64()), ("film_s", pa.int64()), ("opened", pa.int32()), ("staged", pa.string()),
])


@dataclass(frozen=True)
class DecodeSpec:
    """How clips are cut: from the checkpoint's config, plus the job's window and timeout."""

    frames_per_clip: int
    size: int
    window_s: int
    timeout_s: float
    split: bool = True  # cut local films into windows (probing each first); else one decoder per film
    stills: str = "exact"  # exact | keyframe (SPEC section 2)
    decode_threads: int = 1  # decoder threads per window
    decode_slots: int = 1  # decode tasks the cluster runs at once: a short film is cut into about this many windows
    faults: FaultPlan = NO_FAULTS  # tests only
    ledger: DeathLedger = NO_LEDGER  # the run's record of work that killed its process


def probe_windows(title: dict, spec: DecodeSpec) -> list[dict]:
    """The windows ``[start, stop)`` of one film, or a single failed window when it cannot be opened.

    A remote film (s3://, gs://, ...) is windowed like a local one: each window reads only its
    byte ranges (:mod:`kissray.media.source`), or a copy staged once per node. A film in a process's
    memory (``memory://``) is one window: no other process can read it. So is every film when
    ``spec.split`` is off (a library with enough titles to keep every decoder busy): the probe
    would cost a decoder start-up per title and buy no parallelism (benchmarks/NOTES.md).
    """
    base = {"title_id": title["title_id"], "uri": title["uri"], "n_clips": 0, "duration_s": math.nan,
            "has_audio": False}
    if not spec.split or not (is_local(title["uri"]) or is_remote(title["uri"])):
        return [{**base, "start": 0, "stop": WHOLE_FILM, "n_windows": 1, "error": ""}]
    try:
        spec.faults.check("probe", title["title_id"])
        info = probe(title["uri"], timeout_s=spec.timeout_s)
        spec.faults.check("windows", title["title_id"])
        window_s = window_length(info.n_clips, spec)
        starts = range(0, info.n_clips, window_s)
        return [{**base, "start": a, "stop": min(a + window_s, info.n_clips), "n_windows": len(starts),
                 "n_clips": info.n_clips, "duration_s": info.duration_s, "has_audio": info.has_audio,
                 "error": ""} for a in starts]
    except StorageError:  # the store failed (after the reader's own retries): not the film's, retried
        raise
    except Exception as e:  # MediaError, or anything unexpected: this title fails, not the job
        return [{**base, "start": 0, "stop": 0, "n_windows": 1, "error": one_line(e)}]


def window_length(n_clips: int, spec: DecodeSpec) -> int:
    """Seconds per window: the film spread over the decode slots, at most ``spec.window_s``, at
    least :data:`MIN_WINDOW_S` (each window opens the film and decodes from a keyframe)."""
    return max(1, min(spec.window_s, max(MIN_WINDOW_S, math.ceil(n_clips / max(1, spec.decode_slots)))))


def decode_window(windows: dict[str, np.ndarray], spec: DecodeSpec) -> Iterator[dict[str, np.ndarray]]:
    """Ray Data ``map_batches`` fn: clip rows of each window, then the window's trailer row.

    Whatever goes wrong (the film, the decoder, building the rows) ends the window's trailer
    with a one-line error; nothing raises out of here."""
    for i in range(len(windows["title_id"])):
        window = {k: v[i] for k, v in windows.items()}
        title_id = str(window["title_id"])
        key = f"decode:{title_id}:{int(window['start'])}"
        deaths, condemned = spec.ledger.begin(key, [title_id])
        if deaths >= MAX_DEATHS or condemned:  # this title kills its decoder: report it, do not retry
            spec.ledger.condemn(title_id)
            yield _safe_rows(window, [], spec, trailer=(died_error(max(deaths, MAX_DEATHS)), 0))
            continue
        spec.faults.crash("decode", title_id)
        if str(window["error"]):  # the film failed to open: only its trailer goes on
            spec.ledger.end(key)
            yield _safe_rows(window, [], spec, trailer=(str(window["error"]), 0))
            continue
        clips, n_delivered, error = [], 0, ""
        try:
            for clip in _window_clips(window, spec):
                clips.append(clip)
                n_delivered += 1
                if len(clips) == CLIPS_PER_BLOCK:
                    yield _rows(window, clips, spec)
                    clips = []
        except StorageError:  # the store failed (after the reader's own retries): the window fails and
            raise  # is retried (SPEC 3), never scored on what was read so far
        except Exception as e:  # a bad window, a hung decoder, rows that cannot be built: this window only
            error = one_line(e) or "decode failed"
        if not error and n_delivered < int(window["stop"]) - int(window["start"]):
            error = f"decoder stopped after {n_delivered} of the window's clips"
        spec.ledger.end(key)
        yield _safe_rows(window, clips, spec, trailer=(error, n_delivered))


def _window_clips(window: dict, spec: DecodeSpec) -> Iterator:
    """The window's clips; a film that was not probed fills in ``window``'s length from its decoder."""
    spec.faults.check("decode", str(window["title_id"]))
    stop = int(window["stop"])
    with ClipReader(str(window["uri"]), int(window["start"]), None if stop == WHOLE_FILM else stop,
                    frames_per_clip=spec.frames_per_clip, size=spec.size,
                    timeout_s=spec.timeout_s, decode_threads=spec.decode_threads, stills=spec.stills) as reader:
        if stop == WHOLE_FILM:  # not probed: the film describes itself now
            info = reader.info
            window.update(stop=info.n_clips, n_clips=info.n_clips, duration_s=info.duration_s,
                          has_audio=info.has_audio)
        spec.faults.check("rows", str(window["title_id"]))
        yield from reader


def _safe_rows(window: dict, clips: list, spec: DecodeSpec, trailer: tuple[str, int]) -> dict[str, np.ndarray]:
    """The window's last rows; if even they cannot be built, its trailer alone, carrying why."""
    try:
        return _rows(window, clips, spec, trailer=trailer)
    except Exception as e:
        error = trailer[0] or f"cannot build the window's rows: {one_line(e)}"
        bare = {**window, "n_clips": 0, "duration_s": math.nan, "has_audio": False}
        return _rows(bare, [], spec, trailer=(error, 0))


def _rows(window: dict, clips: list, spec: DecodeSpec,
          trailer: tuple[str, int] | None = None) -> dict[str, np.ndarray]:
    """Clip rows, plus the window's trailer row (error, clips delivered) when given.
    Columns have fixed shapes so that every block has one schema."""
    n = len(clips) + (trailer is not None)
    frames = np.zeros((n, spec.frames_per_clip, spec.size, spec.size, 3), np.uint8)
    log_mel = np.array(np.broadcast_to(SILENCE_LOG_MEL, (n, 96, 64)), np.float32)
    for j, clip in enumerate(clips):
        frames[j], log_mel[j] = clip.frames, clip.log_mel
    error, n_delivered = trailer if trailer is not None else ("", 0)

    def column(value, dtype):
        return np.full(n, value, dtype=dtype)

    return {
        "title_id": column(str(window["title_id"]), object), "uri": column(str(window["uri"]), object),
        "second": np.asarray([c.index for c in clips] + [int(window["start"])] * (n - len(clips)), np.int32),
        "frames": frames, "log_mel": log_mel,
        "clip_has_audio": np.asarray([c.has_audio for c in clips] + [True] * (n - len(clips)), bool),
        "trailer": np.arange(n) >= len(clips), "error": column(error, object),
        "n_delivered": column(n_delivered, np.int32), "n_windows": column(int(window["n_windows"]), np.int32),
        "n_clips": column(int(window["n_clips"]), np.int32),
        "duration_s": column(float(window["duration_s"]), np.float64),
        "has_audio": column(bool(window["has_audio"]), bool),
    }


class Classifier:
    """Ray Data actor around the one :class:`kissray.score.Scorer` (checkpoint loaded once per
    actor): adds ``p`` (float32[n_labels]) to clip rows. Trailer rows pass through with ``p`` = NaN;
    frames and log-mels are dropped from the output. A batch whose forward pass fails is redone
    title by title, so a fault (a poisoned input, an out-of-memory) costs only the titles it
    touches: their rows carry the error and ``p`` = NaN. A batch that killed its process before
    (the run's :class:`DeathLedger` says so) is redone title by title too, each title on its own,
    so a title that keeps killing its process is found, and failed, alone.
    """

    embeddings = False  # also emit each clip's vector (``score --embeddings``)

    def __init__(self, model_uri: str, batch_size: int = 32, device: str | None = None,
                 num_threads: int | None = None, faults: FaultPlan = NO_FAULTS, ledger: DeathLedger = NO_LEDGER,
                 embeddings: bool = False):
        from kissray.score import Scorer

        self.scorer = Scorer(model_uri, device=device, batch_size=batch_size, num_threads=num_threads)
        self.faults, self.ledger, self.embeddings = faults, ledger, embeddings

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        clips = ~batch["trailer"]
        titles = batch["title_id"].astype(str)
        p = np.full((len(clips), len(self.scorer.labels)), np.nan, np.float32)
        self._vectors = np.zeros((len(clips), self.scorer.config.feature_dim if self.embeddings else 0), np.float16)
        errors = np.asarray(batch["error"], object).copy()
        for title_id in np.unique(titles):
            self.faults.hold("classifier", title_id)
        if clips.any():
            key = "classify:" + hashlib.sha1(pickle.dumps((titles[clips].tolist(),
                                                           batch["second"][clips].tolist()))).hexdigest()
            deaths, condemned = self.ledger.begin(key, sorted(set(titles[clips])))
            for title_id in condemned:
                errors[clips & (titles == title_id)] = f"classifier: {died_error(MAX_DEATHS)}"
            todo = clips & ~np.isin(titles, condemned)
            if deaths == 0:
                self._predict_batch(batch, todo, titles, p, errors)
            else:
                for title_id in np.unique(titles[todo]):
                    self._predict_alone(batch, todo & (titles == title_id), f"{key}:{title_id}", title_id, p, errors)
            self.ledger.end(key)
        out = {k: v for k, v in batch.items() if k not in ("frames", "log_mel")}
        out["p"], out["error"] = p, errors
        if self.embeddings:  # the head's input, from the same forward pass (SPEC section 11)
            out["embedding"] = self._vectors
        return out

    def _predict_batch(self, batch, rows: np.ndarray, titles: np.ndarray, p: np.ndarray, errors: np.ndarray) -> None:
        """One forward pass over ``rows``; if it raises, title by title (a fault costs only its title)."""
        for title_id in np.unique(titles[rows]):
            self.faults.crash("classifier", title_id)
        try:
            for title_id in np.unique(titles[rows]):
                self.faults.check("classifier", title_id)
            p[rows] = self._predict(batch, rows)
        except Exception:
            for title_id in np.unique(titles[rows]):
                mine = rows & (titles == title_id)
                try:
                    self.faults.check("classifier", title_id)
                    p[mine] = self._predict(batch, mine)
                except Exception as e:
                    errors[mine] = f"classifier: {one_line(e)}"

    def _predict_alone(self, batch, rows: np.ndarray, key: str, title_id: str, p: np.ndarray,
                       errors: np.ndarray) -> None:
        """One title's rows of a batch that killed its process before: once they have killed it
        :data:`MAX_DEATHS` times on their own, they carry that error instead."""
        deaths, _ = self.ledger.begin(key)
        if deaths >= MAX_DEATHS:
            self.ledger.condemn(title_id)
            errors[rows] = f"classifier: {died_error(deaths)}"
            return
        self.faults.crash("classifier", title_id)
        try:
            self.faults.check("classifier", title_id)
            p[rows] = self._predict(batch, rows)
        except Exception as e:
            errors[rows] = f"classifier: {one_line(e)}"
        self.ledger.end(key)

    def _predict(self, batch: dict[str, np.ndarray], rows: np.ndarray) -> np.ndarray:
        """p of ``rows``; with embeddings, their vectors go into this batch's ``_vectors``."""
        frames, log_mel = batch["frames"][rows], batch["log_mel"][rows]
        if not self.embeddings:
            return self.scorer.predict(frames, log_mel)
        p, self._vectors[rows] = self.scorer.predict_and_embed(frames, log_mel)
        return p


@dataclass
class _OpenTitle:
    """What has arrived so far for one title."""

    probs: dict[int, np.ndarray] = field(default_factory=dict)  # second -> p[n_labels]
    vectors: dict[int, np.ndarray] = field(default_factory=dict)  # second -> embedding (with --embeddings)
    trailers: dict[int, dict] = field(default_factory=dict)  # window start -> its trailer row
    clips_have_audio: bool = True
    clip_error: str = ""  # the first error carried by a clip row (e.g. the classifier's)

    def complete(self, n_windows: int) -> bool:
        """Every window has reported, and every clip it delivered has arrived: blocks of one
        window pass through different model actors, so a trailer can overtake its clips."""
        return (len(self.trailers) == n_windows
                and len(self.probs) >= sum(int(t["n_delivered"]) for t in self.trailers.values()))


class TitleWriter:
    """Ray Data actor (one): the per-title reduce. Collects a title's rows as they stream in; once
    all of them are in, segments the scores, stages the title's three files (hidden names of this
    run and ``attempt``) and emits one summary row; the driver commits them. It holds only the
    titles still in flight (a few floats per scored second), and a title is staged as soon as it
    is complete, not at the end of the job. A fault while finishing a title (segmenter, write)
    makes that title ``failed``; the summary row says whether its files could be staged (if not,
    the driver writes its ``failed`` row)."""

    def __init__(self, out: str, labels: list[str], model_uri: str, params: SegmentParams,
                 faults: FaultPlan = NO_FAULTS, stills: str = "exact", run_id: str = "", attempt: int = 1,
                 embeddings: EmbeddingsMeta | None = None):
        self.store = ResultStore(out, run_id, embeddings=embeddings is not None)
        self.store.make_folders()  # the driver made them too, but maybe on another machine's disk
        self.labels, self.model_uri, self.params, self.faults = list(labels), model_uri, params, faults
        self.stills, self.embeddings = stills, embeddings
        self.tag = f"a{attempt}-{uuid.uuid4().hex[:8]}"  # this process's staged files: a restarted writer has another
        self.open: dict[str, _OpenTitle] = {}

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        finished, n_clips, film_s, opened = [], 0, 0, 0
        held = set(self.open)  # titles with rows from earlier batches
        for i in range(len(batch["title_id"])):
            title_id = str(batch["title_id"][i])
            if title_id in held:
                self.faults.hold("writer", title_id)  # a test may kill it here, holding earlier rows
                self.faults.crash("writer", title_id)  # dies holding the title's earlier rows
            if title_id not in self.open:
                film_s, opened = film_s + int(batch["n_clips"][i]), opened + 1
            state = self.open.setdefault(title_id, _OpenTitle())
            if batch["trailer"][i]:  # keyed by window: a retried task's repeat is harmless
                state.trailers[int(batch["second"][i])] = {k: batch[k][i] for k in batch if k != "p"}
            else:
                n_clips += 1
                state.probs[int(batch["second"][i])] = batch["p"][i]
                if self.embeddings is not None:
                    state.vectors[int(batch["second"][i])] = batch["embedding"][i]
                state.clips_have_audio &= bool(batch["clip_has_audio"][i])
                state.clip_error = state.clip_error or str(batch["error"][i])
            if state.complete(int(batch["n_windows"][i])):
                finished.append(self._finish_safely(title_id, self.open.pop(title_id)))
        progress = {"kind": "progress", "title_id": "", "clips": n_clips, "film_s": film_s,
                    "opened": opened, "staged": ""}
        return pa.Table.from_pylist(finished + [progress], schema=SUMMARY_SCHEMA)

    def _finish_safely(self, title_id: str, state: _OpenTitle) -> dict:
        try:
            return self.finish(title_id, state)
        except Exception as e:  # segmenter or write: the title fails, the job goes on
            first = state.trailers[min(state.trailers)]
            error = f"cannot finish the title: {one_line(e)}"
            record = TitleRecord(title_id, str(first["uri"]), "failed", error, None, 0, 0, False, self.model_uri,
                                 self.stills)
            try:
                self._stage(record, scores_table(title_id, self.labels, _no_scores(self.labels)),
                            segments_table(title_id, []))
            except Exception as write_error:  # the driver writes the row
                return _summary(title_id, "failed", f"{error}; cannot write here: {one_line(write_error)}", 0, 0,
                                staged="")
            return _summary(title_id, "failed", error, 0, 0, staged=self.tag)

    def finish(self, title_id: str, state: _OpenTitle) -> dict:
        """Write one complete title; returns its summary row. The result is assembled exactly as
        :func:`kissray.score.score_film` assembles it (one row per second, NaN where not scored)."""
        first = state.trailers[min(state.trailers)]
        window_errors = [str(t["error"]) for _, t in sorted(state.trailers.items())]
        duration_s = float(first["duration_s"])
        self.faults.check("segmenter", title_id)
        film = assemble_film(title_id, str(first["uri"]), self.labels, int(first["n_clips"]),
                             None if math.isnan(duration_s) else duration_s,
                             bool(first["has_audio"]) and state.clips_have_audio, state.probs.items(),
                             [*window_errors, state.clip_error], self.params)
        record = TitleRecord(title_id, film.uri, film.status, film.error, film.duration_s, film.n_clips,
                             film.n_scored, film.has_audio, self.model_uri, self.stills)
        self.faults.check("write", title_id)
        self._stage(record, scores_table(title_id, self.labels, film.probs), segments_table(title_id, film.segments),
                    self._embeddings(title_id, film, state.vectors))
        return _summary(title_id, film.status, film.error, film.n_clips, film.n_scored, staged=self.tag)

    def _stage(self, record: TitleRecord, scores: pa.Table, segments: pa.Table,
               embeddings: pa.Table | None = None) -> None:
        args = (record, scores, segments, self.tag, embeddings)
        if self.faults.linger(record.title_id, pickle.dumps((self.store.stage_title, args))):
            return  # tests only: a late writer took the call over and this process ended
        self.store.stage_title(*args)

    def _embeddings(self, title_id: str, film, vectors: dict[int, np.ndarray]) -> pa.Table | None:
        """The title's embeddings table: one row per scored second (none without --embeddings)."""
        if self.embeddings is None:
            return None
        seconds = np.flatnonzero(np.isfinite(film.probs).all(axis=1)).astype(np.int32)
        rows = [vectors[int(s)] for s in seconds]
        stacked = np.stack(rows) if rows else np.zeros((0, self.embeddings.feature_dim), np.float16)
        return embeddings_table(title_id, seconds, stacked, self.embeddings)


def _no_scores(labels: list[str]) -> np.ndarray:
    return np.zeros((0, len(labels)), np.float32)


def _summary(title_id: str, status: str, error: str | None, n_clips: int, n_scored: int, staged: str) -> dict:
    """A title's summary row; ``staged``: the tag of its staged files ("" when none could be written)."""
    return {"kind": "title", "title_id": title_id, "status": status, "error": error, "n_clips": n_clips,
            "n_scored": n_scored, "clips": 0, "film_s": 0, "opened": 0, "staged": staged}
