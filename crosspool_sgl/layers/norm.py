"""RMSNorm as the Hugging Face models compute it (fp32 statistics, weight applied last)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x * rsqrt(mean(x^2) + eps) in fp32, cast back, times the weight.

    torch's fused `F.rms_norm` computes the same fp32 formula (bit-identical on CPU, checked in
    tests/layers) in one call instead of five: it runs ~5 times per layer and model in a step.
    """
    return weight * F.rms_norm(x.float(), x.shape[-1:], eps=eps).to(x.dtype)


def rms_norm_rows(x: torch.Tensor, weight: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """`rms_norm` with a weight [R, H] and an eps [R, 1] per row, bit-identical to it row by row.

    Rows of several models (their own norm weights and eps) are normalised in one pass: the
    lockstep forward's residual stream (models/lockstep.py). Written out as the Hugging Face
    formula, which `F.rms_norm` matches bit for bit on CPU but which takes no per-row eps.
    """
    x32 = x.float()
    return weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
