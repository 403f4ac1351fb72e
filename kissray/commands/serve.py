"""``kissray serve``: the HTTP scoring API on Ray Serve (docs/serve.md), until Ctrl-C.

Endpoints: GET /healthz, POST /v1/score (multipart ``file`` or JSON ``{"uri": ...}``), docs at /docs.
With an API key (--api-key-file FILE or $KISSRAY_API_KEY) every route but /healthz needs
``Authorization: Bearer KEY``. Each ingress replica decodes --max-ongoing-requests films at once;
Serve queues up to --max-queued-requests more and answers 503 + Retry-After past them. The same
application runs on a cluster with
``serve deploy cluster/serve-config.yaml``.
"""

from __future__ import annotations

import argparse
import os

from kissray.commands.options import non_negative, non_negative_int, port, positive, positive_int
from kissray.defaults import STILLS_MODES

# option name -> ServeConfig field; unset options keep ServeConfig's defaults (one place for them)
PASSED_AS_IS = ("replicas", "ingress_replicas", "max_batch_size", "num_gpus", "max_upload_mb", "max_film_s",
                "request_timeout_s", "max_ongoing_requests", "max_queued_requests", "ingress_cpus", "stills",
                "stage_max_mb")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="serve the scoring API over HTTP (Ray Serve)", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="checkpoint directory (any fsspec URI)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1, loopback only)")
    p.add_argument("--port", type=port, default=8000, help="HTTP port (default 8000)")
    p.add_argument("--address", default=None,
                   help="Ray cluster to run on (default: $RAY_ADDRESS, else a new local Ray)")
    p.add_argument("--api-key-file", default=None, metavar="FILE",
                   help="file holding the API key clients send as 'Authorization: Bearer KEY' (default: "
                        "$KISSRAY_API_KEY; neither: no authentication, fine on loopback only)")
    p.add_argument("--require-api-key", action="store_true",
                   help="refuse to start without an API key (every replica checks at its start)")
    p.add_argument("--replicas", type=_replicas, default=None,
                   help="classifier replicas, or 'auto': scaled on its batches (default 1)")
    p.add_argument("--ingress-replicas", type=_replicas, default=None,
                   help="HTTP/decode replicas, or 'auto': scaled on requests running + queued (default 1)")
    p.add_argument("--ingress-cpus", type=positive, default=None,
                   help="Ray CPUs per ingress replica (default 1): its decode slots, unless --max-ongoing-requests")
    p.add_argument("--max-ongoing-requests", type=positive_int, default=None,
                   help="films one ingress replica decodes at once; Serve queues the rest (default: "
                        "--ingress-cpus, rounded down)")
    p.add_argument("--max-queued-requests", type=non_negative_int, default=None,
                   help="requests Serve's proxy holds while every slot is busy; past them it answers 503 + "
                        "Retry-After (default 16)")
    p.add_argument("--max-batch-size", type=positive_int, default=None,
                   help="chunks of clips (8 clips each) per forward pass (default 16)")
    p.add_argument("--batch-wait-ms", type=non_negative, default=None,
                   help="longest wait for a batch to fill, ms (default 50)")
    p.add_argument("--num-gpus", type=non_negative, default=None,
                   help="GPUs per classifier replica (default: 1 when the cluster has GPUs, else 0)")
    p.add_argument("--allow-uri-prefix", action="append", default=[], metavar="PREFIX",
                   help="let JSON requests read URIs under PREFIX (repeatable), e.g. s3://bucket/films/; "
                        "none by default, and local paths / file:// only when a prefix names them")
    p.add_argument("--max-upload-mb", type=positive, default=None,
                   help="size limit in MiB for uploads and for the objects behind URIs (default 2048)")
    p.add_argument("--max-film-s", type=positive, default=None,
                   help="longest film accepted, seconds (default 14400 = 4 h); longer: 413")
    p.add_argument("--request-timeout-s", type=positive, default=None,
                   help="a request not answered this long after it arrived, queueing included, is "
                        "abandoned: 408 from Serve's proxy (default 3600)")
    p.add_argument("--upload-dir", default=None,
                   help="where uploads and decoder scratch files go (default: system temp)")
    p.add_argument("--stage-dir", default=None,
                   help="where copies of URI objects are kept between requests (default: UPLOAD_DIR/stage, "
                        "else the node's stage cache, shared with `kissray score`)")
    p.add_argument("--stage-max-mb", type=positive, default=None,
                   help="size of all copies kept in the stage dir, MiB; the least recently used go first "
                        "(default: half the free space of its volume)")
    p.add_argument("--stills", choices=STILLS_MODES, default=None,
                   help="exact: the frame at each still time (default); keyframe: the last keyframe before it")
    p.add_argument("--embeddings", action="append", default=[], metavar="DIR",
                   help="serve POST /v1/similar over this `kissray score --embeddings` output (repeatable: "
                        "one library)")
    p.set_defaults(func=run)


def config_from_args(args: argparse.Namespace):
    """The :class:`kissray.serve.ServeConfig` for parsed arguments; unset options keep its defaults."""
    from kissray.serve import ServeConfig

    options = {name: getattr(args, name) for name in PASSED_AS_IS}
    options.update(model=args.model, allow_uri_prefixes=tuple(args.allow_uri_prefix),
                   require_api_key=args.require_api_key or None,
                   api_key_file=args.api_key_file and os.path.abspath(args.api_key_file),  # replicas run
                   upload_dir=args.upload_dir and os.path.abspath(args.upload_dir),  # in other directories
                   embeddings=tuple(_absolute(out) for out in args.embeddings),
                   stage_dir=args.stage_dir and os.path.abspath(args.stage_dir),
                   batch_wait_timeout_s=None if args.batch_wait_ms is None else args.batch_wait_ms / 1000)
    return ServeConfig.from_dict({k: v for k, v in options.items() if v is not None})


def _absolute(out: str) -> str:
    return out if "://" in out else os.path.abspath(out)


def _replicas(value: str) -> int | str:
    """A replica count: a whole number >= 1, or 'auto' (autoscaled)."""
    if value == "auto":
        return value
    try:
        return positive_int(value)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1 or 'auto', got {value!r}") from None


def run(args: argparse.Namespace) -> int:
    import sys

    from kissray.pipeline import read_model_config
    from kissray.provenance import warning
    from kissray.serve import run_server

    caution = warning(read_model_config(args.model).provenance)  # a bad checkpoint: usage error, before Ray
    if caution:
        print(f"kissray serve: WARNING: {caution}", file=sys.stderr)
    run_server(config_from_args(args), host=args.host, port=args.port, address=args.address)
    return 0
