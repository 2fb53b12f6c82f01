"""SGLang's native API and the frontend language (`sgl.function` through RuntimeEndpoint) by model prefix."""

from __future__ import annotations

import json

import requests
import sglang as sgl


def test_generate_shape_and_logprobs(server, engine):
    r = server.post(
        "/models/llama/generate",
        json={
            "text": "Hello",
            "sampling_params": {"max_new_tokens": 5, "temperature": 0},
            "return_logprob": True,
            "logprob_start_len": 0,
            "top_logprobs_num": 2,
            "return_text_in_logprobs": True,
        },
    )
    assert r.status_code == 200, r.text
    body = r.json()
    ref = engine.generate(
        prompt="Hello", model="llama", sampling_params={"max_new_tokens": 5, "temperature": 0}
    )
    assert body["text"] == ref["text"] and body["output_ids"] == ref["output_ids"]
    meta = body["meta_info"]
    assert meta["finish_reason"] == {"type": "length", "length": 5}
    assert meta["prompt_tokens"] == ref["meta_info"]["prompt_tokens"] and meta["completion_tokens"] == 5
    assert len(meta["input_token_logprobs"]) == meta["prompt_tokens"]
    assert meta["input_token_logprobs"][0][0] is None
    assert [e[1] for e in meta["output_token_logprobs"]] == body["output_ids"]
    assert all(isinstance(e[2], str) for e in meta["output_token_logprobs"])
    assert all(len(row) == 2 for row in meta["output_top_logprobs"])


def test_generate_batch_and_stream(server):
    r = server.post("/generate", json={"text": ["a b", "c d"], "sampling_params": {"max_new_tokens": 3}})
    assert r.status_code == 200 and len(r.json()) == 2
    assert r.json()[0]["meta_info"]["model"] == "qwen3moe"  # the root targets the first model
    with requests.post(
        server.base_url + "/models/mixtral/generate",
        stream=True,
        timeout=60,
        json={
            "text": "Hello",
            "stream": True,
            "sampling_params": {"max_new_tokens": 4, "temperature": 0},
        },
    ) as resp:
        lines = [ln.decode() for ln in resp.iter_lines() if ln]
    assert lines[-1] == "data: [DONE]"
    events = [json.loads(ln[len("data: ") :]) for ln in lines[:-1]]
    texts = [e["text"] for e in events]
    assert all(texts[i + 1].startswith(texts[i]) for i in range(len(texts) - 1))  # cumulative
    assert events[-1]["meta_info"]["completion_tokens"] == 4


def test_info_routes(server):
    for prefix in ("", "/models/mixtral"):
        info = server.get(prefix + "/get_model_info").json()
        assert info["model_path"] == server.model_paths[prefix.rsplit("/", 1)[-1] or "qwen3moe"]
        assert server.get(prefix + "/model_info").status_code == 200
        assert server.get(prefix + "/health").status_code == 200
        assert server.get(prefix + "/server_info").status_code == 200
    assert server.get("/models/llama/health_generate").status_code == 200
    si = server.get("/get_server_info").json()
    assert set(si["kv_pool"]["used_pages"]) == set(server.model_paths)
    assert server.post("/flush_cache").status_code == 200
    metrics = server.get("/metrics").text
    for name in (
        "crosspool_requests_total",
        "crosspool_time_to_first_token_seconds_bucket",
        "crosspool_inter_token_latency_seconds_bucket",
        "crosspool_num_queue_reqs",
        "crosspool_kv_used_bytes",
        "crosspool_kv_free_bytes",
        "crosspool_weights_pool_bytes",
    ):
        assert f'{name}{{model="mixtral"' in metrics or f"{name}{{" in metrics, name
    # every model that served a request was granted KV chunks by the planner, and it shows
    for model in server.model_paths:
        assert f'crosspool_kv_planner_decisions_total{{decision="grant",model="{model}"}}' in metrics


@sgl.function
def story(s, topic):
    s += "Topic: " + topic + "\n"
    s += "Mood: " + sgl.select("mood", choices=["happy", "sad", "angry"]) + "\n"
    forks = s.fork(2)
    for i, f in enumerate(forks):
        f += f"Line {i}:" + sgl.gen("line", max_tokens=6, temperature=0)
    s += "Summary:" + sgl.gen("summary", max_tokens=6, temperature=0)
    s["lines"] = [f["line"] for f in forks]


def test_frontend_program_on_two_models(server):
    """gen + select + fork through RuntimeEndpoint, each model addressed by its prefix."""
    results = {}
    for model in ("mixtral", "llama"):
        backend = sgl.RuntimeEndpoint(f"{server.base_url}/models/{model}")
        state = story.run(topic="the sea", backend=backend)
        assert state["mood"] in ("happy", "sad", "angry")
        assert len(state["lines"]) == 2 and all(isinstance(x, str) for x in state["lines"])
        assert (
            state["lines"][0]
            == server.post(
                f"/models/{model}/generate",
                json={
                    "text": f"Topic: the sea\nMood: {state['mood']}\nLine 0:",
                    "sampling_params": {"max_new_tokens": 6, "temperature": 0},
                },
            ).json()["text"]
        )
        results[model] = state["summary"]
    assert set(results) == {"mixtral", "llama"}
