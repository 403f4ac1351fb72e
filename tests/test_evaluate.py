"""Evaluation metrics on hand-made predictions with known answers."""

from __future__ import annotations

import numpy as np
import pytest

from kissray.annotations import parse_annotations
from kissray.evaluate import (FilmPrediction, average_precision, evaluate_predictions, iou, match_segments,
                              per_second_metrics, predictions_from_probs, true_segments)
from kissray.score import Segment, SegmentParams


def test_per_second_metrics_known_counts():
    y_true = np.array([1, 1, 1, 0, 0, 0, 0, 1], np.float32)[:, None]
    y_prob = np.array([.9, .6, .2, .7, .1, .0, .4, .5], np.float32)[:, None]  # 0.5 counts as positive
    m = per_second_metrics(y_true, y_prob, ["kiss"])["kiss"]
    assert (m["tp"], m["fp"], m["fn"], m["tn"]) == (3, 1, 1, 3)
    assert m["precision"] == pytest.approx(0.75) and m["recall"] == pytest.approx(0.75)
    assert m["f1"] == pytest.approx(0.75) and m["accuracy"] == pytest.approx(6 / 8)
    # ranked by p (.9 .7 .6 .5 .4 .2 .1 0): + - + + - + - -; precision at the positives 1, 2/3, 3/4, 4/6
    assert m["ap"] == pytest.approx((1 + 2 / 3 + 3 / 4 + 4 / 6) / 4)


def test_average_precision_by_hand():
    # ranked: + - + + - : precision at each positive 1/1, 2/3, 3/4 -> AP = (1 + 2/3 + 3/4) / 3
    assert average_precision([1, 0, 1, 1, 0], [.9, .8, .7, .6, .5]) == pytest.approx((1 + 2 / 3 + 3 / 4) / 3)
    # scikit-learn's documented example of average_precision_score
    assert average_precision([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == pytest.approx(0.8333333333)
    # tied scores are one threshold, not ranked in input order: (R 1, P 2/3) whatever the order
    assert average_precision([1, 0, 1, 0], [.5, .5, .5, .1]) == pytest.approx(2 / 3)
    assert average_precision([0, 1, 0, 1], [.5, .5, .5, .1]) == pytest.approx(0.5 * 1 / 3 + 0.5 * 2 / 4)
    assert average_precision([1, 1, 0], [.2, .9, .1]) == 1.0  # perfect ranking, threshold-free
    assert average_precision([0, 1], [np.nan, 0.1]) == 1.0  # NaN ranks last
    assert average_precision([0, 0], [.3, .7]) is None  # undefined without a positive


def _brute_force_ap(y: np.ndarray, s: np.ndarray) -> float:
    """The definition, one threshold at a time: sum over distinct scores t (descending) of dR(t) * P(t)."""
    ap, last_recall = 0.0, 0.0
    for t in sorted(set(s.tolist()), reverse=True):
        chosen = s >= t
        recall = (y & chosen).sum() / y.sum()
        ap += (recall - last_recall) * (y & chosen).sum() / chosen.sum()
        last_recall = recall
    return ap


def test_average_precision_matches_the_definition_with_ties():
    rng = np.random.default_rng(0)
    for _ in range(300):
        n = int(rng.integers(1, 40))
        y = rng.random(n) < rng.uniform(0.05, 0.9)
        if not y.any():
            continue
        s = np.round(rng.random(n), int(rng.integers(0, 3)))  # 0-2 decimals: many ties
        assert average_precision(y, s) == pytest.approx(_brute_force_ap(y, s), abs=1e-12)


def test_no_positive_predictions_gives_zero_not_nan():
    m = per_second_metrics(np.array([[1.0], [0.0]]), np.array([[0.1], [0.2]]), ["kiss"])["kiss"]
    assert m["precision"] == 0.0 and m["recall"] == 0.0 and m["f1"] == 0.0


def test_iou_and_one_to_one_greedy_matching():
    assert iou((0, 10), (5, 15)) == pytest.approx(5 / 15)
    assert iou((0, 10), (0, 10)) == 1.0 and iou((0, 1), (2, 3)) == 0.0
    true = [(10, 20), (30, 40)]
    pred = [(11, 20), (10, 19), (31, 45), (100, 110)]
    # (10,20) matches both (11,20) (IoU .9) and (10,19) (.9): one-to-one keeps one; (30,40)~(31,45) IoU 9/15
    assert match_segments(true, pred) == [(0, 0), (1, 2)]
    assert match_segments([(0, 10)], [(6, 16)]) == []  # IoU 4/16 < 0.5


def test_true_segments_merge_touching_spans_of_a_label():
    ann = parse_annotations("uri,start_s,end_s,label\na,0,5,kiss\na,5,9,kiss\na,9,12,none\na,20,30,kiss\n",
                            check_films=False)
    assert true_segments(ann.spans["a"], "kiss") == [(0, 9), (20, 30)]


ANNOTATIONS = "uri,start_s,end_s,label\na,0,10,none\na,10,22,kiss\na,22,30,none\nb,0,12,kiss\nb,12,20,none\n"


def test_evaluate_predictions_known_answer():
    ann = parse_annotations(ANNOTATIONS, check_films=False)
    # film a: perfect probabilities; film b: kiss found only for seconds 0-5 and a false alarm at 15-19
    pa = np.zeros(40, np.float32)
    pa[10:22] = 0.9
    pb = np.zeros(20, np.float32)
    pb[0:6] = 0.8
    pb[15:19] = 0.7
    params = SegmentParams(min_len=3)
    preds = [predictions_from_probs("a", pa[:, None], ["kiss"], 40, params),
             predictions_from_probs("b", pb[:, None], ["kiss"], 20, params)]
    report = evaluate_predictions(preds, ann, ["kiss"], params)
    s = report["per_second"]["kiss"]
    # annotated seconds: a 0-29 (30), b 0-19 (20). tp = 12 + 6, fp = 4, fn = 6
    assert (s["tp"], s["fp"], s["fn"], s["n_seconds"]) == (18, 4, 6, 50)
    assert s["f1"] == pytest.approx(36 / 46)
    g = report["segments"]["kiss"]
    # predicted: a [10,22) (match), b [0,6) (IoU 0.5 with [0,12): match), b [15,19) (false alarm)
    assert (g["tp"], g["n_true"], g["n_pred"]) == (2, 2, 3)
    assert g["precision"] == pytest.approx(2 / 3) and g["recall"] == 1.0
    assert report["segmenter"] == {"threshold": 0.5, "min_len": 3, "min_fraction": 0.7}
    assert report["summary"]["per_second_f1"] == pytest.approx(s["f1"])
    # film a ranks perfectly; in b the 4 false alarms (0.7) outrank the 6 missed seconds (0.0):
    # thresholds 0.9 (12 tp), 0.8 (+6 tp), 0.7 (+4 fp), 0.0 (+6 tp, +28 fp) -> AP = (18 * 1 + 6 * 24/50) / 24
    assert s["ap"] == pytest.approx((18 + 6 * 24 / 50) / 24)
    assert report["summary"]["per_second_ap"] == pytest.approx(s["ap"])


def test_unlabelled_seconds_are_ignored_or_negative():
    ann = parse_annotations("uri,start_s,end_s,label\na,0,10,kiss\n", check_films=False)
    probs = np.zeros((30, 1), np.float32)
    probs[0:10] = 0.9
    probs[15:25] = 0.9  # a segment where nobody annotated anything
    pred = FilmPrediction("a", probs, [Segment("kiss", 0, 10, .9), Segment("kiss", 15, 25, .9)], 30)
    ignore = evaluate_predictions([pred], ann, ["kiss"], unlabelled="ignore")
    assert ignore["per_second"]["kiss"]["n_seconds"] == 10 and ignore["per_second"]["kiss"]["fp"] == 0
    assert ignore["segments"]["kiss"]["n_pred"] == 1 and ignore["segments"]["kiss"]["f1"] == 1.0
    negative = evaluate_predictions([pred], ann, ["kiss"], unlabelled="negative")
    assert negative["per_second"]["kiss"]["n_seconds"] == 30 and negative["per_second"]["kiss"]["fp"] == 10
    assert negative["segments"]["kiss"]["n_pred"] == 2 and negative["segments"]["kiss"]["precision"] == 0.5


def test_unscored_seconds_count_as_missed():
    ann = parse_annotations("uri,start_s,end_s,label\na,0,10,kiss\n", check_films=False)
    pred = FilmPrediction("a", np.full((4, 1), 0.9, np.float32), [], 10)  # decoding stopped after 4 s
    s = evaluate_predictions([pred], ann, ["kiss"])["per_second"]["kiss"]
    assert (s["tp"], s["fn"]) == (4, 6)


def test_score_outputs_read_back_as_predictions(tmp_path):
    """The demo evaluates ``kissray score``'s Parquet (SPEC 7 columns) exactly like in-process scores."""
    import pandas as pd

    from kissray.demo import read_score_outputs

    for name, frame in {
        "titles": pd.DataFrame({"title_id": ["a"], "uri": ["a"], "status": ["ok"], "error": [None],
                                "duration_s": [5.0], "n_clips": [5], "n_scored": [5], "has_audio": [True],
                                "model": ["ck"], "scored_at": [pd.Timestamp("2026-01-01", tz="UTC")]}),
        "scores": pd.DataFrame({"title_id": ["a"] * 5, "label": ["kiss"] * 5, "second": list(range(5)),
                                "start_s": [0.0, 1, 2, 3, 4], "end_s": [1.0, 2, 3, 4, 5],
                                "p": [0.1, 0.9, 0.8, 0.7, 0.2]}),
        "segments": pd.DataFrame({"title_id": ["a"], "label": ["kiss"], "segment": [0], "start_s": [1.0],
                                  "end_s": [4.0], "n_seconds": [3], "mean_p": [0.8]}),
    }.items():
        (tmp_path / name).mkdir()
        frame.to_parquet(tmp_path / name / "part-0.parquet")
    [pred] = read_score_outputs(str(tmp_path), ["kiss"])
    assert pred.uri == "a" and pred.n_clips == 5
    assert pred.probs[:, 0].tolist() == pytest.approx([0.1, 0.9, 0.8, 0.7, 0.2])
    assert pred.segments == [Segment("kiss", 1, 4, 0.8)]
    ann = parse_annotations("uri,start_s,end_s,label\na,1,4,kiss\na,0,1,none\na,4,5,none\n", check_films=False)
    report = evaluate_predictions([pred], ann, ["kiss"], SegmentParams(min_len=2))
    assert report["summary"] == {"per_second_f1": 1.0, "per_second_ap": 1.0, "segment_f1": 1.0}
