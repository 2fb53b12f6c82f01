"""Scheduler overhead per step at GPU scale, with a stub model runner (no compute).

    python benchmarks/scheduler_overhead.py [--base main] [--repeats 3] [--steps 300] [--quick]

What a step of `MultiModelScheduler.step()` costs in Python when the pool is
GPU-sized: 20 models x 256 running requests (and 1 model x 256 for
comparison) over a KV pool whose every model view has ~50k pages (8 pages a
chunk, like the runtime's default chunk), prefix cache on and pre-filled so
the pool runs full and admissions have to reclaim cached prefixes — the
steady state of a busy server. The real KVPool, KVPlanner, PrefixCache,
SchedulePolicy and MultiModelScheduler are wired as `runtime.py`
does; only the model runner is a stub that returns a token for every request
whose prompt completes. Its time is subtracted: overhead = step wall time -
stub time.

`--base REF` also times the code of git REF (default: `git merge-base HEAD main`,
where this checkout left main, so only this branch's changes are compared;
extracted with `git archive` into a temporary directory, nothing in the
checkout changes), interleaved with this checkout's code, `--repeats` times
(ABAB...), one subprocess per run. The
table shows the 1-minute load average and CPU utilisation (this process, and
the whole machine from /proc/stat) beside every run.

Writes benchmarks/results/scheduler_overhead.{md,json} with the command and the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results"
PAGE_TOKENS = 16
PAGES_PER_CHUNK = 8
VOCAB = 32_000
SYSTEM_PROMPT_TOKENS = 64  # shared by each model's requests: prefix-cache hits
# (models, request slots, share of the pool pre-filled with cached prefixes). At 80 % the 256
# requests fit beside the cache: steady decoding. At 95 % every admission has to reclaim cache
# first ("full pool", a busy server's steady state); today's scheduler then runs far fewer
# than 256 requests (see the notes in results/scheduler_overhead.md).
CASES = ((20, 256, 0.8), (20, 256, 0.95), (1, 256, 0.8))
WARMUP_STEPS = 60  # at most; fewer when all 256 requests are decoding sooner
WARMUP_SAFETY_S = 30.0  # warm-up ends on a step count (same state for both versions), this is a guard


# ---- the worker: one process, one version of the code -----------------------------------------
class StubRunner:
    """Stands in for ModelRunner: a next token for each request whose prompt completes, no math."""

    def __init__(self, models: list[str]) -> None:
        from crosspool_sgl.core.model_runner import StepResult

        self.models = {m: SimpleNamespace(config=SimpleNamespace(vocab_size=VOCAB)) for m in models}
        self.residency = None
        self.seconds = 0.0  # time spent in run(), subtracted from the step
        self._result = StepResult

    def run(self, items):
        t = time.perf_counter()
        out = {}
        for req, n in items:
            res = out[req.rid] = self._result()
            if req.num_cached + n == len(req.input_ids) + len(req.output_ids):
                res.next_token = (req.num_cached * 7919 + n) % VOCAB
        self.seconds += time.perf_counter() - t
        return out


def build(num_models: int, running: int, pages_per_view: int, prefill_chunk: int):
    """Pool, planner, cache, policy and scheduler wired like runtime.py."""
    import torch

    from crosspool_sgl.core.schedule_policy import PolicyArgs, SchedulePolicy
    from crosspool_sgl.core.scheduler import MultiModelScheduler
    from crosspool_sgl.mem.kv_planner import KVPlanner, ModelKVPolicy
    from crosspool_sgl.mem.kv_pool import KVGeometry, KVPool
    from crosspool_sgl.mem.prefix_cache import PrefixCache

    geom = KVGeometry(num_layers=1, num_kv_heads=1, head_dim=8, dtype=torch.float32)  # 1 KiB pages
    page_bytes = geom.page_bytes(PAGE_TOKENS)
    pool = KVPool(pages_per_view * page_bytes, PAGE_TOKENS, chunk_bytes=PAGES_PER_CHUNK * page_bytes)
    models = [f"m{i:02d}" for i in range(num_models)]
    for m in models:
        pool.add_model(m, geom)
    planner = pool.planner = KVPlanner(
        pool.chunk_bytes, pool.num_chunks, {m: ModelKVPolicy() for m in models}
    )
    policy = SchedulePolicy(
        PolicyArgs(
            PAGE_TOKENS,
            running,
            chunked_prefill_size=prefill_chunk,
            prefill_tokens_with_decodes=2048,
        ),
        admission_key=lambda r: planner.admission_deadline(r.model, r.arrival_time),
        victim_key=lambda r: planner.victim_key(r.model, r.arrival_time, r.num_cached),
    )
    runner = StubRunner(models)
    sched = MultiModelScheduler(
        runner,
        pool,
        policy,
        eos_ids={m: () for m in models},
        context_lens={m: 1 << 20 for m in models},
        prefix_cache=PrefixCache(pool),
    )
    return sched, runner, models


class Traffic:
    """Seeded requests: a per-model system prompt, a random tail, random output lengths."""

    def __init__(self, models: list[str], seed: int = 0) -> None:
        from crosspool_sgl.core.req import Req
        from crosspool_sgl.sampling_params import SamplingParams

        self.rng = random.Random(seed)
        self.models = models
        self.system = {m: [self.rng.randrange(VOCAB) for _ in range(SYSTEM_PROMPT_TOKENS)] for m in models}
        self.n = 0
        self._req, self._params = Req, SamplingParams

    def next(self):
        rng, self.n = self.rng, self.n + 1
        model = self.models[self.n % len(self.models)]
        tail = [rng.randrange(VOCAB) for _ in range(rng.randint(64, 448))]
        params = self._params(max_new_tokens=rng.randint(64, 256), ignore_eos=True, temperature=0)
        return self._req(f"r{self.n}", model, self.system[model] + tail, params)


def prefill_cache(sched, models: list[str], fill: float, rng: random.Random) -> None:
    """Finished requests of the past: cached chains until `fill` of the pool is cache."""
    pool, cache = sched.kv_pool, sched.prefix_cache
    target = int(fill * pool.num_chunks * PAGES_PER_CHUNK)
    i = 0
    while cache.cached_pages() < target:
        model = models[i % len(models)]
        i += 1
        n = rng.randint(8, 40)
        pages = pool.alloc(model, n)
        if pages is None:
            break
        tokens = [rng.randrange(VOCAB) for _ in range(n * PAGE_TOKENS)]
        cache.release(model, tokens, pages, len(tokens), [])


def measure(
    num_models: int, running: int, fill: float, pages_per_view: int, steps: int, max_s: float
) -> dict:
    sched, runner, models = build(num_models, running, pages_per_view, prefill_chunk=8192)
    traffic = Traffic(models)
    prefill_cache(sched, models, fill=fill, rng=random.Random(1))
    backlog = 8  # waiting requests kept queued: admissions (and reclaims) every step

    def top_up() -> None:
        while len(sched.running) + len(sched.waiting) < running + backlog:
            sched.add_request(traffic.next())

    t_warm = time.perf_counter()
    while len(sched.running) < running or any(r.num_uncached > 1 for r in sched.running):
        top_up()
        sched.step()
        if sched.num_steps >= WARMUP_STEPS or time.perf_counter() - t_warm > WARMUP_SAFETY_S:
            break
    warm_steps = sched.num_steps
    overheads, walls, decoding, in_batch = [], [], [], []
    reclaims_before = sum(sched.counters.get("reclaim", {}).values())
    cpu0, sys0, load0 = time.process_time(), _proc_stat(), os.getloadavg()[0]
    t_run = time.perf_counter()
    for _ in range(steps):
        top_up()
        stub0 = runner.seconds
        t = time.perf_counter()
        sched.step()
        wall = time.perf_counter() - t
        walls.append(wall)
        overheads.append(wall - (runner.seconds - stub0))
        decoding.append(sum(r.num_uncached == 1 for r in sched.running))
        in_batch.append(len(sched.running))
        if time.perf_counter() - t_run > max_s:
            break
    elapsed = time.perf_counter() - t_run
    cpu, sys1 = time.process_time() - cpu0, _proc_stat()
    snap = sched.kv_pool.snapshot()
    ms = sorted(x * 1e3 for x in overheads)
    return {
        "models": num_models,
        "requests": running,
        "cache_fill": fill,
        "pages_per_view": sched.kv_pool.kv_view(models[0]).shape[0],
        "chunks": sched.kv_pool.num_chunks,
        "warmup_steps": warm_steps,
        "steps": len(ms),
        "overhead_ms_median": statistics.median(ms),
        "overhead_ms_p99": ms[min(len(ms) - 1, int(0.99 * len(ms)))],
        "overhead_ms_mean": statistics.fmean(ms),
        "step_ms_median": statistics.median(walls) * 1e3,
        "running_median": statistics.median(in_batch),
        "decoding_median": statistics.median(decoding),
        "reclaimed_pages": sum(sched.counters.get("reclaim", {}).values()) - reclaims_before,
        "preempted": sum(sched.counters.get("preempt", {}).values()),
        "cached_pages": sched.prefix_cache.cached_pages(),
        "free_chunks": snap.num_free_chunks,
        "load_avg": (load0 + os.getloadavg()[0]) / 2,
        "cpu_process": cpu / elapsed,
        "cpu_machine": _busy_share(sys0, sys1),
    }


def _proc_stat() -> tuple[int, int] | None:
    """(busy, total) jiffies of the whole machine, or None where /proc/stat is missing."""
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return sum(fields) - idle, sum(fields)


def _busy_share(a, b) -> float | None:
    if a is None or b is None or b[1] == a[1]:
        return None
    return (b[0] - a[0]) / (b[1] - a[1])


ROOT_PACKAGE = Path(__file__).resolve().parents[1] / "crosspool_sgl"


def worker(args) -> int:
    import crosspool_sgl

    rows = []
    for num_models, running, fill in CASES:
        row = measure(num_models, running, fill, args.pages_per_view, args.steps, args.max_seconds)
        code = Path(crosspool_sgl.__file__).resolve().parent
        row["code"] = "<this checkout>" if code == ROOT_PACKAGE else "<base checkout>"  # no machine paths
        rows.append(row)
    print(json.dumps(rows))
    return 0


# ---- the parent: interleave versions, render ----------------------------------------------------
def extract(ref: str, into: Path) -> str:
    """`git archive` of crosspool_sgl/ at `ref` into `into`; returns the commit."""
    commit = subprocess.check_output(["git", "-C", str(ROOT), "rev-parse", ref], text=True).strip()
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", "--format=tar", commit, "crosspool_sgl"],
        check=True,
        capture_output=True,
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return commit


def run_worker(code_root: Path, args) -> list[dict]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "--steps", str(args.steps)]
    cmd += ["--pages-per-view", str(args.pages_per_view), "--max-seconds", str(args.max_seconds)]
    env = {**os.environ, "PYTHONPATH": str(code_root), "OMP_NUM_THREADS": "1"}
    out = subprocess.run(cmd, env=env, cwd=str(code_root), check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _case(r: dict) -> tuple:
    return (r["models"], r["requests"], r["cache_fill"])


def summarize(runs: list[dict]) -> list[dict]:
    """Per (case, version): medians over repeats of the per-run figures."""
    keys = list(dict.fromkeys((*_case(r), r["version"]) for r in runs))
    keys.sort(key=lambda k: (-k[0], k[2], k[3] != "before"))
    out = []
    for *case, version in keys:
        mine = [r for r in runs if list(_case(r)) == case and r["version"] == version]
        med = lambda key, rows=mine: statistics.median(r[key] for r in rows)  # noqa: E731
        out.append(
            {
                "models": case[0],
                "requests": case[1],
                "cache_fill": case[2],
                "version": version,
                "median_ms": med("overhead_ms_median"),
                "p99_ms": med("overhead_ms_p99"),
                "running": med("running_median"),
                "decoding": med("decoding_median"),
                "steps": med("steps"),
                "repeats": len(mine),
            }
        )
    return out


def _regime(fill: float) -> str:
    return "full pool" if fill > 0.9 else "steady decode"


def _decisions_note(runs: list[dict]) -> list[str]:
    """Whether both versions made the same decisions (running set, evictions, preemptions) per case:
    then their times compare like for like; otherwise the table says the work differs."""
    seen: dict[tuple, dict[str, tuple]] = {}
    for r in runs:
        key = (r["models"], r["cache_fill"])
        seen.setdefault(key, {})[r["version"]] = (r["running_median"], r["reclaimed_pages"], r["preempted"])
    differ = [k for k, v in seen.items() if len(set(v.values())) > 1]
    if not differ:
        return [
            "Both versions made the same decisions (running set, evicted pages, preemptions) in every",
            "case, so they are timed over the same work.",
        ]
    cases = ", ".join(f"{m} models at {fill:.0%}" for m, fill in differ)
    return [
        f"The versions made different decisions in: {cases} (see the running, reclaimed and",
        "preempted columns below): there the times are of different work, not of the same steps.",
    ]


def render(runs: list[dict], summary: list[dict], meta: dict) -> str:
    lines = [
        "# Scheduler overhead per step at GPU scale (stub model runner)",
        "",
        f"- date: {meta['date']}",
        f"- command: `{meta['command']}` ({meta['wall_s']} s)",
        f"- machine: {meta['machine']}",
        f"- versions: {', '.join(f'{k} = {v}' for k, v in meta['versions'].items())}",
        f"- workload: {meta['workload']}",
        "",
        "Overhead = `scheduler.step()` wall time minus the stub runner's time. Median and P99 over",
        "the timed steps of a run, then the median of those over the repeats; running / decoding:",
        "median requests in the running set / of them decoding, during the timed steps.",
        *_decisions_note(runs),
        "",
        "| models | cache fill | regime | version | overhead median ms | overhead P99 ms | "
        "running | decoding | steps | repeats |",
        "|---:|---:|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for s in summary:
        lines.append(
            f"| {s['models']} | {s['cache_fill']:.0%} | {_regime(s['cache_fill'])} | {s['version']} | "
            f"{s['median_ms']:.3f} | {s['p99_ms']:.3f} | {s['running']:.0f} | {s['decoding']:.0f} | "
            f"{s['steps']:.0f} | {s['repeats']} |"
        )
    by = {(s["models"], s["cache_fill"], s["version"]): s for s in summary}
    ratios = []
    for m, fill, v in by:
        if v == "before" and (m, fill, "after") in by:
            b, a = by[(m, fill, "before")], by[(m, fill, "after")]
            ratios.append(
                f"- {m} model(s), {_regime(fill)}: before / after = "
                f"{b['median_ms'] / a['median_ms']:.2f}x (median), {b['p99_ms'] / a['p99_ms']:.2f}x (P99)"
            )
    if ratios:
        lines += ["", *ratios]
    lines += [
        "",
        "Regimes: *steady decode*: the cache fills 80 % of the pool and all 256 requests fit beside",
        "it, so steps are decodes plus a few admissions. *Full pool*: the cache fills 95 %, every",
        "admission must reclaim cached prefixes; the running set is what the scheduler manages to",
        "keep running there (see benchmarks/README.md). tests/mem checks the pool's page and chunk",
        "choices against a reference pool and the cache's evictions against a brute-force oracle.",
    ]
    lines += [
        "",
        "Every run, in the order they ran (load average: 1-minute, mean of start and end of the",
        "timed steps; CPU: this process's CPU time / wall time, and the whole machine's busy share):",
        "",
        "| # | models | fill | version | steps | median ms | P99 ms | mean ms | running | "
        "reclaimed pages | preempted | load avg | CPU process | CPU machine |",
        "|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for i, r in enumerate(runs, 1):
        machine = "-" if r["cpu_machine"] is None else f"{r['cpu_machine']:.0%}"
        lines.append(
            f"| {i} | {r['models']} | {r['cache_fill']:.0%} | {r['version']} | {r['steps']} | "
            f"{r['overhead_ms_median']:.3f} | {r['overhead_ms_p99']:.3f} | {r['overhead_ms_mean']:.3f} | "
            f"{r['running_median']:.0f} | {r['reclaimed_pages']} | {r['preempted']} | "
            f"{r['load_avg']:.2f} | {r['cpu_process']:.0%} | {machine} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--base",
        default="merge-base",
        help="git ref timed as 'before'; default: where this checkout left main ('' to skip)",
    )
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--steps", type=int, default=120, help="timed steps per case and run")
    p.add_argument("--pages-per-view", type=int, default=50_000)
    p.add_argument("--max-seconds", type=float, default=15.0, help="safety cap on the timed steps of a case")
    p.add_argument("--quick", action="store_true", help="1 repeat, 60 steps (smoke test)")
    p.add_argument("--no-write", action="store_true")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.repeats, args.steps = 1, 60
    if args.worker:
        return worker(args)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="sched_overhead_") as tmp:
        versions: dict[str, tuple[Path, str]] = {}
        if args.base == "merge-base":
            args.base = subprocess.check_output(
                ["git", "-C", str(ROOT), "merge-base", "HEAD", "main"], text=True
            ).strip()
        if args.base:
            versions["before"] = (Path(tmp), extract(args.base, Path(tmp)))
        head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True)
        dirty = subprocess.run(
            ["git", "-C", str(ROOT), "status", "--porcelain", "crosspool_sgl"], capture_output=True, text=True
        )
        versions["after"] = (
            ROOT,
            head.stdout.strip() + (" + uncommitted changes" if dirty.stdout.strip() else ""),
        )
        runs = []
        for rep in range(args.repeats):
            for name, (root, _) in versions.items():
                for row in run_worker(root, args):
                    runs.append({**row, "version": name, "repeat": rep})
                    print(
                        f"{name:6s} rep {rep} {row['models']:2d} models fill {row['cache_fill']:.0%}: "
                        f"median {row['overhead_ms_median']:.3f} ms P99 {row['overhead_ms_p99']:.3f} ms "
                        f"({row['steps']} steps, load {row['load_avg']:.2f}, cpu {row['cpu_process']:.0%})",
                        flush=True,
                    )
    summary = summarize(runs)
    meta = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": shlex.join(
            ["python", "benchmarks/scheduler_overhead.py", *(argv if argv is not None else sys.argv[1:])]
        ),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"Python {platform.python_version()}, OMP_NUM_THREADS=1",
        "versions": {k: (f"{args.base} ({c})" if k == "before" else c) for k, (_, c) in versions.items()},
        "workload": f"{args.pages_per_view} pages per model view ({PAGE_TOKENS} tokens, {PAGES_PER_CHUNK} "
        f"pages a chunk), prefix cache pre-filled to 80% / 95% of the pool, prompts: a 64-token system "
        "prompt + "
        "64-448 random tokens, 64-256 new tokens, a backlog of 8 waiting requests, "
        f"chunked prefill 8192 (2048 with decodes), default decode headroom, planner without floors, "
        f"up to {WARMUP_STEPS} warm-up steps (fewer once all requests decode), then up to "
        f"{args.steps} timed steps or {args.max_seconds:g} s",
        "wall_s": round(time.perf_counter() - t0, 1),
    }
    text = render(runs, summary, meta)
    print(text)
    if not args.no_write:
        OUT.mkdir(parents=True, exist_ok=True)
        (OUT / "scheduler_overhead.md").write_text(text)
        (OUT / "scheduler_overhead.json").write_text(
            json.dumps({"meta": meta, "summary": summary, "runs": runs}, indent=2)
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
