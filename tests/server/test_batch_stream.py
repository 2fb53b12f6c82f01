"""Streaming a batch on /generate (SGLang's shape): cumulative results, each with its `index`."""

from __future__ import annotations

import json

import requests

MODEL = "mixtral"


def events(server, body: dict) -> list[dict]:
    with requests.post(
        f"{server.base_url}/models/{MODEL}/generate", json=body, stream=True, timeout=120
    ) as r:
        assert r.status_code == 200, r.text
        lines = [ln[len(b"data: ") :] for ln in r.iter_lines() if ln.startswith(b"data: ")]
    assert lines[-1] == b"[DONE]"
    return [json.loads(ln) for ln in lines[:-1]]


def test_a_streamed_batch_adds_up_to_the_batch(server):
    params = {"max_new_tokens": 8, "temperature": 0}
    body = {"text": ["The capital of France is", "1, 2, 3,"], "sampling_params": params}
    full = server.post(f"/models/{MODEL}/generate", json=body).json()
    got = events(server, {**body, "stream": True})
    assert {e["index"] for e in got} == {0, 1}
    last = {e["index"]: e for e in got}  # cumulative: the last event of an index is its result
    for i, r in enumerate(full):
        assert last[i]["text"] == r["text"] and last[i]["output_ids"] == r["output_ids"]
        assert last[i]["meta_info"]["finish_reason"] == r["meta_info"]["finish_reason"]
        texts = [e["text"] for e in got if e["index"] == i]
        assert all(b.startswith(a) for a, b in zip(texts, texts[1:], strict=False))


def test_n_samples_stream_with_their_index(server):
    body = {"text": "Hello", "sampling_params": {"max_new_tokens": 4, "n": 3, "seed": 7}, "stream": True}
    got = events(server, body)
    assert {e["index"] for e in got} == {0, 1, 2}
    assert all(e["meta_info"]["completion_tokens"] <= 4 for e in got)
