"""What a lockstep FFN call needs from fused_moe: rows of several models padded to one width and
one K (slot -1 = padding), and the CPU path's two strategies (batched GEMMs per shape group,
the per-slot loop) both exact against the float64 reference, gpt-oss's extras included.

Shape legend: T = tokens, K = slots per token, W = hidden_states width (Hmax).
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from kernels import fused_moe as fused_moe_module
from kernels import moe_gather
from kernels.fused_moe import align_pairs_to_slots, fused_moe, fused_moe_ref, fused_moe_torch
from tests.kernels.test_fused_moe import DTYPES, FNS, TOLERANCE, build_pool, route
from tests.kernels.test_fused_moe_extras import with_extras

# three models with different H and I (one with biases and clamped SwiGLU): several shape groups
MODELS = [(4, 40, 24), (4, 24, 56), (5, 16, 32)]


def padded_route(pool, tokens_per_model: list[int], top_k: int, width: int, seed: int):
    """route(), then a random tail of each row replaced by padding, never the first slot. The padding
    keeps a weight of 1 (lockstep passes 0): a kernel that ran it would show, whatever it weighs."""
    hidden_states, topk_ids, topk_weights = route(pool, tokens_per_model, top_k, width)
    gen = torch.Generator().manual_seed(seed)
    keep = torch.randint(1, top_k + 1, (topk_ids.shape[0], 1), generator=gen)  # [T, 1] real slots per row
    pad = torch.arange(top_k)[None, :] >= keep  # [T, K]
    topk_ids = topk_ids.masked_fill(pad.to(topk_ids.device), -1)
    topk_weights = topk_weights.masked_fill(pad.to(topk_weights.device), 1.0)
    return hidden_states, topk_ids, topk_weights, pad


def check_mixed(fn: Callable[..., torch.Tensor], dtype: torch.dtype, extras: bool, device: str = "cpu"):
    pool = build_pool(MODELS, dtype, device)
    kw = with_extras(pool, {1}, seed=3) if extras else {}
    hidden_states, topk_ids, topk_weights, pad = padded_route(pool, [5, 3, 6], 3, width=48, seed=9)
    assert pad.any() and not pad.all()
    ref = fused_moe_ref(hidden_states, topk_ids, topk_weights, *pool.tables(), **kw)  # [T, W] float64
    out = fn(hidden_states, topk_ids, topk_weights, *pool.tables(), **kw)
    assert not out.isnan().any()
    err = (out.double() - ref).abs().max() / ref.abs().max()
    assert err < TOLERANCE[dtype], f"relative error {err:.2e}"
    # the padding really dropped pairs: the same ids with the padding resolved to a real slot differ
    filled = torch.where(topk_ids < 0, topk_ids.max(dim=1, keepdim=True).values, topk_ids)
    unpadded = fused_moe_ref(hidden_states, filled, topk_weights, *pool.tables(), **kw)
    assert (unpadded - ref).abs().max() > 0.1 * ref.abs().max()


@pytest.mark.parametrize("fn", FNS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("extras", [False, True], ids=["plain", "gpt-oss-extras"])
def test_padded_rows_of_three_models(fn, dtype: torch.dtype, extras: bool) -> None:
    torch.manual_seed(11)
    check_mixed(fn, dtype, extras)


@pytest.mark.parametrize("budget", [0, 1 << 40], ids=["per-slot-loop", "batched"])
@pytest.mark.parametrize("extras", [False, True], ids=["plain", "gpt-oss-extras"])
def test_torch_strategies_are_exact(monkeypatch, budget: int, extras: bool) -> None:
    """Both CPU strategies, forced by the gather budget, on several classes mixed in one call."""
    calls = {"class": 0}
    real = moe_gather.group_ffn

    def counted(*a, **k):
        calls["class"] += 1
        return real(*a, **k)

    monkeypatch.setattr(moe_gather, "GATHER_BUDGET", budget)
    monkeypatch.setattr(moe_gather, "GATHER_PAIR_MAX", budget)
    monkeypatch.setattr(fused_moe_module, "group_ffn", counted)
    torch.manual_seed(12)
    check_mixed(fused_moe_torch, torch.float32, extras)
    assert (calls["class"] > 0) == (budget > 0)  # the strategy asked for is the one that ran


def test_all_padding_and_sentinel_blocks() -> None:
    pool = build_pool(MODELS[:1], torch.float32, "cpu")
    hidden_states, topk_ids, topk_weights = route(pool, [3], 2, width=40)
    none = torch.full_like(topk_ids, -1)
    for fn in (fused_moe_torch, fused_moe) if fused_moe_module.triton is not None else (fused_moe_torch,):
        assert (fn(hidden_states, none, topk_weights, *pool.tables()) == 0).all()
    ids = torch.tensor([[0, -1], [-1, -1], [2, 0]])
    sorted_pair_ids, block_slot = align_pairs_to_slots(ids, num_slots=4, block_m=4)
    in_used_block = block_slot.repeat_interleave(4) >= 0  # [NB * block_m]
    real = (sorted_pair_ids < ids.numel()) & in_used_block
    assert sorted(sorted_pair_ids[real].tolist()) == [0, 4, 5]  # padding pairs are in no used block
    assert sorted(block_slot[block_slot >= 0].tolist()) == [0, 2]


def test_class_keys_round_trip() -> None:
    hidden, inter = torch.tensor([2880, 64, 64, 64, 64]), torch.tensor([2880, 48, 128, 48, 60])
    kind, bias = torch.tensor([1, 0, 0, 0, 0]), torch.tensor([10, -1, -1, 7, -1])
    keys, counts = torch.unique(moe_gather.class_keys(hidden, inter, kind, bias), return_counts=True)
    groups = moe_gather.shape_groups(keys.tolist(), counts.tolist())
    got = {(g.hidden, g.kind, g.has_bias, g.inters, g.counts) for g in groups}
    assert got == {
        (2880, 1, True, (2880,), (1,)),
        (64, 0, False, (48, 60), (1, 1)),  # both round up to 64: one group
        (64, 0, False, (128,), (1,)),
        (64, 0, True, (48,), (1,)),
    }
    assert moe_gather.ACT_SWIGLU_CLAMPED == fused_moe_module.ACT_SWIGLU_CLAMPED
