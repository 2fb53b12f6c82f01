"""A MODEL, not a measurement: discrete-event projection of stock per-model servers, static KV
partitions, a shared KV pool and attention/FFN disaggregation onto 8 GPUs serving 20 MoE models.

    python benchmarks/simulate.py [--quick] [--duration 120] [--rate 20]

1. Calibration check: the CPU benchmark's bursty trace (`results/multi_model.json`) is replayed in
   the simulator with CPU step costs fitted to `results/decode_throughput.json` (stock and ours,
   separately), and the simulated latencies are printed next to the measured ones. Nothing is fitted
   to the trace replay itself, so the gap is the model's error on this machine.
2. Projection: the same policies with GPU cost models (bandwidth-bound decode, FLOP-bound prefill,
   NVLink/PCIe transfers; `crosspool_sgl/bench/sim_costs.py`) on an 8 x H100 cluster.
Writes `results/simulate.{md,json}`.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from crosspool_sgl.bench import sim_scenarios as sc  # noqa: E402
from crosspool_sgl.bench.sim_costs import CpuCost, fit_cpu_cost  # noqa: E402
from crosspool_sgl.bench.simulate import sim_summary, simulate  # noqa: E402
from crosspool_sgl.bench.trace import generate_trace  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
KEYS = ("ttft_p50_ms", "ttft_p99_ms", "tbt_p50_ms", "tbt_p99_ms", "tbt_p999_ms")


def _f(x: Any, spec: str = ".1f") -> str:
    return "—" if x is None else format(x, spec)


def calibrate(bench_path: Path, micro_path: Path, variant_key: str = "bursty") -> dict[str, Any]:
    """Simulated vs measured, per setup of the CPU run: with the micro-benchmark's step costs as they
    are, and scaled by one factor per setup fitted to the measured TBT P50 (the serving path and the
    other tenants of this machine, which the offline micro-benchmark does not see)."""
    bench, micro = json.loads(bench_path.read_text()), json.loads(micro_path.read_text())
    prompt_len = micro["workload"]["prompt_len"]
    costs = {
        side: fit_cpu_cost([r for r in micro["rows"] if r["setup"] == side], prompt_len)
        for side in ("stock", "ours")
    }
    variant = bench["variants"][variant_key]
    cfg = sc.trace_config_from_json(variant["trace"]["config"])
    trace = generate_trace(cfg)
    bpt = sc.cpu_bytes_per_token(variant)
    out = {"costs": {k: vars(v) for k, v in costs.items()}, "source": str(bench_path.name), "setups": {}}

    def run(name: str, scale: float) -> dict[str, Any]:
        scaled = {k: CpuCost(c.a * scale, c.b_dec * scale, c.b_pre * scale) for k, c in costs.items()}
        devices = sc.cpu_setups(variant, scaled["stock"], scaled["ours"])[name]
        return sim_summary(simulate(trace, devices, bpt, cfg.duration_s + 60), cfg.duration_s)

    for name in sc.cpu_setups(variant, costs["stock"], costs["ours"]):
        measured = variant["setups"].get(name, {})
        if measured.get("status") != "ok":
            continue
        m = dict(measured["summary"]["overall"], preempted=measured["preempted"])
        raw = fitted = run(name, 1.0)
        scale = 1.0
        for _ in range(4):  # fixed point: queueing makes TBT P50 grow faster than linearly in the scale
            if not fitted["tbt_p50_ms"] or not m["tbt_p50_ms"]:
                break
            scale *= m["tbt_p50_ms"] / fitted["tbt_p50_ms"]
            fitted = run(name, scale)
        out["setups"][name] = {"measured": m, "simulated": raw, "simulated_fitted": fitted, "scale": scale}
    return out


def project(duration_s: float, rate: float, seed: int) -> dict[str, Any]:
    fleet = sc.default_fleet()
    cfg = sc.gpu_trace_config(fleet, duration_s, rate, seed)
    trace = generate_trace(cfg)
    bpt = {n: m.kv_bytes_per_token for n, m in fleet.models.items()}
    setups, unavailable = sc.gpu_setups(fleet)
    result: dict[str, Any] = {
        "fleet": {
            "gpu": fleet.gpu.name,
            "num_gpus": fleet.num_gpus,
            "models": {n: m.name for n, m in fleet.models.items()},
            "weights_gb": sum(m.weight_bytes for m in fleet.models.values()) / 1e9,
        },
        "trace": {"requests": len(trace), "duration_s": duration_s, "rate": rate, "seed": seed},
        "kv_budget_gb": {k: v / 1e9 for k, v in sc.kv_budgets(setups).items()},
        "stock_placement": sc.place_models(fleet),
        "unavailable": unavailable,
        "setups": {},
    }
    for name, devices in setups.items():
        start = time.monotonic()
        reqs = simulate(trace, devices, bpt, duration_s + 300)
        result["setups"][name] = sim_summary(reqs, duration_s)
        print(f"simulated {name}: {len(trace)} requests in {time.monotonic() - start:.1f} s", flush=True)
    return result


def calibration_lines(cal: dict[str, Any]) -> list[str]:
    lines = [
        "| setup | source | done | rejected | preempted | " + " | ".join(KEYS) + " |",
        "|---|---|---:|---:|---:|" + "---:|" * len(KEYS),
    ]
    for name, s in cal["setups"].items():
        sources = (
            ("measured", "measured"),
            ("simulated", "model, micro-benchmark costs"),
            ("simulated_fitted", f"model, costs x {s['scale']:.1f} (fitted to TBT P50)"),
        )
        for key, label in sources:
            v = s[key]
            lines.append(
                f"| {name} | {label} | {v['completed']} | {v['rejected']} | {v['preempted']} | "
                + " | ".join(_f(v[k]) for k in KEYS)
                + " |"
            )
    return lines


def projection_lines(proj: dict[str, Any]) -> list[str]:
    ref = proj["setups"].get("crosspool-shared", {})
    lines = [
        "| setup | KV GB | done/total | rejected | preempted | "
        + " | ".join(KEYS)
        + " | out tok/s | TTFT P99 ratio | TBT P99 ratio |",
        "|---|" + "---:|" * (len(KEYS) + 8),
    ]
    for name, v in proj["setups"].items():
        r_ttft = (
            v["ttft_p99_ms"] / ref["ttft_p99_ms"] if ref.get("ttft_p99_ms") and v["ttft_p99_ms"] else None
        )
        r_tbt = v["tbt_p99_ms"] / ref["tbt_p99_ms"] if ref.get("tbt_p99_ms") and v["tbt_p99_ms"] else None
        lines.append(
            f"| {name} | {proj['kv_budget_gb'][name]:.0f} | {v['completed']}/{v['requests']} | "
            f"{v['rejected']} | {v['preempted']} | "
            + " | ".join(_f(v[k]) for k in KEYS)
            + f" | {_f(v['output_tok_s'], '.0f')} | {_f(r_ttft, '.2f')} | {_f(r_tbt, '.2f')} |"
        )
    for name, why in proj["unavailable"].items():
        lines.append(f"| {name} | not modelled: {why} |" + " |" * (len(KEYS) + 7))
    return lines


def render(report: dict[str, Any]) -> str:
    cal, proj = report.get("calibration"), report["projection"]
    lines = [
        "# Simulated projection (A MODEL, NOT A MEASUREMENT)",
        "",
        f"- date: {report['date']}",
        f"- command: `{report['command']}`",
        "",
        "A discrete-event model of the scheduling policies (`crosspool_sgl/bench/simulate.py`) with "
        "cost models (`crosspool_sgl/bench/sim_costs.py`). Latencies in ms; ratios are baseline / "
        "crosspool-shared.",
        "",
    ]
    if cal:
        c = cal["costs"]
        lines += [
            "## Calibration on the CPU run",
            "",
            f"CPU step costs fitted to `decode_throughput.json` (s): stock a={c['stock']['a']:.4f} "
            f"b_dec={c['stock']['b_dec']:.5f} b_pre={c['stock']['b_pre']:.6f}; ours a={c['ours']['a']:.4f} "
            f"b_dec={c['ours']['b_dec']:.5f} b_pre={c['ours']['b_pre']:.6f}. Replayed: the bursty trace of "
            f"`{cal['source']}`.",
            "",
            *calibration_lines(cal),
            "",
        ]
    f = proj["fleet"]
    lines += [
        "## Projection: 8 GPUs, 20 models",
        "",
        f"- {f['num_gpus']} x {f['gpu']}; {len(f['models'])} models ({f['weights_gb']:.0f} GB of bf16 "
        f"weights): " + ", ".join(sorted({v for v in f["models"].values()})),
        f"- trace: {proj['trace']['requests']} requests over {proj['trace']['duration_s']:.0f} s "
        f"(mean {proj['trace']['rate']} req/s, on/off Gamma bursts, Zipf popularity, 6 bursts of 4 "
        "16k-32k-token prompts)",
        f"- stock placement (GPU -> models): {proj['stock_placement']}",
        "",
        *projection_lines(proj),
        "",
    ]
    lines += [
        "## What the model leaves out",
        "",
        "- One crosspool engine spans all 8 GPUs (expert-parallel weights, one KV pool); its steps "
        "serialise every model's work, while stock's 8 GPUs step independently.",
        "- Stock servers sharing a GPU are serialised step by step (time-slicing), no MPS overlap.",
        "- No prefix caching, no speculative decoding, no CPU offload of cold experts; the same "
        "retract-youngest policy on every setup (stock SGLang's own policy differs in details).",
        "- GPU constants are datasheet peaks times fixed efficiencies (70 % HBM, 50 % FLOPs).",
        "- The calibration table is the model's error on measured data: where they disagree, trust the "
        "measurement. The real scheduler's preemption storms (results/multi_model.md) are not reproduced, "
        "so projected tails are optimistic for every setup, crosspool-shared most.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="30 s projection trace")
    p.add_argument("--duration", type=float, default=None, help="projection trace seconds (default 120)")
    p.add_argument("--rate", type=float, default=20.0, help="projection mean requests/s over all models")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--bench", default=str(RESULTS / "multi_model.json"), help="CPU run to calibrate against")
    p.add_argument("--micro", default=str(RESULTS / "decode_throughput.json"))
    p.add_argument("--out-dir", default=str(RESULTS))
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args(argv)
    duration = args.duration or (30.0 if args.quick else 120.0)
    report: dict[str, Any] = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": shlex.join(["python", "benchmarks/simulate.py", *(argv or sys.argv[1:])]),
    }
    if Path(args.bench).exists() and Path(args.micro).exists():
        report["calibration"] = calibrate(Path(args.bench), Path(args.micro))
    else:
        print(f"no calibration: {args.bench} or {args.micro} missing", flush=True)
    report["projection"] = project(duration, args.rate, args.seed)
    md = render(report)
    print("\n" + md)
    if not args.no_write:
        out = Path(args.out_dir)
        name = "simulate_quick" if args.quick else "simulate"
        (out / f"{name}.md").write_text(md)
        (out / f"{name}.json").write_text(json.dumps(report, indent=1) + "\n")
        print(f"wrote {out / name}.md and .json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
