"""Scheduler behaviour through the offline Engine: batching, preemption, abort, sampling, errors."""

from __future__ import annotations

import pytest

from crosspool_sgl import Engine
from crosspool_sgl.core.req import Req
from crosspool_sgl.sampling_params import InvalidRequestError, SamplingParams

GREEDY = {"temperature": 0, "max_new_tokens": 24, "ignore_eos": True}
PROMPTS = ["one two three", "the cat sat on the mat and", "x y z", "hello there, how are", "a"]


@pytest.fixture(scope="module")
def engine(tiny_models):
    eng = Engine(
        models={"moe": str(tiny_models["qwen3_moe"]), "mix": str(tiny_models["mixtral"])}, show_progress=False
    )
    yield eng
    eng.shutdown()


def test_batched_and_chunked_equal_one_by_one(engine, tiny_models):
    alone = [engine.generate(prompt=p, model="moe", sampling_params=GREEDY)["output_ids"] for p in PROMPTS]
    batched = engine.generate(prompt=PROMPTS, model="moe", sampling_params=GREEDY)
    assert [o["output_ids"] for o in batched] == alone
    chunked = Engine(
        models={"moe": str(tiny_models["qwen3_moe"])}, show_progress=False, chunked_prefill_size=3
    )
    assert [o["output_ids"] for o in chunked.generate(prompt=PROMPTS, sampling_params=GREEDY)] == alone


def test_preemption_keeps_results_identical(tiny_models):
    """A pool far too small for every request at once forces retraction; outputs must not change."""
    models = {"moe": str(tiny_models["qwen3_moe"]), "mix": str(tiny_models["mixtral"])}
    roomy = Engine(models=models, show_progress=False)
    # 3 chunks of 8 Qwen3-MoE pages (16 tokens each): the 5 Qwen3-MoE requests alone need ~25 pages.
    page = roomy.runtime.kv_pool.page_bytes("moe")
    tight = Engine(models=models, show_progress=False, kv_pool_bytes=3 * 8 * page, kv_chunk_bytes=8 * page)
    prompts = [f"{p} and more words to fill the cache" for p in PROMPTS] * 2
    names = ["moe", "mix"] * 5
    params = {"temperature": 0, "max_new_tokens": 60, "ignore_eos": True}
    want = roomy.generate(prompt=prompts, model=names, sampling_params=params)
    got = tight.generate(prompt=prompts, model=names, sampling_params=params)
    assert [o["output_ids"] for o in got] == [o["output_ids"] for o in want]
    assert sum(o["meta_info"]["num_retractions"] for o in got) > 0
    assert tight.scheduler.request_pages() == 0


def test_request_larger_than_pool_is_rejected_not_queued_forever(tiny_models):
    probe = Engine(models={"moe": str(tiny_models["qwen3_moe"])}, show_progress=False)
    page = probe.runtime.kv_pool.page_bytes("moe")
    tiny = Engine(
        models={"moe": str(tiny_models["qwen3_moe"])},
        show_progress=False,
        kv_pool_bytes=8 * page,
        kv_chunk_bytes=8 * page,
    )
    # a prompt that can never fit: rejected at once, with the reason
    with pytest.raises(InvalidRequestError, match="KV ceiling"):
        tiny.generate(prompt="word " * 300, sampling_params={"max_new_tokens": 4})
    # a prompt that fits but outgrows the whole pool while decoding: finished with a clear abort
    out = tiny.generate(input_ids=[7] * 100, sampling_params={"max_new_tokens": 200, "ignore_eos": True})
    assert out["meta_info"]["finish_reason"]["type"] == "abort"
    assert "KV cache" in out["meta_info"]["finish_reason"]["message"]
    assert 0 < out["meta_info"]["completion_tokens"] < 200
    assert tiny.scheduler.request_pages() == 0


def test_abort_frees_pages(engine):
    sched = engine.scheduler
    req = Req(
        rid="to-abort", model="mix", input_ids=[5, 6, 7, 8] * 10, params=SamplingParams(max_new_tokens=50)
    )
    sched.add_request(req)
    for _ in range(3):
        sched.step()
    assert engine.runtime.kv_pool.used_pages("mix") > 0
    assert sched.abort("to-abort")
    outs = sched.step()
    assert sched.request_pages() == 0
    sched.flush_cache()
    assert engine.runtime.kv_pool.used_pages() == 0
    assert not sched.has_work()
    assert req.finish_reason["type"] == "abort"
    assert [(o.rid, o.finished, o.new_token_ids) for o in outs] == [("to-abort", True, [])]


def test_seeded_sampling_is_reproducible_and_batch_independent(engine):
    params = {
        "temperature": 0.9,
        "top_p": 0.9,
        "top_k": 50,
        "min_p": 0.01,
        "seed": 1234,
        "max_new_tokens": 16,
    }
    a = engine.generate(prompt="the cat", model="moe", sampling_params=params)["output_ids"]
    b = engine.generate(prompt=["the cat", "x y z"], model="moe", sampling_params=params)[0]["output_ids"]
    c = engine.generate(prompt="the cat", model="moe", sampling_params={**params, "seed": 99})["output_ids"]
    assert a == b
    assert a != c


def test_stop_strings_and_tokens_and_length(engine):
    greedy = engine.generate(prompt="one two", model="mix", sampling_params=GREEDY)
    stop_tok = greedy["output_ids"][5]
    out = engine.generate(
        prompt="one two", model="mix", sampling_params={**GREEDY, "stop_token_ids": [stop_tok]}
    )
    assert out["output_ids"] == greedy["output_ids"][: greedy["output_ids"].index(stop_tok) + 1]
    assert out["meta_info"]["finish_reason"] == {"type": "stop", "matched": stop_tok}
    text = greedy["text"]
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    if stop.strip():
        out = engine.generate(prompt="one two", model="mix", sampling_params={**GREEDY, "stop": stop})
        assert out["meta_info"]["finish_reason"]["matched"] == stop
        assert stop not in out["text"] and text.startswith(out["text"])
    assert greedy["meta_info"]["finish_reason"] == {"type": "length", "length": 24}


@pytest.mark.parametrize(
    "params, match",
    [
        ({"max_new_tokens": -1}, "max_new_tokens"),
        ({"temperature": -0.5}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"top_k": 0}, "top_k"),
        ({"min_p": 2}, "min_p"),
        ({"frequency_penalty_x": 3}, "unsupported"),
    ],
)
def test_bad_sampling_params_are_clear_errors(engine, params, match):
    with pytest.raises(InvalidRequestError, match=match):
        engine.generate(prompt="hi", model="moe", sampling_params=params)


def test_unknown_model_and_bad_ids_are_clear_errors(engine):
    with pytest.raises(InvalidRequestError, match="not hosted"):
        engine.generate(prompt="hi", model="nope")
    with pytest.raises(InvalidRequestError, match="input_ids"):
        engine.generate(input_ids=[1, 2, 10**6], model="moe")
    with pytest.raises(InvalidRequestError, match="context"):
        engine.generate(input_ids=[1] * 5000, model="moe")
    assert engine.scheduler.request_pages() == 0


def test_prefix_cache_hits_give_identical_outputs(engine, tiny_models):
    shared = "the same long system prompt for every request of this test, " * 3
    prompts = [shared + q for q in ("first question", "second one", "a third")]
    first = engine.generate(prompt=prompts, model="moe", sampling_params=GREEDY)
    again = engine.generate(prompt=prompts, model="moe", sampling_params=GREEDY)
    assert [o["output_ids"] for o in again] == [o["output_ids"] for o in first]
    assert all(o["meta_info"]["cached_tokens"] >= 16 for o in again)
    # the other model has its own cache: same text, no hits
    other = engine.generate(prompt=prompts[0], model="mix", sampling_params=GREEDY)
    assert other["meta_info"]["cached_tokens"] == 0
    uncached = Engine(models={"moe": str(tiny_models["qwen3_moe"])}, show_progress=False, prefix_cache=False)
    plain = uncached.generate(prompt=prompts, sampling_params=GREEDY)
    assert [o["output_ids"] for o in plain] == [o["output_ids"] for o in first]
    assert all(o["meta_info"]["cached_tokens"] == 0 for o in plain)
