"""Request size limits: a cap on body bytes (here, for every route) and on rows (in the routes).

Without them one client could tie the server up: a 96 MB ``/v1/predict`` body of 300,000 rows was
accepted and took 30 s to parse and answer.
"""

from __future__ import annotations

from fastapi import HTTPException, status
from starlette.datastructures import Headers
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send


class BodySizeLimit:
    """ASGI middleware: refuse a request body over ``max_bytes`` with 413, without parsing it.

    A body whose ``Content-Length`` says it is too large is refused before a byte of it is read.
    One without (chunked) is counted as it arrives and cut off once past the limit.

    Not Starlette's own limit (FastAPI's ``max_body_size``): that one answers a plain-text
    "Content Too Large", replacing any other answer, while every error of this API is
    ``{"detail": ...}`` saying what to fix.

    Arguments:
      app: the application.
      max_bytes: the largest body accepted (setting ``max_body_bytes``).
    """

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes
        self.message = (
            f"the request body is larger than {max_bytes} bytes, the limit of setting "
            "max_body_bytes (flag --max-body-bytes, env NTK_UNLEARN_MAX_BODY_BYTES): send fewer "
            "rows per request"
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = Headers(scope=scope).get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_bytes:
            # Closed after the answer, so that the body stays unread (see ``gate._CLOSE``).
            response = JSONResponse(
                {"detail": self.message},
                status_code=status.HTTP_413_CONTENT_TOO_LARGE,
                headers={"Connection": "close"},
            )
            await response(scope, receive, send)
            return

        received = 0

        async def receive_within_limit() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    # Raised while the route reads its body: FastAPI passes HTTPExceptions from
                    # there on to its handler, which answers {"detail": ...}.
                    raise HTTPException(status.HTTP_413_CONTENT_TOO_LARGE, self.message)
            return message

        await self.app(scope, receive_within_limit, send)
