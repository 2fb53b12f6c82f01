"""A bare engine core (pools, decoders) and a greedy decode loop, eager or on static buffers.

Only the engine core is imported (no sglang, no scheduler), so tests/gpu reuses this on a
GPU machine that has nothing but torch, triton, transformers and safetensors.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path

import torch

from crosspool_sgl.core.static_decode import DecodeRow, StaticDecodeRunner
from crosspool_sgl.layers.attention import AttentionMetadata, create_attention_backend
from crosspool_sgl.mem.kv_pool import KVGeometry, KVPool
from crosspool_sgl.mem.weight_pool import WeightPool
from crosspool_sgl.models.decoder import DecoderModel
from crosspool_sgl.models.loader import load_model

PAGE_TOKENS = 4  # small pages: a sequence crosses several, so page tables change between steps


@dataclass
class Core:
    models: dict[str, DecoderModel]
    kv_pool: KVPool
    device: torch.device


@dataclass
class Seq:
    model: str
    tokens: list[int]
    pages: list[int] = field(default_factory=list)
    num_cached: int = 0


def build_core(dirs: dict[str, Path], device: torch.device, dtype=torch.float32, attention="auto") -> Core:
    pool = WeightPool(dtype, device)
    attn = create_attention_backend(device, attention)
    models = {n: load_model(n, str(p), pool, attn, device, dtype, False) for n, p in dirs.items()}
    chunk = 2 << 20 if device.type == "cuda" else 256 << 10  # CUDA: the VMM granularity, as served
    kv_pool = KVPool(64 << 20, page_tokens=PAGE_TOKENS, chunk_bytes=chunk, device=device)
    for name, m in models.items():
        planes, heads, width = m.config.kv_layout
        kv_pool.add_model(name, KVGeometry(m.config.num_layers, heads, width, dtype, num_planes=planes))
    return Core(models, kv_pool, device)


def _grow_pages(core: Core, seqs: list[Seq], total: int, rng: random.Random) -> None:
    """Give every sequence pages for `total` tokens, taken in a shuffled order across sequences."""
    order = list(seqs)
    rng.shuffle(order)
    for s in order:
        need = -(-total // PAGE_TOKENS) - len(s.pages)
        if need > 0:
            got = core.kv_pool.alloc(s.model, need)
            assert got is not None, "test KV pool too small"
            s.pages += got


def _eager_step(core: Core, seqs: list[Seq], n_new: list[int]) -> dict[int, torch.Tensor]:
    """One eager forward per model over its sequences' next n_new tokens; last hidden row per seq."""
    out: dict[int, torch.Tensor] = {}
    for name, model in core.models.items():
        idx = [i for i, s in enumerate(seqs) if s.model == name]
        if not idx:
            continue
        ids, pos = [], []
        for i in idx:
            s = seqs[i]
            ids += s.tokens[s.num_cached : s.num_cached + n_new[i]]
            pos += range(s.num_cached, s.num_cached + n_new[i])
        meta = AttentionMetadata.build(
            [seqs[i].pages for i in idx],
            [seqs[i].num_cached + n_new[i] for i in idx],
            [n_new[i] for i in idx],
            PAGE_TOKENS,
            core.device,
        )
        as_t = lambda x: torch.tensor(x, dtype=torch.int64, device=core.device)  # noqa: E731
        hidden = model.forward(as_t(ids), as_t(pos), meta, core.kv_pool.kv_view(name))
        ends = torch.tensor(n_new)[idx].cumsum(0) - 1
        for j, i in enumerate(idx):
            out[i] = hidden[int(ends[j])]
    return out


def _static_step(runner: StaticDecodeRunner, seqs: list[Seq]) -> dict[int, torch.Tensor]:
    rows: dict[str, list[DecodeRow]] = {}
    where: dict[str, list[int]] = {}
    for i, s in enumerate(seqs):
        rows.setdefault(s.model, []).append(DecodeRow(s.tokens[s.num_cached], s.num_cached, s.pages))
        where.setdefault(s.model, []).append(i)
    hidden = runner.run(rows)
    assert hidden is not None, f"static decode refused {sorted(rows)}"
    return {i: hidden[m][j] for m, idx in where.items() for j, i in enumerate(idx)}


def greedy(
    core: Core,
    prompts: list[tuple[str, list[int]]],
    new_tokens: int,
    runner: StaticDecodeRunner | None = None,
    seed: int = 0,
) -> tuple[list[list[int]], list[torch.Tensor]]:
    """Prefill every prompt eagerly, then decode `new_tokens` greedily (eager, or via `runner`).

    Returns the new tokens per prompt and the last step's hidden rows. Pages are freed after."""
    rng = random.Random(seed)
    seqs = [Seq(m, list(p)) for m, p in prompts]
    _grow_pages(core, seqs, max(len(s.tokens) for s in seqs), rng)
    last = _eager_step(core, seqs, [len(s.tokens) for s in seqs])
    hidden_rows: list[torch.Tensor] = []
    try:
        for step in range(new_tokens):
            for i, s in enumerate(seqs):
                s.num_cached = len(s.tokens)
                s.tokens.append(int(core.models[s.model].logits(last[i][None]).argmax(-1)))
            if step == new_tokens - 1:
                break
            _grow_pages(core, seqs, max(len(s.tokens) for s in seqs), rng)
            last = _static_step(runner, seqs) if runner else _eager_step(core, seqs, [1] * len(seqs))
            hidden_rows = [last[i].clone() for i in range(len(seqs))]
    finally:
        for s in seqs:
            core.kv_pool.free(s.model, s.pages)
    return [s.tokens[len(p) :] for s, (_, p) in zip(seqs, prompts, strict=True)], hidden_rows
