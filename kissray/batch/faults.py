"""Test-only fault injection for the library job: nothing happens unless a :class:`FaultPlan` is
passed to :func:`kissray.pipeline.run_library` (``faults=``); the default plan is empty.

Two kinds of fault, each aimed at one title at one stage:

- ``raise_at``: the stage raises :class:`InjectedFault` while handling that title (a bug, an OOM,
  a failed write): the job must turn it into that title's ``failed``/``partial`` row.
- ``crash_at``: the process running the stage dies (``os._exit``) the first time it handles that
  title, as a lost worker would; a marker file makes it happen once per run, so the retry or the
  re-submitted title goes through. The job must redo the title in the same run.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

RAISE_STAGES = ("probe", "windows", "decode", "rows", "classifier", "segmenter", "write")
CRASH_STAGES = ("decode", "classifier", "writer")


class InjectedFault(RuntimeError):
    """Raised by a stage on purpose (tests only)."""


@dataclass(frozen=True)
class FaultPlan:
    raise_at: tuple[tuple[str, str], ...] = ()  # (stage, title_id)
    crash_at: tuple[tuple[str, str], ...] = ()  # (stage, title_id): once, then never again
    marker_dir: str = ""  # where crash markers go (required with crash_at)

    def __post_init__(self):
        for stage, _ in self.raise_at:
            if stage not in RAISE_STAGES:
                raise ValueError(f"unknown stage {stage!r} (one of {', '.join(RAISE_STAGES)})")
        for stage, _ in self.crash_at:
            if stage not in CRASH_STAGES:
                raise ValueError(f"unknown crash stage {stage!r} (one of {', '.join(CRASH_STAGES)})")
        if self.crash_at and not self.marker_dir:
            raise ValueError("crash_at needs a marker_dir")

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


NO_FAULTS = FaultPlan()
