"""``kissray train``: train a checkpoint on an annotations CSV (the paper's recipe as defaults).

Films are split 80/10/10 into train / val / test by a seeded shuffle (or by the CSV's ``split``
column), never clip by clip. The epoch with the best validation AP (then F1) is kept, or F1 (then
AP) with --select-on f1. Rare labels get a positive weight in the loss by default (--balance).
``metrics.json`` in the checkpoint holds per-epoch and final metrics per split, the class balance
used and the selection rule.
"""

from __future__ import annotations

import argparse

from kissray.annotations import UNLABELLED_CHOICES, read_annotations
from kissray.commands.options import any_int, image_size, non_negative_int, positive, positive_int
from kissray.defaults import (BALANCE_CHOICES, BALANCED_RATE, MODALITIES, MODES, SELECT_CHOICES, STILLS_MODES,
                              TrainOptions)

_DEFAULTS = TrainOptions()


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a checkpoint on annotated films", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--annotations", required=True, help="CSV: uri,start_s,end_s,label[,split] (docs/weights-and-training.md)")
    p.add_argument("--out", required=True, help="checkpoint directory to write (any fsspec URI)")
    p.add_argument("--embeddings", default=None, metavar="DIR",
                   help="head mode from a `kissray score --embeddings` output's stored vectors: no decoding, "
                        "the films need not be reachable (needs --init: the checkpoint that scored DIR)")
    p.add_argument("--init", default=None, help="start from this checkpoint (backbones, head rows of shared labels)")
    p.add_argument("--modality", choices=MODALITIES, default=None, help="default: the --init checkpoint's, else av")
    p.add_argument("--mode", choices=MODES, default=_DEFAULTS.mode,
                   help="head: frozen backbones, cached embeddings (fast); full: fine-tune everything")
    p.add_argument("--epochs", type=positive_int, default=_DEFAULTS.epochs, help=f"default {_DEFAULTS.epochs}")
    p.add_argument("--lr", type=positive, default=_DEFAULTS.lr, help=f"Adam learning rate (default {_DEFAULTS.lr:g})")
    p.add_argument("--batch-size", type=positive_int, default=_DEFAULTS.batch_size, help=f"default {_DEFAULTS.batch_size}")
    p.add_argument("--seed", type=any_int, default=_DEFAULTS.seed, help="seed of the split, init and shuffling")
    p.add_argument("--unlabelled", choices=UNLABELLED_CHOICES, default=_DEFAULTS.unlabelled,
                   help="clips in no annotated span: ignore them (default) or treat them as negatives")
    p.add_argument("--image-size", type=image_size, default=_DEFAULTS.image_size, help="new model only (no --init)")
    p.add_argument("--frames-per-clip", type=positive_int, default=_DEFAULTS.frames_per_clip, help="new model only")
    p.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    p.add_argument("--ray-workers", type=non_negative_int, default=0,
                   help="head mode: embed films on N Ray actors (a local Ray, or $RAY_ADDRESS); "
                        "default 0: in this process")
    p.add_argument("--balance", choices=BALANCE_CHOICES, default=_DEFAULTS.balance,
                   help=f"class imbalance: auto (default: pos-weight when a label's positive rate is below "
                        f"{BALANCED_RATE:g} or above {1 - BALANCED_RATE:g}, else none), none, pos-weight "
                        f"(BCE positive weight n_neg/n_pos), sample (balanced sampling with replacement)")
    p.add_argument("--select-on", choices=SELECT_CHOICES, default=_DEFAULTS.select_on,
                   help="validation metric that picks the epoch kept; the other breaks ties (default ap)")
    p.add_argument("--stills", choices=STILLS_MODES, default=_DEFAULTS.stills,
                   help="exact (default) or keyframe stills; train as you will score")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from kissray.train import train

    annotations = read_annotations(args.annotations, check_films=args.embeddings is None)
    options = TrainOptions(mode=args.mode, modality=args.modality, epochs=args.epochs, lr=args.lr,
                           batch_size=args.batch_size, seed=args.seed, unlabelled=args.unlabelled,
                           image_size=args.image_size, frames_per_clip=args.frames_per_clip, device=args.device,
                           ray_workers=args.ray_workers, balance=args.balance, select_on=args.select_on,
                           stills=args.stills)
    metrics = train(annotations, args.out, options, init=args.init, embeddings=args.embeddings)
    balance = metrics["balance"]
    print(f"wrote {args.out} (best epoch {metrics['best_epoch']} by {metrics['selected_on']} "
          f"{metrics['selection']['metric'].upper()}; balance {balance['method']}"
          f"{' (auto)' if balance['requested'] == 'auto' else ''})")
    for split, per_label in metrics["final"].items():
        scores = ", ".join(f"{label} AP {_ap(m['ap'])} F1 {m['f1']:.3f} P {m['precision']:.3f} R {m['recall']:.3f}"
                           for label, m in per_label.items())
        print(f"  {split:5s} ({metrics['n_clips'][split]} s): {scores}")
    return 0


def _ap(ap: float | None) -> str:
    return "n/a" if ap is None else f"{ap:.3f}"
