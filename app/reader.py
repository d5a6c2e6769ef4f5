"""A follower's checkpoint reads, made in a child process.

Reading a version's checkpoint is orbax's Python work (an asyncio loop, its own threads, JSON and
tensorstore calls): 53–133 ms of CPU per digits version, during which another thread of the
API process waited for the GIL up to 19 ms at a stretch (``ntk-unlearn bench follow-read``,
BENCHMARKS.md), and every request in flight waits. A ``CheckpointReader`` makes the same read
(``service_core.checkpoint.read_newer``) in one long-lived child process (``python -m app.reader``)
and hands back its result, metadata and numpy arrays, to be made a state here
(``checkpoint.state_from_read``): this process only waits on a pipe (the GIL released) and
unpickles a few megabytes.

The child reads only files the worker wrote and holds no model; like the API process, its
memory may keep freed copies of arrays it read (rows of records forgotten since) until the memory
is reused. It ends when its standard input closes or its parent ends (the kernel kills it then,
``PR_SET_PDEATHSIG``, even stopped: the signal follows the thread that started it, so every child
is started from one thread that lives as long as the ``CheckpointReader``); it ignores SIGINT and SIGTERM sent to the process group, so a
stop of the service stops it through its parent. When it cannot be started, dies, answers
garbage or does not answer in time (``CheckpointReader.timeout``), the read is made in this
process, as without it, and a new child is started at once.

The protocol, on the child's standard input and output: the child first sends ``(True, READY)``;
a request is a pickled ``(directory, version)``, an answer a pickled ``(True, result)`` or
``(False, exception)``, each preceded by its length (8 bytes, big-endian).
"""

from __future__ import annotations

import logging
import os
import pickle
import select
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

log = logging.getLogger(__name__)

_LENGTH = 8
READY = "ready"  # the child's first message, once its imports are done


class ReaderFailed(Exception):
    """The child process died, closed its pipe, answered garbage or ran out of time."""


class CheckpointReader:
    """``reader(directory, version)``: ``checkpoint.read_newer(directory, version)`` made in a child
    process, or here when the child is not ready or fails (``ReaderFailed``). One read at a time.

    The child says when its imports are done (a first message, ``READY``); until then reads are
    made here, so no read waits for a child's start. A child that fails is killed and another
    started at once, in the background.

    Arguments:
      timeout_s: the longest a read waits for the child before it is killed and the read made
        here. ``None`` (default): five times the slowest read the child has made so far, at
        least ``min_timeout_s`` and at most ``max_timeout_s`` (before its first: ``max_timeout_s``):
        a child stopped or stuck costs seconds, not a fixed 30 s of 503s (found by a break-it
        round, 2026-12-03).
      command: the child's command line (tests start a misbehaving one).
    """

    def __init__(
        self,
        timeout_s: float | None = None,
        command: list[str] | None = None,
        min_timeout_s: float = 2.0,
        max_timeout_s: float = 10.0,
    ):
        self.timeout_s = timeout_s
        self.min_timeout_s, self.max_timeout_s = min_timeout_s, max_timeout_s
        self.command = command or [sys.executable, "-m", "app.reader"]
        self._child: subprocess.Popen | None = None
        self._ready = False  # the current child has said READY
        self._started = 0.0  # when the current child was started (monotonic)
        self._told_slow = False  # a child slow to start was logged
        self._slowest = 0.0  # the slowest read the child made (s)
        self._lock = threading.Lock()
        self._spawn: ThreadPoolExecutor | None = None  # the thread children are started from
        self._stopped = False
        self.in_child = 0  # reads the child made
        self.here = 0  # reads made in this process (child not ready, or failed)

    def start(self) -> None:
        """Start the child now (its imports take seconds of its own CPU), not at the first read."""
        with self._lock:
            self._ensure_child()

    def ready(self, wait_s: float = 0.0) -> bool:
        """Whether the child has said READY, waiting up to ``wait_s`` seconds for it (``False``:
        none running, not ready in time, or it failed: then it is replaced)."""
        deadline = time.monotonic() + wait_s
        while True:
            with self._lock:
                child = self._ensure_child()
                if child is None:
                    return False
                try:
                    if self._is_ready(child):
                        return True
                except (ReaderFailed, OSError) as e:
                    _kill(child)
                    self._child = None
                    log.warning("the checkpoint reader process failed (%s)", e)
                    return False
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.02)

    def timeout(self) -> float:
        """Seconds the next read may wait for the child."""
        if self.timeout_s is not None:
            return self.timeout_s
        if not self._slowest:
            return self.max_timeout_s
        return min(self.max_timeout_s, max(self.min_timeout_s, 5 * self._slowest))

    def _ensure_child(self) -> subprocess.Popen | None:
        if self._stopped:
            return None
        if self._child is not None and self._child.poll() is not None:
            log.warning(
                "the checkpoint reader process ended (exit status %s); starting another (reads "
                "are made here until it is ready)",
                self._child.returncode,
            )
        if self._child is None or self._child.poll() is not None:
            self._ready, self._told_slow = False, False
            self._started = time.monotonic()
            try:
                # From the reader's own thread: the child's death signal (PR_SET_PDEATHSIG) comes
                # when the *thread* that started it ends, and the API's start-up runs on a worker
                # thread of anyio's pool, which ends after 10 s idle: the first child was killed
                # at a random moment, mid-run (found in the load bench, 2026-12-05).
                self._child = (
                    self._spawner()
                    .submit(
                        subprocess.Popen,
                        [*self.command, str(os.getpid())],
                        stdin=subprocess.PIPE,
                        stdout=subprocess.PIPE,
                        cwd=Path(__file__).resolve().parent.parent,
                    )
                    .result()
                )
            except (OSError, RuntimeError) as e:  # RuntimeError: the spawner was shut down
                log.warning("checkpoint reads stay in this process: no child process (%s)", e)
                self._child = None
        return self._child

    def _spawner(self) -> ThreadPoolExecutor:
        """The one thread every child is started from. A ``ThreadPoolExecutor``'s thread lives
        until the executor is shut down (``stop``), so no child dies with the thread that
        happened to start it."""
        if self._spawn is None:
            self._spawn = ThreadPoolExecutor(1, thread_name_prefix="checkpoint-reader-spawn")
        return self._spawn

    def _is_ready(self, child: subprocess.Popen) -> bool:
        """Whether ``child`` has said READY (read without waiting). Raises ``ReaderFailed``."""
        if self._ready:
            return True
        if not select.select([child.stdout.fileno()], [], [], 0)[0]:
            if not self._told_slow and time.monotonic() - self._started > 60:
                self._told_slow = True
                log.warning("the checkpoint reader process is not ready after 60 s; reading here")
            return False
        if self._answer(child, time.monotonic() + 5) != (True, READY):
            raise ReaderFailed("it did not start as a checkpoint reader")
        self._ready = True
        return True

    def __call__(self, directory: Path, version: int):
        """``checkpoint.read_newer(directory, version)``; raises what it raises. ``None`` (nothing
        newer) once ``stop`` has been called."""
        from service_core import checkpoint

        with self._lock:
            child = self._ensure_child()
            error: BaseException | None = None
            if child is not None:
                try:
                    if self._is_ready(child):
                        started = time.monotonic()
                        _send(child.stdin, (str(Path(directory).absolute()), int(version)))
                        ok, value = self._answer(child, started + self.timeout())
                        self._slowest = max(self._slowest, time.monotonic() - started)
                        self.in_child += 1
                        if ok:
                            return value
                        # the read's own error (a pruned step: FileNotFoundError), raised
                        # outside this ``try``: it is not the child failing
                        error = value
                except (ReaderFailed, OSError) as e:
                    _kill(child)
                    self._child = None
                    if self._stopped:
                        return None  # stopping: no read is wanted any more
                    log.warning("the checkpoint reader process failed (%s); reading here", e)
                    self._ensure_child()  # the next one starts now, not at the next read
                else:
                    if error is not None:
                        raise error
            self.here += 1
        return checkpoint.read_newer(directory, version)

    def _answer(self, child: subprocess.Popen, deadline: float) -> tuple[bool, object]:
        try:
            size = int.from_bytes(_read(child.stdout, _LENGTH, deadline), "big")
            answer = pickle.loads(_read(child.stdout, size, deadline))
        except (OSError, ValueError, EOFError, pickle.UnpicklingError, TypeError) as e:
            raise ReaderFailed(f"{type(e).__name__}: {e}") from e
        if not (isinstance(answer, tuple) and len(answer) == 2):
            raise ReaderFailed(f"an answer of type {type(answer).__name__}")
        return answer

    def stop(self) -> None:
        """End the child; a read waiting for it returns ``None`` at once."""
        self._stopped = True
        child, self._child = self._child, None
        if child is not None:
            _kill(child)
        if self._spawn is not None:
            self._spawn.shutdown(wait=False)


def _send(stream, message) -> None:
    data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    stream.write(len(data).to_bytes(_LENGTH, "big") + data)
    stream.flush()


def _read(stream, size: int, deadline: float | None) -> bytes:
    """``size`` bytes of ``stream`` (a pipe), or ``ReaderFailed`` at EOF or past ``deadline``."""
    fd = stream.fileno()
    parts, got = [], 0
    while got < size:
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                raise ReaderFailed("no answer in time")
        part = os.read(fd, min(size - got, 1 << 20))
        if not part:
            raise ReaderFailed("the reader process closed its pipe")
        parts.append(part)
        got += len(part)
    return b"".join(parts)


def _kill(child: subprocess.Popen) -> None:
    for stream in (child.stdin, child.stdout):
        try:
            stream.close()
        except OSError:
            pass
    try:
        child.kill()
        child.wait(5)
    except (OSError, subprocess.TimeoutExpired):
        pass


def main() -> None:
    """The child: say READY, then answer read requests until standard input closes or the
    parent ends (argument: the parent's pid)."""
    import signal

    parent = int(sys.argv[1]) if len(sys.argv) > 1 else None
    _die_with_parent(parent)
    # A terminal's Ctrl-C and a service manager's SIGTERM reach the whole process group: the
    # parent decides when this ends (it closes the pipe, or dies: SIGKILL above)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    quiet_closed_loop_errors()
    from service_core import checkpoint

    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    sys.stdout = sys.stderr  # nothing but answers on the pipe
    try:
        _send(stdout, (True, READY))
        while True:
            head = stdin.read(_LENGTH)
            if len(head) < _LENGTH:
                return  # the parent ended
            directory, version = pickle.loads(stdin.read(int.from_bytes(head, "big")))
            try:
                answer = (True, checkpoint.read_newer(Path(directory), version))
            except Exception as e:  # noqa: BLE001 — handed to the parent, which raises it
                answer = (False, e)
            try:
                _send(stdout, answer)
            except (pickle.PicklingError, TypeError, AttributeError) as e:
                _send(stdout, (False, RuntimeError(f"checkpoint read failed: {e!r}")))
    except (BrokenPipeError, ConnectionResetError):
        return  # the parent ended while this read: nobody to answer


def quiet_closed_loop_errors() -> None:
    """Stop a failed checkpoint read from printing a traceback per read on stderr.

    When orbax's read of a damaged checkpoint fails, tensorstore completes the read's other
    futures later, and their callbacks try to wake orbax's asyncio loop, already closed: each
    raises ``RuntimeError('Event loop is closed')``, which Python hands to
    ``sys.unraisablehook``, whose default prints it (a follower retrying a truncated step printed
    about five a second, without timestamps; the read's own error is logged). This hook logs
    those at DEBUG and hands every other unraisable exception to the hook it replaces.
    Idempotent."""
    previous = sys.unraisablehook
    if getattr(previous, "_ntk_unlearn", False):
        return

    def hook(unraisable) -> None:
        exc = unraisable.exc_value
        if isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed":
            log.debug("a late callback of a failed read met its closed event loop")
            return
        previous(unraisable)

    hook._ntk_unlearn = True  # type: ignore[attr-defined]
    sys.unraisablehook = hook


def _die_with_parent(parent: int | None) -> None:
    """Have the kernel SIGKILL this process when its parent ends, even while it is stopped
    (Linux ``PR_SET_PDEATHSIG``; elsewhere nothing); exit now if the parent is already gone."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, 9)  # PR_SET_PDEATHSIG, SIGKILL
    except (OSError, AttributeError):
        pass
    if parent is not None and os.getppid() != parent:
        sys.exit(0)


if __name__ == "__main__":
    main()
