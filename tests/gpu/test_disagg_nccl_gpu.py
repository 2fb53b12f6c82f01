"""Colocated against disaggregated over NCCL: two processes (attention here, one FFN worker) on one
GPU, every base architecture in the same batches; greedy tokens must be equal (skipped without CUDA).

The colocated runtime is run twice: static decode off (the reference) and on (CUDA graphs), so
this also checks the ModelRunner hook end to end on a GPU. Not yet run on a GPU when written.
"""

from __future__ import annotations

import pytest
import torch

from crosspool_sgl.runtime import build_runtime
from crosspool_sgl.server_args import DisaggArgs, EngineArgs, KVPoolArgs, ModelSpec, StaticDecodeArgs
from tests.disagg.disagg_helpers import ALL_ARCHS, close, generate, make_reqs

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _build(paths, disagg: DisaggArgs, static: str):
    args = EngineArgs(
        models=tuple(ModelSpec(n, str(paths[n])) for n in ALL_ARCHS),
        device="cuda",
        dtype="float32",
        kv_pool=KVPoolArgs(total_bytes=256 << 20),
        show_progress=False,
        disagg=disagg,
        static_decode=StaticDecodeArgs(mode=static, startup_buckets=(1,)),
    )
    return build_runtime(args)


@pytest.fixture(scope="module")
def reference(tiny_models) -> dict[str, list[int]]:
    rt = _build(tiny_models, DisaggArgs(), "off")
    return generate(rt, make_reqs(ALL_ARCHS, 12), timeout_s=300)


def test_colocated_graphs_equal_colocated_eager(tiny_models, reference):
    rt = _build(tiny_models, DisaggArgs(), "on")
    got = generate(rt, make_reqs(ALL_ARCHS, 12), timeout_s=300)
    stats = rt.scheduler.runner.static_decode.stats()
    assert stats["replays"] > 0, stats
    assert got == reference


@pytest.mark.parametrize("micro_batches", [1, 2])
def test_disaggregated_over_nccl_equals_colocated(tiny_models, reference, micro_batches):
    disagg = DisaggArgs(ffn_workers=1, ffn_devices=("cuda:0",), micro_batches=micro_batches)
    rt = _build(tiny_models, disagg, "auto")  # static decode stays off in disaggregated mode
    try:
        assert rt.scheduler.runner.ffn.backend == "nccl"
        got = generate(rt, make_reqs(ALL_ARCHS, 12), timeout_s=300)
    finally:
        close(rt)
    assert got == reference
