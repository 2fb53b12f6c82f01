"""Start every deployment once, check that idle ones cost no CPU, replay the traces interleaved.

Why interleaved: on a shared machine the background load drifts over minutes, so running all of one
setup and then all of the other would charge that drift to whichever ran second. Every deployment stays
up for the whole variant (an idle stock server sleeps with `--sleep-on-idle`, ours blocks on its
queue; the idle check measures that), and each (repeat, seed) replays the setups in an order that
flips from one repeat to the next within a seed and from one seed to the next, so each side goes
first equally often. Before each replay every cache is flushed;
after it, ours must hold no request KV page.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from crosspool_sgl.bench.client import ReplayArgs, replay
from crosspool_sgl.bench.monitor import Sampler, busy_fractions, core_times, cores_used
from crosspool_sgl.bench.servers import SETUPS, ModelEntry, RunningSetup, free_ports, launch
from crosspool_sgl.bench.stats import compact_record, summarize_by_model
from crosspool_sgl.bench.trace import TraceRequest

Log = Callable[[str], None]


@dataclass(frozen=True)
class ReplayPlan:
    """What every replay of a variant shares."""

    time_limit_s: float  # trace duration + drain
    kv_budget_bytes: int
    models: tuple[ModelEntry, ...]
    progress: bool = False
    startup_timeout_s: float = 300.0
    idle_sample_s: float = 3.0


def start_all(
    setups: Sequence[str], plan: ReplayPlan, log_dir: Path, log: Log = print
) -> tuple[dict[str, RunningSetup], dict[str, dict[str, Any]]]:
    """Start the setups one after another (concurrent start-ups would slow each other); the running
    ones and a status entry for every one."""
    running, status = {}, {}
    for name in setups:
        spec = SETUPS[name]
        start = time.monotonic()
        models = list(plan.models)
        setup, why = launch(
            spec, models, plan.kv_budget_bytes, free_ports(len(models)), log_dir, plan.startup_timeout_s, log
        )
        if setup is None:
            kind = "unavailable" if why and "no --" in why else "failed"
            log(f"[{name}] {kind}: {why}")
            status[name] = {"status": kind, "reason": why, "kind": spec.kind}
            continue
        status[name] = {"status": "ok", "kind": spec.kind, "startup_s": round(time.monotonic() - start, 1)}
        running[name] = setup
        log(f"[{name}] ready in {status[name]['startup_s']:.0f} s")
    return running, status


def idle_cores(running: dict[str, RunningSetup], sample_s: float, settle_s: float = 2.0) -> dict[str, float]:
    """Cores each deployment uses while nobody sends it anything (should be ~0: a busy-polling idle
    server would steal a core from the other side's replays)."""
    time.sleep(settle_s)
    before = {n: s.cpu_seconds() for n, s in running.items()}
    t0 = time.monotonic()
    time.sleep(sample_s)
    wall = time.monotonic() - t0
    return {n: round(cores_used(before[n], s.cpu_seconds(), wall) or 0.0, 4) for n, s in running.items()}


def replay_order(setups: Sequence[str], repeats: int, seeds: Sequence[int]) -> list[tuple[int, int, str]]:
    """(repeat, seed, setup) in run order: repeat-major, then seed; the setups' order flips between
    consecutive blocks and between repeats of one seed, so each side goes first equally often."""
    out = []
    for r in range(1, repeats + 1):
        for i, seed in enumerate(seeds):
            order = list(setups) if (r - 1 + i) % 2 == 0 else list(reversed(setups))
            out += [(r, seed, name) for name in order]
    return out


def _process_cpu() -> float:
    import psutil

    t = psutil.Process().cpu_times()
    return t.user + t.system


def replay_once(
    name: str,
    running: dict[str, RunningSetup],
    trace: list[TraceRequest],
    plan: ReplayPlan,
    label: str,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """One replay against one running setup, every other one idle; (summary run, raw run)."""
    setup = running[name]
    flush = setup.flush_caches()
    retractions = setup.retractions()
    cpu0, client0 = {n: s.cpu_seconds() for n, s in running.items()}, _process_cpu()
    cores0, load0, m0 = core_times(), os.getloadavg()[0], time.monotonic()
    with Sampler(setup) as sampler:
        args = ReplayArgs(plan.time_limit_s, plan.progress, label)
        vocab = {m.name: m.vocab_size for m in plan.models}
        records, t0, wall = asyncio.run(replay(trace, setup.routes, vocab, args))
    interval = time.monotonic() - m0
    cores1, load1 = core_times(), os.getloadavg()[0]
    cpu1, client1 = {n: s.cpu_seconds() for n, s in running.items()}, _process_cpu()
    pages, waited = setup.wait_request_pages_zero()
    run = {
        "status": "ok",
        "wall_s": round(wall, 2),
        "measured_s": round(interval, 2),
        "preempted": max(0, setup.retractions() - retractions),
        "flush_codes": flush,
        "loadavg_1m": [round(load0, 2), round(load1, 2)],
        "cores_used": {n: round(cores_used(cpu0[n], cpu1[n], interval) or 0.0, 3) for n in running},
        "client_cores": round(cores_used(client0, client1, interval) or 0.0, 3),
        "percore_busy": [round(x, 3) for x in busy_fractions(cores0, cores1)],
        "percore_peak_pct": sampler.samples.peak_percore_pct(),
        "peak_rss_bytes": sampler.samples.peak_rss,
        "threads": setup.num_threads(),
        "request_pages_after": pages,
        "request_pages_wait_s": round(waited, 2),
        "summary": summarize_by_model(records, wall),
        # Long-prompt requests change everyone's step times; this view isolates the ordinary traffic.
        "summary_normal": summarize_by_model([r for r in records if r.kind == "normal"], wall),
        "errors": sorted({r.error for r in records if r.error})[:10],
    }
    raw = {"records": [compact_record(r, t0) for r in records], "samples": sampler.samples.relative(t0)}
    return run, raw


def run_interleaved(
    running: dict[str, RunningSetup],
    traces: dict[int, list[TraceRequest]],
    plan: ReplayPlan,
    order: list[tuple[int, int, str]],
    label: str,
    log: Log = print,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Every (repeat, seed, setup) of `order` whose setup is running; (summary runs, raw runs)."""
    runs, raws = [], []
    for slot, (repeat, seed, name) in enumerate(order, start=1):
        if name not in running:
            continue
        head = {"slot": slot, "setup": name, "kind": running[name].spec.kind, "seed": seed, "repeat": repeat}
        log(
            f"== {label} #{slot}/{len(order)}: {name}, seed {seed}, repeat {repeat} "
            f"({len(traces[seed])} requests)"
        )
        if not running[name].alive():
            runs.append({**head, "status": "failed", "reason": "server exited"})
            continue
        try:
            run, raw = replay_once(name, running, traces[seed], plan, f"{label}/{name}/s{seed}r{repeat}")
        except Exception as exc:  # one broken replay must not lose the others' results
            runs.append({**head, "status": "failed", "reason": repr(exc)[:300]})
            continue
        o = run["summary"]["overall"]
        log(
            f"   {o['completed']}/{o['requests']} done, {o['timeout']} timeouts, TTFT P99 "
            f"{o['ttft_p99_ms'] or 0:.0f} ms, TBT P99 {o['tbt_p99_ms'] or 0:.1f} ms, "
            f"wall {run['wall_s']:.0f} s, "
            f"cores {run['cores_used'][name]:.2f}, per-core busy "
            f"{' '.join(f'{100 * x:.0f}%' for x in run['percore_busy'])}, load {run['loadavg_1m'][0]:.1f} -> "
            f"{run['loadavg_1m'][1]:.1f}, request pages after {run['request_pages_after']}"
        )
        if run["request_pages_after"] is not None and any(run["request_pages_after"].values()):
            log(f"!! {name} still holds request KV pages after the replay: {run['request_pages_after']}")
        runs.append({**head, **run})
        raws.append({**head, **raw})
    return runs, raws
