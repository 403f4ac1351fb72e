"""AVA v2.x annotations -> a kissray annotations CSV (SPEC 10): the public route to a real kiss detector.

AVA (Atomic Visual Actions) labels person boxes once per second, at keyframes 902..1798 s of
15-minute movie segments. Its CSVs have no header and one row per box and action::

    video_id,middle_frame_timestamp,x1,y1,x2,y2,action_id,person_id
    -5KQ66BBWC4,0902,0.077,0.151,0.283,0.811,80,1

The keyframe at second t labels clip t (``[t, t+1)``): the label when any box at t carries the
action, ``none`` when t was annotated without it; seconds never annotated stay unlabelled.
Consecutive seconds of one label merge into one span. The action is looked up by name in the
label map (``ava_action_list_v2.*.pbtxt``), never by a hard-coded id.
"""

from __future__ import annotations

import csv
import difflib
import io
import math
import os
import re
from collections import defaultdict
from dataclasses import dataclass, field

from kissray.annotations import NEGATIVE, Span
from kissray.errors import UsageError
from kissray.media import VIDEO_EXTENSIONS

AVA_COLUMNS = ("video_id", "middle_frame_timestamp", "x1", "y1", "x2", "y2", "action_id", "person_id")
SPLIT_WORDS = ("train", "val")  # the split of a CSV's rows is the word its file name contains
MAX_ERRORS_SHOWN = 20  # bad rows listed in one error (the count is always given)
FIRST_IDS_SHOWN = 10  # missing video ids named in the report
_ITEM = re.compile(r"\b(?:label|item)\s*\{([^{}]*)\}", re.S)
_NAME = re.compile(r"\bname\s*:\s*\"((?:[^\"\\]|\\.)*)\"")
_ID = re.compile(r"\b(?:label_id|id)\s*:\s*(-?\d+)")
_COMMENT = re.compile(r"(\"(?:[^\"\\]|\\.)*\")|#[^\n]*")


@dataclass
class AvaConversion:
    """What :func:`convert_ava` found: the spans to write and a report of the input."""

    spans: list[Span]  # sorted by film, then start
    action: str  # the label-map name the action was found under
    action_id: int
    label: str
    videos: dict[str, str]  # video_id -> film URI (videos with annotations and a file)
    missing: list[str]  # annotated video ids without a file under --videos, sorted
    duplicates: dict[str, list[str]] = field(default_factory=dict)  # video_id -> files; the first is used

    def seconds(self) -> dict[str, dict[str, int]]:
        """``{split: {label: annotated seconds, "none": ..., "videos": ..., "spans": ...}}``."""
        out: dict[str, dict[str, int]] = {}
        films: dict[str, set] = defaultdict(set)
        for span in self.spans:
            split = span.split or "unsplit"
            counts = out.setdefault(split, {self.label: 0, NEGATIVE: 0, "spans": 0})
            counts[span.label] += int(round(span.end_s - span.start_s))
            counts["spans"] += span.label == self.label
            films[split].add(span.uri)
        for split, counts in out.items():
            counts["videos"] = len(films[split])
        return out


# ---------------------------------------------------------------- the label map


def parse_label_map(text: str, path: str = "<label map>") -> dict[str, int]:
    """``{name: id}`` of a pbtxt label map: ``label { name: "..." label_id: N }`` (or ``item { ... id: N }``)."""
    text = _COMMENT.sub(lambda m: m.group(1) or "", text)  # comments out, quoted names kept
    names: dict[str, int] = {}
    errors = []
    for match in _ITEM.finditer(text):
        line = text.count("\n", 0, match.start()) + 1
        name, number = _NAME.search(match.group(1)), _ID.search(match.group(1))
        if name is None or number is None:
            errors.append(f"{path}:{line}: item without a name and a label_id (or id)")
        elif names.get(name.group(1), int(number.group(1))) != int(number.group(1)):
            errors.append(f"{path}:{line}: {name.group(1)!r} given two ids")
        else:
            names[name.group(1)] = int(number.group(1))
    if errors:
        raise UsageError("\n".join(errors))
    if not names:
        raise UsageError(f"{path}: no 'label {{ name: \"...\" label_id: N }}' items: not an AVA label map")
    return names


def read_label_map(path: str) -> dict[str, int]:
    """Read and parse a label map file (any fsspec URI); see :func:`parse_label_map`."""
    return parse_label_map(_read_text(path, "label map"), str(path))


def find_action(label_map: dict[str, int], name: str, path: str = "<label map>") -> tuple[str, int]:
    """``(name as in the map, id)`` of the action called ``name``.

    Exact names first, then ignoring case and spacing, then the name before its parenthesis
    (``kiss`` for ``kiss (a person)``) when one action alone has it. Otherwise a UsageError
    lists the close matches.
    """
    if name in label_map:
        return name, label_map[name]
    for key in (_fold, lambda n: _fold(n.split("(")[0])):
        found = [n for n in label_map if key(n) == _fold(name)]
        if len(found) == 1:
            return found[0], label_map[found[0]]
    keys = {**{_fold(n.split("(")[0]): n for n in label_map}, **{_fold(n): n for n in label_map}}
    close = list(dict.fromkeys(keys[k] for k in difflib.get_close_matches(_fold(name), keys, n=8, cutoff=0.6)))
    close += [n for n in label_map if _fold(name) in _fold(n) and n not in close]
    hint = f"; close matches: {', '.join(repr(n) for n in close[:8])}" if close else ""
    raise UsageError(f"{path}: no action named {name!r} among its {len(label_map)} actions{hint}")


def _fold(name: str) -> str:
    return " ".join(name.lower().split())


# ---------------------------------------------------------------- the CSVs


def split_of_file(path: str) -> str | None:
    """``train`` or ``val`` from the CSV's file name (``ava_val_v2.2.csv`` -> val), else None."""
    found = [word for word in SPLIT_WORDS if word in os.path.basename(str(path)).lower()]
    if len(found) > 1:
        raise UsageError(f"{path}: the file name says both {found}; name it for one split")
    return found[0] if found else None


def read_keyframes(csvs: list[str], action_id: int, offset_s: int = 0
                   ) -> tuple[dict[str, dict[int, bool]], dict[str, str | None]]:
    """``({video_id: {film second: carries the action}}, {video_id: split})`` from AVA CSVs.

    Every malformed row (file and line) is reported in one :class:`UsageError`.
    """
    keyframes: dict[str, dict[int, bool]] = defaultdict(dict)
    splits: dict[str, str | None] = {}
    errors: list[str] = []
    for path in csvs:
        split = split_of_file(path)
        for line, row in enumerate(csv.reader(io.StringIO(_read_text(path, "AVA CSV"))), start=1):
            if not any(cell.strip() for cell in row):
                continue
            parsed, problem = _parse_row([cell.strip() for cell in row], offset_s)
            if problem:
                errors.append(f"{path}:{line}: {problem}")
                continue
            video_id, second, action = parsed
            if splits.setdefault(video_id, split) != split:
                errors.append(f"{path}:{line}: video {video_id} is also in a {splits[video_id] or 'unsplit'} file")
                continue
            keyframes[video_id][second] = keyframes[video_id].get(second, False) or action == action_id
    if errors:
        shown = "\n".join(f"  {e}" for e in errors[:MAX_ERRORS_SHOWN])
        more = f"\n  ... and {len(errors) - MAX_ERRORS_SHOWN} more" if len(errors) > MAX_ERRORS_SHOWN else ""
        raise UsageError(f"{len(errors)} malformed AVA row(s) (expected {','.join(AVA_COLUMNS)}, "
                         f"no header):\n{shown}{more}")
    return dict(keyframes), splits


def _parse_row(row: list[str], offset_s: int) -> tuple[tuple[str, int, int] | None, str | None]:
    if len(row) != len(AVA_COLUMNS):
        return None, f"{len(row)} columns, expected {len(AVA_COLUMNS)}"
    video_id, stamp, *box, action, person = row
    if not video_id:
        return None, "empty video_id"
    try:
        second = float(stamp)
    except ValueError:
        return None, f"middle_frame_timestamp is not a number: {stamp!r}"
    if not math.isfinite(second) or not second.is_integer() or second - offset_s < 0:
        return None, f"middle_frame_timestamp must be a whole second >= {offset_s}, not {stamp!r}"
    for name, cell in zip(AVA_COLUMNS[2:6], box):
        try:
            if not math.isfinite(float(cell)):
                raise ValueError
        except ValueError:
            return None, f"{name} is not a finite number: {cell!r}"
    for name, cell in (("action_id", action), ("person_id", person)):
        if not re.fullmatch(r"-?\d+", cell):
            return None, f"{name} is not a whole number: {cell!r}"
    return (video_id, int(second) - offset_s, int(action)), None


# ---------------------------------------------------------------- videos and spans


def find_videos(videos: str) -> tuple[dict[str, str], dict[str, list[str]]]:
    """``({video_id: URI}, {video_id: [URIs]} for ids with several files)`` of ``DIR/<video_id>.<ext>``.

    ``videos`` is a local directory or any fsspec URI; with several files for one id (``a.mp4``
    and ``a.mkv``) the first by name is used.
    """
    import fsspec

    fs, root = fsspec.core.url_to_fs(str(videos))
    if not fs.isdir(root):
        raise UsageError(f"--videos {videos}: not a directory")
    base = os.path.abspath(videos) if "://" not in str(videos) else str(videos).rstrip("/")  # as the user wrote it
    found: dict[str, list[str]] = defaultdict(list)
    for name in sorted(os.path.basename(p.rstrip("/")) for p in fs.ls(root, detail=False)):
        stem, ext = os.path.splitext(name)
        if ext.lower() in VIDEO_EXTENSIONS:
            found[stem].append(f"{base}/{name}")
    return {k: v[0] for k, v in found.items()}, {k: v for k, v in found.items() if len(v) > 1}


def keyframe_spans(uri: str, keyframes: dict[int, bool], label: str, split: str | None) -> list[Span]:
    """One film's spans: runs of consecutive seconds with one label (``label`` or ``none``)."""
    spans: list[Span] = []
    for second in sorted(keyframes):
        name = label if keyframes[second] else NEGATIVE
        last = spans[-1] if spans else None
        if last is not None and last.end_s == second and last.label == name:
            spans[-1] = Span(uri, last.start_s, second + 1.0, name, split)
        else:
            spans.append(Span(uri, float(second), second + 1.0, name, split))
    return spans


def convert_ava(csvs: list[str], label_map: str, action: str, videos: str, label: str = "kiss",
                offset_s: int = 0) -> AvaConversion:
    """Read AVA CSVs and a label map and return the spans of ``action`` as ``label`` (see the module doc).

    ``offset_s`` is subtracted from AVA's timestamps, for videos cut to start later than the
    movie (900 for the common 15-minute cuts that start at 900 s).
    """
    if not label or label == NEGATIVE or any(c in label for c in ',"\n'):
        raise UsageError(f"--label must be a name other than {NEGATIVE!r}, without commas or quotes: {label!r}")
    if offset_s < 0:
        raise UsageError(f"--offset-s must be >= 0, not {offset_s}")
    action_name, action_id = find_action(read_label_map(label_map), action, str(label_map))
    keyframes, splits = read_keyframes(list(csvs), action_id, offset_s)
    if not keyframes:
        raise UsageError(f"no AVA rows in {', '.join(map(str, csvs))}")
    if not any(any(k.values()) for k in keyframes.values()):
        raise UsageError(f"action {action_name!r} (id {action_id}) is on no row of {', '.join(map(str, csvs))}")
    files, duplicates = find_videos(videos)
    found = {v: files[v] for v in sorted(keyframes) if v in files}
    missing = sorted(v for v in keyframes if v not in files)
    if not found:
        raise UsageError(f"--videos {videos}: none of the {len(keyframes)} annotated videos is there as "
                         f"<video_id>.<ext> (first ids: {', '.join(missing[:FIRST_IDS_SHOWN])})")
    spans = [s for v, uri in found.items() for s in keyframe_spans(uri, keyframes[v], label, splits[v])]
    return AvaConversion(spans, action_name, action_id, label, found, missing,
                         {v: d for v, d in duplicates.items() if v in found})


def _read_text(path: str, what: str) -> str:
    import fsspec

    try:
        with fsspec.open(str(path), "rt", encoding="utf-8-sig") as f:
            return f.read()
    except FileNotFoundError as e:
        raise UsageError(f"{path}: no such {what} file") from e
    except UnicodeDecodeError as e:
        raise UsageError(f"{path}: not a text file ({what})") from e
