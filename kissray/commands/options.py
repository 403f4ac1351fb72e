"""Option types shared by every ``kissray`` command, so each checks its options the same way.

Use them as argparse ``type=``: a bad value is argparse's usage error (exit 2, before anything
is written) whose message names the option and the reason, e.g. ``argument --threshold: expected
a number from 0 to 1, got '50%'``. Each validator raises :class:`argparse.ArgumentTypeError`
itself (never a bare ``ValueError``), so argparse never shows a function's name. NaN and
infinities are refused wherever a finite number is meant.
"""

from __future__ import annotations

import argparse
import math


def _checked(text: str, parse, ok, expected: str):
    """``parse(text)`` when it parses and ``ok`` accepts it, else the usage error argparse shows."""
    try:
        value = parse(text)
    except ValueError:
        value = None
    if value is None or (isinstance(value, float) and not math.isfinite(value)) or not ok(value):
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
    return value


def fraction(text: str) -> float:
    """A number from 0 to 1 (a threshold, a fraction of seconds)."""
    return _checked(text, float, lambda v: 0.0 <= v <= 1.0, "a number from 0 to 1")


def positive_int(text: str) -> int:
    """A whole number >= 1 (counts, sizes, seconds of a window)."""
    return _checked(text, int, lambda v: v >= 1, "a whole number >= 1")


def non_negative_int(text: str) -> int:
    """A whole number >= 0 (an offset, a count that may be none)."""
    return _checked(text, int, lambda v: v >= 0, "a whole number >= 0")


def any_int(text: str) -> int:
    """Any whole number (a seed)."""
    return _checked(text, int, lambda v: True, "a whole number")


def non_negative(text: str) -> float:
    """A finite number >= 0 (GPUs per actor, padding seconds)."""
    return _checked(text, float, lambda v: v >= 0, "a finite number >= 0")


def positive(text: str) -> float:
    """A finite number > 0 (seconds, megabytes, a frame rate, a learning rate)."""
    return _checked(text, float, lambda v: v > 0, "a finite number > 0")


def port(text: str) -> int:
    """A TCP port, 0 (any free one) to 65535."""
    return _checked(text, int, lambda v: 0 <= v <= 65535, "a port number from 0 to 65535")


def image_size(text: str) -> int:
    """Still size in pixels: at least 16 (the model's smallest input)."""
    return _checked(text, int, lambda v: v >= 16, "a whole number of pixels >= 16")


def add_segment_options(p: argparse.ArgumentParser) -> None:
    """--threshold, --min-len, --min-fraction: the segmenter's options (SPEC 5), one definition
    for every command that segments (score, eval, rescore, ...)."""
    from kissray.defaults import MIN_FRACTION, MIN_LEN_S, THRESHOLD

    p.add_argument("--threshold", type=fraction, default=THRESHOLD,
                   help="segmenter threshold on each second's probability (%(default)s)")
    p.add_argument("--min-len", type=positive_int, default=MIN_LEN_S, help="shortest segment, seconds (%(default)s)")
    p.add_argument("--min-fraction", type=fraction, default=MIN_FRACTION,
                   help="least fraction of positive seconds in a segment (%(default)s)")
