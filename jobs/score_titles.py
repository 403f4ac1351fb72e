"""Ray job entry point for library scoring: the same options and code as ``kissray score``.

    ray job submit --working-dir . -- python jobs/score_titles.py s3://my-bucket/films/ \\
        --model s3://my-bucket/kissray/checkpoints/kiss-av/ --out s3://my-bucket/kissray/scores/

Inside a Ray job ``RAY_ADDRESS`` is set, so this connects to the job's cluster.
Exit codes: 0 all ok, 3 some titles failed or were partial, 2 usage error, 1 the job could not go on.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

# `python jobs/score_titles.py` puts jobs/ on sys.path; the package sits next to it in --working-dir
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))


def build_parser() -> argparse.ArgumentParser:
    from kissray.commands import score

    parser = argparse.ArgumentParser(prog="score_titles.py", description=score.__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    score.add_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    from kissray.commands import score
    from kissray.errors import CheckpointError, UsageError

    args = build_parser().parse_args(argv)
    try:
        return score.run(args)
    except (UsageError, CheckpointError) as e:
        print(f"score_titles.py: error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # JobError, a lost cluster: the job cannot go on
        print(f"score_titles.py: error: {type(e).__name__}: {' '.join(str(e).split())[:300]}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
