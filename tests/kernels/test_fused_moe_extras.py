"""fused_moe's per-slot biases and activations (gpt-oss's clamped SwiGLU) against float64 references.

The float64 `fused_moe_ref` is itself checked against transformers' own `GptOssExperts` module, so
the chain kernel -> reference -> transformers has no link written only here.

Shape legend: T = tokens, K = top-k, W = hidden_states width, H / I = hidden / intermediate size of
one slot, S = slots, E = experts.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from crosspool_sgl.mem import weight_pool
from kernels import fused_moe as fused_moe_module
from kernels.fused_moe import ACT_SILU, ACT_SWIGLU_CLAMPED, fused_moe, fused_moe_ref, fused_moe_torch
from tests.kernels.test_fused_moe import (
    DTYPES,
    FNS,
    GAP,
    MODEL_A,
    MODEL_B,
    TOLERANCE,
    Pool,
    build_pool,
    route,
)

ALPHA, LIMIT = 1.702, 0.6  # a low limit, so both sides of the clamp are exercised


def with_extras(pool: Pool, biased_models: set[int], seed: int) -> dict[str, torch.Tensor]:
    """Append NaN-separated [bg | bu | b2] blocks for the slots of `biased_models` (clamped SwiGLU
    for those, plain silu elsewhere) to the pool's arena; returns the fused_moe keyword tables."""
    gen = torch.Generator().manual_seed(seed)
    num_slots = pool.w13_offset.shape[0]
    bias_offset = [-1] * num_slots
    kind, chunks, cursor = [ACT_SILU] * num_slots, [pool.arena.cpu()], pool.arena.numel()
    for m in sorted(biased_models):
        for s in pool.slots_of_model[m]:
            hidden, inter = int(pool.hidden_size[s]), int(pool.inter_size[s])
            chunks += [torch.full((GAP,), float("nan")), torch.randn(2 * inter + hidden, generator=gen)]
            bias_offset[s], kind[s] = cursor + GAP, ACT_SWIGLU_CLAMPED
            cursor += GAP + 2 * inter + hidden
    device = pool.arena.device
    pool.arena = torch.cat([c.to(pool.arena.dtype) for c in chunks]).to(device)
    return {
        "bias_offset": torch.tensor(bias_offset, dtype=torch.int64, device=device),
        "act_kind": torch.tensor(kind, dtype=torch.int32, device=device),
        "act_alpha": torch.full((num_slots,), ALPHA, device=device),
        "act_limit": torch.full((num_slots,), LIMIT, device=device),
    }


def check_extras(fn: Callable[..., torch.Tensor], dtype: torch.dtype, device: str = "cpu") -> None:
    """A plain model and a biased clamped-SwiGLU model in one launch match the float64 reference."""
    pool = build_pool([MODEL_A, MODEL_B], dtype, device)
    extras = with_extras(pool, {1}, seed=5)
    hidden_states, topk_ids, topk_weights = route(pool, [5, 6], 2, width=48)
    ref = fused_moe_ref(hidden_states, topk_ids, topk_weights, *pool.tables(), **extras)  # [T, W] float64
    out = fn(hidden_states, topk_ids, topk_weights, *pool.tables(), **extras)
    assert not out.isnan().any()
    err = (out.double() - ref).abs().max() / ref.abs().max()
    assert err < TOLERANCE[dtype], f"relative error {err:.2e}"
    plain = fused_moe_ref(hidden_states, topk_ids, topk_weights, *pool.tables())
    assert (plain - ref).abs().max() > 0.1 * ref.abs().max()  # the extras changed the result


@pytest.mark.parametrize("fn", FNS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_biases_and_clamped_swiglu_match_reference(
    fn: Callable[..., torch.Tensor], dtype: torch.dtype
) -> None:
    torch.manual_seed(41)
    check_extras(fn, dtype)


def test_reference_matches_transformers_gpt_oss_experts() -> None:
    """fused_moe_ref over de-interleaved gpt-oss weights == transformers' GptOssExperts (float64)."""
    from transformers import GptOssConfig
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts

    torch.manual_seed(2)
    num_experts, hidden, inter, tokens, top_k = 3, 24, 16, 7, 2
    cfg = GptOssConfig(hidden_size=hidden, intermediate_size=inter, num_local_experts=num_experts)
    cfg.swiglu_limit = LIMIT
    experts = GptOssExperts(cfg).double()
    with torch.no_grad():
        for p in experts.parameters():
            p.normal_(0.0, 0.5)
    x = torch.randn(tokens, hidden, dtype=torch.float64)
    ids = torch.stack([torch.randperm(num_experts)[:top_k] for _ in range(tokens)])  # [T, K]
    weights = torch.softmax(torch.randn(tokens, top_k, dtype=torch.float64), dim=-1)
    with torch.no_grad():
        want = experts(x, ids, weights)  # [T, H]

    chunks, w13_off, w2_off, b_off, cursor = [], [], [], [], 0
    for e in range(num_experts):
        gate_up = experts.gate_up_proj[e].detach()  # [H, 2I], gate/up alternate
        bias = experts.gate_up_proj_bias[e].detach()
        w13 = torch.cat([gate_up[:, 0::2].t(), gate_up[:, 1::2].t()])  # [2I, H]
        w2 = experts.down_proj[e].detach().t()  # [H, I]
        b = torch.cat([bias[0::2], bias[1::2], experts.down_proj_bias[e].detach()])
        for block, offs in ((w13, w13_off), (w2, w2_off), (b, b_off)):
            offs.append(cursor)
            chunks.append(block.flatten())
            cursor += block.numel()
    tables = (
        torch.cat(chunks),
        torch.tensor(w13_off),
        torch.tensor(w2_off),
        torch.full((num_experts,), hidden, dtype=torch.int32),
        torch.full((num_experts,), inter, dtype=torch.int32),
    )
    got = fused_moe_ref(
        x, ids, weights, *tables,
        bias_offset=torch.tensor(b_off),
        act_kind=torch.full((num_experts,), ACT_SWIGLU_CLAMPED, dtype=torch.int32),
        act_alpha=torch.full((num_experts,), cfg.swiglu_alpha, dtype=torch.float64),
        act_limit=torch.full((num_experts,), cfg.swiglu_limit, dtype=torch.float64),
    )  # fmt: skip
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_extras_come_together_and_are_bounds_checked() -> None:
    torch.manual_seed(4)
    pool = build_pool([MODEL_A], torch.float32, "cpu")
    extras = with_extras(pool, {0}, seed=1)
    hidden_states, topk_ids, topk_weights = route(pool, [4], 2, width=40)
    for fn in (fused_moe_torch, fused_moe) if fused_moe_module.triton is not None else (fused_moe_torch,):
        with pytest.raises(ValueError, match="together"):
            fn(hidden_states, topk_ids, topk_weights, *pool.tables(), bias_offset=extras["bias_offset"])
    if fused_moe_module.triton is not None:
        with pytest.raises(ValueError, match="past the arena"):
            _, hidden, inter = MODEL_A  # the last expert is never routed to: cut into the one before
            cut = (2 * inter + hidden) + GAP + 5
            fused_moe(hidden_states, topk_ids, topk_weights, pool.arena[:-cut], *pool.tables()[1:], **extras)


def test_weight_pool_uses_the_kernel_activation_codes() -> None:
    assert (weight_pool.ACT_SILU, weight_pool.ACT_SWIGLU_CLAMPED) == (ACT_SILU, ACT_SWIGLU_CLAMPED)
