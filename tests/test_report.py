"""kissray report: the page's numbers, and the page itself opened in headless Debian chromium."""

from __future__ import annotations

import json
import re
from pathlib import Path
from urllib.parse import unquote

import numpy as np
import pytest

from conftest import make_film
from kissray.cli import main as cli_main
from kissray.excerpts import ExcerptOptions, write_excerpts
from kissray.outputs import read_outputs
from kissray.report import PAGE_SIZE, _steps, library_summary, write_report
from test_excerpts import Title, probs_with_peak, write_score_out

@pytest.fixture(scope="module")
def library(tmp_path_factory) -> dict:
    """Two scored films with excerpts, one partial title, one failed title, a title id needing escaping."""
    root = tmp_path_factory.mktemp("report")
    a = make_film(root / "a.mp4", duration_s=8)
    b = make_film(root / "b.mp4", duration_s=6, fps="24000/1001")
    two = np.concatenate([probs_with_peak(6, range(1, 4)), probs_with_peak(6, range(3, 6))], axis=1)
    titles = [Title("alpha", a, 8.0, probs_with_peak(8, range(2, 5), peak=3)),
              Title("beta", b, 6.0, two, labels=("kiss", "hug")),
              Title("cut short", a, 8.0, probs_with_peak(5, range(1, 4)), status="partial",
                    error="a.mp4: decoder died (signal 9) at second 5"),
              Title("broken<&>", str(root / "broken.mp4"), None, status="failed",
                    error="broken.mp4: no video stream")]
    out = write_score_out(root / "out", titles)
    summary = write_excerpts(out, options=ExcerptOptions(pad_s=0.5))
    assert not summary.failed
    return {"root": root, "out": out, "titles": [t.title_id for t in titles]}


def test_summary_counts_titles_seconds_and_labelled_time(library):
    s = library_summary(read_outputs(library["out"]))
    assert s["titles"] == 4 and s["by_status"] == {"ok": 2, "partial": 1, "failed": 1}
    assert s["seconds_scored"] == 8 + 6 + 5
    assert s["labelled_s"] == {"kiss": 3 + 3 + 3, "hug": 3} and s["segments"] == {"kiss": 3, "hug": 1}


def test_long_timelines_keep_their_peaks():
    p = np.zeros(10_800, np.float32)
    p[5_001] = 0.9
    xs, ys = _steps(p, 600)
    assert len(xs) == 2 * 600 and ys.max() == pytest.approx(0.9) and abs(xs[ys.argmax()] - 5_001) < 10_800 / 600


def test_every_second_is_a_step_so_a_one_second_film_draws_a_line():
    xs, ys = _steps(np.asarray([0.7], np.float32), 600)
    assert list(xs) == [0, 1] and list(ys) == pytest.approx([0.7, 0.7])
    xs, ys = _steps(np.asarray([0.1, 0.9], np.float32), 600)
    assert list(xs) == [0, 1, 1, 2] and list(ys) == pytest.approx([0.1, 0.1, 0.9, 0.9])


def test_first_screen_says_whether_the_head_was_trained(tmp_path, checkpoint):
    """SPEC 4: `kissray init`'s checkpoint (the fixture's) gets a warning at the top of the page;
    a trained one shows what it learnt from; a checkpoint that cannot be read is said to be unknown."""
    from kissray import provenance

    film = Title("solo", "solo.mp4", 6.0, probs_with_peak(6, range(1, 4)))
    untrained = Path(write_report(write_score_out(tmp_path / "u", [film], model=checkpoint))).read_text()
    header = untrained.split("</header>")[0]
    assert 'class="warning"' in header and "never trained" in header and "placeholders" in header
    trained_ck = tmp_path / "trained"
    trained_ck.mkdir()
    record = provenance.trained({"annotations": "s3://b/kiss.csv", "splits": {"train": ["a", "b"], "test": ["c"]},
                                 "final": {"test": {"kiss": {"ap": 0.91, "f1": 0.88, "precision": 0.9}}}})
    (trained_ck / "config.json").write_text(json.dumps({"labels": ["kiss"], "provenance": record}))
    header = Path(write_report(write_score_out(tmp_path / "t", [film], model=str(trained_ck)))).read_text()
    header = header.split("</header>")[0]
    assert 'class="warning"' not in header
    assert "head trained on s3://b/kiss.csv (3 films: train 2, test 1); test split: kiss AP 0.91 F1 0.88" in header
    gone = Path(write_report(write_score_out(tmp_path / "g", [film], model=str(tmp_path / "nowhere")))).read_text()
    assert 'class="warning"' in gone.split("</header>")[0] and "cannot be read" in gone


def test_page_is_self_contained_and_escapes_titles(library, tmp_path):
    page = Path(write_report(library["out"], str(tmp_path / "r.html"), excerpts_dir=str(Path(library["out"]) / "excerpts"),
                             embed_thumbnails=True)).read_text()
    assert "broken&lt;&amp;&gt;" in page and "broken<&>" not in page
    assert not re.search(r'(src|href)="(https?:)?//', page), "nothing loads from the network"
    assert page.count("data:image/jpeg;base64,") == 4  # alpha, beta x2, cut short
    assert "decoder died (signal 9)" in page and "no video stream" in page


def first_screen_has_a_timeline(driver) -> bool:
    """A timeline is drawn in the first viewport (what a reader sees without scrolling)."""
    return driver.execute_script("""
        window.scrollTo(0, 0);
        return Array.from(document.querySelectorAll('svg.timeline')).some(svg => {
          const r = svg.getBoundingClientRect();
          return r.width > 100 && r.height > 20 && r.top >= 0 && r.bottom <= window.innerHeight; });""")


def _severe_console_messages(driver) -> list[str]:
    return [e["message"] for e in driver.get_log("browser") if e["level"] == "SEVERE"]


def _load_all_images(driver) -> list[dict]:
    """Scroll every image into view, wait for it, and return its src and natural width."""
    driver.execute_script("document.querySelectorAll('img').forEach(i => { i.scrollIntoView(); });")
    driver.execute_async_script("""
        const done = arguments[arguments.length - 1];
        Promise.all(Array.from(document.images).map(i => i.decode().catch(() => null))).then(() => done());""")
    return driver.execute_script(
        "return Array.from(document.images).map(i => ({src: i.src, w: i.naturalWidth, ok: i.complete}));")


def test_report_in_chromium(library, browser, tmp_path):
    assert cli_main(["report", "--scores", library["out"]]) == 0
    report = Path(library["out"]) / "report.html"
    browser.get(report.as_uri())
    assert browser.title.startswith("kissray report")
    assert first_screen_has_a_timeline(browser)  # the most labelled titles, drawn, not collapsed
    ids = browser.execute_script("return Array.from(document.querySelectorAll('details.title')).map(d => d.dataset.title)")
    assert sorted(ids) == sorted(library["titles"])
    rows = browser.execute_script("return Array.from(document.querySelectorAll('#index-table tbody tr'))"
                                  ".filter(r => !r.hidden).map(r => r.dataset.title)")
    assert sorted(rows) == sorted(library["titles"])
    browser.find_element("id", "expand").click()
    images = _load_all_images(browser)
    assert len(images) == 4 and all(i["w"] > 0 for i in images), images
    links = browser.execute_script("return Array.from(document.querySelectorAll('td a')).map(a => a.href)"
                                   ".filter(h => h.endsWith('.mp4'))")
    # a link is a URL: the %XX of a file name (kissray.names.file_name_for) is escaped once more in it
    assert len(links) == 4 and all(Path(unquote(h.removeprefix("file://"))).is_file() for h in links)
    assert browser.execute_script("return document.querySelectorAll('#titles svg.timeline polyline').length") == 4
    failures = browser.find_element("id", "failures").text
    assert "broken<&>" in failures and "no video stream" in failures and "signal 9" in failures
    shot = tmp_path / "report.png"
    assert browser.save_screenshot(str(shot)) and shot.stat().st_size > 10_000
    assert _severe_console_messages(browser) == []


def test_a_thousand_titles_are_paged(tmp_path, browser):
    rng = np.random.default_rng(0)
    titles = [Title(f"t{i:04d}", f"s3://films/t{i:04d}.mp4", 600.0,
                    probs_with_peak(600, range(i % 500, i % 500 + 20)) + 0.2 * rng.random((600, 1), np.float32))
              for i in range(1000)] + [Title("zz-failed", "s3://films/zz.mp4", None, status="failed", error="gone")]
    out = write_score_out(tmp_path / "out", titles, one_file=True)
    report = Path(write_report(out))
    assert report.stat().st_size < 20e6
    browser.get(report.as_uri())
    count = "return Array.from(document.querySelectorAll('details.title')).filter(d => !d.hidden).length"
    assert browser.execute_script("return document.querySelectorAll('details.title').length") == 1001
    assert browser.execute_script(count) == PAGE_SIZE
    assert browser.find_element("id", "page").text.startswith("page 1 of 11")
    for _ in range(10):
        browser.find_element("id", "next").click()
    assert browser.execute_script(count) == 1
    browser.find_element("id", "status").send_keys("failed")
    assert browser.execute_script("return Array.from(document.querySelectorAll('details.title'))"
                                  ".filter(d => !d.hidden).map(d => d.dataset.title)") == ["zz-failed"]
    browser.get(report.as_uri() + "#t-t0777")
    assert browser.execute_script("return document.getElementById('t-t0777').open") is True
    assert _severe_console_messages(browser) == []


def test_timelines_in_chromium_show_short_films_whole_axes_and_a_scale(tmp_path, browser, checkpoint):
    """A 1.2-s film draws its one second; no time label is cut off at the right edge (47 s: a label
    at 45 s, 20 units from the edge); each timeline has a probability scale; the untrained-head
    warning is on the first screen."""
    titles = [Title("blink", "blink.mp4", 1.2, probs_with_peak(1, range(0, 1))),
              Title("long", "long.mp4", 47.0, probs_with_peak(47, range(10, 30)))]
    out = write_score_out(tmp_path / "out", titles, model=checkpoint)
    browser.get(Path(write_report(out)).as_uri())
    browser.find_element("id", "expand").click()
    found = browser.execute_script("""
        const inside = (r, box) => r.left >= box.left - 0.5 && r.right <= box.right + 0.5;
        return Array.from(document.querySelectorAll('details.title')).map(d => {
          const svg = d.querySelector('svg.timeline'), box = svg.getBoundingClientRect();
          const texts = Array.from(svg.querySelectorAll('text'));
          return {title: d.dataset.title, line: svg.querySelector('polyline').getBoundingClientRect().width,
                  clipped: texts.filter(t => !inside(t.getBoundingClientRect(), box)).map(t => t.textContent),
                  ticks: texts.filter(t => !t.classList.contains('scale')).map(t => t.textContent),
                  scale: texts.filter(t => t.classList.contains('scale')).map(t => t.textContent)};
        });""")
    by_title = {f["title"]: f for f in found}
    assert by_title["blink"]["line"] > 100, by_title["blink"]  # two thirds of the plot, not a dot
    assert by_title["long"]["ticks"][-1] == "0:45"
    for f in found:
        assert f["clipped"] == [] and f["scale"] == ["1", "0.5", "0"], f
    warning = browser.execute_script("const r = document.querySelector('header .warning').getBoundingClientRect();"
                                     "return r.height > 0 && r.bottom <= window.innerHeight;")
    assert warning
