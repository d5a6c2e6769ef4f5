"""Dependencies of the routes: the service state, the model, the queue, and authorisation."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, HTTPException, Request, Security, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from service_core import Unlearner

from ..core.config import Settings
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


def get_settings(state: StateDep) -> Settings:
    return state.settings


ModelDep = Annotated[Unlearner, Depends(get_unlearner)]
SettingsDep = Annotated[Settings, Depends(get_settings)]
QueueDep = Annotated[JobQueue, Depends(get_queue)]
Credentials = Annotated[HTTPAuthorizationCredentials | None, Security(_bearer)]


def _unauthorized(message: str, error: str | None = None) -> HTTPException:
    """401 with the challenge RFC 6750 asks for (``error="invalid_token"`` for a bad token)."""
    challenge = "Bearer" if error is None else f'Bearer error="{error}"'
    return HTTPException(
        status.HTTP_401_UNAUTHORIZED, message, headers={"WWW-Authenticate": challenge}
    )


def _authenticate(credentials: Credentials, settings: Settings) -> str:
    """Which token the request carries: ``"write"`` or ``"read"``.

    Raises:
      HTTPException: 401 when there is no token, or it is neither configured token. A token
        that is no token of this service is an authentication failure (401), never a matter
        of rights (403): 403 is for a valid token without the rights the route needs.
    """
    if credentials is None:
        raise _unauthorized("missing bearer token: send the header 'Authorization: Bearer <token>'")
    given = credentials.credentials
    if token_matches(given, settings.api_token):
        return "write"
    if token_matches(given, settings.read_token):
        return "read"
    raise _unauthorized(
        "invalid token: the bearer token is not a token of this service; send the write token "
        "(--api-token) or the read token (--read-token)",
        error="invalid_token",
    )


def require_read(state: StateDep, credentials: Credentials) -> None:
    """Reads need the read token or the write token, unless the operator opened them."""
    if not state.settings.open_reads:
        _authenticate(credentials, state.settings)


def require_write(state: StateDep, credentials: Credentials) -> None:
    """Deletion needs the write token; the read token is valid but lacks the right (403)."""
    if _authenticate(credentials, state.settings) != "write":
        raise HTTPException(
            status.HTTP_403_FORBIDDEN,
            "this bearer token has no write rights: deletion needs the write token (--api-token)",
        )


ReadAccess = Depends(require_read)
WriteAccess = Depends(require_write)
