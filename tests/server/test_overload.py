"""Overload: beyond the queue bounds (global, per model, fair share) the tokenizer side answers 429 with
Retry-After without sending anything; a request past its deadline is aborted with 504."""

from __future__ import annotations

import asyncio

import pytest

from crosspool_sgl.managers.admission import QueueBounds
from crosspool_sgl.managers.io_struct import AbortReq
from crosspool_sgl.managers.tokenizer_manager import (
    GenerateInput,
    ModelInfo,
    MultiModelTokenizerManager,
    RequestError,
)


class _FakeSender:
    def __init__(self) -> None:
        self.sent: list = []

    def send_pyobj(self, obj, **kwargs) -> None:  # SGLang's sock_send (pickle, its default)
        self.sent.append(obj)


def make_tm(tiny_models, models=("llama",), **kw) -> MultiModelTokenizerManager:
    from transformers import AutoTokenizer

    path = str(tiny_models["llama"])
    tok = AutoTokenizer.from_pretrained(path)
    infos = {m: ModelInfo(m, path, context_len=4096, vocab_size=512, architecture="Llama") for m in models}
    tm = MultiModelTokenizerManager(infos, dict.fromkeys(models, tok), "ipc://unused", "ipc://unused", **kw)
    tm.sender = _FakeSender()
    return tm


def test_requests_beyond_the_limit_get_429(tiny_models):
    tm = make_tm(tiny_models, max_pending_requests=3)
    for i in range(3):
        tm.submit(GenerateInput(model="llama", text=f"hello {i}", sampling_params={"max_new_tokens": 4}))
    with pytest.raises(RequestError) as err:
        tm.submit(GenerateInput(model="llama", text="one too many"))
    assert err.value.status_code == 429 and "overloaded" in err.value.message
    assert err.value.headers["Retry-After"] == "1"
    assert len(tm.sender.sent) == 3  # the rejected request never reached the scheduler
    tm.rid_to_state.pop(next(iter(tm.rid_to_state)))  # one finishes: room again
    tm.submit(GenerateInput(model="llama", text="now it fits"))
    assert len(tm.sender.sent) == 4


def test_a_batch_larger_than_the_queue_is_400_before_anything_is_sent(tiny_models):
    tm = make_tm(tiny_models, max_pending_requests=8)
    objs = [GenerateInput(model="llama", text="x") for _ in range(9)]
    with pytest.raises(RequestError) as err:
        asyncio.run(tm.submit_all(objs))
    assert err.value.status_code == 400 and not tm.sender.sent


def test_a_hot_model_cannot_take_the_cold_models_share(tiny_models):
    tm = make_tm(tiny_models, models=("hot", "cold1", "cold2"), max_pending_requests=40)
    admitted = 0
    with pytest.raises(RequestError) as err:
        for i in range(40):
            tm.submit(GenerateInput(model="hot", text=f"flood {i}", sampling_params={"max_new_tokens": 1}))
            admitted += 1
    assert err.value.status_code == 429 and "fair share" in err.value.message
    reserve = int(40 / 3 * 0.25)
    assert admitted == 40 - 2 * reserve  # it got everything but the others' reservations
    for model in ("cold1", "cold2"):  # the cold models are still admitted at once
        for i in range(reserve):
            tm.submit(GenerateInput(model=model, text=f"cold {i}", sampling_params={"max_new_tokens": 1}))


@pytest.mark.parametrize(
    ("in_flight", "model", "n", "status"),
    [
        ({"a": 0, "b": 0}, "a", 1, None),
        ({"a": 9, "b": 0}, "a", 1, 429),  # per-model bound 9
        ({"a": 4, "b": 4}, "b", 1, None),
        ({"a": 6, "b": 4}, "b", 1, 429),  # total bound 10
        ({"a": 0, "b": 0}, "a", 11, 400),  # can never fit
    ],
)
def test_queue_bounds_table(in_flight, model, n, status):
    bounds = QueueBounds(max_total=10, max_per_model=9)
    if status is None:
        bounds.check(model, n, in_flight, ["a", "b"])
        return
    with pytest.raises(RequestError) as err:
        bounds.check(model, n, in_flight, ["a", "b"])
    assert err.value.status_code == status


def test_a_request_past_its_deadline_is_aborted_with_504(tiny_models):
    tm = make_tm(tiny_models, request_timeout_s=0.3)

    async def run() -> None:
        (state,) = await tm.submit_all([GenerateInput(model="llama", text="never answered")])
        await tm.collect(state)

    with pytest.raises(RequestError) as err:
        asyncio.run(run())
    assert err.value.status_code == 504
    assert any(isinstance(m, AbortReq) for m in tm.sender.sent) and not tm.rid_to_state
