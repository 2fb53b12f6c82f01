"""Percentiles against numpy (a reference nobody here wrote) and the per-request summaries."""

from __future__ import annotations

import random

import numpy as np
import pytest

from crosspool_sgl.bench.client import apply_event, parse_event
from crosspool_sgl.bench.stats import OK, REJECTED, RequestRecord, percentile, ratio, summarize


@pytest.mark.parametrize("q", [0, 1, 50, 90, 99, 99.9, 100])
def test_percentile_matches_numpy(q: float) -> None:
    rng = random.Random(q)
    xs = [rng.expovariate(1.0) for _ in range(1001)]
    assert percentile(xs, q) == pytest.approx(float(np.percentile(xs, q)), rel=1e-12)


def test_percentile_edges() -> None:
    assert percentile([], 50) is None
    assert percentile([3.0], 99.9) == 3.0


def _record(i: int, status: str, start: float, chunks: list[float], model: str = "m") -> RequestRecord:
    rec = RequestRecord(i, model, "normal", 10 * (i + 1), len(chunks), 0.0, status=status, start_s=start)
    rec.chunk_s = chunks
    rec.first_token_s = chunks[0] if chunks else None
    rec.completion_tokens = len(chunks)
    return rec


def test_summarize_counts_and_latencies() -> None:
    recs = [
        _record(0, OK, 0.0, [0.1, 0.2, 0.4]),
        _record(1, OK, 1.0, [1.3, 1.4]),
        _record(2, REJECTED, 2.0, []),
    ]
    s = summarize(recs, wall_s=2.0)
    assert (s["requests"], s["completed"], s["rejected"]) == (3, 2, 1)
    assert s["ttft_p50_ms"] == pytest.approx(200.0)  # ttfts 100, 300 ms
    assert s["tbt_p50_ms"] == pytest.approx(100.0)  # gaps 100, 200, 100 ms
    assert s["output_tok_s"] == pytest.approx(2.5)
    assert s["max_served_context"] == 20 + 2 and s["min_rejected_prompt"] == 30


def test_ratio() -> None:
    assert ratio(200.0, 100.0) == 2.0
    assert ratio(None, 1.0) is None and ratio(1.0, 0.0) is None


def test_sse_events() -> None:
    rec = _record(0, OK, 0.0, [])
    assert parse_event(b"data: [DONE]\n") is None and parse_event(b": keep-alive\n") is None
    assert apply_event(rec, parse_event(b'data: {"choices": [{"text": "hi"}]}'), 1.0)
    assert apply_event(rec, {"choices": [], "usage": {"completion_tokens": 5}}, 1.1)
    assert rec.chunk_s == [1.0] and rec.first_token_s == 1.0 and rec.completion_tokens == 5
    assert apply_event(rec, {"choices": [{"text": "", "finish_reason": None}]}, 1.15)  # a held-back token
    assert apply_event(rec, {"choices": [{"text": "", "finish_reason": "length"}]}, 1.16)  # final: no token
    assert rec.chunk_s == [1.0, 1.15]
    assert not apply_event(rec, {"error": {"message": "too long"}}, 1.2)
    assert rec.error == "too long"
