"""Typed messages between the server's processes (pickled over ZMQ), named after SGLang's io_struct.

    HTTP/tokenizer --TokenizedGenerateReqInput, AbortReq, *ReqInput--> scheduler
    scheduler --BatchTokenIDOutput, *ReqOutput--> detokenizer --BatchStrOutput, *ReqOutput--> tokenizer

Control replies (`SchedulerInfoReqOutput`, `FlushCacheReqOutput`) pass the
detokenizer unchanged, so the tokenizer side reads one socket, as in SGLang.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from crosspool_sgl.core.req import ReqOutput


@dataclass
class TokenizedGenerateReqInput:
    rid: str
    model: str
    input_ids: list[int]
    sampling_params: dict[str, Any]
    return_logprob: bool = False
    logprob_start_len: int = -1
    top_logprobs_num: int = 0


@dataclass
class AbortReq:
    rid: str


@dataclass
class FlushCacheReqInput:
    req_id: str


@dataclass
class FlushCacheReqOutput:
    req_id: str
    success: bool


@dataclass
class SchedulerInfoReqInput:
    """Ask for KV/weights pool usage and queue depths (for /get_server_info and /metrics)."""

    req_id: str


@dataclass
class SchedulerInfoReqOutput:
    req_id: str
    info: dict[str, Any]


@dataclass
class DetokenizeHints:
    """Per-request decoding options the detokenizer needs (SGLang sends them in BatchTokenIDOutput)."""

    skip_special_tokens: bool = True
    no_stop_trim: bool = False


@dataclass
class BatchTokenIDOutput:
    outputs: list[ReqOutput]
    hints: dict[str, DetokenizeHints] = field(default_factory=dict)  # rid -> hints, first output only


@dataclass
class StrOutput:
    """One request's progress after detokenization: cumulative text, new ids and logprobs."""

    rid: str
    model: str
    text: str  # cumulative, stop string trimmed once finished
    new_token_ids: list[int]
    new_logprobs: list[tuple[float, int]]
    new_top_logprobs: list[list]
    finished: bool
    finish_reason: dict | None
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0
    num_retractions: int = 0
    input_logprobs: list | None = None
    input_top_logprobs: list | None = None


@dataclass
class BatchStrOutput:
    outputs: list[StrOutput]
