"""The detokenizer process: token ids -> cumulative text, one HF tokenizer per model.

Like SGLang's DetokenizerManager it sits between the scheduler and the
tokenizer side and forwards control replies unchanged. We don't subclass
SGLang's class: it holds one tokenizer built from the process-global
ServerArgs and its batch messages carry one model's fields only.

It also trims a matched stop string from the final text.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import signal
from dataclasses import dataclass, field
from typing import Any

import zmq

from crosspool_sgl.core.req import ReqOutput
from crosspool_sgl.managers.io_struct import BatchStrOutput, BatchTokenIDOutput, DetokenizeHints, StrOutput
from crosspool_sgl.managers.result_format import trim_stop

logger = logging.getLogger(__name__)

_REPLACEMENT = "\ufffd"  # a partial UTF-8 sequence: hold the text back until the next token


@dataclass
class DecodeState:
    model: str
    hints: DetokenizeHints
    output_ids: list[int] = field(default_factory=list)
    text: str = ""


class MultiModelDetokenizer:
    def __init__(self, tokenizers: dict[str, Any]) -> None:
        self.tokenizers = tokenizers
        self.states: dict[str, DecodeState] = {}

    def handle_batch(self, batch: BatchTokenIDOutput) -> BatchStrOutput:
        return BatchStrOutput([self.handle_one_safely(o, batch.hints.get(o.rid)) for o in batch.outputs])

    def handle_one_safely(self, out: ReqOutput, hints: DetokenizeHints | None) -> StrOutput:
        """A failure to decode one request's tokens finishes that request with a 500, nothing else."""
        try:
            return self.handle_one(out, hints)
        except Exception as e:
            logger.exception("detokenizing %s failed", out.rid)
            self.states.pop(out.rid, None)
            reason = {"type": "abort", "message": f"detokenization failed: {e}", "status_code": 500}
            return StrOutput(out.rid, out.model, "", [], [], [], True, reason, out.prompt_tokens, 0)

    def handle_one(self, out: ReqOutput, hints: DetokenizeHints | None) -> StrOutput:
        state = self.states.get(out.rid)
        if state is None:
            state = self.states[out.rid] = DecodeState(out.model, hints or DetokenizeHints())
        new_ids = list(out.new_token_ids)
        state.output_ids += new_ids
        text = self.decode(state)
        if out.finished:
            self.states.pop(out.rid, None)
            text = self.trim_stop(text, out.finish_reason, state.hints)
        elif not text.endswith(_REPLACEMENT):
            state.text = text
        else:
            text = state.text
        return StrOutput(
            rid=out.rid,
            model=out.model,
            text=text,
            new_token_ids=new_ids,
            new_logprobs=list(out.new_logprobs),
            new_top_logprobs=list(out.new_top_logprobs),
            finished=out.finished,
            finish_reason=out.finish_reason,
            prompt_tokens=out.prompt_tokens,
            completion_tokens=out.completion_tokens,
            cached_tokens=out.cached_tokens,
            num_retractions=out.num_retractions,
            input_logprobs=out.input_logprobs,
            input_top_logprobs=out.input_top_logprobs,
        )

    def decode(self, state: DecodeState) -> str:
        tok = self.tokenizers[state.model]
        return tok.decode(state.output_ids, skip_special_tokens=state.hints.skip_special_tokens)

    @staticmethod
    def trim_stop(text: str, reason: dict | None, hints: DetokenizeHints) -> str:
        return trim_stop(text, reason, hints.no_stop_trim)  # the Engine trims the same way


def run_detokenizer_process(
    model_paths: dict[str, str],
    recv_addr: str,
    send_addr: str,
    pipe_writer: Any,
    log_level: str = "info",
) -> None:
    """Process entry (top level for `spawn`): recv from the scheduler, send to the tokenizer side."""
    logging.basicConfig(level=log_level.upper(), format="[detokenizer] %(asctime)s %(levelname)s %(message)s")
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    from transformers import AutoTokenizer

    detok = MultiModelDetokenizer({n: AutoTokenizer.from_pretrained(p) for n, p in model_paths.items()})
    context = zmq.Context(2)
    receiver = context.socket(zmq.PULL)
    receiver.bind(recv_addr)
    sender = context.socket(zmq.PUSH)
    sender.connect(send_addr)
    stopping = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(True))
    pipe_writer.send({"status": "ready"})
    parent = mp.parent_process()
    while not stopping:
        if not receiver.poll(1000):
            if parent is not None and not parent.is_alive():
                return
            continue
        try:
            msg = receiver.recv_pyobj()
            sender.send_pyobj(detok.handle_batch(msg) if isinstance(msg, BatchTokenIDOutput) else msg)
        except Exception:  # one bad message must not end the process every model depends on
            logger.exception("failed to forward a message")
