"""What one Ingress replica allows: who may call it (``ApiKey``) and how many films it decodes at
once (``DecodeSlots``, sized by ``cpu_allotment``)."""

from __future__ import annotations

import asyncio
import math
import os
import threading

from kissray.auth import API_KEY_ENV, ApiKey  # noqa: F401 - re-exported: the replica's key

_CGROUP_ROOT = "/sys/fs/cgroup"
SLOT_POLL_S = 0.02  # how often a request waiting for a slot looks again (slots are freed by decode threads)


# ---------------------------------------------------------------- decode capacity


def cpu_allotment() -> int:
    """CPUs this process may use: the smallest of its CPU affinity, its cgroup's CPU quota and the
    CPUs Ray assigned to it (``os.cpu_count()`` is the host's count, even inside a container)."""
    counts = [len(os.sched_getaffinity(0))]
    for limit in (cgroup_cpu_quota(), ray_assigned_cpus()):
        if limit:
            counts.append(limit)
    return max(1, math.floor(min(counts)))


def cgroup_cpu_quota() -> float | None:
    """CPUs allowed by this process's cgroup (v2 ``cpu.max`` or v1 ``cfs_quota_us``); None: no quota."""
    for controllers, path in _cgroups():
        if not controllers:  # cgroup v2
            quota = _read_words(f"{_CGROUP_ROOT}{path}/cpu.max") or _read_words(f"{_CGROUP_ROOT}/cpu.max")
            if quota and quota[0] != "max":
                return int(quota[0]) / int(quota[1])
        elif "cpu" in controllers.split(","):
            for base in (f"{_CGROUP_ROOT}/{controllers}{path}", f"{_CGROUP_ROOT}/cpu"):
                quota, period = _read_words(f"{base}/cpu.cfs_quota_us"), _read_words(f"{base}/cpu.cfs_period_us")
                if quota and period and int(quota[0]) > 0:
                    return int(quota[0]) / int(period[0])
    return None


def _cgroups() -> list[tuple[str, str]]:
    """(controllers, path) for each line of /proc/self/cgroup."""
    try:
        with open("/proc/self/cgroup") as f:
            lines = f.read().splitlines()
    except OSError:
        return []
    return [(parts[1], parts[2]) for parts in (line.split(":", 2) for line in lines) if len(parts) == 3]


def _read_words(path: str) -> list[str] | None:
    try:
        with open(path) as f:
            return f.read().split() or None
    except (OSError, ValueError):
        return None


def ray_assigned_cpus() -> float | None:
    """CPUs Ray reserved for this actor (its ``num_cpus``); None outside a Ray worker or when 0."""
    try:
        import ray

        if not ray.is_initialized():
            return None
        return ray.get_runtime_context().get_assigned_resources().get("CPU") or None
    except Exception:  # noqa: BLE001 - not a worker, or an older Ray: no Ray limit to apply
        return None


class DecodeSlots:
    """At most ``n`` films in flight in this replica (thread-safe). Serve sends a replica at most
    ``n`` requests at once (its ``max_ongoing_requests``) and queues the rest; a slot may still be
    held for a moment by the decode thread of a request that has already answered (it cleans up
    first), so a new request waits for it (:meth:`acquire`). A slot may have several owners (the
    request and its decode thread); it is free again when the last one releases it."""

    def __init__(self, n: int):
        if n < 1:
            raise ValueError("need at least one decode slot")
        self.n = n
        self._in_use = 0
        self._lock = threading.Lock()

    @property
    def in_use(self) -> int:
        return self._in_use

    def try_acquire(self) -> "Slot | None":
        with self._lock:
            if self._in_use >= self.n:
                return None
            self._in_use += 1
        return Slot(self)

    async def acquire(self) -> "Slot":
        """A slot, once one is free. Polled, not notified: slots are freed on decode threads, and
        this wait is short (Serve admits no more requests than slots)."""
        while (slot := self.try_acquire()) is None:
            await asyncio.sleep(SLOT_POLL_S)
        return slot

    def _free(self) -> None:
        with self._lock:
            self._in_use -= 1


class Slot:
    """One taken decode slot; ``share`` adds an owner, ``release`` drops one (each owner once)."""

    def __init__(self, slots: DecodeSlots):
        self._slots, self._owners = slots, 1
        self._lock = threading.Lock()

    def share(self) -> "Slot":
        with self._lock:
            if self._owners == 0:
                raise RuntimeError("slot already released")
            self._owners += 1
        return self

    def release(self) -> None:
        with self._lock:
            self._owners -= 1
            last = self._owners == 0
        if last:
            self._slots._free()
