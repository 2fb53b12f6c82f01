"""Lockstep forward (models/lockstep.py) against the per-model path, every architecture mixed.

All eleven tiny architectures share one runtime; requests of every model arrive at once with
prompts of different lengths and a small prefill chunk, so steps mix models, prefill chunks and
decodes. Greedy tokens must be identical with `lockstep=False` (each model's whole forward in
turn), and every lockstep step must make exactly as many `run_ffn` calls as its deepest model
has layers (the per-model path makes the sum over its models).
"""

from __future__ import annotations

import pytest

from crosspool_sgl.core.req import Req
from crosspool_sgl.layers import moe
from crosspool_sgl.models import decoder
from crosspool_sgl.runtime import build_runtime
from crosspool_sgl.sampling_params import SamplingParams
from crosspool_sgl.server_args import EngineArgs, KVPoolArgs, ModelSpec, SchedulerArgs
from tests.conftest import ALL_ARCHS as BASE_ARCHS

ARCHS = (*BASE_ARCHS, "deepseek_v2", "deepseek_v3", "glm4_moe", "gpt_oss")
PROMPTS = (
    [5, 17, 42, 9, 100, 3, 8, 61, 33, 12, 4, 90, 27, 71, 6, 15, 19, 2, 88],
    [7, 8],
    [250, 31, 64, 2, 11],
)


class StepRecorder:
    """Counts run_ffn calls per runner step, with what the step held."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, runner) -> None:
        self.calls = 0
        self.steps: list[dict] = []
        real_ffn, real_run = moe.run_ffn, runner.run

        def counted_ffn(*a, **k):
            self.calls += 1
            return real_ffn(*a, **k)

        def recorded_run(items):
            before = self.calls
            kinds = {"prefill" if r.num_uncached > 1 else "decode" for r, _ in items}
            out = real_run(items)
            layers = {r.model: runner.models[r.model].config.num_layers for r, _ in items}
            self.steps.append({"ffn_calls": self.calls - before, "layers": layers, "kinds": kinds})
            return out

        monkeypatch.setattr(moe, "run_ffn", counted_ffn)  # lockstep calls moe.run_ffn
        monkeypatch.setattr(decoder, "run_ffn", counted_ffn)  # DecoderModel.ffn's own binding
        monkeypatch.setattr(runner, "run", recorded_run)


def generate(rt, max_new_tokens: int = 6) -> dict[str, list[int]]:
    params = {"temperature": 0, "max_new_tokens": max_new_tokens, "ignore_eos": True}
    reqs = [
        Req(f"{n}-{j}", n, list(p), SamplingParams.from_dict(params))
        for n in ARCHS
        for j, p in enumerate(PROMPTS)
    ]
    for r in reqs:
        rt.scheduler.add_request(r)
    while rt.scheduler.has_work():
        rt.scheduler.step()
    rt.scheduler.flush_cache()
    return {r.rid: list(r.output_ids) for r in reqs}


@pytest.fixture(scope="module")
def runtime(tiny_models):
    args = EngineArgs(
        models=tuple(ModelSpec(n, str(tiny_models[n])) for n in ARCHS),
        kv_pool=KVPoolArgs(total_bytes=64 << 20),
        scheduler=SchedulerArgs(chunked_prefill_size=8, prefill_lane=False),  # one runner call per step
        show_progress=False,
    )
    return build_runtime(args)


@pytest.fixture(scope="module")
def per_model(runtime) -> tuple[dict[str, list[int]], list[dict]]:
    with pytest.MonkeyPatch.context() as mp:
        runtime.scheduler.runner.lockstep = False
        rec = StepRecorder(mp, runtime.scheduler.runner)
        try:
            return generate(runtime), rec.steps
        finally:
            runtime.scheduler.runner.lockstep = True


def test_lockstep_tokens_equal_the_per_model_path(runtime, per_model, monkeypatch):
    want, _ = per_model
    rec = StepRecorder(monkeypatch, runtime.scheduler.runner)
    assert runtime.scheduler.runner.lockstep
    got = generate(runtime)
    assert got == want
    assert max(len(s["layers"]) for s in rec.steps) >= 6  # many models share steps
    assert any(s["kinds"] == {"prefill", "decode"} for s in rec.steps)  # prefill chunks with decodes
    for s in rec.steps:  # one FFN call per layer index: the deepest model's layer count
        assert s["ffn_calls"] == max(s["layers"].values()), s


def test_per_model_path_calls_the_ffn_per_model_and_layer(per_model):
    """The old path's count is the sum: what the lockstep count above tells apart."""
    _, steps = per_model
    assert any(len(s["layers"]) > 1 for s in steps)
    for s in steps:
        assert s["ffn_calls"] == sum(s["layers"].values()), s
