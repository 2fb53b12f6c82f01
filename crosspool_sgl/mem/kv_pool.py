"""The cross-model, virtualised KV-cache pool.

One physical arena of bytes is shared by every hosted model. Each model sees a
*virtual view* of the whole arena in its own geometry::

    view[m]: [N_m, L_m, P_m, PT, Hkv_m, D_m]   (N_m = arena_bytes // page_bytes_m)

so model m's page p occupies bytes [p * page_bytes_m, (p + 1) * page_bytes_m).
Physical ownership is tracked per *chunk* (``chunk_bytes``, 2 MiB by default:
the CUDA virtual-memory mapping granularity). A model may use page p only when
every chunk that page touches is owned by that model; chunks are claimed when a
model needs pages and released as soon as no page of the model touches them.
No model ever holds a worst-case reservation: memory follows demand.

Because each view is a plain strided tensor over the same storage, a model's
page ids are ordinary integers, usable directly as FlashInfer/Triton page
tables, and ``view[pages, layer]`` gathers its KV with one indexing op.

Legend: N = pages of a model's view, L = layers, P = planes (K and V, or one MLA latent),
PT = tokens per page, Hkv = KV heads (1 for MLA), D = head dim (latent width for MLA).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from crosspool_sgl.mem.arena_backing import ArenaBacking, create_backing

if TYPE_CHECKING:
    from crosspool_sgl.mem.kv_planner import KVPlanner

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class KVGeometry:
    """What one token of a model stores per layer in the KV cache; page bytes follow from it.

    A page holds, for each layer, ``num_planes`` planes of ``page_tokens`` x ``num_kv_heads`` x
    ``head_dim`` elements. MHA/GQA/MQA store two planes (K and V) of their KV heads; MLA
    (DeepSeek-V2/V3) stores one plane of one "head": the compressed latent plus the rope'd key
    part (kv_lora_rank + qk_rope_head_dim), which attention reads as both keys and values. So a
    DeepSeek page is a fraction of an MHA page of the same hidden size, and the pool, which accounts
    in bytes, holds proportionally more of its tokens.
    """

    num_layers: int
    num_kv_heads: int  # heads stored per plane: Hkv, or 1 for an MLA latent
    head_dim: int  # width of one stored head: D, or kv_lora_rank + qk_rope_head_dim
    dtype: torch.dtype
    num_planes: int = 2  # 2: separate K and V; 1: one latent serving as both (MLA)

    @classmethod
    def mha(cls, num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> KVGeometry:
        return cls(num_layers, num_kv_heads, head_dim, dtype, num_planes=2)

    @classmethod
    def mla(cls, num_layers: int, latent_dim: int, dtype: torch.dtype) -> KVGeometry:
        return cls(num_layers, 1, latent_dim, dtype, num_planes=1)

    def token_bytes(self) -> int:
        """Bytes one token takes across all layers."""
        elem = torch.empty((), dtype=self.dtype).element_size()
        return self.num_layers * self.num_planes * self.num_kv_heads * self.head_dim * elem

    def page_bytes(self, page_tokens: int) -> int:
        return page_tokens * self.token_bytes()

    def view_shape(self, num_pages: int, page_tokens: int) -> tuple[int, ...]:
        """[N, L, P, PT, Hkv, D]: the layout backends index (kv[pages, layer, plane])."""
        return (num_pages, self.num_layers, self.num_planes, page_tokens, self.num_kv_heads, self.head_dim)


@dataclass
class _ModelView:
    """Bookkeeping for one model's view of the arena (private to KVPool)."""

    name: str
    geometry: KVGeometry
    page_bytes: int
    kv: torch.Tensor  # [N, L, P, PT, Hkv, D]
    free_pages: set[int] = field(default_factory=set)
    used_pages: set[int] = field(default_factory=set)
    owned_chunks: set[int] = field(default_factory=set)
    chunk_use: dict[int, int] = field(default_factory=dict)  # chunk -> used pages touching it


@dataclass(frozen=True)
class KVPoolSnapshot:
    """A read-only picture of the pool for planners, metrics and tests."""

    total_bytes: int
    chunk_bytes: int
    num_chunks: int
    num_free_chunks: int
    used_pages: dict[str, int]
    used_bytes: dict[str, int]  # pages in use * page bytes, per model
    owned_bytes: dict[str, int]  # chunks owned * chunk bytes, per model

    @property
    def free_bytes(self) -> int:
        return self.num_free_chunks * self.chunk_bytes

    @property
    def total_used_pages(self) -> int:
        return sum(self.used_pages.values())


class KVPool:
    """One byte arena, many models' page views; alloc returns None when full."""

    def __init__(
        self,
        total_bytes: int,
        page_tokens: int = 16,
        chunk_bytes: int = 2 << 20,
        device: str | torch.device = "cpu",
        backing: ArenaBacking | None = None,
    ) -> None:
        if total_bytes < chunk_bytes:
            raise ValueError(f"KV pool of {total_bytes} bytes is smaller than one chunk ({chunk_bytes})")
        self.page_tokens = page_tokens
        self.chunk_bytes = chunk_bytes
        self.num_chunks = total_bytes // chunk_bytes
        self.total_bytes = self.num_chunks * chunk_bytes
        self.device = torch.device(device)
        # Physical memory follows ownership: owned chunks are mapped, released ones unmapped
        # (CUDA virtual memory on GPU; a plain tensor with the same accounting on CPU).
        self.backing = backing or create_backing(self.total_bytes, chunk_bytes, self.device)
        self.arena = self.backing.tensor
        self.free_chunks: set[int] = set(range(self.num_chunks))
        self.views: dict[str, _ModelView] = {}
        self.planner: KVPlanner | None = None  # floors/ceilings; None = first come, first served
        self.num_grants: dict[str, int] = {}  # chunks granted per model, for /metrics

    # ---- models -------------------------------------------------------------------------
    def add_model(self, model: str, geometry: KVGeometry) -> torch.Tensor:
        """Create a model's virtual view; returns it as [N, L, P, PT, Hkv, D] (see `KVGeometry`)."""
        if model in self.views:
            raise ValueError(f"model {model!r} already has a KV view")
        page_bytes = geometry.page_bytes(self.page_tokens)
        if page_bytes > self.chunk_bytes:
            raise ValueError(
                f"model {model!r}: one KV page ({page_bytes} bytes) exceeds the chunk size "
                f"({self.chunk_bytes}); lower page_tokens or raise chunk_bytes"
            )
        num_pages = self.total_bytes // page_bytes
        shape = geometry.view_shape(num_pages, self.page_tokens)
        kv = self.arena[: num_pages * page_bytes].view(geometry.dtype).view(shape)
        self.views[model] = _ModelView(name=model, geometry=geometry, page_bytes=page_bytes, kv=kv)
        return kv

    def kv_view(self, model: str) -> torch.Tensor:
        return self.views[model].kv

    def page_bytes(self, model: str) -> int:
        return self.views[model].page_bytes

    # ---- allocation ---------------------------------------------------------------------
    def can_alloc(self, model: str, num_pages: int) -> bool:
        """True if `alloc(model, num_pages)` would succeed right now."""
        # Conservative: a fresh chunk holds at least chunk//page - 1 whole pages whatever its alignment.
        return page_budget(self).try_take(model, num_pages)

    def alloc(self, model: str, num_pages: int, privileged: bool = False) -> list[int] | None:
        """Take `num_pages` pages for `model`, or None (nothing taken) when the arena is full
        (`privileged`: see `KVPlanner.may_claim`)."""
        view = self.views[model]
        claimed: list[int] = []
        while len(view.free_pages) < num_pages:
            chunk = self._claim_chunk(view, privileged)
            if chunk is None:
                for c in claimed:  # roll back: leave the pool exactly as it was
                    self._release_chunk(view, c)
                return None
            claimed.append(chunk)
        if claimed:
            self.num_grants[model] = self.num_grants.get(model, 0) + len(claimed)
            logger.info(
                "grant %d KV chunk(s) (%d KiB) to %s: it owns %d, %d free",
                len(claimed),
                len(claimed) * self.chunk_bytes >> 10,
                model,
                len(view.owned_chunks),
                len(self.free_chunks),
            )
        pages = sorted(view.free_pages)[:num_pages]
        for p in pages:
            view.free_pages.remove(p)
            view.used_pages.add(p)
            for c in self._chunks_of(view, p):
                view.chunk_use[c] = view.chunk_use.get(c, 0) + 1
        return pages

    def free(self, model: str, pages: list[int]) -> None:
        """Return pages; chunks no longer touched by a used page go back to the arena."""
        view = self.views[model]
        emptied: set[int] = set()
        for p in pages:
            if p not in view.used_pages:
                raise ValueError(f"model {model!r}: page {p} is not allocated (double free?)")
            view.used_pages.remove(p)
            view.free_pages.add(p)
            for c in self._chunks_of(view, p):
                view.chunk_use[c] -= 1
                if view.chunk_use[c] == 0:
                    emptied.add(c)
        for c in emptied:
            if view.chunk_use.get(c, 0) == 0:
                self._release_chunk(view, c)

    # ---- queries ------------------------------------------------------------------------
    def used_pages(self, model: str | None = None) -> int:
        if model is not None:
            return len(self.views[model].used_pages)
        return sum(len(v.used_pages) for v in self.views.values())

    def snapshot(self) -> KVPoolSnapshot:
        return KVPoolSnapshot(
            total_bytes=self.total_bytes,
            chunk_bytes=self.chunk_bytes,
            num_chunks=self.num_chunks,
            num_free_chunks=len(self.free_chunks),
            used_pages={m: len(v.used_pages) for m, v in self.views.items()},
            used_bytes={m: len(v.used_pages) * v.page_bytes for m, v in self.views.items()},
            owned_bytes={m: len(v.owned_chunks) * self.chunk_bytes for m, v in self.views.items()},
        )

    # ---- chunk bookkeeping --------------------------------------------------------------
    def _chunks_of(self, view: _ModelView, page: int) -> range:
        first = page * view.page_bytes // self.chunk_bytes
        last = ((page + 1) * view.page_bytes - 1) // self.chunk_bytes
        return range(first, last + 1)

    def _pages_touching(self, view: _ModelView, chunk: int) -> range:
        first = chunk * self.chunk_bytes // view.page_bytes
        last = min(((chunk + 1) * self.chunk_bytes - 1) // view.page_bytes, view.kv.shape[0] - 1)
        return range(first, last + 1)

    def owned_chunks(self) -> dict[str, int]:
        return {m: len(v.owned_chunks) for m, v in self.views.items()}

    def _claim_chunk(self, view: _ModelView, privileged: bool = False) -> int | None:
        """Own one more chunk, preferring a neighbour of an owned one (fewer straddling pages lost)."""
        if not self.free_chunks:
            return None
        if self.planner is not None:
            if not self.planner.may_claim(view.name, self.owned_chunks(), len(self.free_chunks), privileged):
                return None
        neighbours = [c for o in view.owned_chunks for c in (o - 1, o + 1) if c in self.free_chunks]
        chunk = min(neighbours) if neighbours else min(self.free_chunks)
        self.backing.map(chunk)
        self.free_chunks.remove(chunk)
        view.owned_chunks.add(chunk)
        for p in self._pages_touching(view, chunk):
            if p not in view.used_pages and all(c in view.owned_chunks for c in self._chunks_of(view, p)):
                view.free_pages.add(p)
        return chunk

    def _release_chunk(self, view: _ModelView, chunk: int) -> None:
        for p in self._pages_touching(view, chunk):
            view.free_pages.discard(p)
        view.owned_chunks.discard(chunk)
        view.chunk_use.pop(chunk, None)
        self.free_chunks.add(chunk)
        self.backing.unmap(chunk)


@dataclass
class PageBudget:
    """A throw-away copy of the pool's free capacity that a planner can spend without mutating the pool."""

    spare_pages: dict[str, int]
    pages_per_chunk: dict[str, int]  # lower bound of whole pages a fresh chunk yields
    free_chunks: int
    owned: dict[str, int] = field(default_factory=dict)  # chunks per model
    planner: KVPlanner | None = None

    def copy(self) -> PageBudget:
        return PageBudget(
            dict(self.spare_pages), self.pages_per_chunk, self.free_chunks, dict(self.owned), self.planner
        )

    def try_take(self, model: str, num_pages: int, privileged: bool = False) -> bool:
        """Spend `num_pages` of `model`'s capacity if the planner allows it (`privileged`: an overdue
        request, which may take other models' working sets but not their static floors)."""
        spare = self.spare_pages[model]
        if spare >= num_pages:
            self.spare_pages[model] = spare - num_pages
            return True
        per_chunk = self.pages_per_chunk[model]
        if per_chunk == 0:
            return False
        chunks = -(-(num_pages - spare) // per_chunk)
        if chunks > self.free_chunks:
            return False
        if self.planner is not None:
            owned = dict(self.owned)
            for i in range(chunks):
                if not self.planner.may_claim(model, owned, self.free_chunks - i, privileged):
                    return False
                owned[model] = owned.get(model, 0) + 1
            self.owned = owned
        self.free_chunks -= chunks
        self.spare_pages[model] = spare + chunks * per_chunk - num_pages
        return True

    def give_back(self, model: str, num_pages: int) -> None:
        self.spare_pages[model] += num_pages


def page_budget(pool: KVPool) -> PageBudget:
    return PageBudget(
        spare_pages={m: len(v.free_pages) for m, v in pool.views.items()},
        pages_per_chunk={m: max(pool.chunk_bytes // v.page_bytes - 1, 0) for m, v in pool.views.items()},
        free_chunks=len(pool.free_chunks),
        owned=pool.owned_chunks(),
        planner=pool.planner,
    )
