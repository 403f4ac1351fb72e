"""Test-only fault injection for the library job: nothing happens unless a :class:`FaultPlan` is
passed to :func:`kissray.pipeline.run_library` (``faults=``); the default plan is empty. A test that
runs ``kissray score`` as a process of its own (to SIGKILL it) hands it a plan as JSON in
``KISSRAY_TEST_FAULTS`` (:func:`plan_from_env`); unset, as everywhere but in tests, nothing happens.

Faults aimed at one title at one stage:

- ``raise_at``: the stage raises :class:`InjectedFault` while handling that title (a bug, an OOM,
  a failed write): the job must turn it into that title's ``failed``/``partial`` row.
- ``crash_at``: the process running the stage dies (``os._exit``) the first time it handles that
  title, as a lost worker would; a marker file makes it happen once per run, so the retry or the
  re-submitted title goes through. The job must redo the title in the same run.
- ``kill_at``: the process gets SIGKILL *every* time it handles that title (a decoder segfault,
  the OOM killer): the title must be retried alone, then ``failed`` alone. Each kill leaves a
  marker ``killed-<stage>-<title hex>-<pid>``, so a test can count real deaths.
- ``linger_at``: the writer hands that title's results to a process of its own that writes them
  only after the title was committed again by a later attempt, then dies (a writer that Ray lost
  track of, finishing late): the late result must never replace the later one.

And pauses at named points, for races between processes: ``hold_at`` (point, key) makes the
caller write ``held-<point>`` in ``marker_dir`` and wait until the test writes ``release-<point>``
there (points: ``lock-read``, between reading and writing OUT's lock; ``heartbeat``, before a
renewal, as a paused holder; ``commit``, keyed by a count, the driver once it has committed that
many titles; ``classifier``, keyed by a title, a model actor about to score a batch of it;
``writer``, keyed by a title, the writer about to add a batch of a title it holds earlier rows of).
The marker holds the held process's pid, so a test can kill exactly that process.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass

RAISE_STAGES = ("probe", "windows", "decode", "rows", "classifier", "segmenter", "write")
CRASH_STAGES = ("decode", "classifier", "writer")
KILL_STAGES = ("decode", "classifier")
HOLD_POINTS = ("lock-read", "heartbeat", "commit", "classifier", "writer")
HOLD_TIMEOUT_S = 600.0  # a held caller gives up waiting for its release after this long


class InjectedFault(RuntimeError):
    """Raised by a stage on purpose (tests only)."""


@dataclass(frozen=True)
class FaultPlan:
    raise_at: tuple[tuple[str, str], ...] = ()  # (stage, title_id)
    crash_at: tuple[tuple[str, str], ...] = ()  # (stage, title_id): once, then never again
    kill_at: tuple[tuple[str, str], ...] = ()  # (stage, title_id): SIGKILL every time
    linger_at: tuple[str, ...] = ()  # title_ids whose writer writes late (see the module doc)
    hold_at: tuple[tuple[str, str], ...] = ()  # (point, key): wait for the test's release
    marker_dir: str = ""  # where markers go (required with crash_at, kill_at, linger_at, hold_at)

    def __post_init__(self):
        for pairs, allowed, what in ((self.raise_at, RAISE_STAGES, "stage"), (self.crash_at, CRASH_STAGES, "crash stage"),
                                     (self.kill_at, KILL_STAGES, "kill stage"), (self.hold_at, HOLD_POINTS, "hold point")):
            for name, _ in pairs:
                if name not in allowed:
                    raise ValueError(f"unknown {what} {name!r} (one of {', '.join(allowed)})")
        if (self.crash_at or self.kill_at or self.linger_at or self.hold_at) and not self.marker_dir:
            raise ValueError("crash_at, kill_at, linger_at and hold_at need a marker_dir")

    def check(self, stage: str, title_id: str) -> None:
        """Raise here if the plan says so; a no-op for the empty plan."""
        if (stage, title_id) in self.raise_at:
            raise InjectedFault(f"injected fault in {stage}")

    def crash(self, stage: str, title_id: str) -> None:
        """End this process here (once per run) if the plan says so; a no-op for the empty plan."""
        if (stage, title_id) in self.crash_at:
            marker = os.path.join(self.marker_dir, f"crashed-{stage}-{title_id.encode().hex()}")
            try:
                os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            except FileExistsError:
                return  # crashed once already
            os._exit(17)
        if (stage, title_id) in self.kill_at:
            marker = os.path.join(self.marker_dir, f"killed-{stage}-{title_id.encode().hex()}-{os.getpid()}")
            os.close(os.open(marker, os.O_CREAT | os.O_WRONLY))
            os.kill(os.getpid(), signal.SIGKILL)

    def hold(self, point: str, key: str) -> None:
        """Wait here until the test releases ``point`` (a no-op unless the plan holds it)."""
        if (point, key) not in self.hold_at:
            return
        marker = os.path.join(self.marker_dir, f"held-{point}")
        with open(f"{marker}.{os.getpid()}.tmp", "w") as f:  # whole, or not there at all
            f.write(str(os.getpid()))
        os.replace(f"{marker}.{os.getpid()}.tmp", marker)
        release = os.path.join(self.marker_dir, f"release-{point}")
        deadline = time.monotonic() + HOLD_TIMEOUT_S
        while not os.path.exists(release) and time.monotonic() < deadline:
            time.sleep(0.05)

    def linger(self, title_id: str, payload: bytes) -> bool:
        """Hand ``payload`` (the writer's pickled staging call) to a late-writer process and end
        this one; False (nothing happens) unless the plan lingers this title, once per run."""
        if title_id not in self.linger_at:
            return False
        marker = os.path.join(self.marker_dir, f"lingered-{title_id.encode().hex()}")
        try:
            os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            return False  # the later attempt writes normally
        with open(marker + ".pickle", "wb") as f:
            f.write(payload)
        subprocess.Popen([sys.executable, "-m", "kissray.batch.faults", marker + ".pickle"],
                         start_new_session=True, stdin=subprocess.DEVNULL)
        os._exit(17)


NO_FAULTS = FaultPlan()
TEST_PLAN_ENV = "KISSRAY_TEST_FAULTS"


def plan_from_env() -> FaultPlan:
    """The plan in ``KISSRAY_TEST_FAULTS`` (FaultPlan's fields as JSON, pairs as lists), or the
    empty plan when it is unset."""
    raw = os.environ.get(TEST_PLAN_ENV, "")
    if not raw:
        return NO_FAULTS
    fields = json.loads(raw)
    return FaultPlan(**{name: tuple(tuple(v) if isinstance(v, list) else v for v in value)
                        if isinstance(value, list) else value for name, value in fields.items()})


def _write_late(payload_path: str) -> None:
    """The late writer (``linger_at``): wait until the title has a committed row written after
    this process started (a later attempt redid it), then make the writer's own call, then leave
    ``<payload>.done``."""
    import pickle

    from kissray.batch.tables import ResultStore

    with open(payload_path, "rb") as f:
        call, args = pickle.load(f)
    store, title_id = ResultStore(call.__self__.out), args[0].title_id
    started = time.time()
    deadline = time.monotonic() + HOLD_TIMEOUT_S
    while time.monotonic() < deadline:
        row = store.title_row(title_id)
        if row and row["scored_at"].timestamp() > started:
            break
        time.sleep(0.1)
    written_at = time.time()
    call(*args)
    with open(payload_path + ".done", "w") as f:
        f.write(str(written_at))  # when the late write began


if __name__ == "__main__":
    _write_late(sys.argv[1])
