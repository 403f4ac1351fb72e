"""The three output tables of ``kissray score`` (SPEC section 7) and how they are stored.

Each title is three Parquet files, ``OUT/{scores,segments,titles}/<name>.parquet``, where
``<name>`` is the title id escaped to a safe file name (:func:`kissray.names.file_name_for`). Every file is
written to a hidden temporary name and renamed into place, scores and segments before titles:
a ``titles`` file is the commit record, so a killed run never leaves a half-written title that a
rerun would skip. Readers (pandas / pyarrow datasets) ignore the hidden temporary files.

Temporary names carry the run's id (``.tmp-<run>-...``): a run removes its own, and those of
other runs only once they are older than a lock's takeover age (a dead run's leftovers), never a
file that another live run may be writing. The library job's writer only *stages* a title
(:meth:`ResultStore.stage_title`, names that also carry the attempt and the writer process); the driver, the one process
that knows which attempt is current, *commits* it (:meth:`ResultStore.commit_staged`). So a
writer that finishes after its attempt ended can leave a hidden file behind, never a result.
"""

from __future__ import annotations

import posixpath
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone

import numpy as np
import pyarrow as pa

from kissray.errors import JobError
from kissray.names import file_name_for
from kissray.score import Segment
from kissray.uris import make_dirs

TABLES = ("scores", "segments", "titles")
EMBEDDINGS = "embeddings"  # the fourth table, with ``score --embeddings`` (kissray.embeddings)
TEMP_PREFIX = ".tmp-"  # leading dot: ignored by pyarrow / pandas dataset readers
LEFTOVER_AGE_S = 120.0  # another run's temporary file older than this is a dead run's (the lock's takeover age)

SCORES_SCHEMA = pa.schema([
    ("title_id", pa.string()), ("label", pa.string()), ("second", pa.int32()),
    ("start_s", pa.float64()), ("end_s", pa.float64()), ("p", pa.float32()),
])
SEGMENTS_SCHEMA = pa.schema([
    ("title_id", pa.string()), ("label", pa.string()), ("segment", pa.int32()),
    ("start_s", pa.float64()), ("end_s", pa.float64()), ("n_seconds", pa.int32()), ("mean_p", pa.float32()),
])
TITLES_SCHEMA = pa.schema([
    ("title_id", pa.string()), ("uri", pa.string()), ("status", pa.string()), ("error", pa.string()),
    ("duration_s", pa.float64()), ("n_clips", pa.int32()), ("n_scored", pa.int32()),
    ("has_audio", pa.bool_()), ("model", pa.string()), ("scored_at", pa.timestamp("us", tz="UTC")),
    ("stills", pa.string()),
])


@dataclass(frozen=True)
class TitleRecord:
    """One ``titles`` row."""

    title_id: str
    uri: str
    status: str  # ok | partial | failed
    error: str | None
    duration_s: float | None
    n_clips: int
    n_scored: int
    has_audio: bool
    model: str
    stills: str = "exact"  # exact | keyframe: how the stills were chosen (SPEC section 2)


def scores_table(title_id: str, labels: list[str], probs: np.ndarray) -> pa.Table:
    """One row per (label, scored second): label-major, seconds ascending. Seconds that were not
    scored (NaN rows of ``probs``) have no row, so a title has ``n_scored`` rows per label."""
    scored = np.flatnonzero(np.isfinite(probs).all(axis=1)).astype(np.int32)
    seconds = np.tile(scored, len(labels))
    return pa.table({
        "title_id": pa.array([title_id] * len(seconds), pa.string()),
        "label": pa.array(np.repeat(np.asarray(labels, dtype=object), len(scored)).tolist(), pa.string()),
        "second": seconds, "start_s": seconds.astype(np.float64), "end_s": seconds + 1.0,
        "p": np.ascontiguousarray(probs[scored].T.reshape(-1), dtype=np.float32),
    }, schema=SCORES_SCHEMA)


def segments_table(title_id: str, segments: list[Segment]) -> pa.Table:
    """One row per segment, numbered from 0 per label."""
    numbers: dict[str, int] = {}
    rows = []
    for seg in segments:
        k = numbers.get(seg.label, 0)
        numbers[seg.label] = k + 1
        rows.append({"title_id": title_id, "label": seg.label, "segment": k, "start_s": float(seg.start_s),
                     "end_s": float(seg.end_s), "n_seconds": seg.n_seconds, "mean_p": seg.mean_p})
    return pa.Table.from_pylist(rows, schema=SEGMENTS_SCHEMA)


def titles_table(record: TitleRecord) -> pa.Table:
    row = {**record.__dict__, "scored_at": datetime.now(timezone.utc)}
    return pa.Table.from_pylist([row], schema=TITLES_SCHEMA)


class ResultStore:
    """The output directory ``OUT`` (any fsspec URI): per-title atomic writes and resume."""

    def __init__(self, out: str, run_id: str = "", embeddings: bool = False):
        import fsspec

        self.out = str(out).rstrip("/")
        self.tables = TABLES + ((EMBEDDINGS,) if embeddings else ())
        self.fs, self.root = fsspec.core.url_to_fs(self.out)
        self.root = self.root.rstrip("/")
        self.run_id = run_id or uuid.uuid4().hex  # names this run's temporary files

    def prepare(self) -> None:
        """Create the table folders, prove they are writable, and drop temporary files of dead runs."""
        try:
            self.make_folders()
            probe = self._temp("titles", "write-test")
            with self.fs.open(probe, "wb") as f:
                f.write(b"ok")
            self.fs.rm(probe)
        except (OSError, PermissionError, ValueError) as e:
            raise JobError(f"output {self.out} is not writable: {e}") from e  # SPEC 6: exit 1
        self.remove_leftovers()

    def remove_leftovers(self, age_s: float = LEFTOVER_AGE_S) -> None:
        """Remove this run's temporary files, and other runs' older than ``age_s`` (dead runs')."""
        for table in self.tables:
            self.fs.invalidate_cache(self._dir(table))
            for path, info in self.fs.glob(f"{self._dir(table)}/{TEMP_PREFIX}*", detail=True).items():
                if posixpath.basename(path).startswith(f"{TEMP_PREFIX}{self.run_id}-") or _age_s(info) > age_s:
                    self._remove_quietly(path)

    def make_folders(self) -> None:
        for table in self.tables:
            make_dirs(self.fs, self._dir(table))

    def finished_titles(self, model: str) -> set[str]:
        """Ids of titles already ``ok`` with this model (a rerun skips them); with embeddings
        wanted, only those that have their embeddings file too."""
        table = self.read("titles")
        if table is None or table.num_rows == 0:
            return set()
        frame = table.select(["title_id", "status", "model"]).to_pandas()
        done = set(frame[(frame["status"] == "ok") & (frame["model"] == model)]["title_id"])
        if EMBEDDINGS in self.tables:
            have = {posixpath.basename(p)[:-len(".parquet")] for p in self._list(EMBEDDINGS, "*.parquet")}
            done = {t for t in done if file_name_for(t) in have}
        return done

    def read(self, name: str) -> pa.Table | None:
        """One table over all titles written so far, or None when there is none yet."""
        import pyarrow.dataset as pds

        schema = {"scores": SCORES_SCHEMA, "segments": SEGMENTS_SCHEMA, "titles": TITLES_SCHEMA}[name]
        files = [p for p in self._list(name, "*.parquet") if not posixpath.basename(p).startswith(TEMP_PREFIX)]
        if not files:
            return None
        return pds.dataset(files, schema=schema, filesystem=self.fs, format="parquet").to_table()

    def title_row(self, title_id: str) -> dict | None:
        """The title's committed ``titles`` row, or None when it has none."""
        import pyarrow.parquet as pq

        path = f"{self._dir('titles')}/{file_name_for(title_id)}.parquet"
        self.fs.invalidate_cache(path)  # committed by another process since this one listed titles/?
        try:
            with self.fs.open(path, "rb") as f:
                rows = pq.read_table(f).to_pylist()
        except FileNotFoundError:
            return None
        return rows[0] if rows else None

    def write_title(self, record: TitleRecord, scores: pa.Table, segments: pa.Table,
                    embeddings: pa.Table | None = None) -> str:
        """Replace the title's files, the titles file last (it commits the title); returns the
        status that now stands. A title written ``ok`` is never rewritten, except by an ``ok``
        result of another checkpoint (a deliberate rescoring): then its ``ok`` stands. An ``ok``
        title scored before without embeddings only gains its embeddings file."""
        standing = self.title_row(record.title_id)
        name = file_name_for(record.title_id)
        if standing and standing["status"] == "ok" and (standing["model"] == record.model or record.status != "ok"):
            if embeddings is not None and record.status == "ok" and standing["model"] == record.model:
                self._write_atomic(EMBEDDINGS, name, embeddings)
            return "ok"
        if embeddings is not None and record.n_scored:  # before the commit: an ok title always has its file
            self._write_atomic(EMBEDDINGS, name, embeddings)
        elif embeddings is not None:  # nothing scored now: no vectors of an earlier attempt stay behind
            self._remove_quietly(f"{self._dir(EMBEDDINGS)}/{name}.parquet")
        for table_name, table in zip(TABLES, (scores, segments, titles_table(record))):
            self._write_atomic(table_name, name, table)
        return record.status

    def stage_title(self, record: TitleRecord, scores: pa.Table, segments: pa.Table, tag: str,
                    embeddings: pa.Table | None = None) -> None:
        """Write the title's files under temporary names of this run and ``tag`` (one per writer
        process and attempt), for :meth:`commit_staged` (the driver) to commit or drop. The
        embeddings file (``score --embeddings``) is staged only for a title with scored seconds."""
        name = file_name_for(record.title_id)
        if embeddings is not None and record.n_scored:
            self._write_parquet(self._staged(EMBEDDINGS, name, tag), embeddings)
        for table_name, table in zip(TABLES, (scores, segments, titles_table(record))):
            self._write_parquet(self._staged(table_name, name, tag), table)

    def commit_staged(self, title_id: str, status: str, model: str, tag: str) -> str:
        """Rename the files :meth:`stage_title` wrote under ``tag`` into place, the titles file
        last, unless an ``ok`` row stands (the rule of :meth:`write_title`); returns the status
        that now stands. Only the driver calls this, with the tag of a summary row of the attempt
        it is running: files another writer process staged (one that died, or an ended
        attempt's, finishing late) have other names and are never committed."""
        name = file_name_for(title_id)
        standing = self.title_row(title_id)
        vectors = self._staged(EMBEDDINGS, name, tag) if EMBEDDINGS in self.tables else None
        has_vectors = vectors is not None and self.fs.exists(vectors)
        if standing and standing["status"] == "ok" and (standing["model"] == model or status != "ok"):
            if has_vectors and status == "ok" and standing["model"] == model:  # gains its embeddings
                self.fs.mv(vectors, f"{self._dir(EMBEDDINGS)}/{name}.parquet")
            for table_name in self.tables:
                self._remove_quietly(self._staged(table_name, name, tag))
            return "ok"
        if has_vectors:  # before the commit: an ok title always has its file
            self.fs.mv(vectors, f"{self._dir(EMBEDDINGS)}/{name}.parquet")
        elif vectors is not None:  # nothing scored now: no vectors of an earlier attempt stay behind
            self._remove_quietly(f"{self._dir(EMBEDDINGS)}/{name}.parquet")
        for table_name in TABLES:
            self.fs.mv(self._staged(table_name, name, tag), f"{self._dir(table_name)}/{name}.parquet")
        return status

    def _write_atomic(self, table_name: str, name: str, table: pa.Table) -> None:
        tmp = self._temp(table_name, name)
        try:
            self._write_parquet(tmp, table)
            self.fs.mv(tmp, f"{self._dir(table_name)}/{name}.parquet")
        except BaseException:
            self._remove_quietly(tmp)
            raise

    def _write_parquet(self, path: str, table: pa.Table) -> None:
        import pyarrow.parquet as pq

        try:
            with self.fs.open(path, "wb") as f:
                pq.write_table(table, f)
        except BaseException:
            self._remove_quietly(path)
            raise

    def _temp(self, table_name: str, name: str) -> str:
        return f"{self._dir(table_name)}/{TEMP_PREFIX}{self.run_id}-{name}-{uuid.uuid4().hex[:8]}.parquet"

    def _staged(self, table_name: str, name: str, tag: str) -> str:
        return f"{self._dir(table_name)}/{TEMP_PREFIX}{self.run_id}-{tag}-{name}.parquet"

    def _remove_quietly(self, path: str) -> None:
        try:
            self.fs.rm(path)
        except (OSError, FileNotFoundError):
            pass

    def _list(self, table_name: str, pattern: str) -> list[str]:
        """The table's files matching ``pattern`` now. fsspec filesystems cache listings per
        process (s3fs without expiry), and other processes write here too (the writer actor,
        other runs): the cached listing of the folder is dropped first."""
        self.fs.invalidate_cache(self._dir(table_name))
        return self.fs.glob(f"{self._dir(table_name)}/{pattern}")

    def _dir(self, table_name: str) -> str:
        return f"{self.root}/{table_name}"


def _age_s(info: dict) -> float:
    """Seconds since a listed file was last written (local mtime, S3 LastModified, GCS updated);
    infinite when the store does not say (such a leftover is old enough to go)."""
    stamp = info.get("mtime") or info.get("LastModified") or info.get("updated") or info.get("created")
    if stamp is None:
        return float("inf")
    if isinstance(stamp, str):
        stamp = datetime.fromisoformat(stamp.replace("Z", "+00:00"))
    if isinstance(stamp, datetime):
        stamp = stamp.timestamp()
    return time.time() - float(stamp)
