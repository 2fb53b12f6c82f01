"""Server flags of the sampling surface: structured output (SGLang's xgrammar backend) and tool calling."""

from __future__ import annotations

import argparse

from crosspool_sgl.server_args import GrammarArgs


def add_sampling_flags(p: argparse.ArgumentParser) -> None:
    """Structured output (SGLang's xgrammar backend) and tool calling (SGLang's parsers)."""
    p.add_argument(
        "--tool-call-parser",
        default=None,
        help="SGLang tool-call parser for `tools` requests: one for every model (e.g. hermes) or per "
        "model NAME=PARSER,...; 'none' switches it off (default: by model family: Qwen -> qwen25, "
        "Mixtral -> mistral, Llama -> llama3; others none, and `tools` then get a 400)",
    )
    p.add_argument(
        "--constrained-json-disable-any-whitespace",
        action="store_true",
        help="JSON schema / json_object output in compact form, no free whitespace (as SGLang's flag)",
    )
    p.add_argument(
        "--constrained-json-max-whitespace-cnt",
        type=int,
        default=None,
        help="most consecutive whitespace characters in constrained JSON (default: unbounded)",
    )


def grammar_args(args: argparse.Namespace) -> GrammarArgs:
    return GrammarArgs(
        json_any_whitespace=not args.constrained_json_disable_any_whitespace,
        json_max_whitespace_cnt=args.constrained_json_max_whitespace_cnt,
    )
