"""SGLang's result dict (`text`, `output_ids`, `meta_info`), built one way for the server and the Engine.

The tokenizer side (`tokenizer_manager.py`) and the offline Engine (`engine.py`) both return
what SGLang's `TokenizerManager` / `Engine.generate` return; the detokenizer and the Engine trim
a matched stop string the same way. Logprob entries are SGLang's triples
`[logprob, token_id, text or None]` (the text with `return_text_in_logprobs`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["LogprobLists", "format_result", "trim_stop"]

Decode = Callable[[int], str] | None  # token id -> its text, for `return_text_in_logprobs`


def trim_stop(text: str, finish_reason: dict | None, no_stop_trim: bool = False) -> str:
    """The text up to the stop string it finished on (SGLang's default; `no_stop_trim` keeps it)."""
    matched = (finish_reason or {}).get("matched")
    if isinstance(matched, str) and not no_stop_trim and matched in text:
        return text[: text.index(matched)]
    return text


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
