"""Which SGLang tool-call parser (`sglang.srt.function_call`) serves each hosted model.

Chosen by model family unless `--tool-call-parser` names one (for every model, or per model as
`NAME=PARSER`, `none` to switch it off). A model without a parser answers a request that carries
`tools` with a 400 instead of silently returning plain text.
"""

from __future__ import annotations

from collections.abc import Mapping

# model_type (models/config.py) -> the parser of the family's chat format
FAMILY_PARSERS: dict[str, str] = {
    "qwen2": "qwen25",
    "qwen3": "qwen25",
    "qwen2_moe": "qwen25",
    "qwen3_moe": "qwen25",
    "mixtral": "mistral",
    "mistral": "mistral",
    "llama": "llama3",
}


def known_parsers() -> set[str]:
    from sglang.srt.function_call.function_call_parser import FunctionCallParser

    return set(FunctionCallParser.ToolCallParserEnum)


def parse_tool_call_parser_flag(value: str | None, model_names: list[str]) -> dict[str, str]:
    """'--tool-call-parser qwen25' or 'a=qwen25,b=none' -> {model: parser}; ValueError when unknown."""
    if not value:
        return {}
    out: dict[str, str] = {}
    for part in value.split(","):
        name, sep, parser = part.strip().rpartition("=")
        targets = [name] if sep else list(model_names)
        if sep and name not in model_names:
            raise ValueError(
                f"--tool-call-parser: no model named {name!r} (models: {', '.join(model_names)})"
            )
        for t in targets:
            out[t] = parser.strip()
    bad = {p for p in out.values() if p != "none"} - known_parsers()
    if bad:
        raise ValueError(
            f"--tool-call-parser: unknown parser(s) {sorted(bad)}; SGLang has {sorted(known_parsers())}"
        )
    return out


def resolve_tool_call_parser(name: str, model_type: str, overrides: Mapping[str, str]) -> str | None:
    parser = overrides.get(name, FAMILY_PARSERS.get(model_type))
    return None if parser in (None, "none") else parser


def tools_error(model: str, body_tools: object, tool_choice: object, parser: str | None) -> str | None:
    """The 400 message for a request with tools that this model cannot serve, else None."""
    if not body_tools or tool_choice == "none" or parser is not None:
        return None
    return (
        f"model {model!r} has no tool-call parser, so `tools` cannot be served; start the server "
        f"with --tool-call-parser {model}=PARSER (one of SGLang's parsers, e.g. hermes, qwen25, llama3)"
    )
