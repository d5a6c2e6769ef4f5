"""``app.api.heavy``: reads that compute for seconds are admitted a few at a time, skipped when
their client left while they waited, and refusals are not queued behind computations."""

from __future__ import annotations

import asyncio
import threading
import time

import anyio
import pytest
from fastapi import HTTPException, Response

from app.api import heavy
from app.service import Draining
from service_core import ComputationCancelled


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


class _LeavingRequest:
    """A client that leaves after its request was admitted: connected for the first ``n`` looks."""

    def __init__(self, n: int):
        self.looks = 0
        self.n = n

    async def is_disconnected(self) -> bool:
        self.looks += 1
        return self.looks > self.n


def _steps(cancel: threading.Event, done: list[int]):
    """A cancellable computation: up to 200 steps of 50 ms, asking ``cancel`` before each."""

    def work() -> str:
        for step in range(200):
            if cancel.is_set():
                raise ComputationCancelled(f"stopped after {step} steps")
            done.append(step)
            time.sleep(0.05)
        return "finished"

    return work


@pytest.mark.parametrize("why", ["client left", "shutdown", "forced exit"])
def test_a_cancellable_computation_stops_when_its_client_leaves_or_the_server_stops(why):
    """With ``cancel``, a computation (10 s here) stops at its next step once its client has
    gone (499), once the shutdown begins (503 with Retry-After), or when its request is cancelled
    (uvicorn's forced exit: the thread stops too, not only the wait for it)."""
    cancel, done = threading.Event(), []
    draining = Draining()

    async def main():
        draining.bind(asyncio.get_running_loop())
        request = _LeavingRequest(2 if why == "client left" else 10**6)
        call = heavy.compute(
            request,
            anyio.CapacityLimiter(1),
            _steps(cancel, done),
            draining=draining,
            cancel=cancel,
        )
        if why == "client left":
            return await call
        task = asyncio.ensure_future(call)
        await asyncio.sleep(0.3)
        if why == "shutdown":
            draining.begin()
            return await task
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return "cancelled"

    started = time.monotonic()
    if why == "shutdown":
        with pytest.raises(HTTPException) as refused:
            anyio.run(main)
        assert refused.value.status_code == 503 and "shutting down" in refused.value.detail
        assert refused.value.headers["Retry-After"]
    else:
        answer = anyio.run(main)
        if why == "client left":
            assert isinstance(answer, Response)
            assert answer.status_code == heavy.CLIENT_CLOSED_REQUEST
    deadline = time.monotonic() + 5
    while len(done) and time.monotonic() < deadline:  # the thread notices within one step
        n = len(done)
        time.sleep(0.2)
        if len(done) == n:
            break
    assert cancel.is_set() and 1 <= len(done) < 40, len(done)
    assert time.monotonic() - started < 5


def test_a_client_that_leaves_while_waiting_for_a_thread_ends_the_wait():
    """With ``cancel``, a request waiting for a thread (both taken, for as long as a cold
    factorisation lasts) is answered 499 within a look or two of its client leaving, not once
    a thread frees: what it holds meanwhile (the one exact refinement a process runs at a time)
    is let go at once. Nothing is computed."""
    calls: list[str] = []

    async def main():
        limiter = anyio.CapacityLimiter(1)
        await limiter.acquire_on_behalf_of("a computation in progress")
        cancel = threading.Event()
        started = time.monotonic()
        with anyio.fail_after(5):  # before: waited for the token for good
            answer = await heavy.compute(
                _LeavingRequest(2), limiter, lambda: calls.append("computed"), cancel=cancel
            )
        return answer, time.monotonic() - started, cancel.is_set(), limiter.borrowed_tokens

    answer, seconds, cancelled, borrowed = anyio.run(main)
    assert isinstance(answer, Response) and answer.status_code == heavy.CLIENT_CLOSED_REQUEST
    assert seconds < 2 and cancelled and calls == []
    assert borrowed == 1  # only the computation in progress holds a token
