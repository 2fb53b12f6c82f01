"""A streamed response adds up to the non-streamed one: text, finish reason and logprob entries.

Every combination of route (completions, chat), stop string (none, one spanning two tokens) and
logprobs (off, on), greedy, with the real `openai` client. The stop string is cut from the
model's own greedy output across a token boundary, so its first part arrives one token before it
matches: the case where a stream used to show text the final response trims.
"""

from __future__ import annotations

import openai
import pytest
from transformers import AutoTokenizer

MAX_TOKENS = 16
MODELS = ["qwen3moe", "llama"]


def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0, timeout=120)


def request_kwargs(route: str, model: str) -> dict:
    kw = {"model": model, "max_tokens": MAX_TOKENS, "temperature": 0}
    if route == "chat":
        return {**kw, "messages": [{"role": "user", "content": "Once upon a time"}]}
    return {**kw, "prompt": "The quick brown fox"}


def create(c: openai.OpenAI, route: str, **kw):
    return (c.chat.completions if route == "chat" else c.completions).create(**kw)


def spanning_stop(server, c: openai.OpenAI, route: str, model: str) -> str:
    """Three characters of the greedy output: two ending one token, one starting the next."""
    out = create(c, route, **request_kwargs(route, model), extra_body={"return_token_ids": True})
    choice = out.choices[0]
    ids = choice.response_token_ids if route == "chat" else choice.token_ids
    text = choice.message.content if route == "chat" else choice.text
    tok = AutoTokenizer.from_pretrained(server.model_paths[model])
    for k in range(1, len(ids)):
        head, longer = tok.decode(ids[:k]), tok.decode(ids[: k + 1])
        if len(head) < 2 or len(longer) <= len(head) or not text.startswith(longer):
            continue
        stop = text[len(head) - 2 : len(head) + 1]
        if "\ufffd" not in stop and text.find(stop) == len(head) - 2:
            return stop
    pytest.skip(f"{model}'s greedy output has no stop string spanning a token boundary")


def summary(route: str, response, streamed: bool) -> tuple[str, str | None, list | None]:
    """(text, finish reason, [(token, logprob)] or None) of a response or a list of chunks."""
    chunks = [ch for ch in response if ch.choices] if streamed else [response]
    text, reason, entries = "", None, None
    for ch in chunks:
        choice = ch.choices[0]
        if route == "chat":
            text += (choice.delta.content if streamed else choice.message.content) or ""
            lp = choice.logprobs.content if choice.logprobs else None
            pairs = [(e.token, e.logprob) for e in lp] if lp else None
        else:
            text += choice.text
            lp = choice.logprobs
            pairs = list(zip(lp.tokens, lp.token_logprobs, strict=True)) if lp else None
        if pairs is not None:
            entries = (entries or []) + pairs
        reason = choice.finish_reason or reason
    return text, reason, entries


@pytest.mark.parametrize("logprobs", [False, True], ids=["no_logprobs", "logprobs"])
@pytest.mark.parametrize("with_stop", [False, True], ids=["no_stop", "stop"])
@pytest.mark.parametrize("route", ["completions", "chat"])
@pytest.mark.parametrize("model", MODELS)
def test_stream_adds_up_to_the_response(server, model: str, route: str, with_stop: bool, logprobs: bool):
    c = client(server)
    kw = request_kwargs(route, model)
    if with_stop:
        kw["stop"] = spanning_stop(server, c, route, model)
    if logprobs:
        kw.update({"logprobs": True, "top_logprobs": 1} if route == "chat" else {"logprobs": 1})
    full = summary(route, create(c, route, **kw), streamed=False)
    streamed = summary(route, create(c, route, **kw, stream=True), streamed=True)
    assert streamed[0] == full[0]
    assert streamed[1] == full[1] == ("stop" if with_stop else "length")
    assert streamed[2] == full[2]
    if logprobs:
        assert len(full[2]) == create(c, route, **kw).usage.completion_tokens


@pytest.mark.parametrize("route", ["completions", "chat"])
@pytest.mark.parametrize("model", MODELS)
def test_a_stop_spanning_two_tokens_is_cut_whole(server, model: str, route: str):
    """Streamed or not, the text ends right before the stop string, its first part included: the
    scheduler holds that part back (the detokenizer can trim only text it has not sent yet)."""
    c = client(server)
    kw = request_kwargs(route, model)
    greedy = summary(route, create(c, route, **kw), streamed=False)[0]
    stop = spanning_stop(server, c, route, model)
    for stream in (False, True):
        text, reason, _ = summary(route, create(c, route, **kw, stop=stop, stream=stream), streamed=stream)
        assert (text, reason) == (greedy[: greedy.index(stop)], "stop")
