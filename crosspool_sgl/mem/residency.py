"""Which models' experts live in the weights pool: pure bookkeeping, no tensors.

The policy reads a snapshot of every model (where its experts are, when it was
last used, its keep-alive) and the set of models with requests, and returns a
`ResidencyPlan`: models to evict to host memory and models to page back in.
Moving the bytes is `WeightStore`'s job; doing both between scheduler steps is
`ResidencyManager`'s. Keeping them apart makes the policy testable without a
model (as SGLang's `layers/moe/paged_experts/residency.py` does).

Rules, in order:
1. a resident model with no requests whose keep-alive has expired is evicted;
2. each model with requests that is not resident is paged in, first come first
   served, if it fits in ``max_resident_bytes`` after evicting idle resident
   models least recently used first; a model that does not fit waits (busy
   models are never evicted, so nothing thrashes) and so do the ones behind it;
3. a model larger than ``max_resident_bytes`` can never be served: that is an
   error at load time (`check_fits`), not a request that waits forever.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field


class Location(enum.Enum):
    RESIDENT = "resident"  # every expert in the arena; the model may run
    LOADING = "loading"  # arena blocks taken, bytes on their way in
    HOST = "host"  # every expert in host memory (pinned on CUDA)


class ModelTooLargeError(ValueError):
    """A model's experts alone exceed the weights pool's bound."""


@dataclass(frozen=True)
class ModelResidency:
    """One model as the policy sees it."""

    name: str
    num_bytes: int  # all of its experts
    location: Location
    last_used: float  # monotonic seconds; the last time it had requests
    keep_alive_s: float | None  # None: never evicted for being idle (only for room)


@dataclass(frozen=True)
class ResidencyPlan:
    evict: list[str] = field(default_factory=list)  # in this order, before any page-in
    page_in: list[str] = field(default_factory=list)  # start (or keep) loading these
    reasons: dict[str, str] = field(default_factory=dict)  # model -> why (for the log line)

    @property
    def empty(self) -> bool:
        return not self.evict and not self.page_in


def check_fits(name: str, num_bytes: int, max_resident_bytes: int | None) -> None:
    """Raise ModelTooLargeError for a model that could never be resident."""
    if max_resident_bytes is not None and num_bytes > max_resident_bytes:
        raise ModelTooLargeError(
            f"model {name!r} needs {num_bytes / 2**20:.2f} MiB of expert/FFN weights, more than "
            f"--max-resident-bytes ({max_resident_bytes / 2**20:.2f} MiB): it could never run"
        )


class ResidencyPolicy:
    """Keep-alive per model, LRU across models, a byte budget for the arena."""

    def __init__(self, max_resident_bytes: int | None) -> None:
        self.max_resident_bytes = max_resident_bytes

    def plan(self, models: Mapping[str, ModelResidency], active: Iterable[str], now: float) -> ResidencyPlan:
        """``active``: models with waiting or running requests, in first-come order."""
        active = [m for m in dict.fromkeys(active) if m in models]
        busy = set(active)
        plan = ResidencyPlan()
        for m in models.values():
            if m.location is Location.RESIDENT and m.name not in busy and self._expired(m, now):
                plan.evict.append(m.name)
                plan.reasons[m.name] = f"keep-alive {m.keep_alive_s:g}s expired"
        held = sum(m.num_bytes for m in models.values() if m.location is not Location.HOST)
        held -= sum(models[n].num_bytes for n in plan.evict)
        for name in active:
            want = models[name]
            if want.location is Location.LOADING:
                plan.page_in.append(name)
                continue
            if want.location is Location.RESIDENT:
                continue
            victims = self._make_room(models, busy, plan.evict, want.num_bytes, held)
            if victims is None:
                break  # first come first served: later models wait behind this one
            for v in victims:
                plan.evict.append(v)
                plan.reasons[v] = f"LRU, room for {name}"
                held -= models[v].num_bytes
            plan.page_in.append(name)
            held += want.num_bytes
        for m in models.values():  # a page-in whose requests went away still finishes: its room is taken
            if m.location is Location.LOADING and m.name not in plan.page_in:
                plan.page_in.append(m.name)
        return plan

    def victims_for(
        self, models: Mapping[str, ModelResidency], busy: set[str], num_bytes: int
    ) -> list[str] | None:
        """Idle resident models to evict (LRU first) so ``num_bytes`` more fit; None if impossible."""
        held = sum(m.num_bytes for m in models.values() if m.location is not Location.HOST)
        return self._make_room(models, busy, [], num_bytes, held)

    def _make_room(
        self,
        models: Mapping[str, ModelResidency],
        busy: set[str],
        already: list[str],
        num_bytes: int,
        held: int,
    ) -> list[str] | None:
        if self.max_resident_bytes is None or held + num_bytes <= self.max_resident_bytes:
            return []
        idle = sorted(
            (
                m
                for m in models.values()
                if m.location is Location.RESIDENT and m.name not in busy and m.name not in already
            ),
            key=lambda m: m.last_used,
        )
        victims = []
        for m in idle:
            if held + num_bytes <= self.max_resident_bytes:
                break
            victims.append(m.name)
            held -= m.num_bytes
        return victims if held + num_bytes <= self.max_resident_bytes else None

    @staticmethod
    def _expired(m: ModelResidency, now: float) -> bool:
        return m.keep_alive_s is not None and now - m.last_used >= m.keep_alive_s
