"""Redis clients: the API's, quick to give up and guarded by a circuit breaker; the worker's.

A Redis that hangs (stopped, or a network that drops packets) answers nothing, and a client
waits for its socket timeout on every call: with redis-py's defaults (10 s here before, three
retries with backoff) each ``POST /v1/forget`` and each ``/readyz`` probe took 10 s or more, and
held a thread of the server's pool all that time. The API's client instead waits at most
``timeout_s`` once, without retrying; the failure opens a circuit breaker (pybreaker), and for
the next ``reset_s`` every call fails at once without touching the socket. Then one call is let
through to try again: its success closes the breaker, its failure opens it for another
``reset_s``.

The worker keeps its own client with longer timeouts: it blocks on the stream, and it has its
own retry loop (``app.worker``).
"""

from __future__ import annotations

import pybreaker
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry


class CircuitOpenError(redis.ConnectionError):
    """Redis failed moments ago; not tried again until the breaker lets a call through.

    A ``redis.ConnectionError``, so that it is answered as Redis being down (503)."""


def _not_an_outage(exc: BaseException) -> bool:
    # Errors Redis *answered* with (a script's error, a wrong type) say nothing of its health.
    return not isinstance(exc, redis.ConnectionError | redis.TimeoutError)


class GuardedRedis(redis.Redis):
    """A ``redis.Redis`` whose commands pass through a circuit breaker.

    Every command (scripts and ``PING`` included) goes through ``execute_command``; pipelines
    do not, and the API uses none.
    """

    def __init__(self, *args, breaker: pybreaker.CircuitBreaker, **kwargs):
        super().__init__(*args, **kwargs)
        self.breaker = breaker

    def execute_command(self, *args, **options):
        try:
            return self.breaker.call(super().execute_command, *args, **options)
        except pybreaker.CircuitBreakerError:
            raise CircuitOpenError(
                "Redis did not answer moments ago (circuit breaker open); it is tried again "
                f"{self.breaker.reset_timeout:g} s after a failure"
            ) from None


def connect_api(url: str, timeout_s: float, reset_s: float) -> GuardedRedis:
    """The API's client: gives up after ``timeout_s``, then fails fast for ``reset_s``."""
    breaker = pybreaker.CircuitBreaker(
        fail_max=1, reset_timeout=reset_s, exclude=[_not_an_outage], name="redis"
    )
    pool = redis.ConnectionPool.from_url(
        url,
        decode_responses=True,
        socket_connect_timeout=timeout_s,
        socket_timeout=timeout_s,
        retry=Retry(NoBackoff(), 0),
    )
    client = GuardedRedis(connection_pool=pool, breaker=breaker)
    client.auto_close_connection_pool = True
    return client


def connect_worker(url: str) -> redis.Redis:
    """The worker's client: long enough timeouts for its blocking reads and transactions."""
    return redis.Redis.from_url(
        url, decode_responses=True, socket_connect_timeout=2, socket_timeout=10
    )
