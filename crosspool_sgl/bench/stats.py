"""What one replayed request measured, and the per-model / overall summaries the report prints.

Kept free of I/O and third-party imports so it is unit-tested without servers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

# Outcomes of a request, as the client saw them.
OK, REJECTED, TIMEOUT, ERROR = "ok", "rejected", "timeout", "error"


@dataclass
class RequestRecord:
    """Client-side timings of one streamed request (seconds on the client's monotonic clock)."""

    index: int
    model: str
    kind: str
    prompt_len: int
    output_len: int  # asked for
    send_s: float  # scheduled arrival, relative to the trace start
    status: str = ERROR
    first_token_s: float | None = None  # absolute, same clock as chunk_s
    start_s: float | None = None  # when the request actually went out (absolute)
    chunk_s: list[float] = field(default_factory=list)  # arrival of every content chunk
    completion_tokens: int = 0
    error: str = ""

    @property
    def ttft(self) -> float | None:
        if self.first_token_s is None or self.start_s is None:
            return None
        return self.first_token_s - self.start_s

    def tbts(self) -> list[float]:
        """Gaps between consecutive streamed chunks (SGLang's bench_serving ITL definition)."""
        return [b - a for a, b in zip(self.chunk_s, self.chunk_s[1:], strict=False)]

    @property
    def context_len(self) -> int:
        return self.prompt_len + self.completion_tokens


def percentile(values: Sequence[float], q: float) -> float | None:
    """Linear-interpolated percentile (numpy's default method); None for no data."""
    if not values:
        return None
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def summarize(records: Sequence[RequestRecord], wall_s: float) -> dict[str, Any]:
    """Latency percentiles (ms), throughput and outcome counts of a group of requests."""
    done = [r for r in records if r.status == OK]
    ttfts = [r.ttft for r in done if r.ttft is not None]
    tbts = [g for r in done for g in r.tbts()]
    tokens = sum(r.completion_tokens for r in done)

    def ms(v: float | None) -> float | None:
        return None if v is None else v * 1000.0

    return {
        "requests": len(records),
        "completed": len(done),
        "rejected": sum(r.status == REJECTED for r in records),
        "timeout": sum(r.status == TIMEOUT for r in records),
        "error": sum(r.status == ERROR for r in records),
        "ttft_p50_ms": ms(percentile(ttfts, 50)),
        "ttft_p99_ms": ms(percentile(ttfts, 99)),
        "tbt_p50_ms": ms(percentile(tbts, 50)),
        "tbt_p99_ms": ms(percentile(tbts, 99)),
        "tbt_p999_ms": ms(percentile(tbts, 99.9)),
        "output_tok_s": tokens / wall_s if wall_s > 0 else None,
        # > 1 when streamed chunks carry several tokens: TBT then measures chunk gaps, not token gaps.
        "tokens_per_chunk": tokens / max(1, sum(len(r.chunk_s) for r in done)) if done else None,
        "completed_tokens": tokens,
        "max_served_context": max((r.context_len for r in done), default=0),
        "min_rejected_prompt": min((r.prompt_len for r in records if r.status == REJECTED), default=None),
    }


def summarize_by_model(records: Sequence[RequestRecord], wall_s: float) -> dict[str, dict[str, Any]]:
    """`overall` plus one entry per model, in name order."""
    out = {"overall": summarize(records, wall_s)}
    for model in sorted({r.model for r in records}):
        out[model] = summarize([r for r in records if r.model == model], wall_s)
    return out


def ratio(baseline: float | None, ours: float | None) -> float | None:
    """baseline / crosspool: > 1 means crosspool is lower (better, for latencies)."""
    if baseline is None or ours is None or ours <= 0:
        return None
    return baseline / ours


def compact_record(rec: RequestRecord, t0: float) -> dict[str, Any]:
    """A JSON-ready record for the raw sidecar: times relative to the trace start / the request's send,
    rounded to 10 us (enough for ms percentiles, small once gzipped)."""
    start = rec.start_s
    return {
        "i": rec.index,
        "model": rec.model,
        "kind": rec.kind,
        "status": rec.status,
        "prompt_len": rec.prompt_len,
        "output_len": rec.output_len,
        "completion_tokens": rec.completion_tokens,
        "sent_s": None if start is None else round(start - t0, 5),
        "ttft_ms": None if rec.ttft is None else round(rec.ttft * 1e3, 2),
        "chunks_ms": [] if start is None else [round((c - start) * 1e3, 2) for c in rec.chunk_s],
        "error": rec.error,
    }
