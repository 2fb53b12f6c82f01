"""Decode step time of a mid-size random bf16 MoE on one GPU, next to its bandwidth floor.

    python benchmarks/gpu_decode_step.py [--batches 1,8,64] [--context 1024] [--out FILE.md]

The model (Qwen3-MoE layout: hidden 2048, 16 layers, 64 experts top-8, expert width 768,
16 query / 4 KV heads of 128) is generated on the GPU with random weights — nothing is read
from disk. At each batch size B, every row decodes one token over `context` cached tokens; the
step (forward + LM head + argmax) is timed eagerly and as a CUDA-graph replay of the
static-buffer runner (core/static_decode.py). The floor is (active weight bytes + KV bytes) /
HBM bandwidth, where the bandwidth is measured here with a device-to-device copy and the active
weights are attention, norms, routers, the LM head and the experts a step touches (expected
distinct experts per layer under uniform routing: E * (1 - (1 - k/E)^B)).

Refuses (exit 2, one line) without CUDA.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CONFIG = {
    "architectures": ["Qwen3MoeForCausalLM"],
    "model_type": "qwen3_moe",
    "hidden_size": 2048,
    "num_hidden_layers": 16,
    "num_attention_heads": 16,
    "num_key_value_heads": 4,
    "head_dim": 128,
    "intermediate_size": 6144,
    "moe_intermediate_size": 768,
    "num_experts": 64,
    "num_local_experts": 64,
    "num_experts_per_tok": 8,
    "norm_topk_prob": True,
    "decoder_sparse_step": 1,
    "mlp_only_layers": [],
    "vocab_size": 32000,
    "max_position_embeddings": 32768,
    "rms_norm_eps": 1e-6,
    "rope_parameters": {"rope_theta": 1000000.0, "rope_type": "default"},
    "tie_word_embeddings": False,
    "attention_bias": False,
    "hidden_act": "silu",
    "eos_token_id": 0,
    "dtype": "bfloat16",
}


def random_model(cfg, device: torch.device, dtype: torch.dtype, attention: str):
    """A DecoderModel with random weights built in place on `device` (std 0.02, unit norms)."""
    from crosspool_sgl.layers.attention import create_attention_backend
    from crosspool_sgl.mem.weight_pool import WeightPool
    from crosspool_sgl.models.decoder import DecoderModel, LayerWeights, ModelWeights
    from crosspool_sgl.models.loader import ffn_elements

    def rnd(*shape):
        return (torch.randn(*shape, device=device, dtype=torch.float32) * 0.02).to(dtype)

    def ones(n):
        return torch.ones(n, device=device, dtype=dtype)

    pool = WeightPool(dtype, device)
    pool.reserve(ffn_elements(cfg))
    h, inter, e = cfg.hidden_size, cfg.moe_intermediate_size, cfg.num_experts
    layers = []
    for i in range(cfg.num_layers):
        slots = [
            pool.add_expert("bench", i, x, rnd(inter, h), rnd(inter, h), rnd(h, inter)) for x in range(e)
        ]
        layers.append(
            LayerWeights(
                input_norm=ones(h),
                post_norm=ones(h),
                qkv_weight=rnd(cfg.q_size + 2 * cfg.kv_size, h),
                qkv_bias=None,
                o_weight=rnd(h, cfg.q_size),
                o_bias=None,
                q_norm=ones(cfg.head_dim),
                k_norm=ones(cfg.head_dim),
                router=rnd(e, h),
                ffn_slots=torch.tensor(slots, device=device),
            )
        )
    weights = ModelWeights(
        embed=rnd(cfg.vocab_size, h), final_norm=ones(h), lm_head=rnd(cfg.vocab_size, h), layers=layers
    )
    return DecoderModel("bench", cfg, weights, pool, create_attention_backend(device, attention), device)


def hbm_bandwidth(device: torch.device, nbytes: int = 1 << 30) -> float:
    """Bytes/s of a device-to-device copy (read + write counted)."""
    a = torch.empty(nbytes, dtype=torch.uint8, device=device)
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(10):
        b.copy_(a)
    torch.cuda.synchronize(device)
    return 2 * nbytes * 10 / (time.perf_counter() - start)


def active_weight_bytes(model, batch: int) -> int:
    cfg, w = model.config, model.weights
    elem = w.embed.element_size()
    dense = sum(
        t.numel()
        for lw in w.layers
        for t in (lw.input_norm, lw.post_norm, lw.qkv_weight, lw.o_weight, lw.q_norm, lw.k_norm, lw.router)
    )
    dense += w.lm_head.numel() + w.final_norm.numel() + batch * cfg.hidden_size
    e, k = cfg.num_experts, cfg.router.top_k
    distinct = e * (1 - (1 - k / e) ** batch)
    expert = 3 * cfg.hidden_size * cfg.moe_intermediate_size
    return int((dense + cfg.num_layers * distinct * expert) * elem)


def time_ms(fn, iters: int = 20) -> float:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def measure(model, kv_pool, batch: int, context: int) -> dict:
    from crosspool_sgl.core.static_decode import DecodeRow, StaticDecodeRunner
    from crosspool_sgl.layers.attention import AttentionMetadata

    pt, dev = kv_pool.page_tokens, model.weights.embed.device
    kv = kv_pool.kv_view("bench")
    pages = [kv_pool.alloc("bench", -(-(context + 1) // pt)) for _ in range(batch)]
    assert all(p is not None for p in pages), "KV pool too small"
    for p in pages:
        kv[p] = 0
    rows = [DecodeRow(7, context, p) for p in pages]
    ids = torch.full((batch,), 7, dtype=torch.int64, device=dev)
    pos = torch.full((batch,), context, dtype=torch.int64, device=dev)
    meta = AttentionMetadata.build(pages, [context + 1] * batch, [1] * batch, pt, dev)

    def eager():
        model.logits(model.forward(ids, pos, meta, kv)).argmax(-1)

    runner = StaticDecodeRunner({"bench": model}, kv_pool, dev, batch_buckets=(batch,), min_width=1)

    def graphed():
        model.logits(runner.run({"bench": rows})["bench"]).argmax(-1)

    eager_ms = time_ms(eager)
    graph_ms = time_ms(graphed)
    stats = runner.stats()
    for p in pages:
        kv_pool.free("bench", p)
    kv_bytes = batch * (context + 1) * kv[0, :, :, 0].numel() * kv.element_size()
    return {"eager_ms": eager_ms, "graph_ms": graph_ms, "kv_bytes": kv_bytes, "graphs": stats["graphs"]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batches", default="1,8,64")
    p.add_argument("--context", type=int, default=1024, help="cached tokens per row")
    p.add_argument("--attention-backend", default="auto")
    p.add_argument("--out", default=None, help="markdown file to write (default: stdout only)")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_decode_step: needs a CUDA GPU (torch.cuda.is_available() is False); nothing measured")
        return 2
    from crosspool_sgl.mem.kv_pool import KVGeometry, KVPool
    from crosspool_sgl.models.config import load_model_config

    dev, dtype = torch.device("cuda"), torch.bfloat16
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "config.json").write_text(json.dumps(CONFIG))
        cfg = load_model_config(d)
    model = random_model(cfg, dev, dtype, args.attention_backend)
    batches = [int(b) for b in args.batches.split(",")]
    geom = KVGeometry.mha(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, dtype)
    kv_bytes = max(batches) * (args.context + 64) * geom.token_bytes() * 2 + (64 << 20)
    kv_pool = KVPool(kv_bytes, page_tokens=16, chunk_bytes=2 << 20, device=dev)
    kv_pool.add_model("bench", geom)
    bw = hbm_bandwidth(dev)
    lines = [
        f"# Decode step of a random bf16 MoE ({torch.cuda.get_device_name(dev)})",
        "",
        f"hidden {cfg.hidden_size}, {cfg.num_layers} layers, {cfg.num_experts} experts "
        f"top-{cfg.router.top_k} (width {cfg.moe_intermediate_size}), {cfg.num_heads}/{cfg.num_kv_heads} "
        f"heads of {cfg.head_dim}, vocab {cfg.vocab_size}; context {args.context} tokens per row; "
        f"attention {model.attn_backend.name}; torch {torch.__version__}. "
        f"Copy bandwidth measured: {bw / 1e9:.0f} GB/s.",
        "",
        "| batch | eager ms | graph ms | floor ms | graph / floor | active weights MB | KV MB |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for b in batches:
        m = measure(model, kv_pool, b, args.context)
        weights = active_weight_bytes(model, b)
        floor_ms = (weights + m["kv_bytes"]) / bw * 1e3
        lines.append(
            f"| {b} | {m['eager_ms']:.3f} | {m['graph_ms']:.3f} | {floor_ms:.3f} "
            f"| {m['graph_ms'] / floor_ms:.2f} | {weights / 1e6:.0f} | {m['kv_bytes'] / 1e6:.1f} |"
        )
        print(lines[-1], flush=True)
    text = "\n".join(lines) + "\n"
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
