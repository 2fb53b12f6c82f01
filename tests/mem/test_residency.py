"""Cold-model weight residency: the pure policy, the arena allocator, and evict/reload through the Engine."""

from __future__ import annotations

import logging

import pytest
import torch

from crosspool_sgl import Engine
from crosspool_sgl.mem.residency import (
    Location,
    ModelResidency,
    ModelTooLargeError,
    ResidencyPolicy,
    check_fits,
)
from crosspool_sgl.mem.weight_pool import WeightPool, WeightPoolFullError
from crosspool_sgl.mem.weight_store import WeightStore

R, H, L = Location.RESIDENT, Location.HOST, Location.LOADING
GREEDY = {"temperature": 0, "max_new_tokens": 12, "ignore_eos": True}
PROMPTS = ["the cat sat on the mat", "one two three four"]


def _m(name: str, num_bytes: int, loc: Location, last_used: float, keep: float | None = None):
    return ModelResidency(name, num_bytes, loc, last_used, keep)


# ---- policy (no tensors) ----------------------------------------------------------------------
def test_keep_alive_evicts_only_idle_models_past_their_keep_alive():
    models = {
        "a": _m("a", 10, R, last_used=0.0, keep=5.0),  # idle 10 s > 5 s
        "b": _m("b", 10, R, last_used=8.0, keep=5.0),  # idle 2 s
        "c": _m("c", 10, R, last_used=0.0, keep=5.0),  # expired but busy
        "d": _m("d", 10, R, last_used=0.0, keep=None),  # never expires
    }
    plan = ResidencyPolicy(None).plan(models, active=["c"], now=10.0)
    assert plan.evict == ["a"] and plan.page_in == []
    assert "keep-alive" in plan.reasons["a"]


def test_lru_evicts_least_recently_used_idle_models_until_the_new_one_fits():
    models = {
        "old": _m("old", 40, R, last_used=1.0),
        "mid": _m("mid", 40, R, last_used=2.0),
        "new": _m("new", 20, R, last_used=3.0),
        "cold": _m("cold", 50, H, last_used=0.0),
    }
    plan = ResidencyPolicy(100).plan(models, active=["cold"], now=4.0)
    assert plan.evict == ["old", "mid"]  # 100 - 40 = 60 is not enough room for 50; 100 - 80 is
    assert plan.page_in == ["cold"]


def test_busy_models_are_never_evicted_and_later_requests_wait_behind_the_first():
    models = {
        "busy": _m("busy", 80, R, last_used=0.0),
        "big": _m("big", 50, H, last_used=0.0),
        "small": _m("small", 10, H, last_used=0.0),
    }
    plan = ResidencyPolicy(100).plan(models, active=["busy", "big", "small"], now=1.0)
    assert plan.empty  # big can't fit while busy runs; small (which would fit) does not overtake it


def test_a_loading_model_keeps_its_room_and_keeps_loading():
    models = {"a": _m("a", 60, L, last_used=0.0), "b": _m("b", 60, H, last_used=0.0)}
    plan = ResidencyPolicy(100).plan(models, active=["a", "b"], now=1.0)
    assert plan.page_in == ["a"] and plan.evict == []


def test_a_model_over_the_budget_is_an_error():
    check_fits("ok", 100, 100)
    check_fits("unbounded", 10**12, None)
    with pytest.raises(ModelTooLargeError, match="'huge'.*--max-resident-bytes"):
        check_fits("huge", 101, 100)


# ---- pool + store (tensors, no model) ----------------------------------------------------------
def _experts(pool: WeightPool, model: str, num: int, inter: int, hidden: int, seed: int) -> dict[int, tuple]:
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for e in range(num):
        w = (torch.randn(inter, hidden, generator=gen), torch.randn(inter, hidden, generator=gen))
        w = (*w, torch.randn(hidden, inter, generator=gen))
        out[pool.add_expert(model, e // 2, e % 2, *w)] = w
    return out


def _assert_weights(pool: WeightPool, weights: dict[int, tuple]) -> None:
    for slot, (gate, up, down) in weights.items():
        assert torch.equal(pool.w13(slot), torch.cat([gate, up]))
        assert torch.equal(pool.w2(slot), down)


def test_evicted_blocks_are_reused_and_page_in_restores_the_same_slots():
    elems = lambda n, i, h: n * 3 * i * h  # noqa: E731
    pool = WeightPool(torch.float32, max_bytes=4 * (elems(4, 6, 8) + elems(4, 10, 8)))
    a = _experts(pool, "a", 4, 6, 8, seed=0)
    b = _experts(pool, "b", 4, 10, 8, seed=1)
    store = WeightStore(pool)
    assert store.evict("a") == pool.model_bytes["a"]
    assert pool.model_resident_bytes["a"] == 0 and store.host_bytes("a") == pool.model_bytes["a"]
    c = _experts(pool, "c", 4, 6, 8, seed=2)  # takes a's freed blocks: no growth past the bound
    with pytest.raises(WeightPoolFullError):
        store.begin_page_in("a")
    assert pool.model_resident_bytes["a"] == 0  # rolled back
    store.evict("b")
    store.begin_page_in("a")
    while not store.advance("a", max_bytes=200):  # a few experts per call, layer order
        pass
    _assert_weights(pool, a)
    _assert_weights(pool, c)
    assert store.host_bytes() == pool.model_bytes["b"] and "a" not in store.host
    store.evict("c")  # leaves a hole in the middle; b (bigger experts) needs compaction
    store.begin_page_in("b")
    store.wait("b")
    _assert_weights(pool, a)
    _assert_weights(pool, b)
    assert pool.used_bytes == pool.model_bytes["a"] + pool.model_bytes["b"] <= pool.capacity_bytes


# ---- through the Engine -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def two_models(tiny_models) -> dict[str, str]:
    return {"moe": str(tiny_models["qwen3_moe"]), "mix": str(tiny_models["mixtral"])}


@pytest.fixture(scope="module")
def reference(two_models) -> dict[str, list[list[int]]]:
    eng = Engine(models=two_models, show_progress=False)
    out = {
        m: [o["output_ids"] for o in eng.generate(prompt=PROMPTS, model=m, sampling_params=GREEDY)]
        for m in two_models
    }
    eng.shutdown()
    return out


def test_budget_for_one_model_at_a_time_alternates_with_identical_tokens(two_models, reference, caplog):
    eng = Engine(models=two_models, show_progress=False, max_resident_bytes=700_000)
    wp = eng.runtime.weight_pool
    assert wp.model_bytes["moe"] + wp.model_bytes["mix"] > 700_000  # both can't be resident at once
    assert eng.runtime.residency.ready_models() == {"mix"}  # moe was evicted to load mix
    with caplog.at_level(logging.INFO, logger="crosspool_sgl.mem.residency_manager"):
        for _ in range(2):
            for m in ("moe", "mix"):
                got = eng.generate(prompt=PROMPTS, model=m, sampling_params=GREEDY)
                assert [o["output_ids"] for o in got] == reference[m]
    snap = eng.get_server_info()["weight_pool"]
    # moe was evicted once at load time (to fit mix), then once per switch
    assert snap["reloads"] == {"moe": 2, "mix": 2} and snap["evictions"] == {"moe": 3, "mix": 2}
    assert wp.capacity_bytes <= 700_000
    lines = [r.getMessage() for r in caplog.records]
    assert sum(line.startswith("weights evict ") for line in lines) == 4
    assert sum(line.startswith("weights reload ") for line in lines) == 4


def test_keep_alive_expiry_then_reload_returns_to_the_idle_baseline(two_models, reference):
    models = {"moe": {"path": two_models["moe"], "keep_alive_s": 0.0}, "mix": two_models["mix"]}
    eng = Engine(models=models, show_progress=False, page_in_bytes_per_step=64 << 10)
    res, wp = eng.runtime.residency, eng.runtime.weight_pool
    assert eng.poll_residency() == {"mix"}  # idle: moe's keep-alive (0 s) has expired
    baseline = (wp.used_bytes, res.store.host_bytes(), res.store.pinned_bytes)
    assert baseline[:2] == (wp.model_bytes["mix"], wp.model_bytes["moe"])
    # Non-blocking page-in: 648 KiB at 64 KiB per poll, so moe is not ready for ~10 polls.
    num_polls = 1
    while "moe" not in res.poll(["moe", "mix"]):
        num_polls += 1
    assert num_polls >= -(-wp.model_bytes["moe"] // (64 << 10))
    assert res.poll([]) == {"mix"}  # idle again: evicted at once
    got = eng.generate(prompt=PROMPTS * 2, model=["moe", "moe", "mix", "mix"], sampling_params=GREEDY)
    assert [o["output_ids"] for o in got] == reference["moe"] + reference["mix"]
    eng.poll_residency()
    assert (wp.used_bytes, res.store.host_bytes(), res.store.pinned_bytes) == baseline
    snap = res.snapshot()
    assert snap["location"] == {"moe": "host", "mix": "resident"}
    assert snap["evictions"]["moe"] == 3 and snap["reloads"]["moe"] == 2


def test_a_model_larger_than_max_resident_bytes_fails_at_load(two_models):
    with pytest.raises(ModelTooLargeError, match="'moe'.*could never run"):
        Engine(models=two_models, show_progress=False, max_resident_bytes=500_000)


# ---- flags and metrics ------------------------------------------------------------------------
def test_flags_reach_engine_args(tmp_path):
    from crosspool_sgl.launch_server import parse_args

    args = parse_args(
        [
            "--model",
            "a=/x,keep_alive=5m",
            "--model",
            "b=/y",
            "--max-resident-bytes",
            "1M",
            "--keep-alive",
            "30s",
        ]
    )
    wp = args.engine.weight_pool
    assert (wp.max_resident_bytes, wp.keep_alive_s) == (1 << 20, 30.0)
    assert [wp.keep_alive_for(s) for s in args.engine.models] == [300.0, 30.0]
    toml = tmp_path / "models.toml"
    toml.write_text('max_resident_bytes = "2M"\n[[model]]\nname = "c"\npath = "/z"\nkeep_alive = "never"\n')
    args = parse_args(["--config", str(toml)])
    assert args.engine.weight_pool.max_resident_bytes == 2 << 20
    assert args.engine.models[0].keep_alive_s == float("inf")
    with pytest.raises(SystemExit):
        parse_args(["--model", "a=/x,keep_alive=soon"])


def test_metrics_count_evictions_and_reloads_by_delta():
    from crosspool_sgl.entrypoints.metrics import ServerMetrics

    metrics = ServerMetrics()
    info = {
        "kv_pool": {"free_bytes": 0, "total_bytes": 0, "used_bytes": {}, "used_pages": {}, "owned_bytes": {}},
        "num_waiting": {},
        "num_running": {},
        "weight_pool": {
            "model_bytes": {"a": 100},
            "resident_bytes": {"a": 0},
            "host_bytes": {"a": 100},
            "pinned_host_bytes": 0,
            "evictions": {"a": 2},
            "reloads": {"a": 1},
        },
    }
    metrics.update_from_scheduler(info)
    metrics.update_from_scheduler(info)  # the same totals again: no double counting
    text = metrics.render().decode()
    assert 'crosspool_weights_evictions_total{model="a"} 2.0' in text
    assert 'crosspool_weights_reloads_total{model="a"} 1.0' in text
    assert 'crosspool_weights_host_bytes{model="a"} 100.0' in text
    assert "crosspool_weights_pinned_host_bytes 0.0" in text


def test_page_in_grows_the_arena_up_to_its_bound():
    """Loading only filled part of the bound; a reload of a bigger model must grow, not fail."""
    pool = WeightPool(torch.float32, max_bytes=4 * 3 * (4 * 6 * 8 + 4 * 10 * 8))
    a = _experts(pool, "a", 4, 10, 8, seed=0)
    store = WeightStore(pool)
    store.evict("a")
    _experts(pool, "b", 4, 6, 8, seed=1)  # the arena is only as big as a
    store.begin_page_in("a")
    store.wait("a")
    _assert_weights(pool, a)
    assert pool.capacity_bytes <= pool.max_bytes
