"""Control overhead: a decode step of 8 models x 1 request against 1 model x 8 requests.

    python benchmarks/control_overhead.py [--quick] [--batch 8] [--new-tokens 48] [--repeats 7]

CrossPool attacks the CPU→device control cost of a step (scheduling, metadata,
launches). Spreading the same 8 requests over 8 models used to run 8 small
forward passes per step, one after the other: M * L FFN calls. The lockstep
forward (crosspool_sgl/models/lockstep.py) walks the models' layers together
with ONE FFN call per layer index, so a step makes as many FFN calls as its
deepest model has layers. This measures both paths on the offline Engine:

- step ms: wall time of `scheduler.step()` on decode steps (median per run); step CPU ms: the
  same step's CPU time of this thread (`time.thread_time`, torch runs 1 thread), which a busy
  shared machine disturbs far less than the wall time;
- compute ms: time inside the forward passes and logits; overhead = the rest
  (policy, page allocation, metadata building, sampling bookkeeping);
- FFN calls per step: calls to `run_ffn` (both bindings: the lockstep module's and
  `DecoderModel.ffn`'s), against the deepest model's layer count and the sum.

The cases run interleaved, `--repeats` times (each case's figures are the median of its
runs; the spread is min-max), with the load average before each repeat. The ratio is given two
ways: of the cases' medians, and paired — per repeat, the two cases of a path run back to back
(order alternating), their ratio, then the median over repeats: this machine's speed drifts by
up to 1.5x between minutes (other tenants of the host), which a ratio of medians taken minutes
apart does not cancel. Writes
benchmarks/results/control_overhead.{md,json} with the command and the machine.
On CPU the "compute" is itself CPU time; on a GPU the same split shows launch overhead.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results"
ARCHS = ("qwen3_moe", "qwen2_moe", "mixtral", "olmoe", "llama", "qwen2", "qwen3", "qwen3_moe")
PATHS = ("lockstep", "per-model")


class Probe:
    """Adds up the time inside the forward passes and logits, and counts run_ffn calls."""

    def __init__(self, runner) -> None:
        from crosspool_sgl.layers import moe
        from crosspool_sgl.models import decoder

        self.compute = 0.0
        self.ffn_calls = 0
        runner._forward_lockstep = self._timed(runner._forward_lockstep)
        for m in runner.models.values():
            m.forward = self._timed(m.forward)
            m.logits = self._timed(m.logits)
        counted = self._counted(moe.run_ffn)
        moe.run_ffn = counted  # what the lockstep forward calls
        decoder.run_ffn = counted  # DecoderModel.ffn's own binding (the per-model path)

    def _timed(self, fn):
        def timed(*a, **k):
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                self.compute += time.perf_counter() - t

        return timed

    def _counted(self, fn):
        def counted(*a, **k):
            self.ffn_calls += 1
            return fn(*a, **k)

        return counted


def build(num_models: int, paths: dict):
    from crosspool_sgl import Engine

    models = {f"m{i}": str(paths[ARCHS[i]]) for i in range(num_models)}
    eng = Engine(models=models, show_progress=False, prefix_cache=False)
    return eng, Probe(eng.scheduler.runner)


def run_case(eng, probe: Probe, lockstep: bool, batch: int, new_tokens: int) -> dict:
    """Decode steps of `batch` requests spread round-robin over the engine's models."""
    sched = eng.scheduler
    sched.runner.lockstep = lockstep
    names = [list(sched.runner.models)[i % len(sched.runner.models)] for i in range(batch)]
    params = {"temperature": 0, "max_new_tokens": new_tokens, "ignore_eos": True}
    eng.generate(input_ids=[[5] * 8] * batch, model=names, sampling_params={**params, "max_new_tokens": 4})
    for i, name in enumerate(names):  # prompts of 16 tokens, then measure decode steps only
        sched.add_request(eng._make_req([3 + i] * 16, False, params, name, False, None, 0))
    steps: list[tuple[float, float, float, int, set[str]]] = []
    while sched.has_work():
        before, calls = probe.compute, probe.ffn_calls
        step_models = {r.model for r in sched.running}
        t, cpu = time.perf_counter(), time.thread_time()
        sched.step()
        wall, cpu = time.perf_counter() - t, time.thread_time() - cpu
        if all(r.num_uncached == 1 or r.finished for r in sched.running) and sched.num_steps > 2:
            steps.append((wall, cpu, probe.compute - before, probe.ffn_calls - calls, step_models))
    layers = {m: sched.runner.models[m].config.num_layers for m in set(names)}
    full = [s for s in steps if s[4] == set(names)]  # steps with every request still running
    return {
        "step_ms": statistics.median(s[0] for s in steps) * 1e3,
        "step_cpu_ms": statistics.median(s[1] for s in steps) * 1e3,
        "compute_ms": statistics.median(s[2] for s in steps) * 1e3,
        "ffn_calls": statistics.median(s[3] for s in full),
        "deepest_layers": max(layers.values()),
        "sum_layers": sum(layers.values()),
        "steps": len(steps),
    }


def summarise(models: int, path: str, batch: int, runs: list[dict]) -> dict:
    step = [r["step_ms"] for r in runs]
    step_ms = statistics.median(step)
    compute_ms = statistics.median(r["compute_ms"] for r in runs)
    return {
        "models": models,
        "batch": batch,
        "path": path,
        "decode_tok_s": batch / step_ms * 1e3,
        "step_ms": step_ms,
        "step_ms_min": min(step),
        "step_ms_max": max(step),
        "step_cpu_ms": statistics.median(r["step_cpu_ms"] for r in runs),
        "compute_ms": compute_ms,
        "overhead_ms": step_ms - compute_ms,
        "ffn_calls_per_step": statistics.median(r["ffn_calls"] for r in runs),
        "deepest_layers": runs[0]["deepest_layers"],
        "sum_layers": runs[0]["sum_layers"],
        "runs": runs,
    }


def ratio(rows: list[dict], path: str, key: str = "step_ms") -> float:
    one = next(r for r in rows if r["models"] == 1 and r["path"] == path)
    many = next(r for r in rows if r["models"] > 1 and r["path"] == path)
    return many[key] / one[key]


def paired_ratios(runs: dict[tuple[int, str], list[dict]], batch: int, path: str) -> list[float]:
    """Per repeat, the many-models case's step time over the one-model case's, measured back to back."""
    return [m["step_ms"] / o["step_ms"] for o, m in zip(runs[(1, path)], runs[(batch, path)], strict=True)]


def _spread(xs: list[float]) -> str:
    return f"x{statistics.median(xs):.2f} (min {min(xs):.2f}, max {max(xs):.2f}, {len(xs)} pairs)"


def render(rows: list[dict], meta: dict) -> str:
    lines = [
        "# Control overhead of a decode step (offline Engine)",
        "",
        f"- date: {meta['date']}",
        f"- command: `{meta['command']}`",
        f"- machine: {meta['machine']}",
        f"- load average (1 min) before each repeat: {', '.join(f'{x:.2f}' for x in meta['load_avg'])}; "
        f"after: {meta['load_avg_end']:.2f}",
        f"- CPU utilisation of each core over the repeats (this run is one torch thread): "
        f"{', '.join(f'{x:.0%}' for x in meta['core_busy'])}",
        "",
        f"Medians over decode steps, then over {meta['repeats']} interleaved repeats (min-max of the step",
        "time across repeats). compute = time inside the forward passes and logits; overhead = the rest",
        "of `scheduler.step()`. FFN calls = `run_ffn` calls per step with every request running.",
        "",
        "| models x requests | path | decode tok/s | step ms (min-max) | step CPU ms | compute ms "
        "| overhead ms | FFN calls/step | deepest model's layers | sum of layers |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['models']} x {r['batch'] // r['models']} | {r['path']} | {r['decode_tok_s']:.0f} | "
            f"{r['step_ms']:.2f} ({r['step_ms_min']:.2f}-{r['step_ms_max']:.2f}) | {r['step_cpu_ms']:.2f} | "
            f"{r['compute_ms']:.2f} | "
            f"{r['overhead_ms']:.2f} | {r['ffn_calls_per_step']:g} | {r['deepest_layers']} | "
            f"{r['sum_layers']} |"
        )
    lines += [
        "",
        f"Step time, 8 models x 1 request / 1 model x 8 requests: lockstep x{ratio(rows, 'lockstep'):.2f}, "
        f"per-model path x{ratio(rows, 'per-model'):.2f} (target <= 2.0 on CPU); in step CPU time: "
        f"lockstep x{ratio(rows, 'lockstep', 'step_cpu_ms'):.2f}, "
        f"per-model path x{ratio(rows, 'per-model', 'step_cpu_ms'):.2f}.",
        "",
        "Paired (median over repeats of the ratio of the two cases run back to back, which a slow",
        f"stretch of the shared machine disturbs less): lockstep {_spread(meta['paired_lockstep'])}, "
        f"per-model path {_spread(meta['paired_per_model'])}.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--new-tokens", type=int, default=48)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--quick", action="store_true", help="fewer tokens, one repeat (smoke test)")
    args = p.parse_args(argv)
    if args.quick:
        args.new_tokens, args.repeats = 12, 1
    import torch

    from crosspool_sgl.bench.monitor import busy_fractions, core_times
    from crosspool_sgl.tools.make_tiny_models import ensure_tiny_models

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    paths = ensure_tiny_models()
    engines = {n: build(n, paths) for n in (1, args.batch)}
    runs: dict[tuple[int, str], list[dict]] = {}
    load_avg = []
    cores_before = core_times()
    for rep in range(args.repeats):
        load_avg.append(os.getloadavg()[0])
        for path in PATHS:
            # the two cases of a path back to back, their order alternating between repeats, so a
            # slow stretch of the machine (another tenant of the host) lands on both of a pair
            order = list(engines.items()) if rep % 2 == 0 else list(engines.items())[::-1]
            for n, (eng, probe) in order:
                case = run_case(eng, probe, path == "lockstep", args.batch, args.new_tokens)
                runs.setdefault((n, path), []).append(case)
    rows = [summarise(n, path, args.batch, runs[(n, path)]) for path in PATHS for n in engines]
    meta = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": f"OMP_NUM_THREADS={torch.get_num_threads()} "
        + shlex.join(["python", "benchmarks/control_overhead.py", *(argv or sys.argv[1:])]),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"torch {torch.__version__}, {torch.get_num_threads()} torch thread(s)",
        "repeats": args.repeats,
        "load_avg": load_avg,
        "load_avg_end": os.getloadavg()[0],
        "core_busy": busy_fractions(cores_before, core_times()),  # per core, over the repeats
        "ratio_lockstep": ratio(rows, "lockstep"),
        "paired_lockstep": paired_ratios(runs, args.batch, "lockstep"),
        "paired_per_model": paired_ratios(runs, args.batch, "per-model"),
        "ratio_per_model": ratio(rows, "per-model"),
        "cpu_ratio_lockstep": ratio(rows, "lockstep", "step_cpu_ms"),
        "cpu_ratio_per_model": ratio(rows, "per-model", "step_cpu_ms"),
    }
    text = render(rows, meta)
    print(text)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "control_overhead.md").write_text(text)
    (OUT / "control_overhead.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    for eng, _ in engines.values():
        eng.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
