"""PNG plots of one representative repeat: latency CDFs and KV occupancy over time, every setup.

Drawn from the raw sidecar (per-request records and sampler series), so they can be redrawn later.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def record_latencies(records: list[dict[str, Any]]) -> tuple[list[float], list[float]]:
    """(TTFTs, TBTs) in ms of the completed requests of a compact raw run."""
    ttft = [r["ttft_ms"] for r in records if r["status"] == "ok" and r.get("ttft_ms") is not None]
    tbt = [
        b - a
        for r in records
        if r["status"] == "ok"
        for a, b in zip(r["chunks_ms"], r["chunks_ms"][1:], strict=False)
    ]
    return ttft, tbt


def representative_runs(variant: dict[str, Any], raw_variant: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """setup -> raw run of the representative (seed, repeat)."""
    rep = variant.get("representative")
    if not rep:
        return {}
    return {
        r["setup"]: r
        for r in raw_variant.get("runs", [])
        if r["seed"] == rep["seed"] and r["repeat"] == rep["repeat"]
    }


def plot_variant(
    stem: str, variant: dict[str, Any], raw_variant: dict[str, Any], out_dir: Path
) -> list[Path]:
    """`<stem>_cdf.png` and `<stem>_occupancy.png` (none when no representative run exists)."""
    runs = representative_runs(variant, raw_variant)
    if not runs:
        return []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rep = variant["representative"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for idx, title in ((0, "TTFT"), (1, "time between tokens")):
        ax = axes[idx]
        for name, run in runs.items():
            xs = sorted(record_latencies(run["records"])[idx])
            if xs:
                ax.plot(xs, [(i + 1) / len(xs) for i in range(len(xs))], label=name)
        ax.set_xscale("log")
        ax.set_xlabel("ms (log)")
        ax.set_ylabel("CDF")
        ax.set_title(f"{title} — {variant['title']}\nseed {rep['seed']}, repeat {rep['repeat']}", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    paths = [out_dir / f"{stem}_cdf.png"]
    fig.tight_layout()
    fig.savefig(paths[0], dpi=110)
    plt.close(fig)
    paths.append(plot_occupancy(stem, variant, runs, out_dir, plt))
    return paths


def plot_occupancy(stem: str, variant: dict[str, Any], runs: dict[str, Any], out_dir: Path, plt: Any) -> Path:
    """Stacked KV bytes in use per model over time, one panel per setup, the total budget as a line."""
    fig, axes = plt.subplots(len(runs), 1, figsize=(10, 2.4 * len(runs)), sharex=True, squeeze=False)
    budget_mib = variant["kv_budget_bytes"] / 2**20
    for ax, (name, run) in zip(axes[:, 0], runs.items(), strict=False):
        series = run["samples"]
        models = sorted({k for sample in series["kv_used_bytes"] for k in sample})
        ys = [[max(0.0, s.get(m, 0.0)) / 2**20 for s in series["kv_used_bytes"]] for m in models]
        if series["t_s"] and models:
            ax.stackplot(series["t_s"], ys, labels=models, alpha=0.8)
        ax.axhline(budget_mib, color="k", lw=0.8, ls="--", label="total budget")
        ax.set_ylabel("KV MiB")
        ax.set_title(name, fontsize=9)
        ax.legend(fontsize=7, loc="upper right", ncol=len(models) + 1)
    axes[-1, 0].set_xlabel("seconds since trace start")
    fig.suptitle(f"KV pool occupancy — {variant['title']}", fontsize=10)
    fig.tight_layout()
    path = out_dir / f"{stem}_occupancy.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
