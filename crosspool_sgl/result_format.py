"""The offline Engine's result dict (`text`, `output_ids`, `meta_info`): what the server returns.

The server's results are built by SGLang's own code (its `DetokenizerManager` trims, its
`TokenizerManager` formats). The offline Engine cannot use that code: it runs no manager, and
importing SGLang's managers costs ~12 s, which an `import crosspool_sgl` must not. So this module
follows SGLang's rules (its `DetokenizerManager.trim_matched_stop`, `TokenizerManager`'s
`detokenize_logprob_tokens`), and a test holds the Engine's results equal to the server's for stop
strings and stop tokens, trimmed or not, with logprob entries and their texts
(tests/managers/test_model_tokenizer_manager.py). Logprob entries are SGLang's triples
`[logprob, token_id, text or None]` (the text with `return_text_in_logprobs`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["LogprobLists", "format_result", "ids_to_decode", "trim_stop"]

Decode = Callable[[int], str] | None  # token id -> its text, for `return_text_in_logprobs`


def trim_stop(text: str, finish_reason: dict | None, no_stop_trim: bool = False) -> str:
    """The text up to the stop string it finished on; with `no_stop_trim`, up to its end."""
    matched = (finish_reason or {}).get("matched")
    if not isinstance(matched, str) or (pos := text.find(matched)) < 0:
        return text
    return text[: pos + len(matched)] if no_stop_trim else text[:pos]


def ids_to_decode(ids: Sequence[int], finish_reason: dict | None, no_stop_trim: bool = False) -> list[int]:
    """The output ids whose text the result shows: without the stop token it finished on (its
    `output_ids` keep it), unless `no_stop_trim`."""
    matched = (finish_reason or {}).get("matched")
    if isinstance(matched, int) and not isinstance(matched, bool) and ids and not no_stop_trim:
        return list(ids[:-1])
    return list(ids)


@dataclass
class LogprobLists:
    """A request's (logprob, token id) pairs; `top_*` rows only with top_logprobs_num > 0."""

    output: Sequence[tuple[float, int]]
    input: Sequence[tuple[float | None, int]] = ()
    output_top: Sequence[Sequence[tuple[float, int]]] | None = None
    input_top: Sequence[Sequence[tuple[float, int]] | None] | None = None


def _entries(pairs: Sequence[tuple[float | None, int]], decode: Decode) -> list[list]:
    return [[lp, t, decode(t) if decode is not None else None] for lp, t in pairs]


def format_result(
    text: str, output_ids: Sequence[int], meta: dict[str, Any], logprobs: LogprobLists | None, decode: Decode
) -> dict[str, Any]:
    """One request's result: `meta` (id, model, finish_reason, token counts, ...) plus its logprobs."""
    meta = dict(meta)
    if logprobs is not None:
        meta["input_token_logprobs"] = _entries(logprobs.input, decode)
        meta["output_token_logprobs"] = _entries(logprobs.output, decode)
        if logprobs.output_top is not None:
            meta["input_top_logprobs"] = [
                None if row is None else _entries(row, decode) for row in (logprobs.input_top or [])
            ]
            meta["output_top_logprobs"] = [_entries(row, decode) for row in logprobs.output_top]
    return {"text": text, "output_ids": list(output_ids), "meta_info": meta}
