"""The messages between the server's processes: SGLang's io_struct, two subclasses adding the model.

    tokenizer   --MultiModelTokenizedGenerateReqInput*, AbortReq, FlushCacheReqInput,
                  GetInternalStateReq--> scheduler
    scheduler   --MultiModelBatchTokenIDOutput*, FlushCacheReqOutput,
                  GetInternalStateReqOutput--> detokenizer
    detokenizer --BatchStrOutput, the control replies unchanged--> tokenizer (the `http_worker_ipc`
                  the request or control message came with: the per-model
                  ModelTokenizerManager's own address)
    (* SGLang's struct plus a `model` field; every other class is SGLang's own, re-exported here)

Every hop uses SGLang's `sock_send`/`sock_recv`, so the wire format is SGLang's: pickle by default
in 0.5.23, msgpack with `SGLANG_USE_PICKLE_IPC=0`; our two subclasses are registered with SGLang's
`hook_custom_types` for the latter. Control replies pass the detokenizer unchanged, so each
model's manager reads one socket.

Ours, and why: SGLang's server serves one model, so neither its request nor its output names one.
- `MultiModelTokenizedGenerateReqInput`: SGLang's `TokenizedGenerateReqInput` (its `SamplingParams`,
  normalised as SGLang's TokenizerManager leaves it) plus the model it is for.
- `MultiModelBatchTokenIDOutput`: SGLang's `BatchTokenIDOutput` plus the `model` its rows belong
  to (one message per model and destination per step), which picks the detokenizer's tokenizer.
`GetInternalStateReqOutput.internal_state` carries the per-model pool usage behind /get_server_info
and /metrics (SGLang's carries its one scheduler's state).
"""

from __future__ import annotations

from typing import Any, TypeVar

import msgspec
from sglang.srt.managers.io_struct import (
    AbortReq,
    BatchStrOutput,
    BatchTokenIDOutput,
    BatchTokenizedGenerateReqInput,
    FlushCacheReqInput,
    FlushCacheReqOutput,
    GetInternalStateReq,
    GetInternalStateReqOutput,
    TokenizedGenerateReqInput,
    hook_custom_types,
)
from sglang.srt.sampling.sampling_params import SamplingParams

__all__ = [
    "with_unset_fields",
    "AbortReq",
    "BatchStrOutput",
    "BatchTokenIDOutput",
    "BatchTokenizedGenerateReqInput",
    "FlushCacheReqInput",
    "FlushCacheReqOutput",
    "GetInternalStateReq",
    "GetInternalStateReqOutput",
    "MultiModelBatchTokenIDOutput",
    "MultiModelTokenizedGenerateReqInput",
    "SamplingParams",
    "TokenizedGenerateReqInput",
]


S = TypeVar("S", bound=msgspec.Struct)


def with_unset_fields(cls: type[S], **given: Any) -> S:
    """`cls(**given)` with every required field not given set to None: SGLang's output structs
    have many required fields (hidden states, routed experts, ...) that we never fill, and deriving
    them from the struct keeps up with SGLang's next field instead of a hand-kept list."""
    unset = {f.name: None for f in msgspec.structs.fields(cls) if f.required and f.name not in given}
    return cls(**given, **unset)


class MultiModelTokenizedGenerateReqInput(TokenizedGenerateReqInput, kw_only=True):
    """One tokenised request for one hosted model (SGLang's fields; SGLang's TokenizerManager builds it,
    `ModelTokenizerManager.tokenized_generate_req_type` adds the model)."""

    model: str


class MultiModelBatchTokenIDOutput(BatchTokenIDOutput, kw_only=True):
    """One model's rows of a scheduler step (SGLang's fields, decoded with that model's tokenizer)."""

    model: str


# msgpack decoding knows only registered structs (pickle, the default, needs no registration).
hook_custom_types(MultiModelTokenizedGenerateReqInput, MultiModelBatchTokenIDOutput)
