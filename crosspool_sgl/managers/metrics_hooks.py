"""What the tokenizer side reports per request, as plain callables (Prometheus lives in
entrypoints/metrics.py, so the managers do not depend on it)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass
class MetricsHooks:
    on_request: Callable[[str], None] = lambda model: None
    on_first_token: Callable[[str, float], None] = lambda model, s: None
    on_inter_token: Callable[[str, float], None] = lambda model, s: None
    on_finish: Callable[[str, dict, int, int], None] = lambda model, reason, p, c: None
