"""The HTTP server of ``kissray review`` (the standard library's ``ThreadingHTTPServer``).

Routes: ``GET /`` the page; ``GET /api/reviews`` the answers that count and the counts per label;
``POST /api/answers`` one answer (JSON), saved before the reply; ``GET /excerpts/<name>`` a file
``kissray excerpts`` wrote; ``GET /films/<title>`` the film a title row names, with range
requests (the player seeks in it); ``GET|POST /login`` the key form when a key is configured.

What it reads is fixed when it starts: the score tables of OUT, the excerpt files listed then, the
films of the titles table. A path is never joined from a request: names are looked up in those
lists, so nothing else (``../``, absolute paths, other titles' files) can be reached. On loopback
(the default) a request must name a loopback Host (no DNS rebinding) and answers must come as JSON
from the page's own origin (no cross-site form posts). Beyond loopback a key is required: the
``Authorization: Bearer KEY`` header, or the cookie the login form sets.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import mimetypes
import re
import socket
import threading
from concurrent.futures import ThreadPoolExecutor
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

from kissray.annotations import ReviewFiles, latest
from kissray.auth import LOOPBACK_HOSTS, ApiKey
from kissray.errors import UsageError, one_line
from kissray.names import file_name_for
from kissray.outputs import EXCERPTS_DIR, read_outputs
from kissray.report import find_media, table_number
from kissray.review.page import Players, render_page
from kissray.review.store import REVIEWS_DIR, new_answer, review_counts, save_answer
from kissray.uris import join_uri

log = logging.getLogger(__name__)
MAX_BODY_BYTES = 64 * 1024  # one answer is a few hundred bytes
CHUNK_BYTES = 256 * 1024  # film bytes per read while streaming a range
COOKIE = "kissray_review"
_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")


class ReviewSite:
    """What one review server serves: the page, the answers, and the files it may read."""

    def __init__(self, scores_dir: str, excerpts_dir: str | None = None, reviewer: str = "",
                 api_key: ApiKey | None = None):
        outputs = read_outputs(scores_dir, with_scores=True)
        self.out_dir, self.labels, self.api_key, self.reviewer = outputs.out_dir, outputs.labels, api_key, reviewer
        self.titles = {str(t["title_id"]): t for t in outputs.titles.to_dict("records")}
        self.segments = {(str(s.title_id), str(s.label), float(s.start_s), float(s.end_s))
                         for s in outputs.segments.itertuples(index=False)}
        self.excerpts_dir = str(excerpts_dir or join_uri(self.out_dir, EXCERPTS_DIR)).rstrip("/")
        media = find_media(self.excerpts_dir, join_uri(self.out_dir, "review.html"))
        self.excerpts = media.files
        with ThreadPoolExecutor(16) as pool:  # one existence check per title with segments
            with_segments = sorted({key[0] for key in self.segments})
            reachable = [t for t, ok in zip(with_segments, pool.map(self._film_exists, with_segments)) if ok]
        self.films = {file_name_for(t): str(self.titles[t]["uri"]) for t in reachable}
        self.page = render_page(outputs, Players(media, frozenset(reachable)), reviewer).encode()
        self.reviews = ReviewFiles(join_uri(self.out_dir, REVIEWS_DIR))
        self._lock = threading.Lock()  # ReviewFiles' cache is not thread-safe

    def _film_exists(self, title_id: str) -> bool:
        try:
            fs, path = self._fsspec_of(str(self.titles[title_id]["uri"]))
            return fs.isfile(path)
        except Exception:  # noqa: BLE001 - an unreachable film only means: no film player
            return False

    @staticmethod
    def _fsspec_of(uri: str):
        import fsspec

        return fsspec.core.url_to_fs(uri)

    def answers(self) -> dict:
        """The answers that count (oldest first) and the counts per label."""
        with self._lock:
            rows = self.reviews.rows()
        return {"answers": latest(rows), "counts": review_counts(rows, self.labels)}

    def save(self, body: dict) -> dict:
        """Check and save one answer; the answers after it. ValueError: a bad answer."""
        title = self.titles.get(str(body.get("title_id")))
        if title is None or title["status"] == "failed":
            raise ValueError(f"no scored title {body.get('title_id')!r} in {self.out_dir}")
        label, kind = str(body.get("label")), str(body.get("answer"))
        if label not in self.labels:
            raise ValueError(f"label must be one of {self.labels}, not {label!r}")
        segment = None
        if kind != "missed":
            segment = (_seconds(body, "segment_start_s"), _seconds(body, "segment_end_s"))
            if (str(title["title_id"]), label, *segment) not in self.segments:
                raise ValueError(f"{title['title_id']} has no {label} segment {segment[0]:g}-{segment[1]:g} s")
        answer = new_answer(str(title["title_id"]), str(title["uri"]), label, kind, _seconds(body, "start_s"),
                            _seconds(body, "end_s"), segment=segment, duration_s=table_number(title["duration_s"]),
                            reviewer=str(body.get("reviewer") or self.reviewer))
        name = save_answer(self.out_dir, answer)
        return {"saved": name, **self.answers()}

    def excerpt(self, name: str) -> str | None:
        """The URI of an excerpt file listed at start, or None (never a path built from ``name``)."""
        return join_uri(self.excerpts_dir, name) if name in self.excerpts else None

    def film(self, name: str) -> str | None:
        """The URI of the film of the title whose file name is ``name``, or None."""
        return self.films.get(name)

    def session_token(self) -> str:
        """The login cookie's value: derived from the key, so it stays valid across restarts."""
        return hmac.new(self.api_key.secret, b"kissray review session", hashlib.sha256).hexdigest()


def _seconds(body: dict, key: str) -> float:
    try:
        return float(body[key])
    except (KeyError, TypeError, ValueError):
        raise ValueError(f"{key} must be a number of seconds, not {body.get(key)!r}") from None


class ReviewHandler(BaseHTTPRequestHandler):
    """One request. ``site`` and ``loopback_hosts`` are set on the subclass :func:`make_server` builds."""

    site: ReviewSite
    loopback_hosts: frozenset[str] = frozenset()  # Host values allowed; empty: any (a key is required)
    protocol_version = "HTTP/1.1"
    server_version = "kissray-review"

    def log_message(self, format: str, *args) -> None:  # noqa: A002 - the stdlib's signature
        log.debug("%s %s", self.address_string(), format % args)

    def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
        self._route("GET")

    def do_HEAD(self) -> None:  # noqa: N802
        self._route("HEAD")

    def do_POST(self) -> None:  # noqa: N802
        self._route("POST")

    def _route(self, method: str) -> None:
        path = urlsplit(self.path).path
        if self.loopback_hosts and self.headers.get("Host", "") not in self.loopback_hosts:
            return self._json(HTTPStatus.FORBIDDEN, {"error": "this server answers to its loopback address only"})
        if path == "/login":
            return self._login(method)
        if not self._authorized():
            if method == "GET" and path == "/":
                return self._redirect("/login")
            return self._json(HTTPStatus.UNAUTHORIZED, {"error": "missing or wrong key"})
        if method == "POST":
            return self._post_answer() if path == "/api/answers" else self._json(HTTPStatus.NOT_FOUND, {"error": "no such route"})
        if path == "/":
            return self._send(HTTPStatus.OK, self.site.page, "text/html; charset=utf-8", method)
        if path == "/api/reviews":
            return self._json(HTTPStatus.OK, self.site.answers(), method)
        folder, _, name = path.lstrip("/").partition("/")
        uri = {"excerpts": self.site.excerpt, "films": self.site.film}.get(folder, lambda _: None)(unquote(name))
        if uri is None:
            return self._json(HTTPStatus.NOT_FOUND, {"error": "not found"})
        self._send_file(uri, method)

    def _authorized(self) -> bool:
        key = self.site.api_key
        if key is None or key.allows(self.headers.get("Authorization")):
            return True
        cookies = dict(c.strip().partition("=")[::2] for c in self.headers.get("Cookie", "").split(";") if "=" in c)
        return hmac.compare_digest(cookies.get(COOKIE, "").encode(), self.site.session_token().encode())

    def _login(self, method: str) -> None:
        if self.site.api_key is None:
            return self._redirect("/")
        if method != "POST":
            return self._send(HTTPStatus.OK, _login_form(""), "text/html; charset=utf-8", method)
        try:
            form = parse_qs(self._body().decode("utf-8", "replace"))
        except _TooLarge:
            return self._json(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, {"error": f"over {MAX_BODY_BYTES} bytes"})
        if not self.site.api_key.allows("Bearer " + (form.get("key") or [""])[0]):
            return self._send(HTTPStatus.UNAUTHORIZED, _login_form("wrong key"), "text/html; charset=utf-8")
        self._redirect("/", cookie=f"{COOKIE}={self.site.session_token()}; HttpOnly; SameSite=Strict; Path=/")

    def _post_answer(self) -> None:
        if not self.headers.get("Content-Type", "").startswith("application/json"):
            return self._json(HTTPStatus.UNSUPPORTED_MEDIA_TYPE, {"error": "send the answer as application/json"})
        origin = self.headers.get("Origin")
        if origin and origin != f"http://{self.headers.get('Host')}":
            return self._json(HTTPStatus.FORBIDDEN, {"error": f"answers from {origin} are not taken"})
        try:
            body = json.loads(self._body())
            if not isinstance(body, dict):
                raise ValueError("the answer must be a JSON object")
            result = self.site.save(body)
        except _TooLarge:
            return self._json(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, {"error": f"over {MAX_BODY_BYTES} bytes"})
        except ValueError as e:  # json.JSONDecodeError included
            return self._json(HTTPStatus.UNPROCESSABLE_ENTITY, {"error": str(e)})
        except Exception as e:  # noqa: BLE001 - storage failed: the editor must see the answer was not saved
            log.exception("saving an answer failed")
            return self._json(HTTPStatus.INTERNAL_SERVER_ERROR, {"error": f"cannot save the answer: {one_line(e)}"})
        self._json(HTTPStatus.OK, result)

    def _body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_BODY_BYTES:
            self.close_connection = True
            raise _TooLarge()
        return self.rfile.read(length)

    def _send_file(self, uri: str, method: str) -> None:
        fs, path = ReviewSite._fsspec_of(uri)
        try:
            size = fs.size(path)
        except OSError as e:  # gone since the server started, or its store is unreachable now
            return self._json(HTTPStatus.NOT_FOUND, {"error": f"cannot read it now: {one_line(e)}"})
        span = _byte_range(self.headers.get("Range"), size)
        if span is None:
            self.send_response(HTTPStatus.REQUESTED_RANGE_NOT_SATISFIABLE)
            self.send_header("Content-Range", f"bytes */{size}")
            self.send_header("Content-Length", "0")
            return self.end_headers()
        start, end = span
        self.send_response(HTTPStatus.PARTIAL_CONTENT if self.headers.get("Range") else HTTPStatus.OK)
        if self.headers.get("Range"):
            self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Type", mimetypes.guess_type(path)[0] or "application/octet-stream")
        self.send_header("Content-Length", str(end - start + 1))
        self.end_headers()
        if method == "HEAD" or size == 0:
            return
        try:
            with fs.open(path, "rb") as f:
                f.seek(start)
                left = end - start + 1
                while left > 0:
                    chunk = f.read(min(CHUNK_BYTES, left))
                    if not chunk:
                        break
                    self.wfile.write(chunk)
                    left -= len(chunk)
        except (BrokenPipeError, ConnectionResetError):
            pass  # players drop connections as they seek: normal

    def _send(self, status: int, data: bytes, content_type: str, method: str = "GET",
              headers: dict | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Cache-Control", "no-store")
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        if method != "HEAD":
            self.wfile.write(data)

    def _json(self, status: int, payload: dict, method: str = "GET") -> None:
        self._send(status, json.dumps(payload).encode(), "application/json", method)

    def _redirect(self, where: str, cookie: str | None = None) -> None:
        self._send(HTTPStatus.SEE_OTHER, b"", "text/plain", headers={"Location": where, **({"Set-Cookie": cookie} if cookie else {})})


class _TooLarge(Exception):
    pass


def _byte_range(header: str | None, size: int) -> tuple[int, int] | None:
    """(first, last) byte of a ``Range: bytes=a-b`` request (the whole file without one); None:
    not satisfiable. Several ranges in one header are answered with the whole file."""
    match = _RANGE.match((header or "").strip())
    if not match or size == 0:
        return (0, max(size - 1, 0)) if size or not header else None
    a, b = match.groups()
    if not a:  # the last b bytes
        return (max(0, size - int(b)), size - 1) if b and int(b) > 0 else None
    first, last = int(a), min(int(b) if b else size - 1, size - 1)
    return (first, last) if first <= last else None


def _login_form(message: str) -> bytes:
    note = f'<p style="color:#c92a2a">{message}</p>' if message else ""
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>kissray review: key</title></head>'
            f'<body style="font:14px system-ui;margin:48px auto;max-width:420px"><h1>kissray review</h1>{note}'
            f'<form method="post" action="/login"><label>Key <input name="key" type="password" autofocus></label> '
            f'<button type="submit">Open</button></form></body></html>').encode()


def check_host(host: str, api_key: ApiKey | None) -> None:
    """Beyond loopback, a key is required (UsageError otherwise)."""
    if host not in LOOPBACK_HOSTS and api_key is None:
        raise UsageError(f"--host {host} is beyond loopback: give --api-key-file (or set KISSRAY_API_KEY), "
                         "or anyone who reaches this port reads and writes your reviews")


def make_server(site: ReviewSite, host: str = "127.0.0.1", port: int = 8080) -> ThreadingHTTPServer:
    """A bound server for ``site`` (port 0: any free port); ``serve_forever()`` runs it."""
    check_host(host, site.api_key)
    server_class = type("ReviewServer", (ThreadingHTTPServer,),
                        {"daemon_threads": True, "address_family": socket.AF_INET6 if ":" in host else socket.AF_INET})
    try:
        server = server_class((host, port), ReviewHandler)
    except OSError as e:
        raise UsageError(f"--host {host} --port {port}: cannot listen there ({e.strerror})") from None
    bound = server.server_address[1]
    allowed = frozenset(f"{h}:{bound}" for h in ("127.0.0.1", "localhost", "[::1]")) if host in LOOPBACK_HOSTS else frozenset()
    server.RequestHandlerClass = type("Handler", (ReviewHandler,), {"site": site, "loopback_hosts": allowed})
    return server
