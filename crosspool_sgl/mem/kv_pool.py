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

import heapq
import logging
from collections.abc import Iterator, Mapping
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
    """Bookkeeping for one model's view of the arena (private to KVPool).

    Every structure here is touched only by the pages and chunks an operation moves, never
    scanned whole: the free pages sit in a min-heap with lazy deletion (`free_pages` is the
    truth, `free_heap` may hold stale ids), and the free chunks next to an owned chunk (the
    preferred next claim) in a set with its own lazy min-heap.
    """

    name: str
    geometry: KVGeometry
    page_bytes: int
    kv: torch.Tensor  # [N, L, P, PT, Hkv, D]
    free_pages: set[int] = field(default_factory=set)
    used_pages: set[int] = field(default_factory=set)
    owned_chunks: set[int] = field(default_factory=set)
    chunk_use: dict[int, int] = field(default_factory=dict)  # chunk -> used pages touching it
    free_heap: list[int] = field(default_factory=list)  # superset of free_pages (lazy deletion)
    neighbours: set[int] = field(default_factory=set)  # free chunks adjacent to an owned chunk
    neighbour_heap: list[int] = field(default_factory=list)  # superset of neighbours (lazy)


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
        self._free_chunk_heap: list[int] = list(range(self.num_chunks))  # superset (lazy deletion)
        self._owner: list[_ModelView | None] = [None] * self.num_chunks  # chunk -> owning view
        self.views: dict[str, _ModelView] = {}
        self._owned_counts = _OwnedCounts(self.views)  # live chunks-per-model, no copy per claim
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
        """Take `num_pages` pages for `model` (its lowest free ids), or None (nothing taken) when
        the arena is full (`privileged`: see `KVPlanner.may_claim`). Cost: O(num_pages log F) plus
        O(chunk pages) per chunk claimed."""
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
        pages = _pop_lowest(view.free_heap, view.free_pages, num_pages)
        use = view.chunk_use
        for p in pages:
            view.used_pages.add(p)
            for c in self._chunks_of(view, p):
                use[c] = use.get(c, 0) + 1
        return pages

    def free(self, model: str, pages: list[int]) -> None:
        """Return pages; chunks no longer touched by a used page go back to the arena."""
        view = self.views[model]
        emptied: list[int] = []
        for p in pages:
            if p not in view.used_pages:
                raise ValueError(f"model {model!r}: page {p} is not allocated (double free?)")
            view.used_pages.remove(p)
            _push_free(view, p)
            for c in self._chunks_of(view, p):
                view.chunk_use[c] -= 1
                if view.chunk_use[c] == 0:
                    emptied.append(c)
        for c in emptied:
            if view.chunk_use.get(c, 0) == 0 and self._owner[c] is view:
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
        """Chunks owned per model (a fresh dict; O(models))."""
        return {m: len(v.owned_chunks) for m, v in self.views.items()}

    def _claim_chunk(self, view: _ModelView, privileged: bool = False) -> int | None:
        """Own one more chunk: the lowest free neighbour of an owned one (fewer straddling pages
        lost), else the lowest free chunk. O(log chunks) plus the pages of the chunk."""
        if not self.free_chunks:
            return None
        if self.planner is not None:
            if not self.planner.may_claim(view.name, self._owned_counts, len(self.free_chunks), privileged):
                return None
        chunk = _peek_lowest(view.neighbour_heap, view.neighbours)
        if chunk is None:
            chunk = _peek_lowest(self._free_chunk_heap, self.free_chunks)
        self.backing.map(chunk)
        self.free_chunks.remove(chunk)
        self._owner[chunk] = view
        view.owned_chunks.add(chunk)
        for side in self._adjacent(chunk):  # `chunk` is no longer a free neighbour of anyone
            owner = self._owner[side]
            if owner is not None:
                owner.neighbours.discard(chunk)
            elif side not in view.neighbours:
                _add_lazy(view.neighbour_heap, view.neighbours, side)
        for p in self._pages_touching(view, chunk):
            if p not in view.used_pages and all(self._owner[c] is view for c in self._chunks_of(view, p)):
                _push_free(view, p)
        return chunk

    def _release_chunk(self, view: _ModelView, chunk: int) -> None:
        for p in self._pages_touching(view, chunk):
            view.free_pages.discard(p)  # its heap entry goes stale
        view.owned_chunks.discard(chunk)
        view.chunk_use.pop(chunk, None)
        self._owner[chunk] = None
        _add_lazy(self._free_chunk_heap, self.free_chunks, chunk)
        self.backing.unmap(chunk)
        for side in self._adjacent(chunk):
            owner = self._owner[side]
            if owner is not None:  # the freed chunk is now a free neighbour of the side's owner
                if chunk not in owner.neighbours:
                    _add_lazy(owner.neighbour_heap, owner.neighbours, chunk)
            elif side in view.neighbours and not any(self._owner[c] is view for c in self._adjacent(side)):
                view.neighbours.discard(side)  # no longer next to any chunk of this model

    def _adjacent(self, chunk: int) -> tuple[int, ...]:
        if chunk == 0:
            return (1,) if self.num_chunks > 1 else ()
        return (chunk - 1, chunk + 1) if chunk + 1 < self.num_chunks else (chunk - 1,)


class _OwnedCounts(Mapping[str, int]):
    """Chunks owned per model, read live from the views (what the planner asks per claim)."""

    def __init__(self, views: dict[str, _ModelView]) -> None:
        self._views = views

    def __getitem__(self, model: str) -> int:
        return len(self._views[model].owned_chunks)

    def __iter__(self) -> Iterator[str]:
        return iter(self._views)

    def __len__(self) -> int:
        return len(self._views)


# ---- lazy-deletion min-heaps: `members` is the truth, `heap` a superset of it ---------------
def _add_lazy(heap: list[int], members: set[int], item: int) -> None:
    members.add(item)
    heapq.heappush(heap, item)
    if len(heap) > 2 * len(members) + 64:  # stale entries dominate: rebuild (amortised O(log n))
        heap[:] = sorted(members)


def _push_free(view: _ModelView, page: int) -> None:
    _add_lazy(view.free_heap, view.free_pages, page)


def _peek_lowest(heap: list[int], members: set[int]) -> int | None:
    """The lowest member, dropping stale heap entries on the way; None when there are none."""
    while heap and heap[0] not in members:
        heapq.heappop(heap)
    return heap[0] if heap else None


def _pop_lowest(heap: list[int], members: set[int], k: int) -> list[int]:
    """Remove and return the `k` lowest members (the caller made sure there are that many)."""
    out: list[int] = []
    while len(out) < k:
        item = heapq.heappop(heap)
        if item in members:
            members.remove(item)
            out.append(item)
    return out


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
