"""Medians over repeats, paired comparisons and acceptance verdicts, on synthetic runs."""

from __future__ import annotations

import pytest

from crosspool_sgl.bench import aggregate as agg
from crosspool_sgl.bench.runner import replay_order
from tests.bench import fake_runs as fr


def test_spread() -> None:
    assert agg.spread([3.0, None, 1.0, 2.0]) == {"median": 2.0, "min": 1.0, "max": 3.0, "n": 3}
    assert agg.spread([None]) is None and agg.spread([]) is None


def test_median_and_ratio_over_repeats() -> None:
    v = fr.variant(stock_slow=3.0, ours_slow=1.0)
    ttft = agg.metric(v, "crosspool-shared", "overall", "ttft_p99_ms")
    # ours: TTFT P99 = 50 ms x 2 (cold model) x (1 + 0.1 r + 0.05 s), r in 1..3, s in 0..1
    assert ttft["n"] == 6
    assert ttft["min"] == pytest.approx(100 * 1.1) and ttft["max"] == pytest.approx(100 * 1.35)
    assert agg.median_ratio(v, "overall", "ttft_p99_ms") == pytest.approx(3.0)
    assert agg.median_ratio(v, "warm", "tbt_p99_ms", seed=1) == pytest.approx(3.0)
    assert agg.metric(v, "crosspool-shared", "overall", "ttft_p99_ms", seed=0)["n"] == 3


def test_warm_model_is_the_most_requested() -> None:
    v = fr.variant(2.0, 1.0)
    assert agg.warm_model(v) == "warm"
    v["traces"]["0"]["summary"]["cold"]["requests"] = 100
    assert agg.warm_model(v) == "cold"


def test_pairs_match_seed_and_repeat() -> None:
    v = fr.variant(2.0, 1.0)
    pairs = agg.pairs(v)
    assert len(pairs) == 6
    assert all((a["seed"], a["repeat"]) == (b["seed"], b["repeat"]) for a, b in pairs)
    assert {a["setup"] for a, _ in pairs} == {"stock"}


def test_acceptance_passes_when_ours_is_3x_faster() -> None:
    verdicts = agg.acceptance(fr.report(fr.variant(3.5, 1.0), fr.variant(1.0, 1.5)))
    assert [v["status"] for v in verdicts] == [agg.PASS] * 7, verdicts


def test_acceptance_fails_each_criterion() -> None:
    # 2.5x: TBT passes (>= 2), TTFT fails (< 3); longctx 2.5x slower than stock fails both slack checks
    verdicts = agg.acceptance(fr.report(fr.variant(2.5, 1.0), fr.variant(1.0, 2.5)))
    assert [v["status"] for v in verdicts] == [
        agg.PASS,
        agg.FAIL,
        agg.PASS,
        agg.PASS,
        agg.FAIL,
        agg.FAIL,
        agg.PASS,
    ], verdicts


def test_one_worse_repeat_fails_no_repeat_worse() -> None:
    v = fr.variant(3.5, 1.0)
    bad = fr.run("crosspool-shared", 1, 2, 10.0)
    v["runs"] = [
        bad if (r["setup"], r["seed"], r["repeat"]) == ("crosspool-shared", 1, 2) else r for r in v["runs"]
    ]
    check = agg.no_repeat_worse(v, "bursty:")
    assert check["status"] == agg.FAIL and "seed 1 repeat 2" in check["detail"]
    # the median over six repeats still passes: one outlier moves it little
    assert agg.gain_check(v, "tbt_p99_ms", 2.0, "x")["status"] == agg.PASS


def test_unserved_request_and_leaked_pages_fail() -> None:
    longctx = fr.variant(1.0, 1.0)
    longctx["runs"][1]["summary"]["overall"]["timeout"] = 1
    report = fr.report(fr.variant(3.5, 1.0, pages=0), longctx)
    assert agg.all_served(longctx, "longctx:")["status"] == agg.FAIL
    report["variants"]["bursty"]["runs"][1]["request_pages_after"] = {"warm": 3, "cold": 0}
    assert agg.pages_released(report)["status"] == agg.FAIL
    report["variants"]["bursty"]["runs"][1]["request_pages_after"] = None  # not read counts as a failure
    assert agg.pages_released(report)["status"] == agg.FAIL


def test_nothing_completed_fails() -> None:
    v = fr.variant(3.5, 1.0)
    for r in v["runs"]:
        if r["setup"] == "crosspool-shared":  # every request timed out: no latency at all
            r["summary"] = {
                g: {**o, "completed": 0, "timeout": o["requests"], "ttft_p99_ms": None, "tbt_p99_ms": None}
                for g, o in r["summary"].items()
            }
    assert agg.gain_check(v, "tbt_p99_ms", 2.0, "x")["status"] == agg.FAIL
    check = agg.no_repeat_worse(v, "x")
    assert check["status"] == agg.FAIL and "completed 0 < 24" in check["detail"]


def test_missing_side_is_not_a_pass() -> None:
    v = fr.variant(3.5, 1.0)
    v["runs"] = [r for r in v["runs"] if r["setup"] == "stock"]
    assert agg.gain_check(v, "tbt_p99_ms", 2.0, "x")["status"] == agg.NA
    assert agg.no_repeat_worse(v, "x")["status"] == agg.NA


def test_representative_is_the_median_repeat_of_the_first_seed() -> None:
    v = fr.variant(2.0, 1.0)
    assert agg.representative(v) == {"seed": 0, "repeat": 2}


def test_replay_order_alternates() -> None:
    order = replay_order(["A", "B"], repeats=3, seeds=[0, 1])
    # blocks of one (repeat, seed): AB BA | BA AB | AB BA -- each side first in half the blocks
    assert "".join(s for _, _, s in order) == "ABBABAABABBA"
    for seed in (0, 1):  # within a seed, each side goes first in alternate repeats
        firsts = [s for i, (_, sd, s) in enumerate(order) if sd == seed and i % 2 == 0]
        assert firsts == (["A", "B", "A"] if seed == 0 else ["B", "A", "B"])
    assert [(r, sd) for r, sd, _ in order[:4]] == [(1, 0), (1, 0), (1, 1), (1, 1)]
