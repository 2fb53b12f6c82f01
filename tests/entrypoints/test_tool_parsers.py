"""--tool-call-parser parsing and the per-model choice (family default, override, none)."""

from __future__ import annotations

import pytest

from crosspool_sgl.entrypoints.tool_parsers import (
    parse_tool_call_parser_flag,
    resolve_tool_call_parser,
    tools_error,
)

MODELS = ["a", "b"]


def test_flag_forms():
    assert parse_tool_call_parser_flag(None, MODELS) == {}
    assert parse_tool_call_parser_flag("hermes", MODELS) == {"a": "hermes", "b": "hermes"}
    assert parse_tool_call_parser_flag("a=llama3, b=none", MODELS) == {"a": "llama3", "b": "none"}


@pytest.mark.parametrize("bad, msg", [("c=hermes", "no model named"), ("a=nosuchparser", "unknown parser")])
def test_bad_flags_are_named(bad, msg):
    with pytest.raises(ValueError, match=msg):
        parse_tool_call_parser_flag(bad, MODELS)


def test_family_default_override_and_none():
    assert resolve_tool_call_parser("a", "qwen3_moe", {}) == "qwen25"
    assert resolve_tool_call_parser("a", "mixtral", {}) == "mistral"
    assert resolve_tool_call_parser("a", "olmoe", {}) is None
    assert resolve_tool_call_parser("a", "olmoe", {"a": "hermes"}) == "hermes"
    assert resolve_tool_call_parser("a", "llama", {"a": "none"}) is None


def test_tools_error_only_when_tools_meet_no_parser():
    tools = [{"type": "function"}]
    assert tools_error("m", tools, "auto", None)
    assert tools_error("m", tools, None, None)
    assert tools_error("m", tools, "none", None) is None
    assert tools_error("m", tools, "auto", "hermes") is None
    assert tools_error("m", None, "auto", None) is None


@pytest.mark.parametrize("parser", ["mistral", "qwen25"])
def test_named_tool_choice_grammar_offers_only_that_function(parser):
    """SGLang builds the tool-call grammar from every tool given; a named choice must not let the
    sampler pick another function (seen in CI: `get_time` returned for a named `get_weather`)."""
    from sglang.srt.entrypoints.openai.protocol import ChatCompletionRequest
    from sglang.srt.function_call.function_call_parser import FunctionCallParser

    from crosspool_sgl.entrypoints.sglang_openai import keep_only_named_tool

    params = {"type": "object", "properties": {"x": {"type": "integer"}}, "required": ["x"]}
    tools = [{"type": "function", "function": {"name": n, "parameters": params}} for n in ("one", "two")]
    named = {"type": "function", "function": {"name": "two"}}
    hi = [{"role": "user", "content": "hi"}]
    req = ChatCompletionRequest(model="m", messages=hi, tools=tools, tool_choice=named)
    keep_only_named_tool(req)
    assert [t.function.name for t in req.tools] == ["two"]
    kind, constraint = FunctionCallParser(req.tools, parser).get_structure_constraint(req.tool_choice)
    text = constraint.model_dump_json() if hasattr(constraint, "model_dump_json") else str(constraint)
    assert '"two"' in text.replace('\\"', '"') and '"one"' not in text.replace('\\"', '"')

    # unknown name or a string choice: left alone (SGLang's validation answers the unknown name)
    for choice in ({"type": "function", "function": {"name": "three"}}, "required", "auto"):
        req = ChatCompletionRequest(model="m", messages=hi, tools=tools, tool_choice=choice)
        keep_only_named_tool(req)
        assert len(req.tools) == 2
