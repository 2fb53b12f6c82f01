"""The one interface every attention backend implements, and the metadata it reads.

Backends see tensors and page tables only, never pool objects: the KV of one
model is its view ``kv`` [N, L, 2, PT, Hkv, D] of the shared arena.

Legend: T = new tokens in the batch, B = sequences, N = pages, L = layers,
PT = tokens per page, Hq/Hkv = query/KV heads, D = head dim.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch


@dataclass
class AttentionMetadata:
    """Where each sequence's KV lives and which of its tokens are new this step."""

    page_table: torch.Tensor  # [B, max_pages] int32, page ids in order (padding: 0)
    seq_lens: torch.Tensor  # [B] int32, tokens in the cache after this step
    extend_lens: torch.Tensor  # [B] int32, new tokens of each sequence this step
    write_pages: torch.Tensor  # [T] int64, page receiving each new token's K/V
    write_slots: torch.Tensor  # [T] int64, slot within that page
    seq_lens_cpu: list[int]
    extend_lens_cpu: list[int]
    page_tokens: int

    @property
    def is_decode(self) -> bool:
        return all(n == 1 for n in self.extend_lens_cpu)

    @classmethod
    def build(
        cls, pages: list[list[int]], seq_lens: list[int], extend_lens: list[int], page_tokens: int, device
    ) -> AttentionMetadata:
        max_pages = max(len(p) for p in pages)
        table = torch.zeros(len(pages), max_pages, dtype=torch.int32)
        write_pages: list[int] = []
        write_slots: list[int] = []
        for i, (p, total, new) in enumerate(zip(pages, seq_lens, extend_lens, strict=True)):
            table[i, : len(p)] = torch.tensor(p, dtype=torch.int32)
            for pos in range(total - new, total):
                write_pages.append(p[pos // page_tokens])
                write_slots.append(pos % page_tokens)
        return cls(
            page_table=table.to(device),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
            extend_lens=torch.tensor(extend_lens, dtype=torch.int32, device=device),
            write_pages=torch.tensor(write_pages, dtype=torch.int64, device=device),
            write_slots=torch.tensor(write_slots, dtype=torch.int64, device=device),
            seq_lens_cpu=list(seq_lens),
            extend_lens_cpu=list(extend_lens),
            page_tokens=page_tokens,
        )


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
        kv: torch.Tensor, layer: int, meta: AttentionMetadata, k: torch.Tensor, v: torch.Tensor
    ) -> None:
        kv[meta.write_pages, layer, 0, meta.write_slots] = k
        kv[meta.write_pages, layer, 1, meta.write_slots] = v

    @abstractmethod
    def forward(
        self,
        q: torch.Tensor,  # [T, Hq, D]
        k: torch.Tensor,  # [T, Hkv, D]
        v: torch.Tensor,  # [T, Hkv, D]
        kv: torch.Tensor,  # [N, L, 2, PT, Hkv, D]
        layer: int,
        meta: AttentionMetadata,
        scale: float,
        sliding_window: int | None,
    ) -> torch.Tensor:  # [T, Hq, D]
        ...
