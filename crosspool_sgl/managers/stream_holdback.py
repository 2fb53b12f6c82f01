"""Which cumulative results a streaming client sees, so that the stream adds up to the final result.

The start of a stop string is held back once, in the scheduler process, as SGLang's scheduler does
(`managers/token_id_output.py`, SGLang's `Req.check_match_stop_str_prefix`): the detokenizer trims a
matched stop string only from text it has not sent, so nothing ending in a stop's beginning may
leave the scheduler. The text this side receives therefore only grows, and every cumulative result
is a prefix of the final one: no second stop check is needed here.

What is left to this side: results whose visible text did not grow (an incomplete UTF-8 sequence
the detokenizer holds, a token that decodes to nothing). The handlers compute a chunk's logprobs
from the entries new since the last result, and SGLang's chat handler drops them when the text
delta is empty, so such a result is kept back until text shows, but only when the request asked
for logprobs: otherwise a step without text still goes out (an empty chunk, as stock SGLang streams
one per step), or a model whose tokens decode to nothing (special tokens, skipped) would stream no
chunk until it finishes. The final result always passes.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

__all__ = ["StreamHoldback", "held_back"]


class StreamHoldback:
    """One streamed request: a result with logprobs goes through only when it shows new text."""

    def __init__(self) -> None:
        self.released_chars = 0

    def release(self, result: dict[str, Any]) -> bool:
        if result["meta_info"].get("finish_reason") is not None:
            return True
        text = result["text"]
        if len(text) <= self.released_chars and "output_token_logprobs" in result["meta_info"]:
            return False  # its logprob entries go out with the text they belong to
        self.released_chars = len(text)
        return True


async def held_back(results: AsyncGenerator[dict[str, Any], None]) -> AsyncIterator[dict[str, Any]]:
    """The results of one streamed request that a client may see (see the module docstring)."""
    gate = StreamHoldback()
    try:
        async for result in results:
            if gate.release(result):
                yield result
    finally:
        await results.aclose()  # a client that left: abort the request now, not at garbage collection
