"""Requests in flight when the server stops: answered 503, never 500.

uvicorn's graceful shutdown (the first SIGTERM or SIGINT) waits for every request in flight; the
heavy reads still waiting for a thread are refused at once (``app.api.heavy``). A second SIGINT
is uvicorn's forced exit: it stops waiting, and every request still running is cancelled, which
uvicorn answers 500 ("Internal Server Error"). Those requests were not wrong, the process is
going away: ``AnswerCancelledRequests`` answers them 503 with ``Retry-After`` instead, the
answer a client retries elsewhere.
"""

from __future__ import annotations

import asyncio
import json

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..service import Draining

SHUTTING_DOWN = (
    "this process is shutting down: the request was not completed; retry (another process, or "
    "this one once restarted)"
)
RETRY_AFTER_S = "2"


class AnswerCancelledRequests:
    """ASGI middleware: a request cancelled once the server's shutdown has begun, before any of
    its answer was sent, is answered 503 with ``Retry-After`` and ``SHUTTING_DOWN``; a
    cancellation at any other time (or after the answer began) goes on as before.

    Arguments:
      app: the application.
      draining: the server's shutdown flag (``ServiceState.draining``).
    """

    def __init__(self, app: ASGIApp, draining: Draining):
        self.app = app
        self.draining = draining

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        answering = False

        async def send_tracked(message: Message) -> None:
            nonlocal answering
            if message["type"] == "http.response.start":
                answering = True
            await send(message)

        try:
            await self.app(scope, receive, send_tracked)
        except asyncio.CancelledError:
            if answering or not self.draining.started:
                raise
            body = json.dumps({"detail": SHUTTING_DOWN}).encode()
            await send(
                {
                    "type": "http.response.start",
                    "status": 503,
                    "headers": [
                        (b"content-type", b"application/json"),
                        (b"content-length", str(len(body)).encode()),
                        (b"retry-after", RETRY_AFTER_S.encode()),
                        (b"connection", b"close"),
                    ],
                }
            )
            await send({"type": "http.response.body", "body": body})
