"""The benchmark's variants keep their character and fit the time budget (pure arithmetic over configs)."""

from __future__ import annotations

from pathlib import Path

import pytest

from crosspool_sgl.bench.multi_model import bursty_variant, longctx_variant, parse_args
from crosspool_sgl.bench.servers import model_entry
from crosspool_sgl.bench.trace import generate_trace

FULL_RUN_S = 30 * 60
STARTUPS_S = 2 * 110 + 2 * 50  # per variant: stock (four servers) and ours, on a loaded machine


def test_full_run_fits_30_minutes_even_if_every_replay_hits_its_drain_limit() -> None:
    args = parse_args([])
    replays = args.repeats * len(args.seeds) * len(args.setups)
    assert (args.repeats, len(args.seeds), args.setups) == (3, 2, ["stock", "crosspool-shared"])
    worst = sum(
        replays * (v.trace.duration_s + v.drain_s) for v in (bursty_variant(False), longctx_variant(False))
    )
    assert worst + STARTUPS_S <= FULL_RUN_S


def test_quick_is_small() -> None:
    args = parse_args(["--quick"])
    assert (args.repeats, args.seeds, args.variants) == (2, [0], ["bursty"])
    v = bursty_variant(True)
    assert len(v.models) == 2 and 2 * (v.trace.duration_s + v.drain_s) * 2 + 2 * 110 <= 5 * 60


@pytest.mark.parametrize("quick", [False, True])
def test_long_prompts_beat_the_stock_share_and_fit_the_shared_pool(
    quick: bool, tiny_models: dict[str, Path]
) -> None:
    v = longctx_variant(quick)
    qwen = model_entry("qwen3_moe", tiny_models["qwen3_moe"])
    share_tokens = v.kv_budget_bytes // len(v.models) // qwen.kv_bytes_per_token
    pool_tokens = v.kv_budget_bytes // qwen.kv_bytes_per_token
    lb = v.trace.long_bursts
    assert lb.prompt_lo > share_tokens  # stock must reject every long prompt to qwen3_moe
    assert lb.prompt_hi + lb.output_len < 0.95 * pool_tokens  # the shared pool holds the longest
    assert lb.prompt_hi + lb.output_len <= v.context_len


def test_seeds_give_different_traces_of_the_same_shape() -> None:
    v = bursty_variant(False)
    a, b = generate_trace(v.trace_config(0)), generate_trace(v.trace_config(1))
    assert [r.arrival_s for r in a] != [r.arrival_s for r in b]
    for t in (a, b):
        assert sum(r.kind == "long" for r in t) == v.trace.long_bursts.count * v.trace.long_bursts.size
        assert 60 <= len(t) <= 200  # ~2.5 req/s over 40 s, bursty
    assert generate_trace(longctx_variant(False).trace_config(0)) != generate_trace(v.trace_config(0))
