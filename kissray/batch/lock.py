"""One live run per output directory: a lock object ``OUT/_kissray.lock`` (SPEC section 7).

The lock names its holder (host, pid, start time, run id) and carries a heartbeat that the holder
renews every :data:`HEARTBEAT_S`. A second run on the same OUT exits with a usage error naming
the holder while the holder is alive: on the same host, its pid is running with the same process
start time; on another host, its heartbeat is younger than :data:`STALE_AFTER_S`. A dead run's
lock is taken over.

Every change of the lock is a compare-and-swap on the store (:mod:`kissray.batch.conditional`):
it is created only if absent (S3 ``If-None-Match: *``, GCS ``ifGenerationMatch=0``), and
renewed, taken over or released only if it is still the version its writer read (S3
``If-Match``, GCS generation match). So two runs started at the same moment cannot both take it,
and only its owner renews it. A holder paused past the takeover time (a stopped VM, a long
swap) finds on waking that its renewal fails: it has lost OUT and must write nothing more
(:meth:`OutLock.check`, called before every commit, raises :class:`LockLost`).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from datetime import datetime, timezone

from kissray.batch.conditional import conditional_file
from kissray.batch.faults import NO_FAULTS, FaultPlan
from kissray.errors import JobError, UsageError

log = logging.getLogger(__name__)

LOCK_NAME = "_kissray.lock"  # a leading underscore: ignored by Parquet dataset readers
HEARTBEAT_S = 30.0
STALE_AFTER_S = 120.0  # a lock from another host whose heartbeat is older than this is dead
TAKE_ROUNDS = 3  # reads of a lock that keeps changing under us before giving up


class LockLost(JobError):
    """Another run took OUT over (this one was paused or cut off past the takeover time)."""


def _process_start(pid: int) -> str | None:
    """The kernel's start time of ``pid`` (clock ticks since boot), to tell a reused pid apart."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def holder_alive(holder: dict, stale_after_s: float = STALE_AFTER_S) -> bool:
    """Whether the run that wrote ``holder`` is alive, as far as this process can tell."""
    if holder.get("host") == socket.gethostname():
        start = _process_start(int(holder.get("pid", -1)))
        return start is not None and start == holder.get("pid_start", start)
    return time.time() - float(holder.get("heartbeat", 0)) < stale_after_s


def _parse(data: bytes) -> dict:
    try:
        holder = json.loads(data)
    except ValueError:
        return {}  # a torn or foreign file holds nothing
    return holder if isinstance(holder, dict) else {}


class OutLock:
    """``with OutLock(fs, root, out):`` holds OUT for this process, or raises :class:`UsageError`.

    ``heartbeat_s`` / ``stale_after_s``: renewal period and takeover age (tests shorten them);
    ``faults``: test-only holds between reading and writing the lock and before a renewal."""

    def __init__(self, fs, root: str, out: str, *, heartbeat_s: float = HEARTBEAT_S,
                 stale_after_s: float = STALE_AFTER_S, faults: FaultPlan = NO_FAULTS):
        self.file = conditional_file(fs, f"{root.rstrip('/')}/{LOCK_NAME}")
        self.out, self.faults = out, faults
        self.heartbeat_s, self.stale_after_s = heartbeat_s, stale_after_s
        self.holder = {"host": socket.gethostname(), "pid": os.getpid(), "pid_start": _process_start(os.getpid()),
                       "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                       "run": uuid.uuid4().hex}
        self.version: str | None = None  # the store's version of our last write (ETag, generation, digest)
        self.renewed = 0.0  # time.monotonic() of our last successful write
        self.lost: str | None = None  # why we no longer hold OUT
        self._mutex = threading.Lock()  # the heartbeat thread and the committing thread both renew
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None

    @property
    def run_id(self) -> str:
        return self.holder["run"]

    def __enter__(self) -> "OutLock":
        if not self.file.conditional:
            log.warning("%s: this store offers no conditional write; two runs started at the same moment "
                        "on it could both take OUT (use a local folder, s3:// or gs://)", self.out)
        self._take()
        self._beat = threading.Thread(target=self._heartbeat, name="kissray-lock", daemon=True)
        self._beat.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._beat is not None:
            self._beat.join(timeout=5)
        with self._mutex:
            if self.lost is None and self.version is not None:
                try:
                    self.file.delete(self.version)  # only if it is still ours
                except OSError as e:  # a dead run's lock is taken over: leaving it is safe
                    log.warning("could not release the lock of %s: %s", self.out, e)

    def _take(self) -> None:
        """Create the lock, or take over a dead run's, by compare-and-swap; a live holder (or a
        run that wins the swap at the same moment) makes this a usage error naming it."""
        for _ in range(TAKE_ROUNDS):
            current = self.file.read()
            self.faults.hold("lock-read", self.out)
            if current is None:
                version = self.file.create(self._data())
            else:
                other = _parse(current[0])
                if other.get("run") != self.run_id and other and holder_alive(other, self.stale_after_s):
                    raise UsageError(self._in_use(other))
                version = self.file.replace(self._data(), current[1])  # a dead run's lock
            if version is not None:
                self.version, self.renewed = version, time.monotonic()
                return
        current = self.file.read()
        raise UsageError(self._in_use(_parse(current[0]) if current else {}))

    def _in_use(self, other: dict) -> str:
        return (f"output {self.out} is in use by another run (host {other.get('host')}, pid {other.get('pid')}, "
                f"started {other.get('started')}); wait for it to end, or give another --out")

    def _data(self) -> bytes:
        return json.dumps({**self.holder, "heartbeat": time.time()}).encode()

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            self.faults.hold("heartbeat", self.out)
            self.renew()
            if self.lost:
                log.error("%s", self.lost)
                return

    def renew(self) -> None:
        """Rewrite the lock if it is still the version we wrote; if not, OUT is lost."""
        with self._mutex:
            if self.lost is not None or self.version is None:
                return
            try:
                version = self.file.replace(self._data(), self.version)
            except OSError as e:  # a missed beat: the next one (or check) tries again
                log.warning("could not renew the lock of %s: %s", self.out, e)
                return
            if version is not None:
                self.version, self.renewed = version, time.monotonic()
                return
            current = self.file.read()
            other = _parse(current[0]) if current else {}
            self.lost = (f"lost the lock of {self.out}: another run (host {other.get('host')}, pid "
                         f"{other.get('pid')}, started {other.get('started')}) took it over while this one "
                         f"was paused or cut off for over {self.stale_after_s:g} s; stopping before writing more")

    def check(self) -> None:
        """Raise :class:`LockLost` unless this run still holds OUT; called before every commit.
        A lock not renewed for a while (this process was paused) is renewed first, so a run
        that wakes up learns that it lost OUT before it writes, not after."""
        if self.lost is None and time.monotonic() - self.renewed > self.heartbeat_s * 1.5:
            self.renew()
            if self.lost is None and time.monotonic() - self.renewed > self.stale_after_s:
                self.lost = (f"could not renew the lock of {self.out} for {self.stale_after_s:g} s: another run "
                             "may have taken it over; stopping before writing more")
        if self.lost is not None:
            raise LockLost(self.lost)
