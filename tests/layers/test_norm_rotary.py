"""The per-layer helpers the lockstep step leans on: fused RMSNorm and the per-step rope cache.

RMSNorm must equal the Hugging Face formula (fp32 statistics, weight applied last) exactly in
fp32, the decoders' HF-parity dtype; the rope cache must give what an uncached call gives and
never leak between steps (it lives in each step's metadata).
"""

from __future__ import annotations

import pytest
import torch

from crosspool_sgl.layers.norm import rms_norm
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
