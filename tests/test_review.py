"""kissray review: answers by keyboard in headless chromium, saved at once, surviving a killed server;
training from them; two editors at once; the server's limits; a reviews folder on S3; --by-label."""

from __future__ import annotations

import http.client
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from conftest import make_film
from kissray.cli import main as cli_main
from kissray.provenance import read_provenance
from kissray.annotations import ReviewFiles
from kissray.excerpts import ExcerptOptions, write_excerpts
from kissray.report import Media
from kissray.review.page import Players
from kissray.review.server import ReviewSite, make_server
from kissray.train import read_metrics
from s3_server import free_port
from test_excerpts import Title, write_score_out
from test_report import first_screen_has_a_timeline

SCREENSHOT_MAX_BYTES = 150_000
DEADLINE_S = 90.0  # generous: the box is shared


def probs(n: int, *spans: tuple[int, int]) -> np.ndarray:
    p = np.full((n, 1), 0.1, np.float32)
    for a, b in spans:
        p[a:b] = 0.8
    return p


@pytest.fixture(scope="module")
def library(tmp_path_factory) -> dict:
    """Four scored films, most labelled first: alpha (excerpts), beta (no excerpt: the film plays),
    gamma, delta (two labels); segments are the runs of p = 0.8."""
    root = tmp_path_factory.mktemp("review")
    films = {name: make_film(root / f"{name}.mp4", duration_s=n) for name, n in
             (("alpha", 16), ("beta", 14), ("gamma", 12), ("delta", 8))}
    two = np.concatenate([probs(8, (0, 2)), probs(8, (4, 7))], axis=1)
    titles = [Title("alpha", films["alpha"], 16.0, probs(16, (1, 5), (10, 14))),
              Title("beta", films["beta"], 14.0, probs(14, (1, 4), (8, 12))),
              Title("gamma", films["gamma"], 12.0, probs(12, (1, 4), (8, 11))),
              Title("delta", films["delta"], 8.0, two, labels=("kiss", "hug"))]
    out = write_score_out(root / "out", titles)
    summary = write_excerpts(out, options=ExcerptOptions(pad_s=0, copy=True))
    assert not summary.failed
    for clip in (Path(out) / "excerpts" / "beta").glob("*.mp4"):
        clip.unlink()  # beta's player is the film itself, streamed by range requests
    return {"root": root, "out": out, "films": films, "reviews": Path(out) / "reviews"}


class ServerProcess:
    """``kissray review`` as its own process, so a test can kill it for real."""

    def __init__(self, out: str, log: Path, *extra: str):
        self.out, self.log, self.extra, self.port, self.proc = out, log, extra, free_port(), None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> "ServerProcess":
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")])}
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "kissray.cli", "review", "--scores", self.out,
                                          "--port", str(self.port), *self.extra], stdout=log, stderr=log, env=env)
        deadline = time.monotonic() + DEADLINE_S
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.log.read_text()
            try:
                urllib.request.urlopen(self.url + "/api/reviews", timeout=5).read()
                return self
            except OSError:
                time.sleep(0.3)
        raise AssertionError(f"review server not up after {DEADLINE_S} s: {self.log.read_text()}")

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)  # no clean shutdown: what a crash or an OOM kill does
        self.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def server(library):
    process = ServerProcess(library["out"], library["root"] / "server.log", "--reviewer", "ed").start()
    yield process
    if process.proc.poll() is None:
        process.proc.terminate()
        process.proc.wait(timeout=30)


def open_page(driver, url: str) -> None:
    driver.get(url)
    wait_until(lambda: driver.execute_script("return document.body.dataset.ready") == "1")


def wait_until(condition, timeout_s: float = DEADLINE_S):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError("condition not met in time")


def press(driver, keys: str) -> None:
    from selenium.webdriver.common.action_chains import ActionChains

    ActionChains(driver).send_keys(keys).perform()


def page_state(driver) -> dict:
    return driver.execute_script("""
        const segs = Array.from(document.querySelectorAll('li.segment'));
        return {answers: segs.map(li => [li.dataset.title, li.dataset.start, ['right', 'wrong', 'edges'].find(
                  c => li.classList.contains(c)) || null, li.querySelector('.state').textContent]),
                missed: Array.from(document.querySelectorAll('.missed-list li')).map(li => li.textContent),
                counts: Array.from(document.querySelectorAll('#counts tbody tr')).map(
                  tr => Array.from(tr.cells).map(c => c.textContent))};""")


def test_keyboard_answers_survive_a_killed_server(library, server, browser, tmp_path):
    open_page(browser, server.url)
    labels = browser.execute_script("return Array.from(document.querySelectorAll('button[data-answer]'))"
                                    ".slice(0, 3).map(b => b.innerText)")
    assert [text.split()[0] for text in labels] == ["Right", "Wrong", "Edges"]  # words, beside the key hint
    order = browser.execute_script("return Array.from(document.querySelectorAll('section.title'))"
                                   ".map(s => s.dataset.title)")
    assert order == ["alpha", "beta", "gamma", "delta"]  # most labelled time first
    started = time.monotonic()
    press(browser, "1")  # alpha [1, 5): right
    press(browser, "2")  # alpha [10, 14): wrong
    press(browser, "1")  # beta [1, 4): right
    press(browser, "]]=3")  # beta [8, 12): start +2 s, end +1 s -> edges [10, 13)
    press(browser, "2")  # gamma [1, 4): wrong
    press(browser, "m")  # gamma, the current title: a missed span, typed
    press(browser, "4\t6\n")
    wait_until(lambda: len(list(library["reviews"].glob("*.csv"))) == 6)
    wait_until(lambda: browser.find_element("id", "status").text.startswith("saved"))
    per_minute = 6 / ((time.monotonic() - started) / 60)
    print(f"\nscripted review: 6 answers saved in {60 * 6 / per_minute:.1f} s = {per_minute:.0f} per minute")
    before = page_state(browser)

    server.kill()
    server.start()
    open_page(browser, server.url)
    after = page_state(browser)
    assert after == before
    answered = {(t, s): a for t, s, a, _ in after["answers"] if a}
    assert answered == {("alpha", "1"): "right", ("alpha", "10"): "wrong", ("beta", "1"): "right",
                        ("beta", "8"): "edges", ("gamma", "1"): "wrong"}
    assert any("10–13 s" in text for _, s, a, text in after["answers"] if a == "edges")
    assert after["missed"] == ["Missed kiss 4–6 s · ed"]
    assert after["counts"][1] == ["kiss", "5", "3", "1", "2", "1", "60%"]  # labels sorted: hug, kiss
    rows = ReviewFiles(str(library["reviews"])).rows()
    assert sorted((r["uri"].rsplit("/", 1)[-1], r["start_s"], r["end_s"], r["label"], r["answer"]) for r in rows) == [
        ("alpha.mp4", "1", "5", "kiss", "right"), ("alpha.mp4", "10", "14", "not:kiss", "wrong"),
        ("beta.mp4", "1", "4", "kiss", "right"), ("beta.mp4", "10", "13", "kiss", "edges"),
        ("gamma.mp4", "1", "4", "not:kiss", "wrong"), ("gamma.mp4", "4", "6", "kiss", "missed")]
    assert {r["reviewer"] for r in rows} == {"ed"}


def test_train_learns_from_the_reviews(library, checkpoint, tmp_path, capsys):
    out = str(tmp_path / "reviewed")
    reviews = str(library["reviews"])
    code = cli_main(["train", "--annotations", reviews, "--init", checkpoint, "--out", out,
                     "--mode", "head", "--epochs", "2", "--batch-size", "8"])
    assert code == 0, capsys.readouterr().err
    metrics = read_metrics(out)
    assert metrics["annotations"] == reviews and metrics["reviews"]["answers"] == 6
    assert read_provenance(out)["annotations"] == reviews  # what the score, report and review pages show
    assert len(metrics["reviews"]["files"]) == 6 and metrics["reviews"]["by_answer"]["wrong"] == 2
    clips = sum(metrics["n_clips"].values())
    positives = sum(n["kiss"] for n in metrics["n_positive"].values())
    assert (clips, positives) == (4 + 4 + 3 + 3 + 3 + 2, 4 + 3 + 3 + 2)  # every answered second, once


def test_first_screens_show_timelines(library, server, browser, tmp_path):
    report = Path(library["out"]) / "report.html"
    assert cli_main(["report", "--scores", library["out"]]) == 0
    browser.get(report.as_uri())
    assert first_screen_has_a_timeline(browser)
    assert browser.execute_script("return Array.from(document.querySelectorAll('details.title'))"
                                  ".every(d => d.open)")
    reviews = browser.find_element("id", "reviews").text
    assert "60%" in reviews
    open_page(browser, server.url)
    assert first_screen_has_a_timeline(browser)
    warning = browser.find_element("css selector", "header .warning").text  # the scores' checkpoint is unknown here
    assert "whether its head was ever trained is unknown" in warning
    shot = tmp_path / "review.png"
    browser.save_screenshot(str(shot))
    small = _shrink_png(shot)
    assert 10_000 < small.stat().st_size < SCREENSHOT_MAX_BYTES


def _shrink_png(path: Path) -> Path:
    """The screenshot as a small PNG for the docs (a palette of 64 colours)."""
    from PIL import Image

    small = path.with_name("review-small.png")
    Image.open(path).convert("RGB").quantize(64).save(small, optimize=True)
    if os.environ.get("KISSRAY_DOCS_SCREENSHOT"):  # refresh docs/img/review.png by hand
        shutil.copy(small, Path(__file__).parents[1] / "docs" / "img" / "review.png")
    return small


def test_players_excerpt_film_or_thumbnail(library, server, browser):
    open_page(browser, server.url)
    sources = browser.execute_script("return Object.fromEntries(Array.from(document.querySelectorAll('li.segment'))"
                                     ".map(li => [li.dataset.title + '@' + li.dataset.start, "
                                     "(li.querySelector('video, img') || {}).src]))")
    assert "/excerpts/alpha/kiss-0-1-5.mp4" in sources["alpha@1"]
    assert sources["beta@8"].endswith("/films/beta#t=8,12")  # no excerpt: the film from the segment's start
    played = browser.execute_async_script("""
        const done = arguments[arguments.length - 1], v = document.querySelectorAll('section#t-beta video')[1];
        v.addEventListener('loadeddata', () => done([v.currentTime, v.duration]));
        v.addEventListener('error', () => done(['error', v.error.code]));
        v.preload = 'auto'; v.load();""")
    assert played == [8, 14]  # Chromium read the film by ranges and stands at the segment's start
    current = "return document.querySelector('li.segment.current video')"
    press(browser, "p")  # the current segment's player, by key
    wait_until(lambda: browser.execute_script(current + ".currentTime") > 0.2)
    press(browser, "p")
    assert wait_until(lambda: browser.execute_script(current + ".paused"))
    media = Media("x", "", frozenset({"gamma/kiss-0-1-4.jpg"}))
    players = Players(media, frozenset())  # no excerpt, film out of reach: the thumbnail
    assert players.for_segment("gamma", "kiss", "kiss-0-1-4", 1, 4).startswith('<img src="/excerpts/gamma/kiss-0-1-4.jpg"')
    assert "nomedia" in Players(Media("x", "", frozenset()), frozenset()).for_segment("gamma", "kiss", "kiss-0-1-4", 1, 4)


def test_two_editors_at_once_lose_nothing(library, server, browser):
    open_page(browser, server.url)
    first = browser.current_window_handle
    browser.switch_to.new_window("window")
    open_page(browser, server.url)
    second = browser.current_window_handle
    n_segments = browser.execute_script("return document.querySelectorAll('li.segment').length")
    before = len(ReviewFiles(str(library["reviews"])).rows())
    for handle, name, answer in ((first, "ann", "right"), (second, "bob", "wrong")):
        browser.switch_to.window(handle)
        browser.execute_script(f"""
            const who = document.getElementById('reviewer'); who.value = '{name}';
            document.querySelectorAll('li.segment button[data-answer={answer}]').forEach(b => b.click());""")
    with ThreadPoolExecutor(8) as pool:  # and a script posting at the same moment
        codes = list(pool.map(lambda i: post(server.url, {**ALPHA_FIRST, "reviewer": f"bot{i}"})[0], range(16)))
    assert codes == [200] * 16
    rows = wait_until(lambda: (lambda r: r if len(r) == before + 2 * n_segments + 16 else None)(
        ReviewFiles(str(library["reviews"])).rows()))
    by_reviewer = {}
    for row in rows:
        by_reviewer.setdefault(row["reviewer"], []).append(row)
    assert len(by_reviewer["ann"]) == len(by_reviewer["bob"]) == n_segments
    assert {r["answer"] for r in by_reviewer["ann"]} == {"right"} and {r["answer"] for r in by_reviewer["bob"]} == {"wrong"}
    browser.close()
    browser.switch_to.window(first)


ALPHA_FIRST = {"title_id": "alpha", "label": "kiss", "answer": "right", "start_s": 1, "end_s": 5,
               "segment_start_s": 1, "segment_end_s": 5}


def post(url: str, body, headers: dict | None = None, path: str = "/api/answers") -> tuple[int, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(url + path, data=data, method="POST",
                                     headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=30) as r:
            return r.status, json.loads(r.read() or b"{}")
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def raw_get(port: int, path: str, headers: dict | None = None) -> tuple[int, dict, bytes]:
    """A GET with the path exactly as given (no client-side normalisation of ``..``)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("GET", path, headers={"Host": f"127.0.0.1:{port}", **(headers or {})})
    response = conn.getresponse()
    result = response.status, dict(response.getheaders()), response.read()
    conn.close()
    return result


@pytest.fixture()
def in_process(library):
    """The review server on a thread of this process, for checks that need no browser."""
    servers = []

    def start(out: str = library["out"], api_key=None, site: ReviewSite | None = None):
        server = make_server(site or ReviewSite(out, api_key=api_key), "127.0.0.1", 0)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return server.server_address[1]

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def test_the_server_reads_nothing_but_its_lists(library, in_process, tmp_path):
    site = ReviewSite(library["out"])
    site.films["gone"] = str(tmp_path / "gone.mp4")  # a film deleted after the server started
    port = in_process(site=site)
    status, _, body = raw_get(port, "/films/gone")
    assert status == 404 and b"cannot read it now" in body
    film = Path(library["films"]["beta"]).read_bytes()
    status, headers, body = raw_get(port, "/films/beta", {"Range": "bytes=100-1099"})
    assert status == 206 and body == film[100:1100] and headers["Content-Range"] == f"bytes 100-1099/{len(film)}"
    status, _, body = raw_get(port, "/films/beta", {"Range": "bytes=-10"})
    assert status == 206 and body == film[-10:]
    assert raw_get(port, "/films/beta", {"Range": f"bytes={len(film)}-"})[0] == 416
    excerpt = next((Path(library["out"]) / "excerpts" / "alpha").glob("*.mp4"))
    assert raw_get(port, f"/excerpts/alpha/{excerpt.name}")[2] == excerpt.read_bytes()
    (library["root"] / "secret.txt").write_text("not for the browser")
    for path in ("/excerpts/../../secret.txt", "/excerpts/..%2F..%2Fsecret.txt", "/films/..%2Fsecret.txt",
                 "/films/%2e%2e/secret.txt", f"/films/{library['root']}/secret.txt", "/excerpts//etc/passwd",
                 "/titles/alpha.parquet", "/reviews/", "/films/alpha/../../secret.txt"):
        status, _, body = raw_get(port, path)
        assert status == 404 and b"not for the browser" not in body, path
    assert raw_get(port, "/", {"Host": "attacker.example:80"})[0] == 403  # DNS rebinding
    assert post(f"http://127.0.0.1:{port}", ALPHA_FIRST, {"Origin": "http://attacker.example"})[0] == 403
    assert post(f"http://127.0.0.1:{port}", ALPHA_FIRST, {"Content-Type": "text/plain"})[0] == 415
    status, body = post(f"http://127.0.0.1:{port}", {**ALPHA_FIRST, "segment_start_s": 2})
    assert status == 422 and "no kiss segment 2-5 s" in body["error"]
    assert post(f"http://127.0.0.1:{port}", {**ALPHA_FIRST, "title_id": "nope"})[0] == 422
    assert post(f"http://127.0.0.1:{port}", b"{not json")[0] == 422


def test_beyond_loopback_needs_a_key_and_the_browser_logs_in(library, in_process, tmp_path, capsys):
    assert cli_main(["review", "--scores", library["out"], "--host", "0.0.0.0", "--port", "0"]) == 2
    assert "--api-key-file" in capsys.readouterr().err
    assert cli_main(["review", "--scores", library["out"], "--port", "70000"]) == 2
    assert "--port must be 0..65535" in capsys.readouterr().err
    assert cli_main(["review", "--scores", str(tmp_path)]) == 2
    assert "no titles/ dataset" in capsys.readouterr().err and not (tmp_path / "reviews").exists()
    from kissray.auth import ApiKey

    port = in_process(api_key=ApiKey(b"s3cret"))
    url = f"http://127.0.0.1:{port}"
    assert raw_get(port, "/api/reviews")[0] == 401
    status, headers, _ = raw_get(port, "/")
    assert status == 303 and headers["Location"] == "/login"
    assert raw_get(port, "/api/reviews", {"Authorization": "Bearer s3cret"})[0] == 200
    assert post(url, ALPHA_FIRST)[0] == 401
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("POST", "/login", body="key=wrong", headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert conn.getresponse().status == 401
    conn.close()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("POST", "/login", body="key=s3cret", headers={"Content-Type": "application/x-www-form-urlencoded"})
    response = conn.getresponse()
    cookie = response.getheader("Set-Cookie").split(";")[0]
    assert response.status == 303 and "HttpOnly" in response.getheader("Set-Cookie")
    conn.close()
    status, _, page = raw_get(port, "/", {"Cookie": cookie})
    assert status == 200 and b"kissray review" in page


def test_reviews_on_s3(library, s3, in_process):
    import fsspec

    out = "s3://films/review-s3/out"
    fs = fsspec.filesystem("s3")
    for table in ("titles", "segments", "scores"):
        fs.put(str(Path(library["out"]) / table), f"{out}/{table}".removeprefix("s3://"), recursive=True)
    port = in_process(out)
    url = f"http://127.0.0.1:{port}"
    with ThreadPoolExecutor(6) as pool:
        results = list(pool.map(lambda kind: post(url, {**ALPHA_FIRST, "answer": kind}), ["right", "wrong"] * 3))
    assert [code for code, _ in results] == [200] * 6
    fs.invalidate_cache()
    assert len([p for p in fs.ls(f"{out}/reviews".removeprefix("s3://")) if p.endswith(".csv")]) == 6
    status, _, body = raw_get(port, "/api/reviews")
    assert status == 200 and json.loads(body)["counts"]["kiss"]["reviewed"] == 1
    from kissray.annotations import read_annotations

    annotations = read_annotations(f"{out}/reviews")
    assert annotations.reviews["answers"] == 6 and annotations.films == [library["films"]["alpha"]]


def test_excerpts_by_label(library, tmp_path):
    assert cli_main(["excerpts", "--scores", library["out"], "--out", str(tmp_path), "--by-label", "--copy",
                     "--pad", "0", "--no-thumbnails", "--label", "hug", "--label", "kiss"]) == 0
    by_label = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*.mp4"))
    by_title = sorted(str(p.relative_to(Path(library["out"]) / "excerpts"))
                      for p in (Path(library["out"]) / "excerpts").rglob("*.mp4"))
    assert "hug/delta/hug-0-4-7.mp4" in by_label and "kiss/delta/kiss-0-0-2.mp4" in by_label
    assert len(by_label) == 8 and {p.split("/", 1)[1] for p in by_label} >= set(by_title)  # names unchanged
