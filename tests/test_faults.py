"""The library job under faults on the session's local Ray: a fault of one title at any stage is
that title's row; process deaths are redone in the same run; OUT's lock; usage errors and exit codes.
Multi-node faults (lost nodes, actors, GPU nodes added) are in tests/test_cluster_faults.py."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from conftest import make_film, run_cli_in_process
from kissray.batch.faults import RAISE_STAGES, FaultPlan
from kissray.score import SegmentParams, score_film

PARAMS = SegmentParams(threshold=0.47, min_len=3, min_fraction=0.6)


def read(out, table: str) -> pd.DataFrame:
    return pd.read_parquet(os.path.join(out, table))


@pytest.fixture(scope="module")
def films(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("fault-films")
    names = ["clean", *RAISE_STAGES]
    return {name: make_film(root / f"{name}.mp4", 4 + i % 3) for i, name in enumerate(names)}


def expected_probs(uri: str, model) -> np.ndarray:
    return score_film(uri, model).probs[:, 0]


def test_a_fault_at_each_stage_fails_only_that_title(films, checkpoint, model, tmp_path, ray_session):
    """One title per stage raises there; each gets its one row with the reason, the others score."""
    from kissray.pipeline import score_library

    plan = FaultPlan(raise_at=tuple((stage, stage) for stage in RAISE_STAGES))
    summary = score_library(list(films.values()), checkpoint, str(tmp_path), params=PARAMS, window_s=3,
                            batch_size=4, decode_timeout_s=20, progress=False, faults=plan)
    titles = read(tmp_path, "titles").set_index("title_id")
    assert sorted(titles.index) == sorted(films) and summary.attempts == 1
    assert titles.loc["clean", "status"] == "ok"
    for stage in RAISE_STAGES:
        assert titles.loc[stage, "status"] == "failed", stage
        assert f"injected fault in {stage}" in titles.loc[stage, "error"], titles.loc[stage, "error"]
    scores = read(tmp_path, "scores")
    assert set(scores.title_id) == {"clean"}
    np.testing.assert_allclose(scores.sort_values("second").p, expected_probs(films["clean"], model), atol=1e-5)
    assert summary.n_ok == 1 and summary.n_failed == len(RAISE_STAGES)


def test_process_deaths_are_redone_in_the_same_run(films, checkpoint, model, tmp_path, ray_session):
    """A decode task, the classifier actor and the writer actor (holding an open title) die once
    each: Ray retries / restarts them and the driver re-submits what was lost; every title ok."""
    from kissray.pipeline import score_library

    chosen = {"decode": "probe", "classifier": "windows", "writer": "decode"}
    plan = FaultPlan(crash_at=tuple(chosen.items()), marker_dir=str(tmp_path / "markers"))
    os.makedirs(plan.marker_dir)
    out = tmp_path / "out"
    mine = [films[title] for title in ("clean", *chosen.values())]
    summary = score_library(mine, checkpoint, str(out), params=PARAMS, window_s=2,
                            batch_size=2, decode_timeout_s=20, progress=False, faults=plan)
    assert sorted(os.listdir(plan.marker_dir)) == sorted(
        f"crashed-{stage}-{title.encode().hex()}" for stage, title in chosen.items())  # each died once
    titles = read(out, "titles")
    assert len(titles) == len(mine) and (titles.status == "ok").all(), titles[["title_id", "error"]]
    assert summary.n_ok == len(mine) and summary.attempts == 2  # the writer's open title was re-submitted
    scores = read(out, "scores")
    assert not scores.duplicated(["title_id", "label", "second"]).any()
    for title in chosen.values():
        got = scores[scores.title_id == title].sort_values("second").p
        np.testing.assert_allclose(got, expected_probs(films[title], model), atol=1e-5)


@pytest.mark.parametrize("option", [["--threshold", "nan"], ["--threshold", "1.5"], ["--min-fraction", "nan"],
                                    ["--min-len", "0"], ["--decode-timeout-s", "inf"], ["--max-actors", "0"],
                                    ["--stills", "bogus"], ["--num-gpus-per-actor", "-1"]])
def test_option_values_out_of_range_exit_2(option, films, checkpoint, tmp_path):
    code, _, stderr = run_cli_in_process(["score", films["clean"], "--model", checkpoint, "--out",
                                          str(tmp_path / "out"), "--address", "local", *option])
    assert code == 2, stderr
    assert option[0] in stderr and "Traceback" not in stderr
    assert not (tmp_path / "out").exists()  # nothing written


def test_a_second_live_run_on_out_exits_2_naming_the_first(films, checkpoint, tmp_path):
    from kissray.batch.lock import LOCK_NAME, _process_start

    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lock = {"host": socket.gethostname(), "pid": holder.pid, "pid_start": _process_start(holder.pid),
                "started": "2026-11-30T07:00:00+00:00", "run": "other", "heartbeat": 0}
        (tmp_path / LOCK_NAME).write_text(json.dumps(lock))
        code, _, stderr = run_cli_in_process(["score", films["clean"], "--model", checkpoint, "--out", str(tmp_path),
                                              "--address", "local", "--no-progress"])
        assert code == 2, stderr
        assert f"pid {holder.pid}" in stderr and socket.gethostname() in stderr
        assert "2026-11-30T07:00:00" in stderr and not (tmp_path / "titles").exists()
    finally:
        holder.kill()
        holder.wait()


def test_a_dead_runs_lock_is_taken_over(films, checkpoint, tmp_path, ray_session):
    from kissray.batch.lock import LOCK_NAME, OutLock
    from kissray.batch.tables import ResultStore
    from kissray.pipeline import score_library

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = {"host": socket.gethostname(), "pid": int(dead.stdout), "pid_start": "1", "started": "then",
             "run": "dead", "heartbeat": 0}
    (tmp_path / LOCK_NAME).write_text(json.dumps(stale))
    summary = score_library([films["clean"]], checkpoint, str(tmp_path), progress=False)
    assert summary.n_ok == 1 and not (tmp_path / LOCK_NAME).exists()  # released at the end
    other_host = {**stale, "host": "elsewhere", "heartbeat": 0}  # a stale heartbeat from another host
    (tmp_path / LOCK_NAME).write_text(json.dumps(other_host))
    store = ResultStore(str(tmp_path))
    with OutLock(store.fs, store.root, store.out) as lock:
        assert json.loads((tmp_path / LOCK_NAME).read_text())["run"] == lock.holder["run"]


def test_a_file_with_glob_characters_in_its_name_is_a_file(films, tmp_path):
    from kissray.inputs import expand_inputs

    path = tmp_path / "Casablanca [1942].mp4"
    path.write_bytes(open(films["clean"], "rb").read())
    (title,) = expand_inputs([str(path)])
    assert (title.title_id, title.uri) == ("Casablanca [1942]", str(path))


def wait_for_file(path, timeout_s: float = 180.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not os.path.exists(path):
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.1)


DEADLY = ("clean", "decode", "classifier", "write")  # title ids: the fault each one carries


@pytest.fixture(scope="module")
def deadly_run(checkpoint, tmp_path_factory, ray_session):
    """One run with real process deaths: every decode task of ``decode`` and every classifier
    call on ``classifier``'s clips SIGKILLs its process (a segfault, the OOM killer); the writer
    finishing ``write`` hands that title to a late writer of its own and dies."""
    from kissray.pipeline import score_library

    root = tmp_path_factory.mktemp("deadly")
    films = {name: make_film(root / f"{name}.mp4", 3) for name in DEADLY}
    plan = FaultPlan(kill_at=(("decode", "decode"), ("classifier", "classifier")), linger_at=("write",),
                     marker_dir=str(root / "markers"))
    os.makedirs(plan.marker_dir)
    summary = score_library(list(films.values()), checkpoint, str(root / "out"), params=PARAMS, window_s=3,
                            batch_size=4, decode_timeout_s=20, progress=False, faults=plan)
    return summary, root / "out", Path(plan.marker_dir), films


def test_a_title_that_kills_its_worker_every_time_fails_alone(deadly_run, model):
    """Retried alone, then failed alone with that reason; every title beside it ok in the same run."""
    from kissray.batch.ledger import MAX_DEATHS

    summary, out, markers, films = deadly_run
    for stage in ("decode", "classifier"):  # real deaths, each of another process
        pids = {m.name.rsplit("-", 1)[1] for m in markers.glob(f"killed-{stage}-{stage.encode().hex()}-*")}
        assert len(pids) >= MAX_DEATHS, (stage, pids)
    titles = read(out, "titles").set_index("title_id")
    assert sorted(titles.index) == sorted(DEADLY)
    for title_id in ("decode", "classifier"):
        assert titles.status[title_id] == "failed", titles.error[title_id]
        assert f"died {MAX_DEATHS} times" in titles.error[title_id] and "out of memory" in titles.error[title_id]
    others = ["clean", "write"]
    assert (titles.status[others] == "ok").all(), titles.error[others]
    assert (summary.n_ok, summary.n_failed, summary.n_partial) == (2, 2, 0)
    scores = read(out, "scores")
    assert not scores.duplicated(["title_id", "label", "second"]).any() and set(scores.title_id) == set(others)
    for title_id in others:
        got = scores[scores.title_id == title_id].sort_values("second").p
        np.testing.assert_allclose(got, expected_probs(films[title_id], model), atol=1e-5)


def test_a_late_writer_never_replaces_a_later_result(deadly_run):
    """The writer process finishing ``write`` dies while a late writer holds its result; a later
    writer process commits the title; the late writer then writes what the dead one would have
    (the writer's own call): it is never committed."""
    import pyarrow.parquet as pq

    summary, out, markers, _ = deadly_run
    (payload,) = markers.glob("lingered-*.pickle")
    wait_for_file(f"{payload}.done")
    late_write_began = float(Path(f"{payload}.done").read_text())
    committed = pq.read_table(out / "titles" / "write.parquet").to_pylist()
    assert len(committed) == 1 and committed[0]["status"] == "ok"
    assert committed[0]["scored_at"].timestamp() < late_write_began  # the later writer's row stands
    for table in ("scores", "segments", "titles"):  # one visible file per title, nothing else
        visible = sorted(p.name for p in (out / table).iterdir() if not p.name.startswith("."))
        assert visible == sorted(f"{t}.parquet" for t in DEADLY), table


def test_a_ray_client_with_a_local_out_is_refused(films, checkpoint, tmp_path, capsys):
    """SPEC 7: the cluster's writer cannot reach this machine's disk; usage error, nothing written."""
    from kissray.cli import main as cli_main

    code = cli_main(["score", films["clean"], "--model", checkpoint, "--out", str(tmp_path / "out"),
                     "--address", "ray://127.0.0.1:1", "--no-progress"])
    assert code == 2
    err = capsys.readouterr().err
    assert "ray://127.0.0.1:1" in err and "local folder" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_the_driver_counts_the_status_that_stands(films, checkpoint, tmp_path):
    """A failed result the writer could not write, for a title already ok: the row stays ok and
    the run counts it ok (the exit code agrees with the rows)."""
    from kissray.batch.tables import TitleRecord, scores_table, segments_table
    from kissray.pipeline import _commit, prepare_library

    job = prepare_library([films["clean"]], checkpoint, str(tmp_path))
    ok = TitleRecord("clean", films["clean"], "ok", None, 4.0, 4, 4, True, checkpoint)
    job.store.write_title(ok, scores_table("clean", ["kiss"], np.full((4, 1), 0.5, np.float32)),
                          segments_table("clean", []))
    row = {"title_id": "clean", "status": "failed", "error": "cannot finish the title", "staged": ""}
    assert _commit(job, row) == "ok"
    assert read(tmp_path, "titles").status.tolist() == ["ok"]


def test_a_cpu_pool_tells_the_classifier_its_device(checkpoint, ray_session):
    """--num-gpus-per-actor 0: the classifier is told cpu, so an actor that can see a GPU does not
    use one it did not reserve."""
    import torch

    from kissray.batch.stages import Classifier
    from kissray.pipeline import plan_pool

    pool = plan_pool(num_gpus_per_actor=0)
    assert (pool.gpus_per_actor, pool.device) == (0.0, "cpu")
    classifier = Classifier(checkpoint, device=pool.device)
    assert next(classifier.scorer.model.parameters()).device == torch.device("cpu")
    assert plan_pool(num_gpus_per_actor=1).device is None  # a reserved GPU: the scorer picks it
