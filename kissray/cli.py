"""The ``kissray`` command: a thin argparse front over the public functions.

Each subcommand lives in ``kissray/commands/<name>.py`` with ``register(subparsers)`` (adds its
parser, sets ``func``) and does nothing at import time but define functions.
Exit codes: 0 ok, 1 the job itself could not go on, 2 usage error, 3 some titles failed or were partial.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import logging
import os
import sys

from kissray.errors import CheckpointError, JobError, KissrayError, UsageError
from kissray.terminal import engine_logs, log_path

COMMANDS = ("init", "score", "rescore", "similar", "serve", "train", "eval", "annotations", "demo", "excerpts", "export",
            "report", "review")
EXIT_OK, EXIT_JOB, EXIT_USAGE, EXIT_PARTIAL = 0, 1, 2, 3


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kissray", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        module = f"kissray.commands.{name}"
        if importlib.util.find_spec(module) is not None:
            importlib.import_module(module).register(sub)
    return parser


# CPU inference shares the cores with decoder processes; OpenMP threads that spin while a sibling
# is descheduled burn the decoders' CPU (measured beside one decoder: 19.3 s -> 14.3 s for the
# same 600 clips, benchmarks/NOTES.md). libgomp reads it when torch loads; an operator's setting wins.
OPENMP_ENV = {"OMP_WAIT_POLICY": "PASSIVE"}


def main(argv: list[str] | None = None) -> int:
    for name, value in OPENMP_ENV.items():  # the program's own setting, before any command loads torch
        os.environ.setdefault(name, value)
    parser = build_parser()
    args = parser.parse_args(argv)
    with engine_logs(args.command, args.verbose):  # Ray's and ffmpeg's lines: to a log file unless -v
        logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                            format="%(levelname)s %(name)s: %(message)s")
        return run_command(args)


def run_command(args: argparse.Namespace) -> int:
    """Run the parsed command; exceptions become the exit codes of the module docstring."""
    try:
        return int(args.func(args) or EXIT_OK)
    except (UsageError, CheckpointError) as e:
        print(f"kissray {args.command}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except JobError as e:
        print(f"kissray {args.command}: error: {e}", file=sys.stderr)
        return EXIT_JOB
    except KissrayError as e:
        print(f"kissray {args.command}: error: {e}", file=sys.stderr)
        return EXIT_PARTIAL
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # the job itself cannot go on: one line (the traceback with -v)
        if args.verbose:
            raise
        text = " ".join(str(e).split())[:300]
        engines = f"; Ray's and ffmpeg's lines are in {log_path()}" if log_path() else ""
        print(f"kissray {args.command}: error: {type(e).__name__}: {text} (rerun with -v for the traceback"
              f"{engines})", file=sys.stderr)
        return EXIT_JOB


if __name__ == "__main__":
    sys.exit(main())
