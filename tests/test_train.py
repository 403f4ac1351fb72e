"""Training: a tiny run that measurably learns, the saved checkpoint, both modes, and the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import make_film
from kissray.cli import main
from kissray.evaluate import evaluate
from kissray.model import load_model
from kissray.train import (ClipSet, TrainOptions, augment, class_balance, fit, full_job, head_job, loss_function,
                           read_metrics, sampling_weights, selection_score, start_model, train)

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


def seeded_split(films: list[str], seed: int) -> dict[str, list[str]]:
    """The film split spelled out for a corpus without a split column: the sorted films shuffled by
    numpy's generator with the seed, then one film for val, one for test (10% of 7, at least one
    each), the rest for train."""
    free = sorted(films)
    shuffled = [free[i] for i in np.random.default_rng(seed).permutation(len(free))]
    assert len(shuffled) == 7
    return {"train": shuffled[2:], "val": shuffled[:1], "test": shuffled[1:2]}


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
    # kept: the highest val AP, then F1, then the lowest val loss, then the earliest epoch
    keys = [(e["val"]["kiss"]["ap"], e["val"]["kiss"]["f1"], -e["val_loss"]) for e in saved["epochs"]]
    assert saved["best_epoch"] == 1 + keys.index(max(keys))
    assert saved["selection"] == {"split": "val", "metric": "ap", "rule": "highest mean AP on val, then mean F1 "
                                  "at 0.5, then lowest val loss, then the earliest epoch"}
    assert saved["balance"]["method"] == "none" and saved["balance"]["requested"] == "auto"  # a third positive
    assert saved["balance"]["positive_rate"]["kiss"] == pytest.approx(saved["n_positive"]["train"]["kiss"]
                                                                      / saved["n_clips"]["train"])
    films = [f for split in saved["splits"].values() for f in split]
    assert sorted(films) == sorted(ann.films) and len(set(films)) == len(films)
    assert saved["splits"] == seeded_split(ann.films, seed=1)
    assert saved["n_clips"] == {k: FILM_S * len(v) for k, v in saved["splits"].items()}


def test_checkpoint_knows_what_it_was_trained_on(head_run):
    """SPEC 4: config.json names the annotations, the films per split and the held-out metrics."""
    from kissray.model import load_model
    from kissray.provenance import describe, state

    ann, out, metrics = head_run
    record = load_model(out).config.provenance
    assert state(record) == "trained" and record["annotations"] == ann.path
    assert record["films"] == {split: len(films) for split, films in metrics["splits"].items()}
    assert record["metrics"]["test"]["kiss"]["f1"] == pytest.approx(metrics["final"]["test"]["kiss"]["f1"])
    assert describe(record).startswith(f"head trained on {ann.path} (7 films: ")


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
    with pytest.raises(UsageError, match="balance"):
        TrainOptions(balance="oversample")
    with pytest.raises(UsageError, match="select_on"):
        TrainOptions(select_on="loss")


def test_class_balance_is_chosen_from_label_frequencies():
    third = np.array([[1], [0], [0]] * 10, np.float32)
    assert class_balance(third, ["kiss"])["method"] == "none"  # 1/3 positive: the paper's recipe as is
    rare = np.array([[1]] + [[0]] * 19, np.float32)
    balance = class_balance(rare, ["kiss"])
    assert balance["method"] == "pos-weight" and balance["pos_weight"] == {"kiss": 19.0}
    assert balance["positive_rate"] == {"kiss": 0.05}
    common = np.array([[1, 1]] * 9 + [[0, 1]], np.float32)  # kiss 90 %, hug 100 %: both skewed
    # hug has no negative: nothing to balance, and a weight of 0 would silence its positives
    assert class_balance(common, ["kiss", "hug"])["pos_weight"] == {"kiss": pytest.approx(1 / 9), "hug": 1.0}
    assert class_balance(rare, ["kiss"], "none")["method"] == "none"  # the flag overrides
    assert class_balance(rare, ["kiss"], "sample") == {**balance, "method": "sample", "requested": "sample",
                                                       "pos_weight": None}


def test_sampling_weights_give_each_label_combination_equal_mass():
    targets = np.array([[1, 0]] * 2 + [[0, 0]] * 6 + [[1, 1]] * 1 + [[0, 1]] * 3, np.float32)
    weights = sampling_weights(targets)
    groups = [slice(0, 2), slice(2, 8), slice(8, 9), slice(9, 12)]
    assert [float(weights[g].sum()) for g in groups] == pytest.approx([1.0] * 4)


def test_positive_weight_scales_the_loss_of_positives_only():
    logits, pos, neg = torch.tensor([[0.3]]), torch.tensor([[1.0]]), torch.tensor([[0.0]])
    plain = loss_function({"pos_weight": None}, ["kiss"])
    weighted = loss_function({"pos_weight": {"kiss": 4.0}}, ["kiss"])
    assert float(weighted(logits, pos)) == pytest.approx(4 * float(plain(logits, pos)))
    assert float(weighted(logits, neg)) == pytest.approx(float(plain(logits, neg)))


def test_full_mode_trains_with_the_positive_weight():
    from kissray.model import ModelConfig, init_model

    frames = np.random.default_rng(0).integers(0, 256, (4, 1, 32, 32, 3), dtype=np.uint8)
    sets = {"train": ClipSet(np.ones((4, 1), np.float32), frames=frames, log_mel=np.zeros((4, 96, 64), np.float32))}
    losses = []
    for weight in (1.0, 3.0):  # same seed: same augmentation, same batch statistics
        model = init_model(ModelConfig(labels=["kiss"], modality="video", image_size=32), seed=0)
        job = full_job(model, sets, 0, loss_function({"pos_weight": {"kiss": weight}}, ["kiss"]))
        losses.append(float(job.loss_on(torch.arange(4)).detach()))
    assert losses[1] == pytest.approx(3 * losses[0], rel=1e-5)  # every target positive


def _rare_overlapping_set(n: int, rng: np.random.Generator) -> ClipSet:
    """5 % positives whose 128-d features are shifted by 1.5 sd on one axis: overlapping classes."""
    targets = (rng.random(n) < 0.05).astype(np.float32)[:, None]
    features = rng.normal(size=(n, 128)).astype(np.float32)
    features[:, 0] += 1.5 * targets[:, 0]
    return ClipSet(targets, features=features)


@pytest.mark.parametrize("method", ["pos-weight", "sample"])
def test_balancing_raises_recall_of_a_rare_label(method):
    """Unweighted, a rare label that overlaps the negatives is seldom >= 0.5 (recall ~0.1 for the ideal
    classifier); balanced, most of it is (~0.75)."""
    from kissray.model import ModelConfig, init_model

    rng = np.random.default_rng(0)
    sets = {"train": _rare_overlapping_set(10000, rng), "val": _rare_overlapping_set(2000, rng)}
    recall = {}
    for choice in ("none", method):
        model = init_model(ModelConfig(labels=["kiss"], modality="audio"), seed=0)
        options = TrainOptions(epochs=5, lr=2e-2, batch_size=256, balance=choice)
        balance = class_balance(sets["train"].targets, ["kiss"], choice)
        job, _ = head_job(model, sets, loss_function(balance, ["kiss"]))
        metrics = fit(job, sets, ["kiss"], options, balance, show_progress=False)
        recall[choice] = metrics["final"]["val"]["kiss"]["recall"]
    assert recall["none"] < 0.2 and recall[method] > 0.55, recall


def test_selection_ranks_ap_or_f1_first():
    record = {"val": {"kiss": {"ap": 0.6, "f1": 0.2}, "hug": {"ap": None, "f1": 0.4}}, "val_loss": 0.5}
    assert selection_score(record, "val", "ap") == pytest.approx((0.6, 0.3, -0.5))  # undefined AP left out
    assert selection_score(record, "val", "f1") == pytest.approx((0.3, 0.6, -0.5))
    no_positive = {"val": {"kiss": {"ap": None, "f1": 0.0}}, "val_loss": 0.1}
    assert selection_score(no_positive, "val", "ap") == (-1.0, 0.0, -0.1)


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
    trained_on = read_metrics(str(out))["splits"]
    assert report["films"] == trained_on["test"] == seeded_split(trained_on["train"] + trained_on["val"]
                                                                 + trained_on["test"], seed=2)["test"]
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
