"""Exclusive locks on a data directory's resources, so that two processes never share one.

A lock is ``flock(LOCK_EX | LOCK_NB)`` on a small file that also names its holder (pid and
role). The kernel releases it when the holder exits, however it exits (``kill -9`` included), so
a lock that can be taken proves that whoever held it before is gone: there is never a stale lock
to clean up by hand. The file is opened close-on-exec, so children (the embedded
``redis-server``) do not inherit and keep the lock.

Three locks exist (see ``app.cli`` and ``app.service``):

- ``DATA_DIR/.lock``, the *worker* lock: held by the one process that applies forget jobs to
  the data dir's checkpoints (``serve`` with its worker, or ``worker``). One worker per model.
- ``DATA_DIR/redis/.lock``, the *embedded Redis* lock: held by the ``serve`` process that owns
  the private ``redis-server`` (taken by ``app.embedded_redis.EmbeddedRedis.start``).
- ``DATA_DIR/.build.lock``, the *build* lock: held by the one process that builds and saves
  version 0 when the data dir has no checkpoint; any other process (``worker`` or
  ``serve --no-worker``) started meanwhile waits for it, then restores that version
  (``app.service.load_model``). Unlike the others it is waited for, not refused.

API processes without a worker on a shared Redis (``serve --no-worker`` with ``REDIS_URL``) take
neither: any number of them may read the same data dir.
"""

from __future__ import annotations

import fcntl
import os
import time
from collections.abc import Callable
from pathlib import Path


class DataDirInUseError(RuntimeError):
    """The lock is held by another live process.

    Attributes:
      path: the lock file.
      holder_pid: the pid written by the holder, or ``None`` if it could not be read.
      holder_role: what the holder said it is (``serve``, ``worker``, ...), or ``""``.
    """

    def __init__(self, path: Path, holder_pid: int | None, holder_role: str, message: str):
        super().__init__(message)
        self.path = path
        self.holder_pid = holder_pid
        self.holder_role = holder_role


class DirLock:
    """An exclusive, non-blocking lock on ``path``, held until ``release()`` or process exit.

    Arguments:
      path: the lock file (created if missing; never deleted, since deleting a lock file while
        another process opens it would let two processes "hold" it).
      role: written into the file beside the pid, for the message another process gets
        (``serve``, ``worker``).
      resource: what the lock guards, naming the directory, for that message (e.g. "the solver
        worker of data directory /srv/data").
    """

    def __init__(self, path: Path, role: str, resource: str):
        self.path = Path(path).absolute()
        self.role = role
        self.resource = resource
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> DirLock:
        """Take the lock at once, or fail.

        Raises:
          DataDirInUseError: another process holds it; the message names the data dir, the
            holder's pid and role, and what to do.
        """
        if self._fd is not None:
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid, role = _read_holder(fd)
            os.close(fd)
            raise DataDirInUseError(self.path, pid, role, self._in_use_message(pid, role)) from None
        except BaseException:
            os.close(fd)
            raise
        return self._own(fd)

    def acquire_waiting(self, on_wait: Callable[[int | None, str], None] | None = None) -> DirLock:
        """Take the lock, waiting as long as another process holds it.

        Arguments:
          on_wait: called once with the holder's ``(pid, role)`` before waiting, if it must.
        """
        try:
            return self.acquire()
        except DataDirInUseError as e:
            if on_wait is not None:
                on_wait(e.holder_pid, e.holder_role)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except BaseException:
            os.close(fd)
            raise
        return self._own(fd)

    def _own(self, fd: int) -> DirLock:
        # Ours now: say who holds it. Truncate then write; a reader racing with this sees an
        # empty file and retries briefly (``_read_holder``).
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} {self.role}\n".encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        """Give the lock up (closing the file releases the flock)."""
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)

    def __enter__(self) -> DirLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    def _in_use_message(self, pid: int | None, role: str) -> str:
        holder = f"pid {pid}" if pid is not None else "a process whose pid could not be read"
        if role:
            holder = f"'ntk-unlearn {role}' ({holder})"
        return (
            f"{self.resource} is in use by {holder}, which holds the lock {self.path}. "
            "Stop that process first, or give this one its own --data-dir."
        )


def _read_holder(fd: int, attempts: int = 20) -> tuple[int | None, str]:
    """The ``(pid, role)`` a lock holder wrote, waiting briefly if it is still writing them."""
    for _ in range(attempts):
        text = os.pread(fd, 256, 0).decode(errors="replace").strip()
        if text:
            pid_text, _, role = text.partition(" ")
            try:
                return int(pid_text), role.strip()
            except ValueError:
                return None, ""
        time.sleep(0.01)
    return None, ""


def worker_lock(data_dir: Path, role: str) -> DirLock:
    """The lock of the one process that may apply forget jobs to ``data_dir`` (its worker).

    Arguments:
      data_dir: the data directory (checkpoints, deletion log).
      role: the holder's command, ``serve`` or ``worker``.
    """
    data_dir = Path(data_dir).absolute()
    return DirLock(
        data_dir / ".lock", role, f"the data directory {data_dir} (one solver worker per model)"
    )


def build_lock(data_dir: Path, role: str) -> DirLock:
    """The lock of the one process that builds version 0 in ``data_dir`` (taken with
    ``DirLock.acquire_waiting``: the others wait for that version instead of building their own).

    Arguments:
      data_dir: the data directory (checkpoints, NTK cache).
      role: the holder's command, ``serve`` or ``worker``.
    """
    data_dir = Path(data_dir).absolute()
    return DirLock(data_dir / ".build.lock", role, f"the first build in {data_dir}")
