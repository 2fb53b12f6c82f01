"""Which cumulative results a streaming client sees, so that the stream adds up to the final result.

SGLang's scheduler does not send a streaming request's output while the generated text ends in
the start of a stop string (`Req.check_match_stop_str_prefix`, called from the output streamer):
that text is either trimmed at the finish or released with the token that breaks the match. Our
scheduler sends every step, so the tokenizer side applies the same rule to the cumulative results
before the handlers compute deltas. It also keeps back results whose visible text did not grow
(an incomplete UTF-8 sequence the detokenizer holds, a token that decodes to nothing): the
handlers compute a chunk's logprobs from the entries new since the last result, and SGLang's chat
handler drops them when the text delta is empty. Holding the whole result keeps tokens, logprobs
and text of a step together, as SGLang's scheduler does — but only when the request asked for
logprobs: otherwise a step without text still goes out (an empty chunk, as stock SGLang streams
one per step), or a model whose tokens decode to nothing (special tokens, skipped) would stream
no chunk until it finishes. The final result always passes.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator, Iterable
from typing import Any

__all__ = ["StreamHoldback", "held_back", "stop_prefix_len", "stop_strings"]


def stop_strings(sampling_params: dict[str, Any] | None) -> tuple[str, ...]:
    """The request's stop strings (a string or a list; empty strings never match)."""
    stop = (sampling_params or {}).get("stop")
    if stop is None:
        return ()
    stops = [stop] if isinstance(stop, str) else list(stop)
    return tuple(s for s in stops if isinstance(s, str) and s)


def stop_prefix_len(text: str, stops: Iterable[str]) -> int:
    """Length of the longest suffix of `text` that is the start of a stop string (0: none)."""
    best = 0
    for stop in stops:
        for n in range(min(len(text), len(stop)), best, -1):
            if text.endswith(stop[:n]):
                best = n
                break
    return best


class StreamHoldback:
    """One streamed request: lets a cumulative result through only when it shows new, settled text."""

    def __init__(self, stops: Iterable[str]) -> None:
        self.stops = tuple(stops)
        self.released_chars = 0

    def release(self, result: dict[str, Any]) -> bool:
        if result["meta_info"].get("finish_reason") is not None:
            return True
        text = result["text"]
        if stop_prefix_len(text, self.stops):
            return False
        if len(text) <= self.released_chars and "output_token_logprobs" in result["meta_info"]:
            return False  # its logprob entries go out with the text they belong to
        self.released_chars = len(text)
        return True


async def held_back(
    results: AsyncGenerator[dict[str, Any], None], sampling_params: dict[str, Any] | None
) -> AsyncIterator[dict[str, Any]]:
    """The results of one streamed request that a client may see (see the module docstring)."""
    gate = StreamHoldback(stop_strings(sampling_params))
    try:
        async for result in results:
            if gate.release(result):
                yield result
    finally:
        await results.aclose()  # a client that left: abort the request now, not at garbage collection
