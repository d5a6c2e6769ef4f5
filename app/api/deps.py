"""Dependencies of the routes: the service state, the model, the queue, and authorisation."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, HTTPException, Request, Security, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from service_core import Unlearner

from ..core.security import token_matches
from ..queue import JobQueue
from ..service import ServiceState

_bearer = HTTPBearer(auto_error=False, description="write token, or read token for reads")


def get_state(request: Request) -> ServiceState:
    return request.app.state.service


StateDep = Annotated[ServiceState, Depends(get_state)]


def get_unlearner(state: StateDep) -> Unlearner:
    if state.unlearner is None:
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, "the model is not loaded yet")
    return state.unlearner


def get_queue(state: StateDep) -> JobQueue:
    if state.queue is None:
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, "the job queue is not set up yet")
    return state.queue


ModelDep = Annotated[Unlearner, Depends(get_unlearner)]
QueueDep = Annotated[JobQueue, Depends(get_queue)]
Credentials = Annotated[HTTPAuthorizationCredentials | None, Security(_bearer)]


def _check(credentials: Credentials, accepted: list[str | None], rights: str) -> None:
    if credentials is None:
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED,
            "missing bearer token: send the header 'Authorization: Bearer <token>'",
            headers={"WWW-Authenticate": "Bearer"},
        )
    if not any(token_matches(credentials.credentials, t) for t in accepted):
        raise HTTPException(
            status.HTTP_403_FORBIDDEN,
            f"this bearer token has no {rights} rights: use the {rights} token",
        )


def require_read(state: StateDep, credentials: Credentials) -> None:
    """Reads need the read token or the write token, unless the operator opened them."""
    s = state.settings
    if not s.open_reads:
        _check(credentials, [s.read_token, s.api_token], "read")


def require_write(state: StateDep, credentials: Credentials) -> None:
    """Deletion needs the write token."""
    _check(credentials, [state.settings.api_token], "write")


ReadAccess = Depends(require_read)
WriteAccess = Depends(require_write)
