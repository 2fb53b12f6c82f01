"""The one interface every attention backend implements, and the metadata it reads.

Backends see tensors and page tables only, never pool objects: the KV of one
model is its view ``kv`` [N, L, P, PT, Hkv, D] of the shared arena, in the
model's own page geometry (`mem.kv_pool.KVGeometry`): P = 2 planes (K, V) for
MHA/GQA/MQA, or P = 1 plane holding one latent "head" for MLA, which serves as
the keys and, its first `value_dim` columns, as the values. So MLA (computed in
absorbed form by the model, see models/mla.py) is MQA over the latent for a
backend: no special case beyond "the values live in the key plane".

Legend: T = new tokens in the batch, B = sequences, N = pages, L = layers,
P = planes, PT = tokens per page, Hq/Hkv = query/KV heads, D = head dim,
Dv = value width (D, or the latent rank for MLA).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import torch


@dataclass
class AttentionMetadata:
    """Where each sequence's KV lives and which of its tokens are new this step."""

    page_table: torch.Tensor  # [B, max_pages] int32, page ids in order (padding: the row's last page)
    seq_lens: torch.Tensor  # [B] int32, tokens in the cache after this step
    extend_lens: torch.Tensor  # [B] int32, new tokens of each sequence this step
    write_pages: torch.Tensor  # [T] int64, page receiving each new token's K/V
    write_slots: torch.Tensor  # [T] int64, slot within that page
    seq_lens_cpu: list[int]
    extend_lens_cpu: list[int]
    page_tokens: int
    # Tensors derived from this metadata that every layer would rebuild (the decode mask, ...).
    step_cache: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def is_decode(self) -> bool:
        return all(n == 1 for n in self.extend_lens_cpu)

    @classmethod
    def build(
        cls, pages: list[list[int]], seq_lens: list[int], extend_lens: list[int], page_tokens: int, device
    ) -> AttentionMetadata:
        return cls.build_many([(pages, seq_lens, extend_lens)], page_tokens, device)[0]

    @classmethod
    def build_many(
        cls, batches: list[tuple[list[list[int]], list[int], list[int]]], page_tokens: int, device
    ) -> list[AttentionMetadata]:
        """Metadata of several batches (pages, seq_lens, extend_lens) — one per model of a step.

        Every batch's tensors are views of two host tensors (int32, int64) moved to the device
        once: a step of M models costs two tensor builds, not five per model.
        """
        ints32: list[int] = []  # per batch: page table [B, max_pages] (row-major), seq_lens, extend_lens
        ints64: list[int] = []  # per batch: write_pages, write_slots
        layout = []
        for pages, seq_lens, extend_lens in batches:
            max_pages = max(len(p) for p in pages)
            at32, at64 = len(ints32), len(ints64)
            for p in pages:
                ints32 += p
                # pad with a page of the row's own (owned, mapped) pages, never page 0: a backend that
                # gathers the whole width (the torch decode) reads the padding before masking it, and
                # page 0's chunk may be another model's or unmapped (CUDA VMM)
                ints32 += [p[-1] if p else 0] * (max_pages - len(p))
            ints32 += seq_lens
            ints32 += extend_lens
            write_slots: list[int] = []
            for p, total, new in zip(pages, seq_lens, extend_lens, strict=True):
                for pos in range(total - new, total):
                    ints64.append(p[pos // page_tokens])
                    write_slots.append(pos % page_tokens)
            ints64 += write_slots
            layout.append((at32, at64, len(pages), max_pages, len(write_slots)))
        t32 = torch.tensor(ints32, dtype=torch.int32).to(device)
        t64 = torch.tensor(ints64, dtype=torch.int64).to(device)
        metas = []
        for (_, seq_lens, extend_lens), (at32, at64, b, width, t) in zip(batches, layout, strict=True):
            lens = at32 + b * width
            metas.append(
                cls(
                    page_table=t32[at32:lens].view(b, width),
                    seq_lens=t32[lens : lens + b],
                    extend_lens=t32[lens + b : lens + 2 * b],
                    write_pages=t64[at64 : at64 + t],
                    write_slots=t64[at64 + t : at64 + 2 * t],
                    seq_lens_cpu=list(seq_lens),
                    extend_lens_cpu=list(extend_lens),
                    page_tokens=page_tokens,
                )
            )
        return metas


class AttentionBackend(ABC):
    """Writes the new tokens' K/V into the pages, then attends over each sequence's cache."""

    name: str = "base"
    # No per-step state (no plan() between init_forward and forward): two threads may run forwards
    # at once, as the scheduler's prefill lane does.
    thread_safe: bool = False

    def init_forward(self, meta: AttentionMetadata) -> None:  # noqa: B027 - optional hook
        """Per-step planning (FlashInfer's plan()); called once before the layers run."""

    @staticmethod
    def write_kv(
        kv: torch.Tensor, layer: int, meta: AttentionMetadata, k: torch.Tensor, v: torch.Tensor | None
    ) -> None:
        """New tokens' K (or latent) into plane 0 and V into plane 1 (when the geometry has one)."""
        kv[meta.write_pages, layer, 0, meta.write_slots] = k
        if v is not None:
            kv[meta.write_pages, layer, 1, meta.write_slots] = v

    @abstractmethod
    def forward(
        self,
        q: torch.Tensor,  # [T, Hq, D]
        k: torch.Tensor,  # [T, Hkv, D]
        v: torch.Tensor | None,  # [T, Hkv, D]; None: values are k[..., :value_dim] (one-plane MLA)
        kv: torch.Tensor,  # [N, L, P, PT, Hkv, D]
        layer: int,
        meta: AttentionMetadata,
        scale: float,
        sliding_window: int | None,
        sinks: torch.Tensor | None = None,  # [Hq] fp32: a learned logit per head in every softmax
        value_dim: int | None = None,  # Dv when v is None
    ) -> torch.Tensor:  # [T, Hq, Dv]
        ...


def kv_planes(kv: torch.Tensor, pages: torch.Tensor, layer: int, value_dim: int | None):
    """Gathered (keys, values) [*pages.shape, PT, Hkv, D|Dv] of `pages` (values: a view for MLA).

    One `index_select` per plane on the layer's [N, PT, Hkv, D] view: 1.4-3.4x faster on CPU than
    `kv[pages, layer, plane]` (advanced indexing) for 1-8 decode rows, and a contiguous result."""
    at = kv.select(1, layer)  # [N, P, PT, Hkv, D]
    rows, shape = pages.reshape(-1), (*pages.shape, *at.shape[2:])
    keys = at.select(1, 0).index_select(0, rows).view(shape)
    if kv.shape[2] == 1:  # one latent plane: the values are its first value_dim columns
        assert value_dim is not None, "a one-plane (MLA) KV view needs value_dim"
        return keys, keys[..., :value_dim]
    return keys, at.select(1, 1).index_select(0, rows).view(shape)
