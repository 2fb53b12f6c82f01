"""The HTTP process's hosted models: one SGLang TokenizerManager each, and what they share.

Shared by every model's manager: the queue bounds (`admission.py`: a hot model cannot fill the
queue of cold ones), whether the engine still serves (503 once a child process died), and the one
scheduler behind them, which any manager can ask for its state or to flush its cache (with a
timeout: SGLang's communicators wait forever).

Process config: SGLang's managers and handlers read `get_serving()` / `get_observability()` /
`get_model()` at request time, so this process publishes one SGLang `ServerArgs` (role
"tokenizer") with the first model's path; only model-independent serving flags are read from it.
Each manager builds its own model config under a context of its own, at start-up.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

from crosspool_sgl.managers.admission import QueueBounds
from crosspool_sgl.managers.errors import RequestError, unavailable
from crosspool_sgl.managers.metrics_hooks import MetricsHooks
from crosspool_sgl.managers.model_tokenizer_manager import (
    ModelAddresses,
    ModelInfo,
    ModelTokenizerManager,
    model_server_args,
)

__all__ = ["HostedModels", "ensure_sgl_kernel_importable", "publish_frontend_config"]

_STUBS = Path(__file__).resolve().parents[2] / "patches" / "stubs"
CONTROL_TIMEOUT_S = 10.0  # a scheduler that does not answer this fast is reported unhealthy (503)


def ensure_sgl_kernel_importable() -> None:
    """`ServerArgs.resolve_once` imports SGLang's model loader, which imports `sgl_kernel` (CPU stub)."""
    try:
        import sgl_kernel  # noqa: F401
    except ImportError:
        if _STUBS.is_dir() and str(_STUBS) not in sys.path:
            sys.path.append(str(_STUBS))


def publish_frontend_config(first: ModelInfo) -> Any:
    """Publish this (HTTP) process's one SGLang ServerArgs; returns it."""
    ensure_sgl_kernel_importable()
    from sglang.srt import runtime_context

    server_args = model_server_args(first.name, first.path)
    runtime_context.publish(server_args, role="tokenizer")
    return server_args


class HostedModels:
    """Every hosted model's manager by client-facing name, and the state they share."""

    def __init__(
        self,
        infos: dict[str, ModelInfo],
        bounds: QueueBounds | None = None,
        metrics: MetricsHooks | None = None,
        request_timeout_s: float | None = None,
    ) -> None:
        self.infos = infos
        self.bounds = bounds or QueueBounds()
        self.metrics = metrics or MetricsHooks()
        self.request_timeout_s = request_timeout_s
        self.managers: dict[str, ModelTokenizerManager] = {}
        self.dead_reason: str | None = None  # set when a child died: every request answers 503
        self._controls: set[asyncio.Future] = set()  # control calls waiting for the scheduler
        self.draining = False  # shutting down: new requests answer 503, in-flight ones finish

    def connect(self, scheduler_addr: str, own_addr: Callable[[int], str], publish: bool = True) -> None:
        """Build one manager per model; `own_addr(index)` is where model `index` receives (by index:
        model names need not be path-safe). Publishes the process config first (a test that runs
        the managers under a context of its own passes `publish=False`)."""
        if publish:
            publish_frontend_config(next(iter(self.infos.values())))
        else:
            ensure_sgl_kernel_importable()
        for i, info in enumerate(self.infos.values()):
            server_args = model_server_args(info.name, info.path, tool_call_parser=info.tool_call_parser)
            try:
                self.managers[info.name] = ModelTokenizerManager(
                    info,
                    server_args,
                    ModelAddresses(scheduler_addr, own_addr(i)),
                    self,
                    self.metrics,
                    self.request_timeout_s,
                )
            except Exception as e:  # e.g. no tokenizer in the directory: name the model
                raise ValueError(f"model {info.name!r} ({info.path}): cannot serve it: {e}") from e

    def __iter__(self) -> Iterator[str]:
        return iter(self.infos)

    @property
    def default_model(self) -> str:
        return next(iter(self.infos))

    def resolve_model(self, name: Any) -> str:
        """The client's `model` (or a route's prefix) -> a hosted name; 404 names the hosted ones."""
        name = name or self.default_model
        if not isinstance(name, str):
            raise RequestError("`model` must be a string", param="model")
        if name not in self.infos:
            raise RequestError(
                f"The model `{name}` does not exist. Hosted models: {', '.join(self.infos)}",
                404,
                "NotFoundError",
                "model",
            )
        return name

    def manager(self, name: Any) -> ModelTokenizerManager:
        return self.managers[self.resolve_model(name)]

    def check_admission(self, model: str, num_new: int) -> None:
        """Refuse before anything is tokenised or sent: 503 when down, 400/429 beyond a queue bound."""
        if self.dead_reason is not None:
            raise unavailable(self.dead_reason)
        if self.draining:
            raise unavailable("the server is shutting down")
        in_flight = {name: len(tm.rid_to_state) for name, tm in self.managers.items()}
        self.bounds.check(model, num_new, in_flight, list(self.infos))

    def fail_all(self, message: str) -> None:
        """The engine is gone: in-flight requests finish with 503 now, later ones are refused."""
        self.dead_reason = message
        for tm in self.managers.values():
            tm.fail_all(message)
        for call in self._controls:
            call.cancel()  # its reply will never come: the caller gets the 503 now

    async def _control(self, call: Callable[[], Awaitable[Any]]) -> Any:
        if self.dead_reason is not None:
            raise unavailable(self.dead_reason)
        pending = asyncio.ensure_future(call())
        self._controls.add(pending)
        try:
            return await asyncio.wait_for(pending, CONTROL_TIMEOUT_S)
        except TimeoutError:
            raise unavailable("the scheduler did not answer in time") from None
        except asyncio.CancelledError:
            if self.dead_reason is None or not pending.cancelled():
                raise  # our own caller was cancelled
            raise unavailable(self.dead_reason) from None
        finally:
            self._controls.discard(pending)

    async def scheduler_info(self) -> dict[str, Any]:
        """The scheduler's state (pools, queues, per model): any manager can ask, all share it."""
        tm = next(iter(self.managers.values()))
        (state,) = await self._control(tm.get_internal_state)
        return state

    async def flush_cache(self) -> bool:
        tm = next(iter(self.managers.values()))
        return (await self._control(tm.flush_cache)).success

    def start(self) -> None:
        """Start every manager's receive loop (inside the server's event loop)."""
        for tm in self.managers.values():
            tm.auto_create_handle_loop()

    async def close(self) -> None:
        for tm in self.managers.values():
            await tm.close()
