"""``kissray export``: segment lists for editors (CSV, JSON, or one CMX 3600 EDL per title)."""

from __future__ import annotations

import argparse
import sys

from kissray.commands.options import positive
from kissray.defaults import EXPORT_FORMATS

EXIT_OK, EXIT_SOME_FAILED = 0, 3


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="segment lists for editors: csv, json or edl", description=__doc__,
                       epilog="EDL timecodes use each film's frame rate (probed from the film): 29.97/59.94 fps "
                              "are drop-frame, 23.976 and integer rates non-drop. Exit code 3 when some film's "
                              "frame rate could not be read (its EDL is missing).")
    p.add_argument("--scores", required=True, metavar="OUT", help="a `kissray score --out` directory (any fsspec URI)")
    p.add_argument("--format", required=True, choices=EXPORT_FORMATS, help="csv / json: one file; edl: one per title")
    p.add_argument("--out", default=None,
                   help="csv/json: the file ('-' for stdout; default OUT/segments.FORMAT); "
                        "edl: the folder (default OUT/edl)")
    p.add_argument("--label", action="append", default=None,
                   help="only this label's segments (repeatable; default: every label)")
    p.add_argument("--fps", type=positive, default=None,
                   help="EDL only: use this frame rate instead of probing the films (e.g. 23.976, 29.97)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from kissray.export import export_segments

    summary = export_segments(args.scores, args.format, args.out, labels=args.label, fps=args.fps)
    for title_id, reason in sorted(summary.failed.items()):
        print(f"failed {title_id}: {reason}", file=sys.stderr)
    if args.out != "-":
        where = summary.written[0] if len(summary.written) == 1 else f"{len(summary.written)} files"
        print(f"wrote {where}" + (f"; {len(summary.failed)} titles failed" if summary.failed else ""),
              file=sys.stderr)
    return EXIT_SOME_FAILED if summary.failed else EXIT_OK
