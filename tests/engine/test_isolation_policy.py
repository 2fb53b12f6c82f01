"""Shared but isolated: the starvation cases of the long-context and bursty traces, on synthetic queues.

Pure policy + planner + page budget (no model, no pool). Each test drives `SchedulePolicy.next_batch`
the way the scheduler does and applies its plan to a fake pool of chunks.

Which of these fail on the policy before the isolation work (FIFO admission that stops at the
first request that does not fit, prompt pages checked one chunk at a time, token-only budgets):
run through a shim of the old API, `test_long_prompt_does_not_stall_the_warm_model` fails (the
warm model's new request waits behind the 12k prompt) and
`test_two_long_prompts_that_cannot_fit_together_run_one_after_the_other` fails (both are admitted
chunk by chunk). The aging, time-budget and working-set tests need what the old policy did not
have at all (deadlines with prefill time, a step cost model, demand-following floors).
`test_a_large_prefill_under_way_pauses_for_another_models_burst` and
`test_an_overdue_reservation_does_not_hold_back_another_models_working_set` fail on the policy of
the previous round (large prefills' rest reserved ahead of later arrivals; a reservation held every
later admission back): the two server-side tails of the long-context trace.
"""

from __future__ import annotations

from crosspool_sgl.core.req import Req, ReqState
from crosspool_sgl.core.schedule_policy import PolicyArgs, SchedulePolicy, pages_for
from crosspool_sgl.core.step_cost import ModelCost, StepCostModel
from crosspool_sgl.mem.kv_planner import KVPlanner, ModelKVPolicy
from crosspool_sgl.mem.kv_pool import PageBudget
from crosspool_sgl.sampling_params import SamplingParams

PT = 16  # tokens per page
PAGES_PER_CHUNK = 8
NUM_CHUNKS = 100  # 800 pages = 12,800 tokens of every model
CHUNK = 1 << 16


class FakePool:
    """Chunk ownership and spare pages per model, as KVPool keeps them (no bytes)."""

    def __init__(self, planner: KVPlanner, models: tuple[str, ...]) -> None:
        self.planner = planner
        self.free_chunks = NUM_CHUNKS
        self.owned = dict.fromkeys(models, 0)
        self.spare = dict.fromkeys(models, 0)

    def budget(self) -> PageBudget:
        per_chunk = dict.fromkeys(self.owned, PAGES_PER_CHUNK)
        return PageBudget(dict(self.spare), per_chunk, self.free_chunks, dict(self.owned), self.planner)

    def alloc(self, model: str, n: int) -> None:
        while self.spare[model] < n:
            assert self.free_chunks > 0, "the plan over-spent the pool"
            self.free_chunks -= 1
            self.owned[model] += 1
            self.spare[model] += PAGES_PER_CHUNK
        self.spare[model] -= n

    def free(self, model: str, n: int) -> None:
        self.spare[model] += n
        while self.spare[model] >= PAGES_PER_CHUNK and self.owned[model]:
            self.spare[model] -= PAGES_PER_CHUNK
            self.owned[model] -= 1
            self.free_chunks += 1


def make_req(rid: str, model: str, prompt: int, max_new: int, t: float) -> Req:
    return Req(rid, model, [1] * prompt, SamplingParams(max_new_tokens=max_new), arrival_time=t)


def make_policy(planner: KVPlanner, cost: StepCostModel | None = None, **kw) -> SchedulePolicy:
    def key(r: Req) -> float:
        prefill_s = cost.extra_ms(r.model, len(r.input_ids), 0, True) / 1e3 if cost else 0.0
        return planner.admission_deadline(r.model, r.arrival_time, prefill_s)

    return SchedulePolicy(
        PolicyArgs(page_tokens=PT, **kw),
        admission_key=key,
        victim_key=lambda r: planner.victim_key(r.model, r.arrival_time, r.num_cached),
        cost=cost,
        pool_pages=dict.fromkeys(planner.policies, NUM_CHUNKS * PAGES_PER_CHUNK),
    )


class Sim:
    """Applies plans like the scheduler: allocate, run (every item completes its tokens), finish."""

    def __init__(self, policy: SchedulePolicy, pool: FakePool) -> None:
        self.policy, self.pool = policy, pool
        self.waiting: list[Req] = []
        self.running: list[Req] = []
        self.first_token: dict[str, float] = {}

    def observe(self, now: float) -> None:
        ordinary, large_held = self.policy.demand(self.running, self.waiting)
        chunks = lambda pages: {m: -(-n // PAGES_PER_CHUNK) for m, n in pages.items()}  # noqa: E731
        self.pool.planner.observe_demand(chunks(ordinary), now, chunks(large_held))

    def step(self, now: float):
        self.observe(now)
        plan = self.policy.next_batch(self.waiting, self.running, self.pool.budget(), now)
        if plan is None:
            return None
        for r in plan.retract:
            self.pool.free(r.model, len(r.pages))
            r.pages, r.num_cached, r.state, r.admitted_time = [], 0, ReqState.WAITING, None
            self.running.remove(r)
            self.waiting.insert(0, r)
        for r in plan.admit:
            self.waiting.remove(r)
            r.state, r.admitted_time = ReqState.RUNNING, now
            self.running.append(r)
        for r, n in plan.items:
            need = pages_for(r, n, PT)
            self.pool.alloc(r.model, need)
            r.pages += [0] * need
            r.num_cached += n
            if r.num_cached == len(r.fill_ids):
                r.output_ids.append(2)
                self.first_token.setdefault(r.rid, now)
                if len(r.output_ids) >= r.params.max_new_tokens:
                    self.pool.free(r.model, len(r.pages))
                    r.state = ReqState.FINISHED
                    self.running.remove(r)
        return plan


def planner(*models: str, window_s: float = 10.0) -> KVPlanner:
    return KVPlanner(CHUNK, NUM_CHUNKS, {m: ModelKVPolicy() for m in models}, working_set_window_s=window_s)


def test_long_prompt_does_not_stall_the_warm_model():
    """A 12k-token prompt arriving while another model decodes waits; the warm model keeps admitting."""
    p = planner("warm", "long")
    sim = Sim(make_policy(p, chunked_prefill_size=4096), FakePool(p, ("warm", "long")))
    for i in range(8):  # the warm model's recent traffic: 8 requests of ~400 tokens decoding
        sim.waiting.append(make_req(f"w{i}", "warm", 300, 200, t=0.0))
    for k in range(3):
        sim.step(now=0.01 * k)
    assert len(sim.running) == 8
    sim.waiting.append(make_req("long", "long", 12_000, 32, t=0.1))  # 750 of the 800 pages
    sim.waiting.append(make_req("w8", "warm", 300, 64, t=0.2))
    for k in range(5):
        sim.step(now=0.3 + 0.01 * k)
    assert "w8" in sim.first_token  # the warm model's new request was not stuck behind the long one
    assert sim.pool.owned["long"] * PAGES_PER_CHUNK < 750  # nor did the long one take the warm working set


def test_two_long_prompts_that_cannot_fit_together_run_one_after_the_other():
    p = planner("a", "b")
    sim = Sim(make_policy(p, chunked_prefill_size=1024), FakePool(p, ("a", "b")))
    sim.waiting += [make_req("la", "a", 7000, 8, t=0.0), make_req("lb", "b", 7000, 8, t=0.01)]
    started: list[set[str]] = []
    now = 0.0
    while sim.waiting or sim.running:
        now += 0.05
        sim.step(now)
        started.append({r.rid for r in sim.running})
        assert now < 60, "the two prompts never completed"
    # never both holding pages at once (they would deadlock or thrash), and both were served
    assert all(len(s) <= 1 for s in started)
    assert {"la", "lb"} <= set(sim.first_token)


def test_steady_warm_stream_is_served_and_the_long_prompt_ages_in():
    """A warm model's steady stream keeps being served; a long prompt of another model that cannot
    fit beside its working set waits, then gets in once overdue (aging), in bounded time."""
    cost = StepCostModel({"warm": ModelCost(100.0, 100.0), "long": ModelCost(100.0, 100.0)}, warmup_steps=0)
    p = planner("warm", "long", window_s=10.0)
    sim = Sim(make_policy(p, cost), FakePool(p, ("warm", "long")))
    arrivals: dict[str, float] = {}
    now, i, long = 0.0, 0, None
    while long is None or long.rid not in sim.first_token:
        if i % 4 == 0:  # a new warm request every fourth step, each decoding for a while
            arrivals[f"w{i}"] = now
            sim.waiting.append(make_req(f"w{i}", "warm", 400, 60, t=now))
        if i == 40:  # the warm model's working set is established: ~55 of 100 chunks
            long = make_req("long", "long", 10_000, 8, t=now)
            sim.waiting.append(long)
            deadline = p.admission_deadline("long", now, cost.extra_ms("long", 10_000, 0, True) / 1e3)
        sim.step(now)
        now += 0.02
        i += 1
        assert long is None or now < deadline + 30, "the long prompt was starved"
    served_before = [r for r, t in sim.first_token.items() if r.startswith("w") and t < deadline]
    waits = [sim.first_token[r] - arrivals[r] for r in served_before]
    assert len(served_before) > 20 and max(waits) < 0.3  # the warm stream went on, promptly
    assert sim.first_token["long"] >= deadline - 1e-9  # the long prompt got in by aging, not by luck


def test_step_time_budget_shrinks_chunks_at_long_context():
    """With decodes running, a chunk's size follows its context (attention cost), not a token count."""
    cost = StepCostModel({"m": ModelCost(100.0, 100.0)}, warmup_steps=0)
    cost.weights = [1.0, 0.5, 1e-3, 1e-6]  # ms per feature unit: 0.1 ms/token, 0.1 us per q-k pair
    p = planner("m")
    policy = make_policy(p, cost, chunked_prefill_size=4096)
    decode = make_req("d", "m", 100, 50, t=0.0)
    decode.state, decode.num_cached, decode.output_ids = ReqState.RUNNING, 100, [2]
    decode.pages = [0] * 7

    def chunk_at(ctx: int) -> int:
        r = make_req("p", "m", ctx + 4000, 8, t=0.0)
        r.state, r.num_cached, r.pages = ReqState.RUNNING, ctx, [0] * -(-ctx // PT)
        pool = FakePool(p, ("m",))
        plan = policy.next_batch([], [decode, r], pool.budget(), now=0.0)
        items = dict((q.rid, n) for q, n in plan.items)
        step_ms = cost.estimate_ms([(q.model, n, q.num_cached) for q, n in plan.items])
        decode_ms = cost.estimate_ms([("m", 1, 100)])
        # the decode's TBT at most doubles (or reaches the 4 ms floor a useful chunk needs)
        assert step_ms <= max(2 * decode_ms, PolicyArgs(page_tokens=PT).min_decode_step_ms) + 1e-6
        return items["p"]

    at0, at10k = chunk_at(0), chunk_at(10_000)
    assert at0 > 4 * at10k > 0


def test_short_prompt_is_prefilled_before_a_long_one_that_came_first():
    cost = StepCostModel({"m": ModelCost(100.0, 100.0)}, warmup_steps=0)
    p = planner("m")
    policy = make_policy(p, cost, chunked_prefill_size=1024)
    long, short = make_req("long", "m", 5000, 8, t=0.0), make_req("short", "m", 200, 8, t=0.05)
    plan = policy.next_batch([long, short], [], FakePool(p, ("m",)).budget(), now=0.1)
    assert plan.items[0][0].rid == "short" and plan.items[0][1] == 200


def running_req(rid: str, model: str, tokens: int, pool: FakePool) -> Req:
    r = make_req(rid, model, tokens, 8, t=0.0)
    r.state, r.num_cached, r.output_ids = ReqState.RUNNING, tokens, [2]
    r.pages = [0] * -(-tokens // PT)
    pool.alloc(model, len(r.pages))
    return r


def test_overdue_request_reserves_memory_from_later_arrivals():
    """Once overdue, a request that does not fit stops later admissions (what frees up is kept for
    it) — when it can fit beside the large request that runs; when it can't before that one ends,
    holding the small ones back would only cost their TTFT."""
    p = planner("a", "b")
    pool = FakePool(p, ("a", "b"))
    holder = running_req("holder", "b", 9_000, pool)  # large: 563 of 800 pages
    others = running_req("others", "a", 1_600, pool)  # 100 pages: 137 left
    policy = make_policy(p)
    big = make_req("big", "a", 3000, 8, t=0.0)  # ~190 pages: does not fit in the 137 left
    small = make_req("small", "a", 100, 8, t=50.0)
    early = policy.next_batch([big, small], [holder, others], pool.budget(), now=0.5)  # not overdue yet
    late = policy.next_batch([big, small], [holder, others], pool.budget(), now=40.0)  # past its deadline
    assert [r.rid for r in early.admit] == ["small"]
    assert late.admit == [] and late.blocked[0].rid == "big" and late.blocked_overdue

    pool = FakePool(p, ("a", "b"))
    huge = running_req("huge", "b", 11_000, pool)  # 688 pages: big can only start after it ends
    late = policy.next_batch([big, small], [huge], pool.budget(), now=40.0)
    assert [r.rid for r in late.admit] == ["small"] and late.blocked[0].rid == "big"


def test_working_set_follows_demand_with_hysteresis_and_is_capped():
    p = planner("a", "b", window_s=10.0)
    p.observe_demand({"a": 30}, now=0.0)
    p.observe_demand({"a": 0}, now=5.0)
    assert p.working_set == {"a": 30}  # still within the window: kept
    assert not p.may_claim("b", {"a": 0, "b": 70}, free_chunks=30)  # b may not take a's working set
    assert p.may_claim("b", {"a": 0, "b": 70}, free_chunks=30, privileged=True)  # an overdue request may
    p.observe_demand({"a": 0}, now=10.5)
    assert p.working_set == {}  # the window passed: released
    p.observe_demand({"a": 90, "b": 90}, now=11.0)
    assert p.working_set == {"a": 50, "b": 50}  # capped at an equal share of the pool


def test_static_floor_survives_a_privileged_claim():
    p = KVPlanner(CHUNK, NUM_CHUNKS, {"a": ModelKVPolicy(floor_bytes=20 * CHUNK), "b": ModelKVPolicy()})
    assert not p.may_claim("b", {"a": 0, "b": 80}, free_chunks=20, privileged=True)


def test_deadline_ages_a_long_prompt_in_bounded_time():
    p = planner("m")
    short = p.admission_deadline("m", arrival_time=10.0, prefill_s=0.01)
    long = p.admission_deadline("m", arrival_time=0.0, prefill_s=5.0)
    absurd = p.admission_deadline("m", arrival_time=0.0, prefill_s=1e6)
    assert short < long  # the short prompt that came 10 s later goes first...
    assert long < p.admission_deadline("m", arrival_time=25.0)  # ...but not every later arrival does
    assert absurd <= 1.0 + 30.0  # a wild estimate can't postpone aging without bound


def test_a_request_over_its_pool_share_goes_after_the_others_queued():
    p = planner("m")
    policy = make_policy(p, chunked_prefill_size=8192)
    big = make_req("big", "m", 8000, 8, t=0.0)  # 500 of 800 pages: over the 0.5 share
    small = make_req("small", "m", 300, 8, t=0.5)
    plan = policy.next_batch([big, small], [], FakePool(p, ("m",)).budget(), now=0.6)
    assert [r.rid for r, _ in plan.items][:1] == ["small"]
    overdue = policy.next_batch([big, small], [], FakePool(p, ("m",)).budget(), now=60.0)
    assert [r.rid for r, _ in overdue.items][:1] == ["big"]  # aged: it keeps its place


def test_warm_models_own_long_prompt_leaves_its_short_requests_room():
    """The long-context trace's failure: a warm model's own 10k-token prompt arrives in a lull of its
    traffic and would fit, but takes the memory its next burst needs. It is large (more than an equal
    share of the pool), so it waits beside the model's working set until it is overdue; the burst
    that comes meanwhile is served at once; the long prompt is served after."""
    p = planner("warm", "other", window_s=10.0)
    sim = Sim(make_policy(p), FakePool(p, ("warm", "other")))
    arrivals: dict[str, float] = {}

    def burst(tag: str, now: float, n: int = 10) -> None:
        for k in range(n):
            arrivals[f"{tag}{k}"] = now
            sim.waiting.append(make_req(f"{tag}{k}", "warm", 400, 40, t=now))

    now = 0.0
    burst("a", now)  # the working set: 10 x (400 + 20 headroom) tokens ~ 33 of 100 chunks
    sim.waiting.append(make_req("o", "other", 200, 400, t=now))  # another model stays active
    long = None
    while now < 30 and not (long is not None and long.rid in sim.first_token):
        if long is None and now >= 1.5:  # the burst is over: the warm model holds nearly nothing
            assert sum(1 for r in sim.running if r.model == "warm") == 0
            long = make_req("long", "warm", 10_000, 8, t=now)  # 80 of 100 chunks with its headroom
            sim.waiting.append(long)
        if now == 1.8:
            burst("b", now)
        sim.step(now)
        now = round(now + 0.02, 2)
    waits = {tag: [sim.first_token[r] - arrivals[r] for r in arrivals if r[0] == tag] for tag in "ab"}
    # the second burst did not wait behind the long prompt: it is served like the first one
    assert len(waits["b"]) == 10 and max(waits["b"]) <= max(waits["a"]) + 0.05, waits
    assert long.rid in sim.first_token  # and the long prompt was served, after it


def test_large_running_request_does_not_cover_its_models_working_set():
    """Chunks a model's large request holds do not count as its working set: another model may not
    take the free chunks the model's short requests will need beside it."""
    p = planner("a", "b")
    p.observe_demand({"b": 10}, now=0.0, large_held={"b": 60})
    owned = {"a": 25, "b": 60}  # b: its large request's 60 chunks, no short request running now
    assert p.may_claim("a", owned, free_chunks=15)  # 14 left >= the 10 b's working set needs
    assert not p.may_claim("a", owned, free_chunks=10)  # would leave b's short requests 9
    assert p.may_claim("a", owned, free_chunks=10, privileged=True)  # an overdue one may (aging)


def test_a_large_prefill_under_way_pauses_for_another_models_burst():
    """The long-context trace, seed 1: a 10.8k-token prompt (53% of the pool) found room in a lull of
    the warm model, beside another long prompt of its model; the warm model's next burst then came
    while it was prefilling. Reserving the rest of its prompt ahead of later arrivals held the burst
    back for its whole prefill and decode (1-2 s TTFT); it yields instead: the burst is served at once
    and the large prompt finishes after it."""
    cost = StepCostModel({"warm": ModelCost(100.0, 100.0), "long": ModelCost(100.0, 100.0)}, warmup_steps=0)
    p = planner("warm", "long")
    sim = Sim(make_policy(p, cost), FakePool(p, ("warm", "long")))
    sim.waiting.append(make_req("w-early", "warm", 100, 4, t=0.0))  # a small warm working set
    sim.waiting.append(make_req("other", "long", 5000, 400, t=0.0))  # 39% of the pool, decoding long
    now = 0.0
    while "w-early" not in sim.first_token or "other" not in sim.first_token:
        sim.step(now)
        now = round(now + 0.02, 2)
    large = make_req("large", "long", 7000, 64, t=now)  # 440 of 800 pages with its headroom
    sim.waiting.append(large)
    for _ in range(3):  # admitted in the lull (not overdue), its prefill under way
        sim.step(now)
        now = round(now + 0.02, 2)
    assert large.state is ReqState.RUNNING and 0 < large.num_cached < 7000
    burst_at = now
    burst = [make_req(f"b{k}", "warm", 300, 60, t=now) for k in range(6)]  # ~16 chunks with headroom
    sim.waiting += burst
    while large.rid not in sim.first_token or any(r.rid not in sim.first_token for r in burst):
        sim.step(now)
        now = round(now + 0.02, 2)
        assert now < 60, "starved"
    # 1800 prompt tokens beside a decode's 4 ms step budget take ~0.35 s; behind the large prompt, 3.6 s
    assert max(sim.first_token[r.rid] for r in burst) - burst_at <= 0.5
    assert sim.first_token["large"] > max(sim.first_token[r.rid] for r in burst)  # it paused, then finished


def test_an_overdue_reservation_does_not_hold_back_another_models_working_set():
    """The long-context trace, seed 0: an overdue 6.4k-token prompt waits for the memory a running
    12k-token prompt of its model holds; the warm model's short request that arrives meanwhile fits in
    its own working set, which the overdue one is not waiting for: it is admitted (backfill). Without
    that working set, the reservation holds it back as before."""
    for warm_ws, admitted in ((20, ["q"]), (0, [])):
        p = planner("warm", "long")
        pool = FakePool(p, ("warm", "long"))
        holder = running_req("holder", "long", 7_400, pool)  # large: 463 of 800 pages
        busy = running_req("busy", "warm", 1_600, pool)  # 100 pages: 29 chunks left
        p.observe_demand({"warm": warm_ws}, now=0.0, large_held={"long": pool.owned["long"]})
        policy = make_policy(p)
        overdue = make_req("r", "long", 4_000, 8, t=0.0)  # 251 pages; 29 chunks are 232
        q = make_req("q", "warm", 100, 8, t=39.9)
        plan = policy.next_batch([overdue, q], [holder, busy], pool.budget(), now=40.0)
        assert plan.blocked[0].rid == "r" and plan.blocked_overdue
        assert [r.rid for r in plan.admit] == admitted, warm_ws
