"""The embedded Redis is started without a ``preexec_fn`` (so ``subprocess`` can use ``vfork``,
which runs no ``pthread_atfork`` handler: OpenBLAS's can deadlock a ``fork()`` taken while a BLAS
call runs in another thread), and it still dies with the process that started it."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import redis

from app import embedded_redis
from app.embedded_redis import EmbeddedRedis

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux only")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie is dead for our purpose
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"
    except OSError:
        return False


def test_started_without_preexec_fn(tmp_path, monkeypatch):
    calls = []
    real = subprocess.Popen

    def spy(cmd, **kwargs):
        calls.append((list(cmd), dict(kwargs)))
        return real(cmd, **kwargs)

    embedded_redis._setpriv_with_pdeathsig()  # its probe (once per process) is not spied
    monkeypatch.setattr(embedded_redis.subprocess, "Popen", spy)
    with EmbeddedRedis(tmp_path / "r") as server:
        assert redis.Redis.from_url(server.url).ping()
    ((cmd, kwargs),) = calls
    assert kwargs.get("preexec_fn") is None, "a preexec_fn forces fork(): see the module docstring"
    assert kwargs.get("start_new_session") is True
    if shutil.which("setpriv"):
        assert cmd[:3] == [shutil.which("setpriv"), "--pdeathsig", "TERM"]
        assert os.path.basename(cmd[3]).startswith("redis-server")


@pytest.mark.skipif(shutil.which("setpriv") is None, reason="needs util-linux setpriv")
def test_server_dies_with_its_killed_owner(tmp_path):
    """SIGKILL of the owning process (no handler runs): the death signal stops its server."""
    code = (
        "import sys, time\n"
        "from pathlib import Path\n"
        "from app.embedded_redis import EmbeddedRedis\n"
        "s = EmbeddedRedis(Path(sys.argv[1])).start()\n"
        "print(Path(s.pidfile).read_text().strip() if Path(s.pidfile).exists() else s._proc.pid,"
        " flush=True)\n"
        "time.sleep(600)\n"
    )
    owner = subprocess.Popen(
        [sys.executable, "-c", code, str(tmp_path / "r")],
        stdout=subprocess.PIPE,
        text=True,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    )
    try:
        pid = int(owner.stdout.readline())
        assert _alive(pid)
        owner.send_signal(signal.SIGKILL)
        owner.wait(10)
        deadline = time.monotonic() + 20
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _alive(pid), "redis-server outlived its killed owner"
    finally:
        owner.kill()
        owner.wait()


@pytest.mark.parametrize("accepts", [True, False])
def test_a_setpriv_without_pdeathsig_is_not_used(tmp_path, monkeypatch, accepts):
    """util-linux before 2.33 has a ``setpriv`` that refuses ``--pdeathsig``: the server is then
    started without it (no death signal) instead of failing to start."""
    fake = tmp_path / "bin" / "setpriv"
    fake.parent.mkdir()
    refuse = "" if accepts else 'echo "setpriv: unrecognized option --pdeathsig" >&2; exit 1'
    fake.write_text(f'#!/bin/sh\n{refuse}\nshift 3\nexec "$@"\n')
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake.parent}{os.pathsep}{os.environ['PATH']}")
    embedded_redis._setpriv_with_pdeathsig.cache_clear()
    try:
        cmd = embedded_redis._with_parent_death_signal(["redis-server", "--port", "0"])
    finally:
        embedded_redis._setpriv_with_pdeathsig.cache_clear()
    expected = ["redis-server", "--port", "0"]
    assert cmd == ([str(fake), "--pdeathsig", "TERM", *expected] if accepts else expected)


def test_a_server_that_exits_is_started_again_until_stopped(tmp_path, caplog):
    """With appendfsync always the server exits at the first failed append (a full disk) and
    stayed gone: every forget 503 after the disk had room again. The owner's watch starts it
    again (the queue's data kept: the same append-only file), and never after ``stop``."""
    import logging

    server = EmbeddedRedis(tmp_path / "r").start()
    try:
        server.watch(interval_s=0.05)
        client = redis.Redis.from_url(server.url, socket_timeout=2)
        client.set("queued", "a forget")
        first = server._proc.pid
        with caplog.at_level(logging.CRITICAL, logger="app.embedded_redis"):
            os.kill(first, signal.SIGKILL)
            deadline = time.monotonic() + 30
            while server.restarts < 1 and time.monotonic() < deadline:
                time.sleep(0.05)
        assert server.restarts == 1 and server._proc.pid != first
        assert client.get("queued") == b"a forget"  # its append-only file read back
        assert any("the embedded Redis exited" in m for m in caplog.messages)
    finally:
        server.stop()
    last = server.restarts
    time.sleep(0.3)
    assert server.restarts == last and server._proc is None  # stopped stays stopped
