"""The per-layer helpers the lockstep step leans on: fused RMSNorm (also row by row), rotary and its cache.

RMSNorm must equal the Hugging Face formula (fp32 statistics, weight applied last) exactly in
fp32, the decoders' HF-parity dtype; the rope cache must give what an uncached call gives and
never leak between steps (it lives in each step's metadata).
"""

from __future__ import annotations

import pytest
import torch

from crosspool_sgl.layers.norm import rms_norm, rms_norm_rows
from crosspool_sgl.layers.rotary import RotaryEmbedding
from crosspool_sgl.models.config import RopeConfig


def hf_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


@pytest.mark.parametrize("shape", [(1, 64), (37, 96), (5, 4, 16)])
def test_rms_norm_is_the_hf_formula(shape) -> None:
    torch.manual_seed(0)
    x, w = torch.randn(shape) * 3, torch.randn(shape[-1])
    assert torch.equal(rms_norm(x, w, 1e-6), hf_rms_norm(x, w, 1e-6))
    xb, wb = x.bfloat16(), w.bfloat16()
    torch.testing.assert_close(rms_norm(xb, wb, 1e-6), hf_rms_norm(xb, wb, 1e-6), rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("interleaved", [False, True])
def test_rope_cache_gives_the_uncached_result_and_is_per_step(interleaved: bool) -> None:
    torch.manual_seed(1)
    rope = RotaryEmbedding(RopeConfig(theta=10000.0), 16, torch.device("cpu"), interleaved)
    q, k = torch.randn(3, 4, 16), torch.randn(3, 2, 16)
    step_a, step_b = {}, {}
    pos_a, pos_b = torch.tensor([0, 5, 9]), torch.tensor([1, 6, 10])
    want_a, want_b = rope(pos_a, q, k), rope(pos_b, q, k)
    for layer in range(2):  # every layer of a step reuses the step's cos/sin
        got_a = rope(pos_a, q, k, step_a)
        assert all(torch.equal(g, w) for g, w in zip(got_a, want_a, strict=True)), layer
    got_b = rope(pos_b, q, k, step_b)  # another step's metadata: its own positions
    assert all(torch.equal(g, w) for g, w in zip(got_b, want_b, strict=True))
    assert not torch.equal(want_a[0], want_b[0])
    assert len(step_a) == 1


def test_rms_norm_rows_is_rms_norm_row_by_row() -> None:
    """Rows of two models (own weights and eps) in one call equal each model's own rms_norm."""
    torch.manual_seed(2)
    x = torch.randn(5, 64) * 3
    w_a, w_b = torch.randn(64), torch.randn(64)
    weight = torch.cat([w_a.expand(2, 64), w_b.expand(3, 64)])
    eps = torch.tensor([1e-6, 1e-6, 1e-5, 1e-5, 1e-5])[:, None]
    want = torch.cat([rms_norm(x[:2], w_a, 1e-6), rms_norm(x[2:], w_b, 1e-5)])
    assert torch.equal(rms_norm_rows(x, weight, eps), want)


def hf_rotate(q: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """transformers' apply_rotary_pos_emb with its cos/sin: cat((f, f)) and rotate_half by cat."""
    freqs = positions.float()[:, None] * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos()[:, None, :], emb.sin()[:, None, :]
    half = q.shape[-1] // 2
    return q * cos + torch.cat((-q[..., half:], q[..., :half]), dim=-1) * sin


@pytest.mark.parametrize("head_dim", [16, 32])
def test_rotate_is_the_hf_rotate_half_bit_for_bit(head_dim: int) -> None:
    """The flip with a signed sin table, on q and k stacked along the heads, is HF's formula exactly."""
    torch.manual_seed(3)
    rope = RotaryEmbedding(RopeConfig(theta=1e6), head_dim, torch.device("cpu"))
    positions = torch.tensor([0, 7, 300, 4095])
    qk = torch.randn(4, 6, head_dim) * 2
    assert torch.equal(rope.rotate(positions, qk), hf_rotate(qk, positions, rope.inv_freq))
    q, k = rope(positions, qk[:, :4], qk[:, 4:], {})
    assert torch.equal(torch.cat((q, k), dim=1), hf_rotate(qk, positions, rope.inv_freq))
