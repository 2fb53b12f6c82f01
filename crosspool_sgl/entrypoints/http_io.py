"""Reading request bodies and writing errors and server-sent events, shared by every route module
(the native API, SGLang's OpenAI handlers and ours), so none of them imports another."""

from __future__ import annotations

from typing import Any

import orjson
import pydantic
from fastapi import Request
from fastapi.responses import JSONResponse

from crosspool_sgl.managers.errors import RequestError

DEFAULT_MAX_BODY_BYTES = 16 << 20  # larger bodies get 413 before a byte of them is parsed


def error_body(message: str, err_type: str, code: int, param: str | None = None) -> dict[str, Any]:
    """OpenAI-style error body: {"error": {"message", "type", "param", "code"}}."""
    return {"error": {"message": message, "type": err_type, "param": param, "code": code}}


def error_response(e: RequestError) -> JSONResponse:
    body = error_body(e.message, e.err_type, e.status_code, e.param)
    return JSONResponse(body, status_code=e.status_code, headers=e.headers or None)


async def read_body(request: Request) -> bytes:
    """The raw body, refused with 413 as soon as it passes the limit (Content-Length first)."""
    limit = getattr(request.app.state, "max_body_bytes", DEFAULT_MAX_BODY_BYTES)
    too_large = RequestError(f"request body larger than {limit} bytes", 413, "RequestTooLarge")
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise too_large
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large
        chunks.append(chunk)
    return b"".join(chunks)


async def read_json(request: Request) -> dict[str, Any]:
    """The JSON object of the body; strict (orjson): no NaN/Infinity, no invalid UTF-8 or lone surrogates."""
    raw = await read_body(request)
    try:
        body = orjson.loads(raw or b"{}")
    except orjson.JSONDecodeError as e:
        raise RequestError(f"malformed JSON body: {e}") from e
    if not isinstance(body, dict):
        raise RequestError("the JSON body must be an object")
    return body


def sse(data: Any) -> bytes:
    return b"data: " + orjson.dumps(data) + b"\n\n"


def validate(model_cls: type[pydantic.BaseModel], body: dict[str, Any]) -> Any:
    try:
        return model_cls.model_validate(body)
    except pydantic.ValidationError as e:
        msgs = "; ".join(f"{'.'.join(map(str, err['loc'])) or 'body'}: {err['msg']}" for err in e.errors())
        raise RequestError(msgs) from e
