"""Background sampling of a running setup: RSS of its process trees and KV pool occupancy per model.

A thread (not the replay's event loop), so a slow probe never delays a request's send time. One
sample a second: each crosspool probe is a scheduler round trip, and the machine has two cores.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Protocol


class Probed(Protocol):
    def rss_bytes(self) -> int: ...

    def kv_used_bytes(self) -> dict[str, float]: ...


@dataclass
class Samples:
    t_s: list[float] = field(default_factory=list)  # monotonic clock, as the client's records
    rss_bytes: list[int] = field(default_factory=list)
    kv_used: list[dict[str, float]] = field(default_factory=list)

    @property
    def peak_rss(self) -> int:
        return max(self.rss_bytes, default=0)

    def relative(self, t0: float) -> dict[str, list]:
        """JSON-ready series with times relative to the trace start."""
        return {
            "t_s": [round(t - t0, 3) for t in self.t_s],
            "rss_bytes": self.rss_bytes,
            "kv_used_bytes": self.kv_used,
        }


class Sampler:
    def __init__(self, target: Probed, interval_s: float = 1.0) -> None:
        self.target, self.interval_s = target, interval_s
        self.samples = Samples()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-sampler", daemon=True)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        while not self._stop.is_set():
            start = time.monotonic()
            rss = self.target.rss_bytes()
            kv = self.target.kv_used_bytes()
            self.samples.t_s.append(start)
            self.samples.rss_bytes.append(rss)
            self.samples.kv_used.append(kv)
            self._stop.wait(max(0.0, self.interval_s - (time.monotonic() - start)))
