"""Named crash points for the fault-injection tests (tests/test_api_crash_points.py).

``crash_point(name)`` kills the process with SIGKILL, a real crash (no clean-up, no ``finally``),
when the environment variable ``NTK_UNLEARN_CRASH_AT`` names that point; otherwise it does nothing.
The points sit between the steps of a deletion (docs/design.md, The order of a deletion) and of
the first start.
"""

from __future__ import annotations

import os
import signal

CRASH_ENV = "NTK_UNLEARN_CRASH_AT"

# In the order they are reached.
POINTS = (
    "built",  # version 0 trained, not yet checkpointed (first start)
    "checkpointed",  # new version checkpointed, not logged
    "logged",  # logged (fsync'd), not published
    "published",  # published, jobs not reported
    "reported",  # jobs succeeded + XACK'ed, older checkpoints and kernels not purged
    "purged",  # purged, post-publish work not done
)


def crash_point(name: str) -> None:
    """SIGKILL this process if ``NTK_UNLEARN_CRASH_AT`` is ``name`` (a name of ``POINTS``)."""
    if os.environ.get(CRASH_ENV) == name:
        os.kill(os.getpid(), signal.SIGKILL)
