"""Client disconnects at any moment end the request and free its KV pages at once."""

from __future__ import annotations

import json
import socket
import time
from urllib.parse import urlparse

import pytest

from crosspool_sgl.managers.io_struct import AbortReq
from tests.managers.offline_front import offline_front


def used_pages(server) -> int:
    return sum(server.get("/get_server_info").json()["kv_pool"]["used_pages"].values())


def wait_pages(server, pred, timeout_s: float) -> float:
    start = time.monotonic()
    while not pred(used_pages(server)):
        assert time.monotonic() - start < timeout_s, f"pages still {used_pages(server)}"
        time.sleep(0.1)
    return time.monotonic() - start


def raw_post(server, path: str, body: dict) -> socket.socket:
    """Send a request and leave the socket open (the client 'is there' until we close it)."""
    url = urlparse(server.base_url)
    sock = socket.create_connection((url.hostname, url.port))
    data = json.dumps(body).encode()
    head = (
        f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(data)}\r\n\r\n"
    )
    sock.sendall(head.encode() + data)
    return sock


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/completions", {"model": "llama", "prompt": "Tell me", "max_tokens": 3000, "ignore_eos": True}),
        ("/generate", {"text": "Tell me", "sampling_params": {"max_new_tokens": 3000, "ignore_eos": True}}),
        (
            "/v1/chat/completions",
            {
                "model": "mixtral",
                "messages": [{"role": "user", "content": "hi"}],
                "max_tokens": 3000,
                "ignore_eos": True,
                "n": 2,
            },
        ),
    ],
)
def test_non_streaming_disconnect_frees_pages_at_once(server, path, body):
    """It used to run to max_tokens (197 pages still held 30 s later)."""
    assert used_pages(server) == 0
    sock = raw_post(server, path, body)
    wait_pages(server, lambda n: n > 0, 20)  # it is decoding
    sock.close()
    took = wait_pages(server, lambda n: n == 0, 5)
    assert took < 3


def test_disconnect_during_long_prefill_frees_pages(server):
    """A long prompt is prefilled in chunks; leaving mid-way must stop it too."""
    sock = raw_post(
        server, "/generate", {"input_ids": [7] * 3500, "sampling_params": {"max_new_tokens": 500}}
    )
    time.sleep(0.05)
    sock.close()
    wait_pages(server, lambda n: n == 0, 5)


class _GoneClient:
    """A raw request whose client has already left."""

    headers: dict = {}

    async def is_disconnected(self) -> bool:
        return True


def test_disconnect_before_first_streamed_chunk_is_clean(tiny_models, tmp_path):
    """SGLang's streaming completion handler raised UnboundLocalError when no output came before the
    client left; the manager yields an aborted final result instead, and the request is aborted."""
    from sglang.srt.entrypoints.openai import protocol as oai
    from sglang.srt.runtime_context import use_context

    from crosspool_sgl.entrypoints.sglang_openai import SGLangOpenAIHandlers

    with offline_front(str(tiny_models["llama"]), tmp_path) as front:  # the scheduler never answers
        with use_context(front.context):
            handlers = SGLangOpenAIHandlers(front.hosted)

        async def run() -> list[str]:
            req = oai.CompletionRequest(
                model="llama", prompt="hi", max_tokens=5, stream=True, stream_options={"include_usage": True}
            )
            resp = await handlers.completion["llama"].handle_request(req, _GoneClient())
            return [c async for c in resp.body_iterator]

        chunks = front.run(run())
        assert chunks[-1].strip() == "data: [DONE]", chunks
        assert not any("error" in c for c in chunks), chunks
        # aborted at once (the scheduler's abort output then drops the state)
        (rid,) = front.hosted.managers["llama"].rid_to_state
        assert [m.rid for m in front.sent("llama", AbortReq)] == [rid]
