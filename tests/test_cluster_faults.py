"""The library job on a real multi-node Ray (``ray.cluster_utils.Cluster``: a head and two worker
raylets on this machine, 1 CPU each) while a node is removed, an actor is killed, or GPU nodes
join mid-run: every title ``ok`` in the same run, one row each, scores equal to ``score_film``.

The scenarios run in ``benchmarks/cluster_faults.py``, in a process of its own (a process can hold
one Ray connection, and this test session already has its local Ray): the three faults one after
the other on one cluster, the GPU node joining on a cluster of its own.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from conftest import make_film
from kissray.score import score_film

ROOT = Path(__file__).resolve().parents[1]
SECONDS = (9, 10, 11, 12, 13)  # titles longer than one block of clips: some are open at any moment
# one cluster, one job after another; the writer's first, on a cold cluster as when it ran alone: on a warm one
# the job is quicker and the writer is more often killed between titles (nothing of it to re-submit)
LOST_AND_KILLED = ["writer_killed", "node_removed", "classifier_killed"]

# three jobs share one fixture: pytest-timeout's 600 s is per test, setup included (a loaded box is slow)
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]


@pytest.fixture(scope="module")
def films(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cluster-films")
    for i, seconds in enumerate(SECONDS):
        make_film(root / f"film{i}.mp4", seconds)
    return root


@pytest.fixture(scope="module")
def long_films(tmp_path_factory) -> Path:
    """Two minutes of film for a slow model: the job is still young when the GPU node joins."""
    root = tmp_path_factory.mktemp("cluster-long-films")
    for i, seconds in enumerate((6, 40, 40, 40)):
        make_film(root / f"long{i}.mp4", seconds)
    return root


@pytest.fixture(scope="module")
def slow_checkpoint(tmp_path_factory) -> str:
    """A 448-px model: on CPU it is much slower than decoding, so the classifier pool has a queue
    to grow for when a GPU node joins."""
    from kissray.model import ModelConfig, init_model, save_model

    path = str(tmp_path_factory.mktemp("ckpt448") / "ck")
    save_model(init_model(ModelConfig(labels=["kiss"], image_size=448), seed=0), path)
    return path


def run_scenarios(scenarios: list[str], films: Path, checkpoint: str, out: Path) -> dict[str, dict]:
    """Scenarios in turn on one cluster (one interpreter, one cluster start-up): scenario -> result."""
    # the GPU node joins as soon as the job runs: the pool then has minutes of film to grow on
    after = ["--after-titles", "0"] if scenarios == ["gpu_added"] else []
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "cluster_faults.py"), "--films", str(films),
                           "--model", checkpoint, "--out", str(out), "--scenario", *scenarios, *after],
                          capture_output=True, text=True, timeout=1700, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    results = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    return {r["scenario"]: r for r in results}


def expected_scores(films: Path, checkpoint: str) -> dict[str, np.ndarray]:
    from kissray.model import load_model

    model = load_model(checkpoint)
    return {p.stem: score_film(str(p), model).probs[:, 0] for p in sorted(films.iterdir())}


@pytest.fixture(scope="module")
def lost_and_killed(films, checkpoint, tmp_path_factory) -> tuple[Path, dict[str, dict], dict[str, np.ndarray]]:
    """A node removed, the classifier killed, the writer killed: three jobs on one cluster."""
    out = tmp_path_factory.mktemp("cluster-out")
    return out, run_scenarios(LOST_AND_KILLED, films, checkpoint, out), expected_scores(films, checkpoint)


def assert_every_title_ok(result: dict, out: Path, expected: dict[str, np.ndarray]) -> None:
    assert result["action"] and result["action"] != "nothing", result  # the harm was done mid-run
    assert result["at_titles"] < len(expected), result
    assert (result["n_ok"], result["n_failed"], result["n_partial"]) == (len(expected), 0, 0), result
    titles = pd.read_parquet(out / "titles")
    assert sorted(titles.title_id) == sorted(expected) and (titles.status == "ok").all()
    scores = pd.read_parquet(out / "scores")
    assert not scores.duplicated(["title_id", "label", "second"]).any()
    for title_id, probs in expected.items():
        got = scores[scores.title_id == title_id].sort_values("second").p.to_numpy()
        np.testing.assert_allclose(got, probs, atol=1e-5, err_msg=title_id)


@pytest.mark.parametrize("scenario", LOST_AND_KILLED)
def test_every_title_ok_in_the_same_run(scenario, lost_and_killed):
    out, results, expected = lost_and_killed
    result = results[scenario]
    assert_every_title_ok(result, out / scenario, expected)
    if scenario == "writer_killed":  # the titles it held were re-submitted
        assert result["attempts"] >= 2, json.dumps(result)


def test_the_classifier_pool_grows_onto_a_gpu_node_that_joins(long_films, slow_checkpoint, tmp_path):
    result = run_scenarios(["gpu_added"], long_films, slow_checkpoint, tmp_path)["gpu_added"]
    assert_every_title_ok(result, tmp_path, expected_scores(long_films, slow_checkpoint))
    # a classifier takes a GPU, so the second node that ran one is the node that joined
    assert result["classifier_nodes"] == 2 and result["max_classifiers"] == 2, result
