"""Greedy generation straight through a runtime's scheduler (colocated or disaggregated)."""

from __future__ import annotations

import time
from pathlib import Path

from crosspool_sgl.core.req import Req
from crosspool_sgl.runtime import Runtime, build_runtime
from crosspool_sgl.sampling_params import SamplingParams
from crosspool_sgl.server_args import DisaggArgs, EngineArgs, KVPoolArgs, ModelSpec

ALL_ARCHS = ("qwen3_moe", "qwen2_moe", "mixtral", "olmoe", "llama", "qwen2", "qwen3")
# per model: prompts of different lengths, so micro-batches split unevenly and prefill mixes with decode
PROMPTS = ([5, 17, 42, 9, 100, 3], [7, 8], [250, 31, 64, 2, 2, 11, 90, 45, 13, 77, 21])


def build(paths: dict[str, Path], names: tuple[str, ...], disagg: DisaggArgs) -> Runtime:
    args = EngineArgs(
        models=tuple(ModelSpec(n, str(paths[n])) for n in names),
        kv_pool=KVPoolArgs(total_bytes=32 << 20),
        show_progress=False,
        disagg=disagg,
    )
    return build_runtime(args)


def close(rt: Runtime) -> None:
    ffn = getattr(rt.scheduler.runner, "ffn", None)
    if ffn is not None:
        ffn.close()


def make_reqs(names: tuple[str, ...], max_new_tokens: int = 8) -> list[Req]:
    params = {"temperature": 0, "max_new_tokens": max_new_tokens, "ignore_eos": True}
    return [
        Req(f"{n}-{j}", n, list(p), SamplingParams.from_dict(params))
        for n in names
        for j, p in enumerate(PROMPTS)
    ]


def generate(rt: Runtime, reqs: list[Req], timeout_s: float = 60.0) -> dict[str, list[int]]:
    """Add all requests at once (so models and prefill/decode share steps), step until done."""
    for r in reqs:
        rt.scheduler.add_request(r)
    deadline = time.monotonic() + timeout_s
    while rt.scheduler.has_work():
        assert time.monotonic() < deadline, "generation did not finish in time"
        rt.scheduler.step()
    return {r.rid: list(r.output_ids) for r in reqs}
