"""One data dir, one owner: the locks of ``serve`` and ``worker``, and the port checked up front.

A second ``serve`` on a data dir in use must exit at once, naming the process in the way, and
must leave the running one (and its embedded Redis) alone.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis

from app import cli
from app.core.config import Settings
from app.embedded_redis import EmbeddedRedis
from app.locking import DataDirInUseError, worker_lock

ROOT = Path(__file__).resolve().parents[1]

# Holds the worker lock (argv[2] == "1") and runs the embedded Redis of data dir argv[1], as a
# live `serve` does; prints the Redis URL once both are held.
_HOLDER = """
import signal, sys, time
from pathlib import Path
from app.embedded_redis import EmbeddedRedis
from app.locking import worker_lock

data_dir = Path(sys.argv[1])
lock = worker_lock(data_dir, "serve").acquire() if sys.argv[2] == "1" else None
server = EmbeddedRedis(data_dir / "redis").start()
signal.signal(signal.SIGTERM, lambda *_: (server.stop(), sys.exit(0)))
print(server.url, flush=True)
while True:
    time.sleep(1)
"""


class Holder:
    """A process holding a data dir as a running ``serve`` would."""

    def __init__(self, data_dir: Path, with_worker: bool = True):
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _HOLDER, str(data_dir), "1" if with_worker else "0"],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        self.redis_url = self.proc.stdout.readline().strip()
        assert self.redis_url.startswith("unix://"), "the holder did not start"

    def redis_answers(self) -> bool:
        client = redis.Redis.from_url(self.redis_url, socket_timeout=2)
        try:
            return bool(client.ping())
        except redis.RedisError:
            return False
        finally:
            client.close()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(30)


@pytest.fixture
def holder(tmp_path: Path) -> Iterator[Callable[..., Holder]]:
    started: list[Holder] = []

    def start(with_worker: bool = True) -> Holder:
        started.append(Holder(tmp_path / "data", with_worker))
        return started[-1]

    yield start
    for h in started:
        h.stop()


@pytest.fixture(autouse=True)
def _keep_signal_handlers() -> Iterator[None]:
    """``serve`` and ``worker`` install SIGINT/SIGTERM handlers; give pytest its own back."""
    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    yield
    for s, handler in saved.items():
        signal.signal(s, handler)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def serve_settings(tmp_path: Path, dataset_file: Path) -> Callable[..., Settings]:
    def make(**overrides) -> Settings:
        fields = {
            "dataset": f"npz:{dataset_file}",
            "model": "linear",
            "loss": "mse",
            "data_dir": tmp_path / "data",
            "api_token": "t",
            "port": _free_port(),
            # Not the REDIS_URL of the test run: `serve` runs the data dir's embedded Redis.
            "redis_url": None,
            **overrides,
        }
        return Settings(**fields)

    return make


@pytest.fixture(autouse=True)
def _never_serve_http(monkeypatch) -> None:
    """A `serve` that gets past its checks would run until stopped: fail instead of hanging."""

    def refuse(app, sock, settings) -> None:
        raise AssertionError("serve started the HTTP server; it should have exited before")

    monkeypatch.setattr(cli, "_run_http", refuse)


def test_a_held_lock_names_its_holder_and_dies_with_it(tmp_path):
    h = Holder(tmp_path / "data")
    try:
        with pytest.raises(DataDirInUseError) as caught:
            worker_lock(tmp_path / "data", "worker").acquire()
        assert caught.value.holder_pid == h.proc.pid
        message = str(caught.value)
        assert str((tmp_path / "data").absolute()) in message
        assert f"pid {h.proc.pid}" in message and "ntk-unlearn serve" in message
        # Killed outright: the kernel releases the lock, no stale lock file to clean up.
        h.proc.kill()
        h.proc.wait(30)
        worker_lock(tmp_path / "data", "worker").acquire().release()
    finally:
        h.stop()


@pytest.mark.parametrize("with_worker", [True, False], ids=["serve", "serve-no-worker"])
def test_a_second_serve_exits_at_once_and_leaves_the_first_alone(
    holder, serve_settings, with_worker
):
    first = holder(with_worker=with_worker)
    data_dir = serve_settings().data_dir
    pidfile = data_dir / "redis" / "redis.pid"
    redis_pid = int(pidfile.read_text())
    started = time.monotonic()
    with pytest.raises(SystemExit) as caught:
        cli.serve(serve_settings(worker=with_worker))
    assert time.monotonic() - started < 5, "the second serve did not fail fast"
    message = str(caught.value)
    assert str(data_dir.absolute()) in message and f"pid {first.proc.pid}" in message
    # The first server's Redis is untouched: same process, still answering, socket in place.
    assert first.redis_answers()
    assert int(pidfile.read_text()) == redis_pid
    assert Path(first.redis_url.removeprefix("unix://")).exists()


def test_only_a_leftover_of_this_directory_is_stopped(tmp_path):
    """A pid file naming a live redis-server of another directory (a recycled pid, say) must
    not get that server stopped."""
    other = EmbeddedRedis(tmp_path / "other").start()
    try:
        assert other._proc is not None
        mine = tmp_path / "mine"
        mine.mkdir()
        (mine / "redis.pid").write_text(f"{other._proc.pid}\n")
        with EmbeddedRedis(mine):
            pass
        client = redis.Redis.from_url(other.url, socket_timeout=2)
        assert client.ping()
        client.close()
    finally:
        other.stop()


def test_a_taken_port_fails_before_the_model_or_redis(serve_settings):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        settings = serve_settings(port=port)
        started = time.monotonic()
        with pytest.raises(SystemExit) as caught:
            cli.serve(settings)
    assert time.monotonic() - started < 5
    message = str(caught.value)
    assert f"127.0.0.1:{port}" in message and "--port" in message
    # Nothing slow or lasting happened: no model built, no Redis started, no lock kept.
    assert not settings.checkpoint_dir.exists()
    assert not (settings.data_dir / "redis" / "redis.pid").exists()
    worker_lock(settings.data_dir, "worker").acquire().release()


def test_api_processes_without_worker_run_beside_a_worker(serve_settings, redis_url, monkeypatch):
    """`worker` + `serve --no-worker` on one data dir and a shared Redis is supported."""
    ran: list[Settings] = []
    monkeypatch.setattr(cli, "_run_http", lambda app, sock, settings: ran.append(settings))
    settings = serve_settings(redis_url=redis_url)
    with worker_lock(settings.data_dir, "worker"):
        cli.serve(settings.model_copy(update={"worker": False}))
        cli.serve(settings.model_copy(update={"worker": False}))
        assert len(ran) == 2
        # But no second worker: not inside `serve` ...
        with pytest.raises(SystemExit, match="one solver worker per model") as caught:
            cli.serve(settings)
        assert f"pid {os.getpid()}" in str(caught.value) and "ntk-unlearn worker" in str(
            caught.value
        )
        # ... nor alone.
        with pytest.raises(SystemExit, match="one solver worker per model"):
            cli.worker(settings)
    assert len(ran) == 2


def test_serve_no_worker_without_redis_url_says_no_worker_reads_its_redis(
    serve_settings, monkeypatch, caplog
):
    """Allowed (a later 'serve' with its worker applies the queued forgets), but said at start."""
    ran: list[Settings] = []
    monkeypatch.setattr(cli, "_run_http", lambda app, sock, settings: ran.append(settings))
    with caplog.at_level("WARNING", logger="ntk_unlearn"):
        cli.serve(serve_settings(worker=False))
    assert len(ran) == 1
    warned = [m for m in caplog.messages if m.startswith("serve --no-worker without REDIS_URL")]
    assert len(warned) == 1 and "stay queued" in warned[0] and ran[0].redis_url in warned[0]


def test_a_redis_that_does_not_answer_is_said_before_the_model_loads(
    serve_settings, monkeypatch, caplog
):
    """Not fatal (the worker retries), but said at once, not after the model load."""
    from app import service

    def load_model(settings, role="api"):
        raise SystemExit("stopped at the model load")

    monkeypatch.setattr(service, "load_model", load_model)
    settings = serve_settings(redis_url="redis://127.0.0.1:1/0")
    for run, who in ((cli.worker, "worker"), (cli.serve, "serve")):
        caplog.clear()
        if who == "serve":
            settings = settings.model_copy(update={"worker": False})
        with caplog.at_level("WARNING", logger="ntk_unlearn"):
            with pytest.raises(SystemExit, match="stopped at the model load"):
                run(settings)
        warned = [m for m in caplog.messages if "the Redis of REDIS_URL does not answer" in m]
        assert len(warned) == 1 and warned[0].startswith(f"{who}:"), caplog.messages
        assert "127.0.0.1:1" in warned[0]


def test_a_worker_serves_its_metrics_on_the_port_given(
    serve_settings, redis_url, redis_prefix, monkeypatch
):
    """`worker --metrics-port`: its job, solve and model metrics and the queue's gauges, on a
    port of its own (a lone worker has no API port); a taken port fails before the model."""
    import httpx

    from app import service

    port = _free_port()
    settings = serve_settings(redis_url=redis_url, metrics_port=port, redis_prefix=redis_prefix)
    scraped: list[str] = []
    real_make = service.make_worker

    def make_worker(settings, u, queue, metrics):
        w = real_make(settings, u, queue, metrics)

        def run() -> None:  # one job, then the metrics as Prometheus would read them
            queue.ensure_group()
            w.recover()
            queue.enqueue(["r01"])
            w.run_once()
            scraped.append(httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text)

        w.run = run
        return w

    monkeypatch.setattr(service, "make_worker", make_worker)
    cli.worker(settings)
    text = scraped[0]
    assert 'ntk_unlearn_forget_jobs_total{status="succeeded"} 1.0' in text, text
    assert "ntk_unlearn_model_version 1.0" in text
    assert "ntk_unlearn_queue_jobs 0.0" in text and "ntk_unlearn_worker_up " in text
    with pytest.raises(httpx.TransportError):  # stopped with the worker
        httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=2)

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = busy.getsockname()[1]
        started = time.monotonic()
        with pytest.raises(SystemExit, match=f"127.0.0.1:{taken}.*--metrics-port"):
            cli.worker(settings.model_copy(update={"metrics_port": taken}))
        assert time.monotonic() - started < 5
    worker_lock(settings.data_dir, "worker").acquire().release()  # released on the way out


def test_serve_no_worker_without_redis_url_beside_a_worker_exits_at_once(serve_settings):
    """A worker holds the data dir (with its own Redis): a `serve --no-worker` without REDIS_URL
    would start a private Redis that worker never reads. Refused at once, naming the worker,
    before a token is generated (a user would read a token no running API accepts)."""
    settings = serve_settings(worker=False, api_token=None)
    with worker_lock(settings.data_dir, "worker"):
        started = time.monotonic()
        with pytest.raises(SystemExit) as caught:
            cli.serve(settings)
        assert time.monotonic() - started < 5
    message = str(caught.value)
    assert f"pid {os.getpid()}" in message and "'ntk-unlearn worker'" in message
    assert "set REDIS_URL" in message
    assert not (settings.data_dir / "redis" / "redis.pid").exists()  # no private Redis started
    assert not settings.generated_token_file.exists()
