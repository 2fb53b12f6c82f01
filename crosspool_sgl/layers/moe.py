"""Routing and the FFN call into the shared weights pool.

Every FFN in every model runs through one function, `run_ffn`: a token's FFN
is a weighted sum over weights-pool slots. A MoE layer routes to its top-k
experts; Qwen2-MoE's shared expert is one more slot whose weight is the
sigmoid gate; a dense MLP is a single slot with weight 1. So one kernel launch
can carry tokens of any mix of models and layer kinds.

Legend: T = tokens, E = experts, K = slots per token, H = hidden size.
"""

from __future__ import annotations

import torch

from crosspool_sgl.mem.weight_pool import WeightPool


def route_topk(
    router_logits: torch.Tensor, top_k: int, renormalize: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax (fp32) over experts, top-k, optional renormalisation — as Hugging Face does it."""
    probs = torch.softmax(router_logits.float(), dim=-1)  # [T, E]
    weights, ids = torch.topk(probs, top_k, dim=-1)  # [T, K]
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights.to(router_logits.dtype), ids


def run_ffn(
    pool: WeightPool, x: torch.Tensor, slot_ids: torch.Tensor, slot_weights: torch.Tensor
) -> torch.Tensor:
    """x [T, H], slot_ids [T, K] (weights-pool slots), slot_weights [T, K] -> [T, H]."""
    t = pool.tables()
    if x.device.type == "cuda":
        from kernels.fused_moe import fused_moe as impl
    else:
        from kernels.fused_moe import fused_moe_torch as impl
    return impl(x, slot_ids, slot_weights, pool.arena, t.w13_offset, t.w2_offset, t.hidden_size, t.inter_size)
