"""The streaming gate: a result passes only with new text that cannot turn out to be a stop string."""

from __future__ import annotations

import asyncio

from crosspool_sgl.managers.stream_holdback import StreamHoldback, held_back, stop_prefix_len, stop_strings


def result(text: str, finished: bool = False, logprobs: bool = True) -> dict:
    reason = {"type": "stop", "matched": "ccc"} if finished else None
    meta = {"finish_reason": reason}
    if logprobs:
        meta["output_token_logprobs"] = []
    return {"text": text, "output_ids": [], "meta_info": meta}


def test_stop_prefix_len_is_the_longest_suffix_starting_a_stop_string():
    assert stop_prefix_len("abcc", ["ccc"]) == 2
    assert stop_prefix_len("abc", ["ccc", "bcx"]) == 2
    assert stop_prefix_len("abd", ["ccc"]) == 0
    assert stop_prefix_len("", ["ccc"]) == 0
    assert stop_prefix_len("xa", []) == 0


def test_stop_strings_accepts_a_string_or_a_list():
    assert stop_strings({"stop": "ccc"}) == ("ccc",)
    assert stop_strings({"stop": ["a", ""]}) == ("a",)
    assert stop_strings({}) == stop_strings(None) == ()


def test_the_start_of_a_stop_string_waits_for_the_token_that_decides():
    gate = StreamHoldback(["ccc"])
    seen = [r["text"] for r in map(result, ["ab", "abc", "abcc", "abccd"]) if gate.release(r)]
    assert seen == ["ab", "abccd"]  # "abc"/"abcc" could still end in the stop string
    assert gate.release(result("abccd", finished=True))


def test_a_result_without_new_text_waits_so_its_logprobs_travel_with_text():
    gate = StreamHoldback([])
    assert [gate.release(result(t)) for t in ["a", "a", "a", "ab"]] == [True, False, False, True]
    assert gate.release(result("ab", finished=True))  # the final result always passes


def test_without_logprobs_a_step_without_text_still_streams():
    """A model whose tokens decode to nothing (special tokens, skipped) must still stream a chunk
    per step, as stock SGLang does: the benchmark's llama requests showed no first token at all."""
    gate = StreamHoldback(["ccc"])
    assert [gate.release(result(t, logprobs=False)) for t in ["", "", "a", "ac"]] == [True, True, True, False]


def test_held_back_filters_a_stream_and_closes_it():
    closed = []

    async def results():
        try:
            for t in ["x", "xc", "xcc"]:
                yield result(t)
            yield result("x", finished=True)
        finally:
            closed.append(True)

    async def run() -> list[str]:
        return [r["text"] async for r in held_back(results(), {"stop": "ccc"})]

    assert asyncio.run(run()) == ["x", "x"]
    assert closed
