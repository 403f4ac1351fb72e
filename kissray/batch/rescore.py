"""``kissray rescore``: a new head over a scored library's stored embeddings, on Ray Data (SPEC 11).

    titles of DIR (driver: the head read once, its backbone fingerprint checked against the
                   embeddings', OUT locked, titles already ``ok`` in OUT with this head skipped)
      -> rescore_titles   CPU tasks, a few titles each: read the title's embeddings file (Parquet),
                          apply the head, assemble and segment the result exactly as ``score`` does
                          (:func:`kissray.score.assemble_film`), write its three files to OUT
      -> driver           progress and summary from one small row per title

Nothing is decoded and no backbone runs: a title costs one Parquet read, one small matrix product
and the segmenter. A title keeps its status from DIR (``partial`` and ``failed`` ones with the same
error; a ``failed`` one has no vectors), so OUT describes the same library with another head. The
same :class:`ResultStore` commits each title (titles file last), so a killed run resumes like
``score``; a fault of one title is that title's ``failed`` row.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from kissray.batch.stages import SUMMARY_SCHEMA, _no_scores, _summary
from kissray.batch.tables import ResultStore, TitleRecord, scores_table, segments_table
from kissray.embeddings import EmbeddingsDir, Head, check_fingerprint, read_head
from kissray.errors import UsageError, one_line
from kissray.names import file_name_for
from kissray.score import SegmentParams, assemble_film

TITLES_PER_TASK = 8  # titles per rescore task: a task is a few Parquet reads, not worth one task each
WRITTEN = "written"  # a summary row's ``staged``: a rescore task commits its titles itself ("": it could not)


@dataclass(frozen=True)
class RescoreSpec:
    """What every rescore task needs: where to read and write, the head, the segmenter."""

    source: str  # the score output holding embeddings/ and titles/
    out: str
    model_uri: str
    head: Head
    params: SegmentParams


def rescore_titles(batch: dict[str, np.ndarray], spec: RescoreSpec) -> pa.Table:
    """Ray Data ``map_batches`` fn: rescore each title row of ``batch``; one summary row each.
    Never raises for a title: what goes wrong is that title's ``failed`` row."""
    store, source = ResultStore(spec.out), EmbeddingsDir(spec.source)
    rows = []
    for i in range(len(batch["title_id"])):
        title = {k: v[i] for k, v in batch.items()}
        try:
            rows.append(_rescore_one(title, spec, store, source))
        except Exception as e:
            rows.append(_write_failed(title, f"cannot rescore the title: {one_line(e)}", spec, store))
    return pa.Table.from_pylist(rows, schema=SUMMARY_SCHEMA)


def _rescore_one(title: dict, spec: RescoreSpec, store: ResultStore, source: EmbeddingsDir) -> dict:
    title_id, error = str(title["title_id"]), _text(title["error"])
    if str(title["status"]) == "failed":  # nothing was scored: it fails again, for the same reason
        return _write_failed(title, error or "failed in the scored library", spec, store)
    path = source.path_of(file_name_for(title_id))
    if not source.fs.exists(path):
        return _write_failed(title, f"no embeddings in {spec.source} (scored without --embeddings)", spec, store)
    stored = source.read_file(path)
    check_fingerprint(stored.meta, spec.head.fingerprint, spec.model_uri, f"{spec.source} ({title_id})")
    duration_s = float(title["duration_s"])
    film = assemble_film(title_id, str(title["uri"]), spec.head.labels, int(title["n_clips"]),
                         None if math.isnan(duration_s) else duration_s, bool(title["has_audio"]),
                         zip(stored.seconds.tolist(), spec.head.probs(stored.vectors)), [error], spec.params)
    record = TitleRecord(title_id, film.uri, film.status, film.error, film.duration_s, film.n_clips, film.n_scored,
                         film.has_audio, spec.model_uri, stored.meta.stills)
    standing = store.write_title(record, scores_table(title_id, spec.head.labels, film.probs),
                                 segments_table(title_id, film.segments))
    return _summary(title_id, standing, None if standing == "ok" else film.error, film.n_clips, film.n_scored,
                    staged=WRITTEN)


def _write_failed(title: dict, error: str, spec: RescoreSpec, store: ResultStore) -> dict:
    title_id, labels = str(title["title_id"]), spec.head.labels
    n_clips = int(title["n_clips"]) if title["n_clips"] is not None else 0
    record = TitleRecord(title_id, str(title["uri"]), "failed", error, None, n_clips, 0, False, spec.model_uri,
                         str(title["stills"]))
    try:
        standing = store.write_title(record, scores_table(title_id, labels, _no_scores(labels)),
                                     segments_table(title_id, []))
    except Exception as e:  # the driver writes it
        return _summary(title_id, "failed", f"{error}; cannot write here: {one_line(e)}", n_clips, 0, staged="")
    return _summary(title_id, standing, None if standing == "ok" else error, n_clips, 0, staged=WRITTEN)


def _text(value) -> str | None:
    return None if value is None or (isinstance(value, float) and math.isnan(value)) or value == "" else str(value)


# ---------------------------------------------------------------- the driver


def open_rescore(source: str, model_uri: str, out: str, params: SegmentParams) -> RescoreSpec:
    """Check the request, writing nothing: the embeddings exist, the head's backbones made them
    (else :class:`CheckpointError`, exit 2, both fingerprints named), OUT is not DIR."""
    meta = EmbeddingsDir(source).meta()  # UsageError when there are none
    head = read_head(model_uri)
    check_fingerprint(meta, head.fingerprint, model_uri, source)
    if str(out).rstrip("/") == str(source).rstrip("/"):
        raise UsageError("--out must differ from --embeddings (the scored library is read, never rewritten)")
    return RescoreSpec(str(source), str(out), str(model_uri), head, params)


def titles_to_rescore(spec: RescoreSpec) -> tuple[list[dict], int]:
    """Make OUT (the caller holds its lock) and list DIR's titles not yet ``ok`` in OUT with this
    head; returns them and how many titles DIR has."""
    titles = ResultStore(spec.source).read("titles")
    if titles is None or titles.num_rows == 0:
        raise UsageError(f"--embeddings {spec.source}: no titles table (not a kissray score output)")
    store = ResultStore(spec.out)
    store.prepare()
    done = store.finished_titles(spec.model_uri)
    todo = [{k: row[k] for k in ("title_id", "uri", "status", "error", "duration_s", "n_clips", "has_audio",
                                 "stills")}
            for row in titles.to_pylist() if row["title_id"] not in done]
    for row in todo:  # no nulls: Ray Data's numpy batches would make their columns objects
        row["duration_s"] = math.nan if row["duration_s"] is None else float(row["duration_s"])
        row["n_clips"] = int(row["n_clips"] or 0)
        row["error"] = row["error"] or ""
        row["stills"] = row["stills"] or "exact"
    return todo, titles.num_rows


def rescore_library(source: str, model_uri: str, out: str, params: SegmentParams = SegmentParams(),
                    progress: bool = True):
    """``kissray rescore`` as a function (Ray must be initialised): returns a LibrarySummary."""
    from kissray.pipeline import out_lock

    spec = open_rescore(source, model_uri, out, params)
    with out_lock(out):
        todo, n_titles = titles_to_rescore(spec)
        return run_rescore(spec, todo, n_titles, progress)


def run_rescore(spec: RescoreSpec, todo: list[dict], n_titles: int, progress: bool = True):
    """Rescore ``todo`` on the current Ray; returns a :class:`kissray.pipeline.LibrarySummary`."""
    import ray

    from kissray.batch.progress import Progress
    from kissray.pipeline import LibrarySummary

    started = time.monotonic()
    summary = LibrarySummary(n_titles=n_titles, n_skipped=n_titles - len(todo))
    if todo:
        if progress:
            print(f"kissray rescore: {len(todo)} title(s) from {spec.source}'s embeddings", file=sys.stderr)
        dataset = (ray.data.from_items(todo, override_num_blocks=max(1, math.ceil(len(todo) / TITLES_PER_TASK)))
                   .map_batches(rescore_titles, fn_kwargs={"spec": spec}, batch_size=TITLES_PER_TASK,
                                batch_format="numpy", num_cpus=1))  # a lost task: Ray Data retries it
        by_id = {row["title_id"]: row for row in todo}
        with Progress(len(todo), progress) as bar:
            for batch in dataset.iter_batches(batch_size=None, batch_format="pyarrow"):
                for row in batch.to_pylist():
                    if not row["staged"]:  # the task could not write the title's row: try from here
                        _write_failed(by_id[row["title_id"]], row["error"], spec, ResultStore(spec.out))
                    summary.add(row["status"], row["n_scored"], row["title_id"], row["error"])
                    bar.update(clips=row["n_scored"], film_s=row["n_clips"], opened=1, status=row["status"])
    summary.wall_s = time.monotonic() - started
    return summary
