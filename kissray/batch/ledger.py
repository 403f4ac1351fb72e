"""Which piece of work keeps killing its process: a ledger of starts that never ended.

Ray Data retries a task whose worker died, and restarts an actor whose process died and resends
its batch, without limit: right for a lost node, wrong for a title that segfaults its decoder or
draws the OOM killer every time (it would loop forever, or end the attempt and take the titles
in flight beside it down with it). So each stage tells the ledger when it starts a piece of work
(a window, one title's clips in a batch) and when it ends it; a start that finds
:data:`MAX_DEATHS` earlier starts that never ended knows that the work killed its process that
many times, and reports the title's error instead of trying again. One ledger (a small Ray actor
on the driver's side) serves a whole run, attempts included.
"""

from __future__ import annotations

MAX_DEATHS = 2  # a piece of work that killed its process this many times is not tried again


def died_error(deaths: int) -> str:
    return (f"the process handling this title died {deaths} times (a crash or out of memory, e.g. a "
            "decoder segfault or the OOM killer); not retried again")


class _Counts:
    """The actor's state: starts that have not ended, per key; titles found guilty."""

    def __init__(self):
        self.open: dict[str, int] = {}
        self.condemned: set[str] = set()

    def begin(self, key: str, titles: list[str]) -> tuple[int, list[str]]:
        earlier = self.open.get(key, 0)
        self.open[key] = earlier + 1
        return earlier, sorted(set(titles) & self.condemned)

    def end(self, key: str) -> None:
        self.open.pop(key, None)

    def condemn(self, title_id: str) -> None:
        self.condemned.add(title_id)


class DeathLedger:
    """A handle on the run's ledger actor, picklable into Ray tasks and actors."""

    def __init__(self, actor=None):
        self.actor = actor

    @classmethod
    def start(cls) -> "DeathLedger":
        import ray

        # restarted if its node dies (the counts start again: a lost node is not the title's fault)
        actor = ray.remote(num_cpus=0, max_restarts=-1)(_Counts).remote()
        return cls(actor)

    def begin(self, key: str, titles: list[str] = ()) -> tuple[int, list[str]]:
        """Record a start of ``key``; returns how many earlier starts never ended (deaths), and
        which of ``titles`` were already found to kill their process (their work is skipped)."""
        if self.actor is None:
            return 0, []
        import ray

        return ray.get(self.actor.begin.remote(key, list(titles)))

    def condemn(self, title_id: str) -> None:
        """Record that ``title_id`` kills its process: its other pieces of work are not tried."""
        if self.actor is not None:
            self.actor.condemn.remote(title_id)

    def end(self, key: str) -> None:
        if self.actor is not None:
            self.actor.end.remote(key)  # fire and forget: ordered after our begin (same caller)

    def close(self) -> None:
        if self.actor is not None:
            import ray

            ray.kill(self.actor)


NO_LEDGER = DeathLedger()
