"""The library job on a real multi-node Ray (``ray.cluster_utils.Cluster``: a head and two worker
raylets on this machine, 1 CPU each) while a node is removed, an actor is killed, or GPU nodes
join mid-run: every title ``ok`` in the same run, one row each, scores equal to ``score_film``.

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
SECONDS = (9, 10, 11, 12, 13)  # titles longer than one block of clips: some are open at any moment

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def films(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cluster-films")
    for i, seconds in enumerate(SECONDS):
        make_film(root / f"film{i}.mp4", seconds)
    return root


def run_scenario(scenario: str, films: Path, checkpoint: str, out: Path) -> dict:
    # the GPU node joins as soon as the job runs: the pool then has minutes of film to grow on
    after = ["--after-titles", "0"] if scenario == "gpu_added" else []
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "cluster_faults.py"), "--films", str(films),
                           "--model", checkpoint, "--out", str(out), "--scenario", scenario, *after],
                          capture_output=True, text=True, timeout=480, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


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

    path = str(tmp_path_factory.mktemp("ckpt224") / "ck")
    save_model(init_model(ModelConfig(labels=["kiss"], image_size=448), seed=0), path)
    return path


@pytest.mark.parametrize("scenario", ["node_removed", "classifier_killed", "writer_killed", "gpu_added"])
def test_every_title_ok_in_the_same_run(scenario, films, long_films, checkpoint, slow_checkpoint, tmp_path):
    from kissray.model import load_model

    if scenario == "gpu_added":
        films, checkpoint = long_films, slow_checkpoint
    model = load_model(checkpoint)
    expected = {p.stem: score_film(str(p), model).probs[:, 0] for p in sorted(films.iterdir())}
    result = run_scenario(scenario, films, checkpoint, tmp_path)
    assert result["action"] and result["action"] != "nothing", result  # the harm was done mid-run
    if scenario.endswith("_killed"):  # a process was actually killed
        assert result["action"] == "SIGKILL to 1 actor(s)", result
    assert result["at_titles"] < len(expected), result
    assert (result["n_ok"], result["n_failed"], result["n_partial"]) == (len(expected), 0, 0), result
    titles = pd.read_parquet(tmp_path / "titles")
    assert sorted(titles.title_id) == sorted(expected) and (titles.status == "ok").all()
    scores = pd.read_parquet(tmp_path / "scores")
    assert not scores.duplicated(["title_id", "label", "second"]).any()
    for title_id, probs in expected.items():
        got = scores[scores.title_id == title_id].sort_values("second").p.to_numpy()
        np.testing.assert_allclose(got, probs, atol=1e-5, err_msg=title_id)
    if scenario == "gpu_added":  # the pool grew onto the GPU node that joined
        assert result["max_classifiers"] == 2, result
    if scenario == "writer_killed":  # the titles it held were re-submitted
        assert result["attempts"] >= 2, result
