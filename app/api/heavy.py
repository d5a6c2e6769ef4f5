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

import asyncio
import threading
from collections.abc import Callable
from typing import TypeVar

import anyio
import anyio.to_thread
from fastapi import HTTPException, Request, Response, status

from service_core import ComputationCancelled

from ..service import Draining
from .shutdown import RETRY_AFTER_S, SHUTTING_DOWN

T = TypeVar("T")

CLIENT_CLOSED_REQUEST = 499


def _refuse_draining() -> HTTPException:
    return HTTPException(
        status.HTTP_503_SERVICE_UNAVAILABLE, SHUTTING_DOWN, headers={"Retry-After": RETRY_AFTER_S}
    )


async def compute(
    request: Request,
    limiter: anyio.CapacityLimiter,
    work: Callable[[], T],
    now: bool = False,
    draining: Draining | None = None,
    cancel: threading.Event | None = None,
) -> T | Response:
    """``work()`` on a worker thread once ``limiter`` admits it, or a 499 ``Response`` when the
    client left meanwhile.

    Arguments:
      now: run ``work`` at once on the event loop, without waiting (it only raises: a refusal
        such as a nonlinear model's 409 should not queue behind computations).
      draining: the server's shutdown flag: once begun, a request not yet admitted is refused.
      cancel: for a ``work`` that asks ``cancel.is_set()`` between its steps (and raises
        ``ComputationCancelled``): set as soon as the client leaves or the shutdown begins
        (looked at every ``_WATCH_S``, from the wait for a thread on: a client gone while it
        waits ends the wait, 499), and when this request is cancelled, so that neither a gone
        client nor a stopping server waits for the rest of its steps.

    Raises:
      HTTPException: 503 with ``Retry-After``, the server shutting down before ``work`` began or
        while a cancellable ``work`` ran.
      whatever ``work`` raises.
    """
    if now:
        return work()
    if draining is None:
        draining = Draining()
    if draining.started:
        raise _refuse_draining()
    watcher = None
    with draining.cancellable() as wait:
        if cancel is not None:
            # Watches the client from here on: one that leaves while this request waits for a
            # thread ends the wait too (what the request holds meanwhile, such as the one exact
            # refinement a process runs at a time, is let go at once, not after the wait).
            # A plain task, not a task group: a task group would wrap ``work``'s errors in an
            # exception group, which the error handlers do not map.
            watcher = asyncio.ensure_future(_watch(request, draining, cancel, wait))
        await limiter.acquire()
    if wait.cancelled_caught:
        if watcher is not None:
            watcher.cancel()
        if draining.started:
            raise _refuse_draining()
        return Response(status_code=CLIENT_CLOSED_REQUEST)
    try:
        if await request.is_disconnected():
            return Response(status_code=CLIENT_CLOSED_REQUEST)
        if cancel is None:
            return await anyio.to_thread.run_sync(work)
        try:
            return await anyio.to_thread.run_sync(work)
        except ComputationCancelled:
            if draining.started:
                raise _refuse_draining() from None
            return Response(status_code=CLIENT_CLOSED_REQUEST)
        finally:
            cancel.set()  # a forced exit cancels this request: the thread stops at its next step
    finally:
        if watcher is not None:
            watcher.cancel()
        limiter.release()


_WATCH_S = 0.25


async def _watch(
    request: Request, draining: Draining, cancel: threading.Event, wait: anyio.CancelScope
) -> None:
    """Set ``cancel``, and end the wait for a thread (``wait``, if still waiting), once the
    client has gone or the shutdown has begun."""
    while not cancel.is_set():
        if draining.started or await request.is_disconnected():
            cancel.set()
            wait.cancel()
            return
        await anyio.sleep(_WATCH_S)
