"""Fault injection: a child process (scheduler, detokenizer, FFN worker) killed with SIGKILL makes the
HTTP side answer 503 at once for in-flight and new requests, /health unhealthy, and the launcher exit
non-zero naming the child, leaving no process behind; SIGTERM drains in-flight requests first.

Each test owns its server (it is killed), one small model, so the module stays well under a minute."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
import requests


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Launcher:
    def __init__(self, model_path: str, log: Path, *extra: str) -> None:
        self.url = f"http://127.0.0.1:{free_port()}"
        cmd = [sys.executable, "-m", "crosspool_sgl.launch_server", "--port", self.url.rsplit(":", 1)[1]]
        cmd += ["--model", f"llama={model_path}", "--kv-pool-bytes", "16M", "--log-level", "warning", *extra]
        self.log = log
        with open(log, "wb") as f:
            env = {**os.environ, "OMP_NUM_THREADS": "1"}
            # its own session: a signal to its process group reaches none of the test's processes
            self.proc = subprocess.Popen(
                cmd, stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True
            )
        deadline = time.monotonic() + 180
        while True:
            assert self.proc.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, "server did not start"
            try:
                if requests.get(self.url + "/health", timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                time.sleep(0.3)
        self.pids = requests.get(self.url + "/get_server_info", timeout=10).json()["processes"]
        self.tree = psutil.Process(self.proc.pid).children(recursive=True)

    def stream(self, out: dict) -> None:
        """A long streamed completion; records its events and when it ended."""
        body = {"model": "llama", "prompt": "Tell me", "max_tokens": 3000, "ignore_eos": True, "stream": True}
        out["events"] = []
        try:
            with requests.post(self.url + "/v1/completions", json=body, stream=True, timeout=60) as r:
                for line in r.iter_lines():
                    if line:
                        out["events"].append(line.decode())
        except requests.RequestException as e:
            out["events"].append(f"exception: {e}")
        out["ended"] = time.monotonic()

    def assert_exits_nonzero_naming(self, needle: str) -> None:
        rc = self.proc.wait(timeout=30)
        log = self.log.read_text()
        assert rc != 0, log[-3000:]
        assert f"error: the {needle}" in log, log[-3000:]
        self.assert_no_orphans()

    def assert_no_orphans(self) -> None:
        _, alive = psutil.wait_procs(self.tree, timeout=15)
        for p in alive:
            p.kill()
        assert not alive, f"orphans: {[(p.pid, p.cmdline()) for p in alive]}"


@pytest.fixture
def llama(tiny_models) -> str:
    return str(tiny_models["llama"])


def kill_child_during_requests(srv: Launcher, pid: int) -> None:
    out: dict = {}
    t = threading.Thread(target=srv.stream, args=(out,))
    t.start()
    deadline = time.monotonic() + 30
    while len(out.get("events", [])) < 3:
        assert time.monotonic() < deadline and t.is_alive(), out
        time.sleep(0.02)
    os.kill(pid, signal.SIGKILL)
    killed = time.monotonic()
    while (health := requests.get(srv.url + "/health", timeout=5)).status_code == 200:
        assert time.monotonic() - killed < 1.0, "/health still healthy 1 s after the death"
        time.sleep(0.02)
    assert health.status_code == 503 and health.json()["status"] == "unhealthy", health.text
    new = requests.post(srv.url + "/generate", json={"text": "hi"}, timeout=5)
    assert new.status_code == 503 and new.json()["error"]["code"] == 503, new.text
    t.join(timeout=10)
    assert not t.is_alive(), "the in-flight stream hangs"
    assert out["ended"] - killed < 3
    assert any("503" in e for e in out["events"][-3:]), out["events"][-3:]


def test_scheduler_killed(llama, tmp_path):
    srv = Launcher(llama, tmp_path / "log")
    kill_child_during_requests(srv, srv.pids["scheduler"])
    srv.assert_exits_nonzero_naming("scheduler process")


def test_detokenizer_killed(llama, tmp_path):
    srv = Launcher(llama, tmp_path / "log")
    kill_child_during_requests(srv, srv.pids["detokenizer"])
    srv.assert_exits_nonzero_naming("detokenizer process")


def test_ffn_worker_killed(llama, tmp_path):
    srv = Launcher(llama, tmp_path / "log", "--ffn-workers", "1")
    (worker,) = srv.pids["ffn_workers"]
    kill_child_during_requests(srv, worker)
    srv.assert_exits_nonzero_naming("FFN worker 0")


@pytest.mark.parametrize("to", ["launcher", "process group"])
def test_sigterm_drains_in_flight_requests(llama, tmp_path, to):
    """SIGTERM to the launcher, or to its whole process group as systemd sends it: the request in
    flight still completes, the launcher exits 0 and reports no child's death."""
    srv = Launcher(llama, tmp_path / "log", "--shutdown-grace", "30")
    out: dict = {}

    def send() -> None:
        body = {"model": "llama", "prompt": "Tell me", "max_tokens": 200, "ignore_eos": True}
        out["resp"] = requests.post(srv.url + "/v1/completions", json=body, timeout=60)

    t = threading.Thread(target=send)
    t.start()
    while not sum(
        requests.get(srv.url + "/get_server_info", timeout=5).json()["kv_pool"]["used_pages"].values()
    ):
        time.sleep(0.02)
    if to == "launcher":
        srv.proc.send_signal(signal.SIGTERM)
    else:
        os.killpg(srv.proc.pid, signal.SIGTERM)
    t.join(timeout=60)
    assert out["resp"].status_code == 200, out["resp"].text
    assert out["resp"].json()["usage"]["completion_tokens"] == 200
    assert srv.proc.wait(timeout=30) == 0, srv.log.read_text()[-3000:]
    assert "error: the" not in srv.log.read_text()
    srv.assert_no_orphans()


def test_launcher_killed_takes_its_children_along(llama, tmp_path):
    """SIGKILL on the launcher: no handler runs, so every child must notice by itself (the scheduler
    polls its parent; the detokenizer, whose OS parent is the fork server on CPU, watches the launcher)."""
    srv = Launcher(llama, tmp_path / "log")
    assert {"scheduler", "detokenizer"} <= set(srv.pids)
    srv.proc.kill()
    srv.proc.wait(timeout=10)
    srv.assert_no_orphans()
