"""One real server per test session: `python -m crosspool_sgl.launch_server` with three architectures.

Tests talk to it over HTTP only. The reference outputs come from an offline
Engine built in the test process on the same model directories.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests

# client-facing name -> tiny demo model (three different architectures)
SERVED = {"qwen3moe": "qwen3_moe", "mixtral": "mixtral", "llama": "llama"}
STARTUP_TIMEOUT_S = 180


@dataclass
class ServerHandle:
    base_url: str
    proc: subprocess.Popen
    model_paths: dict[str, str]
    log_path: Path

    def get(self, path: str, **kw) -> requests.Response:
        return requests.get(self.base_url + path, timeout=60, **kw)

    def post(self, path: str, **kw) -> requests.Response:
        return requests.post(self.base_url + path, timeout=120, **kw)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def model_paths() -> dict[str, str]:
    from crosspool_sgl.tools.make_tiny_models import ensure_tiny_models

    paths = ensure_tiny_models(names=list(SERVED.values()))
    return {name: str(paths[arch]) for name, arch in SERVED.items()}


@pytest.fixture(scope="session")
def server(model_paths: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerHandle]:
    port = free_port()
    log_path = tmp_path_factory.mktemp("server") / "server.log"
    cmd = [
        sys.executable,
        "-m",
        "crosspool_sgl.launch_server",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--kv-pool-bytes",
        "64M",
        "--log-level",
        "warning",
        # random-weight models would fill free JSON whitespace forever; llama: the model without a
        # tool-call parser (test_sampling_surface.py)
        "--constrained-json-max-whitespace-cnt",
        "2",
        "--tool-call-parser",
        "llama=none",
    ]
    for name, path in model_paths.items():
        cmd += ["--model", f"{name}={path}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    handle = ServerHandle(f"http://127.0.0.1:{port}", proc, model_paths, log_path)
    try:
        wait_healthy(handle)
        yield handle
    finally:
        stop_server(proc)


def wait_healthy(h: ServerHandle) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if h.proc.poll() is not None:
            pytest.fail(f"server exited with {h.proc.returncode}:\n{h.log_path.read_text()[-3000:]}")
        try:
            if requests.get(h.base_url + "/health", timeout=5).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.5)
    pytest.fail(f"server not healthy after {STARTUP_TIMEOUT_S}s:\n{h.log_path.read_text()[-3000:]}")


def stop_server(proc: subprocess.Popen) -> None:
    """SIGTERM, as an operator would; the launcher must stop its children itself (no orphans)."""
    import psutil

    children = psutil.Process(proc.pid).children(recursive=True) if proc.poll() is None else []
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    _, alive = psutil.wait_procs(children, timeout=15)
    for p in alive:
        p.kill()
    assert not alive, f"orphan processes after SIGTERM: {[p.pid for p in alive]}"


@pytest.fixture(scope="session")
def engine(model_paths: dict[str, str]):
    """The offline Engine on the same directories: the reference for greedy outputs."""
    from crosspool_sgl.engine import Engine

    eng = Engine(model_paths, kv_pool_bytes=64 << 20, show_progress=False)
    yield eng
    eng.shutdown()
