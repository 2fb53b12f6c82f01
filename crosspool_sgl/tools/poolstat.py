"""Watch a running server's pools, like `kvtop`: per-model KV pages, prefix cache, weights, queues.

    python -m crosspool_sgl.tools.poolstat [--url http://127.0.0.1:30000] [--interval 1] [--once]

Reads `GET /get_server_info` (the scheduler's `scheduler_info()`), so it sees
exactly what /metrics sees. `--once` prints one snapshot and exits (scripts,
tests); otherwise the view is redrawn in place every `--interval` seconds.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from typing import Any

_CLEAR = "\x1b[H\x1b[2J"
COLUMNS = (
    ("model", "<"),
    ("kv_pages", ">"),
    ("kv_used", ">"),
    ("kv_owned", ">"),
    ("prefix_pages", ">"),
    ("weights", "<"),
    ("resident", ">"),
    ("host", ">"),
    ("evict/reload", ">"),
    ("idle_s", ">"),
    ("waiting", ">"),
    ("running", ">"),
)


def fetch(url: str, timeout_s: float = 5.0) -> dict[str, Any]:
    with urllib.request.urlopen(url.rstrip("/") + "/get_server_info", timeout=timeout_s) as r:
        return json.loads(r.read())


def human(num_bytes: float | None) -> str:
    """Bytes as B/KiB/MiB/GiB with three significant digits; '-' when unknown."""
    if num_bytes is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(num_bytes) < 1024 or unit == "GiB":
            return f"{num_bytes:.0f}{unit}" if unit == "B" else f"{num_bytes:.3g}{unit}"
        num_bytes /= 1024
    return "-"  # unreachable


def model_rows(info: dict[str, Any]) -> list[dict[str, str]]:
    """One row per model; columns the server doesn't report show '-'."""
    kv, wp = info.get("kv_pool", {}), info.get("weight_pool", {})
    prefix = info.get("prefix_cache", {}).get("cached_pages", {})
    names = list(dict.fromkeys([*wp.get("model_bytes", {}), *kv.get("used_pages", {})]))
    rows = []
    for m in names:
        evictions, reloads = wp.get("evictions", {}).get(m), wp.get("reloads", {}).get(m)
        rows.append(
            {
                "model": m,
                "kv_pages": str(kv.get("used_pages", {}).get(m, "-")),
                "kv_used": human(kv.get("used_bytes", {}).get(m)),
                "kv_owned": human(kv.get("owned_bytes", {}).get(m)),
                "prefix_pages": str(prefix.get(m, "-")),
                "weights": wp.get("location", {}).get(m, "resident"),
                "resident": human(wp.get("resident_bytes", {}).get(m, wp.get("model_bytes", {}).get(m))),
                "host": human(wp.get("host_bytes", {}).get(m, 0)),
                "evict/reload": "-" if evictions is None else f"{evictions}/{reloads}",
                "idle_s": _num(wp.get("idle_s", {}).get(m)),
                "waiting": str(info.get("num_waiting", {}).get(m, "-")),
                "running": str(info.get("num_running", {}).get(m, "-")),
            }
        )
    return rows


def render(info: dict[str, Any], url: str) -> str:
    """The whole screen as text: a summary line per pool, then the per-model table."""
    kv, wp = info.get("kv_pool", {}), info.get("weight_pool", {})
    used_kv = sum(kv.get("used_bytes", {}).values())
    lines = [
        f"crosspool poolstat  {url}  steps={info.get('num_steps', '-')}  {time.strftime('%H:%M:%S')}",
        f"KV pool      total {human(kv.get('total_bytes'))}  used {human(used_kv)}  "
        f"free {human(kv.get('free_bytes'))}  chunks {kv.get('num_free_chunks', '-')}/"
        f"{kv.get('num_chunks', '-')} free",
        f"weights pool resident {human(wp.get('used_bytes'))}  arena {human(wp.get('capacity_bytes'))}  "
        f"max {human(wp.get('max_resident_bytes')) if wp.get('max_resident_bytes') else 'unbounded'}  "
        f"host {human(wp.get('host_bytes_total', 0))}  pinned {human(wp.get('pinned_host_bytes', 0))}",
        "",
    ]
    rows = model_rows(info)
    widths = {c: max([len(c), *(len(r[c]) for r in rows)]) for c, _ in COLUMNS}
    lines.append("  ".join(f"{c:{a}{widths[c]}}" for c, a in COLUMNS).rstrip())
    for r in rows:
        lines.append("  ".join(f"{r[c]:{a}{widths[c]}}" for c, a in COLUMNS).rstrip())
    return "\n".join(lines)


def _num(x: float | None) -> str:
    return "-" if x is None else f"{x:.1f}"


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m crosspool_sgl.tools.poolstat", description=__doc__.split("\n")[0]
    )
    p.add_argument("--url", default="http://127.0.0.1:30000", help="server base URL (default: %(default)s)")
    p.add_argument(
        "--interval", type=float, default=1.0, help="seconds between refreshes (default: %(default)s)"
    )
    p.add_argument("--once", action="store_true", help="print one snapshot and exit")
    args = p.parse_args(argv)
    try:
        return _loop(args.url, args.interval, args.once)
    except KeyboardInterrupt:
        return 0


def _loop(url: str, interval: float, once: bool) -> int:
    while True:
        try:
            screen = render(fetch(url), url)
        except (urllib.error.URLError, OSError, ValueError) as e:
            if once:
                print(f"poolstat: cannot read {url}/get_server_info: {e}", file=sys.stderr)
                return 1
            screen = f"poolstat: waiting for {url} ({e})"
        if once:
            print(screen)
            return 0
        sys.stdout.write(_CLEAR + screen + "\n")
        sys.stdout.flush()
        time.sleep(interval)


if __name__ == "__main__":
    sys.exit(main())
