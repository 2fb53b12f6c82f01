"""The scheduling policy alone: pure decisions over fake requests and a page budget (no model)."""

from __future__ import annotations

from crosspool_sgl.core.req import Req, ReqState
from crosspool_sgl.core.schedule_policy import PolicyArgs, SchedulePolicy
from crosspool_sgl.mem.kv_pool import PageBudget
from crosspool_sgl.sampling_params import SamplingParams

PT = 16


def req(rid: str, prompt: int, max_new: int, t: float, running: bool = False, out: int = 0) -> Req:
    r = Req(rid, "m", [1] * prompt, SamplingParams(max_new_tokens=max_new), arrival_time=t)
    if running:  # fully prefilled, `out` tokens generated, the last not yet cached
        r.output_ids = [2] * out
        r.num_cached = prompt + out - 1
        r.pages = list(range(-(-r.num_cached // PT)))
        r.state = ReqState.RUNNING
    return r


def budget(spare: int) -> PageBudget:
    return PageBudget(spare_pages={"m": spare}, pages_per_chunk={"m": 0}, free_chunks=0)


def test_admission_keeps_decode_headroom_for_running_requests():
    policy = SchedulePolicy(PolicyArgs(page_tokens=PT, decode_headroom=0.5))
    running = [req("r", prompt=16, max_new=256, t=0.0, running=True, out=1)]
    waiting = [req("w", prompt=16, max_new=16, t=1.0)]
    # the running request will need ~128 more tokens (8 pages): 6 spare pages leave no room
    plan = policy.next_batch(waiting, running, budget(6))
    assert [r.rid for r in plan.admit] == [] and plan.blocked[0].rid == "w"
    plan = policy.next_batch(waiting, running, budget(20))
    assert [r.rid for r in plan.admit] == ["w"]
    # with no headroom asked for, the same 6 pages admit it at once
    greedy = SchedulePolicy(PolicyArgs(page_tokens=PT, decode_headroom=0.0))
    assert [r.rid for r in greedy.next_batch(waiting, running, budget(6)).admit] == ["w"]


def test_nothing_running_always_admits_the_head_when_its_chunk_fits():
    policy = SchedulePolicy(PolicyArgs(page_tokens=PT, decode_headroom=1.0))
    plan = policy.next_batch([req("w", prompt=40, max_new=4000, t=0.0)], [], budget(3))
    assert [r.rid for r in plan.admit] == ["w"]


def test_decodes_that_do_not_fit_retract_the_chosen_victim():
    policy = SchedulePolicy(
        PolicyArgs(page_tokens=PT),
        victim_key=lambda r: (r.arrival_time,),  # youngest first
    )
    old = req("old", prompt=31, max_new=64, t=0.0, running=True, out=2)  # next token opens a page
    young = req("young", prompt=31, max_new=64, t=5.0, running=True, out=2)
    plan = policy.next_batch([], [old, young], budget(1))
    assert [r.rid for r in plan.retract] == ["young"]
    assert [(r.rid, n) for r, n in plan.items] == [("old", 1)]


def test_chunked_prefill_respects_the_token_budget():
    policy = SchedulePolicy(PolicyArgs(page_tokens=PT, chunked_prefill_size=64))
    plan = policy.next_batch([req("a", 100, 8, 0.0), req("b", 100, 8, 1.0)], [], budget(100))
    assert [(r.rid, n) for r, n in plan.items] == [("a", 64)]
