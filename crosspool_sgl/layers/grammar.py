"""Structured output in the core: what a grammar must offer, and its vocab mask applied to a batch.

The core never imports a grammar library. A `GrammarCompiler` (SGLang's xgrammar backend, adapted in
`crosspool_sgl/constrained/`, injected by `runtime.py`) turns a request's constraint into a
`GrammarMatcher` off the step loop. Masks use xgrammar's packed layout: int32 words, bit j of word i
set when token 32*i + j is allowed.

Legend: B = rows sampled this step, V = vocab, W = ceil(V / 32) mask words.
"""

from __future__ import annotations

from concurrent.futures import Future
from typing import Protocol

import torch


class InvalidGrammarError(ValueError):
    """A constraint that does not compile; `field` is the request field that carried it."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"invalid {field}: {message.strip()}")
        self.field = field


class GrammarMatcher(Protocol):
    """One request's position in its grammar."""

    def accept_token(self, token: int) -> bool:
        """Advance by `token`; False (state unchanged) when the grammar rejects it."""
        ...

    def fill_vocab_mask(self, bitmask: torch.Tensor, row: int) -> None:
        """Write the allowed next tokens into row `row` of a CPU int32 bitmask [B, W]."""
        ...

    def is_terminated(self) -> bool:
        """The grammar accepted a stop token: the output is complete."""
        ...

    def rollback(self, k: int) -> None:
        """Undo the last `k` accepted tokens."""
        ...


class GrammarCompiler(Protocol):
    def compile(self, model: str, field: str, spec: str) -> Future[GrammarMatcher]:
        """Start compiling (cached per model and spec); the future raises InvalidGrammarError."""
        ...


def allocate_bitmask(rows: int, vocab_size: int) -> torch.Tensor:
    """[rows, W] int32, every token allowed (-1 = all bits set); CPU, where matchers write."""
    return torch.full((rows, (vocab_size + 31) // 32), -1, dtype=torch.int32)


def unpack_bitmask(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[B, W] int32 -> [B, V] bool (True = allowed)."""
    shifts = torch.arange(32, dtype=torch.int32, device=bitmask.device)
    bits = (bitmask.unsqueeze(-1) >> shifts) & 1  # [B, W, 32]; >> is arithmetic, & 1 keeps bit j
    return bits.view(bitmask.shape[0], -1)[:, :vocab_size].bool()


def apply_vocab_mask(logits: torch.Tensor, rows: torch.Tensor, bitmask: torch.Tensor) -> None:
    """In place: disallowed tokens of logits[rows] get -inf. logits [B, V], rows [G], bitmask [G, W]."""
    allowed = unpack_bitmask(bitmask.to(logits.device, non_blocking=True), logits.shape[1])  # [G, V]
    sub = logits.index_select(0, rows).masked_fill_(~allowed, float("-inf"))
    logits.index_copy_(0, rows, sub)
