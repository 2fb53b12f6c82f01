"""The engine core's `ReqOutput`s -> SGLang's `BatchTokenIDOutput`, one message per model and
destination per step (the destination: the `http_worker_ipc` the request came with, that is the
`ModelTokenizerManager` that sent it: the detokenizer routes by it, there is no default socket).

What SGLang's scheduler sends its detokenizer (its `output_streamer.py`), built from our outputs:
- `decode_ids`: the step's new token ids, `read_offsets` 0 and `decoded_texts` "" on the first
  message, so the DetokenizerManager's window starts at the first output token. (SGLang's scheduler
  seeds the window with up to 5 prompt tokens; we do not, so the text stays
  `tokenizer.decode(output_ids)`, as the offline engine and HF return it.)
- the decoding options of the request (`skip_special_tokens`, `spaces_between_special_tokens`,
  `no_stop_trim`), kept here from its arrival, and the model in `MultiModelBatchTokenIDOutput.model`;
- logprobs split into SGLang's parallel value/index lists.

Like SGLang's scheduler (`Req.check_match_stop_str_prefix`), an unfinished request whose output
ends in the beginning of one of its stop strings is held back until it finishes or the text moves
on: the detokenizer sends text incrementally and trims a matched stop string only from what it has
not sent yet.
"""

from __future__ import annotations

from array import array
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from crosspool_sgl.core.req import ReqOutput
from crosspool_sgl.managers.io_struct import MultiModelBatchTokenIDOutput, with_unset_fields

Detokenize = Callable[[list[int]], str]
_REPLACEMENT = "\ufffd"  # how a tokenizer decodes the bytes of an incomplete UTF-8 character
_TAIL_SLACK = 8  # tokens beyond the longest stop string in the tail checked for a stop prefix (as the core)


@dataclass(frozen=True)
class DetokenizeOptions:
    """A request's decoding options, sent with each of its rows (SGLang's BatchTokenIDOutput fields)."""

    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    no_stop_trim: bool = False
    stop: tuple[str, ...] = ()

    @classmethod
    def of(cls, params: Any) -> DetokenizeOptions:
        return cls(
            params.skip_special_tokens,
            params.spaces_between_special_tokens,
            params.no_stop_trim,
            tuple(params.stop),
        )


@dataclass
class _Stream:
    options: DetokenizeOptions
    dest: str | None = None  # the manager that sent it (SGLang's http_worker_ipc); None in unit tests only
    tail: list[int] = field(default_factory=list)  # the last output ids, for the stop-prefix check
    held: ReqOutput | None = None  # outputs not sent yet (they end in a stop string's beginning)


_DEFAULT = DetokenizeOptions()


class TokenIdOutputs:
    """Per-request state between the core's outputs and the detokenizer: options, held-back outputs."""

    def __init__(self, detokenizers: dict[str, Detokenize]) -> None:
        self.detokenizers = detokenizers  # the core's per-model tail decoders (special tokens kept)
        self.streams: dict[str, _Stream] = {}

    def add(self, rid: str, options: DetokenizeOptions, dest: str | None = None) -> None:
        self.streams[rid] = _Stream(options, dest)

    def forget(self, rid: str) -> None:
        self.streams.pop(rid, None)

    def convert(self, outputs: list[ReqOutput]) -> list[MultiModelBatchTokenIDOutput]:
        """The step's outputs, grouped by model and destination in order of appearance, minus those
        held back. One destination per message, so the detokenizer forwards it without splitting."""
        groups: dict[tuple[str, str | None], list[tuple[ReqOutput, DetokenizeOptions]]] = {}
        for out in outputs:
            out = self.release(out)
            if out is not None:
                stream = self.streams.pop(out.rid, None) if out.finished else self.streams.get(out.rid)
                stream = stream or _Stream(_DEFAULT)
                groups.setdefault((out.model, stream.dest), []).append((out, stream.options))
        return [to_batch_token_id_output(model, rows, dest) for (model, dest), rows in groups.items()]

    def release(self, out: ReqOutput) -> ReqOutput | None:
        """`out` merged with what was held back for its request; None if it is held back in turn."""
        stream = self.streams.get(out.rid)
        if stream is None:
            return out
        new_ids = out.new_token_ids
        if stream.held is not None:
            out, stream.held = merge(stream.held, out), None
        if out.finished or not stream.options.stop:
            return out
        longest = max(map(len, stream.options.stop)) + _TAIL_SLACK
        stream.tail = (stream.tail + new_ids)[-longest:]
        decode = self.detokenizers.get(out.model)
        if decode is not None and ends_in_stop_prefix(decode(stream.tail), stream.options.stop):
            stream.held = out
            return None
        return out


def ends_in_stop_prefix(text: str, stops: tuple[str, ...]) -> bool:
    """True when `text` holds a stop string or ends in the beginning of one (SGLang's check).

    An incomplete character at the end is ignored: the detokenizer sends the text before it, so that
    text must not end in a stop's beginning either (SGLang's check missed "ok " + half of "😀")."""
    text = text.rstrip(_REPLACEMENT)
    for stop in stops:
        if stop in text:
            return True
        if any(text.endswith(stop[:i]) for i in range(1, min(len(text), len(stop)) + 1)):
            return True
    return False


def merge(held: ReqOutput, out: ReqOutput) -> ReqOutput:
    """Two consecutive outputs of one request as one (the later one's counts and finish)."""
    sent_input = out.input_logprobs is not None  # input logprobs come once, with their top rows
    return replace(
        out,
        new_token_ids=held.new_token_ids + out.new_token_ids,
        new_logprobs=held.new_logprobs + out.new_logprobs,
        new_top_logprobs=held.new_top_logprobs + out.new_top_logprobs,
        input_logprobs=out.input_logprobs if sent_input else held.input_logprobs,
        input_top_logprobs=out.input_top_logprobs if sent_input else held.input_top_logprobs,
    )


def to_batch_token_id_output(
    model: str, rows: list[tuple[ReqOutput, DetokenizeOptions]], dest: str | None = None
) -> MultiModelBatchTokenIDOutput:
    """One model's outputs for one destination as SGLang's parallel per-request lists."""
    outs = [o for o, _ in rows]
    opts = [p for _, p in rows]
    n = len(outs)
    return with_unset_fields(
        MultiModelBatchTokenIDOutput,
        model=model,
        rids=[o.rid for o in outs],
        http_worker_ipcs=[dest] * n,
        finished_reasons=[_finish_reason(o) for o in outs],
        decoded_texts=[""] * n,
        decode_ids=[array("q", o.new_token_ids) for o in outs],
        read_offsets=[0] * n,
        output_ids=[array("q", o.new_token_ids) for o in outs],
        skip_special_tokens=[p.skip_special_tokens for p in opts],
        spaces_between_special_tokens=[p.spaces_between_special_tokens for p in opts],
        no_stop_trim=[p.no_stop_trim for p in opts],
        prompt_tokens=[o.prompt_tokens for o in outs],
        reasoning_tokens=[0] * n,
        completion_tokens=[o.completion_tokens for o in outs],
        cached_tokens=[o.cached_tokens for o in outs],
        retraction_counts=[o.num_retractions for o in outs],
        **_logprob_lists(outs),
    )


def _finish_reason(out: ReqOutput) -> dict | None:
    """None while running (SGLang's "still streaming"); a finished output always carries a reason."""
    if not out.finished:
        return None
    return out.finish_reason or {"type": "stop", "matched": None}


def _pairs(pairs: list | None) -> tuple[list, list]:
    """[(logprob, token id), ...] -> ([logprob, ...], [token id, ...])."""
    pairs = pairs or []
    return [p[0] for p in pairs], [p[1] for p in pairs]


def _rows(rows: list | None) -> tuple[list, list]:
    """Top-logprob rows (a None row: a position without them) -> SGLang's value and index rows."""
    vals, idxs = [], []
    for row in rows or []:
        v, i = (None, None) if row is None else _pairs(row)
        vals.append(v)
        idxs.append(i)
    return vals, idxs


def _logprob_lists(outs: list[ReqOutput]) -> dict[str, list]:
    in_tok = [_pairs(o.input_logprobs) for o in outs]
    out_tok = [_pairs(o.new_logprobs) for o in outs]
    in_top = [_rows(o.input_top_logprobs) for o in outs]
    out_top = [_rows(o.new_top_logprobs) for o in outs]
    n = len(outs)
    return {
        "input_token_logprobs_val": [v for v, _ in in_tok],
        "input_token_logprobs_idx": [i for _, i in in_tok],
        "output_token_logprobs_val": [v for v, _ in out_tok],
        "output_token_logprobs_idx": [i for _, i in out_tok],
        "input_top_logprobs_val": [v for v, _ in in_top],
        "input_top_logprobs_idx": [i for _, i in in_top],
        "output_top_logprobs_val": [v for v, _ in out_top],
        "output_top_logprobs_idx": [i for _, i in out_top],
        "input_token_ids_logprobs_val": [[] for _ in range(n)],
        "input_token_ids_logprobs_idx": [[] for _ in range(n)],
        "output_token_ids_logprobs_val": [[] for _ in range(n)],
        "output_token_ids_logprobs_idx": [[] for _ in range(n)],
    }
