"""Control overhead: per decode step, CPU time spent outside the model's math, for 1 and 8 models.

    python benchmarks/control_overhead.py [--quick] [--batch 8] [--new-tokens 48]

CrossPool attacks the CPU→device control cost of a step (scheduling, metadata,
launches). This measures it on our offline Engine: for each step, the wall time
of `scheduler.step()` is split into the time inside the models' forward passes
and logits (the "compute") and everything else (policy, page allocation,
metadata building, sampling bookkeeping: the "control overhead"). With 8 models
the same number of requests is spread over 8 models, so each step runs 8 small
forward passes instead of one larger one — the multi-model cost we pay per step.

Writes benchmarks/results/control_overhead.{md,json} with the command and the machine.
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


class ComputeTimer:
    """Wraps each DecoderModel's forward and logits to add up the time spent inside them."""

    def __init__(self, models) -> None:
        self.total = 0.0
        for m in models.values():
            m.forward = self._wrap(m.forward)
            m.logits = self._wrap(m.logits)

    def _wrap(self, fn):
        def timed(*a, **k):
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                self.total += time.perf_counter() - t

        return timed


def run_case(num_models: int, batch: int, new_tokens: int, paths: dict) -> dict:
    from crosspool_sgl import Engine

    models = {f"m{i}": str(paths[ARCHS[i]]) for i in range(num_models)}
    eng = Engine(models=models, show_progress=False, prefix_cache=False)
    timer = ComputeTimer(eng.runtime.models)
    names = [f"m{i % num_models}" for i in range(batch)]
    params = {"temperature": 0, "max_new_tokens": new_tokens, "ignore_eos": True}
    eng.generate(input_ids=[[5] * 8] * batch, model=names, sampling_params={**params, "max_new_tokens": 4})
    sched = eng.scheduler
    for i, name in enumerate(names):  # prompts of 16 tokens, then measure decode steps only
        eng.scheduler.add_request(eng._make_req([3 + i] * 16, False, params, name, False, None, 0))
    steps: list[tuple[float, float]] = []
    while sched.has_work():
        before = timer.total
        t = time.perf_counter()
        sched.step()
        wall = time.perf_counter() - t
        if all(r.num_uncached == 1 or r.finished for r in sched.running) and sched.num_steps > 2:
            steps.append((wall, timer.total - before))
    walls = [w for w, _ in steps]
    computes = [c for _, c in steps]
    step_ms = statistics.median(walls) * 1e3
    compute_ms = statistics.median(computes) * 1e3
    return {
        "models": num_models,
        "batch": batch,
        "steps": len(steps),
        "decode_tok_s": batch / statistics.median(walls),
        "step_ms": step_ms,
        "compute_ms": compute_ms,
        "overhead_ms": step_ms - compute_ms,
        "overhead_share": (step_ms - compute_ms) / step_ms,
    }


def render(rows: list[dict], meta: dict) -> str:
    lines = [
        "# Control overhead of a decode step (offline Engine)",
        "",
        f"- date: {meta['date']}",
        f"- command: `{meta['command']}`",
        f"- machine: {meta['machine']}",
        "",
        "Medians over decode steps. compute = time inside the models' forward passes and logits;",
        "overhead = the rest of `scheduler.step()` (policy, pages, metadata, sampling bookkeeping).",
        "",
        "| models | batch | decode tok/s | step ms | compute ms | overhead ms | overhead share |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['models']} | {r['batch']} | {r['decode_tok_s']:.0f} | {r['step_ms']:.2f} | "
            f"{r['compute_ms']:.2f} | {r['overhead_ms']:.2f} | {r['overhead_share']:.0%} |"
        )
    if len(rows) >= 2:
        a, b = rows[0], rows[-1]
        lines += [
            "",
            f"8 models / 1 model: step time x{b['step_ms'] / a['step_ms']:.2f}, "
            f"overhead x{b['overhead_ms'] / max(a['overhead_ms'], 1e-9):.2f}.",
        ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--new-tokens", type=int, default=48)
    p.add_argument("--quick", action="store_true", help="fewer tokens (smoke test)")
    args = p.parse_args(argv)
    if args.quick:
        args.new_tokens = 12
    import torch

    from crosspool_sgl.tools.make_tiny_models import ensure_tiny_models

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    paths = ensure_tiny_models()
    rows = [run_case(n, args.batch, args.new_tokens, paths) for n in (1, 8)]
    meta = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": f"OMP_NUM_THREADS={torch.get_num_threads()} "
        + shlex.join(["python", "benchmarks/control_overhead.py", *(argv or sys.argv[1:])]),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"torch {torch.__version__}, {torch.get_num_threads()} torch thread(s), "
        f"load average {os.getloadavg()[0]:.1f}",
    }
    text = render(rows, meta)
    print(text)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "control_overhead.md").write_text(text)
    (OUT / "control_overhead.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
