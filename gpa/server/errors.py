"""One error type for the HTTP layer and the mapping of every other exception to a status code."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from gpa.audio import AudioError
from gpa.engine import EngineError, EngineOverloaded
from gpa.server.protocol import ErrorDetail, ErrorResponse

logger = logging.getLogger(__name__)

RETRY_AFTER_S = 1  # what 429/503 answers suggest; the queue drains request by request


class APIError(Exception):
    """An error with its HTTP status and OpenAI error fields."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def detail(self) -> ErrorDetail:
        return ErrorDetail(message=self.message, type=self.type, param=self.param, code=self.code)

    def response(self) -> JSONResponse:
        return JSONResponse(ErrorResponse(error=self.detail()).model_dump(), self.status, headers=self.headers)


class ClientGone(APIError):
    """The client disconnected before its response was ready (nobody reads this answer)."""

    def __init__(self) -> None:
        super().__init__(499, "client closed the request", code="client_closed")


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def overloaded(message: str, status: int = 503) -> APIError:
    kind = "rate_limit_error" if status == 429 else "server_busy"
    return APIError(status, message, type=kind, code="overloaded", headers={"Retry-After": str(RETRY_AFTER_S)})


def to_api_error(e: BaseException) -> APIError:
    """Map a library exception to the status a client should see."""
    if isinstance(e, APIError):
        return e
    if isinstance(e, EngineOverloaded):
        return overloaded(str(e))
    if isinstance(e, EngineError):
        return APIError(503, str(e), type="server_error", code="engine_unavailable",
                        headers={"Retry-After": str(RETRY_AFTER_S)})
    if isinstance(e, AudioError):
        return APIError(422, str(e), code="invalid_audio")
    if isinstance(e, TimeoutError):
        return APIError(504, "the request took longer than the server's request timeout", type="timeout_error",
                        code="timeout")
    if isinstance(e, (ValueError, TypeError)):  # the library's validation of what the client sent
        return bad_request(str(e))
    logger.exception("unhandled error", exc_info=e)
    return APIError(500, "internal server error", type="server_error")


def _validation_message(errors: list[dict[str, Any]]) -> tuple[str, str | None]:
    parts, first = [], None
    for err in errors:
        if err.get("type") == "json_invalid":
            return f"the request body is not valid JSON ({err.get('ctx', {}).get('error', 'parse error')})", None
        loc = [str(x) for x in err.get("loc", ()) if x not in ("body", "query", "path", "form")]
        field = ".".join(loc) or "body"
        first = first or field
        parts.append(f"{field}: {err.get('msg', 'invalid')}")
    return "; ".join(parts) or "invalid request", first


def install_error_handlers(app: FastAPI) -> None:
    """Every failure leaves the server as an ErrorResponse with the right status."""

    @app.exception_handler(APIError)
    async def _api(_: Request, e: APIError) -> JSONResponse:
        return e.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, e: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(list(e.errors()))
        return bad_request(message, param=param, code="invalid_value").response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, e: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return APIError(e.status_code, str(e.detail), type=kind, headers=getattr(e, "headers", None)).response()

    async def _known(_: Request, e: Exception) -> JSONResponse:
        return to_api_error(e).response()

    # The library's expected failures get their own handlers: Starlette answers an ``Exception`` handler's
    # error and then re-raises it, so uvicorn logs a crash and drops the keep-alive connection, whose next
    # request (a client's pooled connection) is then reset.
    for kind in (EngineError, AudioError, TimeoutError, ValueError, TypeError):
        app.add_exception_handler(kind, _known)

    @app.exception_handler(Exception)
    async def _other(_: Request, e: Exception) -> JSONResponse:  # unexpected: a logged 500
        return to_api_error(e).response()
