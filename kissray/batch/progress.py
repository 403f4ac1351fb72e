"""The driver's progress bar of a library job: film-seconds scored of a total known at the start.

The total comes from the films' own headers, read on the driver before the job starts
(:func:`expected_film_seconds`: local films only, a few milliseconds each, within a time budget),
so the bar shows a total and an ETA as soon as clips flow, not only once every film was opened by
the job. Titles not read in time (remote, or a library too big for the budget) count at the mean
of those read; each title's real length replaces its estimate as the job opens it.
"""

from __future__ import annotations

import sys
from concurrent.futures import ThreadPoolExecutor, wait

from kissray.uris import is_local

PROBE_BUDGET_S = 2.0  # longest the driver spends reading film headers before the job starts
PROBE_THREADS = 8


def header_seconds(path: str) -> float | None:
    """A local film's duration from its container header (nothing decoded), or None."""
    try:
        import av

        with av.open(path, metadata_errors="ignore") as container:
            if container.duration is not None:
                return container.duration / av.time_base
            video = container.streams.video[0]
            return float(video.duration * video.time_base) if video.duration else None
    except Exception:  # noqa: BLE001 - any film the header does not describe is just unknown here
        return None


def expected_film_seconds(uris: list[str], budget_s: float = PROBE_BUDGET_S) -> list[float | None]:
    """Each film's expected seconds (None: not known in time, or not a local file)."""
    found: list[float | None] = [None] * len(uris)
    local = [i for i, uri in enumerate(uris) if is_local(uri)]
    if not local:
        return found
    pool = ThreadPoolExecutor(min(PROBE_THREADS, len(local)))
    futures = {pool.submit(header_seconds, uris[i]): i for i in local}
    done, _ = wait(futures, timeout=budget_s)
    pool.shutdown(wait=False, cancel_futures=True)
    for future in done:
        found[futures[future]] = future.result()
    return found


class Progress:
    """The driver's bar: seconds of film through the classifier of an expected total, titles done
    and failed, and an ETA; silent when disabled."""

    def __init__(self, n_titles: int, enabled: bool, expected_s: list[float | None] | None = None):
        self.n_titles, self.enabled = n_titles, enabled
        self.film_s = self.titles_seen = self.done = self.failed = 0
        known = [round(s) for s in expected_s or [] if s is not None and s > 0]
        self.mean_expected_s = sum(known) / len(known) if known else None  # for titles not opened yet
        self.bar = None

    def __enter__(self) -> "Progress":
        if self.enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=self._total(0), unit="film-s", dynamic_ncols=True, file=sys.stderr)
            self.bar.set_postfix_str(f"titles 0/{self.n_titles}")
        return self

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.close()

    def _total(self, clips: int) -> int:
        unseen = self.n_titles - self.titles_seen
        mean_s = self.mean_expected_s
        if mean_s is None:
            mean_s = self.film_s / self.titles_seen if self.titles_seen else 0
        return max((self.bar.n if self.bar is not None else 0) + clips, int(self.film_s + unseen * mean_s))

    def update(self, clips: int = 0, film_s: int = 0, opened: int = 0, status: str | None = None) -> None:
        self.film_s, self.titles_seen = self.film_s + film_s, self.titles_seen + opened
        if status is not None:
            self.done += 1
            self.failed += status != "ok"
        if self.bar is None:
            return
        self.bar.total = self._total(clips)
        self.bar.set_postfix_str(f"titles {self.done}/{self.n_titles}, {self.failed} not ok", refresh=False)
        self.bar.update(clips)
