"""Multi-model bursty trace replay: stock SGLang (one server per model) vs crosspool, interleaved repeats.

    python -m crosspool_sgl.bench.multi_model            # reference run (< 30 min on 2 cores)
    python -m crosspool_sgl.bench.multi_model --quick    # smoke test (bursty only, < 5 min)

For each variant (the bursty default trace, and a long-context one) every setup is started once and
stays up; then each trace seed is replayed `--repeats` times against every setup, interleaved
(`runner.replay_order`), caches flushed before each replay. The report gives medians over the repeats
with their min-max, overall and per model, and the acceptance verdicts computed from them.
Results: `benchmarks/results/<name>.{md,json}`, raw records in `<name>_raw.json.gz`, PNGs beside.
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from crosspool_sgl.bench import aggregate as agg
from crosspool_sgl.bench.report import (
    describe_machine,
    read_raw,
    render_markdown,
    scrub_paths,
    utilisation_note,
    write_report,
)
from crosspool_sgl.bench.runner import ReplayPlan, idle_cores, replay_order, run_interleaved, start_all
from crosspool_sgl.bench.servers import ROOT, SETUPS, ModelEntry, model_entry, settings_description
from crosspool_sgl.bench.trace import LengthMix, LongBursts, TraceConfig, generate_trace, trace_summary

DEFAULT_OUT_DIR = ROOT / "benchmarks" / "results"
MODELS = ("qwen3_moe", "mixtral", "olmoe", "llama")  # Zipf order: qwen3_moe is the warm one
DEFAULT_SETUPS = ("stock", "crosspool-shared")
IDLE_CORES_WARN = 0.05  # an idle deployment using more than this steals from the other side


@dataclass(frozen=True)
class Variant:
    key: str
    title: str
    models: tuple[str, ...]
    context_len: int
    kv_budget_bytes: int  # the same total on every setup
    trace: TraceConfig  # its seed is replaced per replayed seed
    drain_s: float = 30.0  # after the last arrival, before unfinished requests count as timeouts
    seed_offset: int = 0  # trace seed = benchmark seed + this (keeps the variants' traces apart)

    def trace_config(self, seed: int) -> TraceConfig:
        return replace(self.trace, seed=seed + self.seed_offset)


def bursty_variant(quick: bool) -> Variant:
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
    trace = TraceConfig(models=models, duration_s=8.0 if quick else 40.0, total_rate=2.5, long_bursts=long)
    title = "bursty multi-model trace (4k-context models)"
    return Variant("bursty", title, models, 4096, budget, trace, drain_s=10.0 if quick else 15.0)


def longctx_variant(quick: bool) -> Variant:
    """16k-context models, bursts of 5k-12k-token prompts; each static share is < 5k tokens of them."""
    models = MODELS[:2] if quick else MODELS
    # 20 MiB in all: 13,653 qwen3_moe tokens shared. Static shares: 5 MiB per model (3,413 qwen3_moe /
    # 5,120 olmoe tokens) in the full run, 10 MiB (6,826 qwen3_moe tokens) with --quick's two models.
    budget = 20 * 2**20
    long = LongBursts(
        count=1 if quick else 3,
        size=2,
        prompt_lo=7500 if quick else 5000,
        prompt_hi=12000,
        output_len=32,
        spread_s=4.0,
        models=("qwen3_moe", "olmoe"),
    )
    trace = TraceConfig(
        models=models,
        duration_s=10.0 if quick else 40.0,
        total_rate=1.0,
        prompt_mix=(LengthMix(16, 256),),
        output_lo=16,
        output_hi=96,
        long_bursts=long,
    )
    title = "long-context variant (16k-context models, 5k-12k-token prompt bursts)"
    return Variant(
        "longctx", title, models, 16384, budget, trace, drain_s=30.0 if quick else 25.0, seed_offset=1
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


def run_variant(variant: Variant, args: argparse.Namespace, work_dir: Path) -> tuple[dict, dict]:
    """Start every setup, check idle CPU, replay interleaved, stop; (summary variant, raw variant)."""
    models = prepare_models(variant, work_dir / "models")
    traces = {s: generate_trace(variant.trace_config(s)) for s in args.seeds}
    plan = ReplayPlan(
        variant.trace.duration_s + variant.drain_s,
        variant.kv_budget_bytes,
        tuple(models),
        progress=not args.no_progress,
        startup_timeout_s=args.startup_timeout,
        idle_sample_s=args.idle_sample_s,
    )
    print(f"== {variant.key}: starting {', '.join(args.setups)}", flush=True)
    running, deployments = start_all(args.setups, plan, work_dir)
    try:
        for name, cores in idle_cores(running, args.idle_sample_s).items():
            deployments[name]["idle_cores"] = cores
            print(f"[{name}] idle: {cores:.3f} cores over {args.idle_sample_s:.0f} s", flush=True)
        for name, setup in running.items():
            deployments[name]["kv_total_bytes"] = setup.kv_total_bytes()
            deployments[name]["threads"] = setup.num_threads()
        order = replay_order(args.setups, args.repeats, args.seeds)
        runs, raws = run_interleaved(running, traces, plan, order, variant.key)
    finally:
        for setup in running.values():
            setup.stop()
    stock_tokens = {m.name: variant.kv_budget_bytes // len(models) // m.kv_bytes_per_token for m in models}
    out = {
        "title": variant.title,
        "models": list(variant.models),
        "context_len": variant.context_len,
        "kv_budget_bytes": variant.kv_budget_bytes,
        "stock_kv_tokens": stock_tokens,
        "drain_s": variant.drain_s,
        "traces": {
            str(s): {
                "config": asdict(variant.trace_config(s)),
                "num_requests": len(t),
                "summary": trace_summary(t),
            }
            for s, t in traces.items()
        },
        "deployments": deployments,
        "runs": runs,
    }
    out["representative"] = agg.representative(out)
    return out, {"runs": raws}


def build_notes(report: dict[str, Any]) -> list[str]:
    """Caveats derived from the run itself (the README adds the discussion)."""
    notes = [
        "Every deployment of a variant was up for the whole variant; the replays ran one at a time, "
        "interleaved (see the run table), so the idle deployments' cost is measured, not assumed."
    ]
    for key, v in report["variants"].items():
        for name, d in v.get("deployments", {}).items():
            if d["status"] != "ok":
                notes.append(f"{key}: {name} {d['status']}: {d.get('reason')}")
            elif (d.get("idle_cores") or 0) > IDLE_CORES_WARN:
                notes.append(
                    f"**{key}: idle {name} used {d['idle_cores']:.3f} cores** (more than {IDLE_CORES_WARN}): "
                    "it competes with the other side's replays."
                )
        for r in v.get("runs", []):
            if r["status"] != "ok":
                notes.append(f"{key}: run #{r['slot']} ({r['setup']}) {r['status']}: {r.get('reason')}")
            elif any(c != 200 for c in r.get("flush_codes", [])):
                notes.append(
                    f"{key}: run #{r['slot']} ({r['setup']}): /flush_cache answered {r['flush_codes']}"
                )
            pages = r.get("request_pages_after")
            if (
                r.get("kind") == "crosspool"
                and r["status"] == "ok"
                and (pages is None or any(pages.values()))
            ):
                notes.append(
                    f"**{key}: after run #{r['slot']} ({r['setup']}) request KV pages were {pages}**"
                )
    loads = [
        x for v in report["variants"].values() for r in v.get("runs", []) for x in r.get("loadavg_1m", [])
    ]
    cores = report["machine"]["cores"] or 1
    if loads and max(loads) > cores:
        notes.append(
            f"The machine was shared: 1-min load average up to {max(loads):.1f} on {cores} cores "
            "during the replays, so absolute latencies are noisy; the interleaving spreads that over "
            "both sides."
        )
    notes += [
        "Threads: every process runs with OMP_NUM_THREADS=1 (stock: one core per model server, its fair "
        "CPU setting); crosspool gets no --num-threads, so its own default chooses its torch threads; the "
        "OS threads of each process tree and the cores each side used are in the machine tables.",
        "Stock SGLang 0.5.23 ignores Mixtral's `sliding_window` (48 in the tiny model): its Mixtral "
        "attends to the whole context, which costs it a little more attention work.",
        utilisation_note(report),
    ]
    return notes


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--quick", action="store_true", help="2 models, bursty only, short traces, 1 seed, 2 repeats"
    )
    p.add_argument("--variants", help="comma-separated of bursty, longctx (default both; --quick: bursty)")
    p.add_argument(
        "--setups", default=",".join(DEFAULT_SETUPS), help=f"comma-separated of {', '.join(SETUPS)}"
    )
    p.add_argument("--seeds", help="comma-separated trace seeds (default 0,1; --quick: 0)")
    p.add_argument("--repeats", type=int, help="replays of every (seed, setup) (default 3; --quick: 2)")
    p.add_argument("--duration", type=float, help="override every trace's duration (s)")
    p.add_argument("--idle-sample-s", type=float, default=3.0, help="idle CPU check per variant (s)")
    p.add_argument("--startup-timeout", type=float, default=300.0)
    p.add_argument("--out-dir", default=str(DEFAULT_OUT_DIR))
    p.add_argument("--name", help="result file stem (default multi_model, or multi_model_quick)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--rerender", action="store_true", help="rewrite <name>.md and PNGs from the stored files")
    p.add_argument("--no-write", action="store_true")
    p.add_argument("--keep-logs", action="store_true", help="keep server logs (their dir is printed)")
    args = p.parse_args(argv)
    args.setups = [s for s in args.setups.split(",") if s]
    unknown = set(args.setups) - set(SETUPS)
    if unknown:
        p.error(f"unknown setups {sorted(unknown)}")
    args.variants = [
        v for v in (args.variants or ("bursty" if args.quick else "bursty,longctx")).split(",") if v
    ]
    if set(args.variants) - {"bursty", "longctx"}:
        p.error(f"unknown variants {args.variants}")
    args.seeds = [int(x) for x in (args.seeds or ("0" if args.quick else "0,1")).split(",") if x]
    args.repeats = args.repeats or (2 if args.quick else 3)
    args.name = args.name or ("multi_model_quick" if args.quick else "multi_model")
    return args


def path_replacements(work_dir: Path | None) -> list[tuple[str, str]]:
    """This machine's paths that may end up in results, and what stands for them there."""
    from crosspool_sgl.tools.make_tiny_models import default_cache_dir

    prefix = Path(sys.prefix)
    pairs = [
        (str(default_cache_dir()), "<tiny-models>"),
        (tempfile.gettempdir(), "<tmp>"),
        (str(ROOT), "<repo>"),
        (str(ROOT.resolve()), "<repo>"),
        (str(prefix), "<venv>"),
        (str(prefix.resolve()), "<venv>"),
        (str(Path.home()), "~"),
    ]
    if work_dir is not None:
        pairs += [(str(work_dir), "<tmp>"), (str(work_dir.resolve()), "<tmp>")]
    return pairs


def rerender(args: argparse.Namespace) -> int:
    """Tables and plots again from the stored JSON and raw sidecar (e.g. after editing the report code)."""
    out_dir = Path(args.out_dir)
    report = json.loads((out_dir / f"{args.name}.json").read_text())
    for key in ("acceptance", "medians"):
        report.pop(key, None)
    for v in report["variants"].values():  # the representative view is derived again on writing
        v.pop("trace", None)
        v.pop("setups", None)
    raw_path = out_dir / f"{args.name}_raw.json.gz"
    raw = read_raw(raw_path) if raw_path.exists() else None
    report["notes"] = build_notes(report)
    write_report(report, raw, out_dir, args.name)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.rerender:
        return rerender(args)
    started = time.monotonic()
    makers = {"bursty": bursty_variant, "longctx": longctx_variant}
    variants = [makers[k](args.quick) for k in args.variants]
    if args.duration:
        variants = [replace(v, trace=replace(v.trace, duration_s=args.duration)) for v in variants]
    work_dir = Path(tempfile.mkdtemp(prefix="bench_multi_model_"))
    report: dict[str, Any] = {
        "benchmark": "multi_model",
        "name": args.name,
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": shlex.join(["python", "-m", "crosspool_sgl.bench.multi_model", *(argv or sys.argv[1:])]),
        "machine": describe_machine(),
        "config": {"setups": args.setups, "seeds": args.seeds, "repeats": args.repeats},
        "variants": {},
    }
    raw: dict[str, Any] = {"variants": {}}
    try:
        for v in variants:
            report["variants"][v.key], raw["variants"][v.key] = run_variant(v, args, work_dir)
            print(f"== {v.key} done at {time.monotonic() - started:.0f} s", flush=True)
    finally:
        print(f"server logs in {work_dir}" if args.keep_logs else "", flush=True)
    models = prepare_models(variants[0], work_dir / "models")
    report["settings"] = {
        n: settings_description(SETUPS[n], models, variants[0].kv_budget_bytes) for n in args.setups
    }
    report["wall_s"] = round(time.monotonic() - started, 1)
    report["notes"] = build_notes(report)
    replacements = path_replacements(work_dir)
    report, raw = scrub_paths(report, replacements), scrub_paths(raw, replacements)
    print("\n" + render_markdown(report))
    if not args.no_write:
        for path in write_report(report, raw, Path(args.out_dir), args.name):
            print(f"wrote {path}")
    if not args.keep_logs:
        shutil.rmtree(work_dir, ignore_errors=True)
    deps = [d for v in report["variants"].values() for d in v["deployments"].values()]
    runs = [r for v in report["variants"].values() for r in v["runs"]]
    return 0 if all(d["status"] != "failed" for d in deps) and all(r["status"] == "ok" for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
