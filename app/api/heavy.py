"""Reads that compute for seconds (influence solves, the leave-one-out factorisation, Newton
refinements): admitted a few at a time per kind, computed on a worker thread, and skipped when the
client has gone while the request waited.

Each kind has its own ``anyio.CapacityLimiter`` (``ServiceState.influence_threads``,
``attribution_threads``): a request waits for one of its tokens without holding a thread, so
however many arrive, the threads predictions use stay free. Once admitted, a request whose client
has disconnected is answered 499 (nginx's "client closed request"; no one reads it) and nothing is
computed: abandoned requests cost nothing but their wait. Once the server begins its graceful
shutdown (SIGTERM, SIGINT: ``Draining``), a request still waiting for a token is answered 503 with
``Retry-After`` at once, and a new one without waiting: uvicorn waits for every request in flight
before it exits, and a queue of reads behind a cold factorisation (minutes) would hold the
shutdown that long.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import anyio
import anyio.to_thread
from fastapi import HTTPException, Request, Response, status

from ..service import Draining

T = TypeVar("T")

CLIENT_CLOSED_REQUEST = 499
_SHUTTING_DOWN = (
    "this process is shutting down: the request was not computed; retry (another process, or "
    "this one once restarted)"
)


def _refuse_draining() -> HTTPException:
    return HTTPException(
        status.HTTP_503_SERVICE_UNAVAILABLE, _SHUTTING_DOWN, headers={"Retry-After": "2"}
    )


async def compute(
    request: Request,
    limiter: anyio.CapacityLimiter,
    work: Callable[[], T],
    now: bool = False,
    draining: Draining | None = None,
) -> T | Response:
    """``work()`` on a worker thread once ``limiter`` admits it, or a 499 ``Response`` when the
    client left meanwhile.

    Arguments:
      now: run ``work`` at once on the event loop, without waiting (it only raises: a refusal
        such as a nonlinear model's 409 should not queue behind computations).
      draining: the server's shutdown flag: once begun, a request not yet admitted is refused.

    Raises:
      HTTPException: 503 with ``Retry-After``, the server shutting down before ``work`` began.
      whatever ``work`` raises.
    """
    if now:
        return work()
    if draining is None:
        draining = Draining()
    if draining.started:
        raise _refuse_draining()
    with draining.cancellable() as wait:
        await limiter.acquire()
    if wait.cancelled_caught:
        raise _refuse_draining()
    try:
        if await request.is_disconnected():
            return Response(status_code=CLIENT_CLOSED_REQUEST)
        return await anyio.to_thread.run_sync(work)
    finally:
        limiter.release()
