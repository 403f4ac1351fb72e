"""One live run per output directory: a lock file ``OUT/_kissray.lock`` (SPEC section 6).

The lock names its holder (host, pid, start time) and carries a heartbeat that the holder
refreshes every :data:`HEARTBEAT_S`. A second run on the same OUT exits with a usage error
naming the holder while the holder is alive: on the same host, its pid is running with the same
process start time; on another host, its heartbeat is younger than :data:`STALE_AFTER_S`. A dead
run's lock is taken over. Works on any fsspec filesystem (no atomic create is assumed: after
writing, the lock is read back, and the run that reads its own id wins).
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from datetime import datetime, timezone

from kissray.errors import UsageError

LOCK_NAME = "_kissray.lock"  # a leading underscore: ignored by Parquet dataset readers
HEARTBEAT_S = 30.0
STALE_AFTER_S = 120.0  # a lock from another host whose heartbeat is older than this is dead


def _process_start(pid: int) -> str | None:
    """The kernel's start time of ``pid`` (clock ticks since boot), to tell a reused pid apart."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _alive(holder: dict) -> bool:
    if holder.get("host") == socket.gethostname():
        start = _process_start(int(holder.get("pid", -1)))
        return start is not None and start == holder.get("pid_start", start)
    return time.time() - float(holder.get("heartbeat", 0)) < STALE_AFTER_S


class OutLock:
    """``with OutLock(fs, root):`` holds OUT for this process, or raises :class:`UsageError`."""

    def __init__(self, fs, root: str, out: str):
        self.fs, self.path, self.out = fs, f"{root.rstrip('/')}/{LOCK_NAME}", out
        self.holder = {"host": socket.gethostname(), "pid": os.getpid(), "pid_start": _process_start(os.getpid()),
                       "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                       "run": uuid.uuid4().hex}
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None

    def __enter__(self) -> "OutLock":
        other = self._read()
        if other and other.get("run") != self.holder["run"] and _alive(other):
            raise UsageError(self._in_use(other))
        self._write()
        if (self._read() or {}).get("run") != self.holder["run"]:  # another run wrote at the same moment
            raise UsageError(self._in_use(self._read() or {}))
        self._beat = threading.Thread(target=self._heartbeat, name="kissray-lock", daemon=True)
        self._beat.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._beat is not None:
            self._beat.join(timeout=5)
        if (self._read() or {}).get("run") == self.holder["run"]:
            try:
                self.fs.rm(self.path)
            except OSError:
                pass

    def _in_use(self, other: dict) -> str:
        return (f"output {self.out} is in use by another run (host {other.get('host')}, pid {other.get('pid')}, "
                f"started {other.get('started')}); wait for it to end, or give another --out")

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                self._write()
            except OSError:
                pass  # a missed beat is not fatal; STALE_AFTER_S allows several

    def _write(self) -> None:
        with self.fs.open(self.path, "w") as f:
            f.write(json.dumps({**self.holder, "heartbeat": time.time()}))

    def _read(self) -> dict | None:
        self.fs.invalidate_cache(self.path)  # another run's lock, written since this process listed OUT?
        try:
            with self.fs.open(self.path, "r") as f:
                return json.loads(f.read())
        except (FileNotFoundError, ValueError):
            return None
