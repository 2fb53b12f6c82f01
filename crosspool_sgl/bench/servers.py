"""Start the compared deployments on loopback, probe them, and stop them without leaving orphans.

Setups (same models, same total KV bytes, idle servers use no CPU, `OMP_NUM_THREADS=1` everywhere):
- `stock`: one stock `sglang.launch_server` per model, each with an equal byte share of the KV
  budget as `--max-total-tokens`, `--sleep-on-idle`, one torch thread: its fair settings on CPU, one
  core per model server;
- `crosspool-static`: our server with `--kv-partition static` (per-model partitions, same total);
- `crosspool-shared`: our server, one shared KV pool (colocated attention and FFN);
- `crosspool-disagg`: our server with `--ffn-workers 1` (attention and FFN in separate processes).
A crosspool setup whose flag the server does not have yet is reported as unavailable, not faked.
Our server gets no `--num-threads`: how many torch threads it runs is its own default's decision (an
explicit `torch.set_num_threads` in the server overrides the environment); the report shows the threads
in each process tree and the cores each side actually used.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

from crosspool_sgl.bench.monitor import tree_cpu_seconds, tree_rss, tree_threads

ROOT = Path(__file__).resolve().parents[2]
STUBS_DIR = ROOT / "patches" / "stubs"
HOST = "127.0.0.1"
COMMON_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
# SGLANG_USE_CPU_ENGINE=1 makes stock's is_cpu() true (else it imports vllm); see decode_throughput.py.
STOCK_ENV = {"SGLANG_USE_CPU_ENGINE": "1"}


@dataclass(frozen=True)
class ModelEntry:
    """A hosted model and what the benchmark needs to know about it."""

    name: str
    path: str
    vocab_size: int
    kv_bytes_per_token: int  # fp32 K+V over all layers


@dataclass(frozen=True)
class SetupSpec:
    name: str
    kind: str  # "stock" or "crosspool"
    flags: tuple[str, ...] = ()  # extra crosspool flags
    needs_flag: str | None = None  # the launch_server flag this setup depends on


SETUPS = {
    "stock": SetupSpec("stock", "stock"),
    "crosspool-static": SetupSpec(
        "crosspool-static", "crosspool", ("--kv-partition", "static"), "--kv-partition"
    ),
    "crosspool-shared": SetupSpec("crosspool-shared", "crosspool"),
    # One FFN worker with one torch thread: attention and FFN then use one thread each (two in all).
    "crosspool-disagg": SetupSpec(
        "crosspool-disagg", "crosspool", ("--ffn-workers", "1", "--ffn-num-threads", "1"), "--ffn-workers"
    ),
}


def model_entry(name: str, path: Path) -> ModelEntry:
    cfg = json.loads((path / "config.json").read_text())
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    kv_heads = cfg.get("num_key_value_heads") or cfg["num_attention_heads"]
    per_token = cfg["num_hidden_layers"] * 2 * kv_heads * head_dim * 4
    return ModelEntry(name, str(path), cfg["vocab_size"], per_token)


@cache
def crosspool_help() -> str:
    out = subprocess.run(
        [sys.executable, "-m", "crosspool_sgl.launch_server", "--help"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    return out.stdout


def unavailable_reason(spec: SetupSpec) -> str | None:
    """Why a setup can't run here (None if it can)."""
    if spec.needs_flag and spec.needs_flag not in crosspool_help():
        return f"launch_server has no {spec.needs_flag} flag yet"
    return None


def server_env(kind: str) -> dict[str, str]:
    env = {**os.environ, **COMMON_ENV}
    paths = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and Path(p).resolve() != STUBS_DIR]
    if kind == "stock":
        env.update(STOCK_ENV)
        paths.insert(0, str(STUBS_DIR))
    else:
        env.pop("SGLANG_USE_CPU_ENGINE", None)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *paths])
    return env


def stock_command(m: ModelEntry, port: int, kv_tokens: int) -> list[str]:
    return [
        sys.executable,
        "-m",
        "sglang.launch_server",
        "--model-path",
        m.path,
        "--served-model-name",
        m.name,
        "--host",
        HOST,
        "--port",
        str(port),
        "--device",
        "cpu",
        "--attention-backend",
        "torch_native",
        "--dtype",
        "float32",
        "--max-total-tokens",
        str(kv_tokens),
        "--sleep-on-idle",
        "--enable-metrics",
        "--log-level",
        "warning",
    ]


def crosspool_command(
    models: list[ModelEntry], port: int, kv_bytes: int, flags: tuple[str, ...]
) -> list[str]:
    cmd = [
        sys.executable,
        "-m",
        "crosspool_sgl.launch_server",
        "--host",
        HOST,
        "--port",
        str(port),
        "--device",
        "cpu",
        "--dtype",
        "float32",
        "--kv-pool-bytes",
        str(kv_bytes),
        "--log-level",
        "info",
    ]
    for m in models:
        cmd += ["--model", f"{m.name}={m.path}"]
    return cmd + list(flags)


def http_get(url: str, timeout: float = 5.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status, resp.read()
    except OSError:
        return 0, b""


def http_post_json(url: str, body: dict, timeout: float = 60.0) -> tuple[int, dict]:
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, json.loads(resp.read())
    except OSError as exc:
        return getattr(exc, "code", 0) or 0, {"error": repr(exc)}


def http_post_raw(url: str, timeout: float = 30.0) -> int:
    """POST without a body; the HTTP status (0 when unreachable)."""
    req = urllib.request.Request(url, b"", method="POST")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status
    except OSError as exc:
        return getattr(exc, "code", 0) or 0


@dataclass
class ServerProc:
    """One server process group (its own session, so stopping it stops its children too)."""

    proc: subprocess.Popen
    url: str
    log_path: Path
    models: list[ModelEntry]

    def stop(self, timeout_s: float = 20.0) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            pass
        with contextlib.suppress(ProcessLookupError):  # stragglers (stock's detokenizer) die with the group
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()


def start_server(cmd: list[str], kind: str, url: str, log_path: Path, models: list[ModelEntry]) -> ServerProc:
    with log_path.open("w") as log:
        log.write(" ".join(cmd) + "\n")
        log.flush()
        proc = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, env=server_env(kind), cwd=ROOT, start_new_session=True
        )
    return ServerProc(proc, url, log_path, models)


def wait_ready(servers: list[ServerProc], timeout_s: float) -> str | None:
    """Block until every server answers /health and one tiny completion per model; an error or None."""
    deadline = time.monotonic() + timeout_s
    pending = list(servers)
    while pending:
        if time.monotonic() > deadline:
            return f"not ready after {timeout_s:.0f} s: {[s.url for s in pending]}"
        for s in list(pending):
            if s.proc.poll() is not None:
                return f"{s.url} exited with code {s.proc.returncode} (log: {s.log_path})"
            if http_get(f"{s.url}/health", 2.0)[0] == 200:
                pending.remove(s)
        time.sleep(1.0)
    for s in servers:  # warm-up: first-call costs (lazy imports, allocator) are not part of the trace
        for m in s.models:
            body = {"model": m.name, "prompt": list(range(16, 40)), "max_tokens": 4, "temperature": 0.0}
            code, reply = http_post_json(f"{s.url}/v1/completions", body, timeout=120)
            if code != 200:
                return f"warm-up of {m.name} at {s.url} failed: HTTP {code} {str(reply)[:300]}"
    return None


def process_tree_rss(pid: int) -> int:
    """Resident bytes of a process and all its descendants (0 once it is gone)."""
    return tree_rss(pid)


def prometheus_value(text: str, metric: str) -> float:
    """Sum of a metric's samples over its label sets (0 if absent)."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith(metric) and line[len(metric) : len(metric) + 1] in ("{", " "):
            with contextlib.suppress(ValueError):
                total += float(line.rsplit(" ", 1)[1])
    return total


def crosspool_kv_used(info: dict[str, Any]) -> dict[str, float]:
    """Bytes of pages held by requests, per model. The server already leaves evictable prefix-cache
    pages out of `used_bytes`, as stock's `num_used_tokens` leaves out its evictable radix-cache tokens."""
    return {m: float(b) for m, b in info.get("kv_pool", {}).get("used_bytes", {}).items()}


@dataclass
class RunningSetup:
    """A started deployment: where each model is served, and how to read its pools and retractions."""

    spec: SetupSpec
    servers: list[ServerProc]
    routes: dict[str, str] = field(default_factory=dict)

    def rss_bytes(self) -> int:
        return sum(process_tree_rss(s.proc.pid) for s in self.servers)

    def kv_used_bytes(self) -> dict[str, float]:
        """KV bytes in use per model: our pool's page bytes; stock's used tokens x bytes per token."""
        if self.spec.kind == "crosspool":
            code, body = http_get(f"{self.servers[0].url}/get_server_info")
            return crosspool_kv_used(json.loads(body)) if code == 200 else {}
        out = {}
        for s in self.servers:
            code, body = http_get(f"{s.url}/metrics")
            if code == 200:
                m = s.models[0]
                out[m.name] = prometheus_value(body.decode(), "sglang:num_used_tokens") * m.kv_bytes_per_token
        return out

    def retractions(self) -> int:
        """Requests preempted (KV retracted and requeued) so far, from each server's own accounting."""
        if self.spec.kind == "crosspool":
            code, body = http_get(f"{self.servers[0].url}/get_server_info")
            if code != 200:
                return 0
            return sum(json.loads(body).get("planner_decisions", {}).get("preempt", {}).values())
        total = 0.0
        for s in self.servers:
            code, body = http_get(f"{s.url}/metrics")
            if code == 200:
                total += prometheus_value(body.decode(), "sglang:num_retracted_requests_total")
        return int(total)

    def alive(self) -> bool:
        return all(s.proc.poll() is None for s in self.servers)

    def num_threads(self) -> int:
        """OS threads in every server's process tree (torch's intra-op pool included)."""
        return sum(tree_threads(s.proc.pid) for s in self.servers)

    def cpu_seconds(self) -> float:
        """User + system CPU seconds of every server's process tree so far."""
        return sum(tree_cpu_seconds(s.proc.pid) for s in self.servers)

    def flush_caches(self, timeout_s: float = 15.0) -> list[int]:
        """POST /flush_cache to every server (both sides keep a prefix cache; a repeat must not find
        the last one's prompts warm). A server refuses while requests run, so retry until it agrees;
        the HTTP codes of the last attempts."""
        deadline = time.monotonic() + timeout_s
        codes = []
        for s in self.servers:
            code = 0
            while True:
                code = http_post_raw(f"{s.url}/flush_cache")
                if code == 200 or time.monotonic() > deadline:
                    break
                time.sleep(0.5)
            codes.append(code)
        return codes

    def request_pages(self) -> dict[str, int] | None:
        """KV pages held by requests per model (crosspool only; None for stock or no answer)."""
        if self.spec.kind != "crosspool":
            return None
        code, body = http_get(f"{self.servers[0].url}/get_server_info")
        if code != 200:
            return None
        return {m: int(n) for m, n in json.loads(body).get("kv_pool", {}).get("used_pages", {}).items()}

    def wait_request_pages_zero(self, timeout_s: float = 5.0) -> tuple[dict[str, int] | None, float]:
        """Poll until no request holds a page (aborted requests free theirs a step later); the last
        reading and the seconds waited."""
        start = time.monotonic()
        pages = self.request_pages()
        while pages is not None and any(pages.values()) and time.monotonic() - start < timeout_s:
            time.sleep(0.25)
            pages = self.request_pages()
        return pages, time.monotonic() - start

    def kv_total_bytes(self) -> int | None:
        """The KV bytes the servers say they have: ours from its pool, stock from
        `max_total_num_tokens` x KV bytes per token (None where a server does not say)."""
        total = 0
        for s in self.servers:
            code, body = http_get(f"{s.url}/get_server_info")
            if code != 200:
                return None
            info = json.loads(body)
            if self.spec.kind == "crosspool":
                total += int(info.get("kv_pool", {}).get("total_bytes", 0))
                continue
            tokens = find_key(info, "max_total_num_tokens")
            if tokens is None:
                return None
            total += int(tokens) * s.models[0].kv_bytes_per_token
        return total

    def stop(self) -> None:
        for s in self.servers:
            s.stop()


def find_key(obj: Any, key: str) -> Any:
    """The first value of `key` anywhere in nested dicts/lists (stock nests it in internal_states)."""
    if isinstance(obj, dict):
        if key in obj:
            return obj[key]
        obj = list(obj.values())
    if isinstance(obj, list):
        for item in obj:
            found = find_key(item, key)
            if found is not None:
                return found
    return None


def free_ports(n: int) -> int:
    """A base port with n free consecutive ports after it (best effort)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind((HOST, 0))
            base = s.getsockname()[1]
        if base + n < 65000 and all(_port_free(base + i) for i in range(n)):
            return base
    raise RuntimeError("no free ports")


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind((HOST, port))
        except OSError:
            return False
    return True


def launch(
    spec: SetupSpec,
    models: list[ModelEntry],
    kv_bytes: int,
    base_port: int,
    log_dir: Path,
    timeout_s: float,
    log: Callable[[str], None] = print,
) -> tuple[RunningSetup | None, str | None]:
    """Start a setup and wait until it serves; (running setup, None) or (None, why not)."""
    why = unavailable_reason(spec)
    if why:
        return None, why
    if spec.kind == "stock":
        share = kv_bytes // len(models)  # equal byte share of the same total
        servers = [
            start_server(
                stock_command(m, base_port + i, share // m.kv_bytes_per_token),
                "stock",
                f"http://{HOST}:{base_port + i}",
                log_dir / f"{spec.name}-{m.name}.log",
                [m],
            )
            for i, m in enumerate(models)
        ]
    else:
        servers = [
            start_server(
                crosspool_command(models, base_port, kv_bytes, spec.flags),
                "crosspool",
                f"http://{HOST}:{base_port}",
                log_dir / f"{spec.name}.log",
                models,
            )
        ]
    setup = RunningSetup(spec, servers, {m.name: s.url for s in servers for m in s.models})
    log(f"[{spec.name}] starting {len(servers)} server(s); logs in {log_dir}")
    error = wait_ready(servers, timeout_s)
    if error:
        setup.stop()
        return None, error
    return setup, None


def settings_description(spec: SetupSpec, models: list[ModelEntry], kv_bytes: int) -> dict[str, Any]:
    """The exact command lines (ports elided), for the report."""
    if spec.kind == "stock":
        share = kv_bytes // len(models)
        cmds = [" ".join(stock_command(m, 0, share // m.kv_bytes_per_token)[1:]) for m in models]
        env = {**COMMON_ENV, **STOCK_ENV, "PYTHONPATH": "patches/stubs"}
    else:
        cmds = [" ".join(crosspool_command(models, 0, kv_bytes, spec.flags)[1:])]
        env = dict(COMMON_ENV)
    return {"commands": cmds, "env": env}
