"""Layer-wise pipeline overlap: step time with 1 vs 2+ micro-batches (attention here, FFN on a worker).

    OMP_NUM_THREADS=1 python benchmarks/pipeline_overlap.py [--micro-batches 1 2 4] [--out benchmarks/results]

Builds a disaggregated runtime (one FFN worker over gloo on CPU) hosting several tiny models,
runs one prefill step and N decode steps of the same batch per setting, and reads each step's
pipeline trace (per layer: attention, send, FFN, receive, idle). Writes pipeline_overlap.md/.json.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import time
from pathlib import Path

from crosspool_sgl.core.req import Req
from crosspool_sgl.runtime import build_runtime
from crosspool_sgl.sampling_params import SamplingParams
from crosspool_sgl.server_args import DisaggArgs, EngineArgs, KVPoolArgs, ModelSpec
from crosspool_sgl.tools.make_tiny_models import ensure_tiny_models

KEYS = (
    "step_s",
    "layers_s",
    "attn_s",
    "send_s",
    "xfer_in_s",
    "ffn_s",
    "recv_s",
    "idle_s",
    "parts_s",
    "overlap_s",
)


def run_setting(paths: dict, models: list[str], micro_batches: int, ffn_workers: int, args) -> dict:
    eng = EngineArgs(
        models=tuple(ModelSpec(n, str(paths[n])) for n in models),
        kv_pool=KVPoolArgs(total_bytes=128 << 20),
        show_progress=False,
        disagg=DisaggArgs(ffn_workers=ffn_workers, micro_batches=micro_batches, ffn_num_threads=1),
    )
    rt = build_runtime(eng)
    sched, runner = rt.scheduler, rt.scheduler.runner
    params = {"temperature": 0, "max_new_tokens": args.decode_steps + 1, "ignore_eos": True}
    per_phase: dict[str, list[dict]] = {"prefill": [], "decode": []}
    example = ""
    try:
        for rep in range(args.repeats):
            for m in models:
                for i in range(args.batch):
                    ids = [(7 * i + j) % 400 + 3 for j in range(args.prompt_len)]
                    sched.add_request(Req(f"{m}-{rep}-{i}", m, ids, SamplingParams.from_dict(params)))
            step = 0
            while sched.has_work():
                sched.step()
                if runner.last_trace is not None and runner.last_trace.calls:
                    per_phase["prefill" if step == 0 else "decode"].append(runner.last_trace.summary())
                    if step == 1 and rep == args.repeats - 1:
                        example = runner.last_trace.format()
                step += 1
    finally:
        runner.ffn.close()
    out = {"micro_batches": micro_batches, "example_decode_trace": example}
    for phase, rows in per_phase.items():
        out[phase] = {k: statistics.median(r[k] for r in rows) for k in KEYS}
        out[phase]["num_steps"] = len(rows)
    return out


def to_markdown(results: list[dict], command: str, setup: str) -> str:
    lines = [
        "# Layer-wise pipeline overlap (attention here, FFN on a worker process)",
        "",
        f"Command: `{command}`",
        "",
        setup,
        "",
        "Medians over steps, in ms. `parts` = attention + posting sends + inbound transfer + FFN + receive:",
        "what the layers would take if nothing overlapped. `overlap` = parts - layers (time hidden).",
        "",
    ]
    for phase in ("prefill", "decode"):
        lines += [
            f"## {phase}",
            "",
            "| micro-batches | step | layers | attn | send | FFN | recv | idle | sum of parts | overlap |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in results:
            p = r[phase]
            ms = {k: 1e3 * p[k] for k in KEYS}
            lines.append(
                f"| {r['micro_batches']} | {ms['step_s']:.2f} | {ms['layers_s']:.2f} | {ms['attn_s']:.2f} | "
                f"{ms['send_s']:.2f} | {ms['ffn_s']:.2f} | {ms['recv_s']:.2f} | {ms['idle_s']:.2f} | "
                f"{ms['parts_s']:.2f} | {ms['overlap_s']:.2f} |"
            )
        lines.append("")
    lines += [
        "## One decode step's trace (last setting)",
        "",
        "```",
        results[-1]["example_decode_trace"],
        "```",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["qwen3_moe", "mixtral", "llama"])
    p.add_argument("--micro-batches", nargs="+", type=int, default=[1, 2, 4])
    p.add_argument("--ffn-workers", type=int, default=1)
    p.add_argument("--batch", type=int, default=16, help="requests per model")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--decode-steps", type=int, default=16)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = p.parse_args(argv)
    paths = ensure_tiny_models()
    results = []
    for mb in args.micro_batches:
        t = time.monotonic()
        results.append(run_setting(paths, args.models, mb, args.ffn_workers, args))
        d = results[-1]["decode"]
        print(
            f"micro-batches {mb}: decode step {1e3 * d['step_s']:.2f} ms, parts {1e3 * d['parts_s']:.2f} ms, "
            f"overlap {1e3 * d['overlap_s']:.2f} ms ({time.monotonic() - t:.0f}s)",
            flush=True,
        )
    print(results[-1]["example_decode_trace"])
    setup = (
        f"Setup: models {', '.join(args.models)} (tiny, fp32), {args.batch} requests per model, prompt "
        f"{args.prompt_len} tokens, {args.decode_steps} decode steps, {args.repeats} repeats; "
        f"{args.ffn_workers} FFN worker(s) over gloo on CPU, 1 torch thread per process."
    )
    command = "OMP_NUM_THREADS=1 python " + " ".join(
        shlex.quote(a) for a in [sys.argv[0], *(argv or sys.argv[1:])]
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "pipeline_overlap.md").write_text(to_markdown(results, command, setup))
    (out / "pipeline_overlap.json").write_text(json.dumps({"command": command, "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
