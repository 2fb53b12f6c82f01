"""The prefill lane: a long prompt's chunks run on a second thread while other requests decode.

Same greedy tokens as the engine without a lane, pages back to zero, and an abort that lands while
the lane's chunk runs frees that request's pages only after the chunk is done.
"""

from __future__ import annotations

import time

import pytest

from crosspool_sgl import Engine
from crosspool_sgl.core.req import Req
from crosspool_sgl.sampling_params import SamplingParams

MODELS = ("qwen3_moe", "mixtral")
GREEDY = {"temperature": 0, "max_new_tokens": 24, "ignore_eos": True}


def _engine(tiny_models, lane: bool) -> Engine:
    return Engine(
        models={m: str(tiny_models[m]) for m in MODELS},
        show_progress=False,
        kv_pool_bytes=64 << 20,
        prefill_lane=lane,
    )


def _workload() -> tuple[list[list[int]], list[str]]:
    short = [[(5 * i + j) % 400 + 20 for j in range(30 + i)] for i in range(6)]
    long = [[(7 * j) % 450 + 17 for j in range(1800)]]
    return short + long, [MODELS[i % 2] for i in range(6)] + ["qwen3_moe"]


@pytest.fixture(scope="module")
def outputs(tiny_models):
    prompts, models = _workload()
    out = {}
    for lane in (False, True):
        eng = _engine(tiny_models, lane)
        res = eng.generate(input_ids=prompts, model=models, sampling_params=GREEDY)
        out[lane] = {
            "tokens": [r["output_ids"] for r in res],
            "lane_chunks": eng.scheduler.lane.num_chunks if eng.scheduler.lane else 0,
            "pages_after": eng.scheduler.request_pages(),
        }
        eng.shutdown()
    return out


def test_lane_runs_long_prefills(outputs):
    assert outputs[False]["lane_chunks"] == 0
    assert outputs[True]["lane_chunks"] > 0


def test_same_greedy_tokens_with_and_without_the_lane(outputs):
    assert outputs[True]["tokens"] == outputs[False]["tokens"]


def test_pages_return_to_zero(outputs):
    assert outputs[True]["pages_after"] == outputs[False]["pages_after"] == 0


def test_abort_during_a_lane_chunk_frees_pages_after_it(tiny_models):
    eng = _engine(tiny_models, True)
    sched = eng.scheduler
    for i in range(4):  # decodes, so the long prompt goes to the lane
        sched.add_request(Req(f"d{i}", "mixtral", [30 + i] * 20, SamplingParams(max_new_tokens=200)))
    for _ in range(3):
        sched.step()
    sched.add_request(Req("long", "qwen3_moe", [40] * 3000, SamplingParams(max_new_tokens=4)))
    deadline = time.monotonic() + 60
    while not sched.lane.busy:
        sched.step()
        assert time.monotonic() < deadline, "the long prompt never reached the lane"
    assert sched.abort("long")
    held = sched.kv_pool.used_pages("qwen3_moe")
    assert held > 0  # the running chunk still owns its pages
    sched.close()  # waits for the chunk, then releases
    for rid in [f"d{i}" for i in range(4)]:
        sched.abort(rid)
    assert sched.request_pages() == 0
