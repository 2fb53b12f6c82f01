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
