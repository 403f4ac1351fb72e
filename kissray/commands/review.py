"""``kissray review``: review a score output's segments in the browser; answers become annotations.

Serves the report of OUT with, per segment, a player and three answers (Right, Wrong, Edges: right
with other edges), and a way to mark spans the detector missed. Every answer is saved at once to
OUT/reviews/ as a new file (the `kissray train` CSV format plus answer, reviewer, reviewed_at); the
latest answer per segment counts. Train on them with `kissray train --annotations OUT/reviews`.
"""

from __future__ import annotations

import argparse
import sys

from kissray.errors import UsageError

DEFAULT_PORT = 8080


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("review", help="review segments in the browser; answers are saved as annotations",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog="Keys on the page: j/k next/previous segment, p play/pause, 1 Right, 2 Wrong, 3 Edges, [ ] start "
                              "-/+1 s, - = end -/+1 s, m mark a missed span.")
    p.add_argument("--scores", required=True, metavar="OUT", help="a `kissray score --out` directory (any fsspec URI)")
    p.add_argument("--excerpts", default=None, metavar="DIR",
                   help="where `kissray excerpts` wrote its files (default: OUT/excerpts)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"default {DEFAULT_PORT}; 0: any free port")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1; any other needs --api-key-file)")
    p.add_argument("--reviewer", default="", help="name saved with every answer (the page can change it)")
    p.add_argument("--api-key-file", default=None, metavar="FILE",
                   help="a file holding the key (else $KISSRAY_API_KEY): clients send 'Authorization: Bearer "
                        "KEY', browsers use the login form")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from kissray.auth import ApiKey
    from kissray.review.server import ReviewSite, check_host, make_server

    if not 0 <= args.port <= 65535:
        raise UsageError(f"--port must be 0..65535, not {args.port}")
    api_key = ApiKey.load(args.api_key_file)
    check_host(args.host, api_key)  # before reading OUT
    site = ReviewSite(args.scores, args.excerpts, reviewer=args.reviewer, api_key=api_key)
    server = make_server(site, args.host, args.port)
    host, port = server.server_address[:2]
    shown = f"[{host}]" if ":" in host else host
    print(f"kissray review: http://{shown}:{port}/ ({len(site.segments)} segments of {len(site.titles)} titles; "
          f"answers go to {site.reviews.uri}{'; key required' if api_key else ''}). Ctrl-C stops.", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print("stopped", file=sys.stderr)
    finally:
        server.server_close()
    return 0
