"""Bad input -> 4xx with a clear message (and the server keeps serving); disconnects free KV pages;
startup with a bad model fails fast, naming it."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests


def error_of(resp: requests.Response) -> dict:
    body = resp.json()
    assert set(body["error"]) >= {"message", "type", "param", "code"}, body
    return body["error"]


@pytest.mark.parametrize(
    ("path", "body", "status", "needle"),
    [
        ("/v1/completions", b'{"model": "llama", "prompt": ', 400, "malformed JSON"),
        ("/v1/chat/completions", b"not json", 400, "malformed JSON"),
        ("/v1/completions", {"model": "nope", "prompt": "hi"}, 404, "qwen3moe, mixtral, llama"),
        (
            "/v1/chat/completions",
            {"model": "nope", "messages": [{"role": "user", "content": "x"}]},
            404,
            "nope",
        ),
        ("/v1/completions", {"model": "llama", "prompt": "hi", "max_tokens": -1}, 400, "max_tokens"),
        ("/v1/completions", {"model": "llama", "prompt": "hi", "temperature": -0.5}, 400, "temperature"),
        ("/v1/completions", {"model": "llama", "prompt": "hi " * 5000}, 400, "context length"),
        ("/generate", {"text": "hi", "sampling_params": {"max_new_tokens": -3}}, 400, "max_new_tokens"),
        ("/generate", {"text": "hi", "sampling_params": {"temperature": -1}}, 400, "temperature"),
        ("/generate", {"input_ids": [10**9]}, 400, "input_ids"),
        ("/generate", {"sampling_params": {}}, 400, "text"),
        ("/models/nope/generate", {"text": "hi"}, 404, "nope"),
    ],
)
def test_bad_input_is_a_clear_4xx(server, path, body, status, needle):
    kw = {"data": body} if isinstance(body, bytes) else {"json": body}
    resp = server.post(path, **kw)
    assert resp.status_code == status, resp.text
    assert needle in error_of(resp)["message"]
    assert server.get("/health").status_code == 200


def test_server_serves_after_bad_input(server):
    r = server.post("/v1/completions", json={"model": "llama", "prompt": "hi", "max_tokens": 2})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2


def used_pages(server) -> dict[str, int]:
    return server.get("/get_server_info").json()["kv_pool"]["used_pages"]


def test_disconnect_mid_stream_frees_pages(server):
    for path, body in (
        (
            "/v1/completions",
            {"model": "mixtral", "prompt": "Tell me", "max_tokens": 2000, "stream": True, "ignore_eos": True},
        ),
        (
            "/models/llama/generate",
            {
                "text": "Tell me",
                "stream": True,
                "sampling_params": {"max_new_tokens": 2000, "ignore_eos": True},
            },
        ),
    ):
        resp = requests.post(server.base_url + path, json=body, stream=True, timeout=60)
        lines = resp.iter_lines()
        got = [next(lines) for _ in range(3)]  # a few tokens are out: the request holds pages
        assert any(ln.startswith(b"data:") for ln in got)
        assert sum(used_pages(server).values()) > 0
        resp.close()  # disconnect
    deadline = time.monotonic() + 30
    while sum(used_pages(server).values()) and time.monotonic() < deadline:
        time.sleep(0.3)
    assert used_pages(server) == {m: 0 for m in server.model_paths}
    metrics = server.get("/metrics").text
    assert 'crosspool_kv_used_bytes{model="mixtral"} 0.0' in metrics


def run_launcher(*args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "crosspool_sgl.launch_server", "--port", "1", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def test_startup_with_missing_dir_fails_naming_it(tmp_path: Path):
    missing = tmp_path / "no_such_model"
    r = run_launcher("--model", f"ghost={missing}")
    assert r.returncode != 0
    assert "ghost" in r.stderr and str(missing) in r.stderr


def test_startup_with_unsupported_architecture_fails_naming_it(tmp_path: Path, model_paths):
    bad = tmp_path / "bert"
    bad.mkdir()
    cfg = json.loads((Path(model_paths["llama"]) / "config.json").read_text())
    cfg["architectures"] = ["BertForMaskedLM"]
    (bad / "config.json").write_text(json.dumps(cfg))
    r = run_launcher("--model", f"ok={model_paths['llama']}", "--model", f"weird={bad}")
    assert r.returncode != 0
    assert "weird" in r.stderr and "BertForMaskedLM" in r.stderr


def test_help_documents_every_flag():
    r = subprocess.run(
        [sys.executable, "-m", "crosspool_sgl.launch_server", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0
    for flag in (
        "--model",
        "--config",
        "--host",
        "--port",
        "--device",
        "--dtype",
        "--kv-pool-bytes",
        "--max-running-requests",
        "--chunked-prefill-size",
        "--page-size",
    ):
        assert flag in r.stdout
