"""The trace generator: deterministic for a seed, and shaped as configured (skew, bursts, lengths)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from crosspool_sgl.bench.trace import (
    FIRST_PLAIN_TOKEN,
    LongBursts,
    TraceConfig,
    generate_trace,
    load_trace,
    popularity,
    save_trace,
)

CFG = TraceConfig(
    models=("a", "b", "c", "d"),
    duration_s=120.0,
    total_rate=3.0,
    long_bursts=LongBursts(count=2, size=3, prompt_lo=5000, prompt_hi=12000, models=("a", "b")),
    seed=7,
)


def test_same_seed_same_trace() -> None:
    first, second = generate_trace(CFG), generate_trace(CFG)
    assert first == second
    assert first[5].prompt_ids(512) == second[5].prompt_ids(512)


def test_other_seed_other_trace() -> None:
    assert generate_trace(CFG) != generate_trace(replace(CFG, seed=8))


def test_sorted_bounded_and_indexed() -> None:
    trace = generate_trace(CFG)
    arrivals = [r.arrival_s for r in trace]
    assert arrivals == sorted(arrivals)
    assert all(0 <= a < CFG.duration_s + CFG.long_bursts.spread_s for a in arrivals)
    assert [r.index for r in trace] == list(range(len(trace)))
    assert len(generate_trace(replace(CFG, max_requests=10))) == 10


def test_popularity_is_skewed() -> None:
    shares = popularity(4, 1.2)
    assert abs(sum(shares) - 1) < 1e-12 and shares == sorted(shares, reverse=True)
    trace = generate_trace(replace(CFG, duration_s=2000.0, long_bursts=LongBursts()))
    counts = {m: sum(r.model == m for r in trace) for m in CFG.models}
    assert counts["a"] > 2 * counts["d"]  # Zipf 1.2: a ~ 5x d in expectation


def test_long_bursts_go_to_allowed_models() -> None:
    long = [r for r in generate_trace(CFG) if r.kind == "long"]
    assert len(long) == 6
    assert {r.model for r in long} <= {"a", "b"}
    assert all(5000 <= r.prompt_len <= 12000 for r in long)


def test_arrivals_are_bursty() -> None:
    """On/off Gamma arrivals: inter-arrival CV well above Poisson's 1."""
    trace = generate_trace(replace(CFG, duration_s=3000.0, long_bursts=LongBursts()))
    times = [r.arrival_s for r in trace if r.model == "a"]
    gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
    mean = sum(gaps) / len(gaps)
    cv = (sum((g - mean) ** 2 for g in gaps) / len(gaps)) ** 0.5 / mean
    assert cv > 1.3


def test_prompt_ids_avoid_special_tokens() -> None:
    ids = generate_trace(CFG)[0].prompt_ids(512)
    assert len(ids) == generate_trace(CFG)[0].prompt_len
    assert min(ids) >= FIRST_PLAIN_TOKEN and max(ids) < 512


def test_save_load_roundtrip(tmp_path: Path) -> None:
    trace = generate_trace(CFG)
    save_trace(trace, tmp_path / "t.jsonl")
    assert load_trace(tmp_path / "t.jsonl") == trace
