"""The FastAPI application: ``create_app`` builds one, with its own state and metrics."""

from __future__ import annotations

import asyncio
import gc
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio.to_thread
import redis
from fastapi import Depends, FastAPI

from service_core import Unlearner

from .api import contract
from .api.deps import reject_unknown_query
from .api.errors import install_error_handlers
from .api.gate import RequestGate
from .api.limits import BodySizeLimit
from .api.routes import attribution, forget, health, model, receipts
from .api.routes import records as records_routes
from .api.shutdown import AnswerCancelledRequests
from .batching import PredictBatcher
from .core.config import Settings
from .deletion_log import DeletionLog
from .metrics import Metrics, RequestMetrics
from .queue import JobQueue
from .reader import CheckpointReader
from .redis_client import connect_api, connect_worker
from .service import (
    ModelFollower,
    ServiceState,
    deployment_keys,
    load_model,
    make_worker,
    queue_prefix,
)

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
    state = ServiceState(
        settings=settings,
        metrics=Metrics(
            lambda: state.unlearner,
            lambda: state.follower is not None and state.follower.lost is not None,
            lambda: state.queue,
            lambda: state.follower.behind_seconds() if state.follower is not None else 0.0,
        ),
        batcher=PredictBatcher(settings.predict_batch_wait_ms / 1e3),
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state.draining.bind(asyncio.get_running_loop())
        await anyio.to_thread.run_sync(_start, state, unlearner)
        try:
            yield
        finally:
            await anyio.to_thread.run_sync(_stop, state)

    app = FastAPI(
        title="ntk-unlearn",
        version=API_VERSION,
        description=_DESCRIPTION,
        lifespan=lifespan,
        dependencies=[Depends(reject_unknown_query)],
    )
    app.state.service = state
    install_error_handlers(app)
    # Added before the metrics middleware, so inside it: refused bodies are counted too.
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes)
    # Outside the size limit: a request without the right token is refused before anything else.
    app.add_middleware(RequestGate, settings=settings)
    # A request cancelled by a forced exit (a second SIGINT) is answered 503, not uvicorn's 500.
    app.add_middleware(AnswerCancelledRequests, draining=state.draining)

    # Outermost: every answer is counted, refusals of the two above included.
    app.add_middleware(RequestMetrics, metrics=state.metrics)

    app.include_router(forget.router)
    app.include_router(model.router)
    app.include_router(attribution.router)
    app.include_router(receipts.router)
    app.include_router(records_routes.router)
    app.include_router(health.router)

    generate = app.openapi

    def openapi() -> dict:
        fresh = app.openapi_schema is None
        schema = generate()
        return contract.complete(schema) if fresh else schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app


def _start(state: ServiceState, unlearner: Unlearner | None) -> None:
    settings = state.settings
    if settings.redis_url is None:
        raise RuntimeError(
            "no Redis configured: set REDIS_URL (ntk-unlearn serve starts a private one otherwise)"
        )
    state.keys = deployment_keys(settings)
    state.deletion_log = DeletionLog(settings.deletion_log)
    prefix = queue_prefix(settings, state.keys)
    log.info("queue: Redis keys %s:*", prefix)
    state.queue = JobQueue(
        connect_api(settings.redis_url, settings.redis_timeout_s, settings.redis_retry_s),
        prefix,
        settings.job_ttl_s,
        digest=state.keys.digest,
    )
    try:
        state.queue.ensure_group()
    except redis.RedisError as e:
        # Not fatal: /readyz reports it and the worker keeps retrying until Redis is back.
        log.warning("Redis unreachable at start-up: %s", e)
    if unlearner is not None:
        unlearner.use_id_key(state.keys.id_secret)
    state.unlearner = unlearner if unlearner is not None else load_model(settings)
    # Before the first request: compiled here, not in one (requests of up to 16 rows: 0.1 s for
    # digits; a larger request's shape is compiled when it first comes).
    log.info("compiled predictions in %.2f s", state.unlearner.warm_up())
    if settings.worker:
        # Its own client: the API's gives up quickly, the worker blocks on the stream.
        worker_queue = JobQueue(
            connect_worker(settings.redis_url),
            prefix,
            settings.job_ttl_s,
            digest=state.keys.digest,
        )
        state.worker = make_worker(settings, state.unlearner, worker_queue, state.metrics)
        state.worker.start()
    else:
        state.follower = ModelFollower(
            state,
            wait_s=settings.follow_wait_s,
            preconditioner=settings.follow_preconditioner,
            reader=CheckpointReader() if settings.follow_reader_process else None,
        )
        state.follower.start()
    frozen = _freeze_startup_heap()
    log.info("%d objects of the start-up left out of the garbage collector's passes", frozen)


def _freeze_startup_heap() -> int:
    """Move every object alive after the start-up (modules, the model, compiled programs: about
    200,000 for digits) out of the cyclic garbage collector's view (``gc.freeze``), and return
    how many. A full collection otherwise walks them all: under 16 clients the API process ran
    one about every second, 5–12 ms each with every request waiting (it holds the GIL), on the
    predictions' tail; after the freeze 1.6–5 ms. What the start-up allocated stays for the life
    of the process anyway."""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


def _stop(state: ServiceState) -> None:
    gc.unfreeze()  # a process that serves again (tests) lets the collector see them again
    if state.worker is not None:
        state.worker.stop()
        state.worker.queue.client.close()
    if state.follower is not None:
        state.follower.stop()
    if state.queue is not None:
        state.queue.client.close()
