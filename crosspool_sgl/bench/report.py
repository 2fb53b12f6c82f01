"""Tables (Markdown), raw JSON and PNG plots of a multi-model benchmark run.

The report dict is the single source: the Markdown and the plots are rendered from it, so a JSON
file from an earlier run can be re-rendered (`render_markdown(json.load(...))`).
"""

from __future__ import annotations

import json
import os
import platform
from importlib import metadata
from pathlib import Path
from typing import Any

from crosspool_sgl.bench.stats import ratio

BASELINE_REFERENCE = "crosspool-shared"  # ratios are baseline / this setup
RATIO_KEYS = ("ttft_p50_ms", "ttft_p99_ms", "tbt_p50_ms", "tbt_p99_ms", "tbt_p999_ms")


def describe_machine() -> dict[str, Any]:
    """What a reader needs to compare these numbers with another run."""
    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []
    cpu = next(
        (ln.split(":", 1)[1].strip() for ln in cpuinfo if ln.startswith("model name")), platform.processor()
    )
    meminfo = Path("/proc/meminfo").read_text().splitlines() if Path("/proc/meminfo").exists() else []
    mem_kb = next((int(ln.split()[1]) for ln in meminfo if ln.startswith("MemTotal")), 0)
    versions = {}
    for pkg in ("torch", "sglang", "transformers", "crosspool-sgl"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = None
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "ram_gib": round(mem_kb / 2**20, 1),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "versions": versions,
        "gpu": "none (CPU only)",
        "loadavg_at_start": list(os.getloadavg()),
    }


def _f(x: Any, spec: str = ".1f") -> str:
    return "—" if x is None else format(x, spec)


def setup_rows(variant: dict[str, Any]) -> list[str]:
    """One table row per setup (overall numbers)."""
    rows = [
        "| setup | status | done/total | rejected | timeout | preempted | TTFT P50 | TTFT P99 | "
        "TBT P50 | TBT P99 | TBT P99.9 | out tok/s | tok/chunk | peak RSS GiB | largest served ctx |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, s in variant["setups"].items():
        if s["status"] != "ok":
            rows.append(f"| {name} | {s['status']}: {s.get('reason', '')[:120]} |" + " |" * 13)
            continue
        o = s["summary"]["overall"]
        rows.append(
            f"| {name} | ok | {o['completed']}/{o['requests']} | {o['rejected']} | {o['timeout']} | "
            f"{s['preempted']} | {_f(o['ttft_p50_ms'])} | {_f(o['ttft_p99_ms'])} | {_f(o['tbt_p50_ms'])} | "
            f"{_f(o['tbt_p99_ms'])} | {_f(o['tbt_p999_ms'])} | {_f(o['output_tok_s'], '.0f')} | "
            f"{_f(o.get('tokens_per_chunk'), '.2f')} | {s['peak_rss_bytes'] / 2**30:.2f} | "
            f"{o['max_served_context']} |"
        )
    return rows


def ratio_rows(variant: dict[str, Any], reference: str = BASELINE_REFERENCE) -> list[str]:
    """baseline / crosspool for every latency percentile: > 1 means crosspool is faster."""
    ref = variant["setups"].get(reference, {})
    if ref.get("status") != "ok":
        return [f"(no ratios: {reference} did not run)"]
    r = ref["summary"]["overall"]
    rows = [
        f"| baseline / {reference} | " + " | ".join(RATIO_KEYS) + " | peak RSS | rejected (b vs c) |",
        "|---|" + "---:|" * (len(RATIO_KEYS) + 2),
    ]
    for name, s in variant["setups"].items():
        if name == reference or s["status"] != "ok":
            continue
        o = s["summary"]["overall"]
        cells = [_f(ratio(o[k], r[k]), ".2f") for k in RATIO_KEYS]
        rss = _f(ratio(s["peak_rss_bytes"], ref["peak_rss_bytes"]), ".2f")
        rows.append(f"| {name} | " + " | ".join(cells) + f" | {rss} | {o['rejected']} vs {r['rejected']} |")
    return rows


def normal_rows(variant: dict[str, Any]) -> list[str]:
    rows = [
        "| setup | done/total | rejected | TTFT P50 | TTFT P99 | TBT P50 | TBT P99 | TBT P99.9 |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, s in variant["setups"].items():
        o = s.get("summary_normal")
        if s["status"] != "ok" or not o:
            continue
        rows.append(
            f"| {name} | {o['completed']}/{o['requests']} | {o['rejected']} | {_f(o['ttft_p50_ms'])} | "
            f"{_f(o['ttft_p99_ms'])} | {_f(o['tbt_p50_ms'])} | {_f(o['tbt_p99_ms'])} | "
            f"{_f(o['tbt_p999_ms'])} |"
        )
    return rows


def model_rows(variant: dict[str, Any]) -> list[str]:
    rows = [
        "| setup | model | done/total | rejected | TTFT P50 | TTFT P99 | TBT P50 | TBT P99 | TBT P99.9 | "
        "largest served ctx |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, s in variant["setups"].items():
        if s["status"] != "ok":
            continue
        for model, o in s["summary"].items():
            if model == "overall":
                continue
            rows.append(
                f"| {name} | {model} | {o['completed']}/{o['requests']} | {o['rejected']} | "
                f"{_f(o['ttft_p50_ms'])} | {_f(o['ttft_p99_ms'])} | {_f(o['tbt_p50_ms'])} | "
                f"{_f(o['tbt_p99_ms'])} | {_f(o['tbt_p999_ms'])} | {o['max_served_context']} |"
            )
    return rows


def variant_section(key: str, variant: dict[str, Any]) -> list[str]:
    tr = variant["trace"]
    lines = [
        f"## {variant['title']}",
        "",
        f"- trace: {tr['num_requests']} requests over {tr['config']['duration_s']:.0f} s, seed "
        f"{tr['config']['seed']}; per model: "
        + "; ".join(
            f"{m} {int(v['requests'])} req (long {int(v['long_requests'])}, prompt mean "
            f"{v['mean_prompt']:.0f} max {int(v['max_prompt'])})"
            for m, v in tr["summary"].items()
        ),
        f"- KV budget (all setups): {variant['kv_budget_bytes'] / 2**20:.1f} MiB in total; stock gets "
        + ", ".join(f"{m} {t} tokens" for m, t in variant["stock_kv_tokens"].items()),
        f"- context length of the models: {variant['context_len']} tokens",
        "",
        "Latencies in ms. TBT = time between streamed chunks. preempted = requests retracted and requeued "
        "(server-side count).",
        "",
        *setup_rows(variant),
        "",
        *ratio_rows(variant),
        "",
        "Ordinary requests only (long-context requests left out of the statistics, not of the run):",
        "",
        *normal_rows(variant),
        "",
        "<details><summary>per model</summary>",
        "",
        *model_rows(variant),
        "",
        "</details>",
        "",
        f"![latency CDFs]({key}_cdf.png)",
        f"![KV pool occupancy]({key}_occupancy.png)",
        "",
    ]
    return lines


def render_markdown(report: dict[str, Any]) -> str:
    m = report["machine"]
    lines = [
        "# Multi-model bursty trace: crosspool vs stock SGLang and static partitions",
        "",
        f"- date: {report['date']}",
        f"- command: `{report['command']}`",
        f"- machine: {m['cpu']}, {m['cores']} cores, {m['ram_gib']} GiB RAM, {m['gpu']}; "
        + ", ".join(f"{k} {v}" for k, v in m["versions"].items())
        + f"; load average at start {m['loadavg_at_start'][0]:.1f}",
        f"- wall time of the whole run: {report.get('wall_s', 0):.0f} s",
        *[
            f"- updated {u['date']} (load average {u['loadavg_at_start'][0]:.1f}): `{u['command']}`"
            for u in report.get("updates", [])
        ],
        "",
    ]
    for key, variant in report["variants"].items():
        lines += variant_section(f"{report['name']}_{key}", variant)
    lines += ["## Setups", ""]
    for name, desc in report.get("settings", {}).items():
        lines += [
            f"- **{name}**: env `{' '.join(f'{k}={v}' for k, v in desc['env'].items())}`",
            *[f"  - `{c}`" for c in desc["commands"]],
        ]
    lines += ["", "## Notes", "", *[f"- {n}" for n in report.get("notes", [])], ""]
    return "\n".join(lines)


def plot_variant(key: str, variant: dict[str, Any], out_dir: Path) -> list[Path]:
    """Latency CDFs (TTFT, TBT) and KV occupancy over time, one PNG each."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = {n: s for n, s in variant["setups"].items() if s["status"] == "ok"}
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, field, title in ((axes[0], "ttft_ms", "TTFT"), (axes[1], "tbt_ms", "time between tokens")):
        for name, s in ok.items():
            xs = sorted(s["raw"][field])
            if xs:
                ax.plot(xs, [(i + 1) / len(xs) for i in range(len(xs))], label=name)
        ax.set_xscale("log")
        ax.set_xlabel("ms (log)")
        ax.set_ylabel("CDF")
        ax.set_title(f"{title} — {variant['title']}", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    paths = [out_dir / f"{key}_cdf.png"]
    fig.tight_layout()
    fig.savefig(paths[0], dpi=110)
    plt.close(fig)
    paths.append(plot_occupancy(key, variant, ok, out_dir, plt))
    return paths


def plot_occupancy(key: str, variant: dict[str, Any], ok: dict[str, Any], out_dir: Path, plt: Any) -> Path:
    """Stacked KV bytes in use per model over time, one panel per setup, the total budget as a line."""
    fig, axes = plt.subplots(len(ok) or 1, 1, figsize=(10, 2.4 * max(1, len(ok))), sharex=True, squeeze=False)
    budget_mib = variant["kv_budget_bytes"] / 2**20
    for ax, (name, s) in zip(axes[:, 0], ok.items(), strict=False):
        series = s["samples"]
        models = sorted({k for sample in series["kv_used_bytes"] for k in sample})
        ys = [
            [max(0.0, sample.get(mod, 0.0)) / 2**20 for sample in series["kv_used_bytes"]] for mod in models
        ]
        if series["t_s"] and models:
            ax.stackplot(series["t_s"], ys, labels=models, alpha=0.8)
        ax.axhline(budget_mib, color="k", lw=0.8, ls="--", label="total budget")
        ax.set_ylabel("KV MiB")
        ax.set_title(name, fontsize=9)
        ax.legend(fontsize=7, loc="upper right", ncol=len(models) + 1)
    axes[-1, 0].set_xlabel("seconds since trace start")
    fig.suptitle(f"KV pool occupancy — {variant['title']}", fontsize=10)
    fig.tight_layout()
    path = out_dir / f"{key}_occupancy.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(report: dict[str, Any], out_dir: Path, name: str) -> list[Path]:
    """`<name>.md`, `<name>.json` and the PNGs; returns the paths written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    md = out_dir / f"{name}.md"
    md.write_text(render_markdown(report))
    js = out_dir / f"{name}.json"
    js.write_text(json.dumps(report, indent=1) + "\n")
    paths = [md, js]
    for key, variant in report["variants"].items():
        paths += plot_variant(f"{name}_{key}", variant, out_dir)
    return paths
