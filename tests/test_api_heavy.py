"""``app.api.heavy``: reads that compute for seconds are admitted a few at a time, skipped when
their client left while they waited, and refusals are not queued behind computations."""

from __future__ import annotations

import asyncio
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


def test_draining_refuses_the_waiting_and_the_new_but_not_the_admitted():
    from fastapi import HTTPException

    from app.service import Draining

    outcomes: dict[str, object] = {}

    async def main():
        limiter, draining = anyio.CapacityLimiter(1), Draining()
        draining.bind(asyncio.get_running_loop())
        release = threading.Event()

        async def ask(name: str, work):
            try:
                outcomes[name] = await heavy.compute(
                    _Request(False), limiter, work, draining=draining
                )
            except HTTPException as e:
                outcomes[name] = (e.status_code, e.headers)

        async with anyio.create_task_group() as tg:
            tg.start_soon(ask, "admitted", lambda: release.wait(10) and "computed")
            await anyio.sleep(0.1)
            tg.start_soon(ask, "waiting", lambda: "should not run")
            await anyio.sleep(0.1)
            threading.Thread(target=draining.begin).start()  # uvicorn's signal handler
            await anyio.sleep(0.2)
            assert outcomes.get("waiting") == (503, {"Retry-After": "2"})
            await ask("new", lambda: "should not run")
            release.set()
        assert limiter.borrowed_tokens == 0

    anyio.run(main)
    assert outcomes == {
        "admitted": "computed",
        "waiting": (503, {"Retry-After": "2"}),
        "new": (503, {"Retry-After": "2"}),
    }
