"""Markdown tables, summary JSON, a gzipped raw sidecar and PNG plots of a multi-model benchmark run.

The report dict (summaries of every run) is the single source of the Markdown: `render_markdown`
recomputes medians, ratios and verdicts from its runs, so a stored JSON re-renders to the same page.
Raw per-request records live in a separate gzipped file (the plots read them), keeping the JSON small.
Nothing written may carry a path of the machine it ran on: `scrub_paths` replaces them first.
"""

from __future__ import annotations

import gzip
import json
import os
import platform
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

from crosspool_sgl.bench import aggregate as agg
from crosspool_sgl.bench.plots import plot_variant

P_KEYS = ("ttft_p50_ms", "ttft_p99_ms", "tbt_p50_ms", "tbt_p99_ms")


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


def scrub_paths(obj: Any, replacements: Sequence[tuple[str, str]]) -> Any:
    """`obj` with every occurrence of each path prefix replaced by its placeholder, in every string
    (longest prefix first, so a temp dir inside the home dir becomes `<tmp>`, not `~/...`)."""
    pairs = sorted(
        ((str(a), b) for a, b in replacements if str(a) not in ("", "/")), key=lambda p: -len(p[0])
    )
    if isinstance(obj, str):
        for path, placeholder in pairs:
            obj = obj.replace(path, placeholder)
        return obj
    if isinstance(obj, dict):
        return {scrub_paths(k, pairs): scrub_paths(v, pairs) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [scrub_paths(v, pairs) for v in obj]
    return obj


def _f(x: Any, spec: str = ".1f") -> str:
    return "—" if x is None else format(x, spec)


def _s(sp: dict[str, float] | None, spec: str = ".1f") -> str:
    """median [min–max]."""
    if sp is None:
        return "—"
    if sp["n"] == 1 or sp["min"] == sp["max"]:
        return format(sp["median"], spec)
    return f"{sp['median']:{spec}} [{sp['min']:{spec}}–{sp['max']:{spec}}]"


def _sum(runs: list[dict], key: str, group: str = "overall", view: str = "summary") -> int:
    return int(sum(v or 0 for v in agg.values(runs, group, key, view)))


def setups_of(variant: dict[str, Any]) -> list[str]:
    return list(variant.get("deployments", {}))


def overall_rows(variant: dict[str, Any], view: str = "summary") -> list[str]:
    """Pooled over seeds and repeats: counts summed, latencies as median [min–max] over runs."""
    rows = [
        "| setup | runs | done/total | rejected | timeouts | preempted | TTFT P50 | TTFT P99 | TBT P50 | "
        "TBT P99 | out tok/s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name in setups_of(variant):
        runs = agg.ok_runs(variant, name)
        if not runs:
            dep = variant["deployments"][name]
            rows.append(f"| {name} | 0 | {dep['status']}: {str(dep.get('reason', ''))[:100]} |" + " |" * 8)
            continue
        lat = " | ".join(_s(agg.spread(agg.values(runs, "overall", k, view))) for k in P_KEYS)
        tok = _s(agg.spread(agg.values(runs, "overall", "output_tok_s", view)), ".0f")
        rows.append(
            f"| {name} | {len(runs)} | {_sum(runs, 'completed', view=view)}/"
            f"{_sum(runs, 'requests', view=view)} | "
            f"{_sum(runs, 'rejected', view=view)} | {_sum(runs, 'timeout', view=view)} | "
            f"{sum(r.get('preempted', 0) for r in runs)} | {lat} | {tok} |"
        )
    return rows


def p99_rows(variant: dict[str, Any], view: str = "summary", seed: int | None = None) -> list[str]:
    """P99 TTFT and TBT per model beside the overall ones, the warm model first, with the ratios."""
    setups, warm = setups_of(variant), agg.warm_model(variant)
    models = sorted({m for r in variant.get("runs", []) for m in r.get(view, {}) if m != "overall"})
    groups = ["overall", *([warm] if warm in models else []), *[m for m in models if m != warm]]
    head = " | ".join(f"{s} TTFT P99 | {s} TBT P99" for s in setups)
    rows = [
        f"| group | {agg.OURS} done/total per run | {head} | TTFT ratio | TBT ratio |",
        "|---|---:|" + "---:|" * (2 * len(setups) + 2),
    ]
    for g in groups:
        ours = agg.ok_runs(variant, agg.OURS, seed)
        cells = [
            _s(agg.metric(variant, s, g, k, view, seed))
            for s in setups
            for k in ("ttft_p99_ms", "tbt_p99_ms")
        ]
        ratios = [
            _f(agg.median_ratio(variant, g, k, view, seed), ".2f") for k in ("ttft_p99_ms", "tbt_p99_ms")
        ]
        n = len(ours) or 1
        done = f"{_sum(ours, 'completed', g, view) / n:.0f}/{_sum(ours, 'requests', g, view) / n:.0f}"
        label = f"**{g} (warm)**" if g == warm else ("**overall**" if g == "overall" else g)
        rows.append(f"| {label} | {done} | " + " | ".join(cells + ratios) + " |")
    return rows


def core_busy(runs: list[dict], i: int) -> dict[str, float] | None:
    """Busy % of core i over the runs."""
    return agg.spread(100 * r["percore_busy"][i] for r in runs if len(r.get("percore_busy", [])) > i)


def pages_cell(run: dict) -> str:
    """Request KV pages after a run: ours' sum, `not read` when it did not answer, — for stock."""
    pages = run.get("request_pages_after")
    if pages is None:
        return "not read" if run.get("kind") == "crosspool" else "—"
    return str(sum(pages.values()))


def machine_rows(variant: dict[str, Any]) -> list[str]:
    """CPU of each side during its own replays, of the idle others meanwhile, and of each core."""
    setups = setups_of(variant)
    rows = [
        "| setup | OS threads | idle cores (before runs) | cores used by it in its replays | cores used by "
        "the idle others meanwhile | client cores | per-core busy % (machine) | load avg before → after |",
        "|---|---:|---:|---:|---:|---:|---|---|",
    ]
    for name in setups:
        runs = agg.ok_runs(variant, name)
        dep = variant["deployments"][name]
        own = agg.spread(r["cores_used"].get(name) for r in runs)
        others = agg.spread(sum(v for k, v in r["cores_used"].items() if k != name) for r in runs)
        client = agg.spread(r.get("client_cores") for r in runs)
        ncores = max((len(r.get("percore_busy", [])) for r in runs), default=0)
        per_core = ", ".join(f"cpu{i} {_s(core_busy(runs, i), '.0f')}" for i in range(ncores))
        before = agg.spread(r["loadavg_1m"][0] for r in runs)
        after = agg.spread(r["loadavg_1m"][1] for r in runs)
        rows.append(
            f"| {name} | {dep.get('threads', '—')} | {_f(dep.get('idle_cores'), '.3f')} | "
            f"{_s(own, '.2f')} | {_s(others, '.3f')} | "
            f"{_s(client, '.2f')} | {per_core or '—'} | {_s(before)} → {_s(after)} |"
        )
    return rows


def run_rows(variant: dict[str, Any]) -> list[str]:
    """Every replay in the order it ran."""
    warm = agg.warm_model(variant)
    rows = [
        f"| # | seed | repeat | setup | done/total | timeouts | TTFT P99 | TBT P99 | {warm} TTFT P99 | "
        f"{warm} TBT P99 | wall s | cores used | per-core busy % | load avg | request pages after |",
        "|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---|---|",
    ]
    for r in variant.get("runs", []):
        if r["status"] != "ok":
            rows.append(
                f"| {r['slot']} | {r['seed']} | {r['repeat']} | {r['setup']} | {r['status']} |" + " |" * 10
            )
            continue
        o, w = r["summary"]["overall"], r["summary"].get(warm, {})
        rows.append(
            f"| {r['slot']} | {r['seed']} | {r['repeat']} | {r['setup']} | "
            f"{o['completed']}/{o['requests']} | "
            f"{o['timeout']} | {_f(o['ttft_p99_ms'])} | {_f(o['tbt_p99_ms'])} | {_f(w.get('ttft_p99_ms'))} | "
            f"{_f(w.get('tbt_p99_ms'))} | {r['wall_s']:.1f} | {_f(r['cores_used'].get(r['setup']), '.2f')} | "
            f"{' '.join(f'{100 * x:.0f}' for x in r.get('percore_busy', []))} | "
            f"{r['loadavg_1m'][0]:.1f} → {r['loadavg_1m'][1]:.1f} | "
            f"{pages_cell(r)} |"
        )
    return rows


def trace_lines(variant: dict[str, Any]) -> list[str]:
    lines = []
    for seed, tr in variant.get("traces", {}).items():
        per_model = "; ".join(
            f"{m} {int(v['requests'])} (long {int(v['long_requests'])}, prompt max {int(v['max_prompt'])})"
            for m, v in tr["summary"].items()
        )
        lines.append(
            f"- trace seed {seed}: {tr['num_requests']} requests over "
            f"{tr['config']['duration_s']:.0f} s: {per_model}"
        )
    return lines


def variant_section(key: str, variant: dict[str, Any], png_stem: str) -> list[str]:
    warm = agg.warm_model(variant)
    kv = ", ".join(
        f"{n} {d['kv_total_bytes'] / 2**20:.2f} MiB" if d.get("kv_total_bytes") else f"{n} —"
        for n, d in variant.get("deployments", {}).items()
    )
    lines = [
        f"## {variant['title']}",
        "",
        *trace_lines(variant),
        f"- warm model (most requests over the seeds): **{warm}**",
        f"- KV budget: {variant['kv_budget_bytes'] / 2**20:.1f} MiB in total on every side; stock per model "
        + ", ".join(f"{m} {t} tokens" for m, t in variant["stock_kv_tokens"].items())
        + f"; as the servers report it: {kv}",
        f"- context length of the models: {variant['context_len']} tokens",
        "",
        "Latencies in ms, median over the runs [min–max]. TBT = time between streamed chunks. "
        f"Ratios = stock / {agg.OURS} of the medians (> 1: {agg.OURS} lower).",
        "",
        *overall_rows(variant),
        "",
        "P99 per model beside the overall one, pooled over seeds and repeats:",
        "",
        *p99_rows(variant),
        "",
    ]
    for seed in agg.seeds_of(variant):
        lines += [f"Seed {seed} only (median over its repeats):", "", *p99_rows(variant, seed=seed), ""]
    if any(
        t["summary"][m]["long_requests"] for t in variant.get("traces", {}).values() for m in t["summary"]
    ):
        lines += [
            "Ordinary requests only (long-prompt requests left out of the statistics, not of the run):",
            "",
            *overall_rows(variant, "summary_normal"),
            "",
            *p99_rows(variant, "summary_normal"),
            "",
        ]
    lines += [
        "Machine: cores used = CPU seconds of the deployment's process trees over the replay's wall time; "
        "per-core busy = machine-wide, every tenant included.",
        "",
        *machine_rows(variant),
        "",
        "<details><summary>every run, in the order it ran</summary>",
        "",
        *run_rows(variant),
        "",
        "</details>",
        "",
    ]
    rep = variant.get("representative")
    if rep:
        lines += [
            f"Plots from seed {rep['seed']}, repeat {rep['repeat']} "
            f"(the median {agg.OURS} P99 TBT of that seed):",
            "",
            f"![latency CDFs]({png_stem}_cdf.png)",
            f"![KV pool occupancy]({png_stem}_occupancy.png)",
            "",
        ]
    return lines


def acceptance_lines(report: dict[str, Any]) -> list[str]:
    return [f"- **{v['status']}** {v['name']}: {v['detail']}" for v in agg.acceptance(report)]


def render_markdown(report: dict[str, Any]) -> str:
    m, cfg = report["machine"], report.get("config", {})
    lines = [
        "# Multi-model bursty trace: crosspool vs stock SGLang",
        "",
        f"- date: {report['date']}",
        f"- command: `{report['command']}`",
        f"- machine: {m['cpu']}, {m['cores']} cores, {m['ram_gib']} GiB RAM, {m['gpu']}; "
        + ", ".join(f"{k} {v}" for k, v in m["versions"].items())
        + f"; load average at start {m['loadavg_at_start'][0]:.1f}",
        f"- wall time of the whole run: {report.get('wall_s', 0):.0f} s",
        f"- setups {', '.join(cfg.get('setups', []))}; seeds {cfg.get('seeds')}; "
        f"{cfg.get('repeats')} repeats, "
        "interleaved: every deployment started once per variant, then for each repeat and seed the setups "
        "in an order that alternates (each side first equally often), caches flushed before each replay",
        "",
        "## Acceptance (computed from the runs below)",
        "",
        *acceptance_lines(report),
        "",
    ]
    for key, variant in report["variants"].items():
        lines += variant_section(key, variant, f"{report['name']}_{key}")
    lines += ["## Setups", ""]
    for name, desc in report.get("settings", {}).items():
        lines += [
            f"- **{name}**: env `{' '.join(f'{k}={v}' for k, v in desc['env'].items()) or '(inherited)'}`",
            *[f"  - `{c}`" for c in desc["commands"]],
        ]
    lines += ["", "## Notes", "", *[f"- {n}" for n in report.get("notes", [])], ""]
    return "\n".join(lines)


def utilisation_note(report: dict[str, Any]) -> str:
    """The closing note: cores and per-core busy fractions of each side, over all its replays."""
    parts = []
    for key, v in report["variants"].items():
        for name in setups_of(v):
            runs = agg.ok_runs(v, name)
            if not runs:
                continue
            own = agg.spread(r["cores_used"].get(name) for r in runs)
            ncores = max(len(r.get("percore_busy", [])) for r in runs)
            per_core = "/".join(
                _f(agg.spread(100 * r["percore_busy"][i] for r in runs)["median"], ".0f")
                for i in range(ncores)
            )
            parts.append(f"{key} {name}: {_s(own, '.2f')} cores, per-core busy {per_core} %")
    return "Per-core utilisation of both sides during their replays (median [min–max]): " + "; ".join(parts)


def representative_view(variant: dict[str, Any]) -> dict[str, Any]:
    """The representative repeat in the one-trace layout earlier reports had (`trace`, `setups`), which
    `benchmarks/simulate.py` calibrates against."""
    rep = variant.get("representative")
    if not rep:
        return {}
    runs = [r for r in variant["runs"] if (r["seed"], r["repeat"]) == (rep["seed"], rep["repeat"])]
    return {
        "trace": variant["traces"][str(rep["seed"])],
        "setups": {r["setup"]: {k: r[k] for k in ("status", "summary", "preempted") if k in r} for r in runs},
    }


def with_aggregates(report: dict[str, Any]) -> dict[str, Any]:
    """The report plus computed medians/ratios/verdicts, for readers of the JSON alone."""
    out = dict(report)
    out["variants"] = {k: {**v, **representative_view(v)} for k, v in report["variants"].items()}
    out["acceptance"] = agg.acceptance(report)
    out["medians"] = {
        key: {
            "warm_model": agg.warm_model(v),
            "ratios_stock_over_ours": {
                g: {k: agg.median_ratio(v, g, k) for k in P_KEYS} for g in ("overall", agg.warm_model(v)) if g
            },
        }
        for key, v in report["variants"].items()
    }
    return out


def write_report(report: dict[str, Any], raw: dict[str, Any] | None, out_dir: Path, name: str) -> list[Path]:
    """`<name>.md`, `<name>.json`, `<name>_raw.json.gz` (when raw is given) and the PNGs."""
    out_dir.mkdir(parents=True, exist_ok=True)
    md = out_dir / f"{name}.md"
    md.write_text(render_markdown(report))
    js = out_dir / f"{name}.json"
    js.write_text(json.dumps(with_aggregates(report), indent=1) + "\n")
    paths = [md, js]
    if raw is not None:
        gz = out_dir / f"{name}_raw.json.gz"
        with gz.open("wb") as f, gzip.GzipFile(fileobj=f, mode="wb", mtime=0) as z:
            z.write(json.dumps(raw, separators=(",", ":")).encode())
        paths.append(gz)
        for key, variant in report["variants"].items():
            paths += plot_variant(f"{name}_{key}", variant, raw["variants"].get(key, {}), out_dir)
    return paths


def read_raw(path: Path) -> dict[str, Any]:
    with gzip.open(path, "rt") as f:
        return json.load(f)
