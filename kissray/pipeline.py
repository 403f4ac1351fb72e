"""Library-scale scoring on Ray Data: :func:`score_library` (SPEC sections 6-7).

The plan, streamed end to end so memory stays bounded however large the library::

    titles (driver: inputs expanded, ids checked, OUT locked, titles already ``ok`` skipped)
      -> probe_windows   CPU tasks: one row per window of ``window_s`` seconds of each film
      -> decode_window   CPU tasks, one window each: clip rows (uint8 stills, float32 log-mels)
      -> Classifier      elastic actor pool (min 1, grows with the cluster's GPUs), model loaded once per actor
      -> TitleWriter     one actor on the driver's node: per-title reduce (segments + three Parquet files)
      -> driver          progress (film-seconds, titles, ETA) and summary from small rows

A title leaves the job as soon as its last window is scored: the writer stages its files and
the driver commits them (the one committer, so nothing an ended attempt still writes can replace
a later result), and a killed run keeps every title that finished. Faults: a fault of one title
at any stage becomes that title's row (the stages never raise for a film); a lost task is retried
and a lost actor restarted by Ray Data (its defaults); a title that keeps killing its process is
found by the run's :class:`~kissray.batch.ledger.DeathLedger` and failed alone; titles whose
result still never came back (an actor or node lost while holding them) are re-submitted by the
driver in the same run, up to ``max_attempts`` times. The steps live in :mod:`kissray.batch.stages`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import sys
import time
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from typing import Iterator

import numpy as np

from kissray.batch.faults import NO_FAULTS, FaultPlan
from kissray.batch.ledger import DeathLedger
from kissray.batch.lock import OutLock
from kissray.batch.progress import Progress, expected_film_seconds
from kissray.batch.stages import Classifier, DecodeSpec, TitleWriter, decode_window, probe_windows
from kissray.batch.tables import ResultStore, TitleRecord, scores_table, segments_table
from kissray.embeddings import EmbeddingsMeta, meta_for_checkpoint
from kissray.defaults import DECODE_TIMEOUT_S, STILLS_MODES, WINDOW_S
from kissray.errors import CheckpointError, JobError, UsageError, one_line
from kissray.inputs import Title, expand_inputs
from kissray.model import CONFIG_FILE, WEIGHTS_FILE, ModelConfig
from kissray.score import DEFAULT_BATCH_SIZE, SegmentParams
from kissray.terminal import divert_ray_loggers, quiet
from kissray.uris import is_local, make_dirs

log = logging.getLogger(__name__)

DEFAULT_WINDOW_S = WINDOW_S  # most seconds of film per decode task: a long film spreads over many workers
DEFAULT_DECODE_TIMEOUT_S = DECODE_TIMEOUT_S  # a window whose decoder makes no progress this long fails
SPLIT_BELOW_TITLES_PER_CPU = 4  # fewer titles than this per CPU: cut films into windows for parallelism
MAX_DECODE_THREADS = 4  # threads of one window's decoder (more buys little for one stream)
DECODE_TASK_MEMORY_BYTES = 512 << 20  # a decode task: its decoder child plus a block of clips
MAX_ATTEMPTS = 3  # times one run submits a title whose result never came back
DRIVER_NODE_LABEL = "ray.io/node-id"  # every Ray node carries its id as this label
WAIT_FOR_GPU_ACTORS_S = 900  # an autoscaler that brings no GPU node in this long ends the attempt


def lost_error(attempts: int) -> str:
    return f"no result came back after {attempts} attempt(s) (workers or nodes lost); rerun to retry"


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
    attempts: int = 0  # submissions of the plan (1 unless titles had to be redone)
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
    started_at: datetime = field(default_factory=lambda: datetime.now(timezone.utc))
    stills: str = "exact"  # set by run_library; recorded in every titles row
    lock: OutLock | None = None  # OUT's lock, checked before every commit
    embeddings: EmbeddingsMeta | None = None  # with ``score --embeddings``: what the vectors' files record


def check_request(inputs: list[str], model_uri: str) -> tuple[list[Title], ModelConfig]:
    """The titles the inputs name and the checkpoint's config, checked before anything is written
    or started: raises :class:`UsageError` (no films, a local path that does not exist, unreadable
    manifest, duplicate title ids) or :class:`CheckpointError`."""
    return expand_inputs(inputs), read_model_config(model_uri)


def prepare_library(inputs: list[str], model_uri: str, out: str,
                    checked: tuple[list[Title], ModelConfig] | None = None, lock: OutLock | None = None,
                    embeddings: bool = False) -> LibraryJob:
    """Expand the inputs, read the checkpoint's config, make ``out`` and find the titles to do.

    Needs no Ray, so a CLI can fail fast: raises what :func:`check_request` raises (``checked``:
    its result, when the caller checked before taking the lock) or :class:`JobError` (``out`` not
    writable). The caller holds ``out``'s lock (:func:`out_lock`) while preparing and running, and
    passes it: it names this run's temporary files and is checked before every commit.
    ``embeddings``: also write ``out/embeddings`` (SPEC section 11); titles already ``ok`` without
    their embeddings file are done again (their scores stand; they gain the file).
    """
    started, started_at = time.monotonic(), datetime.now(timezone.utc)
    titles, config = checked or check_request(inputs, model_uri)
    meta = meta_for_checkpoint(model_uri, "exact") if embeddings else None  # stills: set by run_library
    store = ResultStore(out, lock.run_id if lock is not None else "", embeddings=embeddings)
    store.prepare()
    done = store.finished_titles(model_uri)
    return LibraryJob(titles, [t for t in titles if t.title_id not in done], model_uri, config, store, started,
                      started_at, lock=lock, embeddings=meta)


def out_lock(out: str, **options) -> OutLock:
    """The lock of one output directory: a second live run on it is a usage error; an output
    that cannot be made is :class:`JobError` (the job cannot go on). ``options``: those of
    :class:`OutLock` (tests)."""
    store = ResultStore(out)
    try:
        make_dirs(store.fs, store.root)
    except OSError as e:
        raise JobError(f"output {out} is not writable: {e}") from e  # SPEC 6: exit 1
    return OutLock(store.fs, store.root, store.out, **options)


def check_address(address: str | None, out: str) -> None:
    """A Ray client (``ray://``) runs the job's workers on a remote cluster, whose writer cannot
    reach this machine's disk: a local OUT is then a usage error (SPEC 7), raised before anything
    is written."""
    address = address or os.environ.get("RAY_ADDRESS") or ""
    if address.startswith("ray://") and is_local(out):
        raise UsageError(f"--out {out} is a local folder, but {address} is a Ray client connection: the cluster's "
                         "writer cannot write to this machine; give an --out on shared storage (s3://, gs://, ...)")


def score_library(inputs: list[str], model_uri: str, out: str, embeddings: bool = False,
                  **options) -> LibrarySummary:
    """Score every film named by ``inputs`` with the checkpoint ``model_uri`` into ``out``.

    Ray must be initialised (``ray.init``). Titles already ``ok`` in ``out`` with the same model
    are skipped; every other title gets exactly one fresh ``titles`` row. Bad films never fail the
    job. ``options`` are those of :func:`run_library`.
    """
    checked = check_request(inputs, model_uri)  # a usage error writes nothing, not even OUT
    with out_lock(out) as lock:
        return run_library(prepare_library(inputs, model_uri, out, checked, lock, embeddings), **options)


@dataclass(frozen=True)
class PoolPlan:
    """The classifier actor pool: elastic between ``min_actors`` and ``max_actors`` (None: no bound)."""

    gpus_per_actor: float
    max_actors: int | None
    cpus_per_actor: float
    threads: int  # torch threads per actor (0: torch's default)
    gpus_now: float
    gpus_possible: float  # GPUs now plus those the autoscaler may still add

    @property
    def device(self) -> str | None:
        """The classifier's device: ``cpu`` when the pool reserves no GPU (an actor that can see
        a GPU must not use one it did not reserve); None lets the scorer pick the reserved GPU."""
        return None if self.gpus_per_actor else "cpu"

    def describe(self) -> str:
        pool = f"classifier pool 1..{self.max_actors or 'unbounded'} actors"
        if not self.gpus_per_actor:
            return f"{pool} on CPU ({self.threads or 'default'} torch threads each; no GPU used)"
        more = f", up to {self.gpus_possible:g} with autoscaling" if self.gpus_possible > self.gpus_now else ""
        return f"{pool}, {self.gpus_per_actor:g} GPU each (cluster: {self.gpus_now:g} GPU now{more})"


def plan_pool(num_gpus_per_actor: float | None = None, max_actors: int | None = None) -> PoolPlan:
    """GPU use follows the cluster's configuration: GPUs up now, or GPU node types the autoscaler
    can still add (SPEC section 6). ``num_gpus_per_actor=0`` forces CPU."""
    gpus_now, cpus = _cluster_gpus_cpus()
    gpus_possible = max(gpus_now, _autoscaler_max("GPU"))
    if num_gpus_per_actor is None:
        num_gpus_per_actor = 1.0 if gpus_possible > 0 else 0.0
    cpu_share = min(1.0, cpus / 2)  # a 1- or 2-CPU Ray must still fit a decode task and an actor
    if num_gpus_per_actor:
        return PoolPlan(float(num_gpus_per_actor), max_actors, cpu_share, 0, gpus_now, gpus_possible)
    # CPU-only: the model's torch threads may use the node's CPUs, decoding included -- measured
    # faster than one thread per actor, since decoding and inference rarely peak together
    max_actors = max_actors or max(1, int(cpus // 4))
    return PoolPlan(0.0, max_actors, cpu_share, max(1, int(cpus // max_actors)), gpus_now, gpus_possible)


def run_library(job: LibraryJob, *, params: SegmentParams = SegmentParams(), window_s: int = DEFAULT_WINDOW_S,
                batch_size: int = DEFAULT_BATCH_SIZE, max_actors: int | None = None,
                num_gpus_per_actor: float | None = None, decode_timeout_s: float = DEFAULT_DECODE_TIMEOUT_S,
                frames_per_clip: int | None = None, stills: str = "exact", progress: bool = True,
                max_attempts: int = MAX_ATTEMPTS, faults: FaultPlan = NO_FAULTS) -> LibrarySummary:
    """Run a prepared job on the current Ray; returns once every title has its ``titles`` row.

    ``window_s``: most seconds of a local film per decode task (films are cut into windows only
    when there are fewer than 4 titles to do per CPU, into about as many windows as the cluster
    decodes at once, at least 30 s each); ``max_actors``: most classifier actors (GPU: unbounded,
    CPU: one per 4 CPUs); ``num_gpus_per_actor``: default 1 when the cluster has or
    can add GPUs; ``frames_per_clip``: default the checkpoint's; ``stills``: exact | keyframe;
    ``decode_timeout_s``: a window whose decoder makes no progress this long fails;
    ``faults``: test-only fault injection.
    """
    if window_s < 1 or batch_size < 1 or max_attempts < 1:
        raise ValueError("window_s, batch_size and max_attempts must be >= 1")
    if stills not in STILLS_MODES:
        raise ValueError(f"stills must be one of {', '.join(STILLS_MODES)}")
    summary = LibrarySummary(n_titles=len(job.titles), n_skipped=len(job.titles) - len(job.todo))
    job = replace(job, stills=stills, embeddings=job.embeddings and replace(job.embeddings, stills=stills))
    if job.todo:
        pool = plan_pool(num_gpus_per_actor, max_actors)
        if progress:
            print(f"kissray score: {len(job.todo)} title(s) to score; {pool.describe()}", file=sys.stderr)
        log.info("%s", pool.describe())
        spec = decode_spec(job, pool, window_s, decode_timeout_s, frames_per_clip, stills, faults)
        expected_s = expected_film_seconds([t.uri for t in job.todo]) if progress else None
        with Progress(len(job.todo), progress, expected_s) as bar:
            lost = _run_attempts(job, spec, params, pool, batch_size, max_attempts, summary, bar)
        _record_lost(job, lost, summary, max_attempts)
    summary.wall_s = time.monotonic() - job.started
    return summary


def decode_spec(job: LibraryJob, pool: PoolPlan, window_s: int, decode_timeout_s: float,
                frames_per_clip: int | None, stills: str, faults: FaultPlan) -> DecodeSpec:
    """How films are cut and decoded. Few titles: films are cut into windows spread over the CPUs
    left to decoding, and each decoder gets the CPUs the titles leave it (so one film on Ray uses
    every core, like ``score_film``); many titles: one decoder per title, one thread each."""
    cpus = _cluster_gpus_cpus()[1]
    split = len(job.todo) < SPLIT_BELOW_TITLES_PER_CPU * cpus
    slots = max(1, int((cpus - (0 if pool.gpus_per_actor else pool.cpus_per_actor)) // pool.cpus_per_actor))
    threads = max(1, min(MAX_DECODE_THREADS, int(cpus // len(job.todo)))) if split else 1
    return DecodeSpec(frames_per_clip or job.config.frames_per_clip, job.config.image_size, int(window_s),
                      float(decode_timeout_s), split, stills, threads, slots, faults)


def _run_attempts(job: LibraryJob, spec: DecodeSpec, params: SegmentParams, pool: PoolPlan, batch_size: int,
                  max_attempts: int, summary: LibrarySummary, bar: "Progress") -> list[Title]:
    """Submit the titles, then re-submit those whose result never came back; returns the rest.
    One death ledger serves every attempt, so a title that keeps killing its process is found."""
    pending = list(job.todo)
    spec = replace(spec, ledger=DeathLedger.start())
    try:
        for attempt in range(1, max_attempts + 1):
            summary.attempts = attempt
            reported: set[str] = set()
            dataset = build_dataset(pending, job.model_uri, job.store.out, job.config, spec, params,
                                    batch_size=batch_size, pool=pool, run_id=job.store.run_id, attempt=attempt,
                                    embeddings=job.embeddings)
            try:
                _collect(dataset, job, summary, bar, reported, spec.faults)
            except JobError:
                raise  # OUT lost or unwritable: nothing more may be written
            except Exception as e:  # lost objects, an actor out of restarts...: redo what did not come back
                _check_cluster(e)
                log.warning("attempt %d of the job ended early: %s", attempt, one_line(e))
            pending = [t for t in pending if t.title_id not in reported]
            if not pending:
                return []
            if attempt < max_attempts:
                log.warning("re-submitting %d title(s) whose result never came back: %s", len(pending),
                            ", ".join(t.title_id for t in pending[:5]) + (" ..." if len(pending) > 5 else ""))
        return pending
    finally:
        spec.ledger.close()
        job.store.remove_leftovers(age_s=math.inf)  # what this run staged and never committed


def build_dataset(titles: list[Title], model_uri: str, out: str, config: ModelConfig, spec: DecodeSpec,
                  params: SegmentParams, *, batch_size: int, pool: PoolPlan, run_id: str = "", attempt: int = 1,
                  embeddings: EmbeddingsMeta | None = None):
    """The lazy Ray Data plan; iterating it runs the job and yields summary and progress rows.
    ``embeddings``: the classifier also emits each clip's vector, the writer stores them.

    Retries are Ray Data's own defaults: a task whose worker or node died is rerun, an actor
    whose process or node died is restarted and its batch resent (docs/faults.md); the death
    ledger in ``spec`` stops a title that kills its process every time."""
    import ray

    # results must land on the driver's disk, whichever node the writer would otherwise get
    writer_nodes = {DRIVER_NODE_LABEL: ray.get_runtime_context().get_node_id()} if is_local(out) else None
    items = [{"title_id": t.title_id, "uri": t.uri} for t in titles]
    dataset = (
        ray.data.from_items(items, override_num_blocks=len(items))
        .flat_map(probe_windows, fn_kwargs={"spec": spec}, num_cpus=pool.cpus_per_actor)
        .repartition(target_num_rows_per_block=1)  # one window per decode task (streaming, no barrier)
        # the memory request sizes decode tasks; being unlike the actors' it also keeps decoding
        # in CPU tasks instead of fused into the model's actors (fusion needs equal remote args)
        .map_batches(decode_window, batch_size=1, batch_format="numpy", fn_kwargs={"spec": spec},
                     num_cpus=pool.cpus_per_actor, memory=DECODE_TASK_MEMORY_BYTES)
        .map_batches(Classifier, fn_constructor_kwargs={"model_uri": model_uri, "batch_size": batch_size,
                                                          "device": pool.device, "num_threads": pool.threads,
                                                          "faults": spec.faults, "ledger": spec.ledger,
                                                          "embeddings": embeddings is not None},
                     batch_size=batch_size, batch_format="numpy", num_cpus=pool.cpus_per_actor,
                     num_gpus=pool.gpus_per_actor, runtime_env={"env_vars": _openmp_env()},
                     compute=ray.data.ActorPoolStrategy(min_size=1, max_size=pool.max_actors))
        .map_batches(TitleWriter, fn_constructor_kwargs={"out": out, "labels": list(config.labels),
                                                         "model_uri": model_uri, "params": params,
                                                         "faults": spec.faults, "stills": spec.stills,
                                                         "run_id": run_id, "attempt": attempt,
                                                         "embeddings": embeddings},
                     batch_size=None, batch_format="numpy", num_cpus=0, label_selector=writer_nodes,
                     compute=ray.data.ActorPoolStrategy(size=1))  # one writer sees every row of a title
    )
    _configure(dataset.context, pool)
    return dataset


def _openmp_env() -> dict[str, str]:
    from kissray.cli import OPENMP_ENV

    return {name: os.environ.get(name, value) for name, value in OPENMP_ENV.items()}


def _configure(ctx, pool: PoolPlan) -> None:
    """Ray Data's settings on this dataset's own context (never the process-wide one, which other
    code in the process may use), explicit (docs/faults.md). Our stages never raise for a film,
    so an exception that reaches Ray Data is a system fault: it ends the attempt at once (no
    blind retries of application errors), and the driver re-submits the titles it lost."""
    ctx.actor_task_retry_on_errors = False  # application errors: handled in the stages
    ctx.retried_map_errors = False
    ctx.max_errored_blocks = 0  # a block that errors ends the attempt; nothing is dropped silently
    ctx.max_consecutive_actor_init_deaths = 3  # an actor dying while loading the model is replaced
    # GPU actors may wait for the autoscaler; give up (and end the attempt) if no GPU comes
    ctx.wait_for_min_actors_s = WAIT_FOR_GPU_ACTORS_S if pool.gpus_per_actor > pool.gpus_now else -1
    ctx.enable_progress_bars = False  # the driver's own bar counts film-seconds and titles
    ctx.enable_operator_progress_bars = False
    ctx.print_on_execution_start = False


def _cluster_gpus_cpus() -> tuple[float, float]:
    import ray

    resources = ray.cluster_resources()
    return float(resources.get("GPU", 0)), float(resources.get("CPU", 1))


def _autoscaler_max(resource: str) -> float:
    """Most of ``resource`` the autoscaler's node types allow (0 with no autoscaler config)."""
    try:
        import ray._private.state

        limits = ray._private.state.state.get_max_resources_from_cluster_config() or {}
    except Exception:  # private API, absent on some Ray versions / without an autoscaler
        return 0.0
    value = float(limits.get(resource, 0) or 0)
    return 0.0 if math.isinf(value) or value > 1e6 else value


def _check_cluster(error: Exception) -> None:
    """Raise :class:`JobError` when the cluster itself is gone (then nothing can be redone)."""
    import ray

    try:
        ray.cluster_resources()
    except Exception as e:
        raise JobError(f"lost the Ray cluster ({one_line(error)})") from e


def _collect(dataset, job: LibraryJob, summary: LibrarySummary, bar: Progress, reported: set[str],
             faults: FaultPlan = NO_FAULTS) -> None:
    """Run the plan, committing each title as its summary row streams back (ids into ``reported``)."""
    for batch in dataset.iter_batches(batch_size=None, batch_format="pyarrow"):
        for row in batch.to_pylist():
            if row["kind"] == "progress":
                bar.update(clips=row["clips"], film_s=row["film_s"], opened=row["opened"])
                continue
            status, error = _commit(job, row), row["error"]
            reported.add(row["title_id"])
            summary.add(status, row["n_scored"], row["title_id"], None if status == "ok" else error)
            bar.update(status=status)
            faults.hold("commit", str(len(reported)))


def _commit(job: LibraryJob, row: dict) -> str:
    """Commit the files the writer staged for this summary row (or, if it could not, write the
    title's ``failed`` row from here), once sure this run still holds OUT; returns the status
    that stands."""
    if job.lock is not None:
        job.lock.check()  # raises LockLost: another run took OUT over while this one was paused
    if not row["staged"]:  # the writer could not stage the title: its failed row from here
        return _write_failed(job, row["title_id"], row["error"])
    try:
        return job.store.commit_staged(row["title_id"], row["status"], job.model_uri, row["staged"])
    except Exception as e:
        raise JobError(f"cannot write results to {job.store.out}: {one_line(e)}") from e


def _write_failed(job: LibraryJob, title_id: str, error: str) -> str:
    """Commit a ``failed`` row for a title from the driver (never over an ``ok`` one); returns the
    status that stands. Raises :class:`JobError` when even this cannot be written."""
    uri = next((t.uri for t in job.titles if t.title_id == title_id), "")
    labels = list(job.config.labels)
    record = TitleRecord(title_id, uri, "failed", error, None, 0, 0, False, job.model_uri, job.stills)
    try:
        return job.store.write_title(record, scores_table(title_id, labels, np.zeros((0, len(labels)), np.float32)),
                                     segments_table(title_id, []))
    except Exception as e:
        raise JobError(f"cannot write results to {job.store.out}: {one_line(e)}") from e


def _record_lost(job: LibraryJob, lost: list[Title], summary: LibrarySummary, attempts: int = MAX_ATTEMPTS) -> None:
    """Titles whose result never came back in any attempt still get their one titles row."""
    error = lost_error(attempts)
    for title in lost:
        log.warning("%s: %s", title.title_id, error)
        if job.lock is not None:
            job.lock.check()
        status = _write_failed(job, title.title_id, error)
        summary.add(status, 0, title.title_id, None if status == "ok" else error)


@contextlib.contextmanager
def ray_connection(address: str | None = None) -> Iterator[None]:
    """Ray for the duration of a command: the running one when this process already has it,
    else ``ray.init(address)`` (``None`` -> ``RAY_ADDRESS`` or a new local Ray; ``"local"`` -> a
    new local Ray). Shuts down only a Ray it connected or started itself. Without ``-v`` Ray's
    console output goes to the command's log file (:mod:`kissray.terminal`)."""
    import ray
    import ray.data  # configures its loggers on import: divert them with Ray's own

    divert_ray_loggers()
    if ray.is_initialized():
        yield
        return
    # neither given: a new local Ray, never whichever cluster was started last on this machine
    address = address or os.environ.get("RAY_ADDRESS") or "local"
    try:
        # configure_logging keeps Ray's console handler (diverted above); without it Ray drops the
        # handler and its notices reach the terminal through logging's last resort
        ray.init(address=address, include_dashboard=False, logging_level=logging.WARNING, configure_logging=True,
                 log_to_driver=not quiet())
    except Exception as e:  # no cluster at that address, a version mismatch...
        raise JobError(f"cannot connect to Ray ({address}): {one_line(e)}") from e
    try:
        yield
    finally:
        ray.shutdown()
