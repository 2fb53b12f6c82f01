"""Optional API key: `Authorization: Bearer KEY` on every route but the exempt ones.

A pure ASGI middleware (not Starlette's BaseHTTPMiddleware, which wraps the body stream and
hides client disconnects from the routes). The key is compared in constant time.
"""

from __future__ import annotations

import hmac
import json
from collections.abc import Iterable
from typing import Any

_UNAUTHORIZED = json.dumps(
    {
        "error": {
            "message": "Invalid or missing API key: send 'Authorization: Bearer <key>'.",
            "type": "AuthenticationError",
            "param": None,
            "code": 401,
        }
    }
).encode()


class ApiKeyMiddleware:
    def __init__(self, app: Any, api_key: str, exempt: Iterable[str] = ("/health", "/metrics")) -> None:
        self.app = app
        self.expected = f"Bearer {api_key}".encode()
        self.exempt = tuple(exempt)

    def is_exempt(self, path: str) -> bool:
        """Exempt paths match exactly, also under /models/{name}/ (the per-model prefix)."""
        if path in self.exempt:
            return True
        parts = path.split("/", 3)  # "", "models", name, rest
        return len(parts) == 4 and parts[1] == "models" and "/" + parts[3] in self.exempt

    def authorized(self, scope: dict) -> bool:
        got = b""
        for name, value in scope.get("headers", []):
            if name == b"authorization":
                got = value
                break
        return hmac.compare_digest(got, self.expected)

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or self.is_exempt(scope["path"]) or self.authorized(scope):
            await self.app(scope, receive, send)
            return
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(_UNAUTHORIZED)).encode()),
            (b"www-authenticate", b"Bearer"),
        ]
        await send({"type": "http.response.start", "status": 401, "headers": headers})
        await send({"type": "http.response.body", "body": _UNAUTHORIZED})
