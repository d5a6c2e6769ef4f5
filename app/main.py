"""The FastAPI application: ``create_app`` builds one, with its own state and metrics."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio.to_thread
import redis
from fastapi import FastAPI, Request, Response

from service_core import Unlearner

from .api.errors import install_error_handlers
from .api.limits import BodySizeLimit
from .api.routes import attribution, forget, health, model
from .core.config import Settings
from .metrics import Metrics
from .queue import JobQueue
from .service import ModelFollower, ServiceState, load_model, make_worker

log = logging.getLogger(__name__)

API_VERSION = "1.0.0"
_DESCRIPTION = (
    "Removes the influence of named training records from a linearised network held in its "
    "dual form, and estimates the effect of removals. Deletions are queued jobs "
    "(POST /v1/forget, then GET /v1/jobs/{job_id}); every applied deletion is a new model version."
)


def create_app(settings: Settings | None = None, unlearner: Unlearner | None = None) -> FastAPI:
    """Build the app. Nothing is loaded or connected until it starts (its lifespan).

    Arguments:
      settings: defaults to ``Settings()`` (environment and defaults).
      unlearner: serve this model instead of restoring or building one (tests).
    """
    settings = settings or Settings()
    state = ServiceState(settings=settings, metrics=Metrics(lambda: state.unlearner))

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await anyio.to_thread.run_sync(_start, state, unlearner)
        try:
            yield
        finally:
            await anyio.to_thread.run_sync(_stop, state)

    app = FastAPI(
        title="ntk-unlearn", version=API_VERSION, description=_DESCRIPTION, lifespan=lifespan
    )
    app.state.service = state
    install_error_handlers(app)
    # Added before the metrics middleware, so inside it: refused bodies are counted too.
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes)

    @app.middleware("http")
    async def record_metrics(request: Request, call_next) -> Response:
        started = time.perf_counter()
        code = 500
        try:
            response = await call_next(request)
            code = response.status_code
            return response
        finally:
            # The route template, not the path: job ids must not become label values.
            route = getattr(request.scope.get("route"), "path", "unmatched")
            state.metrics.requests.labels(route, request.method, str(code)).inc()
            state.metrics.latency.labels(route, request.method).observe(
                time.perf_counter() - started
            )

    app.include_router(forget.router)
    app.include_router(model.router)
    app.include_router(attribution.router)
    app.include_router(health.router)
    return app


def connect_redis(url: str) -> redis.Redis:
    """A client for the queue; its timeouts keep probes quick when Redis is gone."""
    return redis.Redis.from_url(
        url, decode_responses=True, socket_connect_timeout=2, socket_timeout=10
    )


def _start(state: ServiceState, unlearner: Unlearner | None) -> None:
    settings = state.settings
    if settings.redis_url is None:
        raise RuntimeError(
            "no Redis configured: set REDIS_URL (ntk-unlearn serve starts a private one otherwise)"
        )
    state.queue = JobQueue(
        connect_redis(settings.redis_url), settings.redis_prefix, settings.job_ttl_s
    )
    try:
        state.queue.ensure_group()
    except redis.RedisError as e:
        # Not fatal: /readyz reports it and the worker keeps retrying until Redis is back.
        log.warning("Redis unreachable at start-up: %s", e)
    state.unlearner = unlearner if unlearner is not None else load_model(settings)
    if settings.worker:
        state.worker = make_worker(settings, state.unlearner, state.queue, state.metrics)
        state.worker.start()
    else:
        state.follower = ModelFollower(state)
        state.follower.start()


def _stop(state: ServiceState) -> None:
    if state.worker is not None:
        state.worker.stop()
    if state.follower is not None:
        state.follower.stop()
    if state.queue is not None:
        state.queue.client.close()
