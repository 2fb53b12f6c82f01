"""The real `openai` client against the server: three architectures, concurrent, greedy == offline Engine."""

from __future__ import annotations

import asyncio

import openai
import pytest

PROMPTS = [
    "The capital of France is",
    "Once upon a time",
    "1, 2, 3, 4,",
    "Hello, my name is",
    "The quick brown fox",
    "In the beginning",
]
MAX_TOKENS = 10


def client(server, cls=openai.OpenAI):
    return cls(base_url=server.base_url + "/v1", api_key="unused", max_retries=0, timeout=120)


def engine_text(engine, model: str, prompt: str | None = None, input_ids: list[int] | None = None) -> str:
    params = {"max_new_tokens": MAX_TOKENS, "temperature": 0}
    out = engine.generate(prompt=prompt, input_ids=input_ids, model=model, sampling_params=params)
    return out["text"]


def chat_ids(engine, model: str, content: str) -> list[int]:
    tok = engine.runtime.tokenizers[model]
    text = tok.apply_chat_template(
        [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
    )
    return tok.encode(text, add_special_tokens=False)


def test_models_lists_every_hosted_model(server):
    ids = [m.id for m in client(server).models.list().data]
    assert ids == list(server.model_paths)


def test_completion_and_chat_match_engine(server, engine):
    c = client(server)
    for model in server.model_paths:
        comp = c.completions.create(model=model, prompt=PROMPTS[0], max_tokens=MAX_TOKENS, temperature=0)
        assert comp.choices[0].text == engine_text(engine, model, PROMPTS[0])
        assert comp.usage.completion_tokens == MAX_TOKENS
        assert comp.choices[0].finish_reason == "length"
        chat = c.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": PROMPTS[1]}],
            max_tokens=MAX_TOKENS,
            temperature=0,
        )
        assert chat.choices[0].message.content == engine_text(
            engine, model, input_ids=chat_ids(engine, model, PROMPTS[1])
        )
        assert chat.usage.prompt_tokens == len(chat_ids(engine, model, PROMPTS[1]))


def test_streaming_equals_non_streaming(server):
    c = client(server)
    model = "mixtral"
    full = c.completions.create(model=model, prompt=PROMPTS[2], max_tokens=MAX_TOKENS, temperature=0)
    chunks = list(
        c.completions.create(
            model=model,
            prompt=PROMPTS[2],
            max_tokens=MAX_TOKENS,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == full.choices[0].text
    assert chunks[-1].usage.completion_tokens == MAX_TOKENS
    chat_full = c.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=MAX_TOKENS, temperature=0
    )
    stream = c.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=MAX_TOKENS,
        temperature=0,
        stream=True,
    )
    text = "".join(ch.choices[0].delta.content or "" for ch in stream if ch.choices)
    assert text == chat_full.choices[0].message.content


def test_concurrent_requests_across_three_models(server, engine):
    """18 requests in flight at once (chat/completions, stream or not) over three architectures."""
    ac = client(server, openai.AsyncOpenAI)
    jobs = [(model, i) for model in server.model_paths for i in range(len(PROMPTS))]

    async def one(model: str, i: int) -> str:
        prompt = PROMPTS[i]
        stream = i % 2 == 1
        if i % 3 == 2:  # chat
            r = await ac.chat.completions.create(
                model=model,
                messages=[{"role": "user", "content": prompt}],
                max_tokens=MAX_TOKENS,
                temperature=0,
                stream=stream,
            )
            if stream:
                return "".join([ch.choices[0].delta.content or "" async for ch in r if ch.choices])
            return r.choices[0].message.content
        r = await ac.completions.create(
            model=model, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0, stream=stream
        )
        if stream:
            return "".join([ch.choices[0].text async for ch in r if ch.choices])
        return r.choices[0].text

    async def run_all() -> list[str]:
        return await asyncio.gather(*(one(m, i) for m, i in jobs))

    got = asyncio.run(run_all())
    for (model, i), text in zip(jobs, got, strict=True):
        ref = (
            engine_text(engine, model, input_ids=chat_ids(engine, model, PROMPTS[i]))
            if i % 3 == 2
            else engine_text(engine, model, PROMPTS[i])
        )
        assert text == ref, (model, i)


def test_sampling_options(server):
    c = client(server)
    r = c.completions.create(
        model="llama", prompt=PROMPTS[3], max_tokens=6, temperature=0.8, top_p=0.9, seed=7, n=2, logprobs=2
    )
    assert len(r.choices) == 2
    assert r.usage.prompt_tokens > 0 and r.usage.completion_tokens == 12
    lp = r.choices[0].logprobs
    assert len(lp.token_logprobs) == 6 and all(len(t) == 2 for t in lp.top_logprobs)
    again = c.completions.create(
        model="llama", prompt=PROMPTS[3], max_tokens=6, temperature=0.8, top_p=0.9, seed=7
    )
    assert again.choices[0].text == r.choices[0].text  # same seed, same sample
    chat = c.chat.completions.create(
        model="qwen3moe",
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=4,
        temperature=0,
        logprobs=True,
        top_logprobs=3,
    )
    assert len(chat.choices[0].logprobs.content) == 4
    assert all(len(t.top_logprobs) == 3 for t in chat.choices[0].logprobs.content)


def test_stop_string(server):
    c = client(server)
    full = c.completions.create(model="qwen3moe", prompt=PROMPTS[4], max_tokens=MAX_TOKENS, temperature=0)
    text = full.choices[0].text
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    if not stop.strip():
        pytest.skip("greedy text has no usable stop substring")
    cut = c.completions.create(
        model="qwen3moe", prompt=PROMPTS[4], max_tokens=MAX_TOKENS, temperature=0, stop=[stop]
    )
    assert cut.choices[0].finish_reason == "stop"
    assert cut.choices[0].text == text[: text.index(stop)]


def test_models_retrieve_answers_one_card(server):
    c = client(server)
    for model, path in server.model_paths.items():
        card = c.models.retrieve(model)
        assert (card.id, card.root) == (model, path)
    try:
        c.models.retrieve("no-such-model")
    except openai.NotFoundError as e:
        assert e.status_code == 404
        assert "no-such-model" in e.body["message"]
    else:
        raise AssertionError("an unknown model id must be a 404")
    assert server.get("/v1/models/").status_code == 404
