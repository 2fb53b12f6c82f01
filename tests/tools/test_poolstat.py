"""poolstat --once against a fake HTTP server that answers with a real scheduler_info()."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from crosspool_sgl import Engine
from crosspool_sgl.managers.scheduler_process import scheduler_info
from crosspool_sgl.tools.poolstat import human, main, model_rows


@pytest.fixture(scope="module")
def info(tiny_models) -> dict:
    """A real scheduler_info() with one model evicted to host and one request waiting."""
    models = {"moe": str(tiny_models["qwen3_moe"]), "mix": str(tiny_models["mixtral"])}
    eng = Engine(models=models, show_progress=False, max_resident_bytes=700_000)  # moe goes to host
    eng.generate(prompt="hello there", model="mix", sampling_params={"max_new_tokens": 2})
    return json.loads(json.dumps(scheduler_info(eng.runtime)))  # what HTTP carries


@pytest.fixture(scope="module")
def url(info: dict) -> Iterator[str]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            body = json.dumps({"version": "test", **info}).encode()
            self.send_response(200 if self.path == "/get_server_info" else 404)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_rows_show_residency_and_queues(info: dict):
    rows = {r["model"]: r for r in model_rows(info)}
    assert set(rows) == {"moe", "mix"}
    assert rows["moe"]["weights"] == "host" and rows["moe"]["resident"] == "0B"
    assert rows["moe"]["host"] == human(info["weight_pool"]["model_bytes"]["moe"]) == "648KiB"
    assert rows["mix"]["weights"] == "resident" and rows["mix"]["host"] == "0B"
    assert rows["moe"]["evict/reload"] == "1/0"
    assert rows["mix"]["waiting"] == "0" and rows["mix"]["running"] == "0"


def test_once_prints_one_snapshot(url: str, capsys):
    assert main(["--url", url, "--once"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("model"))
    assert lines[header].split() == [
        "model", "kv_pages", "kv_used", "kv_owned", "prefix_pages", "weights",
        "resident", "host", "evict/reload", "idle_s", "waiting", "running",
    ]  # fmt: skip
    table = {line.split()[0]: line.split() for line in lines[header + 1 :]}
    assert table["moe"][5] == "host" and table["mix"][5] == "resident"
    assert "max 684KiB" in out and "host 648KiB" in out


def test_once_as_a_command_and_a_clear_error_when_unreachable(url: str):
    ok = subprocess.run(
        [sys.executable, "-m", "crosspool_sgl.tools.poolstat", "--url", url, "--once"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert ok.returncode == 0 and "weights pool" in ok.stdout
    assert main(["--url", "http://127.0.0.1:9", "--once"]) == 1
