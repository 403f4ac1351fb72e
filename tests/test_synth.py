"""The synthetic corpus: scene plans, annotations that match what is on screen and on the sound track."""

from __future__ import annotations

import numpy as np
import pytest

from kissray.annotations import read_annotations, split_films
from kissray.media import iter_clips, probe
from kissray.synth import KISS_GAP_S, SKIN, make_corpus, make_film, plan_film, scene_spans


@pytest.mark.parametrize("seed", range(40))
def test_plans_fill_the_film_with_separated_kisses(seed):
    rng = np.random.default_rng(seed)
    duration_s = int(rng.integers(30, 61))
    spans = scene_spans(plan_film(rng, duration_s))
    assert spans[0][0] == 0 and spans[-1][1] == duration_s
    assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))  # contiguous, no overlap
    kisses = [(a, b) for a, b, label in spans if label == "kiss"]
    assert kisses and all(b - a >= 10 for a, b in kisses)
    assert all(nxt[0] - prev[1] >= KISS_GAP_S for prev, nxt in zip(kisses, kisses[1:]))
    assert {label for _, _, label in spans} <= {"kiss", "none"}


def test_plans_are_seeded():
    assert plan_film(np.random.default_rng(7), 45) == plan_film(np.random.default_rng(7), 45)


@pytest.fixture(scope="module")
def synth_film(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("synth") / "film.mp4")
    return path, make_film(path, 40, seed=3)


def test_kiss_seconds_sound_and_look_different(synth_film):
    path, spans = synth_film
    assert probe(path).n_clips == 40
    kiss = np.zeros(40, bool)
    for a, b, label in spans:
        kiss[a:b] = label == "kiss"
    clips = list(iter_clips(path, size=32))
    tone_band = np.array([c.log_mel[:, 36:38].mean() for c in clips])  # HTK mel bands around 2.4 kHz
    assert tone_band[kiss].min() > tone_band[~kiss].max() + 1.0
    skin = np.array([(np.abs(c.frames[0].astype(float) - SKIN).max(axis=-1) < 40).mean() for c in clips])
    assert skin[kiss].mean() > 2 * skin[~kiss].mean()  # the close-up of the two faces


def test_corpus_has_a_valid_csv_with_held_out_films(tmp_path):
    csv_path = make_corpus(str(tmp_path), n_train=3, n_test=1, duration_s=(30, 31), seed=1)
    ann = read_annotations(csv_path)
    assert ann.labels == ["kiss"] and len(ann.films) == 4
    splits = split_films(ann)
    assert splits["test"] == [str(tmp_path / "synth-003.mp4")]
    assert len(splits["train"]) == 2 and len(splits["val"]) == 1
