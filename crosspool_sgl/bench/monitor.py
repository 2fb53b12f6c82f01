"""What a running setup costs the machine: RSS, KV occupancy, CPU of its process trees and of each core.

A sampler thread (not the replay's event loop), so a slow probe never delays a request's send time. One
sample a second: each crosspool probe is a scheduler round trip, and the machine has few cores.
CPU is measured two ways, because either alone can mislead on a shared machine: the CPU seconds of a
deployment's own process trees over a replay (cores it used, whoever else ran), and machine-wide
per-core busy fractions (what the whole machine, other tenants included, was doing meanwhile).
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

# psutil's Linux cpu_times fields that mean "not busy"; guest time is already counted in user.
IDLE_FIELDS = ("idle", "iowait")
NOT_SUMMED = ("guest", "guest_nice")


class Probed(Protocol):
    def rss_bytes(self) -> int: ...

    def kv_used_bytes(self) -> dict[str, float]: ...


def tree_sum(pid: int, measure: Callable[[Any], float]) -> float:
    """`measure(process)` summed over a process and its live descendants (0 once it is gone)."""
    import psutil

    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0.0
    total = 0.0
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            total += measure(p)
    return total


def tree_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process and its live descendants."""
    return tree_sum(pid, lambda p: sum(p.cpu_times()[:2]))


def tree_threads(pid: int) -> int:
    """OS threads of a process and its live descendants."""
    return int(tree_sum(pid, lambda p: p.num_threads()))


def tree_rss(pid: int) -> int:
    """Resident bytes of a process and all its descendants."""
    return int(tree_sum(pid, lambda p: p.memory_info().rss))


def core_times() -> list[tuple[float, float]]:
    """(busy seconds, total seconds) of every core since boot."""
    import psutil

    out = []
    for t in psutil.cpu_times(percpu=True):
        d = t._asdict()
        total = sum(v for k, v in d.items() if k not in NOT_SUMMED)
        out.append((total - sum(d.get(k, 0.0) for k in IDLE_FIELDS), total))
    return out


def busy_fractions(
    before: Sequence[tuple[float, float]], after: Sequence[tuple[float, float]]
) -> list[float]:
    """Per-core busy fraction (0..1) between two `core_times()` snapshots."""
    out = []
    for (b0, t0), (b1, t1) in zip(before, after, strict=True):
        out.append(min(1.0, max(0.0, (b1 - b0) / (t1 - t0))) if t1 > t0 else 0.0)
    return out


def cores_used(cpu_s_before: float, cpu_s_after: float, wall_s: float) -> float | None:
    """CPU seconds over wall seconds: how many cores a process tree kept busy on average."""
    return None if wall_s <= 0 else max(0.0, cpu_s_after - cpu_s_before) / wall_s


@dataclass
class Samples:
    t_s: list[float] = field(default_factory=list)  # monotonic clock, as the client's records
    rss_bytes: list[int] = field(default_factory=list)
    kv_used: list[dict[str, float]] = field(default_factory=list)
    percore_pct: list[list[float]] = field(default_factory=list)  # machine-wide, since the last sample

    @property
    def peak_rss(self) -> int:
        return max(self.rss_bytes, default=0)

    def peak_percore_pct(self) -> list[float]:
        """The busiest one-second sample of each core."""
        return [max(col) for col in zip(*self.percore_pct, strict=True)] if self.percore_pct else []

    def relative(self, t0: float) -> dict[str, list]:
        """JSON-ready series with times relative to the trace start."""
        return {
            "t_s": [round(t - t0, 3) for t in self.t_s],
            "rss_bytes": self.rss_bytes,
            "kv_used_bytes": self.kv_used,
            "percore_pct": self.percore_pct,
        }


class Sampler:
    def __init__(self, target: Probed, interval_s: float = 1.0) -> None:
        self.target, self.interval_s = target, interval_s
        self.samples = Samples()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-sampler", daemon=True)

    def __enter__(self) -> Sampler:
        import psutil

        psutil.cpu_percent(percpu=True)  # primes the counters: the first sample covers one interval
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        import psutil

        while not self._stop.wait(self.interval_s):
            start = time.monotonic()
            self.samples.percore_pct.append(psutil.cpu_percent(percpu=True))
            self.samples.t_s.append(start)
            self.samples.rss_bytes.append(self.target.rss_bytes())
            self.samples.kv_used.append(self.target.kv_used_bytes())
