"""The discrete-event model on hand-checkable cases (no servers): timing, rejection, retraction."""

from __future__ import annotations

import pytest

from crosspool_sgl.bench import sim_scenarios as sc
from crosspool_sgl.bench.sim_costs import CpuCost, GpuCost, StepWork, fit_cpu_cost
from crosspool_sgl.bench.simulate import Device, Engine, KVBudget, sim_summary, simulate
from crosspool_sgl.bench.trace import TraceConfig, TraceRequest, generate_trace

COST = CpuCost(a=0.010, b_dec=0.0, b_pre=0.0)  # every step 10 ms per model in it
BPT = {"a": 100, "b": 100}


def _req(i: int, model: str, prompt: int, out: int, at: float = 0.0) -> TraceRequest:
    return TraceRequest(i, at, model, prompt, out, i)


def test_single_request_timing() -> None:
    engine = Engine(["a"], KVBudget(10**6), COST)
    (r,) = simulate([_req(0, "a", 32, 5)], [Device([engine])], BPT, 100.0)
    assert r.status == "done" and r.generated == 5
    assert r.first_s == pytest.approx(0.010)  # one prefill step
    assert r.tbts == pytest.approx([0.010] * 4)


def test_static_share_rejects_what_shared_pool_serves() -> None:
    trace = [_req(0, "a", 3000, 2)]
    static = Engine(["a", "b"], KVBudget(400_000, {"a": 200_000, "b": 200_000}), COST)
    shared = Engine(["a", "b"], KVBudget(400_000), COST)
    assert simulate(trace, [Device([static])], BPT, 100.0)[0].status == "rejected"
    assert simulate(trace, [Device([shared])], BPT, 100.0)[0].status == "done"


def test_retracts_youngest_when_kv_short() -> None:
    # Room for 2 x 64 tokens' pages; two requests growing past that must retract one and still finish.
    trace = [_req(0, "a", 40, 40, 0.0), _req(1, "a", 40, 40, 0.001)]
    engine = Engine(["a"], KVBudget(128 * 100), COST)
    reqs = simulate(trace, [Device([engine])], BPT, 100.0)
    assert all(r.status == "done" for r in reqs)
    assert reqs[1].retractions >= 1 and reqs[0].retractions == 0
    assert sum(engine.kv.used.values()) == 0  # everything freed


def test_shared_slots_run_engines_concurrently() -> None:
    trace = [_req(0, "a", 16, 3), _req(1, "b", 16, 3)]
    engines = [Engine([m], KVBudget(10**6), COST) for m in ("a", "b")]
    one = simulate(trace, [Device(engines, slots=1)], BPT, 100.0)
    engines = [Engine([m], KVBudget(10**6), COST) for m in ("a", "b")]
    two = simulate(trace, [Device(engines, slots=2)], BPT, 100.0)
    assert max(r.last_s for r in two) < max(r.last_s for r in one)


def test_fit_cpu_cost_recovers_line() -> None:
    rows = [
        {"batch": b, "decode_ms_per_step": 2 + 0.5 * b, "prefill_ms": 2 + 0.01 * b * 32} for b in (1, 8, 32)
    ]
    c = fit_cpu_cost(rows, 32)
    assert (c.a, c.b_dec, c.b_pre) == pytest.approx((0.002, 0.0005, 0.00001))


def test_gpu_decode_is_bandwidth_bound() -> None:
    fleet = sc.default_fleet()
    cost = GpuCost(fleet.gpu, fleet.models)
    one = cost.step_s({"olmoe-0": StepWork(decode=1, kv_read=1000)})
    many = cost.step_s({"olmoe-0": StepWork(decode=64, kv_read=64000)})
    assert one > 1e-3  # ~1.6 GB dense + 8/64 experts over ~2.3 TB/s
    assert many < 10 * one  # batching amortises the weight reads


def test_projection_runs_small() -> None:
    fleet = sc.default_fleet(num_olmoe=4, num_qwen=1)
    setups, _ = sc.gpu_setups(fleet)
    trace = generate_trace(TraceConfig(models=tuple(fleet.models), duration_s=5.0, total_rate=5.0))
    bpt = {n: m.kv_bytes_per_token for n, m in fleet.models.items()}
    for devices in setups.values():
        s = sim_summary(simulate(trace, devices, bpt, 60.0), 5.0)
        assert s["completed"] + s["rejected"] == len(trace)
