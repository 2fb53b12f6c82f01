"""Synthetic benchmark runs (real `summarize_by_model` over made-up request timings) for the report tests."""

from __future__ import annotations

from typing import Any

from crosspool_sgl.bench.stats import OK, RequestRecord, compact_record, summarize_by_model

MODELS = ("warm", "cold")


def records(slowdown: float, n: int = 24) -> list[RequestRecord]:
    """n requests, 2 of 3 to `warm`; every latency scales with `slowdown`, the cold model's are 2x."""
    out = []
    for i in range(n):
        model = MODELS[1] if i % 3 == 0 else MODELS[0]
        scale = slowdown * (2.0 if model == "cold" else 1.0)
        start = float(i)
        chunks = [start + scale * (0.05 + 0.01 * k) for k in range(8)]
        kind = "long" if i == 5 else "normal"
        rec = RequestRecord(i, model, kind, 100, 8, start, status=OK, start_s=start)
        rec.chunk_s, rec.first_token_s, rec.completion_tokens = chunks, chunks[0], 8
        out.append(rec)
    return out


def run(setup: str, seed: int, repeat: int, slowdown: float, slot: int = 1, pages: int = 0) -> dict[str, Any]:
    recs = records(slowdown)
    kind = "stock" if setup == "stock" else "crosspool"
    return {
        "slot": slot,
        "setup": setup,
        "kind": kind,
        "seed": seed,
        "repeat": repeat,
        "status": "ok",
        "wall_s": 24.0,
        "measured_s": 25.0,
        "preempted": 0,
        "flush_codes": [200],
        "loadavg_1m": [1.0, 1.5],
        "cores_used": {
            "stock": 0.9 if kind == "stock" else 0.0,
            "crosspool-shared": 0.0 if kind == "stock" else 1.8,
        },
        "client_cores": 0.1,
        "percore_busy": [0.8, 0.7],
        "percore_peak_pct": [100.0, 90.0],
        "peak_rss_bytes": 2**30,
        "request_pages_after": {"warm": pages, "cold": 0} if kind == "crosspool" else None,
        "request_pages_wait_s": 0.0,
        "summary": summarize_by_model(recs, 24.0),
        "summary_normal": summarize_by_model([r for r in recs if r.kind == "normal"], 24.0),
        "errors": [],
    }


def trace_entry(duration: float = 24.0) -> dict[str, Any]:
    return {
        "config": {"duration_s": duration, "seed": 0},
        "num_requests": 24,
        "summary": {
            "warm": {
                "requests": 16,
                "long_requests": 1,
                "mean_prompt": 100,
                "max_prompt": 100,
                "mean_output": 8,
            },
            "cold": {
                "requests": 8,
                "long_requests": 0,
                "mean_prompt": 100,
                "max_prompt": 100,
                "mean_output": 8,
            },
        },
    }


def variant(
    stock_slow: float, ours_slow: float, seeds=(0, 1), repeats: int = 3, pages: int = 0
) -> dict[str, Any]:
    """Interleaved runs; repeat r of seed s scales both sides by (1 + 0.1 r + 0.05 s)."""
    runs, slot = [], 0
    for r in range(1, repeats + 1):
        for s in seeds:
            for setup, slow in (("stock", stock_slow), ("crosspool-shared", ours_slow)):
                slot += 1
                runs.append(run(setup, s, r, slow * (1 + 0.1 * r + 0.05 * s), slot, pages))
    return {
        "title": "test variant",
        "models": list(MODELS),
        "context_len": 4096,
        "kv_budget_bytes": 6 * 2**20,
        "stock_kv_tokens": {"warm": 2048, "cold": 4096},
        "traces": {str(s): trace_entry() for s in seeds},
        "deployments": {
            "stock": {
                "status": "ok",
                "kind": "stock",
                "startup_s": 30.0,
                "idle_cores": 0.001,
                "kv_total_bytes": 6 * 2**20,
            },
            "crosspool-shared": {"status": "ok", "kind": "crosspool", "startup_s": 10.0, "idle_cores": 0.0},
        },
        "runs": runs,
        "representative": {"seed": seeds[0], "repeat": 2},
    }


def raw_variant(v: dict[str, Any]) -> dict[str, Any]:
    runs = []
    for r in v["runs"]:
        slow = r["summary"]["warm"]["ttft_p50_ms"] / 50.0
        runs.append(
            {
                **{k: r[k] for k in ("slot", "setup", "kind", "seed", "repeat")},
                "records": [compact_record(x, 0.0) for x in records(slow)],
                "samples": {
                    "t_s": [0.0, 1.0],
                    "rss_bytes": [1, 2],
                    "kv_used_bytes": [{"warm": 1e6}] * 2,
                    "percore_pct": [[50.0, 40.0]] * 2,
                },
            }
        )
    return {"runs": runs}


def report(bursty: dict[str, Any], longctx: dict[str, Any] | None = None) -> dict[str, Any]:
    machine = {
        "cpu": "test",
        "cores": 2,
        "ram_gib": 1.0,
        "gpu": "none",
        "versions": {"torch": "x"},
        "loadavg_at_start": [0.5, 0.5, 0.5],
    }
    variants = {"bursty": bursty, **({"longctx": longctx} if longctx else {})}
    return {
        "name": "mm_test",
        "date": "2026-01-01",
        "command": "python -m x",
        "machine": machine,
        "config": {"setups": ["stock", "crosspool-shared"], "seeds": [0, 1], "repeats": 3},
        "variants": variants,
        "settings": {},
        "notes": ["a note"],
        "wall_s": 1.0,
    }
