"""``kissray demo``: generate labelled synthetic films, train on them, score the held-out films with
``kissray score`` on a local Ray, evaluate, and say where everything is.

About 40 s on two idle CPU cores (38 s measured; several minutes on a busy machine). The model it
trains detects the synthetic scenes only.
"""

from __future__ import annotations

import argparse

from kissray.commands.options import any_int, positive_int

from kissray.defaults import DemoOptions

_DEFAULTS = DemoOptions()


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="end-to-end demo on synthetic films (train, score, evaluate)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="directory for the corpus, checkpoint, scores and eval.json")
    p.add_argument("--train-films", type=positive_int, default=_DEFAULTS.n_train, help=f"default {_DEFAULTS.n_train}")
    p.add_argument("--test-films", type=positive_int, default=_DEFAULTS.n_test, help=f"default {_DEFAULTS.n_test}")
    p.add_argument("--epochs", type=positive_int, default=_DEFAULTS.epochs, help=f"default {_DEFAULTS.epochs}")
    p.add_argument("--seed", type=any_int, default=_DEFAULTS.seed)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from kissray.demo import run_demo, summary

    options = DemoOptions(n_train=args.train_films, n_test=args.test_films, epochs=args.epochs, seed=args.seed)
    print(summary(run_demo(args.out, options)))
    return 0
