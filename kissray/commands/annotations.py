"""``kissray annotations``: make annotations CSVs from public datasets (``from-ava``: AVA v2.x; docs/ava.md)."""

from __future__ import annotations

import argparse
import sys

from kissray.commands.options import non_negative_int

FROM_AVA = """Convert AVA v2.x annotations into a kissray annotations CSV (uri,start_s,end_s,label,split).

The keyframe at second t labels clip [t, t+1): LABEL when any box at t carries the action, 'none'
when t was annotated without it; seconds never annotated stay unlabelled. Consecutive seconds
merge into one span. Rows from a CSV whose name contains 'train' get split 'train', 'val' 'val'.
Videos are found as VIDEOS/<video_id>.<any video extension>; annotated videos without a file are
reported and left out."""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("annotations", help="make annotations CSVs from public datasets (AVA)", description=__doc__)
    actions = p.add_subparsers(dest="annotations_command", required=True, metavar="SOURCE")
    ava = actions.add_parser("from-ava", help="AVA v2.x CSVs + label map -> annotations CSV", description=FROM_AVA,
                             formatter_class=argparse.RawDescriptionHelpFormatter)
    ava.add_argument("--csv", action="append", required=True, metavar="FILE",
                     help="AVA CSV, no header (ava_train_v2.2.csv, ava_val_v2.2.csv); repeatable")
    ava.add_argument("--label-map", required=True, metavar="FILE", help="ava_action_list_v2.2.pbtxt")
    ava.add_argument("--action", required=True, metavar="NAME",
                     help="the action's name in the label map, e.g. 'kiss (a person)'")
    ava.add_argument("--label", default="kiss", help="the label written for it (default: kiss)")
    ava.add_argument("--videos", required=True, metavar="DIR_OR_URI",
                     help="directory (any fsspec URI) holding <video_id>.<ext> files")
    ava.add_argument("--offset-s", type=non_negative_int, default=0, metavar="SECONDS",
                     help="subtract from AVA timestamps, for videos cut to start later than the movie "
                          "(900 for 15-minute cuts starting at 900 s; default 0: the full movies)")
    ava.add_argument("--out", required=True, help="annotations CSV to write (any fsspec URI)")
    ava.set_defaults(func=run_from_ava)


def run_from_ava(args: argparse.Namespace) -> int:
    from kissray.annotations import write_annotations
    from kissray.ava import FIRST_IDS_SHOWN, convert_ava

    result = convert_ava(args.csv, args.label_map, args.action, args.videos, args.label, args.offset_s)
    if result.missing:
        first = ", ".join(result.missing[:FIRST_IDS_SHOWN])
        more = ", ..." if len(result.missing) > FIRST_IDS_SHOWN else ""
        print(f"{len(result.missing)} of {len(result.missing) + len(result.videos)} annotated videos not found "
              f"in {args.videos} (left out): {first}{more}", file=sys.stderr)
    for video_id, files in sorted(result.duplicates.items()):
        print(f"{video_id}: {len(files)} files, using {files[0]}", file=sys.stderr)
    write_annotations(result.spans, args.out)
    print(f"wrote {args.out}: action {result.action!r} (id {result.action_id}) as {result.label!r}, "
          f"{len(result.videos)} videos, {len(result.spans)} spans")
    for split, n in sorted(result.seconds().items()):
        total = n[result.label] + n["none"]
        print(f"  {split}: {n['videos']} videos, {total} annotated s, {result.label} {n[result.label]} s "
              f"({n[result.label] / total:.1%}) in {n['spans']} spans")
    return 0
