"""KV planner: floors, ceilings, static partitions, SLO ordering — pure, no model."""

from __future__ import annotations

import pytest

from crosspool_sgl.mem.kv_planner import KVPlanner, ModelKVPolicy

CHUNK = 1 << 16


def planner(static: bool = False, **policies: ModelKVPolicy) -> KVPlanner:
    return KVPlanner(CHUNK, 10, policies or {"a": ModelKVPolicy(), "b": ModelKVPolicy()}, static)


def test_shared_pool_lets_one_model_take_everything():
    p = planner()
    assert p.may_claim("a", {"a": 9, "b": 0}, free_chunks=1)
    assert not p.may_claim("a", {"a": 10, "b": 0}, free_chunks=0)


def test_floor_of_another_model_is_protected():
    p = planner(a=ModelKVPolicy(), b=ModelKVPolicy(floor_bytes=3 * CHUNK))
    assert p.may_claim("a", {"a": 6, "b": 0}, free_chunks=4)
    assert not p.may_claim("a", {"a": 7, "b": 0}, free_chunks=3)  # b's 3 chunks are owed
    assert p.may_claim("b", {"a": 7, "b": 0}, free_chunks=3)  # b may take its own floor
    assert p.may_claim("a", {"a": 7, "b": 3}, free_chunks=0) is False


def test_ceiling_caps_a_model():
    p = planner(a=ModelKVPolicy(ceiling_bytes=4 * CHUNK), b=ModelKVPolicy())
    assert p.may_claim("a", {"a": 3}, free_chunks=7)
    assert not p.may_claim("a", {"a": 4}, free_chunks=6)
    assert p.max_pages("a", CHUNK // 8) == 4 * 8 - 1


def test_static_partition_is_an_equal_reservation():
    p = planner(static=True, a=ModelKVPolicy(), b=ModelKVPolicy(), c=ModelKVPolicy())
    assert p.floor == p.ceiling == {"a": 3, "b": 3, "c": 3}
    assert not p.may_claim("a", {"a": 3}, free_chunks=7)


def test_floors_larger_than_the_pool_are_rejected():
    with pytest.raises(ValueError, match="floors"):
        planner(a=ModelKVPolicy(floor_bytes=6 * CHUNK), b=ModelKVPolicy(floor_bytes=6 * CHUNK))
    with pytest.raises(ValueError, match="ceiling"):
        planner(a=ModelKVPolicy(floor_bytes=4 * CHUNK, ceiling_bytes=2 * CHUNK))


def test_slo_orders_admission_and_victims():
    p = planner(fast=ModelKVPolicy(ttft_ms=100, tbt_ms=50), slow=ModelKVPolicy(ttft_ms=5000))
    # a later request of the tight-SLO model is admitted before an earlier one of the loose model
    assert p.admission_deadline("fast", 1.0) < p.admission_deadline("slow", 0.5)
    # the model without a TBT target is preempted first, then the youngest
    assert p.victim_key("slow", 0.0) > p.victim_key("fast", 9.0)
    assert p.victim_key("slow", 2.0) > p.victim_key("slow", 1.0)
    # among equal targets, the request with the least computed KV goes first (cheapest to redo)
    assert p.victim_key("slow", 1.0, computed_tokens=10) > p.victim_key("slow", 2.0, computed_tokens=9000)
