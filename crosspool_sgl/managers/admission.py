"""Queue bounds of the HTTP side: global, per model, and a fair share so a hot model cannot starve
cold ones of admission. Pure: counts in, a verdict out (the tokenizer manager applies it)."""

from __future__ import annotations

from dataclasses import dataclass

from crosspool_sgl.managers.errors import RequestError, overloaded

# Of its fair share (max_total / models), this fraction stays reserved for a model that has less
# queued: a flood of one model fills at most max_total minus the other models' reservations.
RESERVED_FRACTION = 0.25


@dataclass(frozen=True)
class QueueBounds:
    max_total: int = 4096  # requests in flight, all models
    max_per_model: int | None = None  # None: only the total and the fair share bound a model

    def check(self, model: str, num_new: int, in_flight: dict[str, int], models: list[str]) -> None:
        """Raise 400 for a request no bound can ever admit, 429 (Retry-After) for one that must wait."""
        per_model = self.max_per_model or self.max_total
        if num_new > min(self.max_total, per_model):
            raise RequestError(
                f"{num_new} generations in one request exceed the queue bound "
                f"{min(self.max_total, per_model)} (--max-pending-requests[-per-model])",
                param="n",
            )
        total, mine = sum(in_flight.values()), in_flight.get(model, 0)
        if total + num_new > self.max_total:
            raise overloaded(
                f"server overloaded: {total} requests in flight "
                f"(--max-pending-requests {self.max_total}); retry later"
            )
        if mine + num_new > per_model:
            raise overloaded(
                f"model {model!r} has {mine} requests in flight "
                f"(--max-pending-requests-per-model {per_model}); retry later"
            )
        if total + num_new > self.max_total - self.reserved_for_others(model, in_flight, models):
            raise overloaded(
                f"model {model!r} has {mine} requests in flight; the rest of the queue is kept for "
                "the other models' fair share; retry later"
            )

    def reserved_for_others(self, model: str, in_flight: dict[str, int], models: list[str]) -> int:
        """Slots kept free for the other models below their reservation (0 for a model within its own)."""
        reserve = int(self.max_total / max(len(models), 1) * RESERVED_FRACTION)
        if in_flight.get(model, 0) < reserve:
            return 0  # within its own reservation: only the total bounds it
        return sum(max(0, reserve - in_flight.get(m, 0)) for m in models if m != model)
