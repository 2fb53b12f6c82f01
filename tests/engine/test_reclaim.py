"""Reclaiming cached prefixes for a blocked plan (core/reclaim.py), on a real pool, planner and cache.

A stub runner stands in for the models (a token for every request whose prompt completes), so the
scheduler, policy, KV pool and prefix cache run exactly as in the server.

Both of the first two tests fail on the previous reclaim rule (evict idle models' cache first, and
only until the blocked request's own pages fit): in the first the request waits, with the pool full
of unreferenced cache, until it is overdue; in the second the idle model's recent working set is
evicted for nothing.
"""

from __future__ import annotations

import logging
import random
import time
from types import SimpleNamespace

import torch

from crosspool_sgl.core.model_runner import StepResult
from crosspool_sgl.core.req import Req, ReqState
from crosspool_sgl.core.schedule_policy import PolicyArgs, SchedulePolicy
from crosspool_sgl.core.scheduler import MultiModelScheduler
from crosspool_sgl.mem.kv_planner import KVPlanner, ModelKVPolicy
from crosspool_sgl.mem.kv_pool import KVGeometry, KVPool
from crosspool_sgl.mem.prefix_cache import PrefixCache
from crosspool_sgl.sampling_params import SamplingParams

PT = 16  # tokens per page
PAGES_PER_CHUNK = 8
NUM_CHUNKS = 24
VOCAB = 1000
MODELS = ("warm", "idle")


class StubRunner:
    """A next token for each request whose prompt is complete; no math."""

    def __init__(self) -> None:
        self.models = {m: SimpleNamespace(config=SimpleNamespace(vocab_size=VOCAB)) for m in MODELS}
        self.residency = None

    def run(self, items):
        out = {}
        for req, n in items:
            res = out[req.rid] = StepResult()
            if req.num_cached + n == len(req.input_ids) + len(req.output_ids):
                res.next_token = 7
        return out


def build() -> MultiModelScheduler:
    geom = KVGeometry(num_layers=1, num_kv_heads=1, head_dim=8, dtype=torch.float32)
    page_bytes = geom.page_bytes(PT)
    pool = KVPool(NUM_CHUNKS * PAGES_PER_CHUNK * page_bytes, PT, chunk_bytes=PAGES_PER_CHUNK * page_bytes)
    for m in MODELS:
        pool.add_model(m, geom)
    planner = pool.planner = KVPlanner(
        pool.chunk_bytes, pool.num_chunks, {m: ModelKVPolicy() for m in MODELS}
    )
    policy = SchedulePolicy(
        PolicyArgs(PT, 16, prefill_tokens_with_decodes=512),
        admission_key=lambda r: planner.admission_deadline(r.model, r.arrival_time),
        victim_key=lambda r: planner.victim_key(r.model, r.arrival_time, r.num_cached),
        pool_pages=dict.fromkeys(MODELS, NUM_CHUNKS * PAGES_PER_CHUNK),
    )
    return MultiModelScheduler(
        StubRunner(),
        pool,
        policy,
        eos_ids={m: () for m in MODELS},
        context_lens={m: 1 << 16 for m in MODELS},
        prefix_cache=PrefixCache(pool),
    )


def cache_pages(sched: MultiModelScheduler, model: str, pages: int | None, rng: random.Random) -> None:
    """Finished requests of the past: `pages` pages of cached prefixes of `model` (None: until the
    pool is full)."""
    left = pages
    while left is None or left > 0:
        n = 1 if left is None else min(left, 5)
        got = sched.kv_pool.alloc(model, n, privileged=True)
        if got is None:
            assert left is None, "the test's pool is too small for its cache"
            return
        tokens = [rng.randrange(VOCAB) for _ in range(n * PT)]
        sched.prefix_cache.release(model, tokens, got, len(tokens), [])
        left = None if left is None else left - n


def request(rid: str, model: str, prompt: int, max_new: int, rng: random.Random) -> Req:
    params = SamplingParams(max_new_tokens=max_new, ignore_eos=True, temperature=0)
    return Req(
        rid, model, [rng.randrange(VOCAB) for _ in range(prompt)], params, arrival_time=time.monotonic()
    )


def drain(sched: MultiModelScheduler, max_steps: int = 5000) -> None:
    for _ in range(max_steps):
        if not sched.has_work():
            return
        sched.step()
    raise AssertionError("the scheduler did not finish its requests")


def test_a_warm_request_is_not_held_back_by_cache_while_running_requests_keep_their_headroom() -> None:
    rng = random.Random(0)
    sched = build()
    cache_pages(sched, "idle", 100, rng)
    cache_pages(sched, "warm", 60, rng)
    running = [request(f"r{i}", "warm", 32, 200, rng) for i in range(3)]
    for r in running:
        sched.add_request(r)
    for _ in range(4):
        sched.step()
    assert all(r.state is ReqState.RUNNING for r in running)
    late = request("late", "warm", 32, 200, rng)
    sched.add_request(late)
    sched.step()  # long before its deadline: only memory could hold it back
    assert late.state is ReqState.RUNNING, "a cache-full pool held a short request back"
    assert sched.counters["reclaim"]  # ...because cached prefixes were won back for it
    assert "preempt" not in sched.counters
    drain(sched)
    assert sched.request_pages() == 0


def test_reclaim_leaves_an_idle_models_working_set_when_the_requests_own_cache_suffices() -> None:
    rng = random.Random(1)
    sched = build()
    idle = request("i0", "idle", 80, 40, rng)  # gives `idle` a working set for the planner's window
    sched.add_request(idle)
    drain(sched)
    working_set = sched.kv_pool.planner.working_set["idle"]
    assert working_set > 0
    idle_cache = sched.prefix_cache.evictable_pages("idle")
    idle_chunks = len(sched.kv_pool.views["idle"].owned_chunks)
    cache_pages(sched, "warm", None, rng)  # the rest of the pool: the warm model's cache
    assert not sched.kv_pool.free_chunks
    late = request("late", "warm", 48, 64, rng)
    sched.add_request(late)
    sched.step()
    assert late.state is ReqState.RUNNING
    # the warm model's own cache paid for it; the idle model keeps its recent working set
    assert len(sched.kv_pool.views["idle"].owned_chunks) == idle_chunks
    assert sched.prefix_cache.evictable_pages("idle") == idle_cache
    assert sched.counters["reclaim"].get("warm", 0) > 0
    drain(sched)
    assert sched.request_pages() == 0


def test_nothing_is_evicted_for_a_request_that_cannot_be_seated_even_so(caplog) -> None:
    rng = random.Random(2)
    sched = build()
    cache_pages(sched, "idle", 40, rng)
    hog = request("hog", "warm", 16 * 120, 300, rng)  # holds most of the pool while it decodes
    sched.add_request(hog)
    for _ in range(40):
        sched.step()
        if hog.num_uncached == 1:
            break
    assert hog.state is ReqState.RUNNING and hog.num_uncached == 1
    reclaimed = dict(sched.counters.get("reclaim", {}))
    big = request("big", "idle", 16 * 150, 10, rng)  # fits the empty pool, never beside the hog
    big.arrival_time -= 0.6  # waiting long enough for the DEBUG line that says why
    sched.add_request(big)
    with caplog.at_level(logging.DEBUG, logger="crosspool_sgl.core.scheduler"):
        sched.step()
    assert big.state is ReqState.WAITING
    assert any(r.getMessage().startswith("blocked big (idle, 2400 tokens)") for r in caplog.records)
    assert sched.counters.get("reclaim", {}) == reclaimed  # all or nothing: the cache stays
    drain(sched)
    assert sched.request_pages() == 0
