"""Probes and metrics; open to anyone, like a load balancer or Prometheus."""

from __future__ import annotations

from typing import Literal

import redis
from fastapi import APIRouter, Query, Response, status
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST

from ..deps import RETRY_LATER, StateDep
from ..schemas import INVALID, NotReady, Readiness, errors

router = APIRouter(tags=["operations"])


# HEAD too: load balancers and uptime checkers often probe with it (FastAPI routes, unlike
# Starlette's, do not answer HEAD for GET by themselves). Two routes, not one with two methods,
# so that each gets its own OpenAPI operation id.
@router.head("/healthz", summary="Healthz (HEAD)")
@router.get("/healthz")
def healthz() -> dict[str, str]:
    """Liveness: the process answers."""
    return {"status": "ok"}


_NOT_READY = {
    **errors(INVALID),
    503: {
        "model": NotReady,
        "description": "not ready: the model is not loaded, the queue (Redis) does not answer, "
        "(an API process without a worker) this process cannot load the version the worker "
        "reported, or (with a worker) this process's rolled-back data dir is being caught up; "
        "the body says which, and why",
    },
}


@router.head("/readyz", response_model=Readiness, responses=_NOT_READY, summary="Readyz (HEAD)")
@router.get("/readyz", response_model=Readiness, responses=_NOT_READY)
def readyz(
    state: StateDep,
    scope: Literal["all", "reads"] = Query(
        "all",
        description="'all': ready for every request, forgets included (Redis must answer); "
        "'reads': ready for model reads (predict, influence, attribution, /v1/model, /v1/ids), "
        "which this process answers while Redis is down: a load balancer that routes reads by "
        "it keeps this process in service through a Redis outage",
    ),
) -> Readiness | JSONResponse:
    """Readiness: the model is loaded, the queue (Redis) answers (within the setting
    redis_timeout_s; after a failure, not tried again for redis_retry_s) and, in an API process
    without a worker, this process serves the newest version the worker reported (or has been
    behind it for at most follow_wait_s). Says whether a worker runs (``worker``), without
    deciding readiness by it. ``scope=reads``: the same without the queue."""
    model = "loaded" if state.unlearner is not None else "loading"
    worker = "unknown"
    catching_up = None
    if state.queue is None:
        queue = "not set up yet"
    else:
        try:
            worker = state.queue.status().describe_worker()
            queue = "ok"
            if (
                state.worker is not None
                and state.unlearner is not None
                and state.worker.not_holding is None
            ):
                catching_up = _catching_up(state.queue.reported_version(), state.unlearner.version)
        except redis.RedisError as e:
            queue = f"unreachable ({type(e).__name__}: {e})"
    follower = state.follower
    lost = follower.lost if follower is not None else None
    if follower is not None and lost is None:
        lost = follower.taken_over
    if state.worker is not None and state.worker.not_holding is not None:
        lost = state.worker.not_holding
    behind = None
    if follower is not None and model == "loaded" and lost is None:
        behind = follower.behind()
    queue_ok = queue == "ok" or scope == "reads"
    if model == "loaded" and queue_ok and lost is None and behind is None and catching_up is None:
        return Readiness(status="ready", model_version=state.unlearner.version, worker=worker)
    problems = []
    if model != "loaded":
        problems.append("the model is not loaded yet")
    if not queue_ok:
        problems.append(f"the job queue (Redis) is {queue}: check REDIS_URL and that Redis runs")
    if lost is not None:
        problems.append(lost)
    if behind is not None:
        problems.append(behind)
    if catching_up is not None:
        problems.append(catching_up)
    body = NotReady(
        detail="not ready: " + "; ".join(problems), model=model, queue=queue, worker=worker
    )
    return JSONResponse(
        body.model_dump(),
        status_code=status.HTTP_503_SERVICE_UNAVAILABLE,
        # a process that lost its version is not helped by waiting: no Retry-After then
        headers=RETRY_LATER if lost is None else None,
    )


def _catching_up(reported: int | None, served: int) -> str | None:
    """Why a process whose worker serves a version older than the newest reported one is not
    ready: its data dir was rolled back (a backup restored while Redis was down at the start),
    and its worker has yet to forget again what the jobs of the newer versions forgot
    (``Worker.recover``); ``None`` when it is not behind. Publishing precedes reporting, so a
    worker is never behind its own reports otherwise."""
    if reported is None or reported <= served:
        return None
    return (
        f"this process serves version {served} but version {reported} was reported: its data "
        "dir was rolled back and its worker is forgetting again what the newer versions forgot "
        "(the log says when it is done)"
    )


@router.get("/metrics", response_class=Response)
def metrics(state: StateDep) -> Response:
    """Prometheus text exposition."""
    return Response(state.metrics.render(), media_type=CONTENT_TYPE_LATEST)
