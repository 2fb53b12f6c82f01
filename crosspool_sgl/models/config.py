"""One normalised description of every supported architecture, read from config.json.

The executor is a single decoder implementation driven by this dataclass; the
per-architecture differences (q/k norms, biases, shared experts, which layers
are sparse or slide) are all fields here, filled from the Hugging Face config
exactly as `transformers` interprets it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# architectures (config.json "architectures"[0]) -> model_type we implement
SUPPORTED_ARCHITECTURES = {
    "Qwen3MoeForCausalLM": "qwen3_moe",
    "Qwen2MoeForCausalLM": "qwen2_moe",
    "MixtralForCausalLM": "mixtral",
    "OlmoeForCausalLM": "olmoe",
    "LlamaForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
}


class UnsupportedModelError(ValueError):
    """The model directory holds an architecture or config this engine can't run."""


@dataclass(frozen=True)
class RopeConfig:
    theta: float
    rope_type: str = "default"  # default | linear | llama3 | yarn
    params: dict[str, Any] = field(default_factory=dict)


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

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim


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
    num_layers = raw["num_hidden_layers"]
    num_heads = raw["num_attention_heads"]
    moe = _parse_moe(raw, model_type, num_layers)
    return ModelConfig(
        model_type=model_type,
        vocab_size=raw["vocab_size"],
        hidden_size=raw["hidden_size"],
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=raw.get("num_key_value_heads") or num_heads,
        head_dim=raw.get("head_dim") or raw["hidden_size"] // num_heads,
        rms_norm_eps=raw.get("rms_norm_eps", 1e-6),
        rope=_parse_rope(raw, source),
        max_position_embeddings=raw.get("max_position_embeddings", 4096),
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        qkv_bias=model_type in ("qwen2", "qwen2_moe") or bool(raw.get("attention_bias", False)),
        o_bias=model_type not in ("qwen2", "qwen2_moe") and bool(raw.get("attention_bias", False)),
        qk_norm={"qwen3": "per_head", "qwen3_moe": "per_head", "olmoe": "full"}.get(model_type, "none"),
        clip_qkv=raw.get("clip_qkv") if model_type == "olmoe" else None,
        sliding_windows=_parse_sliding_windows(raw, model_type, num_layers),
        intermediate_size=raw.get("intermediate_size", 0),
        mlp_bias=bool(raw.get("mlp_bias", False)),
        eos_token_ids=_eos_ids(raw, gen or {}),
        **moe,
    )


def _parse_moe(raw: dict[str, Any], model_type: str, num_layers: int) -> dict[str, Any]:
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
    }


def _parse_rope(raw: dict[str, Any], source: str) -> RopeConfig:
    params = dict(raw.get("rope_parameters") or raw.get("rope_scaling") or {})
    theta = params.pop("rope_theta", None) or raw.get("rope_theta", 10000.0)
    rope_type = params.pop("rope_type", None) or params.pop("type", None) or "default"
    if params.get("partial_rotary_factor", 1.0) != 1.0:
        raise UnsupportedModelError(f"{source}: partial_rotary_factor is not supported")
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
