"""kissray: find kissing scenes (or any trained label) in film libraries.

Light at import time (the decoder child process imports this package): the model and scoring
entry points are loaded on first use.
"""

from __future__ import annotations

import importlib

__all__ = ["score_film", "FilmResult", "media", "audio", "segment", "model", "errors"]

_LAZY = {"score_film": "kissray.score", "FilmResult": "kissray.score"}
_SUBMODULES = {"media", "audio", "segment", "model", "errors", "score", "pipeline", "serve",
               "train", "evaluate", "synth", "excerpts", "export", "report", "cli"}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    if name in _SUBMODULES:
        return importlib.import_module(f"kissray.{name}")
    raise AttributeError(f"module 'kissray' has no attribute {name!r}")
