"""The disaggregated pipeline in lockstep: one FFN request per layer carries several models.

Against colocated mode's per-model path (`lockstep=False`), all eleven architectures: with one
micro-batch a step sends exactly as many FFN requests as its deepest model has layers, each
request holding the rows of every model of the step that has that layer; with two micro-batches
the tokens stay the same.
"""

from __future__ import annotations

import pytest
from disagg_helpers import build, close, generate, make_reqs

from crosspool_sgl.server_args import DisaggArgs
from tests.models.test_lockstep import ARCHS


@pytest.fixture(scope="module")
def per_model_reference(tiny_models) -> dict[str, list[int]]:
    rt = build(tiny_models, ARCHS, DisaggArgs())
    rt.scheduler.runner.lockstep = False
    return generate(rt, make_reqs(ARCHS, max_new_tokens=5))


def record_traces(runner) -> list[tuple[dict[str, int], object]]:
    """(layers of each model in the step, the step's trace) for every runner step."""
    steps, real_run = [], runner.run

    def run(items):
        out = real_run(items)
        steps.append(
            ({r.model: runner.models[r.model].config.num_layers for r, _ in items}, runner.last_trace)
        )
        return out

    runner.run = run
    return steps


@pytest.mark.parametrize("micro_batches", [1, 2])
def test_lockstep_pipeline_equals_per_model_colocated(tiny_models, per_model_reference, micro_batches):
    rt = build(tiny_models, ARCHS, DisaggArgs(ffn_workers=1, micro_batches=micro_batches))
    try:
        steps = record_traces(rt.scheduler.runner)
        got = generate(rt, make_reqs(ARCHS, max_new_tokens=5))
    finally:
        close(rt)
    assert got == per_model_reference
    assert max(len(layers) for layers, _ in steps) >= 6
    if micro_batches == 1:
        for layers, trace in steps:
            assert len(trace.calls) == max(layers.values()), (layers, trace.format())
            # every model in one request (rows ordered by depth: models of one hidden size share a stream)
            assert sorted(trace.calls[0].model.split("+")) == sorted(layers)
    else:
        assert any(len(trace.calls) < sum(layers.values()) for layers, trace in steps)
