"""A follower's checkpoint reads, made in a child process.

Reading a version's checkpoint is orbax's Python work (an asyncio loop, its own threads, JSON and
tensorstore calls): 53–133 ms of CPU per digits version, during which another thread of the
API process waited for the GIL up to 19 ms at a stretch (``ntk-unlearn bench follow-read``,
BENCHMARKS.md), and every request in flight waits. A ``CheckpointReader`` makes the same read
(``service_core.checkpoint.read_newer``) in one long-lived child process (``python -m app.reader``)
and hands back its result, metadata and numpy arrays, to be made a state here
(``checkpoint.state_from_read``): this process only waits on a pipe (the GIL released) and
unpickles a few megabytes.

The child reads only files the worker wrote: it holds no model and nothing the checkpoint on
disk does not hold, and it ends when its standard input closes (this process ended, even by
SIGKILL). When it cannot be started, dies, answers garbage or does not answer in time, the read
is made in this process, as without it, and a new child is started for the next read.

The protocol, on the child's standard input and output: a request is a pickled
``(directory, version)``, an answer a pickled ``(True, result)`` or ``(False, exception)``, each
preceded by its length (8 bytes, big-endian).
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
from pathlib import Path

log = logging.getLogger(__name__)

_LENGTH = 8


class ReaderFailed(Exception):
    """The child process died, closed its pipe, answered garbage or ran out of time."""


class CheckpointReader:
    """``reader(directory, version)``: ``checkpoint.read_newer(directory, version)`` made in a child
    process, or here when that fails (``ReaderFailed``). One read at a time.

    Arguments:
      timeout_s: the longest a read waits for the child before it is read here instead (the
        child is then killed, and another started for the next read).
      command: the child's command line (tests start a misbehaving one).
    """

    def __init__(self, timeout_s: float = 30.0, command: list[str] | None = None):
        self.timeout_s = timeout_s
        self.command = command or [sys.executable, "-m", "app.reader"]
        self._child: subprocess.Popen | None = None
        self._lock = threading.Lock()
        self._stopped = False
        self.in_child = 0  # reads the child made
        self.here = 0  # reads made in this process because the child failed

    def start(self) -> None:
        """Start the child now (its imports take seconds of its own CPU), not at the first read."""
        with self._lock:
            self._ensure_child()

    def _ensure_child(self) -> subprocess.Popen | None:
        if self._stopped:
            return None
        if self._child is None or self._child.poll() is not None:
            try:
                self._child = subprocess.Popen(
                    self.command,
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    cwd=Path(__file__).resolve().parent.parent,
                )
            except OSError as e:
                log.warning("checkpoint reads stay in this process: no child process (%s)", e)
                self._child = None
        return self._child

    def __call__(self, directory: Path, version: int):
        """``checkpoint.read_newer(directory, version)``; raises what it raises."""
        from service_core import checkpoint

        with self._lock:
            child = self._ensure_child()
            if child is not None:
                try:
                    ok, value = self._ask(child, (str(Path(directory).absolute()), int(version)))
                except ReaderFailed as e:
                    if not self._stopped:
                        log.warning("the checkpoint reader process failed (%s); reading here", e)
                    _kill(child)
                    self._child = None
                else:
                    self.in_child += 1
                    if ok:
                        return value
                    raise value
            self.here += 1
        return checkpoint.read_newer(directory, version)

    def _ask(self, child: subprocess.Popen, request) -> tuple[bool, object]:
        deadline = time.monotonic() + self.timeout_s
        try:
            _send(child.stdin, request)
            size = int.from_bytes(_read(child.stdout, _LENGTH, deadline), "big")
            return pickle.loads(_read(child.stdout, size, deadline))
        except (OSError, ValueError, EOFError, pickle.UnpicklingError, TypeError) as e:
            raise ReaderFailed(f"{type(e).__name__}: {e}") from e

    def stop(self) -> None:
        """End the child."""
        self._stopped = True
        child, self._child = self._child, None
        if child is not None:
            _kill(child)


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
    """The child: answer read requests until standard input closes."""
    import signal

    # A terminal's Ctrl-C reaches the whole process group: the parent decides when this ends
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    from service_core import checkpoint

    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    sys.stdout = sys.stderr  # nothing but answers on the pipe
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


if __name__ == "__main__":
    main()
