"""Token sampling: greedy, temperature, top-k, top-p, min-p, per-request seeds.

Logprobs are those of the model's raw distribution (log_softmax of the
logits before temperature/top-k/top-p), which is what Hugging Face's
``output_scores``-based checks and OpenAI's ``logprobs`` report.

Legend: B = rows (one per sequence sampled this step), V = vocab.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingRow:
    temperature: float
    top_p: float
    top_k: int
    min_p: float
    generator: torch.Generator | None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1


def sample(logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    """logits [B, V] fp32 -> next token ids [B] (int64, on CPU)."""
    out = torch.argmax(logits, dim=-1).cpu()
    for i, row in enumerate(rows):
        if not row.greedy:
            out[i] = _sample_row(logits[i], row)
    return out


def _sample_row(logits: torch.Tensor, row: SamplingRow) -> int:
    scaled = logits / row.temperature  # [V]
    if row.top_k > 0:
        kth = torch.topk(scaled, min(row.top_k, scaled.numel())).values[-1]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    probs = torch.softmax(scaled, dim=-1)
    if row.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        drop = (sorted_probs.cumsum(-1) - sorted_probs) > row.top_p  # keep the first that crosses
        probs = probs.scatter(0, order, sorted_probs.masked_fill(drop, 0.0))
    if row.min_p > 0.0:
        probs = probs.masked_fill(probs < row.min_p * probs.max(), 0.0)
    return int(torch.multinomial(probs.cpu(), 1, generator=row.generator))


def token_logprobs(logits: torch.Tensor, token_ids: torch.Tensor, top_n: int = 0):
    """Logprob of `token_ids` [B] under log_softmax(logits [B, V]); with top-n alternatives."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    chosen = logp.gather(1, token_ids.to(logp.device).view(-1, 1)).squeeze(1).tolist()
    if top_n <= 0:
        return chosen, None
    vals, ids = torch.topk(logp, top_n, dim=-1)
    return chosen, [list(zip(v, i, strict=True)) for v, i in zip(vals.tolist(), ids.tolist(), strict=True)]
