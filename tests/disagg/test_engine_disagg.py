"""Disaggregated mode against colocated mode through the runtime (the offline path), all 7 architectures.

One attention process (this one) and one or two FFN worker processes over gloo; greedy tokens of
several models at once must equal colocated mode's. A killed worker must fail requests fast.
"""

from __future__ import annotations

import time

import pytest
from disagg_helpers import ALL_ARCHS, build, close, generate, make_reqs

from crosspool_sgl.server_args import DisaggArgs


@pytest.fixture(scope="module")
def reference(tiny_models) -> dict[str, list[int]]:
    rt = build(tiny_models, ALL_ARCHS, DisaggArgs())
    return generate(rt, make_reqs(ALL_ARCHS))


@pytest.mark.parametrize(
    "disagg",
    [
        DisaggArgs(ffn_workers=1, micro_batches=1),
        DisaggArgs(ffn_workers=1, micro_batches=0),
        DisaggArgs(ffn_workers=1, micro_batches=12),
        DisaggArgs(ffn_workers=2, micro_batches=2),
    ],
    ids=["1worker-1mb", "1worker-auto", "1worker-12mb", "2workers-2mb"],
)
def test_greedy_tokens_equal_colocated(tiny_models, reference, disagg):
    rt = build(tiny_models, ALL_ARCHS, disagg)
    try:
        assert rt.weight_pool.used_bytes == 0  # no expert weights on the attention side
        got = generate(rt, make_reqs(ALL_ARCHS))
        trace = rt.scheduler.runner.last_trace
    finally:
        close(rt)
    assert got == reference
    assert trace is not None and trace.calls
    assert {w for c in trace.calls for w, _, _ in c.worker_times} == set(range(disagg.ffn_workers))


def test_killed_ffn_worker_fails_requests_fast(tiny_models):
    names = ("qwen3_moe", "llama")
    rt = build(tiny_models, names, DisaggArgs(ffn_workers=1, micro_batches=2, ffn_timeout_s=30))
    try:
        generate(rt, make_reqs(names, 2))  # healthy first
        rt.scheduler.runner.ffn.procs[0].kill()
        reqs = make_reqs(names, 4)
        start = time.monotonic()
        generate(rt, reqs, timeout_s=20)
        elapsed = time.monotonic() - start
        late = make_reqs(("llama",), 2)  # and every later request fails at once too
        generate(rt, late, timeout_s=5)
    finally:
        close(rt)
    assert elapsed < 10, f"took {elapsed:.1f}s to fail"
    for r in reqs + late:
        reason = r.finish_reason
        assert reason["type"] == "abort" and reason["status_code"] == 503, reason
        assert "FFN worker 0" in reason["message"] and "died" in reason["message"], reason
