"""n > 1 and `sgl.fork` share the prompt's KV pages through the prefix cache; n < 1 is a 400.

The pool's occupancy in /get_server_info is polled while n samples of a long prompt decode: one
copy of the prompt's full pages plus each sample's own tail, not n copies of the prompt.
"""

from __future__ import annotations

import math
import threading
import time

import openai
import pytest
import requests
import sglang as sgl

MODEL = "llama"
PAGE = 16  # --page-tokens default (server_args)
PROMPT = " ".join(f"w{i}" for i in range(150))  # ~475 tokens: ~29 full pages
N, MAX_TOKENS = 4, 48


def used_pages(server) -> int:
    return server.get("/get_server_info").json()["internal_states"][0]["kv_pool"]["used_pages"][MODEL]


def flush(server) -> None:
    for _ in range(50):
        if server.post("/flush_cache").json()["success"]:
            return
        time.sleep(0.1)
    pytest.fail("the cache could not be flushed: requests still running")


def peak_pages_during(server, run) -> tuple[int, object]:
    """The highest pool occupancy of MODEL seen while `run()` runs, and its result."""
    peak, done = [0], threading.Event()

    def poll() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], used_pages(server))
            time.sleep(0.005)

    poller = threading.Thread(target=poll)
    poller.start()
    try:
        out = run()
    finally:
        done.set()
        poller.join()
    return peak[0], out


def test_n_samples_hold_one_copy_of_the_prompt_pages(server):
    flush(server)
    c = openai.OpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0, timeout=120)
    kw = dict(model=MODEL, prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=0.8, n=N)
    peak, out = peak_pages_during(server, lambda: c.completions.create(**kw, extra_body={"ignore_eos": True}))
    prompt_tokens = out.usage.prompt_tokens
    shared, tail = divmod(prompt_tokens, PAGE)
    assert shared >= 20
    own = math.ceil((tail + MAX_TOKENS) / PAGE)  # each sample's last prompt page and its decode
    assert len(out.choices) == N and out.usage.completion_tokens == N * MAX_TOKENS
    assert shared < peak <= shared + N * own, (peak, shared, own)  # n copies: >= N * shared


def test_native_n_samples_report_the_cached_prompt(server):
    flush(server)
    body = {"text": PROMPT, "sampling_params": {"max_new_tokens": 3, "n": 3, "temperature": 0.8, "seed": 1}}
    out = server.post(f"/models/{MODEL}/generate", json=body).json()
    assert isinstance(out, list) and len(out) == 3
    full_pages = out[0]["meta_info"]["prompt_tokens"] // PAGE * PAGE
    assert [r["meta_info"]["cached_tokens"] for r in out] == [full_pages] * 3
    assert len({tuple(r["output_ids"]) for r in out}) > 1  # distinct seeds per sample


@sgl.function
def _forked(s, prompt):
    s += prompt
    s.text()  # wait for it: the frontend commits the prefix before forking only once it is known
    forks = s.fork(3)
    for f in forks:
        f += sgl.gen("x", max_tokens=3, temperature=0.8)
    s["cached"] = [f.get_meta_info("x")["cached_tokens"] for f in forks]


def test_sgl_fork_shares_the_prefix(server):
    """SGLang's frontend sends the prefix prompt-only (`commit_lazy_operations`) before the forks."""
    flush(server)
    backend = sgl.RuntimeEndpoint(f"{server.base_url}/models/{MODEL}")
    state = _forked.run(prompt=PROMPT, backend=backend)
    assert min(state["cached"]) >= 20 * PAGE, state["cached"]


@pytest.mark.parametrize("n", [0, -1])
def test_n_below_one_is_a_400(server, n):
    for path, body in [
        ("/v1/completions", {"model": MODEL, "prompt": "hi", "n": n}),
        ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "n": n}),
        (f"/models/{MODEL}/generate", {"text": "hi", "sampling_params": {"n": n}}),
    ]:
        r = requests.post(server.base_url + path, json=body, timeout=30)
        assert r.status_code == 400, (path, r.text)
        assert "`n` must be an integer in [1," in r.json()["error"]["message"]
