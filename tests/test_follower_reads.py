"""``ModelFollower.shared_required_version``: concurrent requests of an API process without a
worker share one read of the reported version, and never one that began before them."""

from __future__ import annotations

import asyncio
import threading
import time
import types

from app.service import ModelFollower


class SlowQueue:
    """``reported_version`` reads the value when called, answers 50 ms later (a Redis GET in
    flight), and counts its calls."""

    def __init__(self, version: int):
        self.version = version
        self.calls = 0
        self.began = threading.Event()  # set once a read has taken its value
        self._lock = threading.Lock()

    def reported_version(self) -> int:
        with self._lock:
            self.calls += 1
            seen = self.version
        self.began.set()
        time.sleep(0.05)
        return seen


def _follower(queue: SlowQueue) -> ModelFollower:
    return ModelFollower(types.SimpleNamespace(queue=queue, unlearner=None, settings=None))


def test_concurrent_requests_share_one_read():
    queue = SlowQueue(7)
    follower = _follower(queue)

    async def run() -> list[int | None]:
        return await asyncio.gather(*(follower.shared_required_version() for _ in range(20)))

    assert asyncio.run(run()) == [7] * 20
    assert queue.calls == 1


def test_a_request_never_gets_a_read_that_began_before_it():
    queue = SlowQueue(3)
    follower = _follower(queue)

    async def run() -> tuple[int | None, int | None, int | None]:
        first = asyncio.ensure_future(follower.shared_required_version())
        # its read has begun and seen version 3 (waited for, not assumed after a sleep: on a
        # loaded machine the thread took longer than 10 ms to start, and the read saw 4)
        await asyncio.to_thread(queue.began.wait, 10)
        queue.version = 4  # a job is reported while that read is in flight
        later = [asyncio.ensure_future(follower.shared_required_version()) for _ in range(2)]
        return await first, *(await asyncio.gather(*later))

    assert asyncio.run(run()) == (3, 4, 4)
    assert queue.calls == 2  # the two later requests shared the second read


def test_a_request_that_goes_away_does_not_cancel_the_shared_read():
    queue = SlowQueue(5)
    follower = _follower(queue)

    async def run() -> int | None:
        gone = asyncio.ensure_future(follower.shared_required_version())
        stays = asyncio.ensure_future(follower.shared_required_version())
        await asyncio.sleep(0.01)
        gone.cancel()
        return await stays

    assert asyncio.run(run()) == 5
