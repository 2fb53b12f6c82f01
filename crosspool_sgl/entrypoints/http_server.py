"""The HTTP app: SGLang's native API (also under `/models/{name}/...`), OpenAI routes and /metrics.

`sgl.RuntimeEndpoint(f"{base}/models/{name}")` runs frontend-language programs
against model `name`; `RuntimeEndpoint(base)` targets the first model.
"""

from __future__ import annotations

import asyncio
import copy
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse

from crosspool_sgl.entrypoints.http_io import (
    DEFAULT_MAX_BODY_BYTES,
    error_body,
    error_response,
    read_json,
    sse,
)
from crosspool_sgl.entrypoints.metrics import ServerMetrics
from crosspool_sgl.managers.errors import RequestError, client_error, unavailable
from crosspool_sgl.managers.hosted_models import HostedModels
from crosspool_sgl.managers.model_tokenizer_manager import ModelInfo, ModelTokenizerManager

logger = logging.getLogger(__name__)


def model_info_dict(info: ModelInfo) -> dict[str, Any]:
    """SGLang's /get_model_info fields (RuntimeEndpoint reads `model_path`)."""
    return {
        "model_path": info.path,
        "tokenizer_path": info.path,
        "served_model_name": info.name,
        "is_generation": True,
        "architecture": info.architecture,
        "context_length": info.context_len,
        "preferred_sampling_params": None,
        "weight_version": "default",
        "has_image_understanding": False,
        "has_audio_understanding": False,
    }


def generate_input(body: dict[str, Any]) -> Any:
    """The body as SGLang's GenerateReqInput (the `model` field picks the manager, not a field of it)."""
    from sglang.srt.managers.io_struct import GenerateReqInput

    fields = {k: v for k, v in body.items() if k != "model"}
    try:
        obj = GenerateReqInput(**fields)
        # SGLang normalises inside its manager, where a malformed body (`sampling_params` a string,
        # a list for one prompt) fails with AttributeError or IndexError: a 500. Try it on a copy.
        copy.deepcopy(obj).normalize_batch_and_arguments()
    except Exception as e:  # an unknown field, a wrong shape: the client's error, said as SGLang says it
        raise RequestError(f"malformed /generate body: {e}") from e
    return obj


def build_native_router(hosted: HostedModels, server_info: Callable[[], dict]) -> APIRouter:
    """Native routes; mounted at the root and at /models/{model_name}."""
    router = APIRouter()

    @router.api_route("/generate", methods=["POST", "PUT"])
    async def generate(request: Request, model_name: str | None = None) -> Response:
        body = await read_json(request)
        tm = hosted.manager(model_name if model_name is not None else body.get("model"))
        return await handle_generate(tm, generate_input(body), request)

    @router.get("/get_model_info")
    @router.get("/model_info")
    async def model_info(model_name: str | None = None) -> dict[str, Any]:
        return model_info_dict(hosted.infos[hosted.resolve_model(model_name)])

    @router.get("/get_server_info")
    @router.get("/server_info")
    async def get_server_info(model_name: str | None = None) -> dict[str, Any]:
        if model_name is not None:
            hosted.resolve_model(model_name)
        sched = await hosted.scheduler_info()
        return {**server_info(), **sched, "internal_states": [sched]}

    @router.api_route("/flush_cache", methods=["GET", "POST"])
    async def flush_cache(model_name: str | None = None) -> Response:
        ok = await hosted.flush_cache()
        msg = "Cache flushed." if ok else "Cache not flushed: requests are running."
        return JSONResponse({"success": ok, "message": msg}, status_code=200 if ok else 400)

    @router.get("/health")
    async def health(model_name: str | None = None) -> Response:
        if model_name is not None:
            hosted.resolve_model(model_name)
        reason = hosted.dead_reason or ("shutting down" if hosted.draining else None)
        if reason is None:
            try:
                await hosted.scheduler_info()  # the scheduler answers
            except RequestError as e:
                reason = e.message
        if reason is not None:
            return JSONResponse({"status": "unhealthy", "reason": reason}, status_code=503)
        return JSONResponse({"status": "ok"})

    @router.get("/health_generate")
    async def health_generate(model_name: str | None = None) -> Response:
        from sglang.srt.managers.io_struct import GenerateReqInput

        names = [hosted.resolve_model(model_name)] if model_name is not None else list(hosted)

        async def one(name: str) -> None:
            obj = GenerateReqInput(input_ids=[0], sampling_params={"max_new_tokens": 1, "temperature": 0})
            async for _ in hosted.managers[name].generate_request(obj):
                pass

        try:
            await asyncio.wait_for(asyncio.gather(*(one(n) for n in names)), timeout=60)
        except TimeoutError:
            raise unavailable("a model did not generate one token within 60 s") from None
        except Exception as e:
            if (err := client_error(e)) is None:
                raise
            raise err from e
        return JSONResponse({"status": "ok"})

    return router


async def handle_generate(tm: ModelTokenizerManager, obj: Any, request: Request) -> Response:
    """SGLang's /generate: single or batch, streaming (SSE of cumulative results) or not."""
    if obj.stream:
        return StreamingResponse(_native_stream(tm, obj, request), media_type="text/event-stream")
    results = tm.generate_request(obj, request)
    try:
        result = await anext(results)
    except Exception as e:
        if (err := client_error(e)) is None:
            raise
        raise err from e
    finally:
        await results.aclose()
    return JSONResponse(result)


async def _native_stream(tm: ModelTokenizerManager, obj: Any, request: Request) -> AsyncIterator[bytes]:
    """SGLang's streaming shape: cumulative results (a batch's carry `index`), then `data: [DONE]`;
    a failure mid-stream (the engine went away included) is one error event."""
    results = tm.generate_request(obj, request)
    try:
        async for result in results:
            yield sse(result)
    except Exception as e:
        err = client_error(e)
        if err is None:
            logger.exception("a stream of %s failed", tm.model)
            err = RequestError(f"internal error: {type(e).__name__}", 500, "InternalServerError")
        yield sse(error_body(err.message, err.err_type, err.status_code, err.param))
    finally:
        await results.aclose()  # on disconnect: aborts the request now, not at garbage collection
    yield b"data: [DONE]\n\n"


def create_app(
    hosted: HostedModels,
    metrics: ServerMetrics,
    server_info: Callable[[], dict],
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    on_startup: Callable[[], Any] | None = None,
) -> FastAPI:
    from crosspool_sgl.entrypoints.openai_api import build_openai_router  # /v1/models

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        hosted.start()
        if on_startup is not None:
            on_startup()  # e.g. the launcher's watchdog over the child processes
        yield
        await hosted.close()

    app = FastAPI(lifespan=lifespan, title="crosspool-sgl")
    app.state.max_body_bytes = max_body_bytes

    @app.exception_handler(RequestError)
    async def on_request_error(request: Request, e: RequestError) -> JSONResponse:
        return error_response(e)

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(request: Request, e: RequestValidationError) -> JSONResponse:
        return error_response(RequestError(str(e)))

    @app.exception_handler(Exception)
    async def on_unexpected(request: Request, e: Exception) -> JSONResponse:
        logger.exception("unexpected error on %s", request.url.path)
        return error_response(RequestError(f"internal error: {type(e).__name__}", 500, "InternalServerError"))

    @app.get("/metrics")
    async def prometheus_metrics() -> Response:
        metrics.update_from_scheduler(await hosted.scheduler_info())
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    native = build_native_router(hosted, server_info)
    app.include_router(native)
    app.include_router(native, prefix="/models/{model_name}")
    # SGLang's own OpenAI handlers answer /v1/completions and /v1/chat/completions (see
    # managers/SGLANG_FRONTEND.md); /v1/models is ours, a card per hosted model.
    from crosspool_sgl.entrypoints.sglang_openai import build_sglang_openai_router

    app.include_router(build_sglang_openai_router(hosted))
    app.include_router(build_openai_router(hosted))
    from crosspool_sgl.entrypoints.schemas import install_openapi

    install_openapi(app)
    return app
