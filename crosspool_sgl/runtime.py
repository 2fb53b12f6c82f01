"""Build the whole engine from EngineArgs: pools, models, runner, scheduler, tokenizers.

Shared by the offline Engine (in-process) and the server's scheduler process.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch

from crosspool_sgl.core.model_runner import ModelRunner
from crosspool_sgl.core.prefill_lane import PrefillLane
from crosspool_sgl.core.req import Req
from crosspool_sgl.core.schedule_policy import PolicyArgs, SchedulePolicy
from crosspool_sgl.core.scheduler import MultiModelScheduler
from crosspool_sgl.core.static_decode import StaticDecodeRunner
from crosspool_sgl.core.step_cost import ModelCost, StepCostModel
from crosspool_sgl.disagg.setup import start_ffn_side
from crosspool_sgl.layers.attention import create_attention_backend
from crosspool_sgl.mem.kv_planner import KVPlanner, ModelKVPolicy
from crosspool_sgl.mem.kv_pool import KVGeometry, KVPool
from crosspool_sgl.mem.prefix_cache import PrefixCache
from crosspool_sgl.mem.residency import ResidencyPolicy
from crosspool_sgl.mem.residency_manager import ResidencyManager
from crosspool_sgl.mem.weight_pool import WeightPool
from crosspool_sgl.mem.weight_store import WeightStore
from crosspool_sgl.models.config import ModelConfig, load_model_config
from crosspool_sgl.models.decoder import DecoderModel
from crosspool_sgl.models.loader import ffn_elements, load_model
from crosspool_sgl.server_args import EngineArgs

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_CPU_DEFAULT_KV_BYTES = 256 << 20


@dataclass
class Runtime:
    scheduler: MultiModelScheduler
    kv_pool: KVPool
    weight_pool: WeightPool
    models: dict[str, DecoderModel]
    tokenizers: dict  # name -> transformers tokenizer
    device: torch.device
    dtype: torch.dtype
    residency: ResidencyManager | None = None


def resolve_dtype(name: str, configs: dict[str, dict]) -> torch.dtype:
    """'auto' takes the first model's checkpoint dtype (fp32 when unset)."""
    if name != "auto":
        if name not in _DTYPES:
            raise ValueError(f"unknown dtype {name!r} (auto, {', '.join(_DTYPES)})")
        return _DTYPES[name]
    for raw in configs.values():
        d = raw.get("dtype") or raw.get("torch_dtype")
        if d in _DTYPES:
            return _DTYPES[d]
    return torch.float32


def default_kv_bytes(device: torch.device, weights_bytes: int) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int((free - weights_bytes) * 0.8)
    return _CPU_DEFAULT_KV_BYTES


def default_chunk_bytes(device: torch.device, page_bytes: list[int]) -> int:
    """2 MiB multiples on GPU (the VMM granularity); on CPU 64 KiB. At least 8 pages a chunk."""
    granule = 2 << 20 if device.type == "cuda" else 64 << 10
    need = 8 * max(page_bytes)
    return -(-need // granule) * granule


def build_runtime(args: EngineArgs) -> Runtime:
    import json
    from pathlib import Path

    device = torch.device(args.device)
    raw_cfgs = {}
    for spec in args.models:
        if not Path(spec.path).is_dir():
            raise FileNotFoundError(f"model {spec.name!r}: directory {spec.path} does not exist")
        raw_cfgs[spec.name] = json.loads((Path(spec.path) / "config.json").read_text())
    configs: dict[str, ModelConfig] = {s.name: load_model_config(s.path) for s in args.models}
    dtype = resolve_dtype(args.dtype, raw_cfgs)
    # Disaggregated mode (crosspool_sgl/disagg): FFN workers hold the weights; this side keeps slot ids.
    ffn_side = start_ffn_side(args, dtype, device) if args.disagg.ffn_workers else None
    if ffn_side is None:
        weight_pool = WeightPool(dtype, device, args.weight_pool.max_resident_bytes)
        residency = _build_residency(args, weight_pool)
    else:
        weight_pool, residency = ffn_side.slot_pool, None
    attn = create_attention_backend(device, args.attention_backend)
    models = {}
    for s in args.models:
        if residency is not None:
            residency.before_load(s.name, ffn_elements(configs[s.name]) * weight_pool.arena.element_size())
        models[s.name] = load_model(s.name, s.path, weight_pool, attn, device, dtype, args.show_progress)
        if residency is not None:
            residency.after_load(s.name)
    weights_bytes = args.weight_pool.max_resident_bytes or weight_pool.used_bytes
    static = args.static_decode.enabled(device.type) and ffn_side is None  # disaggregated: eager
    graph_bytes = args.static_decode.graph_memory_bytes if static and device.type == "cuda" else 0
    kv_pool = _build_kv_pool(args, configs, device, dtype, weights_bytes + graph_bytes)
    if ffn_side is None:
        static_decode = _build_static_decode(args, models, kv_pool, device) if static else None
        runner = ModelRunner(models, kv_pool, device, residency, static_decode)
    else:
        runner = ffn_side.make_runner(models, kv_pool, device)
    tokenizers = {s.name: _load_tokenizer(s.path) for s in args.models}
    policy = _build_policy(args, kv_pool, configs)
    scheduler = (ffn_side.scheduler_cls if ffn_side else MultiModelScheduler)(
        runner,
        kv_pool,
        policy,
        eos_ids={n: c.eos_token_ids for n, c in configs.items()},
        context_lens={n: c.max_position_embeddings for n, c in configs.items()},
        detokenizers={n: _decode_fn(t) for n, t in tokenizers.items()},
        prefix_cache=PrefixCache(kv_pool, enabled=args.kv_pool.prefix_cache),
        prefill_lane=_build_prefill_lane(args, runner, attn, device) if ffn_side is None else None,
    )
    scheduler.grammar_compiler = _build_grammar_compiler(args, tokenizers, configs)
    logger.info(
        "runtime ready: %d models, weights pool %.1f MiB, KV pool %.1f MiB (%d chunks of %d KiB), "
        "attention=%s, prefill lane %s",
        len(models),
        weight_pool.used_bytes / 2**20,
        kv_pool.total_bytes / 2**20,
        kv_pool.num_chunks,
        kv_pool.chunk_bytes >> 10,
        attn.name,
        "on" if scheduler.lane is not None else "off",
    )
    return Runtime(scheduler, kv_pool, weight_pool, models, tokenizers, device, dtype, residency)


def _build_policy(args: EngineArgs, kv_pool: KVPool, configs: dict[str, ModelConfig]) -> SchedulePolicy:
    """The batching policy, its step cost model and the planner's SLO keys."""
    planner = kv_pool.planner
    cost = StepCostModel(
        {
            n: ModelCost.from_config(c.num_layers, c.hidden_size, c.num_heads, c.head_dim)
            for n, c in configs.items()
        }
    )
    sched = args.scheduler

    def admission_key(r: Req) -> float:
        prefill_ms = cost.extra_ms(r.model, len(r.input_ids), 0, model_in_step=True)
        return planner.admission_deadline(r.model, r.arrival_time, prefill_ms / 1e3)

    return SchedulePolicy(
        PolicyArgs(
            page_tokens=kv_pool.page_tokens,
            max_running_requests=sched.max_running_requests,
            chunked_prefill_size=sched.chunked_prefill_size,
            decode_step_slowdown=sched.decode_step_slowdown,
            prefill_step_budget_ms=sched.prefill_step_budget_ms,
            max_request_share=sched.max_request_share,
        ),
        admission_key=admission_key,
        victim_key=lambda r: planner.victim_key(r.model, r.arrival_time, r.num_cached),
        cost=cost,
        tbt_targets_ms={s.name: s.tbt_ms for s in args.models if s.tbt_ms},
        pool_pages={m: kv_pool.total_bytes // kv_pool.page_bytes(m) for m in kv_pool.views},
    )


def _build_static_decode(args: EngineArgs, models, kv_pool: KVPool, device) -> StaticDecodeRunner:
    """Static-buffer decode; on CUDA the start-up buckets of each model are captured now."""
    sd = args.static_decode
    runner = StaticDecodeRunner(
        models,
        kv_pool,
        device,
        batch_buckets=sd.batch_buckets,
        graph_memory_bytes=sd.graph_memory_bytes,
        max_graphs=sd.max_graphs,
    )
    if runner.use_graphs:
        for name in models:
            for batch in sd.startup_buckets:
                runner.capture([name], batch)
        logger.info("static decode: %s", runner.stats())
    return runner


def usable_cores() -> int:
    """Cores this process may run on (its affinity mask, not the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _build_prefill_lane(
    args: EngineArgs, runner: ModelRunner, attn, device: torch.device
) -> PrefillLane | None:
    """A second thread for long prefills, where it can help: CPU, >= 2 cores, a thread-safe backend,
    no bound on resident weights (page-ins happen between steps, not under a running chunk). On GPU the
    step's kernels already overlap; a CUDA-stream lane is not built yet."""
    wanted = args.scheduler.prefill_lane
    possible = device.type == "cpu" and attn.thread_safe and args.weight_pool.max_resident_bytes is None
    if wanted is False or not possible or (wanted is None and usable_cores() < 2):
        return None
    return PrefillLane(runner.run, num_threads=1)


def _build_grammar_compiler(args: EngineArgs, tokenizers: dict, configs: dict[str, ModelConfig]):
    """SGLang's xgrammar backend, one per model (its tokenizer, its logits width, its EOS ids)."""
    from crosspool_sgl.constrained.xgrammar_compiler import SGLangGrammarCompiler

    return SGLangGrammarCompiler(
        tokenizers,
        {n: c.vocab_size for n, c in configs.items()},
        {n: c.eos_token_ids for n, c in configs.items()},
        args.grammar,
    )


def _build_residency(args: EngineArgs, pool: WeightPool) -> ResidencyManager:
    wp = args.weight_pool
    return ResidencyManager(
        pool,
        WeightStore(pool),
        ResidencyPolicy(wp.max_resident_bytes),
        {s.name: wp.keep_alive_for(s) for s in args.models},
        wp.page_in_bytes_per_step,
    )


def _build_kv_pool(args: EngineArgs, configs: dict[str, ModelConfig], device, dtype, weights_bytes) -> KVPool:
    geoms: dict[str, KVGeometry] = {}
    for name, cfg in configs.items():  # each model's own page geometry: MLA pages hold one latent
        planes, heads, width = cfg.kv_layout
        geoms[name] = KVGeometry(cfg.num_layers, heads, width, dtype, num_planes=planes)
    page_tokens = args.kv_pool.page_tokens
    chunk = args.kv_pool.chunk_bytes or default_chunk_bytes(
        device, [g.page_bytes(page_tokens) for g in geoms.values()]
    )
    total = args.kv_pool.total_bytes or default_kv_bytes(device, weights_bytes)
    pool = KVPool(total, page_tokens=page_tokens, chunk_bytes=chunk, device=device)
    for name, geom in geoms.items():
        pool.add_model(name, geom)
    if args.kv_pool.partition not in ("shared", "static"):
        raise ValueError(f"unknown KV partition {args.kv_pool.partition!r} (shared, static)")
    policies = {
        s.name: ModelKVPolicy(s.kv_floor_bytes, s.kv_ceiling_bytes, s.ttft_ms, s.tbt_ms) for s in args.models
    }
    pool.planner = KVPlanner(
        chunk,
        pool.num_chunks,
        policies,
        args.kv_pool.partition == "static",
        working_set_window_s=args.scheduler.working_set_window_s,
    )
    return pool


def _load_tokenizer(path: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def _decode_fn(tokenizer):
    return lambda ids: tokenizer.decode(ids, skip_special_tokens=False)
