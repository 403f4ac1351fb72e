"""Review answers as files (one per answer, latest wins) and as annotations (``not:<label>``)."""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

from kissray.annotations import ReviewFiles, Span, clip_targets, parse_annotations, read_annotations, training_rows
from kissray.errors import UsageError
from kissray.evaluate import per_second_metrics
from kissray.review.store import new_answer, review_counts, save_answer
from kissray.train import MaskedBCE, class_balance


def answer(out, film, kind, start, end, segment=None, label="kiss", reviewer="ed"):
    return save_answer(str(out), new_answer("a", str(film), label, kind, start, end, segment=segment,
                                            duration_s=60, reviewer=reviewer))


@pytest.fixture()
def film(tmp_path):
    path = tmp_path / "a.mp4"
    path.write_bytes(b"x")  # the reader checks films exist; nothing decodes it here
    return path


def test_not_label_is_negative_for_that_label_only():
    spans = [Span("f", 0, 2, "not:kiss"), Span("f", 2, 3, "hug"), Span("f", 4, 5, "none")]
    idx, y = clip_targets(spans, ["kiss", "hug"], 6)
    assert idx.tolist() == [0, 1, 2, 4]
    assert np.isnan(y[0, 1]) and y[0, 0] == 0 and y[1, 0] == 0  # hug unknown where only kiss was denied
    assert y[2].tolist() == [0, 1] and y[3].tolist() == [0, 0]
    _, y = clip_targets(spans, ["kiss", "hug"], 6, unlabelled="negative")
    assert not np.isnan(y).any()


def test_negation_conflicts_and_multi_label_overlaps():
    text = "uri,start_s,end_s,label\nf,0,10,kiss\nf,5,8,hug\nf,8,12,not:hug\nf,20,30,none\nf,25,28,not:kiss\n"
    ann = parse_annotations(text, check_films=False)
    assert ann.labels == ["kiss", "hug"]
    with pytest.raises(UsageError, match="contradicts"):
        parse_annotations("uri,start_s,end_s,label\nf,0,10,kiss\nf,5,12,not:kiss\n", check_films=False)
    with pytest.raises(UsageError, match="empty label"):
        parse_annotations("uri,start_s,end_s,label\nf,0,10,not:\n", check_films=False)


def test_latest_answer_wins_and_a_later_span_takes_seconds_from_the_other_polarity(tmp_path, film):
    answer(tmp_path, film, "right", 10, 20, segment=(10, 20))
    answer(tmp_path, film, "wrong", 10, 20, segment=(10, 20), reviewer="bo")  # the same segment, later
    answer(tmp_path, film, "right", 30, 40, segment=(30, 40))
    answer(tmp_path, film, "missed", 18, 25)  # over the wrong segment's end
    answer(tmp_path, film, "edges", 31, 43, segment=(30, 40))
    files = ReviewFiles(str(tmp_path / "reviews"))
    rows = files.rows()
    assert len(rows) == len(files.names()) == 5  # history kept
    spans = sorted((float(r["start_s"]), float(r["end_s"]), r["label"]) for r in training_rows(rows))
    assert spans == [(10, 18, "not:kiss"), (18, 25, "kiss"), (31, 43, "kiss")]
    counts = review_counts(rows, ["kiss", "hug"])
    assert counts["kiss"] == {"reviewed": 2, "right": 1, "edges": 1, "wrong": 1, "missed": 1, "precision": 0.5}
    assert counts["hug"]["precision"] is None

    ann = read_annotations(str(tmp_path / "reviews"))  # the folder, as `kissray train --annotations` gets it
    assert ann.labels == ["kiss"] and ann.reviews["answers"] == 5 and ann.reviews["counted"] == 3
    _, y = clip_targets(ann.spans[str(film)], ann.labels, 60)
    assert y[:8].sum() == 0 and y[8:].sum() == 7 + 12  # seconds 10-17 negative, 18-24 and 31-42 positive


def test_one_review_file_reads_as_annotations_with_its_extra_columns(tmp_path, film):
    name = answer(tmp_path, film, "wrong", 2, 5, segment=(2, 5))
    ann = read_annotations(str(tmp_path / "reviews" / name))
    assert [(s.start_s, s.end_s, s.label) for s in ann.spans[str(film)]] == [(2, 5, "not:kiss")]


def test_bad_answers_are_refused():
    for kind, start, end, segment in [("maybe", 1, 2, (1, 2)), ("right", 3, 2, (1, 2)), ("missed", 1, 2, (1, 2)),
                                      ("right", 1, 2, None), ("edges", 1, math.nan, (1, 2)), ("missed", 50, 70, None)]:
        with pytest.raises(ValueError):
            new_answer("a", "f", "kiss", kind, start, end, segment=segment, duration_s=60, reviewer="x")


def test_answers_saved_at_once_are_all_kept(tmp_path, film):
    with ThreadPoolExecutor(8) as pool:
        names = list(pool.map(lambda i: answer(tmp_path, film, "right", i, i + 1, segment=(i, i + 1)), range(40)))
    assert len(set(names)) == 40 and len(ReviewFiles(str(tmp_path / "reviews")).rows()) == 40
    assert not [p for p in (tmp_path / "reviews").iterdir() if p.name.startswith(".")]


def test_unknown_targets_add_nothing_to_loss_metrics_or_balance():
    logits = torch.tensor([[2.0, -1.0], [0.5, 3.0]])
    known = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    assert torch.allclose(MaskedBCE()(logits, known), torch.nn.BCEWithLogitsLoss()(logits, known))
    partly = torch.tensor([[1.0, float("nan")], [0.0, 1.0]])
    expected = torch.nn.functional.binary_cross_entropy_with_logits(logits, known, reduction="none")
    assert torch.allclose(MaskedBCE()(logits, partly), (expected.sum() - expected[0, 1]) / 3)
    metrics = per_second_metrics(partly.numpy(), torch.sigmoid(logits).numpy(), ["kiss", "hug"])
    assert metrics["hug"]["n_seconds"] == 1 and metrics["kiss"]["n_seconds"] == 2
    balance = class_balance(partly.numpy(), ["kiss", "hug"], "auto")
    assert balance["positive_rate"] == {"kiss": 0.5, "hug": 1.0}
