"""Probes and metrics; open to anyone, like a load balancer or Prometheus."""

from __future__ import annotations

import redis
from fastapi import APIRouter, HTTPException, Response, status
from prometheus_client import CONTENT_TYPE_LATEST

from ..deps import StateDep
from ..schemas import Readiness, errors

router = APIRouter(tags=["operations"])


# HEAD too: load balancers and uptime checkers often probe with it (FastAPI routes, unlike
# Starlette's, do not answer HEAD for GET by themselves). Two routes, not one with two methods,
# so that each gets its own OpenAPI operation id.
@router.head("/healthz", summary="Healthz (HEAD)")
@router.get("/healthz")
def healthz() -> dict[str, str]:
    """Liveness: the process answers."""
    return {"status": "ok"}


_NOT_READY = {503: "model not loaded, or the queue unreachable"}


@router.head("/readyz", responses=errors(_NOT_READY), summary="Readyz (HEAD)")
@router.get("/readyz", responses=errors(_NOT_READY))
def readyz(state: StateDep) -> Readiness:
    """Readiness: the model is loaded and the queue (Redis) answers PING."""
    if state.unlearner is None:
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, "the model is not loaded yet")
    if state.queue is None:
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, "the job queue is not set up yet")
    try:
        state.queue.ping()
    except redis.RedisError as e:
        raise HTTPException(
            status.HTTP_503_SERVICE_UNAVAILABLE,
            f"the job queue is unreachable: Redis ({type(e).__name__}: {e}); "
            "check REDIS_URL and that Redis runs",
        ) from None
    return Readiness(status="ready", model_version=state.unlearner.version)


@router.get("/metrics", response_class=Response)
def metrics(state: StateDep) -> Response:
    """Prometheus text exposition."""
    return Response(state.metrics.render(), media_type=CONTENT_TYPE_LATEST)
