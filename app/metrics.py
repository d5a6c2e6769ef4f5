"""Prometheus metrics, in a registry of their own per app so that apps (and tests) never share."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import redis
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service_core import Unlearner

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
_SOLVE_BUCKETS = (0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30, 60, 300, 1800)
_ITERATION_BUCKETS = (0, 1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 10000)
#: The outcomes a forget job ends with (``ntk_unlearn_forget_jobs_total{status=…}``).
JOB_OUTCOMES = ("succeeded", "failed")


class Metrics:
    """Every metric the service exports.

    Arguments:
      model: returns the model being served, or ``None`` before it is loaded; the model gauges
        read it at scrape time, so they are never stale.
      follower_lost: whether this process's follower lost its version (``ModelFollower.lost``),
        read at scrape time too.
      queue: returns the job queue (``app.queue.JobQueue``), or ``None`` before it is set up;
        the queue gauges (``QueueCollector``) read Redis at scrape time.
      follower_behind: seconds this process (an API process without a worker) has served a
        version older than the one the worker reported (``ModelFollower.behind_seconds``), read
        at scrape time; 0 when current.
    """

    def __init__(
        self,
        model: Callable[[], Unlearner | None],
        follower_lost: Callable[[], bool] = lambda: False,
        queue: Callable[[], object | None] = lambda: None,
        follower_behind: Callable[[], float] = lambda: 0.0,
    ):
        self.registry = CollectorRegistry()
        r = self.registry
        r.register(QueueCollector(queue))
        self.requests = Counter(
            "ntk_unlearn_http_requests",
            "HTTP requests by route template, method and status code",
            ["route", "method", "status"],
            registry=r,
        )
        self.latency = Histogram(
            "ntk_unlearn_http_request_seconds",
            "HTTP request latency by route template and method",
            ["route", "method"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        # The job metrics: exported only by a process that runs a worker (``count_jobs``).
        self.jobs = Counter(
            "ntk_unlearn_forget_jobs", "Forget jobs by outcome", ["status"], registry=None
        )
        self.batch_jobs = Histogram(
            "ntk_unlearn_forget_batch_jobs",
            "Jobs coalesced into one solve",
            buckets=(1, 2, 5, 10, 25, 100, 1000),
            registry=None,
        )
        self.solve_seconds = Histogram(
            "ntk_unlearn_solve_seconds",
            "Seconds of the influence solve of one forget batch",
            buckets=_SOLVE_BUCKETS,
            registry=None,
        )
        self.cg_iterations = Histogram(
            "ntk_unlearn_solver_iterations",
            "Iterations of the influence solve of one forget batch (0 for a direct solve)",
            buckets=_ITERATION_BUCKETS,
            registry=None,
        )
        self._jobs_registered = False
        version = Gauge("ntk_unlearn_model_version", "Version of the served model", registry=r)
        n_train = Gauge("ntk_unlearn_n_train", "Training points the model holds", registry=r)
        version.set_function(lambda: _or_nan(model(), lambda u: u.version))
        n_train.set_function(lambda: _or_nan(model(), lambda u: u.n_train))
        lost = Gauge(
            "ntk_unlearn_follower_lost",
            "1 when this API process (no worker) found that the worker dropped the version it "
            "serves and stopped answering from it (restart it; /readyz says why), else 0",
            registry=r,
        )
        lost.set_function(lambda: float(follower_lost()))
        behind = Gauge(
            "ntk_unlearn_follower_behind_seconds",
            "Seconds this API process (no worker) has served a version older than the newest the "
            "worker reported (its model requests wait, then get 503; /readyz 503 after "
            "--follow-wait-s, saying why); 0 when it serves that version, and in a process "
            "with the worker",
            registry=r,
        )
        behind.set_function(follower_behind)

    def count_jobs(self) -> None:
        """Export the job metrics (jobs by outcome, batch sizes, solve seconds and iterations):
        called by the worker that records them, so that an API process without one exports
        none rather than histograms that stay empty. Idempotent."""
        if not self._jobs_registered:
            for m in (self.jobs, self.batch_jobs, self.solve_seconds, self.cg_iterations):
                self.registry.register(m)
            # Both outcomes exported from the start at 0, so that an alert on the increase of
            # ``status="failed"`` sees a series before the first failure.
            for status in JOB_OUTCOMES:
                self.jobs.labels(status=status)
            self._jobs_registered = True

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        return generate_latest(self.registry)


class QueueCollector(Collector):
    """The queue's gauges, read from Redis at each scrape (``JobQueue.status``: one round trip):
    whether Redis answers, whether a worker is alive, how many jobs wait and for how long. With
    Redis not answering (or the queue not set up yet) ``ntk_unlearn_redis_up`` is 0 and the
    other three are NaN (unknown, not 0: an alert on ``worker_up == 0`` must pair with one on
    ``redis_up == 0``); the scrape still answers, within the client's timeout.

    Arguments:
      queue: returns the ``JobQueue``, or ``None``.
    """

    def __init__(self, queue: Callable[[], object | None]):
        self.queue = queue

    def describe(self) -> Iterator[GaugeMetricFamily]:
        # Named without reading Redis: registering the collector must not call it.
        return iter(self._families(None))

    def collect(self) -> Iterator[GaugeMetricFamily]:
        queue = self.queue()
        status = None
        if queue is not None:
            try:
                status = queue.status()  # type: ignore[attr-defined]
            except redis.RedisError:
                pass
        return iter(self._families(status))

    @staticmethod
    def _families(status) -> list[GaugeMetricFamily]:
        nan = float("nan")
        up = GaugeMetricFamily(
            "ntk_unlearn_worker_up",
            "1 when a solver worker renewed its heartbeat in Redis in the last 15 s, 0 when none "
            "did (jobs stay queued until one runs), NaN when Redis does not answer",
            value=nan if status is None else float(status.worker is not None),
        )
        jobs = GaugeMetricFamily(
            "ntk_unlearn_queue_jobs",
            "Forget and addition jobs queued or running (not finished yet)",
            value=nan if status is None else float(status.jobs),
        )
        oldest = GaugeMetricFamily(
            "ntk_unlearn_queue_oldest_job_seconds",
            "Seconds since the oldest job not finished yet was queued (0 when none): how late "
            "the slowest pending deletion is",
            value=nan if status is None else status.oldest_s,
        )
        redis_up = GaugeMetricFamily(
            "ntk_unlearn_redis_up",
            "1 when the queue's Redis answered this scrape, else 0 (the other queue gauges are "
            "then NaN)",
            value=float(status is not None),
        )
        return [redis_up, up, jobs, oldest]


class RequestMetrics:
    """ASGI middleware: counts every HTTP request by route template, method and status code, and
    times it (seconds from the request's arrival until the app has sent the whole answer).

    Plain ASGI rather than ``@app.middleware("http")``: Starlette's ``BaseHTTPMiddleware``
    runs every request in a task group of its own and relays its body through a stream, about a
    fifth of the event loop's time per 1-row ``/v1/predict`` under 16 clients.

    Arguments:
      app: the application.
      metrics: where the counts and times go.
    """

    def __init__(self, app: ASGIApp, metrics: Metrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        code = 500  # an exception before any answer: the server answers 500

        async def send_counted(message: Message) -> None:
            nonlocal code
            if message["type"] == "http.response.start":
                code = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_counted)
        finally:
            # The route template, not the path: job ids must not become label values.
            route = getattr(scope.get("route"), "path", "unmatched")
            self.metrics.requests.labels(route, scope["method"], str(code)).inc()
            self.metrics.latency.labels(route, scope["method"]).observe(
                time.perf_counter() - started
            )


def _or_nan(u: Unlearner | None, read: Callable[[Unlearner], float]) -> float:
    return float("nan") if u is None else float(read(u))
