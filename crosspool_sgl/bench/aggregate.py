"""Repeats folded into medians with their min-max, stock/crosspool ratios and the acceptance verdicts.

One run = one replay of one seed's trace against one setup (`multi_model.replay_once` writes it). A
single replay on a shared machine can be off by 2x, so every figure the report prints is a median
over repeats with the range beside it, and every verdict is computed here from those runs, never
typed by hand. Pure (dicts in, dicts out) so it is unit-tested without servers.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable, Sequence
from typing import Any

from crosspool_sgl.bench.stats import ratio

REFERENCE = "stock"  # the baseline of every ratio
OURS = "crosspool-shared"  # the setup the acceptance is about
TBT_GAIN = 2.0  # bursty: stock P99 TBT / ours at least this
TTFT_GAIN = 3.0  # bursty: stock P99 TTFT / ours at least this
LONGCTX_SLACK = 2.0  # longctx: ours' ordinary P99 at most this times stock's
PASS, FAIL, NA = "PASS", "FAIL", "n/a"

Run = dict[str, Any]


def spread(values: Iterable[float | None]) -> dict[str, float] | None:
    """Median, min, max and count of the values that exist (None when none do)."""
    xs = [float(v) for v in values if v is not None]
    if not xs:
        return None
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "n": len(xs)}


def ok_runs(variant: dict[str, Any], setup: str, seed: int | None = None) -> list[Run]:
    """The completed runs of a setup (of one seed, or all), in run order."""
    return [
        r
        for r in variant.get("runs", [])
        if r["setup"] == setup and r["status"] == "ok" and (seed is None or r["seed"] == seed)
    ]


def values(runs: Sequence[Run], group: str, key: str, view: str = "summary") -> list[float | None]:
    """One metric of one group ("overall" or a model) from each run; None where a run lacks it."""
    return [r.get(view, {}).get(group, {}).get(key) for r in runs]


def metric(
    variant: dict[str, Any], setup: str, group: str, key: str, view: str = "summary", seed: int | None = None
) -> dict[str, float] | None:
    return spread(values(ok_runs(variant, setup, seed), group, key, view))


def median_ratio(
    variant: dict[str, Any], group: str, key: str, view: str = "summary", seed: int | None = None
) -> float | None:
    """stock median / ours median: > 1 means ours is lower (better, for latencies)."""
    ref = metric(variant, REFERENCE, group, key, view, seed)
    ours = metric(variant, OURS, group, key, view, seed)
    return ratio(ref and ref["median"], ours and ours["median"])


def warm_model(variant: dict[str, Any]) -> str | None:
    """The most requested model over all seeds' traces (ties: the first name)."""
    counts: dict[str, float] = {}
    for tr in variant.get("traces", {}).values():
        for model, s in tr["summary"].items():
            counts[model] = counts.get(model, 0) + s["requests"]
    return min(counts, key=lambda m: (-counts[m], m)) if counts else None


def seeds_of(variant: dict[str, Any]) -> list[int]:
    return sorted({r["seed"] for r in variant.get("runs", [])})


def pairs(variant: dict[str, Any], a: str = REFERENCE, b: str = OURS) -> list[tuple[Run, Run]]:
    """(a run, b run) of the same seed and repeat: the interleaved neighbours compared one to one."""
    index = {(r["seed"], r["repeat"]): r for r in ok_runs(variant, a)}
    return [
        (index[(r["seed"], r["repeat"])], r) for r in ok_runs(variant, b) if (r["seed"], r["repeat"]) in index
    ]


def _verdict(name: str, passed: bool | None, detail: str) -> dict[str, str]:
    return {"name": name, "status": NA if passed is None else (PASS if passed else FAIL), "detail": detail}


def _fmt(x: float | None) -> str:
    return "—" if x is None else f"{x:.2f}"


def gain_check(variant: dict[str, Any], key: str, gain: float, label: str) -> dict[str, str]:
    """stock/ours median ratio of `key` at least `gain`, overall and for the warm model."""
    warm = warm_model(variant)
    groups = ["overall", *([warm] if warm else [])]
    got = {g: median_ratio(variant, g, key) for g in groups}
    per_seed = {
        s: "/".join(_fmt(median_ratio(variant, g, key, seed=s)) for g in groups) for s in seeds_of(variant)
    }
    # No runs on a side: nothing to judge. Runs but no latency (nothing completed): a failure.
    ran = bool(ok_runs(variant, REFERENCE)) and bool(ok_runs(variant, OURS))
    passed = all(v is not None and v >= gain for v in got.values()) if ran else None
    detail = ", ".join(f"{g} {_fmt(v)}" for g, v in got.items())
    detail += "; per seed " + ", ".join(f"{s}: {v}" for s, v in per_seed.items()) if per_seed else ""
    return _verdict(f"{label} stock/{OURS} >= {gain:g}, overall and warm model ({warm})", passed, detail)


def no_repeat_worse(variant: dict[str, Any], label: str) -> dict[str, str]:
    """No interleaved pair where ours has the higher P99 TTFT or TBT, overall or for the warm model."""
    warm = warm_model(variant)
    groups = ["overall", *([warm] if warm else [])]
    worse, compared = [], 0
    for ref, ours in pairs(variant):
        where = f"seed {ours['seed']} repeat {ours['repeat']}"
        done = (ref["summary"]["overall"]["completed"], ours["summary"]["overall"]["completed"])
        if done[1] < done[0]:  # percentiles over fewer survivors would flatter the side that dropped more
            worse.append(f"{where}: completed {done[1]} < {done[0]}")
        for g in groups:
            for key in ("ttft_p99_ms", "tbt_p99_ms"):
                a, b = values([ref], g, key)[0], values([ours], g, key)[0]
                if a is None:
                    continue
                compared += 1
                if b is None or b > a:
                    worse.append(f"{where} {g} {key}: {_fmt(b)} > {a:.1f}")
    passed = None if not compared else not worse
    detail = f"{compared} comparisons" + (": " + "; ".join(worse[:6]) if worse else ", none worse")
    return _verdict(
        f"{label} no repeat of {OURS} worse than stock (P99 TTFT and TBT, overall and warm)", passed, detail
    )


def all_served(variant: dict[str, Any], label: str) -> dict[str, str]:
    """Every request of every run of ours completed: none rejected, none timed out."""
    runs = ok_runs(variant, OURS)
    bad = [
        f"seed {r['seed']} repeat {r['repeat']}: {o['completed']}/{o['requests']} "
        f"({o['rejected']} rejected, {o['timeout']} timeouts)"
        for r in runs
        for o in [r["summary"]["overall"]]
        if o["completed"] != o["requests"] or o["timeout"] or o["rejected"]
    ]
    longs = sum(
        t["summary"][m].get("long_requests", 0)
        for t in variant.get("traces", {}).values()
        for m in t["summary"]
    )
    detail = f"{len(runs)} runs, {longs} long prompts per repeat over the seeds" + (
        ": " + "; ".join(bad) if bad else ""
    )
    return _verdict(
        f"{label} {OURS} served every request (long prompts included), no timeouts",
        None if not runs else not bad,
        detail,
    )


def slack_check(variant: dict[str, Any], key: str, label: str) -> dict[str, str]:
    """Ours' ordinary-request median P99 at most LONGCTX_SLACK x stock's."""
    r = median_ratio(variant, "overall", key, view="summary_normal")
    factor = None if r is None else 1.0 / r  # ours / stock
    ran = bool(ok_runs(variant, REFERENCE)) and bool(ok_runs(variant, OURS))
    passed = (factor is not None and factor <= LONGCTX_SLACK) if ran else None
    return _verdict(
        f"{label} ordinary requests' {key} {OURS} <= {LONGCTX_SLACK:g}x stock",
        passed,
        f"{OURS}/stock {_fmt(factor)}",
    )


def pages_released(report: dict[str, Any]) -> dict[str, str]:
    """After every run of every crosspool setup, no request holds a KV page."""
    checked, bad = 0, []
    for key, v in report["variants"].items():
        for r in v.get("runs", []):
            if r["status"] != "ok" or r.get("kind") != "crosspool":
                continue
            checked += 1
            pages = r.get("request_pages_after")
            if pages is None or any(pages.values()):
                bad.append(f"{key} {r['setup']} seed {r['seed']} repeat {r['repeat']}: {pages}")
    detail = f"{checked} runs checked" + (": " + "; ".join(bad[:6]) if bad else ", all zero")
    return _verdict(
        "zero request KV pages in the pool after every crosspool run",
        None if not checked else not bad,
        detail,
    )


def acceptance(report: dict[str, Any]) -> list[dict[str, str]]:
    """The verdicts of the issue's acceptance criteria, from the runs in the report."""
    out = []
    bursty, longctx = report["variants"].get("bursty"), report["variants"].get("longctx")
    if bursty:
        out += [
            gain_check(bursty, "tbt_p99_ms", TBT_GAIN, "bursty: P99 TBT"),
            gain_check(bursty, "ttft_p99_ms", TTFT_GAIN, "bursty: P99 TTFT"),
            no_repeat_worse(bursty, "bursty:"),
        ]
    if longctx:
        out += [
            all_served(longctx, "longctx:"),
            slack_check(longctx, "ttft_p99_ms", "longctx:"),
            slack_check(longctx, "tbt_p99_ms", "longctx:"),
        ]
    return [*out, pages_released(report)]


def representative(variant: dict[str, Any]) -> dict[str, int] | None:
    """The (seed, repeat) the plots show: first seed, the repeat with ours' median P99 TBT."""
    seeds = seeds_of(variant)
    if not seeds:
        return None
    setups = [OURS, *sorted({r["setup"] for r in variant["runs"]})]
    runs = next((rs for s in setups if (rs := ok_runs(variant, s, seeds[0]))), [])
    if not runs:
        return None
    key = values(runs, "overall", "tbt_p99_ms")
    ordered = sorted(zip(runs, key, strict=True), key=lambda p: float("inf") if p[1] is None else p[1])
    pick = ordered[(len(ordered) - 1) // 2][0]
    return {"seed": pick["seed"], "repeat": pick["repeat"]}
