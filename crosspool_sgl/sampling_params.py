"""Sampling parameters, validated on arrival so bad input fails fast with a clear message."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, fields
from typing import Any

# Below this a temperature divides logits into +-inf (1e-50 gave a NaN probability tensor and killed
# the scheduler); like SGLang, such a temperature means greedy.
_SAMPLING_EPS = 1e-6
_MAX_SEED = 2**64  # torch.Generator.manual_seed overflows at and beyond it


class InvalidRequestError(ValueError):
    """A request the server must reject with a 4xx (never a crash)."""


@dataclass
class SamplingParams:
    max_new_tokens: int = 128
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    seed: int | None = None
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True  # read by the detokenizer (slow tokenizers)
    no_stop_trim: bool = False
    # ---- penalties, biases, structured output (SGLang's names and ranges; see verify_sampling_surface)
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    repetition_penalty: float = 1.0
    min_new_tokens: int = 0
    logit_bias: dict[int, float] | None = None
    regex: str | None = None
    json_schema: str | None = None
    ebnf: str | None = None
    structural_tag: str | None = None

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> SamplingParams:
        d = dict(d or {})
        known = {f.name for f in fields(cls)}
        # Fields SGLang accepts that we do not act on yet are ignored only when neutral.
        for k in list(d):
            if k not in known:
                if d[k] in (None, False, 0, 0.0, 1.0, [], {}, ""):
                    d.pop(k)
                else:
                    raise InvalidRequestError(f"unsupported sampling parameter {k!r}")
        if d.get("max_new_tokens") is None:
            d.pop("max_new_tokens", None)
        if isinstance(d.get("stop"), str):
            d["stop"] = [d["stop"]]
        d["stop"] = list(d.get("stop") or [])
        d["stop_token_ids"] = list(d.get("stop_token_ids") or [])
        normalize_sampling_surface(d)
        params = cls(**d)
        check_field_types(params)
        params.verify()
        return params

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1

    def verify(self) -> None:
        def bad(msg: str) -> InvalidRequestError:
            return InvalidRequestError(msg)

        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 0:
            raise bad(f"max_new_tokens must be a non-negative integer, got {self.max_new_tokens!r}")
        if not isinstance(self.temperature, int | float) or self.temperature < 0:
            raise bad(f"temperature must be >= 0, got {self.temperature!r}")
        if not 0.0 < self.top_p <= 1.0:
            raise bad(f"top_p must be in (0, 1], got {self.top_p!r}")
        if self.top_k < -1 or self.top_k == 0:
            raise bad(f"top_k must be -1 (disabled) or >= 1, got {self.top_k!r}")
        if not 0.0 <= self.min_p <= 1.0:
            raise bad(f"min_p must be in [0, 1], got {self.min_p!r}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise bad("stop must be a non-empty string or a list of them")
        if any(not isinstance(t, int) or t < 0 for t in self.stop_token_ids):
            raise bad("stop_token_ids must be non-negative integers")
        verify_sampling_surface(self)

    # ---- structured output --------------------------------------------------------------
    @property
    def grammar(self) -> tuple[str, str] | None:
        """(field, spec) of the one grammar constraint set, or None."""
        for name in GRAMMAR_FIELDS:
            value = getattr(self, name)
            if value is not None:
                return name, value
        return None

    @property
    def has_penalties(self) -> bool:
        """True when the request needs its output-token counts (frequency/presence/repetition)."""
        return self.frequency_penalty != 0.0 or self.presence_penalty != 0.0 or self.repetition_penalty != 1.0


# ---- the sampling surface beyond temperature/top-k/top-p (issue 12) ----------------------

GRAMMAR_FIELDS = ("regex", "json_schema", "ebnf", "structural_tag")


def normalize_sampling_surface(d: dict[str, Any]) -> None:
    """In place: None means SGLang's default; schemas given as objects become JSON text."""
    for name, default in (
        ("frequency_penalty", 0.0),
        ("presence_penalty", 0.0),
        ("repetition_penalty", 1.0),
        ("min_new_tokens", 0),
    ):
        if name in d and d[name] is None:
            d[name] = default
    for name in ("json_schema", "structural_tag"):
        if isinstance(d.get(name), dict | list):
            d[name] = json.dumps(d[name])
    if d.get("logit_bias") == {}:
        d["logit_bias"] = None


def verify_sampling_surface(p: SamplingParams) -> None:
    """SGLang's ranges (its SamplingParams.verify); every message names the field."""

    def number(name: str, lo: float, hi: float, lo_open: bool = False) -> None:
        v = getattr(p, name)
        ok = isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
        if not ok or v > hi or v < lo or (lo_open and v == lo):
            raise InvalidRequestError(
                f"{name} must be in {'(' if lo_open else '['}{lo:g}, {hi:g}], got {v!r}"
            )

    number("frequency_penalty", -2.0, 2.0)
    number("presence_penalty", -2.0, 2.0)
    number("repetition_penalty", 0.0, 2.0, lo_open=True)
    if not isinstance(p.min_new_tokens, int) or isinstance(p.min_new_tokens, bool) or p.min_new_tokens < 0:
        raise InvalidRequestError(f"min_new_tokens must be a non-negative integer, got {p.min_new_tokens!r}")
    if p.min_new_tokens > p.max_new_tokens:
        raise InvalidRequestError(
            f"min_new_tokens must be in [0, max_new_tokens ({p.max_new_tokens})], got {p.min_new_tokens}"
        )
    if p.logit_bias is not None:
        p.logit_bias = _parse_logit_bias(p.logit_bias)
    set_grammars = [n for n in GRAMMAR_FIELDS if getattr(p, n) is not None]
    if len(set_grammars) > 1:
        raise InvalidRequestError(
            "only one of json_schema, regex, ebnf or structural_tag can be set, "
            f"got {', '.join(set_grammars)}"
        )
    for name in set_grammars:
        value = getattr(p, name)
        if not isinstance(value, str) or not value:
            raise InvalidRequestError(f"{name} must be a non-empty string")
        if name in ("json_schema", "structural_tag") and value != "$$ANY$$":
            try:
                json.loads(value)
            except ValueError as e:
                raise InvalidRequestError(f"{name} is not valid JSON: {e}") from e


def _parse_logit_bias(bias: Any) -> dict[int, float]:
    """OpenAI sends string keys; token ids must be non-negative (the model's vocab is checked later)."""
    if not isinstance(bias, dict):
        raise InvalidRequestError("logit_bias must be an object mapping token ids to biases")
    out: dict[int, float] = {}
    for key, value in bias.items():
        try:
            token = int(key)
        except (TypeError, ValueError):
            raise InvalidRequestError(f"logit_bias keys must be token ids, got {key!r}") from None
        if token < 0:
            raise InvalidRequestError(f"logit_bias keys must be non-negative token ids, got {key!r}")
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise InvalidRequestError(f"logit_bias values must be finite numbers, got {value!r}")
        out[token] = float(value)
    return out


def sample_seed(seed: int | None, index: int) -> int | None:
    """The seed of the index-th of n choices: distinct and reproducible (seed + index)."""
    return None if seed is None else seed + index


# ---- type and range checks (run before verify(): verify's comparisons assume these types) -------
_INT_FIELDS = ("max_new_tokens", "top_k")
_REAL_FIELDS = ("temperature", "top_p", "min_p")
_BOOL_FIELDS = ("ignore_eos", "skip_special_tokens", "spaces_between_special_tokens", "no_stop_trim")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _finite(v: int | float) -> bool:
    try:
        return math.isfinite(v)
    except OverflowError:  # an int beyond float range (the offline Engine takes Python ints as they are)
        return False


def check_field_types(p: SamplingParams) -> None:
    """Every field of the right JSON type and finite, so nothing malformed reaches the scheduler
    (the scheduler does no type checks: a seed "abc" or a top_k 2.5 used to end its process)."""
    for name in _INT_FIELDS:
        if not _is_int(getattr(p, name)):
            raise InvalidRequestError(f"{name} must be an integer, got {getattr(p, name)!r}")
    for name in _REAL_FIELDS:
        v = getattr(p, name)
        if not (_is_int(v) or isinstance(v, float)) or not _finite(v):
            raise InvalidRequestError(f"{name} must be a finite number, got {v!r}")
    for name in _BOOL_FIELDS:
        if not isinstance(getattr(p, name), bool):
            raise InvalidRequestError(f"{name} must be a boolean, got {getattr(p, name)!r}")
    if p.seed is not None and (not _is_int(p.seed) or not 0 <= p.seed < _MAX_SEED):
        raise InvalidRequestError(f"seed must be an integer in [0, 2**64), got {p.seed!r}")
    if not isinstance(p.stop, list) or not isinstance(p.stop_token_ids, list):
        raise InvalidRequestError("stop and stop_token_ids must be lists")
    if any(not _is_int(t) for t in p.stop_token_ids):
        raise InvalidRequestError("stop_token_ids must be integers")
    if 0 <= p.temperature < _SAMPLING_EPS:
        p.temperature = 0.0
