"""--api-key: Bearer auth (constant-time compare) on every route but /health and /metrics."""

from __future__ import annotations

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from crosspool_sgl.entrypoints.auth import ApiKeyMiddleware
from crosspool_sgl.launch_server import parse_args


@pytest.fixture
def client() -> TestClient:
    app = FastAPI()
    for path in ("/health", "/metrics", "/generate", "/v1/completions", "/models/{m}/health"):
        app.add_api_route(path, lambda: {"ok": True}, methods=["GET", "POST"])
    app.add_middleware(ApiKeyMiddleware, api_key="s3cret", exempt=("/health", "/metrics"))
    return TestClient(app)


@pytest.mark.parametrize("header", [None, "Bearer wrong", "s3cret", "Bearer s3cret2", "bearer s3cret", ""])
def test_wrong_or_missing_key_is_401_with_openai_body(client, header):
    headers = {"Authorization": header} if header is not None else {}
    for path in ("/generate", "/v1/completions"):
        r = client.post(path, headers=headers)
        assert r.status_code == 401
        assert r.json()["error"]["type"] == "AuthenticationError" and r.json()["error"]["code"] == 401
        assert r.headers["www-authenticate"] == "Bearer"


def test_right_key_passes_and_exempt_routes_need_none(client):
    assert client.post("/v1/completions", headers={"Authorization": "Bearer s3cret"}).status_code == 200
    for path in ("/health", "/metrics", "/models/llama/health"):
        assert client.get(path).status_code == 200


def test_key_from_flag_or_environment(monkeypatch, tiny_models):
    model = f"llama={tiny_models['llama']}"
    monkeypatch.delenv("CROSSPOOL_API_KEY", raising=False)
    assert parse_args(["--model", model]).api_key is None
    assert parse_args(["--model", model, "--api-key", "k1"]).api_key == "k1"
    monkeypatch.setenv("CROSSPOOL_API_KEY", "k2")
    args = parse_args(["--model", model, "--api-key-exempt", "/health"])
    assert args.api_key == "k2" and args.api_key_exempt == ("/health",)
