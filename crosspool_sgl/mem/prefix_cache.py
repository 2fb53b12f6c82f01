"""Per-model prefix (radix) cache over the shared KV pool, at page granularity.

A node is one *full* page of KV: its key is (model, parent node, the page's
tokens), so a path from the root spells a token prefix, exactly like a radix
tree whose edges are page-sized. Pages stay allocated in the KV pool while
cached; a node with no running request on it (refs == 0) and no children is
evictable, least recently used first. Evicting returns pages to the pool,
which returns whole chunks to the arena for any model to use.

It decides nothing about *when* to evict: the scheduler asks it to, in the
order the KV planner prescribes (idle models first).
"""

from __future__ import annotations

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


class PrefixCache:
    def __init__(self, pool: KVPool, enabled: bool = True) -> None:
        self.pool = pool
        self.page_tokens = pool.page_tokens
        self.enabled = enabled
        self.nodes: dict[tuple, PrefixNode] = {}
        self._ids = itertools.count(1)

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
                parent = existing
                continue
            node = PrefixNode(model, pages[i], key, parent, last_used=now, node_id=next(self._ids))
            if parent is not None:
                parent.num_children += 1
            self.nodes[key] = node
            parent = node
        if to_free:
            self.pool.free(model, to_free)

    # ---- eviction ------------------------------------------------------------------------------
    def evictable_pages(self, model: str | None = None) -> int:
        return sum(1 for n in self.nodes.values() if n.refs == 0 and (model is None or n.model == model))

    def cached_pages(self, model: str | None = None) -> int:
        return sum(1 for n in self.nodes.values() if model is None or n.model == model)

    def evict(self, model: str, num_pages: int) -> int:
        """Free up to `num_pages` unreferenced pages of `model`, leaves first, LRU; returns pages freed."""
        freed: list[int] = []
        while len(freed) < num_pages:
            leaves = [
                n for n in self.nodes.values() if n.model == model and n.refs == 0 and n.num_children == 0
            ]
            if not leaves:
                break
            leaves.sort(key=lambda n: n.last_used)
            for node in leaves[: num_pages - len(freed)]:
                del self.nodes[node.key]
                if node.parent is not None:
                    node.parent.num_children -= 1
                freed.append(node.page)
        if freed:
            self.pool.free(model, freed)
        return len(freed)

    def flush(self) -> int:
        """Evict every unreferenced page of every model (`/flush_cache`)."""
        models = {n.model for n in self.nodes.values()}
        return sum(self.evict(m, len(self.nodes)) for m in models)
