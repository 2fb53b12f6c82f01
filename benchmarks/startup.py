"""Start-up time of the server: `python -m crosspool_sgl.launch_server` (demo models) to a 200 on /health.

    python benchmarks/startup.py [--repeats 3] [--side before=/path/to/old/checkout] [--side after=.]

Each side is a source tree put first on PYTHONPATH (default: this checkout, as `this`). Runs are
interleaved (A B A B ...), so load that drifts on a shared machine hits every side alike, and each
run starts from a stopped server (the demo models are built before the first timed run). Per run: the
seconds from `Popen` to the first 200 from /health, the CPU seconds of the server's processes up to
that point (psutil, children included), and the 1-minute load average before it started.

Results go to `benchmarks/results/startup.{md,json}` with the command line and the date.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psutil

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT_DIR = ROOT / "benchmarks" / "results"
RESULT_NAME = "startup"
_POLL_S = 0.05


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def healthy(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as r:
            return r.status == 200
    except OSError:
        return False


def cpu_seconds(proc: psutil.Process) -> float:
    """User + system seconds of `proc` and its live descendants."""
    total = 0.0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.NoSuchProcess:
            continue
    return total


def run_once(src: Path, timeout_s: float, extra: list[str]) -> dict[str, Any]:
    """Start one server from `src`, time it to healthy, stop it."""
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(src)}
    cmd = [sys.executable, "-m", "crosspool_sgl.launch_server", "--port", str(port), "--log-level", "warning"]
    load = os.getloadavg()[0]
    start = time.perf_counter()
    # cwd: `python -m` puts the working directory first on sys.path, ahead of PYTHONPATH.
    proc = subprocess.Popen(
        [*cmd, *extra], cwd=src, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    ps = psutil.Process(proc.pid)
    try:
        while not healthy(port):
            if proc.poll() is not None:
                raise RuntimeError(
                    f"server exited with {proc.returncode}: {proc.stderr.read().decode()[-2000:]}"
                )
            if time.perf_counter() - start > timeout_s:
                raise RuntimeError(f"not healthy after {timeout_s:.0f} s")
            time.sleep(_POLL_S)
        wall = time.perf_counter() - start
        cpu = cpu_seconds(ps)
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return {"healthy_s": wall, "cpu_s": cpu, "load_1m": load}


def parse_sides(values: list[str]) -> dict[str, Path]:
    sides = {}
    for v in values or ["this=."]:
        name, sep, path = v.partition("=")
        if not sep:
            raise SystemExit(f"--side expects NAME=DIR, got {v!r}")
        sides[name] = Path(path).resolve()
    return sides


def summary_md(results: dict[str, list[dict]], argv: list[str]) -> str:
    lines = [
        "# Start-up to healthy (`python -m crosspool_sgl.launch_server`, demo models)",
        "",
        f"Command: `{shlex.join(argv)}`  ",
        f"Date: {datetime.now(UTC).isoformat(timespec='seconds')}; machine: {platform.machine()}, "
        f"{os.cpu_count()} cores, Python {platform.python_version()}",
        "",
        "| side | healthy s (each run, in order) | median s | CPU s to healthy (median) "
        "| load avg 1 min before |",
        "| --- | --- | --- | --- | --- |",
    ]
    for side, runs in results.items():
        walls = " / ".join(f"{r['healthy_s']:.1f}" for r in runs)
        loads = " / ".join(f"{r['load_1m']:.2f}" for r in runs)
        med = statistics.median(r["healthy_s"] for r in runs)
        cpu = statistics.median(r["cpu_s"] for r in runs)
        lines.append(f"| {side} | {walls} | {med:.1f} | {cpu:.1f} | {loads} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--side", action="append", metavar="NAME=DIR", help="a source tree to time (repeatable)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--timeout", type=float, default=180.0, help="seconds a start may take")
    p.add_argument("--out-dir", type=Path, default=DEFAULT_OUT_DIR)
    p.add_argument("--name", default=RESULT_NAME, help="result file name (without extension)")
    p.add_argument("--no-write", action="store_true")
    args, extra = p.parse_known_args(argv)
    sides = parse_sides(args.side)
    # The demo models are generated on first use; do that before timing anything.
    subprocess.run(
        [
            sys.executable,
            "-c",
            "from crosspool_sgl.tools.make_tiny_models import ensure_tiny_models as e; e()",
        ],
        cwd=next(iter(sides.values())),
        env={**os.environ, "PYTHONPATH": str(next(iter(sides.values())))},
        check=True,
    )
    results: dict[str, list[dict]] = {s: [] for s in sides}
    for i in range(args.repeats):
        for side, src in sides.items():
            r = run_once(src, args.timeout, extra)
            results[side].append(r)
            print(
                f"[{side} #{i + 1}] healthy after {r['healthy_s']:.2f} s, "
                f"CPU {r['cpu_s']:.1f} s, load avg {r['load_1m']:.2f}",
                flush=True,
            )
    md = summary_md(results, ["python", "benchmarks/startup.py", *(argv or sys.argv[1:])])
    print(md)
    if not args.no_write:
        args.out_dir.mkdir(parents=True, exist_ok=True)
        (args.out_dir / f"{args.name}.md").write_text(md)
        (args.out_dir / f"{args.name}.json").write_text(
            json.dumps({"sides": dict(s.split("=", 1) for s in args.side or []), "runs": results}, indent=1)
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
