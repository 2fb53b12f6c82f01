"""SGLang's TokenizerManager, one per model in one process, against the real scheduler and detokenizer.

The reference is today's `MultiModelTokenizerManager` on the same child processes at the same time
(it binds the detokenizer's default destination; the per-model managers bind their own): greedy
results must be identical, streamed or not, n=2 included, and an abort must free the KV pool.
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

MODELS = {"qwen3moe": "qwen3_moe", "llama": "llama"}  # client-facing name -> tiny demo model
PROMPTS = ("The capital of France is", "1, 2, 3,")
_TIMEOUT_S = 60


@dataclass
class Front:
    """Both front ends on one scheduler + detokenizer, and the event loop they live on."""

    new: dict[str, Any]  # model -> ModelTokenizerManager
    old: Any  # MultiModelTokenizerManager
    loop: asyncio.AbstractEventLoop
    context: Any  # the SGLang context the HTTP process would publish

    def run(self, coro: Any) -> Any:
        """Run on the managers' loop under the process context (the test process publishes nothing)."""
        from sglang.srt.runtime_context import use_context

        with use_context(self.context):
            return self.loop.run_until_complete(asyncio.wait_for(coro, _TIMEOUT_S))


@pytest.fixture(scope="module")
def front(tiny_models) -> Iterator[Front]:
    from crosspool_sgl.entrypoints.children import ChildProcesses
    from crosspool_sgl.entrypoints.sglang_openai import _ensure_sgl_kernel_importable
    from crosspool_sgl.launch_server import check_models, load_tokenizers, model_infos, parse_args

    flags = ["--kv-pool-bytes", "64M", "--log-level", "warning"]
    for name, arch in MODELS.items():
        flags += ["--model", f"{name}={tiny_models[arch]}"]
    args = parse_args(flags)
    ipc_dir = tempfile.mkdtemp(prefix="crosspool-test-ipc-")
    children = ChildProcesses(args, ipc_dir)
    loop = asyncio.new_event_loop()
    new: dict[str, Any] = {}
    try:
        _ensure_sgl_kernel_importable()
        from sglang.srt.runtime_context import create_context, use_context

        from crosspool_sgl.managers.model_tokenizer_manager import (
            ModelAddresses,
            ModelTokenizerManager,
            model_server_args,
        )
        from crosspool_sgl.managers.tokenizer_manager import MultiModelTokenizerManager

        specs = args.engine.models
        context = create_context(model_server_args(specs[0].name, specs[0].path), role="tokenizer")
        with use_context(context):
            for s in specs:
                own = ModelAddresses(children.scheduler_addr, f"ipc://{ipc_dir}/tokenizer-{s.name}")
                new[s.name] = ModelTokenizerManager(s.name, model_server_args(s.name, s.path), own)
        old = MultiModelTokenizerManager(
            model_infos(args, check_models(specs)),
            load_tokenizers(specs),
            children.scheduler_addr,
            children.tokenizer_addr,
        )
        children.wait_ready(180)
        handle = Front(new, old, loop, context)
        handle.run(old.start())
        yield handle
        handle.run(_close(handle))
    finally:
        loop.close()
        children.stop()
        shutil.rmtree(ipc_dir, ignore_errors=True)


async def _close(front: Front) -> None:
    for tm in front.new.values():
        await tm.close()
    await front.old.stop()


def _greedy(max_new_tokens: int = 8, **extra: Any) -> dict[str, Any]:
    return {"temperature": 0, "max_new_tokens": max_new_tokens, **extra}


async def _new(tm: Any, prompt: str, stream: bool = False, **sampling: Any) -> list[Any]:
    """Everything SGLang's generate_request yields for one request."""
    from sglang.srt.managers.io_struct import GenerateReqInput

    obj = GenerateReqInput(text=prompt, sampling_params=_greedy(**sampling), stream=stream)
    return [r async for r in tm.generate_request(obj)]


async def _old(front: Front, model: str, prompt: str, **sampling: Any) -> dict[str, Any]:
    from crosspool_sgl.managers.tokenizer_manager import GenerateInput

    final: dict[str, Any] = {}
    obj = GenerateInput(model, prompt, sampling_params=_greedy(**sampling))
    async for r in front.old.generate_request(obj):
        final = r
    return final


def _same(new: dict[str, Any], old: dict[str, Any]) -> None:
    assert new["text"] == old["text"]
    assert list(new["output_ids"]) == list(old["output_ids"])
    for key in ("finish_reason", "prompt_tokens", "completion_tokens"):
        assert new["meta_info"][key] == old["meta_info"][key], key


@pytest.mark.parametrize("prompt", PROMPTS)
@pytest.mark.parametrize("model", list(MODELS))
def test_greedy_results_match_the_old_manager_streamed_or_not(front: Front, model: str, prompt: str):
    old = front.run(_old(front, model, prompt))
    (single,) = front.run(_new(front.new[model], prompt))
    _same(single, old)
    chunks = front.run(_new(front.new[model], prompt, stream=True))
    assert len(chunks) > 1
    texts = [c["text"] for c in chunks]  # SGLang's default: cumulative results
    assert all(b.startswith(a) for a, b in zip(texts, texts[1:], strict=False))
    _same(chunks[-1], old)


def test_both_models_at_once_each_get_their_own_outputs(front: Front):
    """One scheduler step holds both models' rows: each manager must get its own (and the old one its)."""
    prompt = PROMPTS[0]
    solo = {m: front.run(_old(front, m, prompt)) for m in MODELS}
    assert solo["qwen3moe"]["text"] != solo["llama"]["text"]  # else the check below could not fail

    async def together() -> list[Any]:
        jobs = [_new(front.new[m], prompt, stream=s) for m in MODELS for s in (False, True)]
        return await asyncio.gather(*jobs, *(_old(front, m, prompt) for m in MODELS))

    results = front.run(together())
    news, olds = results[: 2 * len(MODELS)], results[2 * len(MODELS) :]
    for i, model in enumerate(MODELS):
        _same(news[2 * i][-1], solo[model])
        _same(news[2 * i + 1][-1], solo[model])
        _same(olds[i], solo[model])


@pytest.mark.parametrize("stream", [False, True])
def test_n2_gives_two_samples_each_the_greedy_text(front: Front, stream: bool):
    model, prompt = "llama", PROMPTS[1]
    old = front.run(_old(front, model, prompt))
    chunks = front.run(_new(front.new[model], prompt, stream=stream, n=2))
    if not stream:
        (samples,) = chunks  # SGLang's batch: one list of n results
    else:
        last: dict[int, dict] = {}
        for c in chunks:  # a streamed batch: cumulative results tagged with their index
            last[c["index"]] = c
        samples = [last[i] for i in sorted(last)]
    assert len(samples) == 2
    for s in samples:
        _same(s, old)
    assert samples[0]["meta_info"]["id"] != samples[1]["meta_info"]["id"]


async def _pages(tm: Any) -> tuple[int, int]:
    """Pages held by requests and requests running, over every model (what /get_server_info reports)."""
    (state,) = await tm.get_internal_state()
    return sum(state["kv_pool"]["used_pages"].values()), sum(state["num_running"].values())


@pytest.mark.parametrize("model", list(MODELS))
def test_an_abort_ends_the_stream_and_frees_the_pool(front: Front, model: str):
    from sglang.srt.managers.io_struct import GenerateReqInput

    tm = front.new[model]

    async def run() -> tuple[tuple[int, int], list[Any], tuple[int, int]]:
        params = _greedy(1000, ignore_eos=True)
        obj = GenerateReqInput(text=PROMPTS[0], sampling_params=params, stream=True)
        chunks, during = [], (0, 0)
        async for r in tm.generate_request(obj):
            chunks.append(r)
            if len(chunks) == 3:
                during = await _pages(tm)
                tm.abort_request(obj.rid)
        return during, chunks, await _pages(tm)

    during, chunks, after = front.run(run())
    assert during[0] > 0 and during[1] == 1  # so the check after can fail
    assert chunks[-1]["meta_info"]["finish_reason"]["type"] == "abort"
    assert len(chunks[-1]["output_ids"]) < 1000
    assert after == (0, 0)
    assert not tm.rid_to_state


class _GoneClient:
    """SGLang's manager polls `request.is_disconnected()` while it waits (every 4 s, its default)."""

    async def is_disconnected(self) -> bool:
        return True


def test_a_client_that_left_is_aborted_and_frees_the_pool(front: Front):
    from sglang.srt.managers.io_struct import GenerateReqInput

    tm = front.new["qwen3moe"]

    async def run() -> tuple[str, tuple[int, int]]:
        obj = GenerateReqInput(text=PROMPTS[0], sampling_params=_greedy(3000, ignore_eos=True))
        with pytest.raises(ValueError, match="disconnected") as e:
            async for _ in tm.generate_request(obj, _GoneClient()):
                pass
        for _ in range(100):  # the abort's output comes back asynchronously
            if await _pages(tm) == (0, 0):
                break
            await asyncio.sleep(0.05)
        return str(e.value), await _pages(tm)

    _, after = front.run(run())
    assert after == (0, 0)


def test_control_replies_reach_the_manager_that_asked(front: Front):
    """Every manager asks at once; each gets exactly its one reply (SGLang waits for one per DP rank)."""

    async def run() -> list[Any]:
        asks = [tm.get_internal_state() for tm in front.new.values()]
        asks += [tm.flush_cache() for tm in front.new.values()]
        return await asyncio.gather(*asks, front.old.get_scheduler_info(), front.old.flush_cache())

    results = front.run(run())
    n = len(front.new)
    states, flushes, (old_state, old_flush) = results[:n], results[n : 2 * n], results[2 * n :]
    for (state,) in states:
        assert set(state["kv_pool"]["used_pages"]) == set(MODELS)
    for tm, flush in zip(front.new.values(), flushes, strict=True):
        assert flush.success and flush.http_worker_ipc == tm.tokenizer_ipc_name
    assert set(old_state["kv_pool"]["used_pages"]) == set(MODELS) and old_flush is True
