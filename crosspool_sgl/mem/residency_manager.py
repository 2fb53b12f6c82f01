"""Applies the residency policy between scheduler steps: evicts, pages in, keeps the counters.

The scheduler (or its event loop) calls `poll(active)` once per step with the
models that have requests, in first-come order; it returns the models whose
experts are all resident, i.e. whose requests may run this step. A model
being paged in is not in that set, so its requests wait while other models
keep decoding. `ensure_resident(models)` is the blocking fallback the model
runner calls before a forward, so a request can never run on missing experts.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from crosspool_sgl.mem.residency import (
    Location,
    ModelResidency,
    ResidencyPolicy,
    check_fits,
)
from crosspool_sgl.mem.weight_pool import WeightPool, WeightPoolFullError
from crosspool_sgl.mem.weight_store import WeightStore

logger = logging.getLogger(__name__)

_MIB = 2**20


@dataclass
class _ModelState:
    location: Location
    last_used: float
    since: float  # when it entered this location (page-in start, eviction time)
    num_evictions: int = 0
    num_reloads: int = 0


def _finite(x: float | None) -> float | None:
    """JSON has no infinity: 'never' is reported as None."""
    return None if x is None or math.isinf(x) else x


def models_with_requests(*queues: Iterable) -> list[str]:
    """Models of the requests in ``queues`` (objects with ``.model``), first come first, no repeats."""
    return list(dict.fromkeys(r.model for q in queues for r in q))


class ResidencyManager:
    def __init__(
        self,
        pool: WeightPool,
        store: WeightStore,
        policy: ResidencyPolicy,
        keep_alive_s: Mapping[str, float | None],
        page_in_bytes_per_step: int | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.pool = pool
        self.store = store
        self.policy = policy
        self.keep_alive_s = dict(keep_alive_s)
        self.page_in_bytes_per_step = page_in_bytes_per_step
        self.clock = clock
        self.states: dict[str, _ModelState] = {}

    # ---- load time ------------------------------------------------------------------------
    def before_load(self, name: str, num_bytes: int) -> None:
        """Check ``name`` can ever be resident, then evict LRU models so it fits the arena now."""
        check_fits(name, num_bytes, self.policy.max_resident_bytes)
        victims = self.policy.victims_for(self.views(), set(), num_bytes)
        assert victims is not None  # nothing is busy at load time, and the model fits alone
        for v in victims:
            self.evict(v, f"LRU, room to load {name}")

    def after_load(self, name: str) -> None:
        now = self.clock()
        self.states[name] = _ModelState(Location.RESIDENT, now, now)

    # ---- the hooks ------------------------------------------------------------------------
    def poll(self, active: Iterable[str]) -> set[str]:
        """Non-blocking step: keep-alive expiry, LRU eviction, page-ins; returns the ready models."""
        now = self.clock()
        active = list(active)
        for m in active:
            if m in self.states:
                self.states[m].last_used = now
        plan = self.policy.plan(self.views(), active, now)
        for m in plan.evict:
            self.evict(m, plan.reasons.get(m, ""))
        for m in plan.page_in:
            try:
                self._page_in(m, self.page_in_bytes_per_step)
            except WeightPoolFullError as e:  # the policy's byte count should prevent this; retry later
                logger.warning("weights reload %s deferred: %s", m, e)
        return self.ready_models()

    def ensure_resident(self, models: Iterable[str], wait: bool = True) -> set[str]:
        """Make ``models`` resident (blocking when ``wait``); returns those of them that are ready.

        Raises WeightPoolFullError when they can't all be resident at once.
        """
        models = [m for m in dict.fromkeys(models) if m in self.states]
        now = self.clock()
        for m in models:
            self.states[m].last_used = now
        for m in models:
            if self.states[m].location is Location.HOST:
                victims = self.policy.victims_for(self.views(), set(models), self.pool.model_bytes[m])
                if victims is None:
                    raise WeightPoolFullError(
                        f"models {models} can't be resident together under --max-resident-bytes "
                        f"({self.policy.max_resident_bytes} bytes)"
                    )
                for v in victims:
                    self.evict(v, f"LRU, room for {m}")
            if self.states[m].location is not Location.RESIDENT:
                self._page_in(m, None if wait else self.page_in_bytes_per_step, wait=wait)
        return {m for m in models if self.states[m].location is Location.RESIDENT}

    def ready_models(self) -> set[str]:
        return {m for m, s in self.states.items() if s.location is Location.RESIDENT}

    # ---- moving -----------------------------------------------------------------------------
    def evict(self, model: str, reason: str = "") -> None:
        """Move ``model``'s experts to host memory (a half-loaded model just drops its blocks)."""
        state = self.states[model]
        if state.location is Location.HOST:
            return
        if state.location is Location.LOADING:
            self.store.cancel(model)
        else:
            t0 = time.perf_counter()
            num_bytes = self.store.evict(model)
            logger.info(
                "weights evict %s: %.2f MiB to %s host memory in %.1f ms, idle %.1f s (%s)",
                model,
                num_bytes / _MIB,
                "pinned" if self.store.pin else "pageable",
                (time.perf_counter() - t0) * 1e3,
                self.clock() - state.last_used,
                reason or "requested",
            )
            state.num_evictions += 1
        state.location, state.since = Location.HOST, self.clock()

    def _page_in(self, model: str, max_bytes: int | None, wait: bool = False) -> None:
        state = self.states[model]
        if state.location is Location.HOST:
            self.store.begin_page_in(model)
            state.location, state.since = Location.LOADING, self.clock()
        if wait:
            self.store.wait(model)
            done = model not in self.store.jobs
        else:
            done = self.store.advance(model, max_bytes)
        if not done:
            return
        state.location = Location.RESIDENT
        state.num_reloads += 1
        logger.info(
            "weights reload %s: %.2f MiB paged back in %.1f ms (%s)",
            model,
            self.pool.model_bytes[model] / _MIB,
            (self.clock() - state.since) * 1e3,
            "blocking" if wait else "between steps",
        )
        state.since = self.clock()

    # ---- reading ----------------------------------------------------------------------------
    def views(self) -> dict[str, ModelResidency]:
        return {
            m: ModelResidency(m, self.pool.model_bytes[m], s.location, s.last_used, self.keep_alive_s.get(m))
            for m, s in self.states.items()
        }

    def snapshot(self) -> dict:
        """Per-model residency for /get_server_info, /metrics and poolstat."""
        now = self.clock()
        return {
            "max_resident_bytes": self.policy.max_resident_bytes,
            "capacity_bytes": self.pool.capacity_bytes,
            "host_bytes_total": self.store.host_bytes(),
            "pinned_host_bytes": self.store.pinned_bytes,
            "resident_bytes": dict(self.pool.model_resident_bytes),
            "host_bytes": {m: self.store.host_bytes(m) for m in self.states},
            "location": {m: s.location.value for m, s in self.states.items()},
            "idle_s": {m: round(now - s.last_used, 3) for m, s in self.states.items()},
            "keep_alive_s": {m: _finite(self.keep_alive_s.get(m)) for m in self.states},
            "evictions": {m: s.num_evictions for m, s in self.states.items()},
            "reloads": {m: s.num_reloads for m, s in self.states.items()},
        }
