"""What a step will cost: a linear model of step time, fitted online from the steps already run.

Why: a step that carries decodes must stay within a time budget, and a prefill chunk's cost
depends on its context, not only on its length — attention reads every cached token. Measured on
the tiny qwen3_moe (one thread, CPU): a 256-token chunk costs 6 ms at context 0 and 124 ms at
context 10k. A token budget cannot bound such a step; this model can.

A step's features (per model in the step, summed):

    f_step  = 1                                   fixed cost of a step (packing, sampling, sync)
    f_model = number of model forwards            per-model launch/Python cost
    f_tok   = new tokens x linear width           projections, FFN, norms
    f_attn  = sum_i new_i x (ctx_i + new_i / 2) x attention width   query-key pairs

and time ~= w . f with w >= 0, refit by exponentially-forgotten least squares as steps complete,
so the model follows the machine it runs on (CPU, GPU, a busy neighbour). Before any observation
the prior (a deliberately slow CPU) keeps the first steps small rather than large.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch

NUM_FEATURES = 4
# Prior weights in ms per unit of each feature: roughly the tiny models on one CPU core.
_PRIOR_MS = (1.0, 1.0, 2e-4, 3e-8)


@dataclass(frozen=True)
class ModelCost:
    """Per-model scale of the work features (so one set of weights covers models of any size)."""

    linear_width: float  # ~ layers x hidden: cost of one token through the projections and FFN
    attention_width: float  # ~ layers x query heads x head dim: cost of one query-key pair

    @classmethod
    def from_config(cls, num_layers: int, hidden_size: int, num_heads: int, head_dim: int) -> ModelCost:
        return cls(float(num_layers * hidden_size), float(num_layers * num_heads * head_dim))


class StepCostModel:
    """Predicts a step's milliseconds from its (model, new tokens, context) work items."""

    def __init__(
        self,
        models: Mapping[str, ModelCost],
        forgetting: float = 0.98,
        refit_every: int = 8,
        prior_weight: float = 0.05,
        warmup_steps: int = 8,
    ) -> None:
        self.models = dict(models)
        self.forgetting = forgetting
        self.refit_every = refit_every
        self.weights = list(_PRIOR_MS)
        self._scale = [1.0] * NUM_FEATURES  # feature normalisation for a well-conditioned solve
        self._gram = torch.zeros(NUM_FEATURES, NUM_FEATURES, dtype=torch.float64)
        self._rhs = torch.zeros(NUM_FEATURES, dtype=torch.float64)
        self._prior_weight = prior_weight
        self._pending = 0
        self._warmup = warmup_steps  # first steps pay one-off costs (lazy init, allocator growth)
        self.num_observed = 0

    # ---- features -----------------------------------------------------------------------
    def features(self, work: Iterable[tuple[str, int, int]]) -> list[float]:
        """Features of a step from (model, new tokens, cached context before them) items."""
        f = [1.0, 0.0, 0.0, 0.0]
        seen: set[str] = set()
        for model, new, ctx in work:
            c = self.models[model]
            if model not in seen:
                seen.add(model)
                f[1] += 1.0
            f[2] += new * c.linear_width
            f[3] += new * (ctx + new / 2) * c.attention_width
        return f

    def estimate_ms(self, work: Iterable[tuple[str, int, int]]) -> float:
        return sum(w * x for w, x in zip(self.weights, self.features(work), strict=True))

    def extra_ms(self, model: str, new: int, ctx: int, model_in_step: bool) -> float:
        """What adding one item to a step costs on top of what the step already holds."""
        c = self.models[model]
        w = self.weights
        return (
            (0.0 if model_in_step else w[1])
            + w[2] * new * c.linear_width
            + w[3] * new * (ctx + new / 2) * c.attention_width
        )

    def max_tokens(self, model: str, ctx: int, budget_ms: float, model_in_step: bool) -> int:
        """Most new tokens of one sequence at context `ctx` that fit in `budget_ms` (may be 0)."""
        c = self.models[model]
        w = self.weights
        left = budget_ms - (0.0 if model_in_step else w[1])
        if left <= 0:
            return 0
        # a/2 n^2 + b n - left <= 0, with a = w_attn * width, b = w_tok * lin + w_attn * width * ctx
        a = w[3] * c.attention_width
        b = w[2] * c.linear_width + a * ctx
        if a <= 0:
            return int(left / b) if b > 0 else 1 << 30
        disc = b * b + 2 * a * left
        return max(int((disc**0.5 - b) / a), 0)

    # ---- learning -----------------------------------------------------------------------
    def observe(self, work: Iterable[tuple[str, int, int]], elapsed_ms: float) -> None:
        """Record one step's measured time; refit the weights every few steps.

        A step far slower than predicted (the process was descheduled, a page fault storm) is
        clipped so one outlier cannot teach the model that every token is expensive."""
        if self._warmup > 0:
            self._warmup -= 1
            return
        work = list(work)
        if self.num_observed >= self.refit_every:
            elapsed_ms = min(elapsed_ms, 4 * self.estimate_ms(work) + 20.0)
        f = torch.tensor(self.features(work), dtype=torch.float64)
        self._gram.mul_(self.forgetting).add_(torch.outer(f, f))
        self._rhs.mul_(self.forgetting).add_(f * elapsed_ms)
        self.num_observed += 1
        self._pending += 1
        if self._pending >= self.refit_every:
            self._pending = 0
            self._refit()

    def _refit(self) -> None:
        """Ridge regression towards the prior, then non-negative weights (a clamp, cheap and enough)."""
        diag = self._gram.diagonal().clamp_min(1e-30)
        scale = diag.rsqrt()  # normalise features so the ridge term treats them alike
        gram = self._gram * scale[:, None] * scale[None, :]
        rhs = self._rhs * scale
        prior = torch.tensor(self.weights, dtype=torch.float64) / scale
        lam = self._prior_weight
        eye = torch.eye(NUM_FEATURES, dtype=torch.float64)
        try:
            sol = torch.linalg.solve(gram + lam * eye, rhs + lam * prior)
        except RuntimeError:  # singular (e.g. only one kind of step seen yet): keep the weights
            return
        self.weights = [max(float(v), 0.0) for v in sol * scale]
