"""The simulated deployments: the CPU run's setups (for calibration) and an 8-GPU, 20-model projection.

Same names as the real benchmark's setups. The GPU numbers are datasheet figures times efficiency
factors (`sim_costs.Gpu`), not measurements.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from crosspool_sgl.bench.sim_costs import H100, OLMOE_1B_7B, QWEN3_30B_A3B, CpuCost, Gpu, GpuCost, MoeModel
from crosspool_sgl.bench.simulate import Device, Engine, KVBudget
from crosspool_sgl.bench.trace import LengthMix, LongBursts, TraceConfig

MEM_FRACTION = 0.9  # of HBM for weights + KV (the rest: activations, graphs, fragmentation)


def trace_config_from_json(cfg: dict) -> TraceConfig:
    """Rebuild a `TraceConfig` from the report JSON (nested dataclasses were dumped as dicts/lists)."""
    cfg = dict(cfg)
    cfg["models"] = tuple(cfg["models"])
    cfg["prompt_mix"] = tuple(LengthMix(**m) for m in cfg["prompt_mix"])
    lb = dict(cfg["long_bursts"])
    lb["models"] = tuple(lb.get("models", ()))
    cfg["long_bursts"] = LongBursts(**lb)
    return TraceConfig(**cfg)


def cpu_setups(variant: dict, stock: CpuCost, ours: CpuCost, cores: int = 2) -> dict[str, list[Device]]:
    """The CPU run: stock = one single-threaded server per model sharing the cores; crosspool = one
    single-threaded scheduler over one pool (static caps or shared)."""
    total = variant["kv_budget_bytes"]
    models = list(variant["stock_kv_tokens"])
    share = total // len(models)
    stock_engines = [Engine([m], KVBudget(share), stock) for m in models]
    return {
        "stock": [Device(stock_engines, slots=cores)],
        "crosspool-static": [Device([Engine(models, KVBudget(total, {m: share for m in models}), ours)])],
        "crosspool-shared": [Device([Engine(models, KVBudget(total), ours)])],
    }


def cpu_bytes_per_token(variant: dict) -> dict[str, int]:
    share = variant["kv_budget_bytes"] // len(variant["stock_kv_tokens"])
    return {m: share // t for m, t in variant["stock_kv_tokens"].items()}


@dataclass(frozen=True)
class Fleet:
    """The projected cluster: which models, how many GPUs of which kind."""

    models: dict[str, MoeModel]
    gpu: Gpu = H100
    num_gpus: int = 8

    @property
    def usable(self) -> float:
        return self.gpu.hbm_bytes * MEM_FRACTION


def default_fleet(num_olmoe: int = 16, num_qwen: int = 4) -> Fleet:
    """20 MoE models: 4 Qwen3-30B-A3B-like and 16 OLMoE-1B-7B-like, interleaved in popularity order."""
    names = [f"qwen3-{i}" for i in range(num_qwen)] + [f"olmoe-{i}" for i in range(num_olmoe)]
    order = sorted(names, key=lambda n: (int(n.split("-")[1]), n))  # qwen3-0, olmoe-0, qwen3-1, ...
    return Fleet({n: QWEN3_30B_A3B if n.startswith("qwen3") else OLMOE_1B_7B for n in order})


def gpu_trace_config(fleet: Fleet, duration_s: float, rate: float, seed: int) -> TraceConfig:
    """Chat-like traffic plus long-document bursts (16k-32k tokens), Zipf over the 20 models."""
    long = LongBursts(count=6, size=4, prompt_lo=16000, prompt_hi=32000, output_len=64, spread_s=2.0)
    return TraceConfig(
        models=tuple(fleet.models),
        duration_s=duration_s,
        total_rate=rate,
        prompt_mix=(LengthMix(64, 512, 0.6), LengthMix(512, 4096, 0.4)),
        output_lo=32,
        output_hi=512,
        long_bursts=long,
        max_requests=100_000,
        seed=seed,
    )


def place_models(fleet: Fleet) -> list[list[str]]:
    """Stock placement: whole models on single GPUs, largest first onto the emptiest GPU."""
    gpus: list[list[str]] = [[] for _ in range(fleet.num_gpus)]
    used = [0.0] * fleet.num_gpus
    for name in sorted(fleet.models, key=lambda n: -fleet.models[n].weight_bytes):
        g = min(range(fleet.num_gpus), key=lambda i: used[i])
        if used[g] + fleet.models[name].weight_bytes > fleet.usable:
            raise ValueError(f"{name} does not fit on any GPU")
        gpus[g].append(name)
        used[g] += fleet.models[name].weight_bytes
    return gpus


def gpu_setups(fleet: Fleet) -> tuple[dict[str, list[Device]], dict[str, str]]:
    """(setups, unavailable reasons). KV budgets follow from what the weights leave free."""
    weights = sum(m.weight_bytes for m in fleet.models.values())
    names = list(fleet.models)
    setups: dict[str, list[Device]] = {}
    stock_devices = []
    for on_gpu in place_models(fleet):
        free = fleet.usable - sum(fleet.models[n].weight_bytes for n in on_gpu)
        engines = [
            Engine([n], KVBudget(int(free / len(on_gpu))), GpuCost(fleet.gpu, fleet.models)) for n in on_gpu
        ]
        stock_devices.append(Device(engines))
    setups["stock"] = stock_devices
    pool = int(fleet.num_gpus * fleet.usable - weights)
    cost = GpuCost(fleet.gpu, fleet.models, num_gpus=fleet.num_gpus)
    caps = {n: pool // len(names) for n in names}
    setups["crosspool-static"] = [Device([Engine(names, KVBudget(pool, caps), cost)])]
    setups["crosspool-shared"] = [Device([Engine(names, KVBudget(pool), cost)])]
    experts = sum(m.expert_bytes for m in fleet.models.values())
    ffn = math.ceil(experts / fleet.usable)
    reasons = {}
    if ffn >= fleet.num_gpus:
        reasons["crosspool-disagg"] = f"experts need {ffn} of {fleet.num_gpus} GPUs"
    else:
        dense = sum(m.dense_bytes for m in fleet.models.values())
        kv = int((fleet.num_gpus - ffn) * fleet.usable - dense)
        dcost = GpuCost(fleet.gpu, fleet.models, num_gpus=fleet.num_gpus, ffn_gpus=ffn)
        setups["crosspool-disagg"] = [Device([Engine(names, KVBudget(kv), dcost)])]
    return setups, reasons


def kv_budgets(setups: dict[str, list[Device]]) -> dict[str, float]:
    """Total KV bytes per setup (for the report)."""
    return {
        name: sum(e.kv.total if not e.kv.caps else sum(e.kv.caps.values()) for d in devs for e in d.engines)
        for name, devs in setups.items()
    }
