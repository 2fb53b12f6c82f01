"""Turn gpu_check.sh's logs into markdown under benchmarks/results/gpu/ (standard library only).

Files: summary.md (environment, what ran, outcomes, time), tests.md (every tests/gpu test and
its outcome, failures' summary lines), static_decode.md and disagg_nccl.md (those tests alone),
decode_step.md (written by the benchmark; replaced by its log when it failed).
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

RESULT = re.compile(r"^(tests/gpu/\S+::\S+) (PASSED|FAILED|SKIPPED|ERROR|XFAIL|XPASS)\b")
SECTIONS = {
    "static_decode.md": ("CUDA-graph replay vs eager (static-buffer decode)", "test_static_decode_gpu.py"),
    "disagg_nccl.md": (
        "Colocated vs disaggregated over NCCL (one GPU, two processes)",
        "test_disagg_nccl_gpu.py",
    ),
}


def parse(log: str) -> tuple[dict[str, str], list[str]]:
    outcomes: dict[str, str] = {}
    for line in log.splitlines():
        m = RESULT.match(line)
        if m:
            outcomes[m.group(1)] = m.group(2)
    summary, inside = [], False
    for line in log.splitlines():
        if "short test summary info" in line:
            inside = True
            continue
        if inside and not line.startswith("="):
            summary.append(line)
    return outcomes, summary


def table(outcomes: dict[str, str], only: str | None = None) -> list[str]:
    rows = ["| test | outcome |", "| --- | --- |"]
    rows += [f"| `{t}` | {o} |" for t, o in outcomes.items() if only is None or only in t]
    return rows


def counts(outcomes: dict[str, str]) -> str:
    tally: dict[str, int] = {}
    for o in outcomes.values():
        tally[o] = tally.get(o, 0) + 1
    return ", ".join(f"{n} {o.lower()}" for o, n in sorted(tally.items())) or "no test reported"


def main() -> None:
    p = argparse.ArgumentParser()
    for flag in ("--results", "--env", "--pytest-log", "--bench-log"):
        p.add_argument(flag, required=True)
    for flag in ("--pytest-rc", "--bench-rc", "--seconds"):
        p.add_argument(flag, type=int, required=True)
    a = p.parse_args()
    out = Path(a.results)
    out.mkdir(parents=True, exist_ok=True)
    env = Path(a.env).read_text()
    log = Path(a.pytest_log).read_text(errors="replace")
    outcomes, failures = parse(log)
    timed_out = " — out of time, the rest did not run" if a.pytest_rc == 124 else ""
    head = f"pytest exit {a.pytest_rc}{timed_out}: {counts(outcomes)}"
    tests = ["# tests/gpu", "", env, head, "", *table(outcomes)]
    if failures:
        tests += ["", "## Summary lines (failures, skips)", "", "```", *failures, "```"]
    if a.pytest_rc not in (0, 1) or not outcomes:
        tests += ["", "## Log tail", "", "```", *log.splitlines()[-60:], "```"]
    (out / "tests.md").write_text("\n".join(tests) + "\n")
    for name, (title, file) in SECTIONS.items():
        sub = {t: o for t, o in outcomes.items() if file in t}
        text = [f"# {title}", "", env, f"{counts(sub)} (tests/gpu/{file})", "", *table(sub)]
        (out / name).write_text("\n".join(text) + "\n")
    bench = Path(a.bench_log).read_text(errors="replace")
    if a.bench_rc != 0:
        (out / "decode_step.md").write_text(
            f"# Decode step benchmark: FAILED (exit {a.bench_rc})\n\n```\n"
            + "\n".join(bench.splitlines()[-40:])
            + "\n```\n"
        )
    summary = [
        "# GPU check (launch/gpu_check.sh)",
        "",
        env,
        f"- tests/gpu: {head} — tests.md, static_decode.md, disagg_nccl.md",
        f"- benchmarks/gpu_decode_step.py: exit {a.bench_rc} — decode_step.md",
        f"- wall time: {a.seconds} s",
    ]
    (out / "summary.md").write_text("\n".join(summary) + "\n")


if __name__ == "__main__":
    main()
