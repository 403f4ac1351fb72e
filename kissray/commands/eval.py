"""``kissray eval``: score annotated films with a checkpoint and report per-second and segment metrics.

Per second: average precision (AP, threshold-free) and P/R/F1 at --threshold; per segment: P/R/F1
of the segmenter's segments against the annotated spans (IoU >= 0.5).

The split is recomputed from the CSV with the training seed (read from the checkpoint's
metrics.json unless --seed is given), so ``--split test`` means the films training held out.
"""

from __future__ import annotations

import argparse
import json
import sys

from kissray.annotations import SPLITS, UNLABELLED_CHOICES, read_annotations
from kissray.commands.options import add_segment_options, any_int
from kissray.defaults import STILLS_MODES



def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="evaluate a checkpoint on annotated films", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--annotations", required=True, help="CSV: uri,start_s,end_s,label[,split]")
    p.add_argument("--model", required=True, help="checkpoint directory")
    p.add_argument("--split", choices=(*SPLITS, "all"), default="test", help="films to evaluate (default test)")
    p.add_argument("--seed", type=any_int, default=None, help="split seed (default: the training seed, else 0)")
    p.add_argument("--out", default=None, help="write the report as JSON to this file (any fsspec URI; default: print it)")
    p.add_argument("--unlabelled", choices=UNLABELLED_CHOICES, default=None,
                   help="seconds in no annotated span (default: as in training, else ignore)")
    add_segment_options(p)
    p.add_argument("--stills", choices=STILLS_MODES, default="exact", help="exact (default) or keyframe stills")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from kissray.evaluate import evaluate
    from kissray.model import load_model
    from kissray.score import SegmentParams
    from kissray.train import read_metrics
    from kissray.uris import write_text

    annotations = read_annotations(args.annotations)
    trained = read_metrics(args.model) or {}
    seed = args.seed if args.seed is not None else trained.get("seed", 0)
    unlabelled = args.unlabelled or trained.get("options", {}).get("unlabelled", "ignore")
    model = load_model(args.model)
    params = SegmentParams(args.threshold, args.min_len, args.min_fraction)
    with tqdm(desc="scoring", unit="film") as bar:
        report = evaluate(annotations, model, None if args.split == "all" else args.split, seed, params,
                          unlabelled, progress=lambda _: bar.update(), stills=args.stills)
    report["model"] = args.model
    text = json.dumps(report, indent=2)
    if args.out:
        write_text(args.out, text + "\n")
        print(f"wrote {args.out}")
    else:
        print(text)
    for label in report["labels"]:
        s, g = report["per_second"][label], report["segments"][label]
        ap = "n/a (no positive second)" if s["ap"] is None else f"{s['ap']:.3f}"
        print(f"{label}: per-second AP {ap}, F1 {s['f1']:.3f} (P {s['precision']:.3f} R {s['recall']:.3f}, "
              f"{s['n_seconds']} s); segment F1 {g['f1']:.3f} ({g['tp']}/{g['n_true']} spans found, "
              f"{g['n_pred']} predicted)", file=sys.stderr)
    return 0
