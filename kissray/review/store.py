"""Review answers on disk: ``OUT/reviews/``, one small CSV file per answer.

An answer is an annotation row (``uri, start_s, end_s, label, split``: the ``kissray train``
format) plus who and when (``answer, reviewer, reviewed_at``) and which segment it answers
(``title_id, segment_start_s, segment_end_s``). ``answer`` is one of:

- ``right``: the segment is right; the row is the segment, label ``kiss``.
- ``edges``: right, with other edges; the row is the edited span, label ``kiss``.
- ``wrong``: the segment is wrong; the row is the segment, label ``not:kiss`` (negative for that
  label only; ``none`` would say no label at all is there).
- ``missed``: a span the detector missed; label ``kiss``; no segment columns.

Every answer is a new file (``<UTC time>-<random>.csv``), written at once and whole: a rename on
a local disk, one PUT on an object store. Nothing is ever rewritten, so two editors (or two
servers) never overwrite each other and the history stays. A segment answered more than once
counts by its latest answer (``reviewed_at``, then file name); missed spans are keyed by their
own span. Where a later answer of one polarity overlaps an earlier one of the other polarity for
the same label (a missed span over a wrong segment), the later answer wins those seconds. Those
reading rules belong to the annotations reader (:mod:`kissray.annotations`: ``ReviewFiles``,
``latest``, ``training_rows``), so ``kissray train --annotations OUT/reviews`` applies them too.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import math
import os
import uuid
from dataclasses import asdict, dataclass

from kissray.annotations import COLUMNS, NOT_PREFIX, OPTIONAL_COLUMNS, REVIEW_COLUMNS, base_label, latest, seconds_text
from kissray.uris import is_local_fs, join_uri, make_dirs

REVIEWS_DIR = "reviews"  # inside a score output directory
ANSWERS = ("right", "wrong", "edges", "missed")
POSITIVE_ANSWERS = ("right", "edges", "missed")
FILE_COLUMNS = COLUMNS + OPTIONAL_COLUMNS + REVIEW_COLUMNS
MAX_REVIEWER_CHARS = 80


@dataclass(frozen=True)
class Answer:
    """One editor's answer about a segment (or a missed span) of a title."""

    title_id: str
    uri: str
    label: str  # the detector's label (``kiss``), never ``not:kiss``
    answer: str
    start_s: float  # the span the answer labels: the segment, its new edges, or the missed span
    end_s: float
    segment_start_s: float | None  # the segment answered (None for a missed span)
    segment_end_s: float | None
    reviewer: str
    reviewed_at: str  # ISO 8601 UTC, microseconds

    def row(self) -> dict:
        """The CSV row: an annotation row plus the review columns."""
        row = {k: v for k, v in asdict(self).items() if k in FILE_COLUMNS}
        row["label"] = NOT_PREFIX + self.label if self.answer == "wrong" else self.label
        row["split"] = ""
        for key in ("start_s", "end_s", "segment_start_s", "segment_end_s"):
            row[key] = "" if row[key] is None else seconds_text(row[key])
        return row


def new_answer(title_id: str, uri: str, label: str, answer: str, start_s: float, end_s: float, *,
               segment: tuple[float, float] | None, duration_s: float, reviewer: str) -> Answer:
    """A checked :class:`Answer` stamped now; :class:`ValueError` says what is wrong with it."""
    if answer not in ANSWERS:
        raise ValueError(f"answer must be one of {list(ANSWERS)}, not {answer!r}")
    if (segment is None) != (answer == "missed"):
        raise ValueError("a missed span answers no segment; every other answer answers one")
    if not all(math.isfinite(t) for t in (start_s, end_s)) or not 0 <= start_s < end_s:
        raise ValueError(f"span {start_s}-{end_s} s: need 0 <= start < end")
    if duration_s and end_s > duration_s + 0.5:
        raise ValueError(f"span ends at {end_s:g} s, after the film's end ({duration_s:g} s)")
    reviewer = " ".join(str(reviewer).split())[:MAX_REVIEWER_CHARS] or "anonymous"
    stamp = dt.datetime.now(dt.timezone.utc).isoformat(timespec="microseconds")
    return Answer(title_id, uri, label, answer, float(start_s), float(end_s),
                  None if segment is None else float(segment[0]), None if segment is None else float(segment[1]),
                  reviewer, stamp)


def save_answer(out_dir: str, answer: Answer) -> str:
    """Write ``answer`` as a new file under ``out_dir/reviews/`` (whole or not at all); its name."""
    import fsspec

    stamp = dt.datetime.fromisoformat(answer.reviewed_at).strftime("%Y%m%dT%H%M%S%fZ")
    name = f"{stamp}-{uuid.uuid4().hex[:12]}.csv"
    data = format_rows([answer.row()]).encode("utf-8")
    fs, folder = fsspec.core.url_to_fs(join_uri(out_dir, REVIEWS_DIR))
    make_dirs(fs, folder)
    path = f"{folder.rstrip('/')}/{name}"
    if is_local_fs(fs):  # a rename is atomic: a reader never sees half a file
        part = os.path.join(folder, f".{name}.part")
        with open(part, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(part, path)
    else:  # one PUT: an object appears whole or not at all
        fs.pipe_file(path, data)
    return name


def format_rows(rows: list[dict]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, FILE_COLUMNS, lineterminator="\n", extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


def segment_answers(rows: list[dict]) -> dict[tuple, dict]:
    """The answer that counts per segment: ``(title_id, label, start_s, end_s)`` -> its row."""
    return {(row["title_id"], base_label(row["label"]), float(row["segment_start_s"]), float(row["segment_end_s"])): row
            for row in latest(rows) if row.get("answer") != "missed" and row.get("segment_start_s")}


def review_counts(rows: list[dict], labels: list[str] | None = None) -> dict[str, dict]:
    """Per label, from the answers that count: segments reviewed, right (edges included), edges,
    wrong, missed spans, and the precision they imply (right / reviewed; None before any)."""
    counts: dict[str, dict] = {label: _zero() for label in labels or []}
    for row in latest(rows):
        c = counts.setdefault(base_label(row["label"]), _zero())
        answer = row.get("answer")
        if answer == "missed":
            c["missed"] += 1
            continue
        c["reviewed"] += 1
        c["wrong" if answer == "wrong" else "right"] += 1
        c["edges"] += answer == "edges"
    for c in counts.values():
        c["precision"] = c["right"] / c["reviewed"] if c["reviewed"] else None
    return counts


def _zero() -> dict:
    return {"reviewed": 0, "right": 0, "edges": 0, "wrong": 0, "missed": 0}
