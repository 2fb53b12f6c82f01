"""Routing and the FFN call into the shared weights pool.

Every FFN in every model runs through one function, `run_ffn`: a token's FFN
is a weighted sum over weights-pool slots. A MoE layer routes to its top-k
experts; Qwen2-MoE's shared expert is one more slot whose weight is the
sigmoid gate; a dense MLP is a single slot with weight 1. So one kernel launch
can carry tokens of any mix of models and layer kinds.

`route` implements every family's router (see `RouterConfig`): softmax top-k,
DeepSeek-V2's group-limited greedy, DeepSeek-V3/GLM-4's sigmoid scores with a
correction bias and group top-k, gpt-oss's top-k-then-softmax; shared experts
(DeepSeek, GLM) are one more slot with weight 1.

Legend: T = tokens, E = experts, G = expert groups, K = slots per token, H = hidden size.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

import torch

from crosspool_sgl.layers.layer_config import RouterConfig

if TYPE_CHECKING:
    from crosspool_sgl.mem.weight_pool import SlotTables


class FFNWeights(Protocol):
    """What an FFN call reads: one arena holding every FFN weight, and the slot tables indexing it.

    The weights pool is one; the disaggregated FFN worker's pool and test doubles are others. The
    layer depends on these two members only, not on how the pool places, evicts or pages in slots.
    """

    arena: torch.Tensor  # [N] every slot's weights, flat

    def tables(self) -> SlotTables: ...


def route_topk(
    router_logits: torch.Tensor, top_k: int, renormalize: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax (fp32) over experts, top-k, optional renormalisation — as Hugging Face does it."""
    probs = torch.softmax(router_logits.float(), dim=-1)  # [T, E]
    weights, ids = torch.topk(probs, top_k, dim=-1)  # [T, K]
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights.to(router_logits.dtype), ids


def route(
    router_logits: torch.Tensor, cfg: RouterConfig, correction_bias: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Router logits [T, E] -> (weights [T, K] in the logits' dtype, expert ids [T, K]), fp32 inside."""
    logits = router_logits.float()
    num_experts = logits.shape[-1]
    if cfg.kind == "softmax":
        weights, ids = route_topk(logits, cfg.top_k, cfg.renormalize)
    elif cfg.kind == "group_limited_greedy":
        probs = torch.softmax(logits, dim=-1)  # [T, E]
        per_group = probs.view(-1, cfg.num_groups, num_experts // cfg.num_groups)  # [T, G, E/G]
        keep = _group_mask(per_group.amax(dim=-1), cfg, num_experts)
        weights, ids = torch.topk(probs.masked_fill(~keep, 0.0), cfg.top_k, dim=-1)
    elif cfg.kind == "sigmoid_grouped":
        scores = torch.sigmoid(logits)  # [T, E]
        choice = scores if correction_bias is None else scores + correction_bias.float()
        grouped = choice.view(-1, cfg.num_groups, num_experts // cfg.num_groups)  # [T, G, E/G]
        keep = _group_mask(grouped.topk(2, dim=-1).values.sum(dim=-1), cfg, num_experts)
        ids = torch.topk(choice.masked_fill(~keep, float("-inf")), cfg.top_k, dim=-1).indices
        weights = scores.gather(1, ids)  # the uncorrected scores weigh the chosen experts
        if cfg.renormalize:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    elif cfg.kind == "topk_softmax":
        top, ids = torch.topk(logits, cfg.top_k, dim=-1)
        weights = torch.softmax(top, dim=-1)
    else:
        raise ValueError(f"unknown router kind {cfg.kind!r}")
    if cfg.scaling_factor != 1.0:
        weights = weights * cfg.scaling_factor
    return weights.to(router_logits.dtype), ids


def _group_mask(group_scores: torch.Tensor, cfg: RouterConfig, num_experts: int) -> torch.Tensor:
    """[T, G] group scores -> bool [T, E]: the experts of the `topk_groups` best groups."""
    best = torch.topk(group_scores, cfg.topk_groups, dim=-1).indices  # [T, topk_groups]
    keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, best, True)  # [T, G]
    return keep.repeat_interleave(num_experts // cfg.num_groups, dim=-1)  # [T, E]


def run_ffn(
    pool: FFNWeights, x: torch.Tensor, slot_ids: torch.Tensor, slot_weights: torch.Tensor
) -> torch.Tensor:
    """x [T, H], slot_ids [T, K] (weights-pool slots), slot_weights [T, K] -> [T, H]."""
    t = pool.tables()
    kwargs = t.ffn_kwargs
    if x.device.type == "cuda":
        from kernels.fused_moe import fused_moe as impl

        if torch.cuda.is_current_stream_capturing():  # no host sync allowed: size by the tables
            kwargs = {**kwargs, "max_inter": t.max_inter}
    else:
        from kernels.fused_moe import fused_moe_torch as impl

        # The pool's bias/activation tables even when every slot is plain: the same result, and the
        # torch path then builds no default tables per call.
        kwargs = {k: getattr(t, k) for k in ("bias_offset", "act_kind", "act_alpha", "act_limit")}
    return impl(
        x, slot_ids, slot_weights, pool.arena, t.w13_offset, t.w2_offset, t.hidden_size, t.inter_size,
        **kwargs,
    )  # fmt: skip
