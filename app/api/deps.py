"""Dependencies of the routes: the service state, the model, the queue, and authorisation."""

from __future__ import annotations

import collections
import typing
from collections.abc import Callable
from typing import Annotated

import anyio.to_thread
from fastapi import Depends, HTTPException, Request, Security, status
from fastapi.routing import APIRoute
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from service_core import Unlearner

from ..core.config import Settings
from ..core.security import Right, check_access
from ..deletion_log import DeletionLog
from ..queue import JobQueue
from ..receipts import DeploymentKeys
from ..service import FollowerBehindError, ServiceState

# Every 503 says when to come back (the OpenAPI document promises it: ``app.api.contract``).
RETRY_LATER = {"Retry-After": "2"}

_bearer = HTTPBearer(auto_error=False, description="write token, or read token for reads")


async def get_state(request: Request) -> ServiceState:
    return request.app.state.service


StateDep = Annotated[ServiceState, Depends(get_state)]


def _loaded(value, missing: str):
    """``value``, or 503 with Retry-After while the part it stands for is still starting."""
    if value is None:
        raise HTTPException(
            status.HTTP_503_SERVICE_UNAVAILABLE,
            f"{missing} yet: retry in a few seconds",
            headers=RETRY_LATER,
        )
    return value


async def get_unlearner(state: StateDep) -> Unlearner:
    """The served model; in an API process without a worker, only once it is at least the
    newest version the worker reported (read after this request arrived, one read shared by
    concurrent requests: ``ModelFollower.shared_required_version``), else 503."""
    u = _loaded(state.unlearner, "the model is not loaded")
    if state.worker is not None and (why := state.worker.not_holding) is not None:
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, why, headers=RETRY_LATER)
    follower = state.follower
    if follower is not None:
        if follower.lost is not None:  # the worker dropped the version served here
            raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, follower.lost)
        if follower.taken_over is not None:  # the queue is another data dir's now
            raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, follower.taken_over)
        wanted = await follower.shared_required_version()
        if wanted is not None and u.version < wanted:  # a wait: off the event loop
            await anyio.to_thread.run_sync(follow_or_503, state, lambda: follower.catch_up(wanted))
    return u


async def none_forgotten_since(state: ServiceState, version: int, ids) -> None:
    """After a long read computed on ``version`` (attribution, self-influence: seconds to
    minutes), 503 with Retry-After if any of the ``ids`` it is about to name is no longer active
    in the newest version this process must serve (``get_unlearner`` again: a follower catches up
    first): a record whose forget succeeded meanwhile is never named again. An answer naming
    only records still active is sent as computed (its ``model_version`` says which).

    Arguments:
      version: the model version the answer was computed on.
      ids: the record ids (str) the answer names.

    Raises:
      HTTPException: 503 with Retry-After (a named record was forgotten since, or the process
        cannot serve the newest version now: ``get_unlearner``).
    """
    u = await get_unlearner(state)
    if u.version == version:
        return
    active = u.state.index
    gone = sum(1 for i in set(ids) if i not in active)
    if gone:
        raise HTTPException(
            status.HTTP_503_SERVICE_UNAVAILABLE,
            f"the model changed while this answer was computed (version {version}, now "
            f"{u.version}) and {gone} record(s) it names were forgotten since: retry (the "
            "answer is computed again on the new version)",
            headers=RETRY_LATER,
        )


def follow_or_503(state: ServiceState, catch_up: Callable[[], None]) -> None:
    """Run ``catch_up`` (a ``ModelFollower`` method); 503 with Retry-After if it gives up."""
    try:
        catch_up()
    except FollowerBehindError as e:
        raise HTTPException(
            status.HTTP_503_SERVICE_UNAVAILABLE,
            f"{e} ({state.settings.follow_wait_s:g} s ago); this process never answers from an "
            "older one: retry in a moment",
            headers=RETRY_LATER,
        ) from None


async def get_queue(state: StateDep) -> JobQueue:
    return _loaded(state.queue, "the job queue is not set up")


async def get_settings(state: StateDep) -> Settings:
    return state.settings


ModelDep = Annotated[Unlearner, Depends(get_unlearner)]
SettingsDep = Annotated[Settings, Depends(get_settings)]
QueueDep = Annotated[JobQueue, Depends(get_queue)]
Credentials = Annotated[HTTPAuthorizationCredentials | None, Security(_bearer)]


def _enforce(request: Request, state: ServiceState, need: Right) -> None:
    settings = state.settings
    denied = check_access(
        request.headers.get("authorization"),
        need,
        settings.api_token,
        settings.read_token,
        settings.open_reads,
    )
    if denied is not None:
        raise HTTPException(denied.status, denied.detail, headers=denied.headers)


# ``app.api.gate.RequestGate`` makes the same checks before a body byte is read; these
# dependencies repeat them (at no cost) so that the rights stay declared on each route and in
# the OpenAPI schema, and hold for an app run without the gate. The dependencies that do not
# block are ``async``: FastAPI would run a plain ``def`` in its thread pool, a hand-off per
# dependency per request (a third of a 1-row prediction's CPU time under load).
async def require_read(request: Request, state: StateDep, credentials: Credentials) -> None:
    """Reads need the read token or the write token, unless the operator opened them."""
    _enforce(request, state, "read")


async def require_write(request: Request, state: StateDep, credentials: Credentials) -> None:
    """Deletion needs the write token; the read token is valid but lacks the right (403)."""
    _enforce(request, state, "write")


ReadAccess = Depends(require_read)
WriteAccess = Depends(require_write)


async def reject_unknown_query(request: Request) -> None:
    """422 for a query parameter the route does not take: a misspelt ``?limt=5`` would
    otherwise be ignored without a word (every route's own parameters are checked by FastAPI);
    and for a single-valued one given more than once (``?cursor=0&cursor=5``: FastAPI keeps the
    last, so the answer would depend on an order the caller may not have meant)."""
    route = request.scope.get("route")
    if not isinstance(route, APIRoute) or not request.query_params:
        return
    known: set[str] = set()
    single: set[str] = set()
    pending = [route.dependant]
    while pending:
        dependant = pending.pop()
        for param in dependant.query_params:
            known.add(param.alias)
            origin = typing.get_origin(param.field_info.annotation)
            if not (isinstance(origin, type) and issubclass(origin, (list, tuple, set))):
                single.add(param.alias)
        pending.extend(dependant.dependencies)
    unknown = sorted(set(request.query_params) - known)
    if unknown:
        takes = f"it takes {', '.join(sorted(known))}" if known else "it takes none"
        raise HTTPException(
            status.HTTP_422_UNPROCESSABLE_CONTENT,
            f"unknown query parameter(s) {', '.join(map(repr, unknown))} for this endpoint; {takes}",
        )
    # one pass (a query string of thousands of one repeated name must not cost their square)
    counts = collections.Counter(name for name, _ in request.query_params.multi_items())
    if repeated := sorted(n for n, c in counts.items() if c > 1 and n in single):
        raise HTTPException(
            status.HTTP_422_UNPROCESSABLE_CONTENT,
            f"query parameter(s) {', '.join(map(repr, repeated))} given more than once; "
            "give each once",
        )


def get_keys(state: StateDep) -> DeploymentKeys:
    return _loaded(state.keys, "the deployment keys are not loaded")


def get_deletion_log(state: StateDep) -> DeletionLog:
    return _loaded(state.deletion_log, "the deletion log is not open")


KeysDep = Annotated[DeploymentKeys, Depends(get_keys)]
DeletionLogDep = Annotated[DeletionLog, Depends(get_deletion_log)]
