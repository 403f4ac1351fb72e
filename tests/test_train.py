"""Training: a tiny run that measurably learns, the saved checkpoint, both modes, and the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import make_film
from kissray.annotations import parse_annotations, split_films
from kissray.cli import main
from kissray.evaluate import evaluate
from kissray.model import load_model
from kissray.train import TrainOptions, augment, read_metrics, start_model, train

FILM_S = 8


@pytest.fixture(scope="module")
def tone_corpus(tmp_path_factory) -> str:
    """Seven 8 s films; ``kiss`` is the seconds with the 1 kHz tone (separable by audio)."""
    root = tmp_path_factory.mktemp("tone-corpus")
    rows = ["uri,start_s,end_s,label"]
    for i in range(7):
        tone = [s for s in range(FILM_S) if (s + i) % 3 == 0]
        path = make_film(root / f"film{i}.mp4", duration_s=FILM_S, tone_seconds=tone)
        rows += [f"{path},{s},{s + 1},{'kiss' if s in tone else 'none'}" for s in range(FILM_S)]
    (root / "ann.csv").write_text("\n".join(rows) + "\n")
    return str(root / "ann.csv")


@pytest.fixture(scope="module")
def head_run(tone_corpus, tmp_path_factory):
    from kissray.annotations import read_annotations

    out = str(tmp_path_factory.mktemp("head") / "ck")
    options = TrainOptions(mode="head", image_size=64, epochs=8, lr=1e-2, batch_size=8, seed=1)
    return read_annotations(tone_corpus), out, train(read_annotations(tone_corpus), out, options,
                                                     show_progress=False)


def test_head_training_learns(head_run):
    _, _, metrics = head_run
    losses = [e["loss"] for e in metrics["epochs"]]
    assert len(losses) == 8 and losses[-1] < 0.6 * losses[0]
    # chance for always-"kiss" is F1 = 2p / (1 + p) ~ 0.5 at a third of positives
    assert metrics["final"]["train"]["kiss"]["f1"] >= 0.9
    assert metrics["final"]["val"]["kiss"]["f1"] >= 0.8
    assert metrics["final"]["test"]["kiss"]["f1"] >= 0.8


def test_metrics_are_saved_per_epoch_and_split_with_the_film_split(head_run):
    ann, out, metrics = head_run
    saved = read_metrics(out)
    assert saved == json.loads(json.dumps(metrics))
    assert set(saved["final"]) == {"train", "val", "test"}
    assert {"epoch", "loss", "train", "val", "val_loss", "seconds"} <= set(saved["epochs"][0])
    best = saved["epochs"][saved["best_epoch"] - 1]["val"]["kiss"]["f1"]
    assert best == max(e["val"]["kiss"]["f1"] for e in saved["epochs"])
    films = [f for split in saved["splits"].values() for f in split]
    assert sorted(films) == sorted(ann.films) and len(set(films)) == len(films)
    assert saved["splits"] == split_films(ann, seed=1)
    assert saved["n_clips"] == {k: FILM_S * len(v) for k, v in saved["splits"].items()}


def test_saved_checkpoint_scores_like_the_trained_head(head_run):
    ann, out, metrics = head_run
    model = load_model(out)
    assert model.labels == ["kiss"] and model.config.image_size == 64
    report = evaluate(ann, model, split="test", seed=1)
    assert report["per_second"]["kiss"]["f1"] == pytest.approx(metrics["final"]["test"]["kiss"]["f1"])
    assert report["per_second"]["kiss"]["tp"] == metrics["final"]["test"]["kiss"]["tp"]


def test_full_mode_fine_tunes_the_backbones(tone_corpus, tmp_path, checkpoint):
    from kissray.annotations import read_annotations

    ann = read_annotations(tone_corpus)
    before = load_model(checkpoint)
    metrics = train(ann, str(tmp_path / "full"), TrainOptions(mode="full", epochs=1, batch_size=16, seed=0),
                    init=checkpoint, show_progress=False)
    after = load_model(str(tmp_path / "full"))
    assert metrics["options"]["mode"] == "full" and np.isfinite(metrics["epochs"][0]["loss"])
    conv = "resnet.conv1.weight"
    assert not torch.equal(before.state_dict()[conv], after.state_dict()[conv])
    assert not torch.equal(before.state_dict()["vggish.features.0.weight"], after.state_dict()["vggish.features.0.weight"])


def test_init_checkpoint_gives_backbones_and_new_labels_get_a_fresh_head(checkpoint):
    base = load_model(checkpoint)
    model = start_model(["kiss", "explicit"], TrainOptions(modality="video"), init=checkpoint)
    assert model.labels == ["kiss", "explicit"] and model.vggish is None
    assert torch.equal(model.resnet.conv1.weight, base.resnet.conv1.weight)
    assert torch.equal(model.head.weight[0], base.head.weight[0][:512]) is False  # head width differs: fresh
    same = start_model(["kiss"], TrainOptions(), init=checkpoint)
    assert torch.equal(same.head.weight, base.head.weight)


def test_augment_keeps_shapes_and_range_and_is_seeded():
    frames = torch.randint(0, 256, (4, 2, 32, 32, 3), dtype=torch.uint8)
    log_mel = torch.zeros(4, 96, 64)
    a = augment(frames, log_mel, torch.Generator().manual_seed(0))
    b = augment(frames, log_mel, torch.Generator().manual_seed(0))
    assert a[0].shape == (4, 2, 32, 32, 3) and a[1].shape == (4, 96, 64)
    assert float(a[0].min()) >= 0 and float(a[0].max()) <= 255
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], frames.float())


def test_bad_options_are_usage_errors():
    from kissray.errors import UsageError

    with pytest.raises(UsageError):
        TrainOptions(mode="partial")
    with pytest.raises(UsageError):
        TrainOptions(epochs=0)


def test_cli_train_then_eval(tone_corpus, tmp_path, capsys):
    out = tmp_path / "ck"
    code = main(["train", "--annotations", tone_corpus, "--out", str(out), "--epochs", "3", "--lr", "0.01",
                 "--batch-size", "8", "--image-size", "64", "--seed", "2"])
    assert code == 0 and (out / "metrics.json").exists()
    assert "best epoch" in capsys.readouterr().out
    code = main(["eval", "--annotations", tone_corpus, "--model", str(out), "--out", str(tmp_path / "eval.json"),
                 "--min-len", "1"])
    report = json.loads((tmp_path / "eval.json").read_text())
    assert code == 0 and report["seed"] == 2 and report["split"] == "test"
    assert report["films"] == split_films(parse_annotations(open(tone_corpus).read()), seed=2)["test"]
    assert set(report["per_second"]["kiss"]) >= {"precision", "recall", "f1", "accuracy"}
    assert report["segmenter"]["min_len"] == 1


def test_cli_reports_bad_annotation_rows(tmp_path, capsys):
    bad = tmp_path / "bad.csv"
    bad.write_text("uri,start_s,end_s,label\nnowhere.mp4,3,1,kiss\nnowhere.mp4,4,6,kiss\n")
    assert main(["train", "--annotations", str(bad), "--out", str(tmp_path / "ck")]) == 2
    err = capsys.readouterr().err
    assert "line 2: end_s 1 <= start_s 3" in err and f"line 3: film not found: {tmp_path}/nowhere.mp4" in err


def test_embedding_on_ray_matches_embedding_here(tone_corpus, checkpoint, ray_session):
    from kissray.annotations import read_annotations
    from kissray.train import embed_on_ray, load_clip_set

    ann = read_annotations(tone_corpus)
    model = load_model(checkpoint)
    films = ann.films[:3]
    skipped: list[str] = []
    on_ray = embed_on_ray(films, ann, model, "ignore", skipped, n_workers=2)
    assert list(on_ray) == films and skipped == []
    for uri in films:
        here = load_clip_set([uri], ann, model, True, "ignore", [])
        assert np.array_equal(on_ray[uri].targets, here.targets)
        np.testing.assert_allclose(on_ray[uri].features, here.features, rtol=1e-4, atol=1e-4)


def test_head_training_with_ray_workers(tone_corpus, head_run, tmp_path, ray_session):
    ann, _, local = head_run
    options = TrainOptions(mode="head", image_size=64, epochs=8, lr=1e-2, batch_size=8, seed=1, ray_workers=2)
    metrics = train(ann, str(tmp_path / "ck"), options, show_progress=False)
    assert metrics["n_clips"] == local["n_clips"] and metrics["n_positive"] == local["n_positive"]
    assert metrics["final"]["test"]["kiss"]["f1"] == pytest.approx(local["final"]["test"]["kiss"]["f1"], abs=0.1)
