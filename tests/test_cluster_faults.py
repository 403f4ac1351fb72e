"""The library job on a real multi-node Ray (``ray.cluster_utils.Cluster``: a head and two worker
raylets on this machine, 1 CPU each) while a GPU node joins, actors are killed and a worker node
is removed, mid-run: every title ``ok`` in the same run, one row each, scores equal to
``score_film``.

The run is ``benchmarks/cluster_faults.py`` (scenario ``churn``) in its own process: a process can
hold one Ray connection, and this test session already has its local Ray.
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
    """``score_film`` of each film (the oracle: the network fed each film, one at a time)."""
    from kissray.model import load_model

    model = load_model(checkpoint)
    return {p.stem: score_film(str(p), model).probs[:, 0] for p in sorted(films.iterdir())}


EXPECTED_ACTIONS = ["added a GPU node", "SIGKILL to the held Classifier", "removed a worker node",
                    "SIGKILL to the held TitleWriter"]


def test_every_title_ok_in_the_same_run_through_four_harms(films, expected, checkpoint, tmp_path):
    """One run, four harms (scenario ``churn``): while the classifier holds the first title, a GPU
    node joins (the pool must grow onto it), the held classifier is SIGKILLed and the CPU worker
    node is removed; then the writer is SIGKILLed while it holds a later title's earlier rows. The
    job waits at a hold point while each harm is done (benchmarks/cluster_faults.py ``steps``), so
    it lands mid-run by construction; what the pool did is read from the GCS actor table afterwards."""
    result = run_scenario("churn", films, checkpoint, tmp_path)
    assert sorted(result["actions"]) == sorted(EXPECTED_ACTIONS), result  # each harm done, on a held actor
    assert result["at_titles"] < len(expected), result  # ... before the last title was committed
    assert (result["n_ok"], result["n_failed"], result["n_partial"]) == (len(expected), 0, 0), result
    titles = pd.read_parquet(tmp_path / "titles")
    assert sorted(titles.title_id) == sorted(expected) and (titles.status == "ok").all()
    scores = pd.read_parquet(tmp_path / "scores")
    assert not scores.duplicated(["title_id", "label", "second"]).any()
    for title_id, probs in expected.items():
        got = scores[scores.title_id == title_id].sort_values("second").p.to_numpy()
        np.testing.assert_allclose(got, probs, atol=1e-5, err_msg=title_id)
    # the pool grew onto the GPU node that joined: two classifiers at once, one of them there
    assert result["added_node"] in result["classifier_nodes"], result
    assert result["max_classifiers"] == 2, result
    assert result["attempts"] >= 2, result  # the writer died holding a title's earlier rows: re-submitted
