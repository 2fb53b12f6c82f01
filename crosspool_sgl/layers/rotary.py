"""Rotary position embeddings (default, linear, llama3 and yarn scaling).

Frequencies are computed in float32 exactly as Hugging Face does (the
correctness anchor), then cached as cos/sin tables indexed by position.
"""

from __future__ import annotations

import math

import torch

from crosspool_sgl.layers.layer_config import RopeConfig
from crosspool_sgl.layers.plan_cache import PlanCache, plan


def rope_inv_freq(rope: RopeConfig, head_dim: int) -> tuple[torch.Tensor, float]:
    """Inverse frequencies [D/2] and the attention factor that scales cos/sin."""
    base, p = rope.theta, rope.params
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if rope.rope_type == "default":
        return inv_freq, 1.0
    if rope.rope_type == "linear":
        return inv_freq / p["factor"], 1.0
    if rope.rope_type == "llama3":
        return _llama3_inv_freq(inv_freq, p), 1.0
    if rope.rope_type == "yarn":
        return _yarn_inv_freq(base, head_dim, p)
    raise ValueError(f"unsupported rope type {rope.rope_type!r}")


def _llama3_inv_freq(inv_freq: torch.Tensor, p: dict) -> torch.Tensor:
    factor, low, high = p["factor"], p["low_freq_factor"], p["high_freq_factor"]
    old_len = p["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def _yarn_inv_freq(base: float, dim: int, p: dict) -> tuple[torch.Tensor, float]:
    factor = p["factor"]
    orig_len = p["original_max_position_embeddings"]

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention_factor = p.get("attention_factor")
    if attention_factor is None:
        if p.get("mscale") and p.get("mscale_all_dim"):
            attention_factor = mscale(factor, p["mscale"]) / mscale(factor, p["mscale_all_dim"])
        else:
            attention_factor = mscale(factor)

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(orig_len / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(p.get("beta_fast") or 32), correction_dim(p.get("beta_slow") or 1)
    if p.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    pos_freqs = base ** (torch.arange(0, dim, 2).float() / dim)
    extrapolation_factor = 1 - ramp
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation_factor) + (
        1.0 / pos_freqs
    ) * extrapolation_factor
    return inv_freq, float(attention_factor)


class RotaryEmbedding:
    """Applies RoPE to the first `rotary_dim` dims of q [T, Hq, D] and k [T, Hkv, D] at given positions.

    Halves are rotated (Llama style) unless `interleaved`, where pairs (x0, x1), (x2, x3), ... rotate
    (DeepSeek). Interleaved output is written as [rotated evens, rotated odds], as transformers'
    DeepSeek-V3 does: a permutation shared by q and k, so attention scores are unchanged (DeepSeek-V2
    keeps the pairs in place; the cache then holds permuted rope dims, read back only by q . k).
    Dims past `rotary_dim` pass through (GLM-4's partial rotary).
    """

    def __init__(
        self, rope: RopeConfig, rotary_dim: int, device: torch.device, interleaved: bool = False
    ) -> None:
        inv_freq, self.attention_factor = rope_inv_freq(rope, rotary_dim)
        self.inv_freq = inv_freq.to(device)
        self._inv_freq2 = torch.cat((self.inv_freq, self.inv_freq))  # [R]
        self.rotary_dim = rotary_dim
        self.interleaved = interleaved
        half = rotary_dim // 2  # [-1] * half + [1] * half: the sign rotate_half gives each half
        self._half_signs = torch.cat((-torch.ones(half), torch.ones(half))).to(device)

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        # [T, R]: positions times [inv_freq, inv_freq], the same products as Hugging Face's cat((f, f))
        emb = positions.float()[:, None] * self._inv_freq2[None, :]
        cos, sin = emb.cos(), emb.sin()
        if self.attention_factor != 1.0:
            cos, sin = cos * self.attention_factor, sin * self.attention_factor
        return cos.to(dtype), sin.to(dtype)

    def __call__(
        self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cache: dict | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotated (q, k). `cache` (the step's `AttentionMetadata.step_cache`) keeps cos/sin for the
        other layers of the forward: the positions are the same in every layer."""
        return self.rotate(positions, q, cache), self.rotate(positions, k, cache)

    def rotate(self, positions: torch.Tensor, x: torch.Tensor, cache: dict | None = None) -> torch.Tensor:
        """x [T, H, D] rotated. q and k stacked along the heads rotate in one call (the decoder
        does): a decode step is bound by the number of small ops, not their size."""
        return self._rotate(x, *self.tables(positions, x.dtype, cache))

    def tables(self, positions: torch.Tensor, dtype: torch.dtype, cache: dict | None = None):
        """cos, sin [T, 1, R] of `rotate` (sin signed for the halves swap unless interleaved)."""
        key = ("rope", id(self), dtype)
        tables = None if cache is None else cache.get(key)
        if tables is None:
            cos, sin = self.cos_sin(positions, dtype)
            if not self.interleaved:  # rotate_half(x) * sin == halves-swapped(x) * [-sin1, sin2]
                sin = sin * self._half_signs.to(sin.dtype)
            tables = cos[:, None, :], sin[:, None, :]  # [T, 1, R]
            if cache is not None:
                cache[key] = tables
        return tables

    def _rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        r = self.rotary_dim
        rot, rest = (x, None) if r == x.shape[-1] else (x[..., :r], x[..., r:])
        if self.interleaved:
            half = r // 2
            c, s = cos[..., :half], sin[..., :half]
            even, odd = rot[..., 0::2], rot[..., 1::2]
            out = torch.cat((even * c - odd * s, odd * c + even * s), dim=-1)
        else:
            out = rotate_halves(rot, cos, sin)
        return out if rest is None else torch.cat((out, rest), dim=-1)


def rotate_halves(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Llama-style rotation of x [..., R], `x * cos + rotate_half(x) * sin` bit for bit (negation is
    exact; `sin` is the signed table of `RotaryEmbedding.tables`). Elementwise, so rows of several
    models stacked with their own tables rotate in one call (models/lockstep.py)."""
    swapped = x.unflatten(-1, (2, x.shape[-1] // 2)).flip(-2).flatten(-2)  # [x2, x1]
    return x * cos + swapped * sin


def stacked_tables(
    rotaries: list[RotaryEmbedding],
    positions: list[torch.Tensor],
    heads: list[int],
    dtype: torch.dtype,
    plans: PlanCache | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [N, R] of several Llama-style rotaries' rows stacked (model, token, head): each row
    the values its own model's `tables` gives its token, in one pass over all rows (the same
    elementwise products; a factor of 1.0 is exact) instead of one table build per model.

    The rows' token index, inverse frequencies, factors and signs are the same every decode step
    of one structure: `plans` keeps them (the rotaries live in the plan: their ids are its key)."""
    key = ("rope", tuple(id(r) for r in rotaries), tuple(p.shape[0] for p in positions), tuple(heads))
    stack = plan(plans, key, lambda: _stack(rotaries, [p.shape[0] for p in positions], heads))
    _, token_of_row, inv_freq, factor, signs = stack
    pos = torch.cat(positions) if len(positions) > 1 else positions[0]
    emb = pos[token_of_row].float()[:, None] * inv_freq  # [N, R]
    cos, sin = emb.cos(), emb.sin()
    if factor is not None:
        cos, sin = cos * factor, sin * factor
    return cos.to(dtype), sin.to(dtype) * signs.to(dtype)


def _stack(rotaries: list[RotaryEmbedding], tokens: list[int], heads: list[int]) -> tuple:
    assert all(not r.interleaved for r in rotaries), "stacked tables are for Llama-style rotaries"
    token_of_row, inv, factor, signs = [], [], [], []
    start = 0
    for r, t, h in zip(rotaries, tokens, heads, strict=True):
        token_of_row += [start + i for i in range(t) for _ in range(h)]
        inv.append(r._inv_freq2[None, :].expand(t * h, -1))
        factor += [r.attention_factor] * (t * h)
        signs.append(r._half_signs[None, :].expand(t * h, -1))
        start += t
    device = rotaries[0].inv_freq.device
    scaled = any(f != 1.0 for f in factor)
    return (
        list(rotaries),
        torch.tensor(token_of_row, dtype=torch.int64, device=device),
        torch.cat(inv),
        torch.tensor(factor, dtype=torch.float32, device=device)[:, None] if scaled else None,
        torch.cat(signs),
    )
