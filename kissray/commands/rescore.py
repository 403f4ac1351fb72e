"""``kissray rescore``: score a library again with a new head, from its stored embeddings.

Reads DIR/embeddings (written by `kissray score ... --embeddings`) and DIR/titles, applies the
head of CKPT to every stored second and writes OUT/scores, OUT/segments and OUT/titles exactly
as `kissray score` with CKPT would (probabilities within 1e-3), without decoding a film. CKPT's
backbones must be the ones that made the embeddings (same backbone fingerprint: heads trained
with `kissray train --mode head` or `--embeddings` on top of the scoring checkpoint); any other
is refused (exit 2). Resumable like score; exit codes as score's.
"""

from __future__ import annotations

import argparse
import sys

from kissray.commands.options import add_segment_options


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("rescore", help="score a scored library again with a new head, from its embeddings",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--embeddings", required=True, metavar="DIR",
                   help="a `kissray score --embeddings` output (any fsspec URI)")
    p.add_argument("--model", required=True, help="checkpoint with the new head (same backbones)")
    p.add_argument("--out", required=True, help="output directory (any fsspec URI)")
    p.add_argument("--address", default=None,
                   help="Ray cluster address (default: $RAY_ADDRESS, else a local Ray; 'local' forces one)")
    add_segment_options(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from kissray.batch.rescore import open_rescore, run_rescore, titles_to_rescore
    from kissray.pipeline import out_lock, ray_connection
    from kissray.score import SegmentParams

    spec = open_rescore(args.embeddings, args.model, args.out,  # usage errors: nothing written
                        SegmentParams(args.threshold, args.min_len, args.min_fraction))
    with out_lock(args.out):
        todo, n_titles = titles_to_rescore(spec)
        with ray_connection(args.address):
            summary = run_rescore(spec, todo, n_titles, progress=not args.no_progress)
    for title_id, status, error in summary.failures:
        print(f"{status}: {title_id}: {error}", file=sys.stderr)
    print(summary)
    return 0 if summary.all_ok else 3
