"""``kissray score``: score a film library on Ray into Parquet tables (scores, segments, titles).

INPUT is any mix of films, directories (searched recursively for video files), globs, fsspec
URIs (s3://, gs://, ...) and manifests (.txt: one URI a line; .csv/.parquet: column uri, optional
title_id). Results go to OUT/scores, OUT/segments and OUT/titles, one file per title; a rerun
with the same OUT skips titles already ok; a second live run on the same OUT is refused. A fault
of one title at any stage is that title's failed/partial row; lost workers, actors and nodes are
recovered in the same run. Exit codes: 0 all ok, 3 some titles failed or were partial, 2 usage
error (including OUT in use by another live run), 1 the job itself could not go on.
"""

from __future__ import annotations

import argparse
import sys

from kissray.commands.options import add_segment_options, non_negative, positive, positive_int
from kissray.defaults import BATCH_SIZE, DECODE_TIMEOUT_S, STILLS_MODES, WINDOW_S


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("score", help="score films (files, dirs, globs, URIs, manifests) on Ray into Parquet",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    p.set_defaults(func=run)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The score options; shared with ``jobs/score_titles.py``."""
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="films, directories, globs, URIs or manifests")
    p.add_argument("--model", required=True, help="checkpoint directory (any fsspec URI)")
    p.add_argument("--out", required=True, help="output directory (any fsspec URI)")
    p.add_argument("--address", default=None,
                   help="Ray cluster address (default: $RAY_ADDRESS, else a local Ray; 'local' forces one)")
    add_segment_options(p)
    p.add_argument("--window-s", type=positive_int, default=WINDOW_S,
                   help="seconds of film per decode task (%(default)s)")
    p.add_argument("--batch-size", type=positive_int, default=BATCH_SIZE, help="clips per forward pass (%(default)s)")
    p.add_argument("--max-actors", "--actors", dest="max_actors", type=positive_int, default=None,
                   help="most classifier actors; the pool grows and shrinks with the cluster up to this "
                        "(default: unbounded on GPUs, one per 4 CPUs on CPU)")
    p.add_argument("--num-gpus-per-actor", "--gpus-per-actor", dest="num_gpus_per_actor", type=non_negative,
                   default=None, help="GPUs per classifier actor (default: 1 when the cluster has GPUs or its "
                                      "autoscaler can add GPU nodes, else 0; 0 forces CPU)")
    p.add_argument("--stills", choices=STILLS_MODES, default="exact",
                   help="exact: the frame at each still time (default); keyframe: the last keyframe before it "
                        "(faster, one GOP of error at most)")
    p.add_argument("--frames-per-clip", type=positive_int, default=None, help="stills per clip (default: the checkpoint's)")
    p.add_argument("--decode-timeout-s", type=positive, default=DECODE_TIMEOUT_S,
                   help="a window whose decoder makes no progress this long fails (%(default)s)")
    p.add_argument("--embeddings", action="store_true",
                   help="also write OUT/embeddings: each scored second's vector (float16), for `kissray train "
                        "--embeddings`, `kissray rescore` and `kissray similar` (docs/embeddings.md)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars at all (ours or Ray Data's)")


def run(args: argparse.Namespace) -> int:
    from kissray.batch.faults import plan_from_env
    from kissray.pipeline import check_address, check_request, out_lock, prepare_library, ray_connection, run_library
    from kissray.provenance import describe, warning
    from kissray.score import SegmentParams

    params = SegmentParams(args.threshold, args.min_len, args.min_fraction)
    check_address(args.address, args.out)  # a Ray client with a local OUT: usage error, nothing written
    checked = check_request(args.inputs, args.model)  # usage errors before anything is written or started
    caution = warning(checked[1].provenance)
    print(f"kissray score: {'WARNING: ' + caution if caution else 'model: ' + describe(checked[1].provenance)}",
          file=sys.stderr)
    with out_lock(args.out) as lock:  # a second live run on OUT: usage error naming this one
        job = prepare_library(args.inputs, args.model, args.out, checked, lock, embeddings=args.embeddings)
        with ray_connection(args.address):
            summary = run_library(job, params=params, window_s=args.window_s, batch_size=args.batch_size,
                                  max_actors=args.max_actors, num_gpus_per_actor=args.num_gpus_per_actor,
                                  decode_timeout_s=args.decode_timeout_s, frames_per_clip=args.frames_per_clip,
                                  stills=args.stills, progress=not args.no_progress, faults=plan_from_env())
    for title_id, status, error in summary.failures:
        print(f"{status}: {title_id}: {error}", file=sys.stderr)
    print("\n".join(closing_lines(job, summary, params, caution)))
    return 0 if summary.all_ok else 3


def closing_lines(job, summary, params, caution: str | None) -> list[str]:
    """The summary: titles and speed, segments found per label, where the tables are, what next."""
    from kissray.outputs import SEGMENTS_COLUMNS, read_table

    out = job.store.out
    segments = read_table(out, "segments", SEGMENTS_COLUMNS)
    segments = segments[segments["title_id"].isin({t.title_id for t in job.titles})]
    lines = [str(summary), f"segments found (threshold {params.threshold:g}, at least {params.min_len} s, "
                           f"{params.min_fraction:.0%} of seconds above it):"]
    for label in job.config.labels:
        mine = segments[segments["label"] == label]
        lines.append(f"  {label}: {len(mine)} segment{'s' * (len(mine) != 1)}, "
                     f"{int(mine['n_seconds'].sum())} s in {mine['title_id'].nunique()} of {len(job.titles)} titles")
    if caution:
        lines.append(f"WARNING: {caution}")
    lines += [f"tables: {out}/scores, {out}/segments, {out}/titles (Parquet; pandas.read_parquet reads each)",
              "next:",
              f"  kissray excerpts --scores {out}    cut every segment into a playable excerpt",
              f"  kissray report --scores {out}      one HTML page: timelines, segments, thumbnails",
              f"  kissray export --scores {out} --format edl    segment lists for an editor (or csv, json)"]
    return lines
