"""Decode micro-benchmark: our offline Engine vs stock ``sglang.Engine`` on the same tiny model.

    python benchmarks/decode_throughput.py [--quick] [--batch-sizes 1,8] [--new-tokens 64] [--model qwen3_moe]

Both engines get the same greedy, ``ignore_eos`` workload (the same prompt token ids, fp32 weights,
the same OMP_NUM_THREADS), each in its own subprocess so their memory and thread pools stay apart.
The parent starts them one after the other, then alternates their timed calls (ABBA), so background
load that drifts during a run (this machine is shared) hits both sides alike; only one side works at
a time. Per batch size and repeat a side runs two calls on fresh prompts (never repeated, so a prefix
cache helps neither side): ``max_new_tokens=1`` times prefill, ``max_new_tokens=N`` the whole request.
Decode tok/s = B*(N-1) / (t_full - t_prefill); e2e tok/s = B*N / t_full (medians over repeats).

Results go to ``benchmarks/results/decode_throughput.{md,json}`` with the command line, the date and
the machine. The stock side needs ``patches/stubs`` (a raising ``sgl_kernel`` stub) on its PYTHONPATH;
only its subprocess gets it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import select
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
STUBS_DIR = ROOT / "patches" / "stubs"
DEFAULT_OUT_DIR = ROOT / "benchmarks" / "results"
RESULT_NAME = "decode_throughput"
SIDES = ("stock", "ours")

# SGLANG_USE_CPU_ENGINE=1 is what makes sglang's is_cpu() true; without it sglang imports vllm.
STOCK_ENV = {"SGLANG_USE_CPU_ENGINE": "1"}
# The fewest stock settings that ran well here. dtype: "auto" loads the fp32 checkpoint as fp16,
# and ours runs fp32. max_total_tokens: without it the KV pool is sized from RAM and startup took
# 70-100 s instead of ~20 s. sleep_on_idle: an idle stock scheduler otherwise spins a core, which
# would slow our side while both are up. CUDA graphs turn off by themselves with torch_native.
STOCK_ENGINE_KWARGS: dict[str, Any] = {
    "device": "cpu",
    "attention_backend": "torch_native",
    "dtype": "float32",
    "sleep_on_idle": True,
    "log_level": "warning",
}
OURS_ENGINE_KWARGS: dict[str, Any] = {"device": "cpu", "dtype": "float32", "show_progress": False}

GenerateFn = Callable[[list[list[int]], int], list[dict]]


@dataclass(frozen=True)
class Workload:
    """Everything both subprocesses must agree on; written to a JSON file they both read."""

    model: str
    model_path: str
    batch_sizes: tuple[int, ...]
    prompt_len: int
    new_tokens: int
    repeats: int
    threads: int
    max_total_tokens: int
    prompts: dict[str, list[list[int]]] = field(repr=False)

    @classmethod
    def load(cls, path: Path) -> Workload:
        data = json.loads(path.read_text())
        data["batch_sizes"] = tuple(data["batch_sizes"])
        return cls(**data)


# ---------------------------------------------------------------------------------- workload


def make_prompts(
    vocab_size: int, batch_sizes: tuple[int, ...], prompt_len: int, repeats: int, seed: int = 0
) -> dict[str, list[list[int]]]:
    """Fresh random token ids for every call, so no call can reuse another's prefix.

    Ids below 16 are skipped: the tiny tokenizers put their special tokens there.
    """
    rng = random.Random(seed)
    keys = [f"warmup/{b}" for b in batch_sizes]
    keys += [f"{b}/{r}/{kind}" for b in batch_sizes for r in range(repeats) for kind in ("prefill", "full")]
    prompts = {}
    for key in keys:
        batch = int(key.split("/")[1] if key.startswith("warmup") else key.split("/")[0])
        prompts[key] = [[rng.randrange(16, vocab_size) for _ in range(prompt_len)] for _ in range(batch)]
    return prompts


def resolve_model_path(args: argparse.Namespace) -> Path:
    """The benchmarked checkpoint: `--model-path` if given, else the project's tiny model of that name."""
    if args.model_path:
        return Path(args.model_path)
    from crosspool_sgl.tools.make_tiny_models import ensure_tiny_models

    return ensure_tiny_models(names=[args.model])[args.model]


def build_workload(args: argparse.Namespace) -> Workload:
    model_path = resolve_model_path(args)
    vocab_size = json.loads((model_path / "config.json").read_text())["vocab_size"]
    batch_sizes = tuple(int(b) for b in args.batch_sizes.split(","))
    # Room for every sequence of the largest batch at full length, so stock never retracts.
    need = max(batch_sizes) * (args.prompt_len + args.new_tokens)
    return Workload(
        model=args.model,
        model_path=str(model_path),
        batch_sizes=batch_sizes,
        prompt_len=args.prompt_len,
        new_tokens=args.new_tokens,
        repeats=args.repeats,
        threads=args.threads,
        max_total_tokens=max(4096, -(-2 * need // 1024) * 1024),
        prompts=make_prompts(vocab_size, batch_sizes, args.prompt_len, args.repeats),
    )


# ---------------------------------------------------------------------------------- worker side


def _sampling(max_new_tokens: int) -> dict[str, Any]:
    return {"max_new_tokens": max_new_tokens, "temperature": 0, "ignore_eos": True}


def open_stock(spec: Workload) -> tuple[GenerateFn, Callable[[], None], dict[str, Any]]:
    """Start stock ``sglang.Engine`` (scheduler and detokenizer in child processes, as sglang does)."""
    import sgl_kernel  # the raising stub from patches/stubs; fail here, not deep inside sglang
    import sglang

    kwargs = {**STOCK_ENGINE_KWARGS, "max_total_tokens": spec.max_total_tokens}
    engine = sglang.Engine(model_path=spec.model_path, **kwargs)

    def generate(ids: list[list[int]], n: int) -> list[dict]:
        return engine.generate(input_ids=ids, sampling_params=_sampling(n))

    info = {"engine_kwargs": kwargs, "env": STOCK_ENV, "sgl_kernel": sgl_kernel.__file__}
    return generate, engine.shutdown, info


def open_ours(spec: Workload) -> tuple[GenerateFn, Callable[[], None], dict[str, Any]]:
    """Start our Engine in this process (its scheduler runs in-process by design)."""
    import importlib.util

    from crosspool_sgl import Engine

    # A big batch must run as one batch, as it does on the stock side (max_running_requests 2048).
    kwargs = {**OURS_ENGINE_KWARGS, "max_running_requests": max(64, *spec.batch_sizes)}
    engine = Engine(models={spec.model: spec.model_path}, **kwargs)

    def generate(ids: list[list[int]], n: int) -> list[dict]:
        return engine.generate(input_ids=ids, sampling_params=_sampling(n), model=spec.model)

    info = {"engine_kwargs": kwargs, "sgl_kernel_on_path": importlib.util.find_spec("sgl_kernel") is not None}
    return generate, engine.shutdown, info


def _timed(generate: GenerateFn, ids: list[list[int]], n: int) -> tuple[float, list[dict]]:
    start = time.perf_counter()
    out = generate(ids, n)
    return time.perf_counter() - start, out


def handle_command(generate: GenerateFn, spec: Workload, cmd: dict[str, Any]) -> dict[str, Any]:
    """One step the parent asked for: warm every batch size up, or time one (batch, repeat)."""
    if cmd["cmd"] == "warmup":
        for b in spec.batch_sizes:
            generate(spec.prompts[f"warmup/{b}"], min(16, spec.new_tokens))
        return {}
    b, r = cmd["batch"], cmd["repeat"]
    prefill_s = _timed(generate, spec.prompts[f"{b}/{r}/prefill"], 1)[0]
    full_s, out = _timed(generate, spec.prompts[f"{b}/{r}/full"], spec.new_tokens)
    lengths = {o["meta_info"]["completion_tokens"] for o in out}
    if lengths != {spec.new_tokens} or len(out) != b:
        raise RuntimeError(f"batch {b}: want {b} x {spec.new_tokens} tokens, got lengths {lengths}")
    return {"prefill_s": prefill_s, "full_s": full_s, "output_ids": [o["output_ids"] for o in out]}


def _failure(side: str, exc: BaseException) -> dict[str, Any]:
    status = "unavailable" if side == "ours" and isinstance(exc, ImportError) else "failed"
    return {"status": status, "reason": repr(exc), "traceback": traceback.format_exc()[-4000:]}


def serve_worker(side: str, spec_path: Path, reply_fd: int) -> int:
    """Subprocess entry: start one engine, then run the parent's commands (JSON lines on stdin).

    Replies go to a pipe of their own, since SGLang and its children print to stdout/stderr.
    """
    start = time.perf_counter()
    replies = os.fdopen(reply_fd, "w", buffering=1)
    spec = Workload.load(spec_path)
    try:
        import torch

        generate, shutdown, info = (open_stock if side == "stock" else open_ours)(spec)
    except Exception as exc:  # noqa: BLE001 - reported in the table, not raised
        replies.write(json.dumps(_failure(side, exc)) + "\n")
        return 1
    ready = {
        "status": "ok",
        "startup_s": time.perf_counter() - start,
        "info": info,
        "torch_threads": torch.get_num_threads(),
    }
    replies.write(json.dumps(ready) + "\n")
    try:
        for line in sys.stdin:
            cmd = json.loads(line)
            if cmd["cmd"] == "stop":
                break
            try:
                reply = {"status": "ok", **handle_command(generate, spec, cmd)}
            except Exception as exc:  # noqa: BLE001
                reply = _failure(side, exc)
            replies.write(json.dumps(reply) + "\n")
    finally:
        shutdown()
    return 0


# ---------------------------------------------------------------------------------- parent side


def side_env(side: str, threads: int) -> dict[str, str]:
    """Same threads on both sides; the sgl_kernel stub and SGLANG_USE_CPU_ENGINE on stock's only."""
    env = dict(os.environ)
    paths = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and Path(p).resolve() != STUBS_DIR]
    env.update(OMP_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false")
    if side == "stock":
        env.update(STOCK_ENV)
        paths.insert(0, str(STUBS_DIR))
    else:
        env.pop("SGLANG_USE_CPU_ENGINE", None)
    env["PYTHONPATH"] = os.pathsep.join(paths)
    return env


class WorkerProcess:
    """One side's subprocess, driven by request/reply JSON lines; its output goes to a log file."""

    def __init__(self, side: str, spec_path: Path, work_dir: Path, threads: int) -> None:
        self.side, self.log_path = side, work_dir / f"{side}.log"
        read_fd, write_fd = os.pipe()
        cmd = [
            sys.executable,
            str(Path(__file__).resolve()),
            "--worker",
            side,
            "--spec",
            str(spec_path),
            "--reply-fd",
            str(write_fd),
        ]
        with self.log_path.open("w") as log:
            # Own session: a hung worker is killed with the SGLang children it started.
            self.proc = subprocess.Popen(
                cmd,
                stdin=subprocess.PIPE,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=side_env(side, threads),
                cwd=ROOT,
                pass_fds=(write_fd,),
                text=True,
                start_new_session=True,
            )
        os.close(write_fd)
        self.replies = os.fdopen(read_fd)

    def receive(self, timeout_s: float) -> dict[str, Any]:
        """The next reply; a dead or silent worker becomes a failure reply, never an exception."""
        if not select.select([self.replies], [], [], timeout_s)[0]:
            return {"status": "failed", "reason": f"no reply within {timeout_s:.0f} s"}
        line = self.replies.readline()
        if not line:
            return {"status": "failed", "reason": f"worker exited (rc={self.proc.wait()})"}
        return json.loads(line)

    def call(self, cmd: dict[str, Any], timeout_s: float) -> dict[str, Any]:
        try:
            self.proc.stdin.write(json.dumps(cmd) + "\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            return {"status": "failed", "reason": f"worker exited (rc={self.proc.wait()})"}
        return self.receive(timeout_s)

    def close(self, timeout_s: float = 60) -> None:
        """Ask for a clean shutdown (SGLang reaps its children); kill the session if that hangs."""
        try:
            self.proc.stdin.write(json.dumps({"cmd": "stop"}) + "\n")
            self.proc.stdin.close()
            self.proc.wait(timeout_s)
        except (BrokenPipeError, subprocess.TimeoutExpired):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self.replies.close()


def start_workers(
    spec_path: Path, work_dir: Path, threads: int, timeout_s: float
) -> tuple[dict[str, WorkerProcess], dict[str, dict[str, Any]]]:
    """Start the sides one after the other, so neither startup slows the other's."""
    workers, results = {}, {}
    for side in SIDES:
        print(f"[{side}] starting (log: {work_dir / side}.log) ...", flush=True)
        worker = WorkerProcess(side, spec_path, work_dir, threads)
        results[side] = {"side": side, **worker.receive(timeout_s)}
        if results[side]["status"] == "ok":
            workers[side] = worker
            print(f"[{side}] ready in {results[side]['startup_s']:.1f} s", flush=True)
        else:
            print(f"[{side}] {results[side]['status']}: {results[side]['reason']}", flush=True)
            worker.close(timeout_s=5)  # it may still be starting and never read its stdin
    return workers, results


def measure_interleaved(
    spec: Workload, workers: dict[str, WorkerProcess], results: dict[str, dict[str, Any]], timeout_s: float
) -> None:
    """Warm up, then alternate the sides call by call (ABBA order), so drifting background load on a
    shared machine hits both alike. Only one side works at a time; the idle one sleeps."""
    for side, worker in list(workers.items()):
        reply = worker.call({"cmd": "warmup"}, timeout_s)
        if reply["status"] != "ok":
            results[side].update(reply)
            workers.pop(side).close()
    for side in SIDES:
        results[side]["rows"] = (
            [{"batch": b, "prefill_s": [], "full_s": [], "output_ids": None} for b in spec.batch_sizes]
            if side in workers
            else []
        )
        results[side]["loadavg_before"] = os.getloadavg() if side in workers else None
    for r in range(spec.repeats):
        for i, b in enumerate(spec.batch_sizes):
            for side in SIDES if (r + i) % 2 == 0 else SIDES[::-1]:
                if side not in workers:
                    continue
                reply = workers[side].call({"cmd": "measure", "batch": b, "repeat": r}, timeout_s)
                if reply["status"] != "ok":
                    results[side].update(reply, rows=[])
                    workers.pop(side).close()
                    continue
                row = results[side]["rows"][i]
                row["prefill_s"].append(reply["prefill_s"])
                row["full_s"].append(reply["full_s"])
                row["output_ids"] = row["output_ids"] or reply["output_ids"]
    for side in workers:
        results[side]["loadavg_after"] = os.getloadavg()


def summarize(batch: int, spec: Workload, raw: dict[str, Any]) -> dict[str, float | None]:
    """Medians over repeats, then tok/s; decode excludes prefill and the first token it yields."""
    prefill, full = statistics.median(raw["prefill_s"]), statistics.median(raw["full_s"])
    decode_s = full - prefill
    ok = decode_s > 0 and spec.new_tokens > 1
    return {
        "prefill_ms": prefill * 1e3,
        "decode_ms_per_step": decode_s / (spec.new_tokens - 1) * 1e3 if ok else None,
        "decode_tok_s": batch * (spec.new_tokens - 1) / decode_s if ok else None,
        "e2e_tok_s": batch * spec.new_tokens / full,
    }


def _ratio(ours: float | None, stock: float | None) -> float | None:
    return ours / stock if ours and stock else None


def build_rows(spec: Workload, results: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (setup, batch); ours' rows carry the ours/stock ratios."""
    by_batch = {side: {r["batch"]: r for r in results[side].get("rows", [])} for side in SIDES}
    rows = []
    for b in spec.batch_sizes:
        stats = {s: summarize(b, spec, by_batch[s][b]) if b in by_batch[s] else None for s in SIDES}
        for side in SIDES:
            row: dict[str, Any] = {"setup": side, "batch": b, "status": results[side]["status"]}
            if stats[side] is not None:
                row.update(stats[side])
                row["raw"] = {k: by_batch[side][b][k] for k in ("prefill_s", "full_s")}
            if side == "ours" and stats["ours"] and stats["stock"]:
                row["ratio_decode"] = _ratio(stats["ours"]["decode_tok_s"], stats["stock"]["decode_tok_s"])
                row["ratio_e2e"] = _ratio(stats["ours"]["e2e_tok_s"], stats["stock"]["e2e_tok_s"])
            rows.append(row)
    return rows


def greedy_agreement(spec: Workload, results: dict[str, dict[str, Any]]) -> dict[str, str]:
    """Per batch: how many sequences got identical greedy tokens on both sides (same work, same fp32)."""
    out = {}
    for b in spec.batch_sizes:
        ids = [
            next((r["output_ids"] for r in results[s].get("rows", []) if r["batch"] == b), None)
            for s in SIDES
        ]
        if all(ids):
            out[str(b)] = f"{sum(x == y for x, y in zip(*ids, strict=True))}/{b}"
    return out


def describe_machine() -> dict[str, Any]:
    """The shared machine description (crosspool_sgl.bench.report), plus the cores this process may use."""
    from crosspool_sgl.bench.report import describe_machine as shared_description

    return {**shared_description(), "usable_cores": len(os.sched_getaffinity(0))}


def _fmt(x: float | None, spec: str = ".0f") -> str:
    return "—" if x is None else format(x, spec)


def render_markdown(report: dict[str, Any]) -> str:
    """The human-readable result: settings first, then the table, then caveats."""
    w, m = report["workload"], report["machine"]
    lines = [
        "# Decode throughput: crosspool_sgl Engine vs stock sglang.Engine",
        "",
        f"- date: {report['date']}",
        f"- command: `{report['command']}`",
        f"- machine: {m['cpu']}, {m['usable_cores']}/{m['cores']} cores, {m['ram_gib']} GiB RAM, "
        f"{m['gpu']}; " + ", ".join(f"{k} {v}" for k, v in m["versions"].items()),
        f"- model: `{w['model']}` ({w['model_path']}), fp32; prompt {w['prompt_len']} tokens, "
        f"{w['new_tokens']} new tokens, greedy, ignore_eos; medians of {w['repeats']} repeats; "
        f"OMP_NUM_THREADS={w['threads']} on both sides",
        f"- stock: `sglang.Engine({', '.join(f'{k}={v!r}' for k, v in report['settings']['stock'].items())})`"
        f" with {' '.join(f'{k}={v}' for k, v in STOCK_ENV.items())} and PYTHONPATH+=patches/stubs",
        f"- ours: `Engine({', '.join(f'{k}={v!r}' for k, v in report['settings']['ours'].items())})`",
        "",
        "| setup | batch | prefill ms | decode ms/step | decode tok/s | e2e tok/s | ours/stock decode "
        "| ours/stock e2e |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["rows"]:
        if "e2e_tok_s" not in r:
            lines.append(f"| {r['setup']} | {r['batch']} | {r['status']} | | | | | |")
            continue
        lines.append(
            f"| {r['setup']} | {r['batch']} | {_fmt(r['prefill_ms'], '.1f')} | "
            f"{_fmt(r['decode_ms_per_step'], '.2f')} | {_fmt(r['decode_tok_s'])} | {_fmt(r['e2e_tok_s'])} | "
            f"{_fmt(r.get('ratio_decode'), '.2f')} | {_fmt(r.get('ratio_e2e'), '.2f')} |"
        )
    lines += [
        "",
        "| setup | status | startup s (imports + engine ready) | load avg (1 min) before → after |",
        "|---|---|---:|---|",
    ]
    for side, s in report["sides"].items():
        before, after = s.get("loadavg_before"), s.get("loadavg_after")
        load = f"{before[0]:.1f} → {after[0]:.1f}" if before and after else "—"
        status = s["status"] + (f": {s['reason']}" if "reason" in s else "")
        lines.append(f"| {side} | {status} | {_fmt(s.get('startup_s'), '.1f')} | {load} |")
    agreement = report["greedy_agreement"] or "—"
    lines += ["", f"Same greedy tokens on both sides (sequences per batch): {agreement}"]
    lines += ["", *[f"- {note}" for note in report["notes"]], ""]
    return "\n".join(lines)


def build_notes(report: dict[str, Any]) -> list[str]:
    """Caveats a reader must see next to the numbers."""
    notes = [
        "Stock sglang.Engine runs its tokenizer manager in this process and the scheduler and detokenizer "
        "in two child processes (ZMQ between them); our Engine runs its scheduler in-process. Both are "
        "measured as shipped: wall time of one blocking `generate` call.",
        "Decode tok/s = B*(N-1) / (t(N new tokens) - t(1 new token)); e2e tok/s = B*N / t(N new tokens).",
    ]
    cores = report["machine"]["usable_cores"]
    loads = [
        s[k][0] for s in report["sides"].values() for k in ("loadavg_before", "loadavg_after") if s.get(k)
    ]
    if loads and max(loads) > cores:
        notes.append(
            f"The machine was busy (1-min load average up to {max(loads):.1f} on {cores} cores): "
            "other processes shared the CPU, so absolute numbers are noisy; the interleaved ratios "
            "are the figures to compare."
        )
    return notes + stock_divergence_notes(report["workload"])


def stock_divergence_notes(workload: dict[str, Any]) -> list[str]:
    """Config features stock SGLang 0.5.23 ignores for these architectures (read in its model files), which
    is why its greedy tokens can differ from ours and from transformers on the tiny models."""
    config = json.loads((Path(workload["model_path"]) / "config.json").read_text())
    notes = []
    if config.get("model_type") == "qwen3_moe" and config.get("mlp_only_layers"):
        notes.append(
            f"Stock SGLang builds every Qwen3-MoE layer as sparse (`stage_facts` ignores "
            f"`mlp_only_layers`={config['mlp_only_layers']}) and silently skips those layers' dense "
            "MLP weights, running an unloaded expert block there instead: its greedy tokens differ "
            "from transformers', while its work per step stays close to the real model's."
        )
    window = config.get("sliding_window")
    longest = workload["prompt_len"] + workload["new_tokens"]
    if config.get("model_type") == "mixtral" and window and longest > window:
        notes.append(
            f"Stock SGLang's Mixtral ignores `sliding_window`={window}: past that length it attends "
            "to every token, so its greedy tokens drift from transformers'."
        )
    return notes


def write_report(report: dict[str, Any], markdown: str, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{RESULT_NAME}.md").write_text(markdown)
    (out_dir / f"{RESULT_NAME}.json").write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {out_dir / RESULT_NAME}.md and .json")


def run_benchmark(args: argparse.Namespace) -> int:
    """Parent: build the workload, run stock then ours, report. Exit 1 if a side did not run."""
    date = datetime.now(UTC).isoformat(timespec="seconds")
    spec = build_workload(args)
    work_dir = Path(tempfile.mkdtemp(prefix="decode_throughput_"))
    spec_path = work_dir / "workload.json"
    spec_path.write_text(json.dumps(asdict(spec)))
    workers, results = start_workers(spec_path, work_dir, spec.threads, args.timeout)
    try:
        measure_interleaved(spec, workers, results, args.timeout)
    finally:
        for worker in workers.values():
            worker.close()
    ok = all(r["status"] == "ok" for r in results.values())
    if ok and not args.keep_logs:
        shutil.rmtree(work_dir)
    else:
        print(f"per-side logs kept in {work_dir}")
    report: dict[str, Any] = {
        "benchmark": RESULT_NAME,
        "date": date,
        "command": shlex.join([Path(sys.executable).name, *sys.argv]),
        "machine": describe_machine(),
        "workload": {k: v for k, v in asdict(spec).items() if k != "prompts"},
        "settings": {
            "stock": {**STOCK_ENGINE_KWARGS, "max_total_tokens": spec.max_total_tokens},
            "ours": results["ours"].get("info", {}).get("engine_kwargs", OURS_ENGINE_KWARGS),
        },
        "sides": {s: {k: v for k, v in r.items() if k != "rows"} for s, r in results.items()},
        "rows": build_rows(spec, results),
        "greedy_agreement": greedy_agreement(spec, results),
    }
    report["notes"] = build_notes(report)
    markdown = render_markdown(report)
    print("\n" + markdown)
    if not args.no_write:
        write_report(report, markdown, Path(args.out_dir))
    return 0 if ok else 1


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="batch 1,8; 32 new tokens; 3 repeats (~40 s)")
    p.add_argument("--batch-sizes", help="comma-separated (default 1,8,32; --quick 1,8)")
    p.add_argument("--new-tokens", type=int, help="tokens generated per sequence (default 128; --quick 32)")
    p.add_argument("--prompt-len", type=int, default=32, help="prompt tokens per sequence")
    p.add_argument("--repeats", type=int, help="timed repeats per batch size (default 5; --quick 3)")
    p.add_argument("--model", default="qwen3_moe", help="tiny model name (see tools/make_tiny_models.py)")
    p.add_argument("--model-path", help="benchmark this HF directory instead of the tiny model")
    p.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS for both sides")
    p.add_argument("--timeout", type=float, default=300, help="seconds allowed per side")
    p.add_argument("--out-dir", default=str(DEFAULT_OUT_DIR))
    p.add_argument("--no-write", action="store_true", help="print the table only")
    p.add_argument("--keep-logs", action="store_true", help="keep per-side logs (kept anyway on failure)")
    p.add_argument("--worker", choices=SIDES, help=argparse.SUPPRESS)
    p.add_argument("--spec", help=argparse.SUPPRESS)
    p.add_argument("--reply-fd", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    defaults = ("1,8", 32, 3) if args.quick else ("1,8,32", 128, 5)
    for name, default in zip(("batch_sizes", "new_tokens", "repeats"), defaults, strict=True):
        if getattr(args, name) is None:
            setattr(args, name, default)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        return serve_worker(args.worker, Path(args.spec), args.reply_fd)
    return run_benchmark(args)


if __name__ == "__main__":
    sys.exit(main())
