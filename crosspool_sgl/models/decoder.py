"""One decoder-only transformer that covers every supported architecture.

Attention weights, norms, embeddings and the LM head belong to the model (the
"attention side"); every FFN — MoE experts, Qwen2-MoE's shared expert, dense
MLPs — lives in the shared weights pool and is reached through slot ids.
The differences between Llama, Qwen2/3, Qwen2/3-MoE, Mixtral, OLMoE, GLM-4 MoE,
gpt-oss and DeepSeek-V2/V3 are fields of `ModelConfig`; DeepSeek's multi-head
latent attention lives in models/mla.py.

Legend: T = new tokens this step, H = hidden, E = experts, K = top-k, V = vocab.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from crosspool_sgl.layers.attention.base import AttentionBackend, AttentionMetadata
from crosspool_sgl.layers.moe import FFNWeights, route, run_ffn
from crosspool_sgl.layers.norm import rms_norm
from crosspool_sgl.layers.rotary import RotaryEmbedding
from crosspool_sgl.models.config import ModelConfig
from crosspool_sgl.models.mla import MLAWeights, mla_attention


@dataclass
class LayerWeights:
    """A layer's attention-side tensors plus the pool slots of its FFN."""

    input_norm: torch.Tensor  # [H]
    post_norm: torch.Tensor  # [H]
    qkv_weight: torch.Tensor | None  # [Hq*D + 2*Hkv*D, H]; None for MLA (see `mla`)
    qkv_bias: torch.Tensor | None
    o_weight: torch.Tensor  # [H, Hq*D]
    o_bias: torch.Tensor | None
    q_norm: torch.Tensor | None
    k_norm: torch.Tensor | None
    router: torch.Tensor | None  # [E, H]; None for a dense MLP layer
    ffn_slots: torch.Tensor  # [E] slot per expert, or [1] for a dense MLP
    shared_slot: int | None = None
    shared_gate: torch.Tensor | None = None  # [1, H]; None: the shared expert has weight 1
    router_bias: torch.Tensor | None = None  # [E] (gpt-oss)
    correction_bias: torch.Tensor | None = None  # [E] e_score_correction_bias (DeepSeek-V3, GLM-4)
    sinks: torch.Tensor | None = None  # [Hq] fp32 (gpt-oss)
    mla: MLAWeights | None = None
    # [Hq + Hkv, D]: q_norm per q head, then k_norm per KV head; built by DecoderModel (Qwen3)
    qk_norm_heads: torch.Tensor | None = None
    # [2, Hq * D]: q_norm then k_norm, when q and k are as wide (OLMoE); built by DecoderModel
    qk_norm_planes: torch.Tensor | None = None


@dataclass
class ModelWeights:
    embed: torch.Tensor  # [V, H]
    final_norm: torch.Tensor  # [H]
    lm_head: torch.Tensor  # [V, H] (the embedding itself when tied)
    layers: list[LayerWeights]


class DecoderModel:
    """Runs one model's forward pass over a packed batch of new tokens."""

    def __init__(
        self,
        name: str,
        config: ModelConfig,
        weights: ModelWeights,
        weight_pool: FFNWeights,
        attn_backend: AttentionBackend,
        device: torch.device,
    ) -> None:
        self.name = name
        self.config = config
        self.weights = weights
        self.weight_pool = weight_pool
        self.attn_backend = attn_backend
        rotary_dim = config.rotary_dim or config.head_dim
        self.rotary = RotaryEmbedding(config.rope, rotary_dim, device, config.rope_interleaved)
        self.scale = config.attn_scale or config.head_dim**-0.5
        self.norm_pairs = [_pair_norms(lw) for lw in weights.layers]  # per layer [2, 1, H]
        if config.qk_norm == "per_head":  # q and k are normalised as one [T, Hq + Hkv, D] tensor
            for lw in weights.layers:
                q_rows, k_rows = (
                    lw.q_norm.expand(config.num_heads, -1),
                    lw.k_norm.expand(config.num_kv_heads, -1),
                )
                lw.qk_norm_heads = torch.cat([q_rows, k_rows])
        if config.qk_norm == "full" and config.q_size == config.kv_size and config.clip_qkv is None:
            for lw in weights.layers:  # q and k side by side in qkv: one norm over [T, 2, Hq * D]
                lw.qk_norm_planes = torch.stack([lw.q_norm, lw.k_norm])

    @torch.inference_mode()
    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata, kv: torch.Tensor
    ) -> torch.Tensor:
        """input_ids/positions [T] -> final-normed hidden states [T, H]; writes K/V into `kv`."""
        h = F.embedding(input_ids, self.weights.embed)
        self.attn_backend.init_forward(meta)
        for i, lw in enumerate(self.weights.layers):
            h, x = self.attention_half(i, h, positions, meta, kv)
            h = h + self.ffn(lw, x)
        return rms_norm(h, self.weights.final_norm, self.config.rms_norm_eps)

    def attention_half(self, i: int, h, positions, meta, kv) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer i up to its FFN: (residual after attention [T, H], FFN input [T, H]).

        The seam for disaggregated mode (crosspool_sgl/disagg), which ships the FFN input away.
        """
        lw = self.weights.layers[i]
        eps = self.config.rms_norm_eps
        h = h + self.attention(i, lw, rms_norm(h, lw.input_norm, eps), positions, meta, kv)
        return h, rms_norm(h, lw.post_norm, eps)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[T, H] -> fp32 logits [T, V]."""
        return F.linear(hidden, self.weights.lm_head).float()

    def attention(self, i, lw: LayerWeights, x, positions, meta, kv) -> torch.Tensor:
        cfg = self.config
        if lw.mla is not None:
            return F.linear(mla_attention(self, i, lw.mla, x, positions, meta, kv), lw.o_weight, lw.o_bias)
        q, k, v = self.qkv_heads(lw, x, positions, meta)
        out = self.attn_backend.forward(
            q, k, v, kv, i, meta, self.scale, cfg.sliding_windows[i], sinks=lw.sinks
        )  # [T, Hq, D]
        return F.linear(out.reshape(-1, cfg.q_size), lw.o_weight, lw.o_bias)

    def attend_written(self, i, lw: LayerWeights, q, meta, kv, gathered=None) -> torch.Tensor:
        """`attention` from q [T, Hq, D] on, the new tokens' K/V already in `kv` (the lockstep
        forward writes several models' at once) and, for a decode step, optionally the pages'
        (keys, values) `gathered` too; a torch attention backend only."""
        window = self.config.sliding_windows[i]
        if gathered is None:
            out = self.attn_backend.attend(q, kv, i, meta, self.scale, window, lw.sinks)
        else:
            out = self.attn_backend.attend_gathered(q, *gathered, meta, self.scale, window, lw.sinks)
        return self.project_out(lw, out)

    def project_out(self, lw: LayerWeights, out: torch.Tensor) -> torch.Tensor:
        """Attention output [T, Hq, D] -> [T, H]: the o projection (not MLA)."""
        return F.linear(out.reshape(-1, self.config.q_size), lw.o_weight, lw.o_bias)

    def qkv_heads(self, lw: LayerWeights, x, positions, meta) -> tuple[torch.Tensor, ...]:
        """x [T, H] -> normalised, rotated q [T, Hq, D], k and v [T, Hkv, D] (not MLA)."""
        qk, v = self.qk_v(lw, x)
        return self.split_qk(self.rotary.rotate(positions, qk, meta.step_cache), v)

    def split_qk(self, qk: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Rotated qk [T, Hq + Hkv, D] and v [T, Hkv * D] -> q, k, v as `qkv_heads` returns them."""
        cfg = self.config
        return qk[:, : cfg.num_heads], qk[:, cfg.num_heads :], v.view(-1, cfg.num_kv_heads, cfg.head_dim)

    def qk_v(self, lw: LayerWeights, x) -> tuple[torch.Tensor, torch.Tensor]:
        """x [T, H] -> normalised, not yet rotated qk [T, Hq + Hkv, D] and v [T, Hkv * D]."""
        cfg = self.config
        qkv = F.linear(x, lw.qkv_weight, lw.qkv_bias)
        heads, qk_size = cfg.num_heads + cfg.num_kv_heads, cfg.q_size + cfg.kv_size
        if lw.qk_norm_planes is not None:  # OLMoE with Hq == Hkv: both norms in one call
            qk = qkv[:, :qk_size].view(-1, 2, cfg.q_size)  # [T, 2, Hq * D]: q, k
            qk = rms_norm(qk, lw.qk_norm_planes, cfg.rms_norm_eps).view(-1, heads, cfg.head_dim)
            v = qkv[:, qk_size:]
        elif cfg.qk_norm == "full" or cfg.clip_qkv is not None:
            q, k, v = qkv.split([cfg.q_size, cfg.kv_size, cfg.kv_size], dim=-1)
            if cfg.qk_norm == "full":  # OLMoE: one norm over all heads
                q = rms_norm(q, lw.q_norm, cfg.rms_norm_eps)
                k = rms_norm(k, lw.k_norm, cfg.rms_norm_eps)
            if cfg.clip_qkv is not None:
                q, k, v = (t.clamp(-cfg.clip_qkv, cfg.clip_qkv) for t in (q, k, v))
            qk = torch.cat((q, k), dim=-1).view(-1, heads, cfg.head_dim)
        else:  # q and k side by side in qkv: one view, normalised and rotated as one tensor
            qk, v = qkv[:, :qk_size].view(-1, heads, cfg.head_dim), qkv[:, qk_size:]  # [T, Hq + Hkv, D]
        if cfg.qk_norm == "per_head":  # Qwen3: norm over each head's dim
            qk = rms_norm(qk, lw.qk_norm_heads, cfg.rms_norm_eps)
        return qk, v

    def ffn_routing(self, lw: LayerWeights, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Slot ids [T, K'] and weights [T, K'] of each token's FFN in the weights pool."""
        cfg = self.config
        num_tokens = x.shape[0]
        if lw.router is None:  # dense MLP: one slot, weight 1
            ids = lw.ffn_slots.expand(num_tokens, 1)
            return ids, torch.ones(num_tokens, 1, dtype=x.dtype, device=x.device)
        if cfg.router.fp32_logits:
            logits = F.linear(x.float(), lw.router.float())
        else:
            logits = F.linear(x, lw.router, lw.router_bias)
        weights, experts = route(logits, cfg.router, lw.correction_bias)
        weights = weights.to(x.dtype)
        slots = lw.ffn_slots[experts]  # [T, K]
        if lw.shared_slot is not None:
            if lw.shared_gate is not None:  # Qwen2-MoE: a sigmoid gate
                gate = torch.sigmoid(F.linear(x, lw.shared_gate))  # [T, 1]
            else:  # DeepSeek / GLM: always on, weight 1
                gate = torch.ones(num_tokens, 1, dtype=x.dtype, device=x.device)
            shared = torch.full_like(slots[:, :1], lw.shared_slot)
            slots = torch.cat([slots, shared], dim=1)
            weights = torch.cat([weights, gate.to(weights.dtype)], dim=1)
        return slots, weights

    def ffn(self, lw: LayerWeights, x: torch.Tensor) -> torch.Tensor:
        slots, weights = self.ffn_routing(lw, x)
        return run_ffn(self.weight_pool, x, slots, weights)


def _pair_norms(lw: LayerWeights) -> torch.Tensor:
    """The layer's input and post-attention norm weights stacked [2, 1, H]; the layer keeps views of
    them, so they stay one tensor each. The lockstep forward normalises rows of several models at
    once and gathers each row's weights from these pairs (models/lockstep.py)."""
    pair = torch.stack((lw.input_norm, lw.post_norm))[:, None, :]
    lw.input_norm, lw.post_norm = pair[0, 0], pair[1, 0]
    return pair
