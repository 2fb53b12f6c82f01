"""The real server with `--ffn-workers 1`: greedy tokens equal colocated mode, a dead worker gives 503.

One server for this module (the kill test runs last and leaves it without an FFN side).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import psutil
import pytest
import requests
from disagg_helpers import build, generate, make_reqs

from crosspool_sgl.server_args import DisaggArgs

SERVED = ("qwen3_moe", "qwen2_moe", "mixtral", "olmoe", "llama", "qwen2", "qwen3")
STARTUP_TIMEOUT_S = 120


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tiny_models, tmp_path_factory):
    port = _free_port()
    log_path = tmp_path_factory.mktemp("disagg_server") / "server.log"
    cmd = [sys.executable, "-m", "crosspool_sgl.launch_server", "--port", str(port), "--kv-pool-bytes", "32M"]
    cmd += ["--log-level", "warning", "--ffn-workers", "1", "--micro-batches", "2", "--ffn-timeout", "20"]
    for name in SERVED:
        cmd += ["--model", f"{name}={tiny_models[name]}"]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"}
        )
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while True:
        assert proc.poll() is None, log_path.read_text()[-3000:]
        assert time.monotonic() < deadline, log_path.read_text()[-3000:]
        try:
            if requests.get(base + "/health", timeout=5).status_code == 200:
                break
        except requests.RequestException:
            time.sleep(0.5)
    yield base, proc
    children = psutil.Process(proc.pid).children(recursive=True)
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=30)
    _, alive = psutil.wait_procs(children, timeout=15)
    assert not alive, f"orphans after SIGTERM: {alive}"


def _generate(base: str, model: str, ids: list[int], max_new_tokens: int) -> requests.Response:
    body = {
        "input_ids": ids,
        "sampling_params": {"temperature": 0, "max_new_tokens": max_new_tokens, "ignore_eos": True},
    }
    return requests.post(f"{base}/models/{model}/generate", json=body, timeout=60)


def test_greedy_tokens_equal_colocated_for_all_models_at_once(server, tiny_models):
    base, _ = server
    rt = build(tiny_models, SERVED, DisaggArgs())
    reqs = make_reqs(SERVED)
    want = generate(rt, reqs)
    with ThreadPoolExecutor(len(reqs)) as pool:  # concurrent: models share steps on the server
        futs = {r.rid: pool.submit(_generate, base, r.model, r.input_ids, 8) for r in reqs}
        got = {rid: f.result() for rid, f in futs.items()}
    for rid, resp in got.items():
        assert resp.status_code == 200, resp.text
        assert resp.json()["output_ids"] == want[rid], rid


def test_killed_ffn_worker_answers_503_fast(server):
    base, proc = server
    workers = [
        p
        for p in psutil.Process(proc.pid).children(recursive=True)
        if "crosspool_sgl.disagg.ffn_worker" in " ".join(p.cmdline())
    ]
    assert len(workers) == 1
    workers[0].kill()
    start = time.monotonic()
    resp = _generate(base, "mixtral", [5, 6, 7], 16)
    assert time.monotonic() - start < 15
    assert resp.status_code == 503, resp.text
    assert "FFN worker 0" in resp.text and "died" in resp.text, resp.text
    again = _generate(base, "llama", [1, 2], 2)  # still answers, still 503, no hang
    assert again.status_code == 503 and "FFN worker" in again.text
