"""layers/plan_cache.py: a plan is built once per key, later lookups return it, and the cache keeps
at most `max_entries` plans, dropping the least recently used."""

from __future__ import annotations

from crosspool_sgl.layers.plan_cache import PlanCache, plan


def test_plans_are_built_once_and_bounded() -> None:
    built: list[str] = []

    def build(key: str):
        return lambda: built.append(key) or f"plan {key}"

    cache = PlanCache(max_entries=2)
    assert cache.get("a", build("a")) == "plan a"
    assert cache.get("a", build("a")) == "plan a" and built == ["a"]
    cache.get("b", build("b"))
    cache.get("a", build("a"))  # a is now the most recent
    cache.get("c", build("c"))  # drops b
    assert len(cache) == 2 and built == ["a", "b", "c"]
    cache.get("a", build("a"))
    cache.get("b", build("b"))
    assert built == ["a", "b", "c", "b"]
    assert plan(None, "a", build("a")) == "plan a" and built[-1] == "a"  # no cache: always built
