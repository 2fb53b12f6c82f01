"""Step-time cost models for the discrete-event simulator: a CPU model fitted to measurements here,
and GPU models built from datasheet numbers. THESE ARE MODELS, not measurements.

A step's work is, per model: decode tokens, prefill tokens and KV tokens read (`StepWork`).
- CPU (calibration): per model present in the step, `a + b_dec * decode + b_pre * prefill` — the
  shape `benchmarks/results/decode_throughput.json` shows for the tiny models (one torch thread).
- GPU: decode is bandwidth-bound (weights touched + KV read over HBM bandwidth), prefill FLOP-bound
  (2 * active params * tokens + attention), plus a fixed control cost per step and per model
  (launches; what CUDA graphs / persistent kernels cut), plus NVLink/PCIe traffic when an engine
  spans GPUs (tensor-parallel all-reduces) or splits attention from FFN (hidden states per layer).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class StepWork:
    decode: int = 0  # tokens decoded this step
    prefill: int = 0  # prompt tokens computed this step
    kv_read: int = 0  # cached tokens attended over (KV bytes read = kv_read * kv_bytes_per_token)


@dataclass(frozen=True)
class CpuCost:
    """Seconds per step on one CPU thread; fitted to the decode micro-benchmark (see `fit_cpu_cost`)."""

    a: float  # per model present in the step: Python + launch overhead
    b_dec: float  # per decoded token
    b_pre: float  # per prefilled token

    def step_s(self, work: Mapping[str, StepWork]) -> float:
        return sum(self.a + self.b_dec * w.decode + self.b_pre * w.prefill for w in work.values())


def fit_cpu_cost(rows: list[dict], prompt_len: int) -> CpuCost:
    """Least squares over one side's micro-benchmark rows: decode s/step = a + b_dec * B and
    prefill s = a + b_pre * B * prompt_len (B = batch)."""
    dec = [(r["batch"], r["decode_ms_per_step"] / 1e3) for r in rows if r.get("decode_ms_per_step")]
    pre = [(r["batch"] * prompt_len, r["prefill_ms"] / 1e3) for r in rows if r.get("prefill_ms")]
    a, b_dec = _line(dec)
    a_pre, b_pre = _line(pre)
    return CpuCost(a=max(1e-4, min(a, a_pre)), b_dec=max(b_dec, 0.0), b_pre=max(b_pre, 0.0))


def _line(points: list[tuple[float, float]]) -> tuple[float, float]:
    n = len(points)
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    var = sum((x - mx) ** 2 for x, _ in points)
    slope = sum((x - mx) * (y - my) for x, y in points) / var if var else 0.0
    return my - slope * mx, slope


@dataclass(frozen=True)
class Gpu:
    name: str
    hbm_bytes: float
    hbm_bw: float  # bytes/s
    flops: float  # dense bf16 FLOP/s
    nvlink_bw: float  # bytes/s per GPU, one direction
    pcie_bw: float
    bw_eff: float = 0.7  # achieved fraction of peak
    flop_eff: float = 0.5


H100 = Gpu("H100-SXM 80GB", 80e9, 3.35e12, 989e12, 450e9, 64e9)


@dataclass(frozen=True)
class MoeModel:
    """What the cost model needs of a served model (bf16 weights and KV)."""

    name: str
    dense_bytes: float  # attention, embeddings, shared experts: read every step
    expert_bytes: float  # all routed experts
    active_params: float  # per token
    num_experts: int
    top_k: int
    layers: int
    hidden: int
    kv_bytes_per_token: int

    @property
    def weight_bytes(self) -> float:
        return self.dense_bytes + self.expert_bytes

    def touched_bytes(self, tokens: int) -> float:
        """Weights read by a step of `tokens` tokens: every dense byte, the experts any token routes to."""
        if tokens <= 0:
            return 0.0
        frac = 1.0 - (1.0 - self.top_k / self.num_experts) ** tokens
        return self.dense_bytes + self.expert_bytes * frac


# Shapes after public configs (bf16): OLMoE-1B-7B and Qwen3-30B-A3B.
OLMOE_1B_7B = MoeModel("olmoe-1b-7b", 1.6e9, 12.2e9, 1.3e9, 64, 8, 16, 2048, 16 * 2 * 16 * 128 * 2)
QWEN3_30B_A3B = MoeModel("qwen3-30b-a3b", 3.4e9, 57.6e9, 3.3e9, 128, 8, 48, 2048, 48 * 2 * 4 * 128 * 2)


@dataclass(frozen=True)
class GpuCost:
    """One engine's step time on `num_gpus` GPUs holding its models (weights sharded across them)."""

    gpu: Gpu
    models: Mapping[str, MoeModel]
    num_gpus: int = 1
    step_overhead_s: float = 30e-6  # per step (scheduler + graph launch)
    model_overhead_s: float = 20e-6  # per model in the step (its own launches)
    ffn_gpus: int = 0  # > 0: disaggregated, experts on these, attention+KV on the others
    link: str = "nvlink"

    def step_s(self, work: Mapping[str, StepWork]) -> float:
        g = self.gpu
        bw, flops = g.hbm_bw * g.bw_eff, g.flops * g.flop_eff
        mem = flop = comm = 0.0
        for name, w in work.items():
            m = self.models[name]
            tokens = w.decode + w.prefill
            mem += m.touched_bytes(tokens) + w.kv_read * m.kv_bytes_per_token
            flop += 2 * m.active_params * tokens + 4 * m.layers * m.hidden * w.prefill * (
                w.kv_read + w.prefill
            )
            comm += m.layers * tokens * m.hidden * 2 * 2  # hidden states out and back, bf16
        link_bw = g.nvlink_bw if self.link == "nvlink" else g.pcie_bw
        overhead = self.step_overhead_s + self.model_overhead_s * len(work)
        if self.ffn_gpus:  # layer-wise pipeline: the slowest stage dominates, transfers overlap compute
            attn_gpus = self.num_gpus - self.ffn_gpus
            stages = (
                max(mem, 1.0) / (bw * self.num_gpus),
                flop / (flops * self.num_gpus),
                comm / (link_bw * attn_gpus),
            )
            return max(stages) * 1.15 + overhead  # + ~15 % pipeline fill/drain over a step's layers
        compute = max(mem / (bw * self.num_gpus), flop / (flops * self.num_gpus))
        tp_comm = comm / link_bw if self.num_gpus > 1 else 0.0  # all-reduces; NVLink rings ~ one pass
        return compute + tp_comm + overhead
