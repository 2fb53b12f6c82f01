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
