"""A real S3-compatible server for the tests: moto's server on 127.0.0.1, behind a byte counter.

``S3Server.start()`` runs ``python -m moto.server`` on a free port and a small TCP relay in front
of it; clients talk to the relay (``endpoint``), which counts the bytes the server sends back, so
a test can check how much of an object was actually read, independently of kissray's own counters.
Clients find the server through the standard AWS variables (``AWS_ENDPOINT_URL`` etc.), which
:func:`environment` returns and ``tests/conftest.py`` sets before Ray starts (workers inherit them).
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def environment(port: int) -> dict[str, str]:
    """What boto / s3fs / pyarrow need to reach the test server (fake credentials)."""
    return {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}


class _Relay(threading.Thread):
    """Accepts on ``port`` and pipes each connection to ``upstream``, counting bytes sent back.
    ``latency_s``: each response waits this long before its first byte (a cloud store's
    time to first byte; moto on 127.0.0.1 answers in about a millisecond)."""

    def __init__(self, port: int, upstream: int, latency_s: float = 0.0):
        super().__init__(daemon=True)
        self.upstream, self.latency_s = upstream, latency_s
        self.bytes_down = 0
        self.connections = 0
        self._lock = threading.Lock()
        self._listener = socket.create_server(("127.0.0.1", port))

    def run(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            with self._lock:
                self.connections += 1
            try:
                server = socket.create_connection(("127.0.0.1", self.upstream))
            except OSError:
                client.close()
                continue
            asked = threading.Event()  # a request went up and its response has not started yet
            threading.Thread(target=self._pipe, args=(client, server, False, asked), daemon=True).start()
            threading.Thread(target=self._pipe, args=(server, client, True, asked), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, down: bool, asked: threading.Event) -> None:
        try:
            while chunk := src.recv(1 << 16):
                if down:
                    if asked.is_set() and self.latency_s:
                        time.sleep(self.latency_s)
                    asked.clear()
                    with self._lock:
                        self.bytes_down += len(chunk)
                else:
                    asked.set()
                dst.sendall(chunk)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
                with contextlib.suppress(OSError):
                    s.close()

    def close(self) -> None:
        self._listener.close()


class S3Server:
    """moto's S3 server (a child process) on 127.0.0.1 behind a counting relay on ``port``."""

    def __init__(self, port: int, latency_s: float = 0.0):
        self.port, self.latency_s = port, latency_s
        self.endpoint = f"http://127.0.0.1:{port}"
        self._proc: subprocess.Popen | None = None
        self._relay: _Relay | None = None

    def start(self, timeout_s: float = 60.0) -> "S3Server":
        backend = free_port()
        self._proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(backend)],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{backend}/moto-api/", timeout=2).close()
                break
            except OSError:
                if self._proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError("moto's S3 server did not start")
                time.sleep(0.1)
        self._relay = _Relay(self.port, backend, self.latency_s)
        self._relay.start()
        return self

    @property
    def bytes_down(self) -> int:
        """Bytes the server has sent to clients so far (responses, headers included)."""
        return self._relay.bytes_down

    def make_bucket(self, name: str) -> str:
        import boto3

        client = boto3.client("s3", endpoint_url=self.endpoint)
        with contextlib.suppress(client.exceptions.BucketAlreadyOwnedByYou, client.exceptions.BucketAlreadyExists):
            client.create_bucket(Bucket=name)
        return f"s3://{name}"

    def stop(self) -> None:
        if self._relay is not None:
            self._relay.close()
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()


if __name__ == "__main__":  # a server for trying kissray by hand: prints the variables to export
    import signal

    server = S3Server(int(os.environ.get("PORT", free_port()))).start()
    for key, value in environment(server.port).items():
        print(f"export {key}={value}", flush=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
