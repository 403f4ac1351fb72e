"""``kissray similar``: the seconds of a scored library most like one second (cosine on the embeddings).

The library is one or more `kissray score --embeddings` outputs (--embeddings repeats). The query
is a second of one of its titles (--title T --at SECONDS; T's own seconds within 30 s are left out)
or of any film (--film URI --at SECONDS, embedded with the checkpoint that made the library, or
--model with the same backbones). Small libraries are searched by brute force; `--build-index`
builds a vector index under each DIR (object storage too) that later queries use.
"""

from __future__ import annotations

import argparse
import json
import sys

from kissray.commands.options import positive_int


def _second(text: str) -> int:
    value = float(text)
    if not (value >= 0 and value < 2**31):  # refuses nan too
        raise argparse.ArgumentTypeError(f"must be a second >= 0, got {text}")
    return int(value)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("similar", help="seconds of a scored library most like a given second",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--embeddings", action="append", required=True, metavar="DIR",
                   help="a `kissray score --embeddings` output (repeat for several, searched as one library)")
    query = p.add_mutually_exclusive_group()
    query.add_argument("--title", help="query with a second of this title of the library")
    query.add_argument("--film", metavar="URI", help="query with a second of any film")
    p.add_argument("--at", type=_second, metavar="SECONDS", help="the query's second")
    p.add_argument("--k", type=positive_int, default=20, help="how many seconds to list (%(default)s)")
    p.add_argument("--model", default=None,
                   help="with --film: the checkpoint that embeds it (default: the one that made the library)")
    p.add_argument("--build-index", action="store_true",
                   help="build (or rebuild) the vector index under each DIR/index; with no query, only that")
    p.add_argument("--brute-force", action="store_true", help="ignore the indexes: scan every vector")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from kissray.errors import UsageError

    if (args.title or args.film) and args.at is None:
        raise UsageError("--at SECONDS is required with --title or --film")
    if not (args.title or args.film or args.build_index):
        raise UsageError("give a query (--title T --at SECONDS, or --film URI --at SECONDS) or --build-index")
    if args.build_index:
        _build(args.embeddings, quiet=args.json)
    if args.title or args.film:
        _query(args)
    return 0


def _build(outs: list[str], quiet: bool) -> None:
    from kissray.similar import build_index

    for out in outs:
        info = build_index(out)
        if not quiet:
            print(f"{out}: index of {info['rows']} vectors ({info['nlist']} lists) built in {info['build_s']:.1f} s",
                  file=sys.stderr)


def _query(args: argparse.Namespace) -> None:
    from kissray.similar import Library, embed_second

    library = Library(args.embeddings, use_index=not args.brute_force)
    if args.film:
        vector = embed_second(args.film, args.at, args.model or library.meta.model, library.meta)
        matches = library.similar_to_vector(vector, args.k)
        query = {"film": args.film, "second": args.at}
    else:
        matches = library.similar_to(args.title, args.at, args.k)
        query = {"title_id": args.title, "second": args.at}
    if args.json:
        print(json.dumps({"query": query, "results": [m.__dict__ for m in matches]}))
        return
    print(f"{'title_id':24s} {'second':>7s} {'similarity':>10s}")
    for m in matches:
        print(f"{m.title_id:24s} {m.second:7d} {m.similarity:10.4f}")
