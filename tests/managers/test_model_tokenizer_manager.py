"""SGLang's TokenizerManager, one per model in one process, against the real scheduler and detokenizer.

The reference is the offline Engine on the same model directories (greedy results must be
identical, streamed or not, n=2 included, both models at once); an abort must free the KV pool.
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
    """Per-model managers on one scheduler + detokenizer, the event loop they live on, and the
    offline Engine that gives the reference results."""

    new: dict[str, Any]  # model -> ModelTokenizerManager
    engine: Any  # crosspool_sgl.engine.Engine on the same directories
    loop: asyncio.AbstractEventLoop
    context: Any  # the SGLang context the HTTP process would publish

    def run(self, coro: Any) -> Any:
        """Run on the managers' loop under the process context (the test process publishes nothing)."""
        from sglang.srt.runtime_context import use_context

        with use_context(self.context):
            return self.loop.run_until_complete(asyncio.wait_for(coro, _TIMEOUT_S))

    def reference(self, model: str, prompt: str, **sampling: Any) -> dict[str, Any]:
        return self.engine.generate(prompt, _greedy(**sampling), model=model)


@pytest.fixture(scope="module")
def front(tiny_models) -> Iterator[Front]:
    from sglang.srt.runtime_context import create_context, use_context

    from crosspool_sgl.engine import Engine
    from crosspool_sgl.entrypoints.children import ChildProcesses
    from crosspool_sgl.launch_server import check_models, model_infos, parse_args
    from crosspool_sgl.managers.hosted_models import HostedModels
    from crosspool_sgl.managers.model_tokenizer_manager import model_server_args

    flags = ["--kv-pool-bytes", "64M", "--log-level", "warning"]
    for name, arch in MODELS.items():
        flags += ["--model", f"{name}={tiny_models[arch]}"]
    args = parse_args(flags)
    ipc_dir = tempfile.mkdtemp(prefix="crosspool-test-ipc-")
    children = ChildProcesses(args, ipc_dir)
    loop = asyncio.new_event_loop()
    try:
        specs = args.engine.models
        hosted = HostedModels(model_infos(args, check_models(specs)))
        context = create_context(model_server_args(specs[0].name, specs[0].path), role="tokenizer")
        with use_context(context):
            hosted.connect(children.scheduler_addr, children.tokenizer_addr_of, publish=False)
        engine = Engine({s.name: s.path for s in specs}, kv_pool_bytes=64 << 20, show_progress=False)
        children.wait_ready(180)
        handle = Front(hosted.managers, engine, loop, context)
        yield handle
        handle.run(hosted.close())
    finally:
        loop.close()
        children.stop()
        shutil.rmtree(ipc_dir, ignore_errors=True)


def _greedy(max_new_tokens: int = 8, **extra: Any) -> dict[str, Any]:
    return {"temperature": 0, "max_new_tokens": max_new_tokens, **extra}


async def _new(tm: Any, prompt: str, stream: bool = False, **sampling: Any) -> list[Any]:
    """Everything SGLang's generate_request yields for one request."""
    from sglang.srt.managers.io_struct import GenerateReqInput

    obj = GenerateReqInput(text=prompt, sampling_params=_greedy(**sampling), stream=stream)
    return [r async for r in tm.generate_request(obj)]


def _same(new: dict[str, Any], ref: dict[str, Any]) -> None:
    assert new["text"] == ref["text"]
    assert list(new["output_ids"]) == list(ref["output_ids"])
    for key in ("finish_reason", "prompt_tokens", "completion_tokens"):
        assert new["meta_info"][key] == ref["meta_info"][key], key


@pytest.mark.parametrize("prompt", PROMPTS)
@pytest.mark.parametrize("model", list(MODELS))
def test_greedy_results_match_the_offline_engine_streamed_or_not(front: Front, model: str, prompt: str):
    ref = front.reference(model, prompt)
    (single,) = front.run(_new(front.new[model], prompt))
    _same(single, ref)
    chunks = front.run(_new(front.new[model], prompt, stream=True))
    assert len(chunks) > 1
    texts = [c["text"] for c in chunks]  # SGLang's default: cumulative results
    assert all(b.startswith(a) for a, b in zip(texts, texts[1:], strict=False))
    _same(chunks[-1], ref)


def test_both_models_at_once_each_get_their_own_outputs(front: Front):
    """One scheduler step holds both models' rows: each manager must get its own."""
    prompt = PROMPTS[0]
    solo = {m: front.reference(m, prompt) for m in MODELS}
    assert solo["qwen3moe"]["text"] != solo["llama"]["text"]  # else the check below could not fail

    async def together() -> list[Any]:
        return await asyncio.gather(
            *(_new(front.new[m], prompt, stream=s) for m in MODELS for s in (False, True))
        )

    news = front.run(together())
    for i, model in enumerate(MODELS):
        _same(news[2 * i][-1], solo[model])
        _same(news[2 * i + 1][-1], solo[model])


@pytest.mark.parametrize("stream", [False, True])
def test_n2_gives_two_samples_each_the_greedy_text(front: Front, stream: bool):
    model, prompt = "llama", PROMPTS[1]
    ref = front.reference(model, prompt)
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
        _same(s, ref)
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
    """The manager polls `request.is_disconnected()` while it waits (every 0.25 s)."""

    async def is_disconnected(self) -> bool:
        return True


def test_a_client_that_left_is_aborted_and_frees_the_pool(front: Front):
    from sglang.srt.managers.io_struct import GenerateReqInput

    tm = front.new["qwen3moe"]

    async def run() -> tuple[list[Any], tuple[int, int]]:
        obj = GenerateReqInput(text=PROMPTS[0], sampling_params=_greedy(3000, ignore_eos=True))
        results = [r async for r in tm.generate_request(obj, _GoneClient())]
        for _ in range(100):  # the abort's output comes back asynchronously
            if await _pages(tm) == (0, 0) and not tm.rid_to_state:
                break
            await asyncio.sleep(0.05)
        return results, await _pages(tm)

    results, after = front.run(run())
    (result,) = results  # one aborted result, no error: nobody is there to read it
    assert result["meta_info"]["finish_reason"]["type"] == "abort"
    assert after == (0, 0) and not tm.rid_to_state


def test_control_replies_reach_the_manager_that_asked(front: Front):
    """Every manager asks at once; each gets exactly its one reply (SGLang waits for one per DP rank)."""

    async def run() -> list[Any]:
        asks = [tm.get_internal_state() for tm in front.new.values()]
        asks += [tm.flush_cache() for tm in front.new.values()]
        return await asyncio.gather(*asks)

    results = front.run(run())
    n = len(front.new)
    states, flushes = results[:n], results[n:]
    for (state,) in states:
        assert set(state["kv_pool"]["used_pages"]) == set(MODELS)
    for tm, flush in zip(front.new.values(), flushes, strict=True):
        assert flush.success and flush.http_worker_ipc == tm.tokenizer_ipc_name


def _stop_cases(front: Front) -> list[dict[str, Any]]:
    """Stop strings and stop token ids that the greedy output of PROMPTS[0] really reaches (so each
    case finishes on them), with and without trimming, with logprobs and their texts."""
    model = "llama"
    tok = front.engine.runtime.tokenizers[model]
    ref = front.reference(model, PROMPTS[0], max_new_tokens=12)
    ids, text = list(ref["output_ids"]), ref["text"]
    word = tok.decode(ids[3:5]).strip() or text[3:6]
    stop_id = ids[4]
    logprobs = {"return_logprob": True, "top_logprobs_num": 2, "return_text_in_logprobs": True}
    cases = []
    for no_trim in (False, True):
        cases.append({"stop": [word], "no_stop_trim": no_trim})
        cases.append({"stop_token_ids": [stop_id], "no_stop_trim": no_trim})
    cases += [{**c, "_logprobs": logprobs} for c in cases[:2]]
    cases.append({"stop": [word], "_logprobs": {**logprobs, "logprob_start_len": 0}})  # the prompt's too
    return cases


def test_offline_engine_and_server_format_stops_and_logprobs_alike(front: Front):
    """The offline Engine's result equals the server's (SGLang's TokenizerManager and detokenizer)
    for stop strings and stop tokens, trimmed or not, with logprob entries and their texts."""
    from sglang.srt.managers.io_struct import GenerateReqInput

    model = "llama"
    for case in _stop_cases(front):
        extra = case.pop("_logprobs", {})
        sampling = _greedy(12, **case)
        ref = front.engine.generate(PROMPTS[0], sampling, model=model, **extra)
        assert ref["meta_info"]["finish_reason"]["type"] == "stop", case

        async def one(sampling: dict[str, Any], extra: dict[str, Any]) -> list[Any]:
            obj = GenerateReqInput(text=PROMPTS[0], sampling_params=dict(sampling), **extra)
            return [r async for r in front.new[model].generate_request(obj)]

        (got,) = front.run(one(sampling, extra))
        assert got["text"] == ref["text"], case
        assert list(got["output_ids"]) == list(ref["output_ids"]), case
        assert got["meta_info"]["finish_reason"] == ref["meta_info"]["finish_reason"], case
        for key in ("input_token_logprobs", "output_token_logprobs", "output_top_logprobs"):
            if extra:  # ids and texts exact; values to rounding (the server's process runs 1 torch thread)
                assert _entries(got["meta_info"][key]) == _entries(ref["meta_info"][key]), (case, key)
                assert _values(got["meta_info"][key]) == pytest.approx(
                    _values(ref["meta_info"][key]), abs=1e-5
                )


def _entries(rows: list) -> list:
    """Logprob entries [logprob, id, text] (or rows of them) without the logprob values."""
    return [_entries(r) if r and isinstance(r[0], list | tuple) else (r and list(r)[1:]) for r in rows]


def _values(rows: list) -> list:
    flat = [e for r in rows for e in (r if r and isinstance(r[0], list | tuple) else [r])]
    return [1.0 if e[0] is None else e[0] for e in flat if e]  # 1.0: no logprob (the first prompt token)
