"""Configuration as frozen dataclasses, passed explicitly (no globals, no env reads at import)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class ModelSpec:
    """One hosted model: the name clients use and its Hugging Face directory."""

    name: str
    path: str


@dataclass(frozen=True)
class KVPoolArgs:
    total_bytes: int | None = None  # None: a default sized for the device
    page_tokens: int = 16
    chunk_bytes: int | None = None  # None: 2 MiB on GPU (VMM granularity), smaller on CPU


@dataclass(frozen=True)
class SchedulerArgs:
    max_running_requests: int = 64
    chunked_prefill_size: int = 1024


@dataclass(frozen=True)
class EngineArgs:
    models: tuple[ModelSpec, ...]
    device: str = "cpu"
    dtype: str = "auto"
    attention_backend: str = "auto"
    kv_pool: KVPoolArgs = field(default_factory=KVPoolArgs)
    scheduler: SchedulerArgs = field(default_factory=SchedulerArgs)
    show_progress: bool = True


@dataclass(frozen=True)
class ServerArgs:
    """The HTTP server: an engine plus where and how to serve it (launch_server builds this)."""

    engine: EngineArgs
    host: str = "127.0.0.1"
    port: int = 30000
    log_level: str = "info"
    num_threads: int | None = None  # torch threads in the scheduler process; None: torch's default
    startup_timeout_s: float = 600.0
