"""Overload: beyond the queue bounds (global, per model, fair share) the tokenizer side answers 429 with
Retry-After without sending anything; a request past its deadline is aborted with 504."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import ExitStack

import pytest
from fastapi import HTTPException

from crosspool_sgl.managers.admission import QueueBounds
from crosspool_sgl.managers.errors import RequestError, from_sglang
from crosspool_sgl.managers.io_struct import AbortReq, TokenizedGenerateReqInput
from tests.managers.offline_front import OfflineFront, offline_front


@pytest.fixture
def front_factory(tiny_models, tmp_path) -> Iterator:
    with ExitStack() as stack:

        def make(models=("llama",), **kw) -> OfflineFront:
            return stack.enter_context(offline_front(str(tiny_models["llama"]), tmp_path, models, **kw))

        yield make


def _request(text: str, **sampling):
    from sglang.srt.managers.io_struct import GenerateReqInput

    return GenerateReqInput(text=text, sampling_params={"max_new_tokens": 4, **sampling})


async def _submit(front: OfflineFront, model: str, obj) -> asyncio.Task:
    """Start a request and let it reach the (absent) scheduler; it then waits forever."""
    gen = front.hosted.managers[model].generate_request(obj)
    task = asyncio.ensure_future(anext(gen))
    for _ in range(20):
        await asyncio.sleep(0)
        if task.done():
            task.result()  # raise what refused it
    return task


def _refusal(front: OfflineFront, model: str, obj) -> RequestError:
    async def run() -> None:
        await _submit(front, model, obj)

    with pytest.raises((ValueError, HTTPException)) as err:
        front.run(run())
    return from_sglang(err.value)


def test_requests_beyond_the_limit_get_429(front_factory):
    front = front_factory(bounds=QueueBounds(max_total=3))

    async def fill() -> list[asyncio.Task]:
        return [await _submit(front, "llama", _request(f"hello {i}")) for i in range(3)]

    tasks = front.run(fill())
    err = _refusal(front, "llama", _request("one too many"))
    assert err.status_code == 429 and "overloaded" in err.message
    assert err.headers["Retry-After"] == "1"
    assert len(front.sent("llama", TokenizedGenerateReqInput)) == 3  # the refused one never left

    tm = front.hosted.managers["llama"]
    tm.rid_to_state.pop(next(iter(tm.rid_to_state)))  # one finishes: room again

    async def submit_and_stop() -> None:
        tasks.append(await _submit(front, "llama", _request("now it fits")))
        await _stop(tasks)

    front.run(submit_and_stop())
    assert len(front.sent("llama", TokenizedGenerateReqInput)) == 4


async def _stop(tasks: list[asyncio.Task]) -> None:
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


def test_a_batch_larger_than_the_queue_is_400_before_anything_is_sent(front_factory):
    from sglang.srt.managers.io_struct import GenerateReqInput

    front = front_factory(bounds=QueueBounds(max_total=8))
    err = _refusal(front, "llama", GenerateReqInput(text=["x"] * 9, sampling_params={"max_new_tokens": 1}))
    assert err.status_code == 400 and not front.sent("llama", TokenizedGenerateReqInput)


def test_a_hot_model_cannot_take_the_cold_models_share(front_factory):
    front = front_factory(models=("hot", "cold1", "cold2"), bounds=QueueBounds(max_total=40))
    admitted = 0

    tasks: list[asyncio.Task] = []

    async def flood() -> None:
        nonlocal admitted
        for i in range(40):
            tasks.append(await _submit(front, "hot", _request(f"flood {i}", max_new_tokens=1)))
            admitted += 1

    with pytest.raises(HTTPException) as exc:
        front.run(flood())
    err = from_sglang(exc.value)
    assert err.status_code == 429 and "fair share" in err.message
    reserve = int(40 / 3 * 0.25)
    assert admitted == 40 - 2 * reserve  # it got everything but the others' reservations

    async def cold() -> None:  # the cold models are still admitted at once
        for model in ("cold1", "cold2"):
            for i in range(reserve):
                tasks.append(await _submit(front, model, _request(f"cold {i}", max_new_tokens=1)))
        await _stop(tasks)

    front.run(cold())


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


def test_a_request_past_its_deadline_is_aborted_with_504(front_factory):
    front = front_factory(request_timeout_s=0.3)

    async def run() -> None:
        async for _ in front.hosted.managers["llama"].generate_request(_request("never answered")):
            pass

    with pytest.raises(HTTPException) as err:
        front.run(run())
    assert err.value.status_code == 504
    # the abort reached the scheduler, whose abort output then drops the state (as SGLang's)
    (state_rid,) = front.hosted.managers["llama"].rid_to_state
    assert [m.rid for m in front.sent("llama", AbortReq)] == [state_rid]
