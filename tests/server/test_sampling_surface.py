"""The sampling surface over HTTP, as a user meets it: the real `openai` client (response_format,
tool_choice, penalties, logit_bias, min_tokens, n with a seed), native /generate constraints and
`sgl.gen(regex=...)` in an `sgl.function` with `run_batch`. Random-weight models: a constraint is
met only when it is enforced. (The engine-side tests are tests/engine/test_sampling_engine.py.)"""

from __future__ import annotations

import json
import re

import jsonschema
import openai
import pytest
import sglang as sgl

TWO_ARCHS = ("qwen3moe", "mixtral")
SCHEMA = {
    "type": "object",
    "properties": {
        "id": {"type": "integer", "minimum": 0, "maximum": 999},
        "name": {"type": "string", "pattern": "^[a-z]{1,8}$"},
        "tags": {"type": "array", "items": {"enum": ["x", "y", "z"]}, "maxItems": 3},
    },
    "required": ["id", "name", "tags"],
    "additionalProperties": False,
}
WEATHER = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "enum": ["paris", "rome", "oslo"]},
        "days": {"type": "integer", "minimum": 1, "maximum": 7},
    },
    "required": ["city", "days"],
    "additionalProperties": False,
}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "strict": True, "parameters": WEATHER}},
    {
        "type": "function",
        "function": {
            "name": "get_time",
            "strict": True,
            "parameters": {
                "type": "object",
                "properties": {"tz": {"enum": ["utc", "cet"]}},
                "required": ["tz"],
                "additionalProperties": False,
            },
        },
    },
]
MESSAGES = [{"role": "user", "content": "What is the weather like?"}]


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="none", max_retries=0)


@pytest.mark.parametrize("model", TWO_ARCHS)
def test_response_format_json_schema_20_generations_validate(client, model):
    fmt = {"type": "json_schema", "json_schema": {"name": "record", "schema": SCHEMA}}
    resp = client.chat.completions.create(
        model=model, messages=MESSAGES, n=20, temperature=1.0, max_tokens=160, response_format=fmt
    )
    assert len(resp.choices) == 20
    for choice in resp.choices:
        assert choice.finish_reason == "stop", choice
        jsonschema.validate(json.loads(choice.message.content), SCHEMA)


def test_response_format_json_object_is_an_object(client):
    resp = client.completions.create(
        model="mixtral",
        prompt="{",
        n=4,
        temperature=1.0,
        max_tokens=64,
        extra_body={"json_schema": json.dumps({"type": "object", "maxProperties": 0})},
    )
    for c in resp.choices:
        assert json.loads(c.text) == {}
    resp = client.chat.completions.create(
        model="qwen3moe", messages=MESSAGES, max_tokens=8, response_format={"type": "json_object"}
    )
    assert resp.choices[0].message.content.lstrip().startswith("{")


@pytest.mark.parametrize("model", TWO_ARCHS)
@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "get_weather"}}])
def test_tool_choice_required_and_named_return_valid_tool_calls(client, model, choice):
    resp = client.chat.completions.create(
        model=model, messages=MESSAGES, tools=TOOLS, tool_choice=choice, n=3, temperature=1.0, max_tokens=150
    )
    for c in resp.choices:
        calls = c.message.tool_calls
        assert calls, c
        call = calls[0]
        if isinstance(choice, dict):
            assert call.function.name == "get_weather"
        schema = WEATHER if call.function.name == "get_weather" else TOOLS[1]["function"]["parameters"]
        jsonschema.validate(json.loads(call.function.arguments), schema)


def test_tools_on_a_model_without_parser_is_a_400(client):
    for choice in ("auto", "required", None):
        kw = {} if choice is None else {"tool_choice": choice}
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model="llama", messages=MESSAGES, tools=TOOLS, max_tokens=4, **kw)
        assert "tool-call parser" in str(e.value) and e.value.body["param"] == "tools"
    # tool_choice none: the tools are not used, so nothing to refuse
    resp = client.chat.completions.create(
        model="llama", messages=MESSAGES, tools=TOOLS, tool_choice="none", max_tokens=4
    )
    assert resp.choices[0].message.tool_calls is None


def test_tools_auto_with_a_parser_is_served(client):
    resp = client.chat.completions.create(model="qwen3moe", messages=MESSAGES, tools=TOOLS, max_tokens=8)
    assert resp.choices[0].finish_reason in ("stop", "length", "tool_calls")


def test_n_with_seed_gives_distinct_reproducible_choices(client):
    kw = dict(model="llama", prompt="Once upon a time", n=3, seed=1234, temperature=1.0, max_tokens=12)
    first = [c.text for c in client.completions.create(**kw).choices]
    again = [c.text for c in client.completions.create(**kw).choices]
    assert first == again and len(set(first)) == 3
    chat = dict(model="mixtral", messages=MESSAGES, n=3, seed=99, temperature=1.0, max_tokens=12)
    a = [c.message.content for c in client.chat.completions.create(**chat).choices]
    assert a == [c.message.content for c in client.chat.completions.create(**chat).choices]
    assert len(set(a)) == 3


def test_penalties_min_tokens_and_logit_bias_through_the_client(client):
    resp = client.completions.create(
        model="llama",
        prompt="Hello",
        max_tokens=24,
        temperature=1.0,
        frequency_penalty=1.5,
        presence_penalty=0.5,
        logit_bias={"0": 100},  # the tiny tokenizer's EOS (<|endoftext|>, id 0): would end at once
        extra_body={"repetition_penalty": 1.3, "min_tokens": 10},
    )
    assert resp.usage.completion_tokens >= 10
    resp = client.completions.create(
        model="llama", prompt="Hello", max_tokens=4, temperature=1.0, logit_bias={"0": 100}
    )
    assert resp.usage.completion_tokens == 1  # the same bias without min_tokens


@pytest.mark.parametrize(
    "params, field",
    [
        ({"regex": "[0-9"}, "regex"),
        ({"json_schema": "{not json"}, "json_schema"),
        ({"ebnf": "root ::= "}, "ebnf"),
        ({"frequency_penalty": 3.0}, "frequency_penalty"),
        ({"logit_bias": {"100000": 1.0}}, "logit_bias"),
    ],
)
def test_invalid_constraints_and_values_are_400_naming_the_field(server, params, field):
    r = server.post("/generate", json={"model": "qwen3moe", "text": "Hi", "sampling_params": params})
    assert r.status_code == 400, r.text
    assert field in r.json()["error"]["message"]


def test_native_generate_regex_and_ebnf(server):
    regex = r"(yes|no), [0-9]{2}"
    r = server.post(
        "/generate",
        json={
            "model": "mixtral",
            "text": ["Answer:"] * 5,
            "sampling_params": {"temperature": 1.0, "max_new_tokens": 32, "regex": regex},
        },
    )
    assert r.status_code == 200, r.text
    assert all(re.fullmatch(regex, out["text"]) for out in r.json())


@sgl.function
def pick(s, topic):
    s += f"Topic: {topic}\nCode: " + sgl.gen(
        "code", max_tokens=24, temperature=1.0, regex=r"[A-Z]{3}-[0-9]{3}"
    )
    s += "\nMood: " + sgl.gen("mood", choices=["happy", "sad"])


@pytest.mark.parametrize("model", ["qwen3moe", "llama"])
def test_sgl_gen_regex_in_run_batch(server, model):
    backend = sgl.RuntimeEndpoint(f"{server.base_url}/models/{model}")
    states = pick.run_batch([{"topic": t} for t in ("sea", "sky", "road", "tree")], backend=backend)
    for st in states:
        assert re.fullmatch(r"[A-Z]{3}-[0-9]{3}", st["code"]), st["code"]
        assert st["mood"] in ("happy", "sad")


def test_streamed_response_format_validates(client):
    fmt = {"type": "json_schema", "json_schema": {"name": "record", "schema": SCHEMA}}
    stream = client.chat.completions.create(
        model="mixtral", messages=MESSAGES, temperature=1.0, max_tokens=160, response_format=fmt, stream=True
    )
    text = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    jsonschema.validate(json.loads(text), SCHEMA)
