"""The KV planner: who may take arena chunks, and in which order memory is won back.

Pure bookkeeping: it reads counts (chunks owned per model, free chunks, each model's
current demand) and answers questions; the pool and the scheduler act on the answers.

- floor: chunks guaranteed to a model; other models may not take the free chunks that
  a floor still needs. Two kinds add up: the static `kv_floor` an operator sets, and a
  *working set* that follows the model's demand (see `observe_demand`).
- working set: the most chunks a model's requests held or asked for within the last
  `working_set_window_s` seconds, capped at an equal share of the pool among the models
  that have one. It rises at once and falls only when the window has passed (hysteresis),
  so a warm model whose requests come and go keeps the memory its next request needs
  while another model's long prompt waits (the long-context trace: a 12k-token prefill
  took the pool chunk by chunk while the warm model's requests queued behind it).
- large requests (see `SchedulePolicy.large`) are not a model's working set: their demand is
  left out of it, and the chunks they hold do not count as covering it (`large_held`), so a
  model running one 9k-token prompt still keeps room for its own short requests.
- privileged claims (an *overdue* request, see `SchedulePolicy`) may take working-set
  chunks but never a static floor: that is the aging that keeps a long request from
  starving forever behind other models' steady traffic.
- ceiling: the most a model may own (default: the whole arena).
- static partition (`--kv-partition static`): floor = ceiling = an equal share,
  kept for comparison — the deployment CrossPool replaces.
- SLO targets (ttft_ms, tbt_ms) order admission (earliest TTFT deadline first, a
  prompt's prefill time added so short prompts go first) and choose preemption victims
  (loosest TBT target, then least computed, then youngest).
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass

logger = logging.getLogger(__name__)

DEFAULT_TTFT_MS = 1_000.0  # TTFT target of models without one: after it a request counts as overdue
DEFAULT_WORKING_SET_WINDOW_S = 10.0
# How much a prompt's own prefill time pushes its deadline back: a 12k-token prompt (seconds of
# prefill) waits behind short ones that arrive after it, yet it ages past them in bounded time.
PREFILL_TIME_WEIGHT = 4.0
MAX_PREFILL_DELAY_S = 30.0  # bound on that push: every request is overdue within TTFT target + 30 s


@dataclass(frozen=True)
class ModelKVPolicy:
    floor_bytes: int = 0
    ceiling_bytes: int | None = None  # None: the whole arena
    ttft_ms: float | None = None
    tbt_ms: float | None = None


class KVPlanner:
    def __init__(
        self,
        chunk_bytes: int,
        num_chunks: int,
        policies: Mapping[str, ModelKVPolicy],
        static_partition: bool = False,
        working_set_window_s: float = DEFAULT_WORKING_SET_WINDOW_S,
    ) -> None:
        self.chunk_bytes = chunk_bytes
        self.num_chunks = num_chunks
        self.policies = dict(policies)
        self.static_partition = static_partition
        share = num_chunks // max(len(policies), 1)
        self.floor: dict[str, int] = {}
        self.ceiling: dict[str, int] = {}
        for model, p in policies.items():
            if static_partition:
                self.floor[model] = self.ceiling[model] = share
                continue
            self.floor[model] = -(-p.floor_bytes // chunk_bytes)
            ceiling = num_chunks if p.ceiling_bytes is None else p.ceiling_bytes // chunk_bytes
            self.ceiling[model] = min(num_chunks, ceiling)
            if self.ceiling[model] < self.floor[model]:
                raise ValueError(f"model {model!r}: KV ceiling is below its floor")
        if sum(self.floor.values()) > num_chunks:
            raise ValueError(
                f"KV floors add up to {sum(self.floor.values()) * chunk_bytes} bytes, "
                f"more than the pool's {num_chunks * chunk_bytes}"
            )
        self.working_set_window_s = working_set_window_s
        self.working_set: dict[str, int] = {}  # chunks, per model with recent demand
        self._demand_peaks: dict[str, deque[tuple[float, int]]] = {}  # model -> (time, chunks), max-queue
        self.large_held: dict[str, int] = {}  # chunks held by each model's large requests, now

    # ---- working sets ---------------------------------------------------------------------
    def observe_demand(
        self, demand_chunks: Mapping[str, int], now: float, large_held: Mapping[str, int] | None = None
    ) -> None:
        """Record each model's ordinary demand now (chunks its requests hold or need next) and the
        chunks its large requests hold (a model listed there with 0 has large requests waiting: it
        counts among the models sharing the pool); refresh working sets.

        A sliding-window maximum per model (a monotone deque: O(1) amortised per call and model).
        """
        if self.static_partition:
            return
        self.large_held = dict(large_held or {})
        horizon = now - self.working_set_window_s
        for model in self.policies:
            peaks = self._demand_peaks.setdefault(model, deque())
            d = demand_chunks.get(model, 0)
            while peaks and peaks[-1][1] <= d:
                peaks.pop()
            if d > 0:
                peaks.append((now, d))
            while peaks and peaks[0][0] < horizon:
                peaks.popleft()
        active = {m: p[0][1] for m, p in self._demand_peaks.items() if p}
        share = self.num_chunks // max(len(active.keys() | self.large_held.keys()), 1)
        self.working_set = {m: min(d, share) for m, d in active.items()}

    def may_claim(
        self, model: str, owned: Mapping[str, int], free_chunks: int, privileged: bool = False
    ) -> bool:
        """May `model` take one more free chunk without breaking its ceiling or another model's floor?

        Ordinary claims leave every other model its floor and working set; privileged ones (an
        overdue request) only the static floors.
        """
        mine = owned.get(model, 0)
        if free_chunks <= 0 or mine + 1 > self.ceiling.get(model, self.num_chunks):
            return False
        owed_to_others = 0
        for m in self.policies:
            if m != model:
                have = owned.get(m, 0)
                owed = max(0, self.floor.get(m, 0) - have)
                if not privileged:  # chunks a large request holds do not cover the working set
                    owed = max(owed, self.working_set.get(m, 0) - max(0, have - self.large_held.get(m, 0)))
                owed_to_others += owed
        return free_chunks - 1 >= owed_to_others

    def max_pages(self, model: str, page_bytes: int) -> int:
        """Pages a model can hold at most (at its ceiling); a request needing more can never run."""
        chunks = self.ceiling.get(model, self.num_chunks)
        return chunks * self.chunk_bytes // page_bytes - (1 if chunks > 1 else 0)

    def admission_deadline(self, model: str, arrival_time: float, prefill_s: float = 0.0) -> float:
        """When a request becomes overdue: its arrival, its model's TTFT target, and its own
        prefill time (weighted), so among similar deadlines the short prompt goes first and a
        long one still ages past later arrivals."""
        ttft = self.policies.get(model, ModelKVPolicy()).ttft_ms or DEFAULT_TTFT_MS
        return arrival_time + ttft / 1000.0 + min(PREFILL_TIME_WEIGHT * prefill_s, MAX_PREFILL_DELAY_S)

    def victim_key(self, model: str, arrival_time: float, computed_tokens: int = 0) -> tuple[float, ...]:
        """Larger = preempted first: the loosest TBT target, then the least work lost (a retracted
        long prompt must be prefilled again: on the long-context trace, preempting the youngest
        re-prefilled 11k-token prompts 13 times), then the youngest request."""
        tbt = self.policies.get(model, ModelKVPolicy()).tbt_ms
        return (float("inf") if tbt is None else tbt, -computed_tokens, arrival_time)
