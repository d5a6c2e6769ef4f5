"""Bearer tokens: where they come from, a constant-time comparison, and who may do what."""

from __future__ import annotations

import dataclasses
import hmac
import os
import secrets
from pathlib import Path
from typing import Literal

Right = Literal["read", "write"]


# HTTP authentication schemes (IANA registry) a client may send instead of Bearer: named in the
# 401 as sent; anything else is not echoed (it may be the credential itself)
_OTHER_SCHEMES = frozenset(
    {"basic", "digest", "negotiate", "ntlm", "token", "oauth", "hoba", "mutual", "vapid",
     "scram-sha-1", "scram-sha-256", "aws4-hmac-sha256", "dpop", "privatetoken", "concealed"}
)  # fmt: skip


def ensure_token_file(path: Path) -> tuple[str, bool]:
    """Read the token stored at ``path``, or create one there readable by the owner only.

    Returns:
      ``(token, created)``.
    """
    if path.exists():
        token = path.read_text().strip()
        if token:
            return token, False
    path.parent.mkdir(parents=True, exist_ok=True)
    token = secrets.token_urlsafe(32)
    # O_EXCL with mode 0600: the token is never readable by others, not even for an instant.
    tmp = path.with_suffix(".tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
    os.replace(tmp, path)
    return token, True


def token_matches(given: str, expected: str | None) -> bool:
    """Whether ``given`` equals ``expected``, in time independent of where they differ."""
    return expected is not None and hmac.compare_digest(given.encode(), expected.encode())


@dataclasses.dataclass(frozen=True)
class Denied:
    """Why a request may not go on: the HTTP status, the message, and its headers."""

    status: int
    detail: str
    headers: dict[str, str] | None = None


# Where an operator may have put the write token: said in full, since the caller cannot know.
_WRITE_TOKEN_SOURCES = (
    "the service's --api-token or --api-token-file, or NTK_UNLEARN_API_TOKEN or "
    "NTK_UNLEARN_API_TOKEN_FILE; without any, the one generated in its data dir's api_token file"
)


def _unauthorized(message: str, error: str | None = None) -> Denied:
    """401 with the challenge RFC 6750 asks for (``error="invalid_token"`` for a bad token)."""
    challenge = "Bearer" if error is None else f'Bearer error="{error}"'
    return Denied(401, message, {"WWW-Authenticate": challenge})


def check_access(
    authorization: str | None,
    need: Right,
    api_token: str | None,
    read_token: str | None,
    open_reads: bool,
) -> Denied | None:
    """Whether a request with this ``Authorization`` header may do what ``need`` says.

    A token that is no token of this service is an authentication failure (401), never a matter
    of rights (403): 403 is for a valid token without the rights the route needs. Reads accept
    the read token or the write token, or nothing at all when the operator opened them.

    Arguments:
      authorization: the header's value, ``None`` when absent.
      need: ``"read"`` or ``"write"``.

    Returns:
      ``None`` when allowed, else what to answer.
    """
    if need == "read" and open_reads:
        return None
    scheme, given = ((authorization or "").split(None, 1) + ["", ""])[:2]
    given = given.strip()
    if scheme.lower() != "bearer" or not given:
        if authorization and scheme.lower() != "bearer":
            # Never a byte of what was sent: a token sent without "Bearer " is the whole header.
            # Only a registered scheme's name, which says what was sent instead.
            named = (
                f"the {scheme} scheme" if scheme.lower() in _OTHER_SCHEMES else "no bearer token"
            )
            return _unauthorized(
                f"the Authorization header holds {named}; this service takes only a bearer "
                "token: send 'Authorization: Bearer <token>'"
            )
        return _unauthorized(
            "missing bearer token: send the header 'Authorization: Bearer <token>'"
        )
    if token_matches(given, api_token):
        return None
    if token_matches(given, read_token):
        if need == "read":
            return None
        return Denied(
            403,
            "this bearer token has no write rights: forgetting and adding records need the write "
            "token "
            f"({_WRITE_TOKEN_SOURCES})",
        )
    return _unauthorized(
        "invalid token: the bearer token is not a token of this service; send the write token "
        f"({_WRITE_TOKEN_SOURCES}) or the read token (the service's --read-token or "
        "--read-token-file, or NTK_UNLEARN_READ_TOKEN or NTK_UNLEARN_READ_TOKEN_FILE)",
        error="invalid_token",
    )
