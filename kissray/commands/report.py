"""``kissray report``: one self-contained static HTML page about a score output."""

from __future__ import annotations

import argparse



def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("report", help="write a static HTML report of a score output", description=__doc__,
                       epilog="The page holds a library summary, a sortable and paged index, one timeline per "
                              "title (probability over time, segments shaded), thumbnails and excerpt links "
                              "(from `kissray excerpts`), and the failed titles with their reasons.")
    p.add_argument("--scores", required=True, metavar="OUT", help="a `kissray score --out` directory (any fsspec URI)")
    p.add_argument("--out", default=None, metavar="HTML", help="the page to write (default: OUT/report.html)")
    p.add_argument("--excerpts", default=None, metavar="DIR",
                   help="where `kissray excerpts` wrote its files (default: OUT/excerpts)")
    p.add_argument("--embed-thumbnails", action="store_true",
                   help="inline the thumbnails as data URIs, so the page works on its own (bigger file)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from kissray.report import write_report

    out = write_report(args.scores, args.out, excerpts_dir=args.excerpts, embed_thumbnails=args.embed_thumbnails)
    print(f"wrote {out}")
    return 0
