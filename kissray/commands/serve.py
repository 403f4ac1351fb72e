"""``kissray serve``: the HTTP scoring API (SPEC section 8) on Ray Serve, until Ctrl-C.

Endpoints: GET /healthz, POST /v1/score (multipart ``file`` or JSON ``{"uri": ...}``), docs at /docs.
The same application runs on a cluster with ``serve deploy cluster/serve-config.yaml``.
"""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="serve the scoring API over HTTP (Ray Serve)", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="checkpoint directory (any fsspec URI)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1, loopback only)")
    p.add_argument("--port", type=int, default=8000, help="HTTP port (default 8000)")
    p.add_argument("--address", default=None,
                   help="Ray cluster to run on (default: $RAY_ADDRESS, else a new local Ray)")
    p.add_argument("--replicas", type=int, default=None, help="classifier replicas (default 1)")
    p.add_argument("--ingress-replicas", type=int, default=None, help="HTTP/decode replicas (default 1)")
    p.add_argument("--max-batch-size", type=int, default=None,
                   help="chunks of clips (8 clips each) per forward pass (default 16)")
    p.add_argument("--batch-wait-ms", type=float, default=None,
                   help="longest wait for a batch to fill, ms (default 50)")
    p.add_argument("--num-gpus", type=float, default=None,
                   help="GPUs per classifier replica (default: 1 when the cluster has GPUs, else 0)")
    p.add_argument("--allow-uri-prefix", action="append", default=[], metavar="PREFIX",
                   help="let JSON requests read URIs under PREFIX (repeatable), e.g. s3://bucket/films/; "
                        "none by default, and local paths / file:// only when a prefix names them")
    p.add_argument("--max-upload-mb", type=float, default=None, help="upload size limit in MiB (default 2048)")
    p.add_argument("--upload-dir", default=None, help="where uploads are staged (default: system temp dir)")
    p.set_defaults(func=run)


def config_from_args(args: argparse.Namespace):
    """The :class:`kissray.serve.ServeConfig` for parsed arguments; unset options keep its defaults."""
    from kissray.serve import ServeConfig

    options = {"model": args.model, "allow_uri_prefixes": tuple(args.allow_uri_prefix),
               "replicas": args.replicas, "ingress_replicas": args.ingress_replicas,
               "max_batch_size": args.max_batch_size, "num_gpus": args.num_gpus,
               "max_upload_mb": args.max_upload_mb, "upload_dir": args.upload_dir,
               "batch_wait_timeout_s": None if args.batch_wait_ms is None else args.batch_wait_ms / 1000}
    return ServeConfig.from_dict({k: v for k, v in options.items() if v is not None})


def run(args: argparse.Namespace) -> int:
    from kissray.serve import run_server

    run_server(config_from_args(args), host=args.host, port=args.port, address=args.address)
    return 0
