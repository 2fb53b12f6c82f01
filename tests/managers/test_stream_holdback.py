"""The streaming gate: a result with logprobs passes only with new text (the stop-string prefix is held
back once, in the scheduler process: tests/managers/test_token_id_output.py)."""

from __future__ import annotations

import asyncio

from crosspool_sgl.managers.stream_holdback import StreamHoldback, held_back


def result(text: str, finished: bool = False, logprobs: bool = True) -> dict:
    reason = {"type": "stop", "matched": "ccc"} if finished else None
    meta = {"finish_reason": reason}
    if logprobs:
        meta["output_token_logprobs"] = []
    return {"text": text, "output_ids": [], "meta_info": meta}


def test_the_start_of_a_stop_string_is_not_held_here_again():
    """The scheduler sends nothing ending in a stop's beginning; text reaching this side only grows."""
    gate = StreamHoldback()
    seen = [r["text"] for r in map(result, ["ab", "abc", "abcc", "abccd"]) if gate.release(r)]
    assert seen == ["ab", "abc", "abcc", "abccd"]


def test_a_result_without_new_text_waits_so_its_logprobs_travel_with_text():
    gate = StreamHoldback()
    assert [gate.release(result(t)) for t in ["a", "a", "a", "ab"]] == [True, False, False, True]
    assert gate.release(result("ab", finished=True))  # the final result always passes


def test_without_logprobs_a_step_without_text_still_streams():
    """A model whose tokens decode to nothing (special tokens, skipped) must still stream a chunk
    per step, as stock SGLang does: the benchmark's llama requests showed no first token at all."""
    gate = StreamHoldback()
    assert [gate.release(result(t, logprobs=False)) for t in ["", "", "a", "ac"]] == [True, True, True, True]


def test_held_back_filters_a_stream_and_closes_it():
    closed = []

    async def results():
        try:
            for t in ["x", "x", "xy"]:
                yield result(t)
            yield result("xy", finished=True)
        finally:
            closed.append(True)

    async def run() -> list[str]:
        return [r["text"] async for r in held_back(results())]

    assert asyncio.run(run()) == ["x", "xy", "xy"]
    assert closed
