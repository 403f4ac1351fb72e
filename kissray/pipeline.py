"""Library-scale scoring on Ray Data: :func:`score_library` (SPEC sections 6-7).

The plan, streamed end to end so memory stays bounded however large the library::

    titles (driver: inputs expanded, ids checked, titles already ``ok`` skipped)
      -> probe_windows   CPU tasks: one row per window of ``window_s`` seconds of each film
      -> decode_window   CPU tasks, one window each: clip rows (uint8 stills, float32 log-mels)
      -> Classifier      actor pool, GPUs when the cluster has them, model loaded once per actor
      -> TitleWriter     one actor: per-title reduce (segments + three Parquet files per title)
      -> driver          progress bar and summary from one small row per title

A title leaves the job as soon as its last window is scored, so a killed run keeps every title
that finished. The steps themselves live in :mod:`kissray.batch.stages`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np

from kissray.batch.stages import Classifier, DecodeSpec, TitleWriter, decode_window, probe_windows
from kissray.batch.tables import ResultStore, TitleRecord, scores_table, segments_table
from kissray.errors import CheckpointError
from kissray.inputs import Title, expand_inputs
from kissray.model import CONFIG_FILE, WEIGHTS_FILE, ModelConfig
from kissray.score import DEFAULT_BATCH_SIZE, SegmentParams

log = logging.getLogger(__name__)

DEFAULT_WINDOW_S = 120  # seconds of film per decode task: a long film spreads over many workers
DEFAULT_DECODE_TIMEOUT_S = 60.0  # a window whose decoder makes no progress this long fails
SPLIT_BELOW_TITLES_PER_CPU = 4  # fewer titles than this per CPU: cut films into windows for parallelism
DECODE_TASK_MEMORY_BYTES = 512 << 20  # a decode task: its decoder child plus a block of clips
LOST_ERROR = "no result came back (a worker died); rerun to retry"


@dataclass
class LibrarySummary:
    """What one ``score_library`` run did."""

    n_titles: int = 0  # titles named by the inputs
    n_skipped: int = 0  # already ok in ``out`` with this model
    n_ok: int = 0
    n_partial: int = 0
    n_failed: int = 0
    seconds_scored: int = 0
    wall_s: float = 0.0
    failures: list[tuple[str, str, str]] = field(default_factory=list)  # (title_id, status, error)

    @property
    def throughput(self) -> float:
        """Seconds of film scored per second of wall time."""
        return self.seconds_scored / self.wall_s if self.wall_s > 0 else 0.0

    @property
    def all_ok(self) -> bool:
        return self.n_partial == 0 and self.n_failed == 0

    def add(self, status: str, n_scored: int, title_id: str = "", error: str | None = None) -> None:
        setattr(self, f"n_{status}", getattr(self, f"n_{status}") + 1)
        self.seconds_scored += int(n_scored)
        if status != "ok":
            self.failures.append((title_id, status, error or ""))

    def __str__(self) -> str:
        return (f"{self.n_titles} titles: {self.n_ok} ok, {self.n_partial} partial, {self.n_failed} failed, "
                f"{self.n_skipped} skipped (already ok); {self.seconds_scored} s of film scored in "
                f"{self.wall_s:.1f} s ({self.throughput:.1f} film-s/s)")


def read_model_config(model_uri: str) -> ModelConfig:
    """The checkpoint's config, read on the driver so a bad checkpoint fails before any work."""
    import fsspec

    fs, root = fsspec.core.url_to_fs(str(model_uri))
    root = root.rstrip("/")
    try:
        with fs.open(f"{root}/{CONFIG_FILE}", "rb") as f:
            config = ModelConfig.from_dict(json.loads(f.read()))
        if not fs.exists(f"{root}/{WEIGHTS_FILE}"):
            raise FileNotFoundError(WEIGHTS_FILE)
    except FileNotFoundError as e:
        raise CheckpointError(f"{model_uri}: not a kissray checkpoint (missing {e.filename or e})") from e
    except (ValueError, TypeError, OSError) as e:
        raise CheckpointError(f"{model_uri}: unreadable checkpoint: {e}") from e
    return config


@dataclass
class LibraryJob:
    """A checked request, ready to run: what :func:`prepare_library` found out without Ray."""

    titles: list[Title]  # every title the inputs name
    todo: list[Title]  # those not already ok in ``out`` with this model
    model_uri: str
    config: ModelConfig
    store: ResultStore
    started: float = field(default_factory=time.monotonic)


def prepare_library(inputs: list[str], model_uri: str, out: str) -> LibraryJob:
    """Expand the inputs, read the checkpoint's config, make ``out`` and find the titles to do.

    Needs no Ray, so a CLI can fail fast: raises :class:`UsageError` (no films, unreadable
    manifest, duplicate title ids, ``out`` not writable) or :class:`CheckpointError`.
    """
    started = time.monotonic()
    titles = expand_inputs(inputs)
    config = read_model_config(model_uri)
    store = ResultStore(out)
    store.prepare()
    done = store.finished_titles(model_uri)
    return LibraryJob(titles, [t for t in titles if t.title_id not in done], model_uri, config, store, started)


def score_library(inputs: list[str], model_uri: str, out: str, **options) -> LibrarySummary:
    """Score every film named by ``inputs`` with the checkpoint ``model_uri`` into ``out``.

    Ray must be initialised (``ray.init``). Titles already ``ok`` in ``out`` with the same model
    are skipped; every other title gets exactly one fresh ``titles`` row. Bad films never fail the
    job. ``options`` are those of :func:`run_library`.
    """
    return run_library(prepare_library(inputs, model_uri, out), **options)


def run_library(job: LibraryJob, *, params: SegmentParams = SegmentParams(), window_s: int = DEFAULT_WINDOW_S,
                batch_size: int = DEFAULT_BATCH_SIZE, num_actors: int | None = None,
                num_gpus_per_actor: float | None = None, decode_timeout_s: float = DEFAULT_DECODE_TIMEOUT_S,
                frames_per_clip: int | None = None, progress: bool = True) -> LibrarySummary:
    """Run a prepared job on the current Ray; returns once every title has its ``titles`` row.

    ``window_s``: seconds of a local film per decode task (films are cut into windows only when
    there are fewer than 4 titles to do per CPU; else each film has one decoder); ``num_actors``:
    most model actors (default one per GPU, else one per 4 CPUs, each using CPUs / actors torch
    threads); ``num_gpus_per_actor``: default 1 when the cluster
    has GPUs; ``frames_per_clip``: default the checkpoint's; ``decode_timeout_s``: a window whose
    decoder makes no progress this long fails.
    """
    if window_s < 1 or batch_size < 1:
        raise ValueError("window_s and batch_size must be >= 1")
    summary = LibrarySummary(n_titles=len(job.titles), n_skipped=len(job.titles) - len(job.todo))
    if job.todo:
        split = len(job.todo) < SPLIT_BELOW_TITLES_PER_CPU * _cluster_gpus_cpus()[1]
        spec = DecodeSpec(frames_per_clip or job.config.frames_per_clip, job.config.image_size, int(window_s),
                          float(decode_timeout_s), split)
        dataset = build_dataset(job.todo, job.model_uri, job.store.out, job.config, spec, params,
                                batch_size=batch_size, num_actors=num_actors, num_gpus_per_actor=num_gpus_per_actor)
        reported = _collect(dataset, summary, len(job.todo), progress)
        _record_lost(job, [t for t in job.todo if t.title_id not in reported], summary)
    summary.wall_s = time.monotonic() - job.started
    return summary


def build_dataset(titles: list[Title], model_uri: str, out: str, config: ModelConfig, spec: DecodeSpec,
                  params: SegmentParams, *, batch_size: int, num_actors: int | None,
                  num_gpus_per_actor: float | None):
    """The lazy Ray Data plan; iterating it runs the job and yields one summary row per title."""
    import ray

    gpus, cpus = _cluster_gpus_cpus()
    cpu_share = min(1.0, cpus / 2)  # a 1- or 2-CPU Ray must still fit a decode task and an actor
    if num_gpus_per_actor is None:
        num_gpus_per_actor = 1 if gpus > 0 else 0
    if num_actors is None:
        num_actors = max(1, int(gpus // num_gpus_per_actor) if num_gpus_per_actor else int(cpus // 4))
    # CPU-only: the model's torch threads may use the node's CPUs, decoding included -- measured
    # faster than one thread per actor, since decoding and inference rarely peak together
    threads = 0 if num_gpus_per_actor else max(1, int(cpus // num_actors))
    items = [{"title_id": t.title_id, "uri": t.uri} for t in titles]
    return (
        ray.data.from_items(items, override_num_blocks=len(items))
        .flat_map(probe_windows, fn_kwargs={"spec": spec}, num_cpus=cpu_share)
        .repartition(target_num_rows_per_block=1)  # one window per decode task (streaming, no barrier)
        # the memory request sizes decode tasks; being unlike the actors' it also keeps decoding
        # in CPU tasks instead of fused into the model's actors (fusion needs equal remote args)
        .map_batches(decode_window, batch_size=1, batch_format="numpy", fn_kwargs={"spec": spec},
                     num_cpus=cpu_share, memory=DECODE_TASK_MEMORY_BYTES)
        .map_batches(Classifier, fn_constructor_kwargs={"model_uri": model_uri, "batch_size": batch_size,
                                                          "num_threads": threads},
                     batch_size=batch_size, batch_format="numpy", num_cpus=cpu_share, num_gpus=num_gpus_per_actor,
                     compute=ray.data.ActorPoolStrategy(min_size=1, max_size=num_actors))
        .map_batches(TitleWriter, fn_constructor_kwargs={"out": out, "labels": list(config.labels),
                                                         "model_uri": model_uri, "params": params},
                     batch_size=None, batch_format="numpy", num_cpus=0,
                     compute=ray.data.ActorPoolStrategy(size=1))  # one writer sees every row of a title
    )


def _cluster_gpus_cpus() -> tuple[float, float]:
    import ray

    resources = ray.cluster_resources()
    return float(resources.get("GPU", 0)), float(resources.get("CPU", 1))


def _collect(dataset, summary: LibrarySummary, n_titles: int, progress: bool) -> set[str]:
    """Run the job, counting titles as their summary rows stream back; returns the ids seen."""
    from tqdm import tqdm

    seen: set[str] = set()
    with tqdm(total=n_titles, unit="title", disable=not progress, dynamic_ncols=True) as bar:
        for batch in dataset.iter_batches(batch_size=None, batch_format="pyarrow"):
            for row in batch.to_pylist():
                seen.add(row["title_id"])
                summary.add(row["status"], row["n_scored"], row["title_id"], row["error"])
                bar.update(1)
                bar.set_postfix(scored_s=summary.seconds_scored, failed=summary.n_failed + summary.n_partial)
    return seen


def _record_lost(job: LibraryJob, lost: list[Title], summary: LibrarySummary) -> None:
    """Titles whose result never came back (a writer that died) still get their one titles row."""
    labels = list(job.config.labels)
    for title in lost:
        log.warning("%s: %s", title.title_id, LOST_ERROR)
        record = TitleRecord(title.title_id, title.uri, "failed", LOST_ERROR, None, 0, 0, False, job.model_uri)
        job.store.write_title(record, scores_table(title.title_id, labels, np.zeros((0, len(labels)), np.float32)),
                              segments_table(title.title_id, []))
        summary.add("failed", 0, title.title_id, LOST_ERROR)


@contextlib.contextmanager
def ray_connection(address: str | None = None) -> Iterator[None]:
    """Ray for the duration of a command: the running one when this process already has it,
    else ``ray.init(address)`` (``None`` -> ``RAY_ADDRESS`` or a new local Ray; ``"local"`` -> a
    new local Ray). Shuts down only a Ray it connected or started itself."""
    import ray

    if ray.is_initialized():
        yield
        return
    ray.init(address=address or os.environ.get("RAY_ADDRESS") or None, include_dashboard=False,
             logging_level=logging.WARNING, configure_logging=False)
    try:
        yield
    finally:
        ray.shutdown()
