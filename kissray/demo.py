"""``kissray demo``: synthetic corpus -> train (head, av) -> ``kissray score`` on held-out films -> evaluate.

Everything lands under one directory::

    DIR/corpus/          synthetic films + annotations.csv (split column: train / val / test)
    DIR/model/           the trained checkpoint (+ metrics.json)
    DIR/scores/          ``kissray score`` output for the held-out films (scores/, segments/, titles/)
    DIR/scores/excerpts/ one .mp4 + .jpg per detected segment (``kissray excerpts``)
    DIR/scores/report.html  the HTML report (``kissray report``)
    DIR/eval.json        held-out evaluation (keys: README, "kissray eval")

The demo model detects the synthetic scenes only; it knows nothing about real films.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

from kissray import provenance
from kissray.annotations import read_annotations, split_films
from kissray.defaults import DemoOptions
from kissray.evaluate import FilmPrediction, evaluate_predictions
from kissray.outputs import read_outputs
from kissray.excerpts import write_excerpts
from kissray.report import write_report
from kissray.score import Segment, SegmentParams
from kissray.synth import make_corpus
from kissray.terminal import child_stderr
from kissray.train import TrainOptions, train

DEMO_IMAGE_SIZE = 64  # small stills keep the demo within minutes on two CPU cores


def run_demo(out_dir: str, options: DemoOptions = DemoOptions(), log=print) -> dict:
    """Run the whole demo into ``out_dir``; return the held-out evaluation report (+ paths, timings)."""
    started = time.perf_counter()
    timings = {}
    log(f"[1/5] generating {options.n_train} training and {options.n_test} held-out films ...")
    csv_path = make_corpus(os.path.join(out_dir, "corpus"), options.n_train, options.n_test,
                           options.duration_s, options.seed)
    timings["corpus_s"] = time.perf_counter() - started
    annotations = read_annotations(csv_path)
    splits = split_films(annotations, options.seed)  # the CSV's split column: train / val / test
    held_out = splits["test"]
    model_dir = os.path.join(out_dir, "model")
    log("[2/5] training (head mode, audio + video) ...")
    metrics = train(annotations.subset(splits["train"] + splits["val"]), model_dir,
                    TrainOptions(mode="head", modality="av", epochs=options.epochs, seed=options.seed,
                                 image_size=DEMO_IMAGE_SIZE))
    timings["train_s"] = time.perf_counter() - started - timings["corpus_s"]
    scores_dir = os.path.join(out_dir, "scores")
    shutil.rmtree(scores_dir, ignore_errors=True)  # `score` would skip titles a previous demo scored
    log(f"[3/5] scoring {len(held_out)} held-out films with `kissray score` ...")
    t0 = time.perf_counter()
    predictions = score_films(held_out, model_dir, scores_dir, metrics["labels"])
    timings["score_s"] = time.perf_counter() - t0
    log("[4/5] evaluating ...")
    report = evaluate_predictions(predictions, annotations, metrics["labels"], SegmentParams())
    log("[5/5] cutting excerpts and writing the report ...")
    excerpts = write_excerpts(scores_dir)
    report_html = write_report(scores_dir)
    timings["total_s"] = time.perf_counter() - started
    report.update({"split": "test", "model": model_dir, "timings": timings,
                   "provenance": provenance.describe(provenance.read_provenance(model_dir)),
                   "paths": {"corpus": csv_path, "model": model_dir, "scores": scores_dir,
                             "excerpts": excerpts.dest, "report": report_html,
                             "eval": os.path.join(out_dir, "eval.json")}})
    with open(report["paths"]["eval"], "w") as f:
        json.dump(report, f, indent=2)
    return report


def score_films(uris: list[str], model_dir: str, out_dir: str, labels: list[str]) -> list[FilmPrediction]:
    """Score films with the ``kissray score`` command (a local Ray) and read its Parquet back."""
    argv = [sys.executable, "-m", "kissray.cli", "score", *uris, "--model", model_dir, "--out", out_dir]
    sys.stderr.flush()
    proc = subprocess.run(argv, stderr=child_stderr())  # its messages and bar on this terminal
    if proc.returncode not in (0, 3):
        raise RuntimeError(f"kissray score failed (exit {proc.returncode}): {' '.join(argv)}")
    return read_score_outputs(out_dir, labels)


def read_score_outputs(out_dir: str, labels: list[str]) -> list[FilmPrediction]:
    """FilmPredictions (columns in ``labels`` order) from a ``kissray score`` output directory."""
    import numpy as np

    outputs = read_outputs(out_dir, with_scores=True, labels=labels)
    scores, segments = outputs.scores, outputs.segments
    predictions = []
    for title in outputs.titles.itertuples():
        mine = scores[scores["title_id"] == title.title_id]
        probs = np.full((int(title.n_clips or 0), len(labels)), np.nan, np.float32)  # NaN: not scored
        for j, label in enumerate(labels):
            rows = mine[mine["label"] == label]
            probs[rows["second"].to_numpy(), j] = rows["p"].to_numpy()
        segs = [Segment(s.label, int(s.start_s), int(s.end_s), float(s.mean_p))
                for s in segments[segments["title_id"] == title.title_id].itertuples()]
        predictions.append(FilmPrediction(title.uri, probs, segs, int(title.n_clips or 0)))
    return predictions


def summary(report: dict) -> str:
    """The lines the demo prints at the end."""
    paths, lines = report["paths"], ["", "kissray demo: held-out evaluation"]
    for label in report["labels"]:
        s, g = report["per_second"][label], report["segments"][label]
        lines.append(f"  {label}: per-second F1 {s['f1']:.3f} (P {s['precision']:.3f}, R {s['recall']:.3f}, "
                     f"{s['n_seconds']} s in {report['n_films']} films); segment F1 {g['f1']:.3f} "
                     f"({g['tp']} of {g['n_true']} scenes found, {g['n_pred']} predicted, IoU >= {report['min_iou']})")
    lines += [f"  time: {report['timings']['total_s']:.0f} s "
              f"(corpus {report['timings']['corpus_s']:.0f} s, train {report['timings']['train_s']:.0f} s, "
              f"score {report['timings']['score_s']:.0f} s)",
              "", "outputs:",
              f"  films + annotations  {paths['corpus']}",
              f"  checkpoint           {paths['model']}  (metrics.json inside)",
              f"                       {report.get('provenance', '')}",
              f"  scores, segments     {paths['scores']}/scores, {paths['scores']}/segments, {paths['scores']}/titles",
              f"  excerpts             {paths['excerpts']}",
              f"  evaluation           {paths['eval']}",
              f"  report               {paths['report']}   <- open this in a browser",
              "", "open them:",
              f"  python -c \"import pandas as pd; print(pd.read_parquet('{paths['scores']}/segments'))\"",
              f"  kissray eval --annotations {paths['corpus']} --model {paths['model']} --split test",
              "  (the demo model detects these synthetic scenes only, not kisses in real films)"]
    return "\n".join(lines)
