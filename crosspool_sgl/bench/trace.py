"""Seeded multi-model request traces: skewed popularity, on/off Gamma bursts, mixed prompt lengths.

Why this shape: CrossPool's case is many *cold* models whose demand rarely peaks together. So each
model alternates ON periods (requests arrive as a Gamma renewal process; shape < 1 is burstier than
Poisson) and OFF periods (silence), with a Zipf share of the total rate (a few warm, most cold).
Long-context bursts (a few requests with very long prompts to one model at once) are added on top,
since they are what a per-model static KV share cannot absorb.

A trace is a pure function of its `TraceConfig` (seed included): no global RNG, no clock. Prompt token
ids are not stored; each request carries a `prompt_seed` and `prompt_ids()` rebuilds them.
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path

# The tiny tokenizers put their special tokens below this id; prompts avoid them.
FIRST_PLAIN_TOKEN = 16


@dataclass(frozen=True)
class LengthMix:
    """Prompt lengths: a log-uniform draw in [lo, hi], chosen with weight `weight` among the mix."""

    lo: int
    hi: int
    weight: float = 1.0


@dataclass(frozen=True)
class LongBursts:
    """Bursts of long-context requests: `count` bursts of `size` requests each, to one random model."""

    count: int = 0
    size: int = 3
    prompt_lo: int = 1500
    prompt_hi: int = 3500
    output_len: int = 32
    spread_s: float = 2.0  # the burst's requests arrive within this many seconds
    models: tuple[str, ...] = ()  # the models a burst may target (empty: any)


@dataclass(frozen=True)
class TraceConfig:
    models: tuple[str, ...]
    duration_s: float = 60.0
    total_rate: float = 2.0  # mean requests/s over all models, long bursts excluded
    zipf_s: float = 1.2  # popularity of model i ~ 1 / (i+1)^s
    gamma_shape: float = 0.5  # inter-arrival CV = 1/sqrt(shape); 1.0 is Poisson
    mean_on_s: float = 8.0
    mean_off_s: float = 16.0
    prompt_mix: tuple[LengthMix, ...] = (LengthMix(16, 128, 0.6), LengthMix(128, 768, 0.4))
    output_lo: int = 16
    output_hi: int = 192
    long_bursts: LongBursts = field(default_factory=LongBursts)
    max_requests: int = 2000
    seed: int = 0


@dataclass(frozen=True)
class TraceRequest:
    index: int
    arrival_s: float
    model: str
    prompt_len: int
    output_len: int
    prompt_seed: int
    kind: str = "normal"  # or "long"

    def prompt_ids(self, vocab_size: int) -> list[int]:
        """The prompt's token ids: random (so no prefix cache helps), reproducible from prompt_seed."""
        rng = random.Random(self.prompt_seed)
        return [rng.randrange(FIRST_PLAIN_TOKEN, vocab_size) for _ in range(self.prompt_len)]


def popularity(num_models: int, zipf_s: float) -> list[float]:
    """Zipf shares summing to 1: model 0 is the warmest."""
    weights = [1.0 / (i + 1) ** zipf_s for i in range(num_models)]
    total = sum(weights)
    return [w / total for w in weights]


def on_off_arrivals(rng: random.Random, rate: float, cfg: TraceConfig) -> list[float]:
    """Arrival times of one model: Gamma renewal inside exponential ON periods, none in OFF periods.

    The in-period rate is scaled by (on + off) / on so the long-run mean stays `rate`.
    """
    if rate <= 0:
        return []
    on_rate = rate * (cfg.mean_on_s + cfg.mean_off_s) / cfg.mean_on_s
    scale = 1.0 / (on_rate * cfg.gamma_shape)  # Gamma mean = shape * scale = 1 / on_rate
    times: list[float] = []
    t = -rng.uniform(0, cfg.mean_on_s + cfg.mean_off_s)  # random phase: models don't start in step
    while t < cfg.duration_s:
        on_end = t + rng.expovariate(1.0 / cfg.mean_on_s)
        a = t + rng.gammavariate(cfg.gamma_shape, scale)
        while a < min(on_end, cfg.duration_s):
            if a >= 0:
                times.append(a)
            a += rng.gammavariate(cfg.gamma_shape, scale)
        t = on_end + rng.expovariate(1.0 / cfg.mean_off_s)
    return times


def draw_prompt_len(rng: random.Random, mix: tuple[LengthMix, ...]) -> int:
    part = rng.choices(mix, weights=[m.weight for m in mix])[0]
    return int(round(part.lo * (part.hi / part.lo) ** rng.random()))


def long_burst_requests(rng: random.Random, cfg: TraceConfig) -> list[tuple[float, str, int, int]]:
    """(arrival, model, prompt_len, output_len) of every long-context request, bursts spread evenly."""
    lb = cfg.long_bursts
    out = []
    for b in range(lb.count):
        start = cfg.duration_s * (b + 0.5) / lb.count
        model = rng.choice([m for m in lb.models if m in cfg.models] or cfg.models)
        for _ in range(lb.size):
            arrival = start + rng.uniform(0, lb.spread_s)
            out.append((arrival, model, rng.randint(lb.prompt_lo, lb.prompt_hi), lb.output_len))
    return out


def generate_trace(cfg: TraceConfig) -> list[TraceRequest]:
    """The whole trace, sorted by arrival; identical for identical configs."""
    rng = random.Random(cfg.seed)
    raw: list[tuple[float, str, int, int, str]] = []
    for model, share in zip(cfg.models, popularity(len(cfg.models), cfg.zipf_s), strict=True):
        for a in on_off_arrivals(rng, cfg.total_rate * share, cfg):
            raw.append(
                (
                    a,
                    model,
                    draw_prompt_len(rng, cfg.prompt_mix),
                    rng.randint(cfg.output_lo, cfg.output_hi),
                    "normal",
                )
            )
    raw += [(*r, "long") for r in long_burst_requests(rng, cfg)]
    raw.sort(key=lambda r: (r[0], r[1]))
    raw = raw[: cfg.max_requests]
    return [
        TraceRequest(i, round(a, 6), m, p, o, rng.getrandbits(32), kind)
        for i, (a, m, p, o, kind) in enumerate(raw)
    ]


def trace_summary(trace: list[TraceRequest]) -> dict[str, dict[str, float]]:
    """Per model: request count, mean prompt/output length, longest prompt (for the report header)."""
    out: dict[str, dict[str, float]] = {}
    for model in sorted({r.model for r in trace}):
        rs = [r for r in trace if r.model == model]
        out[model] = {
            "requests": len(rs),
            "long_requests": sum(r.kind == "long" for r in rs),
            "mean_prompt": sum(r.prompt_len for r in rs) / len(rs),
            "max_prompt": max(r.prompt_len for r in rs),
            "mean_output": sum(r.output_len for r in rs) / len(rs),
        }
    return out


def save_trace(trace: list[TraceRequest], path: Path) -> None:
    """JSON lines, one request each (replayable with `load_trace`)."""
    path.write_text("".join(json.dumps(asdict(r)) + "\n" for r in trace))


def load_trace(path: Path) -> list[TraceRequest]:
    return [TraceRequest(**json.loads(line)) for line in path.read_text().splitlines() if line.strip()]
