"""The KV planner: who may take arena chunks, and in which order memory is won back.

Pure bookkeeping: it reads counts (chunks owned per model, free chunks) and
answers questions; the pool and the scheduler act on the answers.

- floor: chunks guaranteed to a model; other models may not take the free
  chunks that a floor still needs.
- ceiling: the most a model may own (default: the whole arena).
- static partition (`--kv-partition static`): floor = ceiling = an equal share,
  kept for comparison — the deployment CrossPool replaces.
- SLO targets (ttft_ms, tbt_ms) order admission (earliest TTFT deadline first)
  and choose preemption victims (loosest TBT target, then least computed, then youngest).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass

logger = logging.getLogger(__name__)

DEFAULT_TTFT_MS = 10_000.0  # deadline used for models without a TTFT target


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

    def may_claim(self, model: str, owned: Mapping[str, int], free_chunks: int) -> bool:
        """May `model` take one more free chunk without breaking its ceiling or another model's floor?"""
        mine = owned.get(model, 0)
        if free_chunks <= 0 or mine + 1 > self.ceiling.get(model, self.num_chunks):
            return False
        owed_to_others = sum(max(0, f - owned.get(m, 0)) for m, f in self.floor.items() if m != model)
        return free_chunks - 1 >= owed_to_others

    def max_pages(self, model: str, page_bytes: int) -> int:
        """Pages a model can hold at most (at its ceiling); a request needing more can never run."""
        chunks = self.ceiling.get(model, self.num_chunks)
        return chunks * self.chunk_bytes // page_bytes - (1 if chunks > 1 else 0)

    def admission_deadline(self, model: str, arrival_time: float) -> float:
        ttft = self.policies.get(model, ModelKVPolicy()).ttft_ms or DEFAULT_TTFT_MS
        return arrival_time + ttft / 1000.0

    def victim_key(self, model: str, arrival_time: float, computed_tokens: int = 0) -> tuple[float, ...]:
        """Larger = preempted first: the loosest TBT target, then the least work lost (a retracted
        long prompt must be prefilled again: on the long-context trace, preempting the youngest
        re-prefilled 11k-token prompts 13 times), then the youngest request."""
        tbt = self.policies.get(model, ModelKVPolicy()).tbt_ms
        return (float("inf") if tbt is None else tbt, -computed_tokens, arrival_time)
