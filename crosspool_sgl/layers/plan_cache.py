"""Index tensors and layouts that depend only on a step's *structure*, kept across steps.

A decode step repeats the structure of the last one (the same models, rows per model, page
counts), so the index tensors the lockstep forward's shared ops build from it — the shared K/V
rows (layers/attention/shared_kv.py), the stacked rope rows (layers/rotary.py), the route stack
(models/route_stack.py), the residual stream's eps column — are built once and looked up by a
key that spells the structure. The cache belongs to whoever runs the steps (the model runner
owns one), not to the modules: two runtimes in one process keep their own, and it dies with its
runner. Bounded (least recently used dropped); thread-safe (the prefill lane steps from a second
thread).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import TypeVar

T = TypeVar("T")


class PlanCache:
    """key -> a structure's plan, built by `get`'s `build` on a miss."""

    def __init__(self, max_entries: int = 256) -> None:
        self.max_entries = max_entries
        self._plans: OrderedDict[Hashable, object] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: Hashable, build: Callable[[], T]) -> T:
        with self._lock:
            plan = self._plans.get(key)
            if plan is not None:
                self._plans.move_to_end(key)
                return plan  # type: ignore[return-value]
        plan = build()  # outside the lock: a racing builder makes the same plan
        with self._lock:
            self._plans[key] = plan
            while len(self._plans) > self.max_entries:
                self._plans.popitem(last=False)
        return plan

    def __len__(self) -> int:
        return len(self._plans)


def plan(cache: PlanCache | None, key: Hashable, build: Callable[[], T]) -> T:
    """`cache.get(key, build)`, or just `build()` without a cache (a one-off batch)."""
    return build() if cache is None else cache.get(key, build)
