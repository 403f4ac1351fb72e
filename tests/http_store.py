"""A small HTTP store on 127.0.0.1 for the tests: serves the files of a folder to fsspec's http://.

``HttpStore(root, sizes=False)`` says nothing of sizes (no Content-Length, no ranges: the body ends
when the connection closes). With sizes it answers HEAD with Content-Length and GET with byte
ranges (206), and can fail: ``drop(n, from_byte)`` makes the next ``n`` GETs of a range that
ends past ``from_byte`` send half their body and close the connection (a store dropping it).
"""

from __future__ import annotations

import http.server
import os
import re
import threading
from pathlib import Path


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.0"  # one request per connection: a body may end with it
    store: "HttpStore"

    def _file(self) -> Path | None:
        path = self.store.root / self.path.lstrip("/")
        return path if path.is_file() else None

    def do_HEAD(self):
        path = self._file()
        self.send_response(200 if path else 404)
        if path and self.store.sizes:
            self.send_header("Content-Length", str(path.stat().st_size))
            self.send_header("Accept-Ranges", "bytes")
        self.end_headers()

    def do_GET(self):
        path = self._file()
        if path is None:
            self.send_response(404)
            self.end_headers()
            return
        data = path.read_bytes()
        asked = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", "")) if self.store.sizes else None
        start, end = (int(asked[1]), min(len(data), int(asked[2] or len(data) - 1) + 1)) if asked else (0, len(data))
        self.send_response(206 if asked else 200)
        if self.store.sizes:
            self.send_header("Content-Length", str(end - start))
            if asked:
                self.send_header("Content-Range", f"bytes {start}-{end - 1}/{len(data)}")
        self.end_headers()
        body = data[start:end]
        if self.store.take_drop(end):
            self.wfile.write(body[:len(body) // 2])
            self.wfile.flush()
            self.connection.shutdown(2)  # the store drops the connection mid-body
            return
        self.wfile.write(body)

    def log_message(self, *args):
        pass


class HttpStore:
    def __init__(self, root: Path, sizes: bool = True):
        self.root, self.sizes = Path(root), sizes
        self.dropped = 0
        self._drops, self._from_byte = 0, 0
        self._lock = threading.Lock()
        handler = type("Handler", (_Handler,), {"store": self})
        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self.url = f"http://127.0.0.1:{self._server.server_port}"

    def __enter__(self) -> "HttpStore":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()

    def drop(self, n: int, from_byte: int = 0) -> None:
        with self._lock:
            self._drops, self._from_byte = n, from_byte

    def take_drop(self, end: int) -> bool:
        with self._lock:
            if self._drops > 0 and end > self._from_byte:
                self._drops -= 1
                self.dropped += 1
                return True
        return False


def film_in(store: HttpStore, path: str | os.PathLike) -> str:
    """The URL of a file of the store's folder."""
    return f"{store.url}/{Path(path).relative_to(store.root)}"
