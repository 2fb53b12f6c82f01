"""The HTTP app: SGLang's native API (also under `/models/{name}/...`), OpenAI routes and /metrics.

`sgl.RuntimeEndpoint(f"{base}/models/{name}")` runs frontend-language programs
against model `name`; `RuntimeEndpoint(base)` targets the first model.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse

from crosspool_sgl.entrypoints.http_io import DEFAULT_MAX_BODY_BYTES, error_response, read_json, sse
from crosspool_sgl.entrypoints.metrics import ServerMetrics
from crosspool_sgl.managers.parallel_sampling import submit_sharing_prefix
from crosspool_sgl.managers.stream_holdback import StreamHoldback, held_back
from crosspool_sgl.managers.tokenizer_manager import (
    GenerateInput,
    ModelInfo,
    MultiModelTokenizerManager,
    RequestError,
)
from crosspool_sgl.managers.validation import check_num_choices
from crosspool_sgl.sampling_params import sample_seed

logger = logging.getLogger(__name__)

_GENERATE_FIELDS = (
    "return_logprob",
    "logprob_start_len",
    "top_logprobs_num",
    "return_text_in_logprobs",
    "rid",
)


def _prompts(body: dict[str, Any]) -> tuple[list[dict[str, Any]], bool]:
    """`text` (str or list of str) or `input_ids` (list of int or list of lists) -> prompts, is_single."""
    text, input_ids = body.get("text"), body.get("input_ids")
    if text is None and input_ids is None:
        raise RequestError("either `text` or `input_ids` is required", param="text")
    if text is not None:
        if isinstance(text, str):
            return [{"text": text}], True
        if isinstance(text, list) and text and all(isinstance(t, str) for t in text):
            return [{"text": t} for t in text], False
        raise RequestError("`text` must be a string or a non-empty list of strings", param="text")
    if isinstance(input_ids, list) and input_ids and all(isinstance(t, int) for t in input_ids):
        return [{"input_ids": input_ids}], True
    if isinstance(input_ids, list) and input_ids and all(isinstance(t, list) for t in input_ids):
        return [{"input_ids": ids} for ids in input_ids], False
    raise RequestError(
        "`input_ids` must be a non-empty list of integers or a list of such lists", param="input_ids"
    )


def parse_generate_body(body: dict[str, Any], model: str | None) -> tuple[list[GenerateInput], bool, int]:
    """SGLang's GenerateReqInput fields -> requests; returns (requests, is_single, n).

    `sampling_params.n` > 1 expands each prompt into n samples, adjacent (SGLang's order), with
    seeds offset per sample; the response is then a list, as SGLang's (`is_single` is False)."""
    prompts, single = _prompts(body)
    count = len(prompts)

    def per_item(key: str, default: Any) -> list[Any]:
        v = body.get(key, default)
        if isinstance(v, list) and not single and key != "stop":
            if len(v) != count:
                raise RequestError(f"`{key}` has {len(v)} entries for {count} prompts", param=key)
            return v
        return [v] * count

    params = per_item("sampling_params", None)
    if any(p is not None and not isinstance(p, dict) for p in params):
        raise RequestError(
            "`sampling_params` must be an object (or one per prompt in a batch)", param="sampling_params"
        )
    n = next((p["n"] for p in params if p and "n" in p), None)
    check_num_choices(n)
    n = n or 1
    fields = {k: per_item(k, None) for k in _GENERATE_FIELDS}
    reqs = []
    for i, p in enumerate(prompts):
        kw = {k: v[i] for k, v in fields.items() if v[i] is not None}
        if "rid" in kw and not single and not isinstance(body.get("rid"), list):
            kw["rid"] = f"{kw['rid']}-{i}"
        sampling = {k: v for k, v in (params[i] or {}).items() if k != "n"}
        for j in range(n):
            one = dict(kw, rid=f"{kw['rid']}-{j}") if n > 1 and "rid" in kw else kw
            seeded = dict(sampling)
            if n > 1 and seeded.get("seed") is not None:
                seeded["seed"] = sample_seed(seeded["seed"], j)
            stream = bool(body.get("stream"))
            reqs.append(GenerateInput(model=model, sampling_params=seeded, stream=stream, **p, **one))
    return reqs, single and n == 1, n


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


def build_native_router(tm: MultiModelTokenizerManager, server_info: Callable[[], dict]) -> APIRouter:
    """Native routes; mounted at the root and at /models/{model_name}."""
    router = APIRouter()

    def pick(model_name: str | None) -> str:
        return tm.resolve_model(model_name)

    @router.api_route("/generate", methods=["POST", "PUT"])
    async def generate(request: Request, model_name: str | None = None) -> Response:
        return await handle_generate(tm, request, model_name)

    @router.get("/get_model_info")
    @router.get("/model_info")
    async def model_info(model_name: str | None = None) -> dict[str, Any]:
        return model_info_dict(tm.models[pick(model_name)])

    @router.get("/get_server_info")
    @router.get("/server_info")
    async def get_server_info(model_name: str | None = None) -> dict[str, Any]:
        if model_name is not None:
            pick(model_name)
        sched = await tm.get_scheduler_info()
        return {**server_info(), **sched, "internal_states": [sched]}

    @router.api_route("/flush_cache", methods=["GET", "POST"])
    async def flush_cache(model_name: str | None = None) -> Response:
        ok = await tm.flush_cache()
        msg = "Cache flushed." if ok else "Cache not flushed: requests are running."
        return JSONResponse({"success": ok, "message": msg}, status_code=200 if ok else 400)

    @router.get("/health")
    async def health(model_name: str | None = None) -> Response:
        if model_name is not None:
            pick(model_name)
        reason = tm.dead_reason or ("shutting down" if tm.draining else None)
        if reason is None:
            try:
                await tm.get_scheduler_info()  # the scheduler answers
            except RequestError as e:
                reason = e.message
            except TimeoutError:
                reason = "the scheduler did not answer in time"
        if reason is not None:
            return JSONResponse({"status": "unhealthy", "reason": reason}, status_code=503)
        return JSONResponse({"status": "ok"})

    @router.get("/health_generate")
    async def health_generate(model_name: str | None = None) -> Response:
        models = [pick(model_name)] if model_name is not None else list(tm.models)
        objs = [
            GenerateInput(model=m, input_ids=[0], sampling_params={"max_new_tokens": 1, "temperature": 0})
            for m in models
        ]
        states = await tm.submit_all(objs)
        await asyncio.wait_for(asyncio.gather(*(tm.collect(s) for s in states)), timeout=60)
        return JSONResponse({"status": "ok"})

    return router


async def handle_generate(
    tm: MultiModelTokenizerManager, request: Request, model_name: str | None
) -> Response:
    """SGLang's /generate: single or batch, streaming (SSE of cumulative text) or not."""
    body = await read_json(request)
    model = tm.resolve_model(model_name if model_name is not None else body.get("model"))
    objs, single, n = parse_generate_body(body, model)
    states = await submit_sharing_prefix(tm, objs, n, request.is_disconnected)
    if body.get("stream"):
        return StreamingResponse(_native_stream(tm, states, single), media_type="text/event-stream")
    results = await asyncio.gather(*(tm.collect(s, request.is_disconnected) for s in states))
    return JSONResponse(results[0] if single else list(results))


async def _native_stream(
    tm: MultiModelTokenizerManager, states: list[Any], single: bool
) -> AsyncIterator[bytes]:
    """SGLang's streaming shape: cumulative results per event (a batch's carry `index`, the
    prompt's position, samples of one prompt adjacent), then `data: [DONE]`."""
    if single:
        (state,) = states
        results = held_back(tm.wait_for(state))
    else:
        results = _indexed(tm.merge_streams(states), states)
    try:
        async for result in results:
            yield sse(result)
    except RequestError as e:
        yield sse({"error": {"message": e.message, "type": e.err_type, "code": e.status_code}})
    finally:
        await results.aclose()  # on disconnect: aborts the request now, not at garbage collection
    yield b"data: [DONE]\n\n"


async def _indexed(
    merged: AsyncGenerator[tuple[int, dict[str, Any]], None], states: list[Any]
) -> AsyncGenerator[dict[str, Any], None]:
    """A batch's merged stream as SGLang sends it: each cumulative result with its `index`."""
    gates = [StreamHoldback() for _ in states]
    try:
        async for index, result in merged:
            if gates[index].release(result):
                yield {**result, "index": index}
    finally:
        await merged.aclose()


def create_app(
    tm: MultiModelTokenizerManager,
    metrics: ServerMetrics,
    server_info: Callable[[], dict],
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    on_startup: Callable[[], Any] | None = None,
) -> FastAPI:
    from crosspool_sgl.entrypoints.openai_api import build_openai_router  # /v1/models

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await tm.start()
        if on_startup is not None:
            on_startup()  # e.g. the launcher's watchdog over the child processes
        yield
        await tm.stop()

    app = FastAPI(lifespan=lifespan, title="crosspool-sgl")
    app.state.max_body_bytes = max_body_bytes

    @app.exception_handler(RequestError)
    async def on_request_error(request: Request, e: RequestError) -> JSONResponse:
        return error_response(e)

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(request: Request, e: RequestValidationError) -> JSONResponse:
        return error_response(RequestError(str(e)))

    @app.exception_handler(TimeoutError)
    async def on_timeout(request: Request, e: TimeoutError) -> JSONResponse:
        return error_response(RequestError("the scheduler did not answer in time", 503, "ServiceUnavailable"))

    @app.exception_handler(Exception)
    async def on_unexpected(request: Request, e: Exception) -> JSONResponse:
        logger.exception("unexpected error on %s", request.url.path)
        return error_response(RequestError(f"internal error: {type(e).__name__}", 500, "InternalServerError"))

    @app.get("/metrics")
    async def prometheus_metrics() -> Response:
        metrics.update_from_scheduler(await tm.get_scheduler_info())
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    native = build_native_router(tm, server_info)
    app.include_router(native)
    app.include_router(native, prefix="/models/{model_name}")
    # SGLang's own OpenAI handlers answer /v1/completions and /v1/chat/completions (see
    # managers/SGLANG_FRONTEND.md); /v1/models is ours, a card per hosted model.
    from crosspool_sgl.entrypoints.sglang_openai import build_sglang_openai_router

    app.include_router(build_sglang_openai_router(tm))
    app.include_router(build_openai_router(tm))
    from crosspool_sgl.entrypoints.schemas import install_openapi

    install_openapi(app)
    return app
