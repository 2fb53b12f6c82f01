"""The online step cost model: it learns the costs of the machine from measured steps; outliers do not."""

from __future__ import annotations

import random

from crosspool_sgl.core.step_cost import ModelCost, StepCostModel

MODELS = {"a": ModelCost(192.0, 192.0), "b": ModelCost(128.0, 256.0)}
TRUE_MS = (0.8, 0.6, 2e-5, 4e-8)  # per step, per model, per token x width, per q-k pair x width


def true_ms(model: StepCostModel, work) -> float:
    return sum(w * f for w, f in zip(TRUE_MS, model.features(work), strict=True))


def random_step(rng: random.Random) -> list[tuple[str, int, int]]:
    """Decodes of a few requests, sometimes a prefill chunk at some context (like a real trace)."""
    work = [(rng.choice("ab"), 1, rng.randint(20, 3000)) for _ in range(rng.randint(1, 12))]
    if rng.random() < 0.4:
        work.append((rng.choice("ab"), rng.choice((16, 64, 256, 1024)), rng.choice((0, 500, 4000, 10000))))
    return work


def test_learns_the_costs_of_the_machine_it_runs_on():
    rng = random.Random(0)
    model = StepCostModel(MODELS)
    for _ in range(400):
        work = random_step(rng)
        model.observe(work, true_ms(model, work) * rng.uniform(0.95, 1.05))  # 5% timing noise
    for _ in range(50):
        work = random_step(rng)
        assert abs(model.estimate_ms(work) - true_ms(model, work)) <= 0.15 * true_ms(model, work) + 0.3


def test_a_descheduled_step_does_not_teach_it_that_everything_is_slow():
    rng = random.Random(1)
    model = StepCostModel(MODELS)
    for i in range(400):
        work = random_step(rng)
        slow = 200.0 if i % 25 == 0 else 0.0  # the process lost its core for 200 ms now and then
        model.observe(work, true_ms(model, work) + slow)
    decode = [("a", 1, 500)] * 4
    assert model.estimate_ms(decode) < 2 * true_ms(model, decode)


def test_max_tokens_fills_a_budget_and_shrinks_with_context():
    model = StepCostModel(MODELS, warmup_steps=0)
    model.weights = list(TRUE_MS)
    n0 = model.max_tokens("a", 0, budget_ms=20.0, model_in_step=True)
    n10k = model.max_tokens("a", 10_000, budget_ms=20.0, model_in_step=True)
    assert n0 > n10k > 0
    assert model.extra_ms("a", n0, 0, True) <= 20.0 < model.extra_ms("a", n0 + 2, 0, True)
