"""``kissray excerpts``: cut every segment of a score output from its film, with a JPEG thumbnail each."""

from __future__ import annotations

import argparse
import sys

from kissray.commands.options import non_negative, positive_int
from kissray.defaults import ExcerptOptions

EXIT_OK, EXIT_SOME_FAILED = 0, 3


def register(sub: argparse._SubParsersAction) -> None:
    defaults = ExcerptOptions()
    p = sub.add_parser("excerpts", help="cut segments into playable excerpts (+ thumbnails)", description=__doc__,
                       epilog="Files: DIR/<title_id>/<label>-<n>-<start>-<end>.mp4 and .jpg (n: the segment "
                              "number, start/end: the segment's seconds, before padding); with --by-label "
                              "DIR/<label>/<title_id>/... Existing files are skipped. Every cut starts from a "
                              "clean decode start and its first frame is checked against the film's; exit code 3 "
                              "when some film could not be cut right (nothing wrong is written).")
    p.add_argument("--scores", required=True, metavar="OUT", help="a `kissray score --out` directory (any fsspec URI)")
    p.add_argument("--label", action="append", default=None,
                   help="only this label's segments (repeatable; default: every label)")
    p.add_argument("--pad", type=non_negative, default=defaults.pad_s, metavar="SECONDS",
                   help=f"seconds added before and after each segment (default {defaults.pad_s})")
    p.add_argument("--out", default=None, metavar="DIR", help="where excerpts go (default: OUT/excerpts)")
    p.add_argument("--copy", action="store_true",
                   help="stream copy: fast, but starts at the last clean keyframe before the segment (default: re-encode, "
                        "frame-accurate, H.264 + AAC)")
    p.add_argument("--no-thumbnails", action="store_true", help="skip the JPEG thumbnails")
    p.add_argument("--by-label", action="store_true",
                   help="one folder per label: DIR/<label>/<title_id>/<name> (names unchanged)")
    p.add_argument("--jobs", type=positive_int, default=1, help="films cut at once (default 1)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from kissray.excerpts import write_excerpts

    options = ExcerptOptions(pad_s=args.pad, copy=args.copy, thumbnails=not args.no_thumbnails,
                             by_label=args.by_label)
    summary = write_excerpts(args.scores, args.out, labels=args.label, options=options, jobs=args.jobs,
                             progress=sys.stderr.isatty())
    for title_id, reason in sorted(summary.failed.items()):
        print(f"failed {title_id}: {reason}", file=sys.stderr)
    print(f"{summary.dest}: {_count(summary.written)} written, {_count(summary.skipped)} already there; "
          f"{len(summary.failed)} film{'s' * (len(summary.failed) != 1)} failed")
    return EXIT_SOME_FAILED if summary.failed else EXIT_OK


def _count(files: list[str]) -> str:
    """``3 excerpts + 3 thumbnails`` (each excerpt has one thumbnail unless --no-thumbnails)."""
    excerpts = sum(f.endswith(".mp4") for f in files)
    thumbnails = sum(f.endswith(".jpg") for f in files)
    text = f"{excerpts} excerpt{'s' * (excerpts != 1)}"
    return text + (f" + {thumbnails} thumbnail{'s' * (thumbnails != 1)}" if thumbnails else "")
