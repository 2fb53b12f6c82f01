"""One step's logit processing for one model's rows: penalties, min_new_tokens, grammar mask, logit_bias.

SGLang's order (`SamplingBatchInfo.apply_logits_bias` in overlap mode): penalties, grammar vocab
mask, then logit_bias; temperature/top-k/top-p follow in the sampler. Per-row parameters become
[B, 1] tensors and each step applies one batched op per processor (no per-row tensor work).
Logprobs stay those of the raw logits (see layers/sampler.py), so the raw tensor is left untouched.

Legend: B = rows sampled this step, V = vocab, P = penalised rows, G = rows with a grammar.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from crosspool_sgl.core.req import Req
from crosspool_sgl.layers.grammar import allocate_bitmask, apply_vocab_mask
from crosspool_sgl.layers.penalties import (
    PenaltyArgs,
    TokenCounts,
    apply_min_new_tokens,
    apply_penalties,
    logit_bias_tensor,
    stop_token_mask,
)

logger = logging.getLogger(__name__)


@dataclass
class SamplingState:
    """What outlives a step: each model's output-token counts of penalised requests."""

    device: torch.device
    counts: dict[str, TokenCounts] = field(default_factory=dict)

    def counts_for(self, model: str, vocab_size: int) -> TokenCounts:
        if model not in self.counts:
            self.counts[model] = TokenCounts(vocab_size, self.device)
        return self.counts[model]

    def release(self, req: Req) -> None:
        if req.model in self.counts:
            self.counts[req.model].release(req.rid)


@dataclass
class StepSampling:
    """What must happen once the step's tokens are sampled."""

    pen_rows: torch.Tensor | None = None  # [P]
    pen_slots: torch.Tensor | None = None  # [P]
    counts: TokenCounts | None = None
    grammar_rows: list[int] = field(default_factory=list)

    def after_sample(self, reqs: list[Req], next_ids: torch.Tensor) -> None:
        """Count the new tokens of penalised rows; advance each grammar by its row's token."""
        if self.counts is not None:
            self.counts.add(self.pen_slots, next_ids.index_select(0, self.pen_rows.cpu()))
        for i in self.grammar_rows:
            req = reqs[i]
            if req.grammar.accept_token(int(next_ids[i])):
                req.grammar_accepted += 1
            else:  # cannot happen with the mask applied; the request then runs unconstrained
                logger.error("grammar of %s rejected its sampled token %d", req.rid, int(next_ids[i]))


def needs_processing(reqs: list[Req]) -> bool:
    return any(
        r.params.has_penalties
        or r.params.logit_bias
        or len(r.output_ids) < r.params.min_new_tokens
        or r.grammar is not None
        for r in reqs
    )


def process_logits(
    logits: torch.Tensor, reqs: list[Req], eos_ids: tuple[int, ...], state: SamplingState
) -> tuple[torch.Tensor, StepSampling]:
    """logits [B, V] -> processed copy [B, V] (or logits itself when no row needs it), and the
    bookkeeping to run after sampling."""
    step = StepSampling()
    if not needs_processing(reqs):
        return logits, step
    out = logits.clone()
    shape, device = tuple(out.shape), out.device
    _penalties(out, reqs, state, step)
    _grammar_mask(out, reqs, step)
    short = [i for i, r in enumerate(reqs) if len(r.output_ids) < r.params.min_new_tokens]
    if short:
        stops = [list(eos_ids) + list(reqs[i].params.stop_token_ids) for i in short]
        keep = out.clone() if step.grammar_rows else None
        apply_min_new_tokens(out, stop_token_mask(short, stops, shape, device))
        if keep is not None:  # a grammar that allows only a stop token wins over min_new_tokens
            dead = torch.isinf(out).all(dim=1, keepdim=True)  # [B, 1]
            out = torch.where(dead, keep, out)
    biased = [i for i, r in enumerate(reqs) if r.params.logit_bias]
    if biased:
        out.add_(logit_bias_tensor(biased, [reqs[i].params.logit_bias for i in biased], shape, device))
    return out, step


def _penalties(out: torch.Tensor, reqs: list[Req], state: SamplingState, step: StepSampling) -> None:
    pen = [i for i, r in enumerate(reqs) if r.params.has_penalties]
    if not pen:
        return
    device = out.device
    counts = state.counts_for(reqs[0].model, out.shape[1])
    slots = counts.slots_for([reqs[i].rid for i in pen], [reqs[i].output_ids for i in pen])
    rows = torch.tensor(pen, dtype=torch.int64, device=device)

    def col(name: str) -> torch.Tensor:  # [P, 1]
        return torch.tensor([float(getattr(reqs[i].params, name)) for i in pen], device=device).unsqueeze(1)

    args = PenaltyArgs(
        counts.counts(slots), col("frequency_penalty"), col("presence_penalty"), col("repetition_penalty")
    )
    sub = out.index_select(0, rows)  # [P, V]
    apply_penalties(sub, args)
    out.index_copy_(0, rows, sub)
    step.pen_rows, step.pen_slots, step.counts = rows, slots, counts


def _grammar_mask(out: torch.Tensor, reqs: list[Req], step: StepSampling) -> None:
    rows = [i for i, r in enumerate(reqs) if r.grammar is not None and not r.grammar.is_terminated()]
    if not rows:
        return
    bitmask = allocate_bitmask(len(rows), out.shape[1])  # [G, W] on CPU, where matchers write
    for g, i in enumerate(rows):
        sync_grammar(reqs[i])
        reqs[i].grammar.fill_vocab_mask(bitmask, g)
    apply_vocab_mask(out, torch.tensor(rows, dtype=torch.int64, device=out.device), bitmask)
    step.grammar_rows = rows


def sync_grammar(req: Req) -> None:
    """Bring the matcher to the end of the request's output (rollback or replay), so a grammar is
    right whatever happened to the request between steps (retraction, a late attach)."""
    done, have = req.grammar_accepted, len(req.output_ids)
    if done > have:
        req.grammar.rollback(done - have)
        req.grammar_accepted = have
    for token in req.output_ids[req.grammar_accepted :]:
        if not req.grammar.accept_token(token):
            logger.error("grammar of %s rejects its own output token %d", req.rid, token)
            break
        req.grammar_accepted += 1
