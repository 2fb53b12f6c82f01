"""Penalties as SGLang defines them, over each request's own output tokens, for a whole batch at once.

SGLang's `sglang.srt.sampling.penaltylib` semantics (tests/layers/test_penalties.py checks them against
those classes):

- frequency: ``logits -= frequency_penalty * count(token)``
- presence: ``logits -= presence_penalty * (count(token) > 0)``
- repetition: for tokens seen, ``logits * rep`` where negative, ``logits / rep`` where positive
- min_new_tokens: stop tokens (EOS and stop_token_ids) get ``-inf`` while fewer tokens were produced

Applied in SGLang's overlap order: the additive terms, then the multiplicative one. The output-token
counts live in a `TokenCounts` buffer: one row per request (a slot), updated by one scatter per step.

Legend: B = rows sampled this step, V = vocab, S = slots in the count buffer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


class TokenCounts:
    """Output-token counts of live requests, [S, V] int32 on the model's device; a request keeps its
    slot until released. A slot whose count disagrees with the request's history is rebuilt from it,
    so the counts stay right however the history got there (retraction, a late first use)."""

    def __init__(self, vocab_size: int, device: torch.device, capacity: int = 8) -> None:
        self.vocab_size = vocab_size
        self.device = device
        self.table = torch.zeros(capacity, vocab_size, dtype=torch.int32, device=device)  # [S, V]
        self.slots: dict[str, int] = {}
        self.lengths: list[int] = [0] * capacity  # tokens counted in each slot
        self.free: list[int] = list(range(capacity - 1, -1, -1))

    def slots_for(self, keys: list[str], histories: list[list[int]]) -> torch.Tensor:
        """Slot ids [B] (int64, on device) of these requests, rows synced to their histories."""
        out = []
        for key, hist in zip(keys, histories, strict=True):
            slot = self.slots.get(key)
            if slot is None:
                slot = self.slots[key] = self._take()
                self.lengths[slot] = -1  # force a rebuild below
            if self.lengths[slot] != len(hist):
                self._rebuild(slot, hist)
            out.append(slot)
        return torch.tensor(out, dtype=torch.int64, device=self.device)

    def counts(self, slots: torch.Tensor) -> torch.Tensor:
        """[B] slot ids -> [B, V] counts."""
        return self.table.index_select(0, slots)

    def add(self, slots: torch.Tensor, tokens: torch.Tensor) -> None:
        """Count one new token per row: slots [B], tokens [B]."""
        ones = torch.ones(slots.numel(), dtype=torch.int32, device=self.device)
        self.table.index_put_((slots, tokens.to(self.device)), ones, accumulate=True)
        for s in slots.tolist():
            self.lengths[s] += 1

    def release(self, key: str) -> None:
        slot = self.slots.pop(key, None)
        if slot is not None:
            self.free.append(slot)

    def _take(self) -> int:
        if not self.free:
            old = self.table.shape[0]
            grown = torch.zeros(old * 2, self.vocab_size, dtype=torch.int32, device=self.device)
            grown[:old] = self.table
            self.table = grown
            self.lengths += [0] * old
            self.free = list(range(2 * old - 1, old - 1, -1))
        return self.free.pop()

    def _rebuild(self, slot: int, hist: list[int]) -> None:
        row = torch.zeros(self.vocab_size, dtype=torch.int32, device=self.device)
        if hist:
            ids = torch.tensor(hist, dtype=torch.int64, device=self.device)
            row.index_add_(0, ids, torch.ones_like(ids, dtype=torch.int32))
        self.table[slot] = row
        self.lengths[slot] = len(hist)


@dataclass(frozen=True)
class PenaltyArgs:
    """Per-row penalty parameters, [B, 1] float32 each, and the rows' counts [B, V]."""

    counts: torch.Tensor  # [B, V] int32
    frequency: torch.Tensor  # [B, 1]
    presence: torch.Tensor  # [B, 1]
    repetition: torch.Tensor  # [B, 1]


def apply_penalties(logits: torch.Tensor, args: PenaltyArgs) -> None:
    """In place on logits [B, V] (fp32): additive frequency/presence, then repetition scaling."""
    counts = args.counts.to(logits.dtype)  # [B, V]
    seen = args.counts > 0  # [B, V]
    logits.sub_(args.frequency * counts)
    logits.sub_(args.presence * seen.to(logits.dtype))
    scale = torch.where(seen, args.repetition, torch.ones_like(args.repetition))  # [B, V]
    logits.copy_(torch.where(logits < 0, logits * scale, logits / scale))


def stop_token_mask(
    rows: list[int], stop_ids: list[list[int]], shape: tuple[int, int], device
) -> torch.Tensor:
    """[B, V] bool: True at the stop tokens of the listed rows (those still short of min_new_tokens)."""
    mask = torch.zeros(shape, dtype=torch.bool, device=device)
    r = [row for row, ids in zip(rows, stop_ids, strict=True) for t in ids if 0 <= t < shape[1]]
    c = [t for ids in stop_ids for t in ids if 0 <= t < shape[1]]
    if r:
        mask[torch.tensor(r, device=device), torch.tensor(c, device=device)] = True
    return mask


def apply_min_new_tokens(logits: torch.Tensor, mask: torch.Tensor) -> None:
    """In place: stop tokens [B, V] (bool) of rows below their min_new_tokens can't be sampled."""
    logits.masked_fill_(mask, float("-inf"))


def logit_bias_tensor(
    rows: list[int], biases: list[dict[int, float]], shape: tuple[int, int], device
) -> torch.Tensor:
    """[B, V] additive bias from per-row {token id: bias} (OpenAI's logit_bias)."""
    bias = torch.zeros(shape, dtype=torch.float32, device=device)
    r = [row for row, b in zip(rows, biases, strict=True) for _ in b]
    c = [t for b in biases for t in b]
    v = [x for b in biases for x in b.values()]
    if r:
        bias[torch.tensor(r, device=device), torch.tensor(c, device=device)] = torch.tensor(v, device=device)
    return bias
