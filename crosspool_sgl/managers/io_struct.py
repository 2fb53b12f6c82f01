"""The messages between the server's processes: SGLang's io_struct, plus what SGLang has no equivalent for.

    tokenizer --TokenizedGenerateReqInput*, SchedulerInfoReqInput*, AbortReq, FlushCacheReqInput--> scheduler
    scheduler --MultiModelBatchTokenIDOutput*, FlushCacheReqOutput, SchedulerInfoReqOutput*--> detokenizer
    detokenizer --BatchStrOutput, the control replies unchanged--> tokenizer
    (* ours; every other class is SGLang's own, re-exported here)

Scheduler -> detokenizer -> tokenizer use SGLang's `sock_send`/`sock_recv`, so that path is
SGLang's wire format: pickle by default in 0.5.23, msgpack with `SGLANG_USE_PICKLE_IPC=0`; our
structs are registered with SGLang's `hook_custom_types` for the latter. Control replies pass the
detokenizer unchanged, so the tokenizer side reads one socket.

Ours, and why:
- `MultiModelBatchTokenIDOutput`: SGLang's `BatchTokenIDOutput` plus the `model` its rows belong
  to (one message per model per step), which picks the detokenizer's tokenizer.
- `TokenizedGenerateReqInput`: SGLang's carries an SGLang `SamplingParams` and ~30 fields we do not
  serve (multimodal, LoRA, sessions, disaggregation), and no model id; ours carries the model and
  our sampling dict. The tokenizer -> scheduler path stays pickled (`send_pyobj`) because of it.
- `SchedulerInfoReqInput`/`SchedulerInfoReqOutput`: the per-model pool usage behind
  /get_server_info and /metrics; SGLang's internal-state messages report one engine's scheduler.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, TypeVar

import msgspec
from sglang.srt.managers.io_struct import (
    AbortReq,
    BaseReq,
    BatchStrOutput,
    BatchTokenIDOutput,
    FlushCacheReqInput,
    FlushCacheReqOutput,
    hook_custom_types,
)

__all__ = [
    "with_unset_fields",
    "AbortReq",
    "BatchStrOutput",
    "BatchTokenIDOutput",
    "FlushCacheReqInput",
    "FlushCacheReqOutput",
    "MultiModelBatchTokenIDOutput",
    "SchedulerInfoReqInput",
    "SchedulerInfoReqOutput",
    "TokenizedGenerateReqInput",
]


S = TypeVar("S", bound=msgspec.Struct)


def with_unset_fields(cls: type[S], **given: Any) -> S:
    """`cls(**given)` with every required field not given set to None: SGLang's output structs
    have many required fields (hidden states, routed experts, ...) that we never fill, and deriving
    them from the struct keeps up with SGLang's next field instead of a hand-kept list."""
    unset = {f.name: None for f in msgspec.structs.fields(cls) if f.required and f.name not in given}
    return cls(**given, **unset)


@dataclass
class TokenizedGenerateReqInput:
    rid: str
    model: str
    input_ids: list[int]
    sampling_params: dict[str, Any]
    return_logprob: bool = False
    logprob_start_len: int = -1
    top_logprobs_num: int = 0


class MultiModelBatchTokenIDOutput(BatchTokenIDOutput, kw_only=True):
    """One model's rows of a scheduler step (SGLang's fields, decoded with that model's tokenizer)."""

    model: str


class SchedulerInfoReqInput(BaseReq, kw_only=True):
    """Ask for KV/weights pool usage and queue depths (for /get_server_info and /metrics)."""


class SchedulerInfoReqOutput(BaseReq, kw_only=True):
    info: dict[str, Any]


# msgpack decoding knows only registered structs (pickle, the default, needs no registration).
hook_custom_types(MultiModelBatchTokenIDOutput, SchedulerInfoReqInput, SchedulerInfoReqOutput)
