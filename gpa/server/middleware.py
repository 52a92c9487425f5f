"""Pure ASGI middleware (they never buffer a streamed body): API key, body size, concurrency, metrics."""

from __future__ import annotations

import hmac
import json
import time
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gpa.server.errors import RETRY_AFTER_S
from gpa.server.metrics import Metrics

GENERATION_ROUTES = ("/v1/audio/speech", "/v1/audio/transcriptions", "/v1/audio/conversions")


async def send_error(send: Send, status: int, message: str, type: str, code: str | None,
                     headers: dict[str, str] | None = None) -> None:
    body = json.dumps({"error": {"message": message, "type": type, "param": None, "code": code}}).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", []):
        if key == name:
            return value.decode("latin-1")
    return None


class ApiKeyMiddleware:
    """``/v1/*`` needs ``Authorization: Bearer <key>``; the page, /health and /metrics stay open."""

    def __init__(self, app: ASGIApp, api_key: str) -> None:
        self.app, self.expected = app, f"Bearer {api_key}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/v1/"):
            given = (_header(scope, b"authorization") or "").encode("latin-1")
            if not hmac.compare_digest(given, self.expected):
                await send_error(send, 401, "missing or invalid API key: send 'Authorization: Bearer <key>'",
                                 "authentication_error", "invalid_api_key", {"WWW-Authenticate": "Bearer"})
                return
        await self.app(scope, receive, send)


class BodyLimitMiddleware:
    """Answer 413 for a body over ``limit`` bytes: at once from Content-Length, else as the bytes arrive."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        message = f"request body exceeds the server's limit of {self.limit} bytes"
        length = _header(scope, b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            await send_error(send, 413, message, "invalid_request_error", "request_too_large")
            return
        seen, rejected = 0, False

        async def counting_receive() -> Message:
            nonlocal seen, rejected
            msg = await receive()
            if msg["type"] == "http.request" and not rejected:
                seen += len(msg.get("body", b""))
                if seen > self.limit:  # answer now; the app sees a disconnect and its reply is dropped
                    rejected = True
                    await send_error(send, 413, message, "invalid_request_error", "request_too_large")
                    return {"type": "http.disconnect"}
            return msg

        async def guarded_send(msg: Message) -> None:
            if not rejected:
                await send(msg)

        await self.app(scope, counting_receive, guarded_send)


class AdmissionMiddleware:
    """At most ``limit`` generation requests in the server at once (streams count until they end); more get 429.

    Also records every request's route, status and latency in ``metrics``.
    """

    def __init__(self, app: ASGIApp, limit: int, metrics: Metrics) -> None:
        self.app, self.limit, self.metrics = app, limit, metrics
        self.active = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start, status = time.perf_counter(), 500
        limited = scope["method"] == "POST" and scope["path"] in GENERATION_ROUTES

        async def watching_send(msg: Message) -> None:
            nonlocal status
            if msg["type"] == "http.response.start":
                status = msg["status"]
            await send(msg)

        if limited and self.active >= self.limit:
            status = 429
            await send_error(send, 429, f"too many requests in progress (limit {self.limit}); retry shortly",
                             "rate_limit_error", "too_many_requests", {"Retry-After": str(RETRY_AFTER_S)})
        else:
            self.active += limited
            self.metrics.in_progress += 1
            try:
                await self.app(scope, receive, watching_send)
            finally:
                self.active -= limited
                self.metrics.in_progress -= 1
        route = _route_of(scope)
        self.metrics.observe_request(scope["method"], route, status, time.perf_counter() - start)


def _route_of(scope: dict[str, Any]) -> str:
    route = scope.get("route")
    path = getattr(route, "path", None)
    if path:
        return path
    return scope["path"] if scope["path"] in GENERATION_ROUTES else "other"
