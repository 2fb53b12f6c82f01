"""Soak test: thousands of mixed requests over the demo models, with random client aborts, bad inputs
and n > 1, against one real server; then checks nothing was lost and nothing leaked.

    .venv/bin/python benchmarks/soak.py                   # 3000 requests, 8 clients (a few minutes)
    .venv/bin/python benchmarks/soak.py --quick           # 300 requests (CI: tests/reliability/test_soak.py)

Asserted (exit status 1 otherwise): every valid request completed (200) or got a clear 429; every bad
one got a 4xx with an OpenAI error body; no 5xx; KV pages held by requests back to 0 and, after
/flush_cache, allocated pages back to the idle baseline; pinned host memory back to its baseline; the
same process tree before and after and none left after SIGTERM; RSS growth of the tree bounded.
Writes results/soak.md and results/soak.json (unless --no-write).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlparse

import psutil
import requests

ROOT = Path(__file__).resolve().parent.parent
MODELS = {"qwen3moe": "qwen3_moe", "mixtral": "mixtral", "llama": "llama"}
BAD = [  # (route, raw body): each must get a 4xx
    ("/v1/completions", b'{"model": "llama", "prompt": "hi", "temperature": NaN}'),
    ("/generate", b'{"text": 123}'),
    ("/generate", b'{"text": "hi", "sampling_params": {"seed": "abc"}}'),
    ("/generate", b'{"text": "hi", "return_logprob": true, "top_logprobs_num": 1000}'),
    ("/v1/completions", b'{"model": "mixtral", "prompt": "hi", "n": 0}'),
    ("/v1/chat/completions", b'{"model": "nope", "messages": [{"role": "user", "content": "x"}]}'),
    ("/generate", b'{"text": "a\\ud800b"}'),
    ("/v1/completions", b'{"model": "llama", "prompt": "hi", "max_tokens": 100000}'),
    ("/generate", b'{"input_ids": [1, 99999]}'),
    ("/v1/completions", b'{"model": "llama", "prompt": '),
]
RSS_GROWTH_BOUND = (64 << 20, 0.25)  # at most max(64 MiB, 25%) over the post-warm-up baseline


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(log_path: Path, extra: list[str]) -> tuple[subprocess.Popen, str]:
    from crosspool_sgl.tools.make_tiny_models import ensure_tiny_models

    paths = ensure_tiny_models(names=list(MODELS.values()))
    port = free_port()
    cmd = [sys.executable, "-m", "crosspool_sgl.launch_server", "--port", str(port)]
    cmd += ["--kv-pool-bytes", "64M", "--log-level", "warning", "--max-pending-requests", "64"]
    for name, arch in MODELS.items():
        cmd += ["--model", f"{name}={paths[arch]}"]
    cmd += extra
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited: {log_path.read_text()[-2000:]}")
        try:
            if requests.get(url + "/health", timeout=2).status_code == 200:
                return proc, url
        except requests.RequestException:
            time.sleep(0.3)
    raise SystemExit("server did not start")


def valid_body(rng: random.Random) -> tuple[str, dict]:
    model = rng.choice(list(MODELS))
    max_tokens = rng.randint(1, 12)
    kind = rng.random()
    if kind < 0.4:
        body = {"model": model, "prompt": "Tell me " * rng.randint(1, 20), "max_tokens": max_tokens}
        body["n"] = rng.choice([1, 1, 2, 3])
        return "/v1/completions", body
    if kind < 0.7:
        msgs = [{"role": "user", "content": "hi " * rng.randint(1, 10)}]
        return "/v1/chat/completions", {"model": model, "messages": msgs, "max_tokens": max_tokens}
    sp = {"max_new_tokens": max_tokens, "temperature": rng.choice([0, 0.7, 1.0])}
    return f"/models/{model}/generate", {"text": "Once upon " * rng.randint(1, 30), "sampling_params": sp}


def aborted_request(url: str, path: str, body: dict, rng: random.Random) -> None:
    """Send, then leave at a random moment (before the first token, mid-stream, or mid-prefill)."""
    body = {**body, "stream": rng.random() < 0.5}
    if "max_tokens" in body:
        body.update(max_tokens=400, ignore_eos=True)
    else:
        body["sampling_params"].update(max_new_tokens=400, ignore_eos=True)
    u = urlparse(url)
    data = json.dumps(body).encode()
    with socket.create_connection((u.hostname, u.port), timeout=30) as sock:
        head = (
            f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(data)}\r\n\r\n"
        )
        sock.sendall(head.encode() + data)
        time.sleep(rng.choice([0.0, 0.01, 0.1, 0.3]))


def one_request(url: str, seed: int) -> str:
    """Run one random request; returns its outcome class."""
    rng = random.Random(seed)
    roll = rng.random()
    if roll < 0.2:
        route, raw = rng.choice(BAD)
        r = requests.post(url + route, data=raw, headers={"Content-Type": "application/json"}, timeout=120)
        ok = 400 <= r.status_code < 500 and r.json()["error"]["code"] == r.status_code
        return f"bad_{r.status_code}" if ok else f"UNEXPECTED_bad_{r.status_code}"
    path, body = valid_body(rng)
    if roll < 0.35:
        aborted_request(url, path, body, rng)
        return "aborted"
    stream = rng.random() < 0.3
    r = requests.post(url + path, json={**body, "stream": stream}, timeout=120, stream=stream)
    text = r.text  # reads the whole stream
    if r.status_code == 429:
        return "overloaded_429"
    if r.status_code != 200 or (stream and "[DONE]" not in text) or '"error"' in text:
        return f"UNEXPECTED_{r.status_code}"
    return "ok_stream" if stream else "ok"


def tree_of(pid: int) -> list[psutil.Process]:
    root = psutil.Process(pid)
    return [root, *root.children(recursive=True)]


def rss(procs: list[psutil.Process]) -> int:
    return sum(p.memory_info().rss for p in procs if p.is_running())


def pool_state(url: str) -> dict:
    info = requests.get(url + "/get_server_info", timeout=30).json()
    kv, wp = info["kv_pool"], info["weight_pool"]
    return {
        "request_pages": sum(kv["used_pages"].values()),
        "allocated_pages": sum(kv["allocated_pages"].values()),
        "pinned_host_bytes": wp.get("pinned_host_bytes", 0),
        "weight_model_bytes": wp.get("model_bytes", {}),
        "reloads": sum(wp.get("reloads", {}).values()),
    }


def wait_idle(url: str, timeout_s: float = 5) -> dict:
    """Aborted requests must be noticed at once (they ask for 400 tokens, far more than 5 s here)."""
    deadline = time.monotonic() + timeout_s
    while True:
        state = pool_state(url)
        if state["request_pages"] == 0 or time.monotonic() > deadline:
            return state
        time.sleep(0.2)


def run(args: argparse.Namespace) -> dict:
    log = Path(args.log or Path(tempfile.gettempdir()) / "crosspool-soak.log")
    extra = ["--max-resident-bytes", args.max_resident_bytes] if args.max_resident_bytes else []
    proc, url = start_server(log, extra)
    try:
        return soak(proc, url, args)
    finally:
        if proc.poll() is None:
            proc.kill()


def soak(proc: subprocess.Popen, url: str, args: argparse.Namespace) -> dict:
    tree = tree_of(proc.pid)
    baseline_pool = pool_state(url)
    outcomes: Counter = Counter()
    lock = threading.Lock()
    warm = max(args.requests // 10, 10)
    rss_before = 0
    t0 = time.monotonic()

    def task(i: int) -> None:
        nonlocal rss_before
        try:
            out = one_request(url, args.seed * 1_000_003 + i)
        except Exception as e:  # a client-side failure is an outcome too
            out = f"UNEXPECTED_client_{type(e).__name__}"
        with lock:
            outcomes[out] += 1
            if sum(outcomes.values()) == warm:
                rss_before = rss(tree)

    with ThreadPoolExecutor(args.clients) as pool:
        list(pool.map(task, range(args.requests)))
    elapsed = time.monotonic() - t0
    idle = wait_idle(url)
    requests.post(url + "/flush_cache", timeout=30)
    flushed = pool_state(url)
    rss_after = rss(tree)
    same_tree = {p.pid for p in tree_of(proc.pid)} == {p.pid for p in tree}
    proc.send_signal(signal.SIGTERM)
    rc = proc.wait(timeout=60)
    _, left = psutil.wait_procs(tree[1:], timeout=15)
    growth_ok = rss_after - rss_before <= max(RSS_GROWTH_BOUND[0], RSS_GROWTH_BOUND[1] * rss_before)
    checks = {
        "no unexpected outcome": not any(k.startswith("UNEXPECTED") for k in outcomes),
        "request pages back to 0": idle["request_pages"] == 0,
        "allocated pages back to baseline after flush": flushed["allocated_pages"]
        == baseline_pool["allocated_pages"],
        "pinned host memory back to baseline": flushed["pinned_host_bytes"]
        == baseline_pool["pinned_host_bytes"],
        "same process tree throughout": same_tree,
        "launcher exit 0 on SIGTERM": rc == 0,
        "no process left after SIGTERM": not left,
        "RSS growth bounded": growth_ok,
    }
    return {
        "requests": args.requests,
        "clients": args.clients,
        "seconds": round(elapsed, 1),
        "outcomes": dict(sorted(outcomes.items())),
        "pool_before": baseline_pool,
        "pool_after_idle": idle,
        "pool_after_flush": flushed,
        "rss_before_mib": round(rss_before / 2**20, 1),
        "rss_after_mib": round(rss_after / 2**20, 1),
        "processes": len(tree),
        "checks": checks,
    }


def write(result: dict, argv: list[str]) -> None:
    out = ROOT / "benchmarks" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "soak.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        "# Soak run",
        "",
        f"`python benchmarks/soak.py{''.join(' ' + a for a in argv)}` on {time.strftime('%Y-%m-%d')}, "
        f"{os.cpu_count()} CPUs, demo models {', '.join(MODELS)}.",
        "",
        f"- {result['requests']} requests from {result['clients']} clients in {result['seconds']} s",
        f"- outcomes: {result['outcomes']}",
        f"- KV pages held by requests after: {result['pool_after_idle']['request_pages']}; allocated "
        f"after flush: {result['pool_after_flush']['allocated_pages']} (baseline "
        f"{result['pool_before']['allocated_pages']})",
        f"- pinned host bytes: {result['pool_before']['pinned_host_bytes']} before, "
        f"{result['pool_after_flush']['pinned_host_bytes']} after",
        f"- RSS of the {result['processes']} processes: {result['rss_before_mib']} MiB after warm-up, "
        f"{result['rss_after_mib']} MiB at the end",
        "",
        "| check | passed |",
        "| --- | --- |",
        *[f"| {k} | {'yes' if v else 'NO'} |" for k, v in result["checks"].items()],
        "",
    ]
    (out / "soak.md").write_text("\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=3000)
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="300 requests (the CI variant)")
    p.add_argument("--no-write", action="store_true")
    p.add_argument("--log", help="server log file (default: crosspool-soak.log in the temp dir)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument(
        "--max-resident-bytes",
        default="900K",
        help="server's weights-pool bound, so cold models are evicted to (pinned) host memory and "
        "paged back during the run; '' for none (default: %(default)s)",
    )
    args = p.parse_args(argv)
    if args.quick:
        args.requests = 300
    result = run(args)
    print(json.dumps(result, indent=2) if args.json else result)
    if not args.no_write:
        write(result, argv)
    return 0 if all(result["checks"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
