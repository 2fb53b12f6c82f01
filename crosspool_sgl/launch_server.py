"""Launch the multi-model server: `python -m crosspool_sgl.launch_server --model NAME=DIR ...`.

Processes (SGLang's shape): this process runs HTTP + the tokenizer side; it
spawns the scheduler process (owns the models, the KV pool and the weights
pool) and the detokenizer process, connected by ZMQ over ipc sockets.
Models are checked here, before anything is spawned, so a missing directory or
an unsupported architecture fails fast with a message naming it.
With no `--model` (and no `--config`) it serves tiny demo models of three
architectures, generated locally on first run and cached.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import math
import os
import shutil
import signal
import sys
import tempfile
import time
import tomllib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from crosspool_sgl.entrypoints.children import ChildProcesses, StartupError
from crosspool_sgl.entrypoints.sampling_flags import add_sampling_flags, grammar_args
from crosspool_sgl.models.config import UnsupportedModelError, load_model_config
from crosspool_sgl.server_args import (
    DisaggArgs,
    EngineArgs,
    KVPoolArgs,
    ModelSpec,
    SchedulerArgs,
    ServerArgs,
    StaticDecodeArgs,
    WeightPoolArgs,
)

logger = logging.getLogger("crosspool_sgl.launch_server")

DEMO_MODELS = ("qwen3_moe", "mixtral", "llama")
_SIZE_SUFFIX = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
_TIME_SUFFIX = {"ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_bytes(text: str | int) -> int:
    """'512M', '2g', '1048576' -> bytes."""
    s = str(text).strip().lower().removesuffix("ib").removesuffix("b")
    mult = _SIZE_SUFFIX.get(s[-1:], 1)
    return int(float(s[:-1] if mult > 1 else s) * mult)


def parse_seconds(text: str | float) -> float:
    """'30', '30s', '5m', '1.5h', 'never' (inf: never evicted for being idle) -> seconds."""
    s = str(text).strip().lower()
    if s in ("never", "inf", "forever"):
        return math.inf
    for suffix in sorted(_TIME_SUFFIX, key=len, reverse=True):
        if s.endswith(suffix):
            return float(s.removesuffix(suffix)) * _TIME_SUFFIX[suffix]
    return float(s)


# `--model NAME=DIR,key=value,...` and [[model]] table keys -> (ModelSpec field, parser)
MODEL_OPTIONS: dict[str, tuple[str, Callable[[Any], Any]]] = {
    "keep_alive": ("keep_alive_s", parse_seconds),
    "keep_alive_s": ("keep_alive_s", parse_seconds),
    "kv_floor": ("kv_floor_bytes", lambda v: parse_bytes(v)),
    "kv_ceiling": ("kv_ceiling_bytes", lambda v: parse_bytes(v)),
    "ttft_ms": ("ttft_ms", float),
    "tbt_ms": ("tbt_ms", float),
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m crosspool_sgl.launch_server",
        description="Serve several (MoE) models behind one OpenAI + SGLang-native HTTP port.",
    )
    p.add_argument(
        "--model",
        action="append",
        default=[],
        metavar="NAME=DIR[,key=value...]",
        help="a model to host: client-facing name and Hugging Face directory (repeatable), then "
        "per-model options: keep_alive=30s (weights residency), kv_floor=64M (KV bytes guaranteed), "
        "kv_ceiling=512M (KV bytes at most), ttft_ms=500 and tbt_ms=100 (SLO targets that order "
        "admission and preemption). With none, tiny demo models are served: " + ", ".join(DEMO_MODELS),
    )
    p.add_argument(
        "--config",
        metavar="TOML",
        help="a TOML file with [[model]] tables (name, path) and any flag below as a top-level key "
        '(e.g. kv_pool_bytes = "512M"); command-line flags win',
    )
    add_engine_flags(p)
    return p


def add_engine_flags(p: argparse.ArgumentParser) -> None:
    """Where to serve and how to size the engine (also settable from --config)."""
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    p.add_argument("--port", type=int, default=30000, help="HTTP port (default: %(default)s)")
    p.add_argument(
        "--device",
        "--attn-device",
        default="cpu",
        help="torch device for the models and pools (the attention side with --ffn-workers), e.g. cuda:0",
    )
    p.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "float16", "bfloat16"],
        help="model and KV dtype; auto takes the first checkpoint's dtype",
    )
    p.add_argument("--attention-backend", default="auto", help="auto, torch, triton or flashinfer")
    p.add_argument(
        "--static-decode",
        default="auto",
        choices=["auto", "on", "off"],
        help="pure-decode steps on persistent buffers padded to batch buckets, replayed as CUDA graphs "
        "on GPU (captured at start-up for small buckets, lazily otherwise); auto: on for CUDA, off on CPU",
    )
    p.add_argument(
        "--static-decode-graph-memory",
        type=parse_bytes,
        default=1 << 30,
        help="GPU memory for CUDA graphs, e.g. 1G (default: 1 GiB), reserved before the KV pool is "
        "sized when --kv-pool-bytes is not given; graphs beyond it are not captured",
    )
    p.add_argument(
        "--kv-pool-bytes",
        type=parse_bytes,
        default=None,
        help="size of the shared KV-cache arena, e.g. 256M (default: 256 MiB on CPU, "
        "80%% of free memory after weights on GPU)",
    )
    p.add_argument(
        "--page-size",
        "--page-tokens",
        dest="page_tokens",
        type=int,
        default=16,
        help="tokens per KV page (default: %(default)s)",
    )
    p.add_argument(
        "--kv-chunk-bytes",
        type=parse_bytes,
        default=None,
        help="KV arena ownership granularity (default: 2 MiB on GPU, 64 KiB multiples on CPU)",
    )
    p.add_argument(
        "--kv-partition",
        choices=["shared", "static"],
        default="shared",
        help="shared: one KV pool that follows demand (CrossPool); static: an equal fixed share per "
        "model, kept for comparison (default: %(default)s)",
    )
    p.add_argument(
        "--disable-prefix-cache",
        action="store_true",
        help="do not keep finished requests' KV pages as a per-model prefix cache",
    )
    p.add_argument(
        "--max-running-requests",
        type=int,
        default=64,
        help="requests decoding at once across all models (default: %(default)s)",
    )
    p.add_argument(
        "--chunked-prefill-size",
        type=int,
        default=1024,
        help="new tokens per scheduler step, prefill chunks and decodes together (default: %(default)s)",
    )
    add_isolation_flags(p)
    add_weight_pool_flags(p)
    add_process_flags(p)
    add_disagg_flags(p)
    add_sampling_flags(p)


def add_weight_pool_flags(p: argparse.ArgumentParser) -> None:
    """Bound of the weights pool and when idle models' experts go to host memory."""
    p.add_argument(
        "--max-resident-bytes",
        type=parse_bytes,
        default=None,
        help="most bytes of expert/FFN weights in the weights pool, e.g. 2G; colder models are "
        "evicted to (pinned) host memory, least recently used first (default: no bound)",
    )
    p.add_argument(
        "--keep-alive-s",
        "--keep-alive",
        dest="keep_alive_s",
        type=parse_seconds,
        default=None,
        help="idle time after which a model's experts are evicted to host memory, e.g. 30s, 5m; "
        "per model: --model NAME=DIR,keep_alive=... (default: evict only when room is needed)",
    )


def add_isolation_flags(p: argparse.ArgumentParser) -> None:
    """How the scheduler keeps one model's long or bursty requests from starving the others."""
    d = SchedulerArgs()
    p.add_argument(
        "--decode-step-slowdown",
        type=float,
        default=d.decode_step_slowdown,
        help="a step that carries decodes may take at most this many times what its decodes alone cost "
        "(prefill chunks fill the rest, sized by a step cost model); a model's tbt_ms caps it further "
        "(default: %(default)s)",
    )
    p.add_argument(
        "--prefill-step-budget-ms",
        type=float,
        default=d.prefill_step_budget_ms,
        help="time budget of a step without decodes; bounds how long a new arrival waits behind a "
        "long prefill (default: %(default)s)",
    )
    p.add_argument(
        "--max-request-share",
        type=float,
        default=d.max_request_share,
        help="a request whose footprint (prompt + decode headroom) exceeds this share of the KV pool is "
        "large: it is admitted after the other queued requests and only beside every model's working "
        "set, its own model's included, until it is overdue (TTFT target + its weighted prefill time) "
        "(default: %(default)s)",
    )
    p.add_argument(
        "--working-set-window",
        type=float,
        default=d.working_set_window_s,
        help="seconds a model keeps, as its working set, the KV memory its demand reached; other "
        "models' ordinary requests cannot take it (default: %(default)s)",
    )


def add_process_flags(p: argparse.ArgumentParser) -> None:
    """Threads, logging and startup limits of the server's processes."""
    p.add_argument(
        "--num-threads",
        type=int,
        default=None,
        help="torch threads of the scheduler's step loop (default: 1 when the prefill lane runs long "
        "prefills on a second thread, which is the CPU default with >= 2 cores; else every usable core)",
    )
    p.add_argument(
        "--max-pending-requests",
        type=int,
        default=4096,
        help="requests in flight (queued or running, all models) beyond which new ones get 429 "
        "(default: %(default)s)",
    )
    p.add_argument(
        "--max-pending-requests-per-model",
        dest="max_pending_per_model",
        type=int,
        default=None,
        help="requests in flight per model beyond which that model's new ones get 429; besides it, a "
        "quarter of each model's fair share of --max-pending-requests stays free for it, so a hot "
        "model cannot fill the queue of cold ones (default: no per-model bound)",
    )
    p.add_argument(
        "--request-timeout",
        dest="request_timeout_s",
        type=parse_seconds,
        default=None,
        help="deadline of every request, queued and running, e.g. 120s; beyond it the request is "
        "aborted and answered 504 (default: none)",
    )
    p.add_argument(
        "--api-key",
        default=None,
        help="require 'Authorization: Bearer KEY' on every route but the exempt ones (401 otherwise); "
        "also read from the CROSSPOOL_API_KEY environment variable (default: no key)",
    )
    p.add_argument(
        "--api-key-exempt",
        default="/health,/metrics",
        help="comma-separated paths served without the API key (default: %(default)s)",
    )
    p.add_argument(
        "--max-body-bytes",
        type=parse_bytes,
        default=16 << 20,
        help="largest request body, e.g. 16M; larger ones get 413 before they are parsed (default: 16M)",
    )
    p.add_argument(
        "--shutdown-grace",
        dest="shutdown_grace_s",
        type=parse_seconds,
        default=30.0,
        help="on SIGTERM, seconds in-flight requests may take to finish before the server exits; "
        "new connections are refused meanwhile (default: %(default)s)",
    )
    p.add_argument(
        "--log-level",
        default="info",
        choices=["debug", "info", "warning", "error"],
        help="log level of every process (default: %(default)s)",
    )
    p.add_argument(
        "--startup-timeout",
        type=float,
        default=600.0,
        help="seconds to wait for the models to load (default: %(default)s)",
    )


def parse_args(argv: Sequence[str] | None = None) -> ServerArgs:
    parser = build_parser()
    args = parser.parse_args(argv)
    config_models: list[ModelSpec] = []
    if args.config:
        cfg = tomllib.loads(Path(args.config).read_text())
        config_models = _config_models(cfg)
        known = {a.dest for a in parser._actions}
        unknown = set(cfg) - known - {"model", "models"}
        if unknown:
            parser.error(f"{args.config}: unknown keys {sorted(unknown)}")
        parser.set_defaults(**{k: v for k, v in cfg.items() if k in known and k not in ("model", "config")})
        args = parser.parse_args(argv)
        for key in (
            "kv_pool_bytes",
            "kv_chunk_bytes",
            "max_resident_bytes",
            "max_body_bytes",
            "static_decode_graph_memory",
        ):
            if isinstance(getattr(args, key), str):
                setattr(args, key, parse_bytes(getattr(args, key)))
        for key in ("keep_alive_s", "shutdown_grace_s", "request_timeout_s"):
            if isinstance(getattr(args, key), str):
                setattr(args, key, parse_seconds(getattr(args, key)))
    specs = config_models + [_model_flag(parser, m) for m in args.model]
    if not specs:
        from crosspool_sgl.tools.make_tiny_models import ensure_tiny_models

        paths = ensure_tiny_models(names=DEMO_MODELS)
        specs = [ModelSpec(n, str(paths[n])) for n in DEMO_MODELS]
    if args.tool_call_parser:  # fail before anything starts
        from crosspool_sgl.entrypoints.tool_parsers import parse_tool_call_parser_flag

        try:
            parse_tool_call_parser_flag(args.tool_call_parser, [sp.name for sp in specs])
        except ValueError as e:
            parser.error(str(e))
    engine = EngineArgs(
        models=tuple(specs),
        device=args.device,
        dtype=args.dtype,
        attention_backend=args.attention_backend,
        kv_pool=KVPoolArgs(
            args.kv_pool_bytes,
            args.page_tokens,
            args.kv_chunk_bytes,
            args.kv_partition,
            not args.disable_prefix_cache,
        ),
        scheduler=SchedulerArgs(
            args.max_running_requests,
            args.chunked_prefill_size,
            args.decode_step_slowdown,
            args.prefill_step_budget_ms,
            args.max_request_share,
            args.working_set_window,
        ),
        weight_pool=WeightPoolArgs(args.max_resident_bytes, args.keep_alive_s),
        show_progress=False,
        disagg=_disagg_args(args),
        grammar=grammar_args(args),
        static_decode=StaticDecodeArgs(
            mode=args.static_decode, graph_memory_bytes=args.static_decode_graph_memory
        ),
    )
    return ServerArgs(
        engine,
        args.host,
        args.port,
        args.log_level,
        args.num_threads,
        args.startup_timeout,
        args.max_pending_requests,
        args.max_pending_per_model,
        args.request_timeout_s,
        args.api_key or os.environ.get("CROSSPOOL_API_KEY") or None,
        tuple(p.strip() for p in str(args.api_key_exempt or "").split(",") if p.strip()),
        args.max_body_bytes,
        args.shutdown_grace_s,
        tool_call_parser=args.tool_call_parser,
    )


def add_disagg_flags(p: argparse.ArgumentParser) -> None:
    """Attention-FFN disaggregation (crosspool_sgl/disagg/README.md)."""
    p.add_argument(
        "--ffn-workers",
        type=int,
        default=0,
        help="FFN worker processes holding the weights pool; 0 runs the FFN here (colocated, default)",
    )
    p.add_argument(
        "--ffn-devices",
        default="",
        help="comma-separated devices of the FFN workers, one per worker or one for all (default: --device)",
    )
    p.add_argument(
        "--micro-batches",
        type=int,
        default=0,
        help="micro-batches per step in the layer-wise pipeline; 0 picks by batch size (default)",
    )
    p.add_argument(
        "--ffn-timeout",
        type=float,
        default=60.0,
        help="seconds to wait for a layer's FFN output before a worker is dead (default: %(default)s)",
    )
    p.add_argument("--ffn-num-threads", type=int, default=None, help="torch threads per FFN worker")


def _disagg_args(args: argparse.Namespace) -> DisaggArgs:
    devices = tuple(d.strip() for d in str(args.ffn_devices or "").split(",") if d.strip())
    return DisaggArgs(args.ffn_workers, devices, args.micro_batches, args.ffn_timeout, args.ffn_num_threads)


def _model_flag(parser: argparse.ArgumentParser, value: str) -> ModelSpec:
    """NAME=DIR[,key=value...]; keys from MODEL_OPTIONS."""
    head, *opts = value.split(",")
    name, sep, path = head.partition("=")
    if not sep or not name or not path:
        parser.error(f"--model expects NAME=DIR[,key=value...], got {value!r}")
    options = {}
    for opt in opts:
        key, sep, val = opt.partition("=")
        if not sep:
            parser.error(f"--model {name}: option {opt!r} is not key=value")
        options[key.strip()] = val.strip()
    try:
        return ModelSpec(name, path, **_model_options(name, options))
    except ValueError as e:
        parser.error(str(e))


def _model_options(name: str, options: dict[str, Any]) -> dict[str, Any]:
    """Per-model options -> ModelSpec fields; ValueError names the model and the key."""
    out = {}
    for key, val in options.items():
        if key not in MODEL_OPTIONS:
            raise ValueError(f"model {name}: unknown option {key!r} (known: {', '.join(MODEL_OPTIONS)})")
        field_name, parse = MODEL_OPTIONS[key]
        try:
            out[field_name] = parse(val)
        except ValueError as e:
            raise ValueError(f"model {name}: bad {key}={val!r}: {e}") from e
    return out


def _config_models(cfg: dict[str, Any]) -> list[ModelSpec]:
    tables = cfg.get("model", [])
    out = [
        ModelSpec(
            t["name"],
            t["path"],
            **_model_options(t["name"], {k: v for k, v in t.items() if k not in ("name", "path")}),
        )
        for t in tables
    ]
    out += [ModelSpec(n, p) for n, p in (cfg.get("models") or {}).items()]  # [models] name = "path"
    return out


def check_models(specs: Sequence[ModelSpec]) -> dict[str, Any]:
    """Fail fast, naming the model: missing dir, no config.json, unsupported architecture, no tokenizer."""
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise StartupError(f"model names must be unique, got {names}")
    configs = {}
    for s in specs:
        if not Path(s.path).is_dir():
            raise StartupError(f"model {s.name!r}: directory {s.path} does not exist")
        try:
            configs[s.name] = load_model_config(s.path)
        except (FileNotFoundError, UnsupportedModelError, KeyError) as e:
            raise StartupError(f"model {s.name!r} ({s.path}): {e}") from e
    return configs


FATAL_LINGER_S = 1.0  # after a child died: answer 503 (and /health unhealthy) this long, then exit


def serve(args: ServerArgs) -> str | None:
    """Check the models, start the children, serve HTTP until SIGINT/SIGTERM or a child's death, stop
    the children. Returns why a child died (the launcher then exits non-zero), None on a clean stop.

    SIGTERM drains: uvicorn stops accepting connections and lets in-flight requests finish for up to
    --shutdown-grace seconds."""
    import uvicorn

    specs = args.engine.models
    configs = check_models(specs)
    ipc_dir = tempfile.mkdtemp(prefix="crosspool-ipc-")
    children = None
    fatal: list[str] = []
    # Until uvicorn installs its own handlers, SIGTERM must still run the cleanup below.
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        # The children start first: they import SGLang and build the models (most of start-up),
        # while this process imports its own front end, so neither waits.
        children = ChildProcesses(args, ipc_dir)
        import_frontend()
        ready = children.wait_ready(args.startup_timeout_s)
        server: Any = None

        def on_death(reason: str) -> None:
            fatal.append(reason)
            hosted.fail_all(f"{reason}; this server is stopping")
            asyncio.get_running_loop().call_later(FATAL_LINGER_S, setattr, server, "should_exit", True)

        app, models, hosted = build_app(args, configs, children, ready["scheduler"]["info"], on_death)
        logger.info("serving %s on http://%s:%d", ", ".join(models), args.host, args.port)
        config = uvicorn.Config(
            app,
            host=args.host,
            port=args.port,
            log_level=args.log_level,
            timeout_graceful_shutdown=max(1, math.ceil(args.shutdown_grace_s)),
            timeout_keep_alive=5,
        )
        server = uvicorn.Server(config)
        server.run()
    except KeyboardInterrupt:
        pass
    finally:
        if children is not None:
            children.stop()
        shutil.rmtree(ipc_dir, ignore_errors=True)
    return fatal[0] if fatal else None


def import_frontend() -> None:
    """Import the HTTP front end (FastAPI routes, SGLang's OpenAI handlers): ~5 s of CPU that
    `serve` overlaps with the children's start instead of running after they are ready."""
    import crosspool_sgl.entrypoints.http_server  # noqa: F401
    import crosspool_sgl.entrypoints.sglang_openai  # noqa: F401
    from crosspool_sgl.entrypoints.sglang_openai import import_handlers
    from crosspool_sgl.managers.hosted_models import ensure_sgl_kernel_importable

    ensure_sgl_kernel_importable()
    import_handlers()


def model_infos(args: ServerArgs, configs: dict[str, Any]) -> dict[str, Any]:
    """What the tokenizer side knows of each model: path, context, vocabulary, type, tool parser."""
    from crosspool_sgl.entrypoints.tool_parsers import parse_tool_call_parser_flag, resolve_tool_call_parser
    from crosspool_sgl.managers.model_tokenizer_manager import ModelInfo

    parser_flags = parse_tool_call_parser_flag(args.tool_call_parser, [s.name for s in args.engine.models])
    return {
        s.name: ModelInfo(
            s.name,
            s.path,
            configs[s.name].max_position_embeddings,
            configs[s.name].vocab_size,
            configs[s.name].model_type,
            resolve_tool_call_parser(s.name, configs[s.name].model_type, parser_flags),
        )
        for s in args.engine.models
    }


def build_app(
    args: ServerArgs,
    configs: dict[str, Any],
    children: ChildProcesses,
    startup_info: dict[str, Any],
    on_death: Callable[[str], None] = lambda reason: None,
) -> tuple[Any, dict[str, Any], Any]:
    """The FastAPI app over a TokenizerManager per model wired to the children's sockets, with a
    watchdog. Model `i` receives at `tokenizer-i` in the children's ipc directory."""
    from crosspool_sgl.entrypoints.http_server import create_app
    from crosspool_sgl.entrypoints.metrics import ServerMetrics
    from crosspool_sgl.entrypoints.watchdog import ChildWatchdog
    from crosspool_sgl.managers.admission import QueueBounds
    from crosspool_sgl.managers.hosted_models import HostedModels

    models = model_infos(args, configs)
    metrics = ServerMetrics()
    hosted = HostedModels(
        models,
        QueueBounds(args.max_pending_requests, args.max_pending_per_model),
        metrics.hooks(),
        args.request_timeout_s,
    )
    try:
        hosted.connect(children.scheduler_addr, children.tokenizer_addr_of)
    except ValueError as e:
        raise StartupError(str(e)) from e
    started = time.time()

    def server_info() -> dict[str, Any]:
        return {
            "version": _version(),
            "models": {
                n: {"model_path": m.path, "architecture": m.architecture, "context_length": m.context_len}
                for n, m in models.items()
            },
            "server_args": _args_dict(args),
            "uptime_s": time.time() - started,
            "startup_info": startup_info,
            "processes": {
                "launcher": os.getpid(),
                **{name: p.pid for name, p in children.procs.items()},
                "ffn_workers": list(children.ffn_pids),
            },
        }

    watchdog = ChildWatchdog(children.probes(), on_death)
    app = create_app(hosted, metrics, server_info, args.max_body_bytes, watchdog.start)
    if args.api_key:
        from crosspool_sgl.entrypoints.auth import ApiKeyMiddleware

        app.add_middleware(ApiKeyMiddleware, api_key=args.api_key, exempt=args.api_key_exempt)
    return app, models, hosted


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("crosspool-sgl")
    except PackageNotFoundError:
        return "dev"


def _args_dict(args: ServerArgs) -> dict[str, Any]:
    from dataclasses import asdict

    out = asdict(args)
    if out.get("api_key"):
        out["api_key"] = "<set>"  # /get_server_info must not hand the key to whoever asks
    return out


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="[server] %(asctime)s %(levelname)s %(message)s")
    try:
        fatal = serve(args)
    except StartupError as e:
        print(f"crosspool_sgl.launch_server: error: {e}", file=sys.stderr)
        return 1
    if fatal is not None:
        print(f"crosspool_sgl.launch_server: error: {fatal}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
