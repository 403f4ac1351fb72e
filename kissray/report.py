"""One static, self-contained HTML page about a score output: ``kissray report``.

The page has inline CSS, inline SVG timelines and a few lines of inline JavaScript; it loads
nothing from the network. Parts: a library summary (titles by status, seconds scored, labelled
time per label); on the first screen, the timelines of the titles with the most labelled time;
the counts of ``kissray review``'s answers per label (reviewed, right, wrong, missed, precision),
when there are any; a sortable, filterable, paged index of titles (100 a page, so 1,000 titles
stay quick), most labelled first; one ``<details>`` per title, open (collapsing is the reader's
choice), with its timeline (probability over time, segments shaded, unscored time greyed) and its
segments, with thumbnails, links to the excerpts that ``kissray excerpts`` wrote and each
segment's review answer; and the failed and partial titles with their reasons.
Thumbnails and excerpts are linked relative to the page (keep the page next to OUT), or, with
``embed_thumbnails``, the thumbnails are inlined as data URIs so the page travels alone.
Without JavaScript every title is listed, open.
"""

from __future__ import annotations

import base64
import datetime as dt
import html
import os
import posixpath
from dataclasses import dataclass
from urllib.parse import quote

import numpy as np
import pandas as pd

from kissray import provenance
from kissray.excerpts import excerpt_stem
from kissray.names import file_name_for
from kissray.outputs import EXCERPTS_DIR, STATUSES, ScoreOutputs, read_outputs
from kissray.annotations import ReviewFiles
from kissray.review.store import REVIEWS_DIR, review_counts, segment_answers
from kissray.uris import is_local_fs, join_uri, write_text

PAGE_SIZE = 100  # titles per page of the index
TOP_TITLES = 5  # timelines on the first screen: the titles with the most labelled time
TIMELINE_WIDTH, TIMELINE_HEIGHT = 800, 120  # SVG user units
MAX_POINTS = 600  # timeline points per label; longer films are max-pooled so peaks survive
LABEL_COLOURS = ("#d6336c", "#1c7ed6", "#37b24d", "#f59f00", "#7048e8", "#0ca678", "#e8590c", "#495057")
TICK_STEPS_S = (1, 2, 5, 10, 30, 60, 120, 300, 600, 900, 1800, 3600)
TICK_LABEL_WIDTH = 40  # SVG units: a time label this close to the right edge is right-aligned


@dataclass(frozen=True)
class Media:
    """Where the report finds excerpts: their folder and the files in it (relative names)."""

    folder: str  # excerpts folder (local path or fsspec URI)
    href_base: str  # the folder as written in links: relative to the page when it can be (same disk or bucket)
    files: frozenset[str]  # "<title folder>/<name>" of every file present
    embed_thumbnails: bool = False

    def find(self, title_id: str, stem: str, ext: str, label: str = "") -> str | None:
        """The file of an excerpt: ``<title>/<stem>.<ext>``, or ``<label>/<title>/...`` (``--by-label``)."""
        name = f"{file_name_for(title_id)}/{stem}.{ext}"
        by_label = f"{file_name_for(label)}/{name}"
        return name if name in self.files else by_label if label and by_label in self.files else None

    def href(self, name: str) -> str:
        name = quote(name)  # file names keep their %XX escapes: the link must not decode them
        return f"{self.href_base}/{name}" if self.href_base else name

    def thumbnail_src(self, name: str) -> str:
        if not self.embed_thumbnails:
            return self.href(name)
        import fsspec

        with fsspec.open(join_uri(self.folder, name), "rb") as f:
            return "data:image/jpeg;base64," + base64.b64encode(f.read()).decode("ascii")


def find_media(excerpts_dir: str, report_uri: str, embed_thumbnails: bool = False) -> Media:
    """Index the excerpts folder once (it may not exist: then the page has no media)."""
    import fsspec

    fs, root = fsspec.core.url_to_fs(excerpts_dir)
    files = frozenset()
    if fs.isdir(root):
        prefix = root.rstrip("/") + "/"
        files = frozenset(p[len(prefix):] for p in fs.find(root) if p.startswith(prefix))
    href_base = _relative_href(fs, root, report_uri) or str(excerpts_dir).rstrip("/")
    return Media(str(excerpts_dir), "" if href_base == "." else href_base, files, embed_thumbnails)


def _relative_href(fs, root: str, report_uri: str) -> str | None:
    """The excerpts folder ``root`` relative to the page, when a browser can follow that link:
    both on this machine, or both in one bucket (the page served from it, or both downloaded).
    None otherwise (then links are absolute URIs)."""
    import fsspec

    report_fs, report_path = fsspec.core.url_to_fs(report_uri)
    if is_local_fs(fs) and is_local_fs(report_fs):
        return os.path.relpath(root, os.path.dirname(os.path.abspath(report_path))).replace(os.sep, "/")
    root, page_dir = root.strip("/"), posixpath.dirname(report_path.strip("/"))
    if type(fs) is not type(report_fs) or root.split("/")[0] != page_dir.split("/")[0]:
        return None
    return posixpath.relpath(root, page_dir)


def write_report(scores_dir: str, out: str | None = None, *, excerpts_dir: str | None = None,
                 embed_thumbnails: bool = False) -> str:
    """Write the HTML report of ``scores_dir`` to ``out`` (default ``scores_dir/report.html``); return ``out``."""
    outputs = read_outputs(scores_dir, with_scores=True)
    out = out or join_uri(outputs.out_dir, "report.html")
    media = find_media(excerpts_dir or join_uri(outputs.out_dir, EXCERPTS_DIR), out, embed_thumbnails)
    reviews = ReviewFiles(join_uri(outputs.out_dir, REVIEWS_DIR)).rows()
    write_text(out, render_report(outputs, media, reviews))
    return out


def render_report(outputs: ScoreOutputs, media: Media, reviews: list[dict] = ()) -> str:
    """The whole page as one string; ``reviews``: the answers of ``kissray review`` (their rows)."""
    labels = outputs.labels
    colours = {label: LABEL_COLOURS[i % len(LABEL_COLOURS)] for i, label in enumerate(labels)}
    probs = probs_by_title(outputs.scores)
    segments = dict(tuple(outputs.segments.groupby("title_id", sort=False)))
    titles = by_labelled_time(outputs.titles.to_dict("records"), segments)
    answers = segment_answers(list(reviews))
    sections = [_title_section(t, probs.get(t["title_id"], {}), segments.get(t["title_id"]), colours, media, answers)
                for t in titles]
    body = "\n".join([
        _header(outputs), _most_labelled(titles[:TOP_TITLES], probs, segments, colours),
        _summary(outputs, labels), _review_summary(list(reviews), labels),
        _index(titles, segments, labels),
        f'<section id="titles"><h2>Titles</h2>{"".join(sections)}</section>',
        _failures(titles),
    ])
    return PAGE.format(style=STYLE, script=_SCRIPT.replace("PAGE_SIZE", str(PAGE_SIZE)), body=body,
                        title=html.escape(f"kissray report: {outputs.out_dir}"))


def by_labelled_time(titles: list[dict], segments: dict[str, pd.DataFrame]) -> list[dict]:
    """The titles with the most labelled seconds first (then by title id): what a reader opens on."""
    seconds = {title_id: int(segs["n_seconds"].sum()) for title_id, segs in segments.items()}
    return sorted(titles, key=lambda t: (-seconds.get(t["title_id"], 0), str(t["title_id"])))


def probs_by_title(scores: pd.DataFrame | None) -> dict[str, dict[str, np.ndarray]]:
    """{title_id: {label: float32[n_scored]}} (second i at index i)."""
    found: dict[str, dict[str, np.ndarray]] = {}
    if scores is None or scores.empty:
        return found
    for (title_id, label), frame in scores.groupby(["title_id", "label"], sort=False):
        n = int(frame["second"].max()) + 1
        p = np.zeros(n, np.float32)
        p[frame["second"].to_numpy()] = frame["p"].to_numpy()
        found.setdefault(title_id, {})[label] = p
    return found


def _esc(value) -> str:
    return html.escape(str(value), quote=True)


def duration_text(t_s: float) -> str:
    """``1:02:03`` / ``2:03`` for a number of seconds."""
    t = int(round(float(t_s)))
    return f"{t // 3600}:{t // 60 % 60:02d}:{t % 60:02d}" if t >= 3600 else f"{t // 60}:{t % 60:02d}"


def _header(outputs: ScoreOutputs) -> str:
    now = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    models = sorted({str(m) for m in outputs.titles["model"].dropna()})
    return (f"<header><h1>kissray report</h1><p>Scores: <code>{_esc(outputs.out_dir)}</code> · "
            f"model: {_esc(', '.join(models) or 'unknown')} · generated {now}</p>"
            f"{''.join(model_provenance(m) for m in models)}</header>")


def model_provenance(model_uri: str) -> str:
    """What the checkpoint's head was trained on, or a warning that its scores are placeholders (SPEC 4)."""
    record = provenance.read_provenance(model_uri)
    if provenance.state(record) == "trained":
        return f'<p class="provenance">Model <code>{_esc(model_uri)}</code>: {_esc(provenance.describe(record))}</p>'
    return (f'<p class="warning" role="alert"><b>Warning</b>: model <code>{_esc(model_uri)}</code>: '
            f'{_esc(provenance.warning(record))}.</p>')


def library_summary(outputs: ScoreOutputs) -> dict:
    """Counts behind the summary: titles by status, seconds scored, labelled seconds per label."""
    titles, segments = outputs.titles, outputs.segments
    by_label = segments.groupby("label")["n_seconds"].agg(["count", "sum"])
    return {"titles": len(titles),
            "by_status": {s: int((titles["status"] == s).sum()) for s in STATUSES},
            "seconds_scored": int(titles["n_scored"].fillna(0).sum()),
            "duration_s": float(titles["duration_s"].fillna(0).sum()),
            "labelled_s": {label: int(row["sum"]) for label, row in by_label.iterrows()},
            "segments": {label: int(row["count"]) for label, row in by_label.iterrows()}}


def _summary(outputs: ScoreOutputs, labels: list[str]) -> str:
    s = library_summary(outputs)
    cards = [("titles", s["titles"])] + [(status, n) for status, n in s["by_status"].items()] + [
        ("seconds scored", f'{s["seconds_scored"]:,}'), ("film time", duration_text(s["duration_s"]))]
    card_html = "".join(f'<div class="card {_esc(k)}"><b>{_esc(v)}</b><span>{_esc(k)}</span></div>' for k, v in cards)
    rows = "".join(
        f'<tr><td>{_esc(label)}</td><td>{s["segments"].get(label, 0)}</td>'
        f'<td>{duration_text(s["labelled_s"].get(label, 0))}</td>'
        f'<td>{100 * s["labelled_s"].get(label, 0) / max(1, s["seconds_scored"]):.2f}%</td></tr>'
        for label in labels)
    table = ("<table><thead><tr><th>label</th><th>segments</th><th>labelled time</th><th>of scored time</th>"
             f"</tr></thead><tbody>{rows}</tbody></table>") if labels else "<p>No labels scored yet.</p>"
    return f'<section id="summary"><h2>Library</h2><div class="cards">{card_html}</div>{table}</section>'


def _index(titles: list[dict], segments: dict[str, pd.DataFrame], labels: list[str]) -> str:
    head = "".join(f'<th data-type="num">{_esc(label)} s</th>' for label in labels)
    rows = []
    for t in titles:
        segs = segments.get(t["title_id"])
        seconds = segs.groupby("label")["n_seconds"].sum() if segs is not None else pd.Series(dtype=int)
        cells = "".join(f"<td>{int(seconds.get(label, 0))}</td>" for label in labels)
        rows.append(f'<tr data-title="{_esc(t["title_id"])}" data-status="{_esc(t["status"])}">'
                    f'<td><a href="#t-{_esc(file_name_for(t["title_id"]))}">{_esc(t["title_id"])}</a></td>'
                    f'<td class="status {_esc(t["status"])}">{_esc(t["status"])}</td>'
                    f'<td data-v="{table_number(t["duration_s"]):.3f}">{_duration_or_dash(t["duration_s"])}</td>'
                    f'<td>{int(table_number(t["n_scored"]))}</td><td>{0 if segs is None else len(segs)}</td>{cells}</tr>')
    statuses = "".join(f'<option value="{s}">{s}</option>' for s in STATUSES)
    controls = ('<div class="controls"><input id="filter" type="search" placeholder="filter titles">'
                f'<select id="status"><option value="">all statuses</option>{statuses}</select>'
                '<button id="prev" type="button">‹ prev</button><span id="page"></span>'
                '<button id="next" type="button">next ›</button>'
                '<button id="expand" type="button">expand page</button>'
                '<button id="collapse" type="button">collapse all</button></div>')
    return (f'<section id="index"><h2>Index</h2>{controls}<table id="index-table"><thead><tr>'
            '<th>title</th><th>status</th><th data-type="num">duration</th><th data-type="num">seconds scored</th>'
            f'<th data-type="num">segments</th>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table></section>')


def table_number(value) -> float:
    """A table value as float, 0 for null / NaN (failed titles have no duration)."""
    return 0.0 if value is None or pd.isna(value) else float(value)


def _duration_or_dash(value) -> str:
    return "—" if value is None or pd.isna(value) else duration_text(float(value))


def _most_labelled(titles: list[dict], probs: dict, segments: dict[str, pd.DataFrame], colours: dict) -> str:
    """The first screen: the timelines of the titles with the most labelled time."""
    rows = []
    for t in titles:
        segs, p = segments.get(t["title_id"]), probs.get(t["title_id"])
        if not p:
            continue
        labelled = 0 if segs is None else int(segs["n_seconds"].sum())
        rows.append(f'<div class="top-title"><a href="#t-{_esc(file_name_for(t["title_id"]))}">{_esc(t["title_id"])}'
                    f'</a> <span>{duration_text(labelled)} labelled</span>'
                    f'{timeline_svg(p, segs, table_number(t["duration_s"]), int(table_number(t["n_scored"])), colours)}</div>')
    if not rows:
        return ""
    return f'<section id="most-labelled"><h2>Most labelled</h2>{"".join(rows)}</section>'


def _review_summary(reviews: list[dict], labels: list[str]) -> str:
    """Per label: segments reviewed, right, wrong, missed and the precision implied."""
    if not reviews:
        return ""
    counts = review_counts(reviews, labels)
    rows = "".join(f'<tr><td>{_esc(label)}</td><td>{c["reviewed"]}</td><td>{c["right"]}</td><td>{c["edges"]}</td>'
                   f'<td>{c["wrong"]}</td><td>{c["missed"]}</td>'
                   f'<td>{precision_text(c["precision"])}</td></tr>'
                   for label, c in counts.items())
    return ('<section id="reviews"><h2>Reviews</h2><table><thead><tr><th>label</th><th>reviewed</th><th>right</th>'
            '<th>of which edges</th><th>wrong</th><th>missed</th><th>precision</th></tr></thead>'
            f'<tbody>{rows}</tbody></table></section>')


def precision_text(precision: float | None) -> str:
    return "—" if precision is None else f"{100 * precision:.0f}%"


def _title_section(title: dict, probs: dict[str, np.ndarray], segs: pd.DataFrame | None,
                   colours: dict[str, str], media: Media, answers: dict) -> str:
    title_id, status = str(title["title_id"]), str(title["status"])
    n_segments = 0 if segs is None else len(segs)
    summary = (f'<summary><b>{_esc(title_id)}</b> <span class="status {_esc(status)}">{_esc(status)}</span> '
               f'{_duration_or_dash(title["duration_s"])} · {n_segments} segment{"s" * (n_segments != 1)}'
               '</summary>')
    parts = [f'<p class="uri"><code>{_esc(title["uri"])}</code></p>']
    if status != "ok" and title.get("error"):
        parts.append(f'<p class="error">{_esc(title["error"])}</p>')
    if probs:
        parts.append(timeline_svg(probs, segs, table_number(title["duration_s"]), int(table_number(title["n_scored"])), colours))
    if segs is not None and len(segs):
        parts.append(_segment_table(title_id, segs, media, answers))
    return (f'<details class="title" open id="t-{_esc(file_name_for(title_id))}" data-title="{_esc(title_id)}" '
            f'data-status="{_esc(status)}">{summary}{"".join(parts)}</details>')


def _segment_table(title_id: str, segs: pd.DataFrame, media: Media, answers: dict) -> str:
    rows = []
    for seg in segs.itertuples(index=False):
        stem = excerpt_stem(seg.label, seg.segment, seg.start_s, seg.end_s)
        thumb, clip = media.find(title_id, stem, "jpg", seg.label), media.find(title_id, stem, "mp4", seg.label)
        answer = answers.get((title_id, seg.label, float(seg.start_s), float(seg.end_s)))
        image = (f'<img src="{_esc(media.thumbnail_src(thumb))}" alt="{_esc(stem)}" loading="lazy">'
                 if thumb else "")
        link = f'<a href="{_esc(media.href(clip))}">{_esc(stem)}.mp4</a>' if clip else "—"
        rows.append(f"<tr><td>{_esc(seg.label)}</td><td>{int(seg.segment)}</td>"
                    f"<td>{duration_text(seg.start_s)}</td><td>{duration_text(seg.end_s)}</td>"
                    f"<td>{int(seg.n_seconds)} s</td><td>{float(seg.mean_p):.3f}</td>"
                    f'<td class="thumb">{image}</td><td>{link}</td><td>{_answer_text(answer)}</td></tr>')
    return ('<table class="segments"><thead><tr><th>label</th><th>#</th><th>start</th><th>end</th><th>length</th>'
            f'<th>mean p</th><th>thumbnail</th><th>excerpt</th><th>review</th></tr></thead>'
            f'<tbody>{"".join(rows)}</tbody></table>')


def _answer_text(answer: dict | None) -> str:
    if answer is None:
        return "—"
    edges = f' {answer["start_s"]}–{answer["end_s"]} s' if answer["answer"] == "edges" else ""
    return (f'<span class="review {_esc(answer["answer"])}">{_esc(answer["answer"].capitalize())}{_esc(edges)}</span> '
            f'<small>{_esc(answer["reviewer"])}</small>')


def _steps(p: np.ndarray, max_points: int) -> tuple[np.ndarray, np.ndarray]:
    """(x seconds, y) of a step line: second i holds p[i] over [i, i+1), so even a one-second film
    draws a line. Longer films are bucketed to ``max_points`` steps of the bucket maxima, so short
    peaks stay visible."""
    edges = np.arange(len(p) + 1) if len(p) <= max_points else np.linspace(0, len(p), max_points + 1).astype(int)
    values = p if len(p) <= max_points else np.maximum.reduceat(p, edges[:-1])
    return np.repeat(edges, 2)[1:-1], np.repeat(values, 2)


def timeline_svg(probs: dict[str, np.ndarray], segs: pd.DataFrame | None, duration_s: float, n_scored: int,
                 colours: dict[str, str]) -> str:
    """Inline SVG: each label's probability per second, its segments shaded, unscored time greyed."""
    span_s = max(duration_s, n_scored, 1.0)
    w, h, top, bottom = TIMELINE_WIDTH, TIMELINE_HEIGHT, 6, 18
    x = lambda t: f"{t * w / span_s:.1f}"  # noqa: E731 - seconds -> SVG x
    y = lambda p: f"{top + (1 - p) * (h - top - bottom):.1f}"  # noqa: E731 - probability -> SVG y
    parts = [f'<rect class="frame" x="0" y="{top}" width="{w}" height="{h - top - bottom}"/>']
    if n_scored < duration_s - 0.5:
        parts.append(f'<rect class="unscored" x="{x(n_scored)}" y="{top}" width="{float(x(span_s)) - float(x(n_scored)):.1f}" '
                     f'height="{h - top - bottom}"><title>not scored</title></rect>')
    for seg in ([] if segs is None else segs.itertuples(index=False)):
        parts.append(f'<rect x="{x(seg.start_s)}" y="{top}" width="{max(float(x(seg.end_s)) - float(x(seg.start_s)), 1):.1f}" '
                     f'height="{h - top - bottom}" fill="{colours[seg.label]}" fill-opacity="0.22">'
                     f'<title>{_esc(seg.label)} {duration_text(seg.start_s)}–{duration_text(seg.end_s)} '
                     f'mean p {float(seg.mean_p):.2f}</title></rect>')
    parts.append(f'<line class="half" x1="0" x2="{w}" y1="{y(0.5)}" y2="{y(0.5)}"/>')
    for label, p in probs.items():
        xs, ys = _steps(np.asarray(p, np.float32), MAX_POINTS)
        points = " ".join(f"{x(a)},{y(b)}" for a, b in zip(xs, ys))
        parts.append(f'<polyline fill="none" stroke="{colours[label]}" stroke-width="1.2" points="{points}">'
                     f"<title>{_esc(label)}</title></polyline>")
    parts += _ticks(span_s, x, h) + _probability_scale(y)
    return (f'<svg class="timeline" viewBox="0 0 {w} {h}" preserveAspectRatio="none" role="img" '
            f'aria-label="probability over time">{"".join(parts)}</svg>')


def _ticks(span_s: float, x, h: int) -> list[str]:
    """Time labels under the plot; the first starts at its tick, the one at the right edge ends
    there (so no label is cut off by the edge), the others are centred."""
    step = next((s for s in TICK_STEPS_S if span_s / s <= 10), TICK_STEPS_S[-1] * int(np.ceil(span_s / 36000)))
    ticks = []
    for t in range(0, int(span_s) + 1, step):
        anchor = "start" if t == 0 else "end" if float(x(t)) > TIMELINE_WIDTH - TICK_LABEL_WIDTH else "middle"
        ticks.append(f'<text x="{x(t)}" y="{h - 4}" text-anchor="{anchor}">{duration_text(t)}</text>')
    return ticks


def _probability_scale(y) -> list[str]:
    """The probability axis: 0, 0.5 (the dashed line) and 1, at the left edge inside the plot."""
    return [f'<text class="scale" x="3" y="{float(y(p)) + dy:.1f}">{p:g}</text>' for p, dy in ((1, 9), (0.5, -2), (0, -2))]


def _failures(titles: list[dict]) -> str:
    bad = [t for t in titles if t["status"] != "ok"]
    if not bad:
        return '<section id="failures"><h2>Failed and partial titles</h2><p>None.</p></section>'
    rows = "".join(f'<tr><td><a href="#t-{_esc(file_name_for(t["title_id"]))}">{_esc(t["title_id"])}</a></td>'
                   f'<td class="status {_esc(t["status"])}">{_esc(t["status"])}</td>'
                   f'<td><code>{_esc(t["uri"])}</code></td><td>{_esc(t["error"] or "")}</td></tr>' for t in bad)
    return ('<section id="failures"><h2>Failed and partial titles</h2><table><thead><tr><th>title</th><th>status</th>'
            f'<th>uri</th><th>reason</th></tr></thead><tbody>{rows}</tbody></table></section>')


PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<link rel="icon" href="data:,">
<title>{title}</title>
<style>{style}</style></head>
<body>
{body}
<script>{script}</script>
</body></html>
"""

STYLE = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 0 auto; max-width: 1100px; padding: 0 16px 48px; color: #222; }
h1 { margin-bottom: 0; } h2 { margin-top: 32px; border-bottom: 1px solid #ddd; }
code { font-size: 12px; color: #555; word-break: break-all; }
table { border-collapse: collapse; width: 100%; margin: 8px 0; }
th, td { text-align: left; padding: 3px 8px; border-bottom: 1px solid #eee; vertical-align: middle; }
#index-table th { cursor: pointer; user-select: none; background: #f6f6f6; }
.cards { display: flex; flex-wrap: wrap; gap: 8px; }
.card { border: 1px solid #ddd; border-radius: 6px; padding: 8px 14px; min-width: 90px; }
.card b { display: block; font-size: 20px; } .card span { color: #666; }
.status.ok { color: #2b8a3e; } .status.partial { color: #e67700; } .status.failed { color: #c92a2a; }
.controls { display: flex; gap: 8px; align-items: center; flex-wrap: wrap; }
details.title { border: 1px solid #e3e3e3; border-radius: 6px; margin: 6px 0; padding: 4px 10px; }
details.title > summary { cursor: pointer; padding: 4px 0; }
.error { color: #c92a2a; }
.warning { background: #fff4e6; border: 1px solid #e67700; border-radius: 6px; padding: 8px 12px; }
svg.timeline { width: 100%; height: 120px; display: block; }
#most-labelled svg.timeline { height: 56px; } .top-title span { color: #666; font-size: 12px; }
.review.right, .review.edges { color: #2b8a3e; } .review.wrong { color: #c92a2a; }
svg.timeline .frame { fill: #fafafa; stroke: #ccc; } svg.timeline .unscored { fill: #ddd; }
svg.timeline .half { stroke: #aaa; stroke-dasharray: 4 4; } svg.timeline text { font-size: 10px; fill: #666; }
td.thumb img { max-height: 72px; max-width: 128px; display: block; }
[hidden] { display: none !important; }
"""

_SCRIPT = """
(function () {
  const table = document.getElementById('index-table'), list = document.getElementById('titles');
  const tbody = table.tBodies[0], rows = Array.from(tbody.rows);
  const sections = new Map(Array.from(document.querySelectorAll('details.title')).map(d => [d.dataset.title, d]));
  const filter = document.getElementById('filter'), status = document.getElementById('status');
  let order = rows.slice(), page = 0, sortCol = -1, sortDir = 1;
  const visible = () => {
    const q = filter.value.toLowerCase(), s = status.value;
    return order.filter(r => (!q || r.dataset.title.toLowerCase().includes(q)) && (!s || r.dataset.status === s));
  };
  function render() {
    const shown = visible(), pages = Math.max(1, Math.ceil(shown.length / PAGE_SIZE));
    page = Math.max(0, Math.min(page, pages - 1));
    const onPage = new Set(shown.slice(page * PAGE_SIZE, (page + 1) * PAGE_SIZE));
    for (const r of order) {
      r.hidden = !onPage.has(r); tbody.appendChild(r);
      const d = sections.get(r.dataset.title);
      if (d) { d.hidden = r.hidden; list.appendChild(d); }
    }
    document.getElementById('page').textContent = `page ${page + 1} of ${pages} · ${shown.length} titles`;
  }
  Array.from(table.tHead.rows[0].cells).forEach((th, i) => th.addEventListener('click', () => {
    sortDir = sortCol === i ? -sortDir : 1; sortCol = i;
    const num = th.dataset.type === 'num';
    const key = r => { const c = r.cells[i], v = c.dataset.v ?? c.textContent; return num ? parseFloat(v) : v.toLowerCase(); };
    order.sort((a, b) => { const x = key(a), y = key(b); return (x < y ? -1 : x > y ? 1 : 0) * sortDir; });
    page = 0; render();
  }));
  filter.addEventListener('input', () => { page = 0; render(); });
  status.addEventListener('change', () => { page = 0; render(); });
  document.getElementById('prev').addEventListener('click', () => { page -= 1; render(); });
  document.getElementById('next').addEventListener('click', () => { page += 1; render(); });
  document.getElementById('expand').addEventListener('click', () =>
    sections.forEach(d => { if (!d.hidden) d.open = true; }));
  document.getElementById('collapse').addEventListener('click', () => sections.forEach(d => { d.open = false; }));
  function showHash() {
    const d = document.getElementById(decodeURIComponent(location.hash.slice(1)));
    if (!d || !d.matches('details.title')) return;
    const at = () => visible().findIndex(r => r.dataset.title === d.dataset.title);
    if (at() < 0) { filter.value = ''; status.value = ''; }
    page = Math.floor(at() / PAGE_SIZE);
    render(); d.open = true; d.scrollIntoView();
  }
  window.addEventListener('hashchange', showHash);
  render(); if (location.hash) showHash();
})();
"""
