"""Bearer tokens: where the write token comes from, and a constant-time comparison."""

from __future__ import annotations

import hmac
import os
import secrets
from pathlib import Path


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
