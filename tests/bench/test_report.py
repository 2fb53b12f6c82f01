"""Report writing from a synthetic run: Markdown table with ratios, JSON round trip, PNGs."""

from __future__ import annotations

import json
from pathlib import Path

from crosspool_sgl.bench.report import render_markdown, write_report
from crosspool_sgl.bench.stats import OK, RequestRecord, summarize_by_model
from crosspool_sgl.bench.trace import TraceConfig, generate_trace, trace_summary


def _setup_result(slowdown: float) -> dict:
    recs = []
    for i in range(20):
        start = float(i)
        chunks = [start + slowdown * (0.05 + 0.01 * k) for k in range(8)]
        rec = RequestRecord(i, "a" if i % 3 else "b", "normal", 100, 8, start, status=OK, start_s=start)
        rec.chunk_s, rec.first_token_s, rec.completion_tokens = chunks, chunks[0], 8
        recs.append(rec)
    t = [0.0, 1.0, 2.0]
    return {
        "status": "ok",
        "startup_s": 1.0,
        "wall_s": 20.0,
        "preempted": 1,
        "peak_rss_bytes": int(2**30 * slowdown),
        "loadavg_1m": [1.0, 1.5],
        "summary": summarize_by_model(recs, 20.0),
        "samples": {"t_s": t, "rss_bytes": [1, 2, 3], "kv_used_bytes": [{"a": 1e6, "b": 0.0}] * 3},
        "raw": {"ttft_ms": [r.ttft * 1e3 for r in recs], "tbt_ms": [g * 1e3 for r in recs for g in r.tbts()]},
        "errors": [],
    }


def _report() -> dict:
    cfg = TraceConfig(models=("a", "b"), duration_s=10.0)
    trace = generate_trace(cfg)
    variant = {
        "title": "test variant",
        "context_len": 4096,
        "kv_budget_bytes": 6 * 2**20,
        "stock_kv_tokens": {"a": 2048, "b": 4096},
        "trace": {
            "config": {"duration_s": 10.0, "seed": 0},
            "num_requests": len(trace),
            "summary": trace_summary(trace),
        },
        "setups": {
            "stock": _setup_result(2.0),
            "crosspool-static": {"status": "unavailable", "reason": "no flag"},
            "crosspool-shared": _setup_result(1.0),
        },
    }
    machine = {
        "cpu": "test",
        "cores": 2,
        "ram_gib": 1.0,
        "gpu": "none",
        "versions": {"torch": "x"},
        "loadavg_at_start": [0.5, 0.5, 0.5],
    }
    return {
        "name": "mm_test",
        "date": "2026-01-01",
        "command": "python -m x",
        "machine": machine,
        "variants": {"bursty": variant},
        "settings": {},
        "notes": ["a note"],
        "wall_s": 1.0,
    }


def test_markdown_has_table_and_ratios() -> None:
    md = render_markdown(_report())
    assert "| crosspool-static | unavailable: no flag |" in md
    ratio_line = next(line for line in md.splitlines() if line.startswith("| stock | 2.00"))
    assert ratio_line.count("2.00") >= 5  # every latency percentile exactly 2x slower
    assert "mm_test_bursty_cdf.png" in md and "- a note" in md


def test_write_report_files(tmp_path: Path) -> None:
    paths = write_report(_report(), tmp_path, "mm_test")
    names = sorted(p.name for p in paths)
    assert names == sorted(
        ["mm_test.md", "mm_test.json", "mm_test_bursty_cdf.png", "mm_test_bursty_occupancy.png"]
    )
    assert all(p.stat().st_size > 0 for p in paths)
    again = json.loads((tmp_path / "mm_test.json").read_text())
    assert render_markdown(again) == (tmp_path / "mm_test.md").read_text()
