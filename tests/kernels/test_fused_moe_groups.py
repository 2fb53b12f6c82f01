"""fused_moe_torch's shape groups: experts of one H whose I round up to the same multiple of 64
(tiny models; a model's routed and shared experts) run as ONE gathered group, zero-padded to that
Ip, and a model's rows come out bit-identical whichever other models share the call (what the
lockstep forward relies on to give the tokens of the per-model path).

Shape legend: T = tokens, K = top-k, W = hidden_states width, I = intermediate size.
"""

from __future__ import annotations

import pytest
import torch

from kernels import fused_moe as fused_moe_module
from kernels import moe_gather
from kernels.fused_moe import fused_moe_ref, fused_moe_torch
from tests.kernels.test_fused_moe import TOLERANCE, build_pool, route
from tests.kernels.test_fused_moe_extras import with_extras

# one H, four I (48 and 32 are not multiples of the 64-element sum chunk), plus a model of another H
MODELS = [(4, 64, 48), (4, 64, 32), (3, 64, 128), (3, 64, 64), (3, 40, 24)]


@pytest.fixture
def group_calls(monkeypatch) -> list[moe_gather.ShapeGroup]:
    """The groups fused_moe_torch gathers, in call order."""
    seen: list[moe_gather.ShapeGroup] = []
    real = moe_gather.group_ffn

    def spy(x, slots, arena, tables, group):
        seen.append(group)
        return real(x, slots, arena, tables, group)

    monkeypatch.setattr(fused_moe_module, "group_ffn", spy)
    return seen


def _mixed(extras: bool, seed: int):
    torch.manual_seed(seed)
    pool = build_pool(MODELS, torch.float32, "cpu")
    kw = with_extras(pool, {1}, seed=seed) if extras else {}  # model 1: biases, clamped SwiGLU
    hidden_states, topk_ids, topk_weights = route(pool, [2, 1, 2, 1, 2], 2, width=64)
    return pool, kw, hidden_states, topk_ids, topk_weights


@pytest.mark.parametrize("extras", [False, True], ids=["plain", "gpt-oss-extras"])
def test_one_gathered_group_per_hidden_size_and_activation(group_calls, extras: bool) -> None:
    pool, kw, hidden_states, topk_ids, topk_weights = _mixed(extras, seed=5)
    out = fused_moe_torch(hidden_states, topk_ids, topk_weights, *pool.tables(), **kw)
    ref = fused_moe_ref(hidden_states, topk_ids, topk_weights, *pool.tables(), **kw)
    assert not out.isnan().any()  # the arena's NaN gaps between matrices are never read
    assert (out.double() - ref).abs().max() / ref.abs().max() < TOLERANCE[torch.float32]
    groups = {(g.hidden, g.kind, g.has_bias, g.padded_inter): g.inters for g in group_calls}
    assert len(groups) == len(group_calls)  # no group split
    # I = 32, 48 and 64 share Ip = 64; 128 is a group of its own (no padding 32 -> 128)
    expected = {(64, 0, False, 64): (32, 48, 64), (64, 0, False, 128): (128,), (40, 0, False, 64): (24,)}
    if extras:  # model 1 (I=32) has biases and the clamped SwiGLU: a group of its own
        expected.update({(64, 0, False, 64): (48, 64), (64, 1, True, 64): (32,)})
    assert groups == expected


@pytest.mark.parametrize("extras", [False, True], ids=["plain", "gpt-oss-extras"])
def test_a_models_rows_do_not_depend_on_the_other_models(extras: bool) -> None:
    """Each model's rows alone in a call equal its rows of the mixed call, bit for bit: padding
    its I to the group's Ip appends whole zero chunks to every sum (kernels/moe_gather.py)."""
    pool, kw, hidden_states, topk_ids, topk_weights = _mixed(extras, seed=6)
    mixed = fused_moe_torch(hidden_states, topk_ids, topk_weights, *pool.tables(), **kw)
    for slots in pool.slots_of_model:
        rows = torch.isin(topk_ids[:, 0], torch.tensor(slots, dtype=topk_ids.dtype)).nonzero().squeeze(1)
        alone = fused_moe_torch(hidden_states[rows], topk_ids[rows], topk_weights[rows], *pool.tables(), **kw)
        assert torch.equal(alone, mixed[rows]), f"model with slots {slots}"
