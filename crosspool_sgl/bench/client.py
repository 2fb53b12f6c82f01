"""Async streaming replay of a trace over the OpenAI `/v1/completions` API (loopback only).

Every request is sent at its trace arrival time (open loop: a slow server does not slow the
arrivals, as with real users), streamed, and timed chunk by chunk on the client's monotonic clock.
Prompts are token ids, so both sides see the exact prompt length and no tokenizer difference.
The replay is bounded in requests (the trace) and in time (`time_limit_s`): whatever has not finished
then is cancelled and counted as a timeout.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from urllib.parse import urlparse

import aiohttp

from crosspool_sgl.bench.stats import ERROR, OK, REJECTED, TIMEOUT, RequestRecord
from crosspool_sgl.bench.trace import TraceRequest

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


@dataclass(frozen=True)
class ReplayArgs:
    time_limit_s: float  # from the trace start; pending requests are cancelled after it
    progress: bool = True
    label: str = ""


def check_loopback(urls: Sequence[str]) -> None:
    """The benchmark only ever talks to servers it started on this machine."""
    for url in urls:
        if urlparse(url).hostname not in LOOPBACK_HOSTS:
            raise ValueError(f"refusing non-loopback endpoint {url}")


def request_body(req: TraceRequest, prompt: list[int]) -> dict:
    """Greedy, ignore_eos: every request generates exactly `output_len` tokens on every server."""
    return {
        "model": req.model,
        "prompt": prompt,
        "max_tokens": req.output_len,
        "temperature": 0.0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }


def parse_event(line: bytes) -> dict | None:
    """One SSE `data:` line as JSON; None for keep-alives, comments and `[DONE]`."""
    text = line.decode("utf-8", "replace").strip()
    if not text.startswith("data:"):
        return None
    payload = text[5:].strip()
    if not payload or payload == "[DONE]":
        return None
    try:
        return json.loads(payload)
    except json.JSONDecodeError:
        return None


def apply_event(rec: RequestRecord, event: dict, now: float) -> bool:
    """Fold one event into the record; False when the server reported an error (request rejected)."""
    if "error" in event or event.get("object") == "error":
        err = event.get("error", event)
        rec.error = str(err.get("message", err) if isinstance(err, dict) else err)[:300]
        return False
    for choice in event.get("choices") or []:
        # A token event: any chunk with text, or a non-final chunk with empty text (stock SGLang streams
        # one chunk per token even while its detokenizer holds back an incomplete UTF-8 sequence or a
        # skipped special token; our server leaves such chunks out, so its events can carry 2+ tokens).
        if choice.get("text") or ("text" in choice and choice.get("finish_reason") is None):
            rec.chunk_s.append(now)
            if rec.first_token_s is None:
                rec.first_token_s = now
        if choice.get("finish_reason") == "abort":
            rec.error = "aborted by server"
            return False
    usage = event.get("usage")
    if usage:
        rec.completion_tokens = int(usage.get("completion_tokens") or 0)
    return True


async def send_one(
    session: aiohttp.ClientSession, url: str, req: TraceRequest, prompt: list[int], rec: RequestRecord
) -> None:
    """Stream one completion into `rec` (never raises, except on cancellation)."""
    rec.start_s = time.monotonic()
    try:
        async with session.post(url, json=request_body(req, prompt)) as resp:
            if resp.status >= 400:
                rec.status, rec.error = REJECTED, f"HTTP {resp.status}: {(await resp.text())[:300]}"
                return
            async for line in resp.content:
                event = parse_event(line)
                if event is not None and not apply_event(rec, event, time.monotonic()):
                    rec.status = REJECTED
                    return
    except (aiohttp.ClientError, ConnectionError) as exc:
        rec.status, rec.error = ERROR, repr(exc)[:300]
        return
    if not rec.completion_tokens:
        rec.completion_tokens = len(rec.chunk_s)
    rec.status = OK if rec.chunk_s else REJECTED


async def _scheduled(
    session: aiohttp.ClientSession,
    url: str,
    req: TraceRequest,
    prompt: list[int],
    rec: RequestRecord,
    t0: float,
) -> RequestRecord:
    await asyncio.sleep(max(0.0, t0 + req.arrival_s - time.monotonic()))
    await send_one(session, url, req, prompt, rec)
    return rec


def new_record(req: TraceRequest) -> RequestRecord:
    return RequestRecord(
        req.index, req.model, req.kind, req.prompt_len, req.output_len, req.arrival_s, status=TIMEOUT
    )


async def replay(
    trace: Sequence[TraceRequest], routes: Mapping[str, str], vocab: Mapping[str, int], args: ReplayArgs
) -> tuple[list[RequestRecord], float, float]:
    """Send the trace; returns (records in trace order, t0, wall seconds until the last finished)."""
    from tqdm import tqdm

    check_loopback(list(routes.values()))
    prompts = [r.prompt_ids(vocab[r.model]) for r in trace]  # built before the clock starts
    records = [new_record(r) for r in trace]
    timeout = aiohttp.ClientTimeout(total=None, sock_read=args.time_limit_s)
    connector = aiohttp.TCPConnector(limit=0, force_close=False)
    bar = tqdm(
        total=len(trace),
        desc=args.label or "replay",
        unit="req",
        disable=not args.progress,
        dynamic_ncols=True,
        mininterval=1.0,
    )
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
        t0 = time.monotonic()
        tasks = [
            asyncio.create_task(_scheduled(session, f"{routes[r.model]}/v1/completions", r, p, rec, t0))
            for r, p, rec in zip(trace, prompts, records, strict=True)
        ]
        for t in tasks:
            t.add_done_callback(lambda _t: bar.update(1))
        # Cancelled requests keep the TIMEOUT status new_record gave them.
        _, pending = await asyncio.wait(tasks, timeout=args.time_limit_s)
        for t in pending:
            t.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
    bar.close()
    ends = [rec.chunk_s[-1] for rec in records if rec.chunk_s]
    wall = (max(ends) - t0) if ends else time.monotonic() - t0
    return records, t0, wall
