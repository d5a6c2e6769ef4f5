"""Reads that compute for seconds (influence solves, the leave-one-out factorisation, Newton
refinements): admitted a few at a time per kind, computed on a worker thread, and skipped when the
client has gone while the request waited.

Each kind has its own ``anyio.CapacityLimiter`` (``ServiceState.influence_threads``,
``attribution_threads``): a request waits for one of its tokens without holding a thread, so
however many arrive, the threads predictions use stay free. Once admitted, a request whose client
has disconnected is answered 499 (nginx's "client closed request"; no one reads it) and nothing is
computed: abandoned requests cost nothing but their wait.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import anyio
import anyio.to_thread
from fastapi import Request, Response

T = TypeVar("T")

CLIENT_CLOSED_REQUEST = 499


async def compute(
    request: Request,
    limiter: anyio.CapacityLimiter,
    work: Callable[[], T],
    now: bool = False,
) -> T | Response:
    """``work()`` on a worker thread once ``limiter`` admits it, or a 499 ``Response`` when the
    client left meanwhile.

    Arguments:
      now: run ``work`` at once on the event loop, without waiting (it only raises: a refusal
        such as a nonlinear model's 409 should not queue behind computations).

    Raises:
      whatever ``work`` raises.
    """
    if now:
        return work()
    async with limiter:
        if await request.is_disconnected():
            return Response(status_code=CLIENT_CLOSED_REQUEST)
        return await anyio.to_thread.run_sync(work)
