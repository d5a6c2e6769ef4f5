"""Redis hangs or dies under a running app: requests that need it answer 503 in milliseconds
(not after a 10 s socket timeout), ``/readyz`` says why, and all recovers once Redis is back.

The Redis is a real ``redis-server`` the test starts, stops with SIGSTOP (a hung server: the
socket stays open and nothing answers), resumes with SIGCONT, kills, and starts again.
"""

from __future__ import annotations

import logging
import math
import os
import signal
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from app.embedded_redis import EmbeddedRedis
from app.main import create_app

pytestmark = pytest.mark.redis

WRITE = {"Authorization": "Bearer write-token"}
READ = {"Authorization": "Bearer read-token"}
TIMEOUT_S, RETRY_S = 0.3, 0.5


def _timed(call) -> tuple[float, object]:
    started = time.perf_counter()
    r = call()
    return time.perf_counter() - started, r


def _assert_down(r, reason: str) -> None:
    assert r.status_code == 503, r.text
    # when the breaker tries Redis again (RETRY_S from the failure), rounded up: not longer
    assert int(r.headers["Retry-After"]) == math.ceil(RETRY_S), r.headers
    assert "Redis" in r.json()["detail"], r.text
    if reason:
        assert reason in r.json()["detail"], r.text


def _wait_until(call, ok, timeout: float = 15.0):
    deadline = time.monotonic() + timeout
    while True:
        r = call()
        if ok(r) or time.monotonic() > deadline:
            return r
        time.sleep(0.05)


def test_a_hung_then_dead_redis_costs_milliseconds_and_recovers(
    tmp_path: Path, make_settings, unlearner, wait_for_job, caplog
):
    caplog.set_level(logging.INFO, logger="app.worker")
    server = EmbeddedRedis(tmp_path / "redis").start()
    pid = int(server.pidfile.read_text())
    settings = make_settings(redis_url=server.url, redis_timeout_s=TIMEOUT_S, redis_retry_s=RETRY_S)
    stopped = False
    try:
        with TestClient(create_app(settings, unlearner)) as client:

            def readyz():
                return client.get("/readyz")

            def forget(ids):
                return lambda: client.post("/v1/forget", json={"ids": ids}, headers=WRITE)

            assert readyz().status_code == 200

            # Hung: the first call waits for the timeout once; the breaker answers the rest.
            os.kill(pid, signal.SIGSTOP)
            stopped = True
            first, r = _timed(readyz)
            assert r.status_code == 503, r.text
            body = r.json()
            assert body["model"] == "loaded" and body["queue"].startswith("unreachable"), body
            assert "Redis" in body["detail"] and "Retry-After" in r.headers
            assert first < TIMEOUT_S + 0.5, f"first /readyz took {first:.2f} s"
            # The call that met the timeout says so; the breaker's answers say they are its.
            hung = f"did not answer within {TIMEOUT_S:g} s"
            assert hung in body["queue"] and "circuit breaker" not in body["queue"], body
            times, breaker_answers = [], 0
            for k in range(20):
                seconds, r = _timed(forget([f"r{k:02d}"]) if k % 2 else readyz)
                assert r.status_code == 503, r.text
                assert hung in r.json()["detail"], r.text
                breaker_answers += "circuit breaker open" in r.json()["detail"]
                times.append(seconds)
            _assert_down(r, "")
            assert breaker_answers >= 10, breaker_answers
            # With the breaker open no call reaches the socket; the rare one let through to
            # retry (every RETRY_S) waits TIMEOUT_S.
            fast = sorted(times)[len(times) // 2]
            assert fast < 0.05, f"median {fast * 1000:.1f} ms: {times}"
            assert max(times) < TIMEOUT_S + 0.5, times
            # Reads of the model never needed Redis.
            assert client.get("/v1/model", headers=READ).status_code == 200

            os.kill(pid, signal.SIGCONT)
            stopped = False
            r = _wait_until(readyz, lambda r: r.status_code == 200)
            assert r.status_code == 200, r.text
            r = _wait_until(forget(["r01"]), lambda r: r.status_code != 503)
            assert r.status_code == 202, r.text
            assert wait_for_job(client, r.json()["job_id"])["status"] == "succeeded"
            # The worker's post-publish work (preconditioner, spare K: BLAS and XLA threads) done
            # before the server is restarted below, so the restart never overlaps them. (It once
            # forked this process through a preexec_fn, and OpenBLAS's fork handler deadlocked
            # against a BLAS call in another thread: CI hung there. The server is now started
            # without one, so subprocess can vfork: tests/test_embedded_redis_spawn.py.)
            _wait_until(
                lambda: any("after publishing" in m for m in caplog.messages), bool, timeout=30
            )
            assert any("after publishing" in m for m in caplog.messages), caplog.messages

            # Dead: connections are refused; the breaker keeps even that from the socket.
            server.stop()
            answers = []
            for _ in range(5):
                seconds, r = _timed(forget(["r02"]))
                _assert_down(r, "refused or dropped")
                answers.append("circuit breaker open" in r.json()["detail"])
                assert seconds < 0.05 + TIMEOUT_S
            assert answers[0] is False and any(answers), answers  # the first met the refusal
            seconds, r = _timed(readyz)
            assert r.status_code == 503 and r.json()["queue"].startswith("unreachable"), r.text

            # Restarted on its data (append-only file): the accepted job is still there.
            server = EmbeddedRedis(tmp_path / "redis").start()
            r = _wait_until(readyz, lambda r: r.status_code == 200)
            assert r.status_code == 200, r.text
            r = _wait_until(forget(["r02"]), lambda r: r.status_code != 503)
            assert r.status_code == 202, r.text
            assert wait_for_job(client, r.json()["job_id"], timeout=60)["status"] == "succeeded"
            assert client.get("/v1/model", headers=READ).json()["version"] == 2
    finally:
        if stopped:
            os.kill(pid, signal.SIGCONT)
        server.stop()


def test_the_retry_after_of_an_outage_is_the_breakers_time_left():
    """The 503's Retry-After (``retry_after_s``): the breaker's whole reset time for the call
    that failed, what is left of it for the calls it turned away."""
    import socket

    import redis

    from app.redis_client import CircuitOpenError, QueueTimeoutError, connect_api

    with socket.socket() as silent:  # listens, never accepts nor answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        client = connect_api(f"redis://127.0.0.1:{silent.getsockname()[1]}/0", 0.2, 3.0)
        with pytest.raises(QueueTimeoutError) as failed:
            client.ping()
        assert failed.value.retry_after_s == 3.0
        time.sleep(1.0)
        with pytest.raises(CircuitOpenError) as turned_away:
            client.ping()
        assert 1.5 < turned_away.value.retry_after_s <= 2.0, turned_away.value.retry_after_s
        assert isinstance(turned_away.value, redis.ConnectionError)
        client.close()
