"""For tests: SGLang's `BatchStrOutput` (the detokenizer's message, parallel per-request lists) ->
one `OutputDelta` per request: what the request gained since its previous row. (The server reads
these messages with SGLang's own TokenizerManager.)"""

from __future__ import annotations

from dataclasses import dataclass

from crosspool_sgl.managers.io_struct import BatchStrOutput


@dataclass
class OutputDelta:
    """One request's row of a BatchStrOutput: what it gained since its previous row."""

    text: str
    token_ids: list[int]
    logprobs: list[tuple[float, int]]
    top_logprobs: list[list]
    finish_reason: dict | None  # None while it runs
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    num_retractions: int
    input_logprobs: list | None  # once, when complete
    input_top_logprobs: list | None

    @classmethod
    def of(cls, batch: BatchStrOutput, i: int) -> OutputDelta:
        input_logprobs = input_top = None
        if batch.input_token_logprobs_val and batch.input_token_logprobs_val[i]:
            input_logprobs = _pairs(batch.input_token_logprobs_val[i], batch.input_token_logprobs_idx[i])
            input_top = _rows(batch.input_top_logprobs_val, batch.input_top_logprobs_idx, i)
        return cls(
            text=batch.output_strs[i],
            token_ids=list(batch.output_ids[i]),
            logprobs=_pairs(*_row(batch.output_token_logprobs_val, batch.output_token_logprobs_idx, i)),
            top_logprobs=_rows(batch.output_top_logprobs_val, batch.output_top_logprobs_idx, i),
            finish_reason=batch.finished_reasons[i],
            prompt_tokens=batch.prompt_tokens[i],
            completion_tokens=batch.completion_tokens[i],
            cached_tokens=batch.cached_tokens[i],
            num_retractions=batch.retraction_counts[i] if batch.retraction_counts else 0,
            input_logprobs=input_logprobs,
            input_top_logprobs=input_top,
        )


def _row(vals: list | None, idxs: list | None, i: int) -> tuple[list, list]:
    return ((vals[i] or []), (idxs[i] or [])) if vals else ([], [])


def _pairs(vals: list, idxs: list) -> list[tuple]:
    return list(zip(vals, idxs, strict=True))


def _rows(vals: list | None, idxs: list | None, i: int) -> list:
    """SGLang's per-position top-logprob value/index rows -> rows of (logprob, id) pairs (None kept)."""
    v, t = _row(vals, idxs, i)
    return [None if a is None else _pairs(a, b) for a, b in zip(v, t, strict=True)]
