"""Redis clients: the API's, quick to give up and guarded by a circuit breaker; the worker's.

A Redis that hangs (stopped, or a network that drops packets) answers nothing, and a client
waits for its socket timeout on every call: with redis-py's defaults (10 s here before, three
retries with backoff) each ``POST /v1/forget`` and each ``/readyz`` probe took 10 s or more, and
held a thread of the server's pool all that time. The API's client instead waits at most
``timeout_s`` once, without retrying; the failure opens a circuit breaker (pybreaker), and for
the next ``reset_s`` every call fails at once without touching the socket. Then one call is let
through to try again: its success closes the breaker, its failure opens it for another
``reset_s``.

Every failure says what happened: the call that met the timeout or the refused connection says
so (``QueueTimeoutError``, ``QueueConnectionError``); only the calls the open breaker turned away
say that the breaker answered, with how long ago and how Redis failed (``CircuitOpenError``).

The worker keeps its own client with longer timeouts: it blocks on the stream, and it has its
own retry loop (``app.worker``).
"""

from __future__ import annotations

import threading
import time

import pybreaker
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry


class _Outage:
    """Mixin: ``retry_after_s``, seconds until the breaker lets a call try Redis again (the
    API's 503 says it in ``Retry-After``)."""

    retry_after_s: float = 5.0


class QueueTimeoutError(_Outage, redis.TimeoutError):
    """Redis did not answer this call within the client's timeout."""


class QueueConnectionError(_Outage, redis.ConnectionError):
    """Redis refused or dropped this call's connection."""


class CircuitOpenError(_Outage, redis.ConnectionError):
    """Redis failed moments ago; not tried again until the breaker lets a call through.

    A ``redis.ConnectionError``, so that it is answered as Redis being down (503)."""


def _not_an_outage(exc: BaseException) -> bool:
    # Errors Redis *answered* with (a script's error, a wrong type) say nothing of its health.
    return not isinstance(exc, redis.ConnectionError | redis.TimeoutError)


class GuardedRedis(redis.Redis):
    """A ``redis.Redis`` whose commands pass through a circuit breaker.

    Every command (scripts and ``PING`` included) goes through ``execute_command``; pipelines
    do not, and the API uses none.

    Raises (from every command):
      QueueTimeoutError: Redis did not answer within ``timeout_s``.
      QueueConnectionError: the connection was refused or dropped.
      CircuitOpenError: not tried: a call failed less than the breaker's reset time ago.
    """

    def __init__(self, *args, breaker: pybreaker.CircuitBreaker, timeout_s: float, **kwargs):
        super().__init__(*args, **kwargs)
        self.breaker = breaker
        self.timeout_s = timeout_s
        self._last_failure: tuple[float, str] | None = None  # (monotonic time, what happened)
        self._lock = threading.Lock()

    def _failed(self, what: str) -> str:
        with self._lock:
            self._last_failure = (time.monotonic(), what)
        return what

    def execute_command(self, *args, **options):
        try:
            return self.breaker.call(super().execute_command, *args, **options)
        except pybreaker.CircuitBreakerError:
            with self._lock:
                last = self._last_failure
            ago = time.monotonic() - last[0] if last else 0.0
            since = f"{ago:.1f} s ago: {last[1]}" if last else "moments ago"
            error = CircuitOpenError(
                f"not tried (circuit breaker open): Redis failed {since}; it is tried again "
                f"{self.breaker.reset_timeout:g} s after that failure"
            )
            error.retry_after_s = max(0.0, self.breaker.reset_timeout - ago)
            raise error from None
        except redis.TimeoutError as e:
            what = self._failed(f"Redis did not answer within {self.timeout_s:g} s ({e})")
            error = QueueTimeoutError(what)
            error.retry_after_s = self.breaker.reset_timeout
            raise error from e
        except redis.ConnectionError as e:
            what = self._failed(f"the connection to Redis was refused or dropped ({e})")
            error = QueueConnectionError(what)
            error.retry_after_s = self.breaker.reset_timeout
            raise error from e


def connect_api(url: str, timeout_s: float, reset_s: float) -> GuardedRedis:
    """The API's client: gives up after ``timeout_s``, then fails fast for ``reset_s``."""
    # throw_new_error_on_trip=False: the call that trips the breaker raises its own error (the
    # timeout it met), not pybreaker's "breaker open".
    breaker = pybreaker.CircuitBreaker(
        fail_max=1,
        reset_timeout=reset_s,
        exclude=[_not_an_outage],
        name="redis",
        throw_new_error_on_trip=False,
    )
    pool = redis.ConnectionPool.from_url(
        url,
        decode_responses=True,
        socket_connect_timeout=timeout_s,
        socket_timeout=timeout_s,
        retry=Retry(NoBackoff(), 0),
    )
    client = GuardedRedis(connection_pool=pool, breaker=breaker, timeout_s=timeout_s)
    client.auto_close_connection_pool = True
    return client


def connect_worker(url: str) -> redis.Redis:
    """The worker's client: long enough timeouts for its blocking reads and transactions."""
    return redis.Redis.from_url(
        url, decode_responses=True, socket_connect_timeout=2, socket_timeout=10
    )
