"""SGLang's xgrammar backend behind the core's `GrammarCompiler` protocol (layers/grammar.py).

One `XGrammarGrammarBackend` per model, built from that model's tokenizer and vocabulary size (the
logits width) with its EOS ids as stop tokens, lazily on the first constraint for the model. Compiling
runs on a thread pool, never on the scheduler's step loop; compiled grammars are cached in the
backend (SGLang's `get_cached_or_future_value` / `set_cache`), and each request gets its own
matcher (`copy()`).
"""

from __future__ import annotations

import json
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch

from crosspool_sgl.layers.grammar import GrammarMatcher, InvalidGrammarError
from crosspool_sgl.server_args import GrammarArgs

# request field -> SGLang's grammar key type
_KEY_TYPES = {"regex": "regex", "json_schema": "json", "ebnf": "ebnf", "structural_tag": "structural_tag"}


class SGLangMatcher:
    """One SGLang `XGrammarGrammar` (a matcher over a compiled grammar) as a core GrammarMatcher."""

    def __init__(self, grammar: Any) -> None:
        self.grammar = grammar

    def accept_token(self, token: int) -> bool:
        try:
            self.grammar.accept_token(token)  # raises ValueError on a rejected token
        except ValueError:
            return False
        return True

    def fill_vocab_mask(self, bitmask: torch.Tensor, row: int) -> None:
        self.grammar.fill_vocab_mask(bitmask, row)

    def is_terminated(self) -> bool:
        return bool(self.grammar.is_terminated())

    def rollback(self, k: int) -> None:
        if k > 0:
            self.grammar.rollback(k)


class SGLangGrammarCompiler:
    """Per-model xgrammar backends; `compile` returns a future of a fresh matcher."""

    def __init__(
        self,
        tokenizers: dict[str, Any],
        vocab_sizes: dict[str, int],
        eos_ids: dict[str, tuple[int, ...]],
        args: GrammarArgs | None = None,
    ) -> None:
        self.tokenizers, self.vocab_sizes, self.eos_ids = tokenizers, vocab_sizes, eos_ids
        self.args = args or GrammarArgs()
        self.pool = ThreadPoolExecutor(max_workers=self.args.compile_workers, thread_name_prefix="grammar")
        self.backends: dict[str, Any] = {}
        self._lock = threading.Lock()

    def compile(self, model: str, field: str, spec: str) -> Future[GrammarMatcher]:
        if field not in _KEY_TYPES:
            raise InvalidGrammarError(field, "unknown constraint")
        return self.pool.submit(self._compile, model, field, spec)

    def backend(self, model: str) -> Any:
        """The model's backend (built on first use: TokenizerInfo over a large vocab takes a while)."""
        with self._lock:
            if model not in self.backends:
                from sglang.srt.constrained.xgrammar_backend import XGrammarGrammarBackend

                self.backends[model] = XGrammarGrammarBackend(
                    self.tokenizers[model],
                    vocab_size=self.vocab_sizes[model],
                    model_eos_token_ids=list(self.eos_ids[model]) or None,
                    any_whitespace=self.args.json_any_whitespace,
                    max_whitespace_cnt=self.args.json_max_whitespace_cnt,
                )
            return self.backends[model]

    def _compile(self, model: str, field: str, spec: str) -> GrammarMatcher:
        from sglang.srt.constrained.base_grammar_backend import InvalidGrammarObject

        backend = self.backend(model)
        if field == "structural_tag" and self.args.json_max_whitespace_cnt is not None:
            spec = bound_structural_tag_whitespace(spec, self.args.json_max_whitespace_cnt)
        key = (_KEY_TYPES[field], spec)
        value, cache_hit = backend.get_cached_or_future_value(key, False)
        grammar = value if cache_hit else value.result()
        if grammar is None or isinstance(grammar, InvalidGrammarObject):
            message = getattr(grammar, "error_message", None) or "the grammar backend rejected it"
            raise InvalidGrammarError(field, message)
        if not cache_hit:
            backend.set_cache(key, grammar.copy())  # the cached one is a template; requests get copies
        return SGLangMatcher(grammar)

    def shutdown(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)


def bound_structural_tag_whitespace(spec: str, max_whitespace_cnt: int) -> str:
    """The JSON inside a structural tag (tool-call arguments) under the same whitespace bound as
    json_schema: every json_schema format gets `max_whitespace_cnt` unless it sets one. A legacy tag
    (structures + triggers) is first converted with xgrammar's own converter."""
    from sglang.srt.constrained.utils import is_legacy_structural_tag
    from xgrammar import StructuralTag, StructuralTagItem

    try:
        tag = json.loads(spec)
    except ValueError:
        return spec  # the backend reports it
    if isinstance(tag, dict) and is_legacy_structural_tag(tag):
        items = [
            StructuralTagItem(begin=s["begin"], schema=json.dumps(s.get("schema") or {}), end=s["end"])
            for s in tag["structures"]
        ]
        new = StructuralTag.from_legacy_structural_tag(items, tag["triggers"])
        new.format.at_least_one = bool(tag.get("at_least_one", False))
        tag = new.model_dump(exclude_none=True)
    stack = [tag]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            if node.get("type") == "json_schema" and node.get("max_whitespace_cnt") is None:
                node["max_whitespace_cnt"] = max_whitespace_cnt
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    return json.dumps(tag)
