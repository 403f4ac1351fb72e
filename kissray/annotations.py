"""Annotations: the CSV format, its validation, clip labels, and the film-level split.

Format (one span a row, header required)::

    uri,start_s,end_s,label[,split]
    films/a.mp4,12.0,19.5,kiss
    films/a.mp4,40,55,none,train

Relative paths are relative to the CSV's directory. ``label`` is any name; ``none`` marks an
annotated negative span (no label there), ``not:<label>`` a span negative for that label only
(a segment an editor answered wrong: the head's other labels learn nothing there). ``split``
(optional) is ``train``, ``val`` or ``test`` and must agree across a film's rows; films without
one are split 80/10/10 by a seeded shuffle. Splits are always by film, never by clip.

Review answers (``kissray review``, :mod:`kissray.review.store`) are read as they are: a folder
of them (``OUT/reviews``) or one file, with their extra columns; only each segment's latest
answer counts. A span of one label may overlap a span of another label; it may not overlap its
own negation, nor may a ``none`` span overlap a labelled one.
"""

from __future__ import annotations

import csv
import io
import math
import os
from collections import Counter, defaultdict
from dataclasses import dataclass, replace

import numpy as np

from kissray.errors import UsageError

NEGATIVE = "none"  # the label of annotated negative spans
NOT_PREFIX = "not:"  # ``not:kiss``: negative for ``kiss`` only
COLUMNS = ("uri", "start_s", "end_s", "label")
OPTIONAL_COLUMNS = ("split",)
REVIEW_COLUMNS = ("answer", "reviewer", "reviewed_at", "title_id", "segment_start_s", "segment_end_s")
SPLITS = ("train", "val", "test")
SPLIT_FRACTIONS = (0.8, 0.1, 0.1)  # train / val / test, by film
MIN_COVER_S = 0.5  # a span labels a clip when it covers at least this much of the clip's second
UNLABELLED_CHOICES = ("ignore", "negative")
_EPS = 1e-9


@dataclass(frozen=True)
class Span:
    """One annotated interval ``[start_s, end_s)`` of a film."""

    uri: str
    start_s: float
    end_s: float
    label: str
    split: str | None = None
    line: int = 0  # line number in the CSV (1 = header)


@dataclass
class Annotations:
    """The validated spans of a CSV, grouped by film, with the model's labels."""

    spans: dict[str, list[Span]]  # uri -> spans sorted by start
    labels: list[str]  # non-``none`` labels (``not:kiss`` counts as ``kiss``), in order of first appearance
    path: str = ""
    reviews: dict | None = None  # where the spans came from when they are review answers (provenance)

    @property
    def films(self) -> list[str]:
        return list(self.spans)

    def subset(self, films: list[str]) -> "Annotations":
        """The annotations of ``films`` only (labels kept, so heads stay comparable)."""
        return Annotations({uri: self.spans[uri] for uri in films}, list(self.labels), self.path, self.reviews)

    def split_of(self, uri: str) -> str | None:
        """The film's split from the ``split`` column, or None when not given."""
        return next((s.split for s in self.spans[uri] if s.split), None)


def read_annotations(path: str, check_films: bool = True) -> Annotations:
    """Read and validate an annotations CSV (any fsspec URI).

    Every bad row is reported, with its line number, in one :class:`UsageError`.
    """
    import fsspec

    fs, root = fsspec.core.url_to_fs(str(path))
    if fs.isdir(root):
        return read_review_folder(str(path), check_films)
    try:
        with fsspec.open(str(path), "rt", encoding="utf-8-sig") as f:
            text = f.read()
    except FileNotFoundError as e:
        raise UsageError(f"{path}: no such annotations file") from e
    base = os.path.dirname(str(path)) if "://" not in str(path) else None
    return parse_annotations(text, path=str(path), check_films=check_films, base_dir=base)


def read_review_folder(path: str, check_films: bool = True) -> Annotations:
    """The annotations in a folder of review answers (``OUT/reviews``): each segment's latest answer."""
    rows = ReviewFiles(path).rows()
    if not rows:
        raise UsageError(f"{path}: a folder with no review answers (*.csv) in it")
    try:
        text = _csv_text(training_rows(rows))
    except (KeyError, ValueError) as e:
        raise UsageError(f"{path}: a review file with a bad row: {e}") from e
    annotations = parse_annotations(text, path=path, check_films=check_films)
    annotations.reviews = {"folder": path, "answers": len(rows), "counted": len(latest(rows)),
                           "files": sorted({r["file"] for r in rows}),
                           "by_answer": dict(Counter(r.get("answer") for r in latest(rows)))}
    return annotations


def _csv_text(rows: list[dict]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, COLUMNS + OPTIONAL_COLUMNS, lineterminator="\n", extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


def parse_annotations(text: str, path: str = "<annotations>", check_films: bool = True,
                      base_dir: str | None = None) -> Annotations:
    """Validate the CSV text; see :func:`read_annotations`. Relative local URIs are joined to ``base_dir``."""
    reader = csv.reader(io.StringIO(text))
    header = [h.strip() for h in next(reader, [])]
    if "answer" in header and not _header_errors(header):  # review answers: the latest per segment
        try:
            text = _csv_text(training_rows(parse_rows(text)))
        except (KeyError, ValueError) as e:
            raise UsageError(f"{path}: a review file with a bad row: {e}") from e
        reader = csv.reader(io.StringIO(text))
        header = [h.strip() for h in next(reader, [])]
    errors = _header_errors(header)
    if errors:
        raise UsageError(_format(path, errors))
    spans = []
    for line, row in enumerate(reader, start=2):
        if not any(cell.strip() for cell in row):
            continue
        span, problems = _parse_row(dict(zip(header, (c.strip() for c in row))), len(row), len(header), line)
        errors += [(line, p) for p in problems]
        if span is not None:
            spans.append(_resolve(span, base_dir))
    if not spans and not errors:
        errors.append((1, "no annotated spans"))
    by_film = _group(spans)
    errors += _overlap_errors(by_film) + _split_errors(by_film)
    if check_films:
        errors += _missing_film_errors(by_film)
    if errors:
        raise UsageError(_format(path, errors))
    labels = span_labels(spans)
    if not labels:
        raise UsageError(f"{path}: no positive label (every span is '{NEGATIVE}')")
    return Annotations(by_film, labels, path)


def span_labels(spans: list[Span]) -> list[str]:
    """The labels the spans speak of (``not:kiss`` speaks of ``kiss``), in order of first appearance."""
    return list(dict.fromkeys(base_label(s.label) for s in spans if s.label != NEGATIVE))


def base_label(label: str) -> str:
    """``kiss`` for ``kiss`` and ``not:kiss``."""
    return label[len(NOT_PREFIX):] if label.startswith(NOT_PREFIX) else label


def _header_errors(header: list[str]) -> list[tuple[int, str]]:
    errors = []
    unknown = [h for h in header if h not in COLUMNS + OPTIONAL_COLUMNS + REVIEW_COLUMNS]
    missing = [c for c in COLUMNS if c not in header]
    if unknown:
        errors.append((1, f"unknown column(s) {unknown}; allowed: {list(COLUMNS + OPTIONAL_COLUMNS)}"))
    if missing:
        errors.append((1, f"missing column(s) {missing}; expected header 'uri,start_s,end_s,label[,split]'"))
    if len(set(header)) != len(header):
        errors.append((1, "duplicate column names"))
    return errors


def _parse_row(row: dict, n_cells: int, n_columns: int, line: int) -> tuple[Span | None, list[str]]:
    problems = []
    if n_cells != n_columns:
        problems.append(f"{n_cells} cells, expected {n_columns}")
    times = {}
    for key in ("start_s", "end_s"):
        try:
            times[key] = float(row.get(key, ""))
            if not math.isfinite(times[key]) or times[key] < 0:
                problems.append(f"{key} must be a finite number >= 0, not {row.get(key)!r}")
        except ValueError:
            problems.append(f"{key} is not a number: {row.get(key)!r}")
    if not problems and times["end_s"] <= times["start_s"]:
        problems.append(f"end_s {times['end_s']:g} <= start_s {times['start_s']:g}")
    if not row.get("uri"):
        problems.append("empty uri")
    if not row.get("label") or row["label"] == NOT_PREFIX or row["label"] == NOT_PREFIX + NEGATIVE:
        problems.append(f"empty label: {row.get('label')!r}")
    split = row.get("split") or None
    if split is not None and split not in SPLITS:
        problems.append(f"split must be one of {list(SPLITS)}, not {split!r}")
    if problems:
        return None, problems
    return Span(row["uri"], times["start_s"], times["end_s"], row["label"], split, line), []


def _resolve(span: Span, base_dir: str | None) -> Span:
    if base_dir is None or "://" in span.uri or os.path.isabs(span.uri):
        return span
    return replace(span, uri=os.path.normpath(os.path.join(base_dir, span.uri)))


def _group(spans: list[Span]) -> dict[str, list[Span]]:
    by_film: dict[str, list[Span]] = defaultdict(list)
    for span in spans:
        by_film[span.uri].append(span)
    return {uri: sorted(group, key=lambda s: (s.start_s, s.end_s)) for uri, group in by_film.items()}


def _overlap_errors(by_film: dict[str, list[Span]]) -> list[tuple[int, str]]:
    errors = []
    for spans in by_film.values():
        for i, a in enumerate(spans):
            for b in spans[i + 1:]:
                if b.start_s >= a.end_s:
                    break
                if _conflict(a.label, b.label):
                    errors.append((max(a.line, b.line), f"span {b.start_s:g}-{b.end_s:g} '{b.label}' overlaps "
                                                        f"{a.start_s:g}-{a.end_s:g} '{a.label}' (line "
                                                        f"{min(a.line, b.line)}) with a label it contradicts"))
    return errors


def _conflict(a: str, b: str) -> bool:
    """Labels two overlapping spans may not carry: a label and its negation, or ``none`` and a label."""
    if a == b:
        return False
    if NEGATIVE in (a, b):
        return not (a.startswith(NOT_PREFIX) or b.startswith(NOT_PREFIX))
    return base_label(a) == base_label(b)


def _split_errors(by_film: dict[str, list[Span]]) -> list[tuple[int, str]]:
    errors = []
    for uri, spans in by_film.items():
        given = {s.split for s in spans if s.split}
        if len(given) > 1:
            errors.append((spans[0].line, f"{uri}: rows give different splits {sorted(given)}"))
    return errors


def _missing_film_errors(by_film: dict[str, list[Span]]) -> list[tuple[int, str]]:
    import fsspec

    errors = []
    for uri, spans in by_film.items():
        try:
            fs, p = fsspec.core.url_to_fs(uri)
            exists = fs.isfile(p)
        except (ValueError, ImportError, OSError):
            exists = False
        if not exists:
            errors += [(s.line, f"film not found: {uri}") for s in spans]
    return errors


def _format(path: str, errors: list[tuple[int, str]]) -> str:
    lines = [f"{path}: {len(errors)} bad row(s):"]
    lines += [f"  line {line}: {message}" for line, message in sorted(errors, key=lambda e: e[0])]
    return "\n".join(lines)


def format_annotations(spans: list[Span]) -> str:
    """The CSV text of ``spans`` (header ``uri,start_s,end_s,label,split``), readable by :func:`read_annotations`."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(COLUMNS + OPTIONAL_COLUMNS)
    for s in spans:
        writer.writerow([s.uri, seconds_text(s.start_s), seconds_text(s.end_s), s.label, s.split or ""])
    return out.getvalue()


def write_annotations(spans: list[Span], path: str) -> None:
    """Write ``spans`` as an annotations CSV to ``path`` (any fsspec URI)."""
    import fsspec

    with fsspec.open(str(path), "wt", encoding="utf-8") as f:
        f.write(format_annotations(spans))


def seconds_text(x: float) -> str:
    """A time in a CSV cell: ``12`` or ``12.5``."""
    return str(int(x)) if float(x).is_integer() else repr(float(x))


# ---------------------------------------------------------------- review answers (kissray review)


class ReviewFiles:
    """Reads a reviews folder; files already read are not read again (they never change)."""

    def __init__(self, reviews_dir: str):
        import fsspec

        self.uri = str(reviews_dir).rstrip("/")
        self.fs, self.folder = fsspec.core.url_to_fs(self.uri)
        self._rows: dict[str, list[dict]] = {}

    def names(self) -> list[str]:
        """The answer files, oldest first (names start with their UTC time)."""
        if hasattr(self.fs, "invalidate_cache"):
            self.fs.invalidate_cache(self.folder)  # another server may have written since
        if not self.fs.isdir(self.folder):
            return []
        names = (p.rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(self.folder, detail=False))
        return sorted(n for n in names if n.endswith(".csv") and not n.startswith("."))

    def rows(self) -> list[dict]:
        """Every answer ever saved (the history), each with its file name under ``file``."""
        names = self.names()
        new = [n for n in names if n not in self._rows]
        if new:
            paths = [f"{self.folder.rstrip('/')}/{n}" for n in new]
            for path, data in self.fs.cat(paths).items():
                name = path.rstrip("/").rsplit("/", 1)[-1]
                self._rows[name] = [{**row, "file": name} for row in parse_rows(data.decode("utf-8-sig"))]
        return [row for name in names for row in self._rows[name]]


def parse_rows(text: str) -> list[dict]:
    """The rows of one review CSV (any columns; blank lines skipped)."""
    return [row for row in csv.DictReader(io.StringIO(text)) if any((v or "").strip() for v in row.values())]


def answer_key(row: dict) -> tuple:
    """What an answer is about: a segment (title, label, bounds) or a missed span."""
    label = base_label(row["label"])
    if row.get("answer") == "missed" or not row.get("segment_start_s"):
        return row["uri"], label, "span", float(row["start_s"]), float(row["end_s"])
    return row["uri"], label, "segment", float(row["segment_start_s"]), float(row["segment_end_s"])


def latest(rows: list[dict]) -> list[dict]:
    """The answer that counts for each segment (and missed span): the latest; oldest first."""
    found: dict[tuple, dict] = {}
    for row in sorted(rows, key=_when):
        found[answer_key(row)] = row
    return sorted(found.values(), key=_when)


def _when(row: dict) -> tuple[str, str]:
    return row.get("reviewed_at") or "", row.get("file") or ""


def training_rows(rows: list[dict]) -> list[dict]:
    """Annotation rows (``uri, start_s, end_s, label, split``) from the answers that count:
    a later answer takes the seconds it overlaps from earlier answers of the other polarity."""
    kept: list[dict] = []
    for row in latest(rows):
        span = {k: row.get(k) or "" for k in COLUMNS + OPTIONAL_COLUMNS}
        start, end = float(span["start_s"]), float(span["end_s"])
        trimmed = []
        for old in kept:
            if old["uri"] == span["uri"] and base_label(old["label"]) == base_label(span["label"]) \
                    and old["label"] != span["label"]:
                trimmed += _minus(old, start, end)
            else:
                trimmed.append(old)
        kept = trimmed + [span]
    return kept


def _minus(row: dict, start: float, end: float) -> list[dict]:
    """``row``'s span without ``[start, end)``: zero, one or two rows."""
    a, b = float(row["start_s"]), float(row["end_s"])
    pieces = [(a, min(b, start)), (max(a, end), b)] if start < b and end > a else [(a, b)]
    return [{**row, "start_s": seconds_text(s), "end_s": seconds_text(e)} for s, e in pieces if e - s > 1e-9]


# ---------------------------------------------------------------- clip labels


def clip_targets(spans: list[Span], labels: list[str], n_clips: int,
                 unlabelled: str = "ignore") -> tuple[np.ndarray, np.ndarray]:
    """Which clips are labelled, and their targets: ``(indices int64[n], targets float32[n, n_labels])``.

    Clip ``i`` covers ``[i, i+1)`` s. A label applies to a clip when its spans cover at least
    0.5 s of it; a clip covered at least 0.5 s by any span (``none`` included) is labelled:
    negative for every label that does not apply. A clip covered only by ``not:<label>`` spans
    is negative for those labels and unknown (NaN) for the others, which the loss and the
    metrics skip. Clips in no annotated span are left out, or are all-negative when
    ``unlabelled="negative"``.
    """
    if unlabelled not in UNLABELLED_CHOICES:
        raise UsageError(f"unlabelled must be one of {UNLABELLED_CHOICES}, not {unlabelled!r}")
    n = len(labels)
    names = labels + [NEGATIVE] + [NOT_PREFIX + label for label in labels]
    cover_s = np.zeros((n_clips, len(names)), np.float64)
    for span in spans:
        if span.label not in names:
            continue
        j = names.index(span.label)
        first, last = int(math.floor(span.start_s)), min(n_clips, int(math.ceil(span.end_s)))
        for i in range(max(first, 0), last):
            cover_s[i, j] += max(0.0, min(span.end_s, i + 1) - max(span.start_s, i))
    hit = cover_s >= MIN_COVER_S - _EPS
    whole = hit[:, :n + 1].any(axis=1) | (unlabelled == "negative")  # every label known
    known = whole[:, None] | hit[:, n + 1:] | hit[:, :n]
    labelled = known.any(axis=1)
    targets = np.where(known, hit[:, :n], np.nan).astype(np.float32)
    indices = np.flatnonzero(labelled)
    return indices.astype(np.int64), targets[indices]


def annotated_seconds(spans: list[Span], n_clips: int) -> np.ndarray:
    """bool[n_clips]: clips covered at least 0.5 s by any annotated span."""
    idx, _ = clip_targets(spans, span_labels(spans), n_clips, "ignore")
    mask = np.zeros(n_clips, bool)
    mask[idx] = True
    return mask


# ---------------------------------------------------------------- film-level split


def split_films(annotations: Annotations, seed: int = 0,
                fractions: tuple[float, float, float] = SPLIT_FRACTIONS) -> dict[str, list[str]]:
    """``{"train": [...], "val": [...], "test": [...]}`` of film URIs; no film is in two splits.

    Films with a ``split`` column value keep it; the others are shuffled with ``seed`` and cut
    80/10/10 (at least one film each in val and test when three or more are unassigned).
    """
    splits: dict[str, list[str]] = {name: [] for name in SPLITS}
    free = []
    for uri in annotations.films:
        given = annotations.split_of(uri)
        (splits[given] if given else free).append(uri)
    free = sorted(free)
    order = np.random.default_rng(seed).permutation(len(free))
    free = [free[i] for i in order]
    n = len(free)
    n_val = max(1, round(n * fractions[1])) if n >= 3 else 0
    n_test = max(1, round(n * fractions[2])) if n >= 3 else 0
    splits["val"] += free[:n_val]
    splits["test"] += free[n_val:n_val + n_test]
    splits["train"] += free[n_val + n_test:]
    return splits
