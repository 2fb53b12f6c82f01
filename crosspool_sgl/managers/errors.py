"""The client-facing error of the HTTP side (one class, so every route renders the same body)."""

from __future__ import annotations


class RequestError(Exception):
    """A client error with its HTTP status, rendered as an OpenAI-style error body."""

    def __init__(
        self,
        message: str,
        status_code: int = 400,
        err_type: str = "BadRequestError",
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message, self.status_code, self.err_type, self.param = message, status_code, err_type, param
        self.headers = headers or {}


def unavailable(message: str) -> RequestError:
    """503: the engine is down or shutting down (retrying this server will not help soon)."""
    return RequestError(message, 503, "ServiceUnavailableError")


def overloaded(message: str, retry_after_s: int = 1) -> RequestError:
    """429 with Retry-After: a queue bound is full (retrying later will help)."""
    return RequestError(message, 429, "TooManyRequests", headers={"Retry-After": str(retry_after_s)})


def for_sglang(e: RequestError) -> Exception:
    """Our error as SGLang's code expects it: its handlers answer a ValueError with 400 and keep an
    HTTPException's status and headers (Retry-After on a 429). Either carries the original, so our
    own routes render its `param` and type."""
    from fastapi import HTTPException

    if e.status_code == 400:
        err: Exception = ValueError(e.message)
    else:
        err = HTTPException(status_code=e.status_code, detail=e.message, headers=e.headers or None)
    err.request_error = e  # type: ignore[attr-defined]
    return err


def from_sglang(e: Exception) -> RequestError:
    """What SGLang's manager raised, as our error: ours if it carries one, an HTTPException's status,
    a ValueError or TypeError (a malformed request) as 400."""
    from fastapi import HTTPException

    original = getattr(e, "request_error", None)
    if isinstance(original, RequestError):
        return original
    if isinstance(e, RequestError):
        return e
    if isinstance(e, HTTPException):
        err_type = {503: "ServiceUnavailableError", 504: "TimeoutError", 429: "TooManyRequests"}.get(
            e.status_code, "BadRequestError"
        )
        return RequestError(str(e.detail), e.status_code, err_type, headers=dict(e.headers or {}))
    return RequestError(str(e))


def client_error(e: BaseException) -> RequestError | None:
    """What to answer for an exception raised for the request's own sake (bad input, a bound, a gone
    engine: ours, SGLang's ValueError/TypeError or HTTPException); None for a server bug."""
    from fastapi import HTTPException

    if isinstance(e, ValueError | TypeError | RequestError | HTTPException):
        return from_sglang(e)  # type: ignore[arg-type]
    return None
