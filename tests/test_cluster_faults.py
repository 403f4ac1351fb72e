"""The library job on a real multi-node Ray (``ray.cluster_utils.Cluster``: a head and two worker
raylets on this machine, 1 CPU each) while actors are killed, or a GPU node joins and a worker
node is removed, mid-run: every title ``ok`` in the same run, one row each, scores equal to
``score_film``.

Each scenario runs ``benchmarks/cluster_faults.py`` in its own process: a process can hold one
Ray connection, and this test session already has its local Ray.
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
SECONDS = (7, 8, 9)  # each longer than one window: the writer holds earlier rows of a title (writer_killed)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def films(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cluster-films")
    for i, seconds in enumerate(SECONDS):
        make_film(root / f"film{i}.mp4", seconds)
    return root


def run_scenario(scenario: str, films: Path, checkpoint: str, out: Path) -> dict:
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "cluster_faults.py"), "--films", str(films),
                           "--model", checkpoint, "--out", str(out), "--scenario", scenario],
                          capture_output=True, text=True, timeout=480, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def expected(films, checkpoint) -> dict[str, np.ndarray]:
    """``score_film`` of each film, computed once for the four scenarios."""
    from kissray.model import load_model

    model = load_model(checkpoint)
    return {p.stem: score_film(str(p), model).probs[:, 0] for p in sorted(films.iterdir())}


EXPECTED_ACTIONS = {
    "actors_killed": ["SIGKILL to the held Classifier", "SIGKILL to the held TitleWriter"],
    "nodes_changed": ["added a GPU node", "removed a worker node"],
}


@pytest.mark.parametrize("scenario", ["actors_killed", "nodes_changed"])
def test_every_title_ok_in_the_same_run(scenario, films, expected, checkpoint, tmp_path):
    """Two harms in each run: the classifier and then the writer SIGKILLed while each holds a title;
    a GPU node joining (the pool must grow onto it) and then a worker node removed. The job waits
    at a hold point while each harm is done (benchmarks/cluster_faults.py ``steps``), so it lands
    mid-run by construction; what the pool did is read from the GCS actor table afterwards."""
    result = run_scenario(scenario, films, checkpoint, tmp_path)
    assert sorted(result["actions"]) == sorted(EXPECTED_ACTIONS[scenario]), result  # each harm done, on a held actor
    assert result["at_titles"] < len(expected), result  # ... before the last title was committed
    assert (result["n_ok"], result["n_failed"], result["n_partial"]) == (len(expected), 0, 0), result
    titles = pd.read_parquet(tmp_path / "titles")
    assert sorted(titles.title_id) == sorted(expected) and (titles.status == "ok").all()
    scores = pd.read_parquet(tmp_path / "scores")
    assert not scores.duplicated(["title_id", "label", "second"]).any()
    for title_id, probs in expected.items():
        got = scores[scores.title_id == title_id].sort_values("second").p.to_numpy()
        np.testing.assert_allclose(got, probs, atol=1e-5, err_msg=title_id)
    if scenario == "nodes_changed":  # the pool grew onto the GPU node that joined: two at once, one there
        assert result["added_node"] in result["classifier_nodes"], result
        assert result["max_classifiers"] == 2, result
    if scenario == "actors_killed":  # the writer died holding a title's earlier rows: it was re-submitted
        assert result["attempts"] >= 2, result
