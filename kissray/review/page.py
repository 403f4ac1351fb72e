"""The review page of ``kissray review``: every segment with a player and three answers.

Titles come in the report's order (most labelled time first), each with its timeline drawn. Each
segment has a player -- its excerpt when ``kissray excerpts`` cut one, else the film from the
segment's start (served by the review server with range requests), else its thumbnail -- and the
answers Right, Wrong and Edges (new start and end, nudged by keys or typed). A drag on a title's
timeline (or the form under it) marks a span the detector missed. Keyboard first: j/k move,
p plays, 1/2/3 answer and move on. Answers go to the server at once; the page shows the latest answer of
every segment (its own and other editors') and the counts per label.
"""

from __future__ import annotations

import html
import json
from dataclasses import dataclass
from urllib.parse import quote

import pandas as pd

from kissray.excerpts import excerpt_stem
from kissray.names import file_name_for
from kissray.outputs import ScoreOutputs
from kissray.report import (PAGE, STYLE, Media, by_labelled_time, duration_text, model_provenance, probs_by_title,
                            table_number, timeline_svg)

NUDGE_S = 1.0  # seconds an edge moves per key press


@dataclass(frozen=True)
class Players:
    """What the page may play or show: the excerpt files and the titles whose film the server streams."""

    media: Media  # the excerpt folder's files
    films: frozenset[str]  # title ids

    def for_segment(self, title_id: str, label: str, stem: str, start_s: float, end_s: float) -> str:
        thumb, clip = self.media.find(title_id, stem, "jpg", label), self.media.find(title_id, stem, "mp4", label)
        poster = f' poster="/excerpts/{_attr(quote(thumb))}"' if thumb else ""
        if clip:
            return f'<video controls preload="none"{poster} src="/excerpts/{_attr(quote(clip))}"></video>'
        if title_id in self.films:
            return (f'<video controls preload="none"{poster} '
                    f'src="/films/{_attr(quote(file_name_for(title_id)))}#t={start_s:g},{end_s:g}"></video>')
        if thumb:
            return f'<img src="/excerpts/{_attr(quote(thumb))}" alt="{_attr(stem)}" loading="lazy">'
        return '<p class="nomedia">no excerpt, film out of reach</p>'


def _attr(value) -> str:
    return html.escape(str(value), quote=True)


def render_page(outputs: ScoreOutputs, players: Players, reviewer: str = "") -> str:
    """The whole review page as one string (answers are fetched by the page itself)."""
    labels = outputs.labels
    colours = {label: f"var(--c{i % 8})" for i, label in enumerate(labels)}
    probs = probs_by_title(outputs.scores)
    segments = dict(tuple(outputs.segments.groupby("title_id", sort=False)))
    titles = [t for t in by_labelled_time(outputs.titles.to_dict("records"), segments) if t["status"] != "failed"]
    sections = "".join(_title(t, probs.get(t["title_id"], {}), segments.get(t["title_id"]), labels, colours, players)
                       for t in titles)
    head = (f'<header><h1>kissray review</h1><p>Scores: <code>{_attr(outputs.out_dir)}</code> · '
            f'reviewer <input id="reviewer" value="{_attr(reviewer)}" placeholder="your name" size="14"></p>'
            f'<p id="status" role="status">loading answers…</p>{_provenance(outputs)}</header>')
    counts = ('<section id="counts"><table><thead><tr><th>label</th><th>reviewed</th><th>right</th>'
              '<th>of which edges</th><th>wrong</th><th>missed</th><th>precision</th></tr></thead><tbody>'
              + "".join(f'<tr data-label="{_attr(label)}"><td>{_attr(label)}</td>' + "<td>0</td>" * 5 + "<td>—</td></tr>"
                        for label in labels) + "</tbody></table></section>")
    config = json.dumps({"nudge": NUDGE_S, "labels": labels})
    return PAGE.format(style=STYLE + _STYLE, body=head + counts + _KEYS + f'<main id="titles">{sections}</main>',
                       script=f"const REVIEW = {config};\n{_SCRIPT}", title=_attr(f"kissray review: {outputs.out_dir}"))


def _provenance(outputs: ScoreOutputs) -> str:
    """What the scores' checkpoint was trained on, or that its scores are placeholders (SPEC 4)."""
    return "".join(model_provenance(m) for m in sorted({str(m) for m in outputs.titles["model"].dropna()}))


def _title(title: dict, probs: dict, segs: pd.DataFrame | None, labels: list[str], colours: dict,
           players: Players) -> str:
    title_id = str(title["title_id"])
    duration_s, n_scored = table_number(title["duration_s"]), int(table_number(title["n_scored"]))
    span_s = max(duration_s, n_scored, 1.0)  # the timeline's width in seconds, as timeline_svg draws it
    rows = [] if segs is None else list(segs.itertuples(index=False))
    timeline = timeline_svg(probs, segs, duration_s, n_scored, colours) if probs else ""
    first = rows[0].label if rows else None  # the missed span's label starts as the title's first segment's
    options = "".join(f"<option{' selected' * (label == first)}>{_attr(label)}</option>" for label in labels)
    missed = (f'<form class="missed">missed span: <select name="label">{options}</select> '
              f'<input name="start" type="number" min="0" step="0.5" placeholder="start s"> – '
              f'<input name="end" type="number" min="0" step="0.5" placeholder="end s"> '
              f'<button type="submit">Missed <kbd>m</kbd></button></form><ul class="missed-list"></ul>')
    items = "".join(_segment(title_id, seg, players) for seg in rows)
    return (f'<section class="title" id="t-{_attr(file_name_for(title_id))}" data-title="{_attr(title_id)}" '
            f'data-span="{span_s:g}" data-duration="{duration_s:g}"><h2>{_attr(title_id)} '
            f'<small>{duration_text(duration_s)} · {len(rows)} segment{"s" * (len(rows) != 1)}</small></h2>'
            f'<div class="track">{timeline}</div>{missed}<ol class="segments">{items}</ol></section>')


def _segment(title_id: str, seg, players: Players) -> str:
    stem = excerpt_stem(seg.label, seg.segment, seg.start_s, seg.end_s)
    start_s, end_s = float(seg.start_s), float(seg.end_s)
    return (f'<li class="segment" tabindex="-1" data-title="{_attr(title_id)}" data-label="{_attr(seg.label)}" '
            f'data-start="{start_s:g}" data-end="{end_s:g}">'
            f'<div class="player">{players.for_segment(title_id, seg.label, stem, start_s, end_s)}</div>'
            f'<div class="about"><b>{_attr(seg.label)} #{int(seg.segment)}</b> {duration_text(start_s)}–'
            f'{duration_text(end_s)} · {int(seg.n_seconds)} s · mean p {float(seg.mean_p):.2f}'
            f'<p class="answers"><button type="button" data-answer="right">Right <kbd>1</kbd></button>'
            f'<button type="button" data-answer="wrong">Wrong <kbd>2</kbd></button>'
            f'<label>start <input class="edge-start" type="number" min="0" step="0.5" value="{start_s:g}"></label>'
            f'<label>end <input class="edge-end" type="number" min="0" step="0.5" value="{end_s:g}"></label>'
            f'<button type="button" data-answer="edges">Edges <kbd>3</kbd></button></p>'
            f'<p class="state">not reviewed</p></div></li>')


_KEYS = ('<p class="keys"><kbd>j</kbd>/<kbd>k</kbd> next / previous segment · <kbd>p</kbd> play / pause · '
         '<kbd>1</kbd> Right · '
         '<kbd>2</kbd> Wrong · <kbd>3</kbd> Edges · <kbd>[</kbd>/<kbd>]</kbd> start ∓1 s · '
         '<kbd>-</kbd>/<kbd>=</kbd> end ∓1 s · <kbd>m</kbd> mark a missed span (or drag on a timeline) · '
         '<kbd>Enter</kbd> in a box saves it</p>')

_STYLE = """
:root { --c0: #d6336c; --c1: #1c7ed6; --c2: #37b24d; --c3: #f59f00; --c4: #7048e8; --c5: #0ca678;
        --c6: #e8590c; --c7: #495057; }
header p { margin: 4px 0; } #status.error { color: #c92a2a; font-weight: bold; }
.keys { color: #555; font-size: 12px; } kbd { border: 1px solid #bbb; border-radius: 3px; padding: 0 3px;
  font-size: 11px; background: #f6f6f6; }
section.title { border-top: 1px solid #ddd; margin-top: 12px; } section.title h2 { border: 0; margin: 8px 0 4px; }
.track { position: relative; cursor: crosshair; } .track svg.timeline { height: 90px; }
svg.timeline rect.missed { fill: #f59f00; fill-opacity: 0.45; } svg.timeline rect.picking { fill: #000;
  fill-opacity: 0.15; }
ol.segments { list-style: none; padding: 0; margin: 4px 0; }
li.segment { display: flex; gap: 12px; padding: 6px; border: 2px solid transparent; border-radius: 6px; }
li.segment.current { border-color: #1c7ed6; background: #f1f7ff; }
li.segment .player video, li.segment .player img { width: 240px; max-height: 140px; background: #000; }
.answers button { margin-right: 6px; font-size: 14px; padding: 3px 10px; } .answers input { width: 64px; }
li.segment.right .state { color: #2b8a3e; } li.segment.wrong .state { color: #c92a2a; }
li.segment.edges .state { color: #1c7ed6; } .state { margin: 2px 0; font-weight: bold; }
li.segment.right, li.segment.wrong, li.segment.edges { opacity: 0.85; }
.nomedia { color: #888; width: 240px; }
"""

_SCRIPT = r"""
(function () {
  const segs = Array.from(document.querySelectorAll('li.segment'));
  const status = document.getElementById('status'), reviewer = document.getElementById('reviewer');
  let current = -1, pending = 0;
  reviewer.value = reviewer.value || localStorage.getItem('kissray-reviewer') || '';
  reviewer.addEventListener('change', () => localStorage.setItem('kissray-reviewer', reviewer.value));
  const keyOf = (title, label, start, end) => [title, label, Number(start), Number(end)].join('|');
  const byKey = new Map(segs.map(li => [keyOf(li.dataset.title, li.dataset.label, li.dataset.start, li.dataset.end), li]));
  function say(text, bad) { status.textContent = text; status.classList.toggle('error', !!bad); }
  function select(i) {
    if (!segs.length) return;
    current = Math.max(0, Math.min(segs.length - 1, i));
    segs.forEach((li, j) => li.classList.toggle('current', j === current));
    const li = segs[current], video = li.querySelector('video');
    if (video && video.preload === 'none') video.preload = 'metadata';
    li.scrollIntoView({block: 'nearest'});
  }
  function apply(data) {
    for (const row of data.answers) {
      if (row.answer === 'missed') { showMissed(row); continue; }
      const li = byKey.get(keyOf(row.title_id, row.label.replace(/^not:/, ''), row.segment_start_s, row.segment_end_s));
      if (!li) continue;
      li.classList.remove('right', 'wrong', 'edges'); li.classList.add(row.answer);
      const word = {right: 'Right', wrong: 'Wrong', edges: 'Edges'}[row.answer];
      const span = row.answer === 'edges' ? ` ${row.start_s}–${row.end_s} s` : '';
      li.querySelector('.state').textContent = `${word}${span} · ${row.reviewer} · ${row.reviewed_at.slice(0, 19)}Z`;
      if (row.answer === 'edges') {
        li.querySelector('.edge-start').value = row.start_s; li.querySelector('.edge-end').value = row.end_s;
      }
    }
    for (const [label, c] of Object.entries(data.counts)) {
      const tr = document.querySelector(`#counts tr[data-label="${CSS.escape(label)}"]`);
      if (!tr) continue;
      const cells = [c.reviewed, c.right, c.edges, c.wrong, c.missed,
                     c.precision === null ? '—' : (100 * c.precision).toFixed(0) + '%'];
      cells.forEach((v, i) => { tr.cells[i + 1].textContent = v; });
    }
  }
  function showMissed(row) {
    const section = Array.from(document.querySelectorAll('section.title')).find(s => s.dataset.title === row.title_id);
    if (!section) return;
    const key = `${row.label}|${row.start_s}|${row.end_s}`, list = section.querySelector('.missed-list');
    if (list.querySelector(`[data-key="${CSS.escape(key)}"]`)) return;
    const item = document.createElement('li');
    item.dataset.key = key; item.className = 'missed';
    item.textContent = `Missed ${row.label} ${row.start_s}–${row.end_s} s · ${row.reviewer}`;
    list.appendChild(item);
    const svg = section.querySelector('svg.timeline');
    if (svg) svg.appendChild(spanRect(svg, section, Number(row.start_s), Number(row.end_s), 'missed'));
  }
  function spanRect(svg, section, a, b, cls) {
    const w = svg.viewBox.baseVal.width, span = Number(section.dataset.span);
    const r = document.createElementNS('http://www.w3.org/2000/svg', 'rect');
    r.setAttribute('class', cls); r.setAttribute('y', 6); r.setAttribute('height', svg.viewBox.baseVal.height - 24);
    r.setAttribute('x', a * w / span); r.setAttribute('width', Math.max(1, (b - a) * w / span));
    return r;
  }
  async function send(body) {
    pending += 1; say('saving…');
    try {
      const r = await fetch('/api/answers', {method: 'POST', headers: {'Content-Type': 'application/json'},
                                             body: JSON.stringify({...body, reviewer: reviewer.value})});
      const data = await r.json();
      if (!r.ok) throw new Error(data.error || r.statusText);
      apply(data); pending -= 1; say(pending ? 'saving…' : `saved ${data.saved}`);
      return true;
    } catch (e) { pending -= 1; say(`NOT saved: ${e.message}`, true); return false; }
  }
  function answer(li, kind) {
    const start = kind === 'edges' ? Number(li.querySelector('.edge-start').value) : Number(li.dataset.start);
    const end = kind === 'edges' ? Number(li.querySelector('.edge-end').value) : Number(li.dataset.end);
    send({title_id: li.dataset.title, label: li.dataset.label, answer: kind, start_s: start, end_s: end,
          segment_start_s: Number(li.dataset.start), segment_end_s: Number(li.dataset.end)});
    if (segs[current] === li) select(current + 1);
  }
  function nudge(which, by) {
    const li = segs[current]; if (!li) return;
    const input = li.querySelector(which === 'start' ? '.edge-start' : '.edge-end');
    input.value = Math.max(0, Number(input.value) + by);
  }
  function play(li) {
    const video = li && li.querySelector('video');
    if (!video) return;
    if (video.paused) video.play().catch(e => say(`cannot play: ${e.message}`, true)); else video.pause();
  }
  function markMissed(form) {
    const section = form.closest('section.title');
    send({title_id: section.dataset.title, label: form.label.value, answer: 'missed',
          start_s: Number(form.start.value), end_s: Number(form.end.value)});
  }
  segs.forEach((li, i) => {
    li.addEventListener('click', e => { if (!e.target.closest('video, input, button')) select(i); });
    li.querySelectorAll('button[data-answer]').forEach(b => b.addEventListener('click', () => {
      select(i); answer(li, b.dataset.answer); }));
    li.querySelectorAll('input').forEach(inp => inp.addEventListener('focus', () => { if (current !== i) select(i); }));
  });
  document.querySelectorAll('form.missed').forEach(f => f.addEventListener('submit', e => {
    e.preventDefault(); markMissed(f); f.start.blur(); f.end.blur(); }));
  document.querySelectorAll('section.title .track').forEach(track => {
    const section = track.closest('section.title'), svg = track.querySelector('svg'), form = section.querySelector('form.missed');
    if (!svg) return;
    let from = null, rect = null;
    const at = e => { const b = svg.getBoundingClientRect();
      return Math.round(Math.max(0, Math.min(1, (e.clientX - b.left) / b.width)) * Number(section.dataset.span)); };
    track.addEventListener('mousedown', e => { from = at(e); e.preventDefault(); });
    window.addEventListener('mousemove', e => { if (from === null) return;
      const a = Math.min(from, at(e)), b = Math.max(from, at(e));
      if (rect) rect.remove(); rect = spanRect(svg, section, a, Math.max(a + 1, b), 'picking'); svg.appendChild(rect); });
    window.addEventListener('mouseup', e => { if (from === null) return;
      const a = Math.min(from, at(e)), b = Math.max(from, at(e)); from = null;
      form.start.value = a; form.end.value = Math.max(a + 1, b); form.querySelector('button').focus(); });
  });
  document.addEventListener('keydown', e => {
    if (e.ctrlKey || e.metaKey || e.altKey) return;
    const typing = e.target.matches('input, select, textarea');
    if (typing) {
      if (e.key === 'Escape') e.target.blur();
      if (e.key === 'Enter' && e.target.matches('li.segment input')) { e.preventDefault(); e.target.blur();
        answer(e.target.closest('li.segment'), 'edges'); }
      return;
    }
    const li = segs[current];
    const actions = {j: () => select(current + 1), ArrowDown: () => select(current + 1),
      k: () => select(current - 1), ArrowUp: () => select(current - 1),
      1: () => li && answer(li, 'right'), 2: () => li && answer(li, 'wrong'), 3: () => li && answer(li, 'edges'),
      '[': () => nudge('start', -REVIEW.nudge), ']': () => nudge('start', REVIEW.nudge),
      '-': () => nudge('end', -REVIEW.nudge), '=': () => nudge('end', REVIEW.nudge),
      p: () => play(li), ' ': () => play(li),
      m: () => { const s = li ? li.closest('section.title') : document.querySelector('section.title');
                 if (!s) return;
                 const form = s.querySelector('form.missed');
                 if (li) form.label.value = li.dataset.label;
                 form.start.focus(); }};
    if (actions[e.key]) { e.preventDefault(); actions[e.key](); }
  });
  document.querySelectorAll('video').forEach(v => v.addEventListener('error', () => {
    if (!v.poster) return;
    const img = document.createElement('img'); img.src = v.poster; img.alt = 'thumbnail'; v.replaceWith(img); }));
  fetch('/api/reviews').then(r => r.json()).then(data => {
    apply(data); say(`${data.answers.length} answers so far · ${segs.length} segments`);
    const next = segs.findIndex(li => !li.matches('.right, .wrong, .edges'));
    if (segs.length) select(next < 0 ? 0 : next);
    document.body.dataset.ready = '1';
  }).catch(e => say(`cannot read answers: ${e.message}`, true));
})();
"""
