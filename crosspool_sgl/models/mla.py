"""Multi-head latent attention (DeepSeek-V2/V3), computed in absorbed form over the cached latent.

Per token the KV cache holds one latent c = [norm(kv_a(x))[:R] | rope(kv_a(x)[R:])] of width
R + r (`KVGeometry.mla`), not per-head K and V. transformers expands every cached latent back into
per-head keys and values (kv_b_proj) at every step; we instead fold kv_b_proj's two halves into the
query and the output ("absorption"):

    q_nope . (W_UK c_nope)  =  (W_UK^T q_nope) . c_nope        scores, per head
    sum_s p_s (W_UV c_s)    =  W_UV (sum_s p_s c_s)             values, per head

so the backend runs plain MQA with one KV "head" over the latent: keys are the whole latent
(R + r wide), values its first R columns, and nothing is expanded per cached token. Why absorbed:
decode cost and memory traffic stay O(R + r) per cached token instead of O(Hq * (dn + dv)); the
backend interface stays generic (one-plane KV, `value_dim`); and it is exactly what FlashInfer's MLA
paged kernel computes, so the torch and FlashInfer backends share one contract. In fp32 the
reassociation changes results only at rounding level (the HF parity test holds 1e-4 logprobs).

Legend: T = tokens, Hq = heads, R = kv_lora_rank, r = qk_rope_head_dim, dn = qk_nope_head_dim,
dv = v_head_dim, H = hidden.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F

from crosspool_sgl.layers.attention.base import AttentionBackend, AttentionMetadata
from crosspool_sgl.layers.norm import rms_norm
from crosspool_sgl.layers.rotary import RotaryEmbedding
from crosspool_sgl.models.config import ModelConfig


class AttentionHost(Protocol):
    """What latent attention needs of the model that runs it (the decoder, in practice): its
    config, its rotary embedding and the attention backend over the KV pool."""

    config: ModelConfig
    rotary: RotaryEmbedding
    attn_backend: AttentionBackend


@dataclass
class MLAWeights:
    """One layer's MLA projections, with kv_b_proj pre-split for absorption."""

    q_proj: torch.Tensor | None  # [Hq*(dn+r), H] when there is no q LoRA
    q_a_proj: torch.Tensor | None  # [q_lora_rank, H]
    q_a_bias: torch.Tensor | None
    q_a_norm: torch.Tensor | None  # [q_lora_rank]
    q_b_proj: torch.Tensor | None  # [Hq*(dn+r), q_lora_rank]
    kv_a_proj: torch.Tensor  # [R + r, H]
    kv_a_bias: torch.Tensor | None
    kv_a_norm: torch.Tensor  # [R]
    w_uk: torch.Tensor  # [Hq, dn, R]
    w_uv: torch.Tensor  # [Hq, dv, R]

    @classmethod
    def from_kv_b(cls, cfg: ModelConfig, kv_b_proj: torch.Tensor, **kw) -> MLAWeights:
        """Split kv_b_proj [Hq*(dn+dv), R] into the absorbed key and value maps."""
        mla = cfg.mla
        per_head = kv_b_proj.view(cfg.num_heads, mla.qk_nope_head_dim + mla.v_head_dim, mla.kv_lora_rank)
        w_uk, w_uv = per_head.split([mla.qk_nope_head_dim, mla.v_head_dim], dim=1)
        return cls(w_uk=w_uk.contiguous(), w_uv=w_uv.contiguous(), **kw)


def mla_attention(
    model: AttentionHost,
    i: int,
    w: MLAWeights,
    x: torch.Tensor,
    positions: torch.Tensor,
    meta: AttentionMetadata,
    kv: torch.Tensor,
) -> torch.Tensor:
    """x [T, H] -> attention output before o_proj [T, Hq*dv]; writes this step's latents into `kv`."""
    cfg: ModelConfig = model.config
    mla, eps = cfg.mla, cfg.rms_norm_eps
    if w.q_proj is not None:
        q = F.linear(x, w.q_proj)
    else:
        q = F.linear(rms_norm(F.linear(x, w.q_a_proj, w.q_a_bias), w.q_a_norm, eps), w.q_b_proj)
    q = q.view(-1, cfg.num_heads, mla.qk_head_dim)
    q_nope, q_rope = q.split([mla.qk_nope_head_dim, mla.qk_rope_head_dim], dim=-1)  # [T, Hq, dn], [T, Hq, r]
    compressed = F.linear(x, w.kv_a_proj, w.kv_a_bias)  # [T, R + r]
    latent, k_rope = compressed.split([mla.kv_lora_rank, mla.qk_rope_head_dim], dim=-1)
    latent = rms_norm(latent, w.kv_a_norm, eps)  # [T, R]
    # [T, Hq, r], [T, 1, r]
    q_rope, k_rope = model.rotary(positions, q_rope, k_rope.unsqueeze(1), meta.step_cache)
    q_latent = torch.einsum("thd,hdr->thr", q_nope, w.w_uk)  # [T, Hq, R]
    q_full = torch.cat((q_latent, q_rope), dim=-1)  # [T, Hq, R + r]
    k_full = torch.cat((latent.unsqueeze(1), k_rope), dim=-1)  # [T, 1, R + r]
    out = model.attn_backend.forward(
        q_full, k_full, None, kv, i, meta, cfg.attn_scale, None, value_dim=mla.kv_lora_rank
    )  # [T, Hq, R]
    return torch.einsum("thr,hvr->thv", out, w.w_uv).reshape(-1, cfg.num_heads * mla.v_head_dim)
