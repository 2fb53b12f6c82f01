"""One normalised description of every supported architecture, read from config.json.

The executor is a single decoder implementation driven by this dataclass; the
per-architecture differences (q/k norms, biases, shared experts, which layers
are sparse or slide) are all fields here, filled from the Hugging Face config
exactly as `transformers` interprets it.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from crosspool_sgl.layers.layer_config import RopeConfig, RouterConfig

# architectures (config.json "architectures"[0]) -> model_type we implement
SUPPORTED_ARCHITECTURES = {
    "Qwen3MoeForCausalLM": "qwen3_moe",
    "Qwen2MoeForCausalLM": "qwen2_moe",
    "MixtralForCausalLM": "mixtral",
    "OlmoeForCausalLM": "olmoe",
    "LlamaForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "DeepseekV2ForCausalLM": "deepseek_v2",
    "DeepseekV3ForCausalLM": "deepseek_v3",
    "Glm4MoeForCausalLM": "glm4_moe",
    "GptOssForCausalLM": "gpt_oss",
}
_DEEPSEEK = ("deepseek_v2", "deepseek_v3")
# Families whose MoE layers are all `n_routed_experts` experts + a weight-1 shared expert, dense before
# `first_k_dense_replace`.
_DEEPSEEK_STYLE_MOE = (*_DEEPSEEK, "glm4_moe")


class UnsupportedModelError(ValueError):
    """The model directory holds an architecture or config this engine can't run."""


@dataclass(frozen=True)
class MLAConfig:
    """Multi-head latent attention (DeepSeek-V2/V3): K/V come from one compressed latent per token."""

    q_lora_rank: int | None  # None: q is one projection of the hidden state
    kv_lora_rank: int  # R, the latent width
    qk_nope_head_dim: int
    qk_rope_head_dim: int  # r, the decoupled rope part, shared by all heads
    v_head_dim: int

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def latent_dim(self) -> int:
        """What the KV cache stores per token and layer: the latent plus the rope'd key part."""
        return self.kv_lora_rank + self.qk_rope_head_dim


@dataclass(frozen=True)
class ExpertConfig:
    """What every expert (and shared/dense MLP) of the model computes."""

    activation: str = "silu"  # "silu": silu(g) * u; "swiglu_clamped": gpt-oss (alpha, limit)
    alpha: float = 1.0
    limit: float = 0.0
    has_bias: bool = False  # gpt-oss gate/up and down biases
    gate_up_interleaved: bool = False  # gpt-oss stores [H, 2I] with gate/up in alternating columns


@dataclass(frozen=True)
class ModelConfig:
    """Everything the executor needs to know about one model."""

    model_type: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope: RopeConfig
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool
    o_bias: bool
    qk_norm: str  # "none" | "per_head" (Qwen3) | "full" (OLMoE: over all heads at once)
    clip_qkv: float | None
    sliding_windows: tuple[int | None, ...]  # per layer; None = full attention
    sparse_layers: tuple[bool, ...]  # per layer: MoE (True) or dense MLP (False)
    intermediate_size: int  # dense MLP size
    num_experts: int = 0
    top_k: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = False
    shared_expert_intermediate_size: int = 0  # Qwen2-MoE: 0 means no shared expert
    mlp_bias: bool = False
    eos_token_ids: tuple[int, ...] = ()
    router: RouterConfig = RouterConfig()
    experts: ExpertConfig = ExpertConfig()
    shared_expert_gated: bool = True  # Qwen2-MoE's sigmoid gate; DeepSeek/GLM add theirs with weight 1
    mla: MLAConfig | None = None
    rotary_dim: int = 0  # dims of each head that rotate (partial rotary); 0 = all of head_dim
    rope_interleaved: bool = False  # DeepSeek: rotate pairs (x0, x1), (x2, x3), ... not halves
    attn_scale: float = 0.0  # softmax scale; 0 = head_dim ** -0.5
    attn_sinks: bool = False  # gpt-oss: a learned per-head logit that joins every softmax

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def kv_layout(self) -> tuple[int, int, int]:
        """(planes, heads, width) one token of one layer stores in the KV cache.

        MHA/GQA/MQA: K and V planes of Hkv heads x head_dim. MLA: one plane, one "head" of
        kv_lora_rank + qk_rope_head_dim (the latent is both the keys and, sliced, the values).
        """
        if self.mla is not None:
            return 1, 1, self.mla.latent_dim
        return 2, self.num_kv_heads, self.head_dim


def load_model_config(model_dir: str | Path) -> ModelConfig:
    """Read `model_dir/config.json` (+ generation_config.json for EOS ids)."""
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{model_dir}: no config.json (is this a Hugging Face model directory?)")
    raw = json.loads(path.read_text())
    gen_path = Path(model_dir) / "generation_config.json"
    gen = json.loads(gen_path.read_text()) if gen_path.is_file() else {}
    return parse_model_config(raw, gen, source=str(model_dir))


def parse_model_config(
    raw: dict[str, Any], gen: dict[str, Any] | None = None, source: str = ""
) -> ModelConfig:
    arch = (raw.get("architectures") or ["?"])[0]
    model_type = SUPPORTED_ARCHITECTURES.get(arch)
    if model_type is None:
        raise UnsupportedModelError(
            f"{source}: architecture {arch!r} is not supported "
            f"(supported: {', '.join(sorted(SUPPORTED_ARCHITECTURES))})"
        )
    _reject_quantized(raw, source)
    num_layers = raw["num_hidden_layers"]
    num_heads = raw["num_attention_heads"]
    moe = _parse_moe(raw, model_type, num_layers)
    rope = _parse_rope(raw, source)
    return ModelConfig(
        model_type=model_type,
        vocab_size=raw["vocab_size"],
        hidden_size=raw["hidden_size"],
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=raw.get("num_key_value_heads") or num_heads,
        head_dim=raw.get("head_dim") or raw["hidden_size"] // num_heads,
        rms_norm_eps=raw.get("rms_norm_eps", 1e-6),
        rope=rope,
        max_position_embeddings=raw.get("max_position_embeddings", 4096),
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        qkv_bias=model_type in ("qwen2", "qwen2_moe") or bool(raw.get("attention_bias", False)),
        o_bias=model_type not in ("qwen2", "qwen2_moe", "glm4_moe")
        and bool(raw.get("attention_bias", False)),
        qk_norm=_qk_norm(raw, model_type),
        clip_qkv=raw.get("clip_qkv") if model_type == "olmoe" else None,
        sliding_windows=_parse_sliding_windows(raw, model_type, num_layers),
        intermediate_size=raw.get("intermediate_size", 0),
        mlp_bias=bool(raw.get("mlp_bias", False)),
        eos_token_ids=_eos_ids(raw, gen or {}),
        attn_sinks=model_type == "gpt_oss",
        **_parse_attention_shape(raw, model_type, rope),
        **moe,
    )


def _reject_quantized(raw: dict[str, Any], source: str) -> None:
    quant = raw.get("quantization_config")
    if quant:
        method = quant.get("quant_method", "?") if isinstance(quant, dict) else quant
        raise UnsupportedModelError(
            f"{source}: {str(method).upper()}-quantised checkpoints are not supported yet "
            "(serve a bf16/fp16/fp32 checkpoint)"
        )


def _qk_norm(raw: dict[str, Any], model_type: str) -> str:
    if model_type == "glm4_moe":
        return "per_head" if raw.get("use_qk_norm") else "none"
    return {"qwen3": "per_head", "qwen3_moe": "per_head", "olmoe": "full"}.get(model_type, "none")


def _parse_attention_shape(raw: dict[str, Any], model_type: str, rope: RopeConfig) -> dict[str, Any]:
    """MLA fields, the rotary width and the softmax scale (DeepSeek's yarn mscale, squared)."""
    head_dim = raw.get("head_dim") or raw["hidden_size"] // raw["num_attention_heads"]
    factor = float(rope.params.get("partial_rotary_factor", 1.0))
    out: dict[str, Any] = {"rotary_dim": int(head_dim * factor), "attn_scale": head_dim**-0.5}
    if model_type not in _DEEPSEEK:
        return out
    mla = MLAConfig(
        q_lora_rank=raw.get("q_lora_rank"),
        kv_lora_rank=raw["kv_lora_rank"],
        qk_nope_head_dim=raw["qk_nope_head_dim"],
        qk_rope_head_dim=raw["qk_rope_head_dim"],
        v_head_dim=raw["v_head_dim"],
    )
    scale = mla.qk_head_dim**-0.5
    mscale_all_dim = rope.params.get("mscale_all_dim")
    if rope.rope_type != "default" and mscale_all_dim:  # transformers' yarn_apply_mscale
        m = _yarn_mscale(rope.params["factor"], mscale_all_dim)
        scale = scale * m * m
    out.update(
        mla=mla,
        rotary_dim=mla.qk_rope_head_dim,
        # V2 always rotates complex pairs; V3 when rope_interleave (its default)
        rope_interleaved=model_type == "deepseek_v2" or bool(raw.get("rope_interleave", True)),
        attn_scale=scale,
    )
    return out


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _parse_moe(raw: dict[str, Any], model_type: str, num_layers: int) -> dict[str, Any]:
    if model_type in _DEEPSEEK_STYLE_MOE:
        return _parse_deepseek_style_moe(raw, model_type, num_layers)
    if model_type == "gpt_oss":
        return _parse_gpt_oss_moe(raw, num_layers)
    if model_type in ("llama", "qwen2", "qwen3"):
        return {"sparse_layers": (False,) * num_layers}
    if model_type == "mixtral":
        num_experts = raw["num_local_experts"]
        return {
            "sparse_layers": (True,) * num_layers,
            "num_experts": num_experts,
            "top_k": raw["num_experts_per_tok"],
            "moe_intermediate_size": raw["intermediate_size"],
            "norm_topk_prob": True,  # Mixtral always renormalises its top-k
            "router": RouterConfig("softmax", raw["num_experts_per_tok"], renormalize=True),
        }
    num_experts = raw.get("num_experts", raw.get("num_local_experts", 0))
    step = raw.get("decoder_sparse_step", 1) or 1
    mlp_only = set(raw.get("mlp_only_layers") or [])
    sparse = tuple(i not in mlp_only and num_experts > 0 and (i + 1) % step == 0 for i in range(num_layers))
    if model_type == "olmoe":
        sparse = (True,) * num_layers
    return {
        "sparse_layers": sparse,
        "num_experts": num_experts,
        "top_k": raw["num_experts_per_tok"],
        "moe_intermediate_size": raw.get("moe_intermediate_size") or raw["intermediate_size"],
        "norm_topk_prob": bool(raw.get("norm_topk_prob", False)),
        "shared_expert_intermediate_size": (
            raw.get("shared_expert_intermediate_size", 0) if model_type == "qwen2_moe" else 0
        ),
        "router": RouterConfig("softmax", raw["num_experts_per_tok"], bool(raw.get("norm_topk_prob", False))),
    }


def _parse_deepseek_style_moe(raw: dict[str, Any], model_type: str, num_layers: int) -> dict[str, Any]:
    """DeepSeek-V2/V3 and GLM-4 MoE: dense first layers, routed + weight-1 shared experts."""
    top_k = raw["num_experts_per_tok"]
    first_dense = raw.get("first_k_dense_replace") or 0
    if model_type == "deepseek_v2":
        method = raw.get("topk_method") or "greedy"
        if method not in ("greedy", "group_limited_greedy"):
            raise UnsupportedModelError(f"DeepSeek-V2 topk_method {method!r} is not supported")
        # transformers' V2 router never renormalises (norm_topk_prob is unused there)
        router = RouterConfig(
            "softmax" if method == "greedy" else method,
            top_k,
            renormalize=False,
            num_groups=raw.get("n_group") or 1,
            topk_groups=raw.get("topk_group") or 1,
            scaling_factor=float(raw.get("routed_scaling_factor", 1.0)),
            fp32_logits=True,
        )
    else:
        router = RouterConfig(
            "sigmoid_grouped",
            top_k,
            renormalize=bool(raw.get("norm_topk_prob", True)),
            num_groups=raw.get("n_group") or 1,
            topk_groups=raw.get("topk_group") or 1,
            scaling_factor=float(raw.get("routed_scaling_factor", 1.0)),
            has_correction_bias=True,
            fp32_logits=True,
        )
    inter = raw["moe_intermediate_size"]
    return {
        "sparse_layers": tuple(i >= first_dense for i in range(num_layers)),
        "num_experts": raw["n_routed_experts"],
        "top_k": top_k,
        "moe_intermediate_size": inter,
        "norm_topk_prob": router.renormalize,
        "shared_expert_intermediate_size": inter * (raw.get("n_shared_experts") or 0),
        "shared_expert_gated": False,
        "router": router,
    }


def _parse_gpt_oss_moe(raw: dict[str, Any], num_layers: int) -> dict[str, Any]:
    top_k = raw["num_experts_per_tok"]
    return {
        "sparse_layers": (True,) * num_layers,
        "num_experts": raw["num_local_experts"],
        "top_k": top_k,
        "moe_intermediate_size": raw["intermediate_size"],
        "router": RouterConfig("topk_softmax", top_k, has_bias=True),
        "experts": ExpertConfig(
            "swiglu_clamped",
            alpha=float(raw.get("swiglu_alpha", 1.702)),
            limit=float(raw.get("swiglu_limit", 7.0)),
            has_bias=True,
            gate_up_interleaved=True,
        ),
    }


def _parse_rope(raw: dict[str, Any], source: str) -> RopeConfig:
    params = dict(raw.get("rope_parameters") or raw.get("rope_scaling") or {})
    theta = params.pop("rope_theta", None) or raw.get("rope_theta", 10000.0)
    rope_type = params.pop("rope_type", None) or params.pop("type", None) or "default"
    if "partial_rotary_factor" not in params and raw.get("partial_rotary_factor") is not None:
        params["partial_rotary_factor"] = raw["partial_rotary_factor"]
    if not 0.0 < float(params.get("partial_rotary_factor", 1.0)) <= 1.0:
        raise UnsupportedModelError(f"{source}: partial_rotary_factor must be in (0, 1]")
    if rope_type not in ("default", "linear", "llama3", "yarn"):
        raise UnsupportedModelError(
            f"{source}: rope type {rope_type!r} is not supported (default, linear, llama3, yarn)"
        )
    if rope_type == "yarn" and params.get("factor") is None:
        params["factor"] = raw["max_position_embeddings"] / params["original_max_position_embeddings"]
    return RopeConfig(theta=float(theta), rope_type=rope_type, params=params)


def _parse_sliding_windows(raw: dict[str, Any], model_type: str, num_layers: int) -> tuple[int | None, ...]:
    """Per-layer windows, following how each transformers model builds its masks."""
    window = raw.get("sliding_window")
    if model_type in ("mixtral", "qwen3_moe"):  # one window for all layers when set
        return (window or None,) * num_layers
    if model_type == "gpt_oss":
        layer_types = raw.get("layer_types") or [
            "sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(num_layers)
        ]
        return tuple(window if t == "sliding_attention" else None for t in layer_types)
    if model_type in ("qwen2", "qwen3", "qwen2_moe"):
        layer_types = raw.get("layer_types")
        if layer_types is None:
            use = raw.get("use_sliding_window", False)
            max_window_layers = raw.get("max_window_layers", num_layers)
            layer_types = [
                "sliding_attention" if use and window and i >= max_window_layers else "full_attention"
                for i in range(num_layers)
            ]
        return tuple(window if t == "sliding_attention" else None for t in layer_types)
    return (None,) * num_layers


def _eos_ids(raw: dict[str, Any], gen: dict[str, Any]) -> tuple[int, ...]:
    ids: list[int] = []
    for src in (gen.get("eos_token_id"), raw.get("eos_token_id")):
        for i in src if isinstance(src, list) else [src]:
            if isinstance(i, int) and i not in ids:
                ids.append(i)
    return tuple(ids)
