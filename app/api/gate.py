"""What a request must pass before any byte of its body is read: its token, and a slot for a
large body.

FastAPI reads and parses a body before it resolves a route's dependencies, so the token checks
of ``deps`` alone came after the parse: a 60 MB ``/v1/predict`` with no token took 6 s and
300 MB to be refused, and eight of them at once stalled the server for half a minute. Here the
same checks run on the headers, and a refused request costs the same few kilobytes and
milliseconds whatever its body (uvicorn buffers at most 64 KiB of a body the app has not
asked for).
"""

from __future__ import annotations

from collections.abc import Callable

from fastapi import HTTPException, status
from fastapi.dependencies.models import Dependant
from fastapi.routing import APIRoute
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..core.config import Settings
from ..core.security import Right, check_access
from .deps import require_read, require_write

_NEEDS: dict[Callable, Right] = {require_read: "read", require_write: "write"}
# A refused request's body is never read: closing the connection after the answer is what
# keeps it unread. Kept open, the server would go on receiving (and dropping) the whole body
# to reach the next request on it: no memory, but seconds of the event loop for 60 MB.
_CLOSE = {"Connection": "close"}


def _need_of(dependant: Dependant) -> Right | None:
    """The strongest right among a route's dependencies (searched through nested ones)."""
    found: set[Right] = set()
    pending = list(dependant.dependencies)
    while pending:
        dep = pending.pop()
        if dep.call in _NEEDS:
            found.add(_NEEDS[dep.call])
        pending.extend(dep.dependencies)
    return "write" if "write" in found else "read" if "read" in found else None


def route_need(route: object) -> Right | None:
    """The right a route needs (``None``: open to anyone, or not a FastAPI route)."""
    return _need_of(route.dependant) if isinstance(route, APIRoute) else None


class RequestGate:
    """ASGI middleware: authenticate before the body is read, and admit large bodies a few at
    a time.

    It acts when the route first asks for its body, that is after routing (so the route, and
    the right it needs, are known: ``scope["route"]``) and before the app takes a byte of the
    body:

    1. if the route needs a token, the ``Authorization`` header is checked exactly as ``deps``
       checks it, and a request without the right is answered 401 or 403 at once;
    2. a request with a body over ``settings.large_body_bytes`` (or of unknown length: chunked)
       then takes one of ``settings.max_large_bodies`` slots until it is answered; with none
       free it is answered 503 with ``Retry-After``. Parsing a large JSON body takes memory
       several times its size and holds the event loop for seconds: a bound on how many run
       at once bounds both.

    Both answers are ``HTTPException``s raised from ``receive``, which FastAPI passes from its
    body parsing to the app's handler (``{"detail": ...}`` with the exception's headers).
    A request with no route, or a method its route lacks, never gets to read its body (404,
    405); routes without a body check their token in ``deps`` as before.

    Arguments:
      app: the application.
      settings: the tokens and limits.
    """

    def __init__(self, app: ASGIApp, settings: Settings):
        self.app = app
        self.settings = settings
        self._needs: dict[int, Right | None] = {}
        self.large_in_flight = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        admitted = False
        holds_slot = False

        async def receive_once_admitted() -> Message:
            nonlocal admitted, holds_slot
            if not admitted:
                self._check_access(scope)
                holds_slot = self._take_slot(scope)
                admitted = True
            return await receive()

        try:
            await self.app(scope, receive_once_admitted, send)
        finally:
            if holds_slot:
                self.large_in_flight -= 1

    def _check_access(self, scope: Scope) -> None:
        route = scope.get("route")
        key = id(route)
        if key not in self._needs:
            self._needs[key] = route_need(route)
        need = self._needs[key]
        if need is None:
            return
        s = self.settings
        denied = check_access(
            Headers(scope=scope).get("authorization"),
            need,
            s.api_token,
            s.read_token,
            s.open_reads,
        )
        if denied is not None:
            raise HTTPException(
                denied.status, denied.detail, headers={**(denied.headers or {}), **_CLOSE}
            )

    def _take_slot(self, scope: Scope) -> bool:
        """Whether this request took a slot for a large body (503 when none is free)."""
        headers = Headers(scope=scope)
        declared = headers.get("content-length")
        if declared is not None:
            large = declared.isdigit() and int(declared) > self.settings.large_body_bytes
        else:
            large = "chunked" in headers.get("transfer-encoding", "").lower()
        if not large:
            return False
        if self.large_in_flight >= self.settings.max_large_bodies:
            raise HTTPException(
                status.HTTP_503_SERVICE_UNAVAILABLE,
                f"busy: {self.large_in_flight} requests with bodies over "
                f"{self.settings.large_body_bytes} bytes are being served, the limit of setting "
                "max_large_bodies (flag --max-large-bodies, env NTK_UNLEARN_MAX_LARGE_BODIES); "
                "retry after a few seconds, or send fewer rows per request",
                headers={"Retry-After": "2", **_CLOSE},
            )
        # No await between the test above and this increment: one event loop, so no race.
        self.large_in_flight += 1
        return True
