"""Map engine, queue and validation errors to HTTP answers ``{"detail": message}``.

Every message says what to fix; no bad input ever turns into a 500.
"""

from __future__ import annotations

import logging
import math

import redis
from fastapi import FastAPI, Request, status
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from service_core import (
    AlreadyForgottenError,
    InvalidForgetSetError,
    InvalidInputError,
    SolverError,
    UnknownIdsError,
    UnlearnError,
)
from service_core.nonlinear_serving import NotAvailableError

from ..queue import IdempotencyKeyReusedError
from .schemas import NonFiniteResultError

log = logging.getLogger(__name__)

# Most specific first: the first match wins.
_STATUS: list[tuple[type[Exception], int]] = [
    (UnknownIdsError, status.HTTP_404_NOT_FOUND),
    (AlreadyForgottenError, status.HTTP_409_CONFLICT),
    (IdempotencyKeyReusedError, status.HTTP_409_CONFLICT),
    (NotAvailableError, status.HTTP_409_CONFLICT),
    (InvalidForgetSetError, status.HTTP_422_UNPROCESSABLE_CONTENT),
    (InvalidInputError, status.HTTP_422_UNPROCESSABLE_CONTENT),
    (NonFiniteResultError, status.HTTP_422_UNPROCESSABLE_CONTENT),
    (UnlearnError, status.HTTP_422_UNPROCESSABLE_CONTENT),
]


def _detail(status_code: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"detail": message}, status_code=status_code, headers=headers)


async def _known_error(request: Request, exc: Exception) -> JSONResponse:
    for kind, code in _STATUS:
        if isinstance(exc, kind):
            hint = (
                " Use GET /v1/ids for the active training ids."
                if isinstance(exc, UnknownIdsError)
                else ""
            )
            return _detail(code, str(exc) + hint)
    raise exc  # pragma: no cover - only registered for the kinds above


async def _solver_error(request: Request, exc: Exception) -> JSONResponse:
    log.warning("solve failed on %s: %s", request.url.path, exc)
    return _detail(status.HTTP_500_INTERNAL_SERVER_ERROR, f"the solve did not converge: {exc}")


async def _queue_down(request: Request, exc: Exception) -> JSONResponse:
    log.warning("Redis error on %s: %s", request.url.path, exc)
    return _detail(
        status.HTTP_503_SERVICE_UNAVAILABLE,
        f"the job queue (Redis) is unavailable: {exc or type(exc).__name__}; retry later",
        # when the API's circuit breaker tries Redis again (app.redis_client), at least 1 s
        headers={"Retry-After": str(max(1, math.ceil(getattr(exc, "retry_after_s", 5.0))))},
    )


def _location(loc: tuple) -> str:
    where = [str(part) for part in loc[1:]] if loc and loc[0] == "body" else [str(p) for p in loc]
    if loc and loc[0] in ("query", "path", "header"):
        return f"{loc[0]} parameter {'.'.join(where[1:])}"
    return ".".join(where) or "body"


_NOT_JSON = (
    "the body is not valid JSON{why}: send UTF-8 JSON text, with 'Content-Type: application/json'"
)


async def _invalid_request(request: Request, exc: Exception) -> JSONResponse:
    """422 for a body that does not match the schema; 400 for one that is not JSON at all."""
    assert isinstance(exc, RequestValidationError)
    problems = []
    for error in exc.errors():
        if error.get("type") == "json_invalid":
            why = error.get("ctx", {}).get("error", "")
            return _detail(status.HTTP_400_BAD_REQUEST, _NOT_JSON.format(why=f" ({why})"))
        if tuple(error.get("loc", ())) == ("body",):
            problems.append(
                "the body must be a JSON object with the fields this endpoint takes, "
                "sent with 'Content-Type: application/json'"
            )
            continue
        message = str(error.get("msg", "invalid")).removeprefix("Value error, ")
        problems.append(f"{_location(tuple(error.get('loc', ())))}: {message}")
    return _detail(status.HTTP_422_UNPROCESSABLE_CONTENT, "; ".join(problems))


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, StarletteHTTPException)
    # FastAPI's own answer to a body it cannot decode (e.g. bytes that are not UTF-8) says
    # nothing of what to fix.
    if exc.status_code == status.HTTP_400_BAD_REQUEST and exc.detail == _FASTAPI_BAD_BODY:
        return _detail(status.HTTP_400_BAD_REQUEST, _NOT_JSON.format(why=""))
    return await http_exception_handler(request, exc)


_FASTAPI_BAD_BODY = "There was an error parsing the body"


def install_error_handlers(app: FastAPI) -> None:
    """Register every handler on ``app``."""
    for kind, _ in _STATUS:
        app.add_exception_handler(kind, _known_error)
    app.add_exception_handler(SolverError, _solver_error)
    app.add_exception_handler(redis.RedisError, _queue_down)
    app.add_exception_handler(RequestValidationError, _invalid_request)
    app.add_exception_handler(StarletteHTTPException, _http_error)
