"""Evaluation against annotations: per-second and segment-level metrics, per label.

Per second: over the annotated seconds of the chosen films (every second with
``unlabelled="negative"``), ``p >= threshold`` against the clip labels of :mod:`kissray.annotations`,
and the threshold-free average precision of ``p`` (:func:`average_precision`).
Per segment: the segmenter's segments against the annotated spans of the label (adjacent or
overlapping spans of one label merged). A predicted segment matches a true span when their IoU
(in seconds) is at least 0.5; matching is one-to-one, greedy by decreasing IoU (ties: earlier
true span, then earlier prediction). With ``unlabelled="ignore"``, predicted segments that
overlap no annotated span are not counted (nobody said what happens there).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from kissray.annotations import Annotations, Span, annotated_seconds, clip_targets, split_films
from kissray.score import Segment, SegmentParams, segments_by_label

MIN_IOU = 0.5  # a predicted segment matches a true span at this IoU or more


@dataclass(frozen=True)
class FilmPrediction:
    """What a model said about one film: per-second probabilities and segments."""

    uri: str
    probs: np.ndarray  # float32[n_scored, n_labels]; row i is second [i, i+1)
    segments: list[Segment]
    n_clips: int  # seconds in the film (n_scored may be fewer when decoding stopped)


def per_second_metrics(y_true: np.ndarray, y_prob: np.ndarray, labels: list[str],
                       threshold: float = 0.5) -> dict[str, dict]:
    """``{label: {precision, recall, f1, accuracy, ap, tp, fp, fn, tn, n_seconds}}`` for [n, n_labels] arrays.

    ``ap`` is the average precision of the probabilities (None when the label has no positive second).
    A NaN target (a second known only for other labels: ``not:<label>`` spans) is left out of its label.
    """
    y_true = np.asarray(y_true, np.float32).reshape(-1, len(labels))
    y_prob = np.asarray(y_prob).reshape(-1, len(labels))
    out = {}
    for j, label in enumerate(labels):
        known = ~np.isnan(y_true[:, j])
        t, p = y_true[known, j] >= 0.5, y_prob[known, j] >= threshold
        tp, fp = int((t & p).sum()), int((~t & p).sum())
        fn, tn = int((t & ~p).sum()), int((~t & ~p).sum())
        out[label] = {**_prf(tp, fp, fn), "accuracy": (tp + tn) / len(t) if len(t) else 0.0,
                      "ap": average_precision(t, y_prob[known, j]),
                      "tp": tp, "fp": fp, "fn": fn, "tn": tn, "n_seconds": int(len(t))}
    return out


def average_precision(y_true: np.ndarray, y_score: np.ndarray) -> float | None:
    """Area under the precision-recall curve, as scikit-learn's ``average_precision_score``.

    ``AP = sum_n (R_n - R_(n-1)) P_n`` over the distinct scores taken as thresholds from the
    highest down (tied scores are one threshold; no interpolation). NaN scores rank last.
    None when ``y_true`` has no positive (AP is undefined there).
    """
    truth = np.asarray(y_true).reshape(-1) >= 0.5
    score = np.asarray(y_score, np.float64).reshape(-1)
    n_positive = int(truth.sum())
    if n_positive == 0:
        return None
    score = np.where(np.isnan(score), -np.inf, score)
    order = np.argsort(-score, kind="stable")
    score, truth = score[order], truth[order]
    last_of_tie = np.r_[np.flatnonzero(np.diff(score)), len(score) - 1]  # one threshold per distinct score
    tp = np.cumsum(truth)[last_of_tie]
    precision = tp / (last_of_tie + 1)
    recall = tp / n_positive
    return float(np.sum(np.diff(recall, prepend=0.0) * precision))


def _prf(tp: int, fp: int, fn: int) -> dict[str, float]:
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0
    return {"precision": precision, "recall": recall, "f1": f1}


def mean_f1(metrics: dict[str, dict]) -> float:
    """Macro-average F1 over labels."""
    return float(np.mean([m["f1"] for m in metrics.values()])) if metrics else 0.0


def mean_ap(metrics: dict[str, dict]) -> float | None:
    """Macro-average AP over the labels where it is defined (None when it is nowhere)."""
    aps = [m["ap"] for m in metrics.values() if m.get("ap") is not None]
    return float(np.mean(aps)) if aps else None


def iou(a: tuple[float, float], b: tuple[float, float]) -> float:
    inter = max(0.0, min(a[1], b[1]) - max(a[0], b[0]))
    union = (a[1] - a[0]) + (b[1] - b[0]) - inter
    return inter / union if union > 0 else 0.0


def match_segments(true: list[tuple[float, float]], pred: list[tuple[float, float]],
                   min_iou: float = MIN_IOU) -> list[tuple[int, int]]:
    """One-to-one matches ``(true_index, pred_index)`` with IoU >= ``min_iou``, greedy by IoU."""
    pairs = [(-iou(t, p), i, j) for i, t in enumerate(true) for j, p in enumerate(pred)]
    used_t, used_p, matches = set(), set(), []
    for neg_iou, i, j in sorted(pairs):
        if -neg_iou < min_iou:
            break
        if i not in used_t and j not in used_p:
            used_t.add(i)
            used_p.add(j)
            matches.append((i, j))
    return sorted(matches)


def true_segments(spans: list[Span], label: str) -> list[tuple[float, float]]:
    """The label's annotated spans, with touching or overlapping ones merged."""
    merged: list[list[float]] = []
    for span in sorted((s for s in spans if s.label == label), key=lambda s: s.start_s):
        if merged and span.start_s <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], span.end_s)
        else:
            merged.append([span.start_s, span.end_s])
    return [(a, b) for a, b in merged]


def evaluate_predictions(predictions: list[FilmPrediction], annotations: Annotations, labels: list[str],
                         params: SegmentParams = SegmentParams(), unlabelled: str = "ignore") -> dict:
    """The evaluation report (its keys are listed in the README, "kissray eval") for already-scored films."""
    y_true, y_prob = [], []
    counts = {label: {"tp": 0, "n_true": 0, "n_pred": 0} for label in labels}
    for film in predictions:
        spans = annotations.spans[film.uri]
        idx, targets = clip_targets(spans, labels, film.n_clips, unlabelled)
        keep = idx < len(film.probs)  # seconds that were not scored count as predicted negative
        probs = np.zeros((len(idx), len(labels)), np.float32)
        probs[keep] = film.probs[idx[keep]]
        y_true.append(targets)
        y_prob.append(probs)
        _count_segments(counts, film, spans, labels, unlabelled)
    y_true = np.concatenate(y_true) if y_true else np.zeros((0, len(labels)), np.float32)
    y_prob = np.concatenate(y_prob) if y_prob else np.zeros((0, len(labels)), np.float32)
    seconds = per_second_metrics(y_true, y_prob, labels, params.threshold)
    segments = {label: {**_prf(c["tp"], c["n_pred"] - c["tp"], c["n_true"] - c["tp"]), **c}
                for label, c in counts.items()}
    return {"labels": labels, "films": [p.uri for p in predictions], "n_films": len(predictions),
            "unlabelled": unlabelled, "segmenter": asdict(params), "min_iou": MIN_IOU,
            "per_second": seconds, "segments": segments,
            "summary": {"per_second_f1": mean_f1(seconds), "per_second_ap": mean_ap(seconds),
                        "segment_f1": mean_f1(segments)}}


def _count_segments(counts: dict, film: FilmPrediction, spans: list[Span], labels: list[str],
                    unlabelled: str) -> None:
    known = annotated_seconds(spans, film.n_clips)
    for label in labels:
        true = true_segments(spans, label)
        pred = [(float(s.start_s), float(s.end_s)) for s in film.segments if s.label == label]
        if unlabelled == "ignore":
            pred = [p for p in pred if known[int(p[0]):int(p[1])].any()]
        counts[label]["tp"] += len(match_segments(true, pred))
        counts[label]["n_true"] += len(true)
        counts[label]["n_pred"] += len(pred)


def evaluate(annotations: Annotations, model, split: str | None = "test", seed: int = 0,
             params: SegmentParams = SegmentParams(), unlabelled: str = "ignore", progress=None,
             stills: str = "exact") -> dict:
    """Score the films of ``split`` (None: every film) with ``model`` in this process and evaluate."""
    films = split_films(annotations, seed)[split] if split else annotations.films
    missing = [label for label in annotations.labels if label not in model.labels]
    predictions = predict_films(films, model, params, progress, stills)
    labels = [label for label in model.labels if label in annotations.labels]
    report = evaluate_predictions(predictions, annotations, labels, params, unlabelled)
    return {**report, "split": split or "all", "seed": seed, "labels_not_in_model": missing, "stills": stills}


def predict_films(films: list[str], model, params: SegmentParams = SegmentParams(), progress=None,
                  stills: str = "exact") -> list[FilmPrediction]:
    """Each film scored by :func:`kissray.score.score_film` (the one scorer and result assembly)."""
    from kissray.score import score_film

    predictions = []
    for uri in films:
        result = score_film(uri, model, threshold=params.threshold, min_len=params.min_len,
                            min_fraction=params.min_fraction, stills=stills)
        predictions.append(FilmPrediction(uri, result.probs, result.segments, result.n_clips))
        if progress is not None:
            progress(uri)
    return predictions


def predictions_from_probs(uri: str, probs: np.ndarray, labels: list[str], n_clips: int,
                           params: SegmentParams = SegmentParams()) -> FilmPrediction:
    """A :class:`FilmPrediction` from per-second probabilities (runs the segmenter)."""
    probs = np.asarray(probs, np.float32).reshape(-1, len(labels))
    return FilmPrediction(uri, probs, segments_by_label(probs, labels, params), n_clips)
