"""Per-model prefix (radix) cache over the shared KV pool, at page granularity.

A node is one *full* page of KV: its key is (model, parent node, the page's
tokens), so a path from the root spells a token prefix, exactly like a radix
tree whose edges are page-sized. Pages stay allocated in the KV pool while
cached; a node with no running request on it (refs == 0) and no children is
evictable, least recently used first. Evicting returns pages to the pool,
which returns whole chunks to the arena for any model to use.

It decides nothing about *when* to evict: the scheduler asks it to, in the
order the KV planner prescribes (idle models first).

Cost: nothing here scans the cache. Per model it keeps counts of cached and
evictable (refs == 0) nodes, updated on each refs 0 <-> 1 transition, and the
evictable leaves in a min-heap keyed by (last use, creation order) with lazy
invalidation, so `evictable_pages` / `cached_pages` are O(1) and
`evict(model, k)` is O(k log n).
"""

from __future__ import annotations

import heapq
import itertools
import time
from dataclasses import dataclass, field

from crosspool_sgl.mem.kv_pool import KVPool


@dataclass(eq=False)
class PrefixNode:
    model: str
    page: int
    key: tuple
    parent: PrefixNode | None
    refs: int = 0
    num_children: int = 0
    last_used: float = field(default_factory=time.monotonic)
    node_id: int = 0


@dataclass
class _ModelCache:
    """One model's counts and evictable leaves (private to PrefixCache)."""

    cached: int = 0
    evictable: int = 0  # nodes with refs == 0 (all of them can be evicted, leaves first)
    leaves: set[PrefixNode] = field(default_factory=set)  # refs == 0 and no children
    # (last_used, node_id, push seq, node): a superset of `leaves` (lazy invalidation)
    heap: list[tuple[float, int, int, PrefixNode]] = field(default_factory=list)


class PrefixCache:
    def __init__(self, pool: KVPool, enabled: bool = True) -> None:
        self.pool = pool
        self.page_tokens = pool.page_tokens
        self.enabled = enabled
        self.nodes: dict[tuple, PrefixNode] = {}
        self._ids = itertools.count(1)
        self._seq = itertools.count()  # heap tie-break: entries never compare nodes
        self._models: dict[str, _ModelCache] = {}
        self._evictable = 0  # over all models

    # ---- lookups -----------------------------------------------------------------------------
    def match(self, model: str, tokens: list[int]) -> list[PrefixNode]:
        """Longest cached page-aligned prefix of `tokens`, leaving at least one token to compute.

        The returned nodes are referenced (not evictable) until `release`.
        """
        if not self.enabled:
            return []
        pt = self.page_tokens
        matched: list[PrefixNode] = []
        parent_id = 0
        now = time.monotonic()
        for i in range((len(tokens) - 1) // pt):
            node = self.nodes.get((model, parent_id, tuple(tokens[i * pt : (i + 1) * pt])))
            if node is None:
                break
            if node.refs == 0:
                self._set_evictable(node, False)
            node.refs += 1
            node.last_used = now
            matched.append(node)
            parent_id = node.node_id
        return matched

    # ---- a request gives its pages back ------------------------------------------------------
    def release(
        self, model: str, tokens: list[int], pages: list[int], num_cached: int, nodes: list[PrefixNode]
    ) -> None:
        """Keep the request's full, computed pages as cache nodes; free the rest.

        `nodes` are the request's matched nodes (its first pages); `num_cached`
        tokens of `tokens` have K/V in `pages`.
        """
        now = time.monotonic()
        for node in nodes:
            node.refs -= 1
            node.last_used = now
            if node.refs == 0:
                self._set_evictable(node, True)
        to_free: list[int] = []
        parent = nodes[-1] if nodes else None
        full_pages = num_cached // self.page_tokens if self.enabled else 0
        for i in range(len(nodes), len(pages)):
            if i >= full_pages:
                to_free.append(pages[i])
                continue
            page_ids = tuple(tokens[i * self.page_tokens : (i + 1) * self.page_tokens])
            key = (model, parent.node_id if parent else 0, page_ids)
            existing = self.nodes.get(key)
            if existing is not None:  # another request cached the same prefix meanwhile
                to_free.append(pages[i])
                existing.last_used = now
                self._requeue(existing)
                parent = existing
                continue
            node = PrefixNode(model, pages[i], key, parent, last_used=now, node_id=next(self._ids))
            if parent is not None:
                parent.num_children += 1
                self._models[model].leaves.discard(parent)  # its heap entries go stale
            self.nodes[key] = node
            self._cache(model).cached += 1
            self._set_evictable(node, True)
            parent = node
        if to_free:
            self.pool.free(model, to_free)

    # ---- eviction ------------------------------------------------------------------------------
    def evictable_pages(self, model: str | None = None) -> int:
        """Cached pages no running request references (O(1))."""
        if model is None:
            return self._evictable
        mc = self._models.get(model)
        return mc.evictable if mc else 0

    def cached_pages(self, model: str | None = None) -> int:
        if model is None:
            return len(self.nodes)
        mc = self._models.get(model)
        return mc.cached if mc else 0

    def evict(self, model: str, num_pages: int) -> int:
        """Free up to `num_pages` unreferenced pages of `model`, leaves first, LRU; returns pages freed.

        In rounds: the least recently used of the current leaves go first (ties: the older
        node); a parent they leave childless is a candidate from the next round on.
        """
        mc = self._models.get(model)
        freed: list[int] = []
        while mc is not None and len(freed) < num_pages:
            exposed: list[PrefixNode] = []  # parents left childless: leaves of the next round
            while mc.heap and len(freed) < num_pages:
                last_used, _, _, node = heapq.heappop(mc.heap)
                if node not in mc.leaves or node.last_used != last_used or node.num_children:
                    continue  # stale entry
                mc.leaves.remove(node)
                del self.nodes[node.key]
                mc.cached -= 1
                mc.evictable -= 1
                self._evictable -= 1
                parent = node.parent
                if parent is not None:
                    parent.num_children -= 1
                    if parent.refs == 0 and parent.num_children == 0:
                        exposed.append(parent)
                freed.append(node.page)
            if not exposed:
                break
            for parent in exposed:
                self._push_leaf(mc, parent)
        if freed:
            self.pool.free(model, freed)
        return len(freed)

    def flush(self) -> int:
        """Evict every unreferenced page of every model (`/flush_cache`)."""
        return sum(self.evict(m, mc.evictable) for m, mc in self._models.items() if mc.evictable)

    # ---- bookkeeping ---------------------------------------------------------------------------
    def _cache(self, model: str) -> _ModelCache:
        mc = self._models.get(model)
        if mc is None:
            mc = self._models[model] = _ModelCache()
        return mc

    def _set_evictable(self, node: PrefixNode, evictable: bool) -> None:
        """A node's refs went 0 -> 1 (False) or 1 -> 0 / it was created unreferenced (True)."""
        mc = self._cache(node.model)
        delta = 1 if evictable else -1
        mc.evictable += delta
        self._evictable += delta
        if not evictable:
            mc.leaves.discard(node)
        elif node.num_children == 0:
            self._push_leaf(mc, node)

    def _requeue(self, node: PrefixNode) -> None:
        """Its last use changed: an evictable leaf gets a fresh heap entry (the old one is stale)."""
        mc = self._models[node.model]
        if node in mc.leaves:
            self._push_leaf(mc, node)

    def _push_leaf(self, mc: _ModelCache, node: PrefixNode) -> None:
        mc.leaves.add(node)
        heapq.heappush(mc.heap, (node.last_used, node.node_id, next(self._seq), node))
        if len(mc.heap) > 2 * len(mc.leaves) + 64:  # stale entries dominate: rebuild
            mc.heap[:] = [(n.last_used, n.node_id, next(self._seq), n) for n in mc.leaves]
            heapq.heapify(mc.heap)
