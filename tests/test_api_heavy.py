"""``app.api.heavy``: reads that compute for seconds are admitted a few at a time, skipped when
their client left while they waited, and refusals are not queued behind computations."""

from __future__ import annotations

import threading

import anyio
import pytest
from fastapi import Response

from app.api import heavy


class _Request:
    def __init__(self, gone: bool):
        self.gone = gone

    async def is_disconnected(self) -> bool:
        return self.gone


def test_a_request_whose_client_left_is_answered_499_and_nothing_is_computed():
    calls = []

    async def main():
        limiter = anyio.CapacityLimiter(1)
        gone = await heavy.compute(_Request(True), limiter, lambda: calls.append("gone"))
        here = await heavy.compute(_Request(False), limiter, lambda: threading.get_ident())
        return gone, here

    gone, here = anyio.run(main)
    assert isinstance(gone, Response) and gone.status_code == heavy.CLIENT_CLOSED_REQUEST
    assert calls == []
    assert here != threading.get_ident()  # computed on a worker thread


def test_admission_waits_for_a_token_and_now_does_not():
    order = []

    def refuse():
        raise RuntimeError("refused")

    async def main():
        limiter = anyio.CapacityLimiter(1)
        taken, release = anyio.Event(), anyio.Event()

        async def computing():  # holds the only token: a computation in progress
            async with limiter:
                taken.set()
                await release.wait()

        async with anyio.create_task_group() as tg:
            tg.start_soon(computing)
            await taken.wait()
            with pytest.raises(RuntimeError, match="refused"):
                await heavy.compute(_Request(False), limiter, refuse, now=True)
            order.append("refused at once")
            with anyio.move_on_after(0.3) as scope:
                await heavy.compute(_Request(False), limiter, lambda: order.append("computed"))
            assert scope.cancelled_caught  # it waited for the token
            release.set()
        await heavy.compute(_Request(False), limiter, lambda: order.append("computed"))

    anyio.run(main)
    assert order == ["refused at once", "computed"]
