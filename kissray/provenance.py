"""What a checkpoint's head was trained on, or that it never was (SPEC 4).

``ModelConfig.provenance`` (saved in ``config.json``) is one of:

- ``{"trained": false, "made_by": "kissray init", ...}``: random or given backbones, a head that
  never saw a label. Its scores are placeholders, not findings; everything that shows them says so.
- ``{"trained": true, "annotations": URI, "films": {split: n}, "metrics": {split: {label: {...}}}, ...}``:
  written by ``kissray train`` with the data it learnt from and what it scored on held-out films.
- missing (``None``): a checkpoint from a kissray that did not record it; shown as "unknown".

States: ``trained``, ``untrained``, ``unknown``, and ``missing`` for a checkpoint a page names but
cannot read (moved or deleted since scoring).

This module only reads and words these records; it imports neither torch nor Ray.
"""

from __future__ import annotations

from typing import Any

UNTRAINED_WARNING = ("the model's head was never trained (made by `kissray init`): its scores are placeholders, "
                     "not findings; train it first (`kissray train`, or `kissray demo` to see a trained one)")
UNKNOWN_NOTE = ("the checkpoint does not say what its head was trained on (made by an older kissray); "
                "if it was never trained, its scores are placeholders")
MISSING_NOTE = ("the checkpoint cannot be read here, so whether its head was ever trained is unknown; "
                "if it was not, these scores are placeholders")
SUMMARY_METRICS = ("ap", "f1")  # per-second metrics kept per split and label
CONFIG_FILE = "config.json"  # the checkpoint file that holds the record (kissray.model.CONFIG_FILE)
MISSING_CHECKPOINT = "missing"  # read_provenance's answer for a checkpoint that cannot be read


def untrained(resnet_weights: str | None = None, vggish_weights: str | None = None) -> dict[str, Any]:
    """The record of a new checkpoint: backbones random or given, head untrained."""
    return {"trained": False, "made_by": "kissray init",
            "backbones": {"resnet": resnet_weights or "random", "vggish": vggish_weights or "random"}}


def trained(metrics: dict[str, Any]) -> dict[str, Any]:
    """The record of a trained checkpoint, from the ``metrics.json`` of ``kissray train``:
    its annotations, its films per split, and per-second AP / F1 of the kept epoch per split."""
    final = metrics.get("final", {})
    return {"trained": True, "made_by": "kissray train", "annotations": metrics.get("annotations", ""),
            "init": metrics.get("init"), "mode": metrics.get("options", {}).get("mode"),
            "films": {split: len(films) for split, films in metrics.get("splits", {}).items()},
            "best_epoch": metrics.get("best_epoch"),
            "metrics": {split: {label: {k: m.get(k) for k in SUMMARY_METRICS} for label, m in per_label.items()}
                        for split, per_label in final.items()}}


def read_provenance(checkpoint: str) -> dict[str, Any] | str | None:
    """The record in a checkpoint's config.json without loading the model (for pages that show
    results of a checkpoint): the dict, None when not recorded, or :data:`MISSING_CHECKPOINT`."""
    import json

    import fsspec

    try:
        with fsspec.open(f"{str(checkpoint).rstrip('/')}/{CONFIG_FILE}", "rb") as f:
            return json.loads(f.read()).get("provenance")
    except (OSError, ValueError, AttributeError):
        return MISSING_CHECKPOINT


def state(provenance: dict[str, Any] | None) -> str:
    """``trained``, ``untrained`` or ``unknown``."""
    if provenance == MISSING_CHECKPOINT:
        return MISSING_CHECKPOINT
    if not isinstance(provenance, dict) or "trained" not in provenance:
        return "unknown"
    return "trained" if provenance["trained"] else "untrained"


def warning(provenance: dict[str, Any] | None) -> str | None:
    """What a user must be told next to any result of this checkpoint, or None for a trained one."""
    return {"untrained": UNTRAINED_WARNING, "unknown": UNKNOWN_NOTE,
            MISSING_CHECKPOINT: MISSING_NOTE}.get(state(provenance))


def describe(provenance: dict[str, Any] | None) -> str:
    """One line: what the head was trained on (annotations, films, held-out metrics), or the warning."""
    if state(provenance) != "trained":
        return warning(provenance) or ""
    films = provenance.get("films") or {}
    counts = ", ".join(f"{split} {n}" for split, n in films.items())
    line = f"head trained on {provenance.get('annotations') or 'unnamed annotations'} ({sum(films.values())} films: {counts})"
    metrics = provenance.get("metrics") or {}
    held_out = next((split for split in ("test", "val") if metrics.get(split)), None)
    if held_out:
        scores = "; ".join(f"{label} AP {_number(m.get('ap'))} F1 {_number(m.get('f1'))}"
                           for label, m in metrics[held_out].items())
        line += f"; {held_out} split: {scores}"
    return line


def _number(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"
