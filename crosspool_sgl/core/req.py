"""The request object that travels end to end through the scheduler."""

from __future__ import annotations

import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from enum import Enum

import torch

from crosspool_sgl.layers.grammar import GrammarMatcher
from crosspool_sgl.sampling_params import SamplingParams


class ReqState(Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)  # identity: `in` / `remove` on the queues compare requests, not their fields
class Req:
    rid: str
    model: str
    input_ids: list[int]
    params: SamplingParams
    return_logprob: bool = False
    logprob_start_len: int = -1  # first prompt position whose logprob is returned; -1: none
    top_logprobs_num: int = 0
    arrival_time: float = field(default_factory=time.monotonic)

    # progress
    output_ids: list[int] = field(default_factory=list)
    pages: list[int] = field(default_factory=list)
    num_cached: int = 0  # tokens of fill_ids whose K/V are in `pages`
    state: ReqState = ReqState.WAITING
    finish_reason: dict | None = None
    num_retractions: int = 0
    cached_tokens: int = 0  # prompt tokens served from the prefix cache
    cache_nodes: list = field(default_factory=list)  # PrefixNodes whose pages lead `pages`
    generator: torch.Generator | None = None

    # logprobs: (logprob, token id) pairs; top-n lists of (logprob, token id)
    input_logprobs: list[tuple[float | None, int]] = field(default_factory=list)
    output_logprobs: list[tuple[float, int]] = field(default_factory=list)
    input_top_logprobs: list[list | None] = field(default_factory=list)
    output_top_logprobs: list[list] = field(default_factory=list)
    input_logprobs_sent: bool = False  # the client's manager appends what it gets: send them once

    # timings
    admitted_time: float | None = None  # when it last started running (None while waiting)
    first_token_time: float | None = None
    finished_time: float | None = None

    # structured output: compiling (future) until the scheduler attaches the matcher
    grammar_future: Future | None = None
    grammar: GrammarMatcher | None = None
    grammar_accepted: int = 0  # output tokens the matcher has accepted (see sampling_batch.sync_grammar)

    def __post_init__(self) -> None:
        if self.params.seed is not None:
            self.generator = torch.Generator().manual_seed(self.params.seed)

    @property
    def fill_ids(self) -> list[int]:
        """Every token whose K/V the cache must hold before the next sample."""
        return self.input_ids + self.output_ids

    @property
    def num_uncached(self) -> int:
        return len(self.input_ids) + len(self.output_ids) - self.num_cached

    @property
    def finished(self) -> bool:
        return self.state is ReqState.FINISHED

    def finish(self, reason: dict) -> None:
        self.state = ReqState.FINISHED
        self.finish_reason = reason
        self.finished_time = time.monotonic()


@dataclass
class ReqOutput:
    """What one scheduler step produced for one request (incremental)."""

    rid: str
    model: str
    new_token_ids: list[int]
    new_logprobs: list[tuple[float, int]]
    new_top_logprobs: list[list]
    finished: bool
    finish_reason: dict | None
    prompt_tokens: int
    completion_tokens: int
    input_logprobs: list[tuple[float | None, int]] | None = None  # sent once, when complete
    input_top_logprobs: list | None = None
    num_retractions: int = 0
    cached_tokens: int = 0
