"""Configuration as frozen dataclasses, passed explicitly (no globals, no env reads at import)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class ModelSpec:
    """One hosted model: the name clients use and its Hugging Face directory."""

    name: str
    path: str
    keep_alive_s: float | None = None  # per-model override of WeightPoolArgs.keep_alive_s
    kv_floor_bytes: int = 0  # KV bytes guaranteed to this model
    kv_ceiling_bytes: int | None = None  # most KV bytes this model may hold; None: the whole pool
    ttft_ms: float | None = None  # SLO targets: order admission and preemption
    tbt_ms: float | None = None


@dataclass(frozen=True)
class KVPoolArgs:
    total_bytes: int | None = None  # None: a default sized for the device
    page_tokens: int = 16
    chunk_bytes: int | None = None  # None: 2 MiB on GPU (VMM granularity), smaller on CPU
    partition: str = "shared"  # "shared" (CrossPool) or "static" (equal per-model shares, for comparison)
    prefix_cache: bool = True


@dataclass(frozen=True)
class WeightPoolArgs:
    """Bound of the weights pool and when idle models' experts leave it (see mem/residency.py)."""

    max_resident_bytes: int | None = None  # None: every model stays resident
    keep_alive_s: float | None = None  # idle seconds before eviction to host; None: only for room
    page_in_bytes_per_step: int | None = 64 << 20  # CPU: bytes paged in between two steps

    def keep_alive_for(self, spec: ModelSpec) -> float | None:
        return spec.keep_alive_s if spec.keep_alive_s is not None else self.keep_alive_s


@dataclass(frozen=True)
class SchedulerArgs:
    """Batching and isolation knobs (see core/schedule_policy.py for what each bounds)."""

    max_running_requests: int = 64
    chunked_prefill_size: int = 1024
    decode_step_slowdown: float = 2.0  # a step with decodes takes at most this x its decodes alone
    prefill_step_budget_ms: float = 50.0  # a step without decodes
    max_request_share: float = 0.5  # of the pool: a request whose footprint exceeds it is large
    working_set_window_s: float = 10.0  # how long a model keeps the memory its demand reached
    prefill_lane: bool | None = None  # long prefills on a second thread; None: on CPU with >= 2 cores


@dataclass(frozen=True)
class DisaggArgs:
    """Attention-FFN disaggregation (crosspool_sgl/disagg): 0 FFN workers = colocated."""

    ffn_workers: int = 0  # FFN worker processes holding the weights pool
    ffn_devices: tuple[str, ...] = ()  # one per worker (or one for all); empty: the engine's device
    micro_batches: int = 0  # per step and layer; 0: chosen by batch size (1 for a tiny batch)
    ffn_timeout_s: float = 60.0  # longest wait for one layer's FFN output before the worker counts as dead
    ffn_num_threads: int | None = None  # torch threads per FFN worker; None: torch's default


@dataclass(frozen=True)
class GrammarArgs:
    """Structured output through SGLang's xgrammar backend (SGLang's --constrained-json-* flags)."""

    json_any_whitespace: bool = True  # False: JSON in its compact form only
    json_max_whitespace_cnt: int | None = None  # most consecutive whitespace characters in JSON
    compile_workers: int = 2  # threads compiling grammars, off the step loop


@dataclass(frozen=True)
class StaticDecodeArgs:
    """Pure-decode steps on persistent buffers, replayed as CUDA graphs (core/static_decode.py)."""

    mode: str = "auto"  # auto: on for CUDA, off on CPU; on; off
    batch_buckets: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64)  # rows per model; larger steps run eagerly
    startup_buckets: tuple[int, ...] = (1, 2, 4, 8)  # captured per model at start-up; the rest lazily
    graph_memory_bytes: int = (
        1 << 30
    )  # CUDA: reserved before the KV pool is sized; graphs beyond it run eagerly
    max_graphs: int = 128  # least recently used graphs are dropped beyond this

    def enabled(self, device_type: str) -> bool:
        if self.mode not in ("auto", "on", "off"):
            raise ValueError(f"unknown static decode mode {self.mode!r} (auto, on, off)")
        return self.mode == "on" or (self.mode == "auto" and device_type == "cuda")


@dataclass(frozen=True)
class EngineArgs:
    models: tuple[ModelSpec, ...]
    device: str = "cpu"
    dtype: str = "auto"
    attention_backend: str = "auto"
    kv_pool: KVPoolArgs = field(default_factory=KVPoolArgs)
    weight_pool: WeightPoolArgs = field(default_factory=WeightPoolArgs)
    scheduler: SchedulerArgs = field(default_factory=SchedulerArgs)
    show_progress: bool = True
    disagg: DisaggArgs = field(default_factory=DisaggArgs)
    grammar: GrammarArgs = field(default_factory=GrammarArgs)
    static_decode: StaticDecodeArgs = field(default_factory=StaticDecodeArgs)


@dataclass(frozen=True)
class ServerArgs:
    """The HTTP server: an engine plus where and how to serve it (launch_server builds this)."""

    engine: EngineArgs
    host: str = "127.0.0.1"
    port: int = 30000
    log_level: str = "info"
    num_threads: int | None = None  # step-loop torch threads; None: 1 with the prefill lane, else all
    startup_timeout_s: float = 600.0
    max_pending_requests: int = 4096  # in flight across all models; beyond it new requests get 429
    max_pending_per_model: int | None = None  # in flight per model; None: the total and fair share bound it
    request_timeout_s: float | None = None  # per-request deadline (queued + running); None: none
    api_key: str | None = None  # Bearer token every route but the exempt ones requires; None: open
    api_key_exempt: tuple[str, ...] = ("/health", "/metrics")
    max_body_bytes: int = 16 << 20  # larger request bodies get 413 before they are parsed
    shutdown_grace_s: float = 30.0  # SIGTERM: how long in-flight requests may finish before exit
    tool_call_parser: str | None = None  # --tool-call-parser: PARSER or NAME=PARSER,...; None: by family
