"""``kissray score``: score a film library on Ray into Parquet tables (scores, segments, titles).

INPUT is any mix of films, directories (searched recursively for video files), globs, fsspec
URIs (s3://, gs://, ...) and manifests (.txt: one URI a line; .csv/.parquet: column uri, optional
title_id). Results go to OUT/scores, OUT/segments and OUT/titles, one file per title; a rerun
with the same OUT skips titles already ok. Exit codes: 0 all ok, 3 some titles failed or were
partial, 2 usage error.
"""

from __future__ import annotations

import argparse
import sys

from kissray.score import DEFAULT_BATCH_SIZE, SegmentParams

DEFAULTS = SegmentParams()


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("score", help="score films (files, dirs, globs, URIs, manifests) on Ray into Parquet",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    p.set_defaults(func=run)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The score options; shared with ``jobs/score_titles.py``."""
    from kissray.pipeline import DEFAULT_DECODE_TIMEOUT_S, DEFAULT_WINDOW_S

    p.add_argument("inputs", nargs="+", metavar="INPUT", help="films, directories, globs, URIs or manifests")
    p.add_argument("--model", required=True, help="checkpoint directory (any fsspec URI)")
    p.add_argument("--out", required=True, help="output directory (any fsspec URI)")
    p.add_argument("--address", default=None,
                   help="Ray cluster address (default: $RAY_ADDRESS, else a local Ray; 'local' forces one)")
    p.add_argument("--threshold", type=float, default=DEFAULTS.threshold, help="segmenter threshold (%(default)s)")
    p.add_argument("--min-len", type=int, default=DEFAULTS.min_len, help="shortest segment, seconds (%(default)s)")
    p.add_argument("--min-fraction", type=float, default=DEFAULTS.min_fraction,
                   help="least fraction of positive seconds in a segment (%(default)s)")
    p.add_argument("--window-s", type=int, default=DEFAULT_WINDOW_S,
                   help="seconds of film per decode task (%(default)s)")
    p.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE, help="clips per forward pass (%(default)s)")
    p.add_argument("--actors", type=int, default=None,
                   help="most model actors (default: one per GPU, else one per 4 CPUs)")
    p.add_argument("--gpus-per-actor", type=float, default=None,
                   help="GPUs per model actor (default: 1 when the cluster has GPUs, else 0)")
    p.add_argument("--frames-per-clip", type=int, default=None, help="stills per clip (default: the checkpoint's)")
    p.add_argument("--decode-timeout-s", type=float, default=DEFAULT_DECODE_TIMEOUT_S,
                   help="a window whose decoder makes no progress this long fails (%(default)s)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from kissray.errors import UsageError
    from kissray.pipeline import prepare_library, ray_connection, run_library

    if min(args.window_s, args.batch_size, args.actors or 1, args.frames_per_clip or 1) < 1:
        raise UsageError("--window-s, --batch-size, --actors and --frames-per-clip must be at least 1")
    params = SegmentParams(args.threshold, args.min_len, args.min_fraction)
    job = prepare_library(args.inputs, args.model, args.out)  # usage errors before Ray starts
    with ray_connection(args.address):
        _quiet_ray_data(progress=not args.no_progress)
        summary = run_library(job, params=params, window_s=args.window_s, batch_size=args.batch_size,
                              num_actors=args.actors, num_gpus_per_actor=args.gpus_per_actor,
                              decode_timeout_s=args.decode_timeout_s, frames_per_clip=args.frames_per_clip,
                              progress=not args.no_progress)
    for title_id, status, error in summary.failures:
        print(f"{status}: {title_id}: {error}", file=sys.stderr)
    print(summary)
    return 0 if summary.all_ok else 3


def _quiet_ray_data(progress: bool) -> None:
    """Our own bar counts titles and seconds; Ray Data's operator bars would interleave with it."""
    import ray

    if progress:
        ray.data.DataContext.get_current().enable_progress_bars = False
