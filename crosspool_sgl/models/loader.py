"""Load a Hugging Face model directory into a DecoderModel plus the shared weights pool.

Reads config.json and safetensors (one file or an index of shards), copies the
FFN/expert weights into the WeightPool (sized up front, so nothing is copied
twice) and keeps attention weights, norms, embeddings and the LM head with the
model. A missing tensor is an error naming it and the directory.
"""

from __future__ import annotations

import json
from contextlib import ExitStack
from pathlib import Path

import torch
from safetensors import safe_open
from tqdm.auto import tqdm

from crosspool_sgl.layers.attention.base import AttentionBackend
from crosspool_sgl.mem.weight_pool import ACT_SWIGLU_CLAMPED, SlotActivation, WeightPool
from crosspool_sgl.models.config import ModelConfig, UnsupportedModelError, load_model_config
from crosspool_sgl.models.decoder import DecoderModel, LayerWeights, ModelWeights
from crosspool_sgl.models.mla import MLAWeights


class MissingWeightError(KeyError):
    def __str__(self) -> str:
        return str(self.args[0])


class CheckpointReader:
    """Name -> tensor over one or many safetensors files, opened once."""

    def __init__(self, model_dir: Path, stack: ExitStack) -> None:
        self.model_dir = model_dir
        index = model_dir / "model.safetensors.index.json"
        if index.is_file():
            weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        else:
            files = sorted(model_dir.glob("*.safetensors"))
            if not files:
                raise FileNotFoundError(f"{model_dir}: no *.safetensors files")
            weight_map = {}
            for f in files:
                with safe_open(str(f), "pt") as h:
                    weight_map.update({k: f.name for k in h.keys()})
        handles = {
            f: stack.enter_context(safe_open(str(model_dir / f), "pt")) for f in set(weight_map.values())
        }
        self._where = {k: handles[f] for k, f in weight_map.items()}

    def has(self, name: str) -> bool:
        return name in self._where

    def get(self, name: str, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        if name not in self._where:
            raise MissingWeightError(f"{self.model_dir}: tensor {name!r} is missing from the checkpoint")
        return self._where[name].get_tensor(name).to(device=device, dtype=dtype)


def load_model(
    name: str,
    model_dir: str | Path,
    weight_pool: WeightPool,
    attn_backend: AttentionBackend,
    device: torch.device,
    dtype: torch.dtype,
    show_progress: bool = True,
) -> DecoderModel:
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise FileNotFoundError(f"model {name!r}: directory {model_dir} does not exist")
    config = load_model_config(model_dir)
    if config.mlp_bias:
        raise UnsupportedModelError(f"{model_dir}: mlp_bias=True is not supported")
    weight_pool.reserve(ffn_elements(config))
    with ExitStack() as stack:
        ckpt = CheckpointReader(model_dir, stack)

        def get(n: str) -> torch.Tensor:
            return ckpt.get(n, dtype, device)

        layers = [
            _load_layer(name, i, config, ckpt, get, weight_pool)
            for i in tqdm(range(config.num_layers), desc=f"loading {name}", disable=not show_progress)
        ]
        embed = get("model.embed_tokens.weight")
        lm_head = (
            embed if config.tie_word_embeddings or not ckpt.has("lm_head.weight") else get("lm_head.weight")
        )
        weights = ModelWeights(
            embed=embed, final_norm=get("model.norm.weight"), lm_head=lm_head, layers=layers
        )
    return DecoderModel(name, config, weights, weight_pool, attn_backend, device)


def ffn_elements(config: ModelConfig) -> int:
    """Elements this model adds to the weights pool (gate + up + down of every FFN, + biases)."""
    hidden = config.hidden_size

    def expert(inter: int, biased: bool = False) -> int:
        return 3 * inter * hidden + (2 * inter + hidden if biased else 0)

    total = 0
    for sparse in config.sparse_layers:
        if sparse:
            total += config.num_experts * expert(config.moe_intermediate_size, config.experts.has_bias)
            if config.shared_expert_intermediate_size:
                total += expert(config.shared_expert_intermediate_size)
        else:
            total += expert(config.intermediate_size)
    return total


def _load_layer(name: str, i: int, cfg: ModelConfig, ckpt: CheckpointReader, get, pool: WeightPool):
    p = f"model.layers.{i}."
    layer = _load_attention(p + "self_attn.", cfg, ckpt, get)
    layer.input_norm = get(p + "input_layernorm.weight")
    layer.post_norm = get(p + "post_attention_layernorm.weight")
    device = layer.o_weight.device
    if not cfg.sparse_layers[i]:
        m = p + "mlp."
        slot = pool.add_expert(
            name, i, 0, get(m + "gate_proj.weight"), get(m + "up_proj.weight"), get(m + "down_proj.weight")
        )
        layer.ffn_slots = torch.tensor([slot], device=device)
        return layer
    moe = p + ("block_sparse_moe." if cfg.model_type == "mixtral" else "mlp.")
    router = moe + ("router." if cfg.model_type == "gpt_oss" else "gate.")
    layer.router = get(router + "weight")
    layer.router_bias = get(router + "bias") if cfg.router.has_bias else None
    if cfg.router.has_correction_bias:
        layer.correction_bias = ckpt.get(router + "e_score_correction_bias", torch.float32, device)
    slots = [pool.add_expert(name, i, e, *w, **kw) for e, (w, kw) in enumerate(_experts(cfg, moe, ckpt, get))]
    layer.ffn_slots = torch.tensor(slots, device=device)
    if cfg.shared_expert_intermediate_size:
        s = moe + ("shared_expert." if cfg.shared_expert_gated else "shared_experts.")
        shared = (get(s + "gate_proj.weight"), get(s + "up_proj.weight"), get(s + "down_proj.weight"))
        layer.shared_slot = pool.add_expert(name, i, cfg.num_experts, *shared)
        if cfg.shared_expert_gated:
            layer.shared_gate = get(moe + "shared_expert_gate.weight")
    return layer


def _load_attention(a: str, cfg: ModelConfig, ckpt: CheckpointReader, get) -> LayerWeights:
    """A layer's attention tensors (norms and FFN are filled in by the caller)."""
    has_norm = cfg.qk_norm != "none"
    layer = LayerWeights(
        input_norm=None,
        post_norm=None,
        qkv_weight=None,
        qkv_bias=None,
        o_weight=get(a + "o_proj.weight"),
        o_bias=get(a + "o_proj.bias") if cfg.o_bias else None,
        q_norm=get(a + "q_norm.weight") if has_norm else None,
        k_norm=get(a + "k_norm.weight") if has_norm else None,
        router=None,
        ffn_slots=torch.empty(0),
    )
    if cfg.mla is not None:
        layer.mla = _load_mla(a, cfg, get)
        return layer
    layer.qkv_weight = torch.cat(
        [get(a + "q_proj.weight"), get(a + "k_proj.weight"), get(a + "v_proj.weight")]
    )
    if cfg.qkv_bias:
        layer.qkv_bias = torch.cat([get(a + "q_proj.bias"), get(a + "k_proj.bias"), get(a + "v_proj.bias")])
    if cfg.attn_sinks:  # a logit in the softmax: kept in fp32 whatever the serving dtype
        layer.sinks = ckpt.get(a + "sinks", torch.float32, layer.o_weight.device)
    return layer


def _load_mla(a: str, cfg: ModelConfig, get) -> MLAWeights:
    bias = cfg.qkv_bias  # attention_bias: q_a_proj and kv_a_proj_with_mqa have biases
    lora = cfg.mla.q_lora_rank is not None
    return MLAWeights.from_kv_b(
        cfg,
        get(a + "kv_b_proj.weight"),
        q_proj=None if lora else get(a + "q_proj.weight"),
        q_a_proj=get(a + "q_a_proj.weight") if lora else None,
        q_a_bias=get(a + "q_a_proj.bias") if lora and bias else None,
        q_a_norm=get(a + "q_a_layernorm.weight") if lora else None,
        q_b_proj=get(a + "q_b_proj.weight") if lora else None,
        kv_a_proj=get(a + "kv_a_proj_with_mqa.weight"),
        kv_a_bias=get(a + "kv_a_proj_with_mqa.bias") if bias else None,
        kv_a_norm=get(a + "kv_a_layernorm.weight"),
    )


def _experts(cfg: ModelConfig, moe: str, ckpt: CheckpointReader, get):
    """Yield ((gate [I, H], up [I, H], down [H, I]), add_expert kwargs) per expert."""
    if cfg.experts.gate_up_interleaved:
        yield from _gpt_oss_experts(cfg, moe, get)
        return
    for w in _expert_weights(cfg, moe, ckpt, get):
        yield w, {}


def _gpt_oss_experts(cfg: ModelConfig, moe: str, get):
    """gpt-oss: gate_up [E, H, 2I] with gate/up in alternating columns, down [E, I, H], biases."""
    x = moe + "experts."
    gate_up, gate_up_bias = get(x + "gate_up_proj"), get(x + "gate_up_proj_bias")
    down, down_bias = get(x + "down_proj"), get(x + "down_proj_bias")
    act = SlotActivation(ACT_SWIGLU_CLAMPED, cfg.experts.alpha, cfg.experts.limit)
    for e in range(cfg.num_experts):
        weights = (gate_up[e, :, 0::2].t(), gate_up[e, :, 1::2].t(), down[e].t())
        biases = (gate_up_bias[e, 0::2], gate_up_bias[e, 1::2], down_bias[e])
        yield weights, {"biases": biases, "activation": act}


def _expert_weights(cfg: ModelConfig, moe: str, ckpt: CheckpointReader, get):
    """Yield (gate [I, H], up [I, H], down [H, I]) per expert, from per-expert or fused checkpoints."""
    fused = moe + "experts.gate_up_proj"
    if ckpt.has(fused):  # transformers-5 style: [E, 2I, H] and [E, H, I]
        gate_up, down = get(fused), get(moe + "experts.down_proj")
        inter = cfg.moe_intermediate_size
        for e in range(cfg.num_experts):
            yield gate_up[e, :inter], gate_up[e, inter:], down[e]
        return
    names = ("w1", "w3", "w2") if cfg.model_type == "mixtral" else ("gate_proj", "up_proj", "down_proj")
    for e in range(cfg.num_experts):
        x = f"{moe}experts.{e}."
        yield tuple(get(f"{x}{n}.weight") for n in names)
