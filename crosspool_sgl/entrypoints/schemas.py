"""OpenAPI documentation of the routes' request bodies and error responses.

The routes read their bodies themselves (strictly, with a size limit, see http_server.read_json),
so FastAPI cannot infer their schemas; they are attached here: SGLang's own protocol models for
the OpenAI routes, `GenerateBody` for SGLang's native /generate, and one error body for all.
"""

from __future__ import annotations

import warnings
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel, ConfigDict, Field


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: int


class ErrorBody(BaseModel):
    """OpenAI's error shape, on every 4xx/5xx of every route."""

    error: ErrorDetail


class NativeSamplingParams(BaseModel):
    """The sampling parameters /generate accepts (SGLang's names); others are refused unless neutral."""

    model_config = ConfigDict(extra="allow")
    max_new_tokens: int | None = Field(None, ge=0)
    temperature: float | None = Field(None, ge=0)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1)
    min_p: float | None = Field(None, ge=0, le=1)
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool | None = None
    seed: int | None = Field(None, ge=0, lt=2**64)
    skip_special_tokens: bool | None = None
    no_stop_trim: bool | None = None
    n: int | None = Field(None, ge=1, le=1)


class GenerateBody(BaseModel):
    """SGLang's GenerateReqInput, as /generate and /models/{name}/generate take it."""

    model_config = ConfigDict(extra="allow")
    text: str | list[str] | None = Field(None, description="the prompt, or a batch of prompts")
    input_ids: list[int] | list[list[int]] | None = Field(None, description="token ids instead of text")
    sampling_params: NativeSamplingParams | list[NativeSamplingParams] | None = None
    model: str | None = Field(None, description="the hosted model; default: the first (or the route's)")
    stream: bool = False
    return_logprob: bool | list[bool] | None = None
    logprob_start_len: int | list[int] | None = Field(None, ge=-1)
    top_logprobs_num: int | list[int] | None = Field(None, ge=0)
    return_text_in_logprobs: bool | None = None
    rid: str | list[str] | None = None


_ERRORS = {
    "400": "invalid request (schema, types, ranges, prompt length)",
    "401": "missing or wrong API key (with --api-key)",
    "404": "unknown model",
    "413": "request body over --max-body-bytes",
    "429": "a queue bound is full; see Retry-After",
    "500": "internal error of this request",
    "503": "the engine is down or shutting down",
    "504": "the request passed --request-timeout",
}


def _body_models() -> dict[str, type[BaseModel]]:
    from sglang.srt.entrypoints.openai import protocol as oai

    return {
        "/v1/completions": oai.CompletionRequest,
        "/v1/chat/completions": oai.ChatCompletionRequest,
        "/generate": GenerateBody,
        "/models/{model_name}/generate": GenerateBody,
    }


def _error_responses() -> dict[str, Any]:
    ref = {"$ref": "#/components/schemas/ErrorBody"}
    return {
        c: {"description": d, "content": {"application/json": {"schema": ref}}} for c, d in _ERRORS.items()
    }


def install_openapi(app: FastAPI) -> None:
    """Attach request bodies and error responses to every operation, and their schemas."""
    bodies = _body_models()

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            with warnings.catch_warnings():  # duplicate ids (a route under two prefixes): renamed below
                warnings.simplefilter("ignore", UserWarning)
                schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
            for path, ops in schema.get("paths", {}).items():
                for method, op in ops.items():
                    op["operationId"] = f"{method}_{path}".replace("/", "_").replace("{", "").replace("}", "")
                    op.setdefault("responses", {}).update(_error_responses())
                    op["responses"].pop("422", None)  # we answer 400, never FastAPI's 422
                    if path in bodies and method in ("post", "put"):
                        ref = {"$ref": f"#/components/schemas/{bodies[path].__name__}"}
                        content = {"application/json": {"schema": ref}}
                        op["requestBody"] = {"required": True, "content": content}
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            for model in {ErrorBody, *bodies.values()}:
                js = model.model_json_schema(ref_template="#/components/schemas/{model}")
                components.update(js.pop("$defs", {}))
                components[model.__name__] = js
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
