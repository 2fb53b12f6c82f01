"""Multi-model bursty trace replay: stock SGLang (one server per model) vs crosspool, side by side.

    python -m crosspool_sgl.bench.multi_model            # reference run (~12-15 min on 2 cores)
    python -m crosspool_sgl.bench.multi_model --quick    # smoke test (~2 min)

Each variant (the bursty default trace, and a long-context one) is replayed against every setup in
`servers.SETUPS`, one setup at a time (only one deployment is up at a time, so none steals the
other's cores). Results: `benchmarks/results/<name>.{md,json}` and PNGs next to them.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shlex
import shutil
import socket
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from crosspool_sgl.bench.client import ReplayArgs, replay
from crosspool_sgl.bench.monitor import Sampler
from crosspool_sgl.bench.report import describe_machine, render_markdown, write_report
from crosspool_sgl.bench.servers import ROOT, SETUPS, ModelEntry, launch, model_entry, settings_description
from crosspool_sgl.bench.stats import summarize, summarize_by_model
from crosspool_sgl.bench.trace import LengthMix, LongBursts, TraceConfig, generate_trace, trace_summary

DEFAULT_OUT_DIR = ROOT / "benchmarks" / "results"
MODELS = ("qwen3_moe", "mixtral", "olmoe", "llama")  # Zipf order: qwen3_moe is the warm one


@dataclass(frozen=True)
class Variant:
    key: str
    title: str
    models: tuple[str, ...]
    context_len: int
    kv_budget_bytes: int  # the same total on every setup
    trace: TraceConfig
    drain_s: float = 30.0  # after the last arrival, before unfinished requests count as timeouts


def bursty_variant(quick: bool, seed: int) -> Variant:
    """Short and medium prompts, on/off bursts, plus long-prompt bursts a static share can't hold."""
    models = MODELS[:2] if quick else MODELS
    # 3 MiB per model: 2,048 qwen3_moe tokens (1.5 KiB/token fp32) in a static share, 4x that shared.
    budget = len(models) * 3 * 2**20
    long = LongBursts(
        count=1 if quick else 2,
        size=3,
        prompt_lo=1500,
        prompt_hi=3500,
        output_len=32,
        models=("qwen3_moe", "olmoe"),
    )
    trace = TraceConfig(
        models=models, duration_s=8.0 if quick else 75.0, total_rate=2.5, seed=seed, long_bursts=long
    )
    title = "bursty multi-model trace (4k-context models)"
    return Variant("bursty", title, models, 4096, budget, trace, drain_s=10.0 if quick else 30.0)


def longctx_variant(quick: bool, seed: int) -> Variant:
    """16k-context models, bursts of 5k-12k-token prompts; each static share is < 5k tokens of them."""
    models = MODELS[:2] if quick else MODELS
    # 5 MiB per model: 3,413 qwen3_moe / 5,120 olmoe tokens static; 13,653 qwen3_moe tokens shared.
    budget = len(models) * 5 * 2**20
    long = LongBursts(
        count=2 if quick else 3,
        size=2,
        prompt_lo=5000,
        prompt_hi=12000,
        output_len=32,
        spread_s=4.0,
        models=("qwen3_moe", "olmoe"),
    )
    trace = TraceConfig(
        models=models,
        duration_s=15.0 if quick else 45.0,
        total_rate=1.0,
        seed=seed + 1,
        prompt_mix=(LengthMix(16, 256),),
        output_lo=16,
        output_hi=96,
        long_bursts=long,
    )
    return Variant(
        "longctx",
        "long-context variant (16k-context models, 5k-12k-token prompt bursts)",
        models,
        16384,
        budget,
        trace,
        drain_s=60.0,
    )


def prepare_models(variant: Variant, cache_dir: Path) -> list[ModelEntry]:
    """The tiny models; copies with a larger `max_position_embeddings` for the long-context variant."""
    from crosspool_sgl.tools.make_tiny_models import ensure_tiny_models

    paths = ensure_tiny_models(names=variant.models)
    out = []
    for name in variant.models:
        path = Path(paths[name])
        cfg = json.loads((path / "config.json").read_text())
        if cfg.get("max_position_embeddings") != variant.context_len:
            dest = cache_dir / f"{name}_ctx{variant.context_len}"
            if not dest.exists():
                shutil.copytree(path, dest)
                cfg["max_position_embeddings"] = variant.context_len
                (dest / "config.json").write_text(json.dumps(cfg, indent=2))
            path = dest
        out.append(model_entry(name, path))
    return out


def free_ports(n: int) -> int:
    """A base port with n free consecutive ports after it (best effort)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            base = s.getsockname()[1]
        if base + n < 65000 and all(_port_free(base + i) for i in range(n)):
            return base
    raise RuntimeError("no free ports")


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def run_setup(
    setup_name: str,
    variant: Variant,
    models: list[ModelEntry],
    trace: list,
    args: argparse.Namespace,
    log_dir: Path,
) -> dict[str, Any]:
    """Start one setup, replay the trace against it while sampling, stop it; its result entry."""
    spec = SETUPS[setup_name]
    start = time.monotonic()
    setup, why = launch(
        spec, models, variant.kv_budget_bytes, free_ports(len(models)), log_dir, args.startup_timeout
    )
    if setup is None:
        status = "unavailable" if why and "no --" in why else "failed"
        print(f"[{setup_name}] {status}: {why}", flush=True)
        return {"status": status, "reason": why}
    startup_s = time.monotonic() - start
    print(f"[{setup_name}] ready in {startup_s:.0f} s", flush=True)
    load_before = os.getloadavg()[0]
    try:
        with Sampler(setup) as sampler:
            replay_args = ReplayArgs(
                variant.trace.duration_s + variant.drain_s,
                not args.no_progress,
                f"{variant.key}/{setup_name}",
            )
            vocab = {m.name: m.vocab_size for m in models}
            records, t0, wall = asyncio.run(replay(trace, setup.routes, vocab, replay_args))
        preempted = setup.retractions()
    finally:
        setup.stop()
    done = [r for r in records if r.status == "ok"]
    return {
        "status": "ok",
        "startup_s": startup_s,
        "wall_s": wall,
        "preempted": preempted,
        "peak_rss_bytes": sampler.samples.peak_rss,
        "loadavg_1m": [load_before, os.getloadavg()[0]],
        "summary": summarize_by_model(records, wall),
        # Long-context requests change everyone's step times; this view isolates the ordinary traffic.
        "summary_normal": summarize([r for r in records if r.kind == "normal"], wall),
        "samples": sampler.samples.relative(t0),
        "raw": {
            "ttft_ms": [round(r.ttft * 1e3, 2) for r in done if r.ttft is not None],
            "tbt_ms": [round(g * 1e3, 2) for r in done for g in r.tbts()],
        },
        "errors": sorted({r.error for r in records if r.error})[:10],
    }


def run_variant(variant: Variant, args: argparse.Namespace, work_dir: Path) -> dict[str, Any]:
    models = prepare_models(variant, work_dir / "models")
    trace = generate_trace(variant.trace)
    setups = {}
    for name in args.setups:
        print(
            f"== {variant.key}: {name} ({len(trace)} requests, {variant.trace.duration_s:.0f} s)", flush=True
        )
        setups[name] = run_setup(name, variant, models, trace, args, work_dir)
    stock_tokens = {m.name: variant.kv_budget_bytes // len(models) // m.kv_bytes_per_token for m in models}
    return {
        "title": variant.title,
        "context_len": variant.context_len,
        "kv_budget_bytes": variant.kv_budget_bytes,
        "stock_kv_tokens": stock_tokens,
        "trace": {
            "config": asdict(variant.trace),
            "num_requests": len(trace),
            "summary": trace_summary(trace),
        },
        "setups": setups,
    }


def build_notes(report: dict[str, Any]) -> list[str]:
    """Caveats derived from the run itself (the README adds the discussion)."""
    notes = [
        "All setups ran one after another in this session on the same trace; only one deployment was "
        "up at a time. Each crosspool setup is one server; stock is one server per model."
    ]
    loads = [
        x for v in report["variants"].values() for s in v["setups"].values() for x in s.get("loadavg_1m", [])
    ]
    cores = report["machine"]["cores"] or 1
    if loads and max(loads) > cores:
        notes.append(
            f"The machine was shared: 1-min load average up to {max(loads):.1f} on {cores} cores "
            "during the run, so absolute latencies are noisy; compare setups within a variant."
        )
    for v in report["variants"].values():
        for name, s in v["setups"].items():
            if s["status"] != "ok":
                notes.append(f"{v['title']}: {name} {s['status']}: {s.get('reason')}")
    notes.append(
        "Stock SGLang 0.5.23 ignores Mixtral's `sliding_window` (48 in the tiny model): its Mixtral "
        "attends to the whole context, which costs it a little more attention work."
    )
    return notes


def merge_into(path: Path, new: dict[str, Any]) -> dict[str, Any]:
    """`--update`: put the setups just run into an earlier report of the same traces (same seed and
    config), keeping the others; the earlier command, date and machine stay, the update is listed."""
    old = json.loads(path.read_text())
    for key, variant in new["variants"].items():
        prev = old["variants"].get(key)
        if prev is None:
            old["variants"][key] = variant
            continue
        if prev["trace"]["config"] != variant["trace"]["config"]:
            raise SystemExit(f"--update: the {key} trace differs from the one in {path}")
        prev["setups"].update(variant["setups"])
        prev["setups"] = {n: prev["setups"][n] for n in SETUPS if n in prev["setups"]}
    old.setdefault("updates", []).append(
        {
            "date": new["date"],
            "command": new["command"],
            "loadavg_at_start": new["machine"]["loadavg_at_start"],
        }
    )
    old["settings"].update(new["settings"])
    old["wall_s"] = old.get("wall_s", 0) + new["wall_s"]
    return old


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--quick",
        action="store_true",
        help="2 models, an 8 s bursty trace, stock vs shared (smoke test, ~2 min)",
    )
    p.add_argument("--variants", help="comma-separated of bursty, longctx (default both; --quick: bursty)")
    p.add_argument(
        "--setups",
        help=f"comma-separated of {', '.join(SETUPS)} (default all; --quick: stock,crosspool-shared)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--duration", type=float, help="override every trace's duration (s)")
    p.add_argument("--startup-timeout", type=float, default=300.0)
    p.add_argument("--out-dir", default=str(DEFAULT_OUT_DIR))
    p.add_argument("--name", help="result file stem (default multi_model, or multi_model_quick)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument(
        "--update",
        action="store_true",
        help="merge the setups run now into the existing <name>.json (same traces) and re-render",
    )
    p.add_argument("--rerender", action="store_true", help="rewrite <name>.md and PNGs from <name>.json")
    p.add_argument("--no-write", action="store_true")
    p.add_argument("--keep-logs", action="store_true", help="keep server logs (their dir is printed)")
    args = p.parse_args(argv)
    args.setups = args.setups or ("stock,crosspool-shared" if args.quick else ",".join(SETUPS))
    args.setups = [s for s in args.setups.split(",") if s]
    unknown = set(args.setups) - set(SETUPS)
    if unknown:
        p.error(f"unknown setups {sorted(unknown)}")
    args.variants = args.variants or ("bursty" if args.quick else "bursty,longctx")
    args.name = args.name or ("multi_model_quick" if args.quick else "multi_model")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.rerender:  # tables and plots again from the JSON (e.g. after editing the notes)
        report = json.loads((Path(args.out_dir) / f"{args.name}.json").read_text())
        report["notes"] = build_notes(report) + report.get("extra_notes", [])
        write_report(report, Path(args.out_dir), args.name)
        return 0
    started = time.monotonic()
    makers = {"bursty": bursty_variant, "longctx": longctx_variant}
    variants = [makers[k](args.quick, args.seed) for k in args.variants.split(",") if k]
    if args.duration:
        variants = [replace(v, trace=replace(v.trace, duration_s=args.duration)) for v in variants]
    work_dir = Path(tempfile.mkdtemp(prefix="bench_multi_model_"))
    report: dict[str, Any] = {
        "benchmark": "multi_model",
        "name": args.name,
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": shlex.join(["python", "-m", "crosspool_sgl.bench.multi_model", *(argv or sys.argv[1:])]),
        "machine": describe_machine(),
        "variants": {},
    }
    try:
        for v in variants:
            report["variants"][v.key] = run_variant(v, args, work_dir)
    finally:
        print(f"server logs in {work_dir}" if args.keep_logs else "", flush=True)
    first = variants[0]
    models = prepare_models(first, work_dir / "models")
    report["settings"] = {
        n: settings_description(SETUPS[n], models, first.kv_budget_bytes) for n in args.setups
    }
    report["wall_s"] = time.monotonic() - started
    if args.update:
        report = merge_into(Path(args.out_dir) / f"{args.name}.json", report)
    report["notes"] = build_notes(report)
    print("\n" + render_markdown(report))
    if not args.no_write:
        for path in write_report(report, Path(args.out_dir), args.name):
            print(f"wrote {path}")
    if not args.keep_logs:
        shutil.rmtree(work_dir, ignore_errors=True)
    ok = all(s["status"] != "failed" for v in report["variants"].values() for s in v["setups"].values())
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
