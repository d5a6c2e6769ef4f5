"""``ntk-unlearn``: ``serve`` (API and worker), ``worker`` (worker alone), ``bench``.

Every ``Settings`` field is a flag (``lam`` → ``--lam``, ``w_std`` → ``--w-std``, booleans as
``--refine/--no-refine``); a flag overrides its ``NTK_UNLEARN_*`` variable, which overrides the
default.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import logging
import math
import os
import re
import signal
import socket
import sys
import tempfile
import time
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

if (
    typing.TYPE_CHECKING
):  # imported where used: the huge-page re-exec comes first, before pydantic (~0.6 s)
    from .core.config import Settings

log = logging.getLogger("ntk_unlearn")

# Flags that mean nothing to a lone worker.
_SERVE_ONLY = {
    "host",
    "port",
    "api_token",
    "api_token_file",
    "read_token",
    "read_token_file",
    "open_reads",
    "worker",
    "follow_wait_s",
    "follow_preconditioner",
    "follow_reader_process",
    "predict_batch_wait_ms",
    "max_rows",
    "max_exact_self_influence",
    "max_exact_attribution",
    "max_body_bytes",
    "large_body_bytes",
    "max_large_bodies",
    "redis_timeout_s",
    "redis_retry_s",
}
# Flags that mean nothing to 'serve' (its metrics are on its API port).
_WORKER_ONLY = {"metrics_port", "metrics_host"}
# What uvicorn exits with when the app fails to start.
_STARTUP_FAILURE = 3


def _flag_type(annotation: Any) -> Any:
    """The annotation without ``| None``."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return annotation


def add_settings_flags(parser: argparse.ArgumentParser, skip: set[str] = frozenset()) -> None:
    """One flag per ``Settings`` field; a flag not given leaves the field to env and default."""
    from .core.config import Settings

    for name, field in Settings.model_fields.items():
        if name in skip:
            continue
        flag = "--" + name.replace("_", "-")
        env = f"NTK_UNLEARN_{name.upper()}"
        if name == "redis_url":
            env = f"REDIS_URL or {env}"
        shown = "" if field.default is None else f"default: {field.default}; "
        help_text = f"{field.description} ({shown}env {env})"
        kwargs: dict[str, Any] = {"dest": name, "default": argparse.SUPPRESS, "help": help_text}
        kind = _flag_type(field.annotation)
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, **kwargs)
        elif typing.get_origin(kind) is Literal:
            choices = typing.get_args(kind)
            parser.add_argument(flag, choices=choices, type=type(choices[0]), **kwargs)
        else:
            # paths as given: pydantic makes them Paths (Path("") would be ".", the working dir)
            parser.add_argument(flag, type=kind if kind in (int, float) else str, **kwargs)


def _version() -> str:
    """The installed distribution's version, else the source tree's (not installed)."""
    from importlib import metadata

    try:
        return metadata.version("ntk-unlearn")
    except metadata.PackageNotFoundError:
        return "(source tree, not installed)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ntk-unlearn",
        description="Machine unlearning service for linearised networks (or, with --nonlinear, "
        "for the nonlinear network trained with the proximal regulariser).",
    )
    parser.add_argument("--version", action="version", version=f"ntk-unlearn {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the HTTP API and the solver worker")
    add_settings_flags(serve, skip=_WORKER_ONLY)
    worker = sub.add_parser(
        "worker", help="run a solver worker alone, beside 'serve --no-worker' API processes"
    )
    add_settings_flags(worker, skip=_SERVE_ONLY)
    sub.add_parser(
        "verify-receipt",
        help="check a deletion receipt offline (see 'ntk-unlearn verify-receipt --help')",
    )
    bench = sub.add_parser("bench", help="run the benchmarks (see 'ntk-unlearn bench --help')")
    bench.add_argument("args", nargs=argparse.REMAINDER, help="arguments of the benchmarks")
    return parser


def _settings(args: argparse.Namespace) -> Settings:
    from pydantic import ValidationError

    from .core.config import Settings

    overrides = {k: v for k, v in vars(args).items() if k in Settings.model_fields}
    try:
        return Settings(**overrides)
    except ValidationError as e:
        problems = "; ".join(_setting_problem(err, overrides) for err in e.errors())
        raise SystemExit(f"ntk-unlearn: invalid settings: {problems}") from None


def _setting_problem(err: dict, overrides: dict) -> str:
    """One pydantic error in the words of the command line: the flag and the value given
    (``--lam nan: Input should be greater than 0``), or the setting's name when it came from the
    environment; a check of several settings says only its own message."""
    message = err["msg"].removeprefix("Value error, ").removeprefix("Assertion failed, ")
    loc = [str(part) for part in err["loc"]]
    if not loc:
        return message
    name = loc[0]
    if overrides.get(name) is not None:
        return f"--{name.replace('_', '-')} {overrides[name]}: {message}"
    given = f" {err['input']!r}" if isinstance(err.get("input"), str | int | float) else ""
    return f"setting {'.'.join(loc)} (env NTK_UNLEARN_{name.upper()}{given}): {message}"


def _with_tokens(settings: Settings) -> Settings:
    """Settings with their tokens: from ``--api-token-file`` / ``--read-token-file`` when given,
    and a write token in any case (the flag's or the env's, else one kept in the data dir).

    Raises:
      SystemExit: a token given both ways, or a token file that cannot be read or is empty.
    """
    from .core.security import ensure_token_file

    updates = {}
    for name in ("api_token", "read_token"):
        path = getattr(settings, f"{name}_file")
        if path is None:
            continue
        flag = "--" + name.replace("_", "-")
        if getattr(settings, name):
            raise SystemExit(
                f"ntk-unlearn: {flag} (or NTK_UNLEARN_{name.upper()}) and {flag}-file both "
                "given: give one"
            )
        try:
            token = Path(path).read_text().strip()
        except OSError as e:
            raise SystemExit(f"ntk-unlearn: cannot read {flag}-file {path}: {e.strerror}") from None
        if not token:
            raise SystemExit(f"ntk-unlearn: {flag}-file {path} is empty: write the token in it")
        if Path(path).stat().st_mode & 0o077:
            log.warning("%s is readable by others than its owner: chmod 600 it", path)
        updates[name] = token
    settings = settings.model_copy(update=updates)
    if settings.api_token:
        return settings
    token, created = ensure_token_file(settings.generated_token_file)
    log.info(
        "write token %s %s (mode 0600); send it as 'Authorization: Bearer <token>'",
        "generated in" if created else "read from",
        settings.generated_token_file,
    )
    return settings.model_copy(update={"api_token": token})


def _private_data_dir(settings: Settings, command: str) -> None:
    """Make what this process writes its owner's alone: files 0600 and directories 0700
    (umask 077: checkpoints, NTK cache, deletion log, token, the embedded Redis's files), and
    the data directory itself 0700 even if it existed with wider rights."""
    os.umask(0o077)
    data_dir = settings.data_dir
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
        mode = data_dir.stat().st_mode
    except FileExistsError:
        raise SystemExit(
            f"ntk-unlearn {command}: --data-dir {data_dir} exists and is not a directory: name "
            "a directory"
        ) from None
    except OSError as e:
        raise SystemExit(
            f"ntk-unlearn {command}: --data-dir {data_dir}: cannot create or read it "
            f"({e.strerror or e}): name a directory this user can write"
        ) from None
    try:  # the locks, tokens and files come next: a directory that takes no file says so here
        probe = tempfile.NamedTemporaryFile(dir=data_dir, prefix=".write-probe-")
        probe.close()
    except OSError as e:
        raise SystemExit(
            f"ntk-unlearn {command}: --data-dir {data_dir}: cannot write in it "
            f"({e.strerror or e}): name a directory this user can write"
        ) from None
    if mode & 0o077:
        try:
            data_dir.chmod(0o700)
            log.info("data directory %s made private (mode 0700)", data_dir)
        except OSError as e:
            log.warning("cannot make the data directory %s private: %s", data_dir, e)


class _Signalled(SystemExit):
    """SIGTERM or SIGINT: unwind (stopping the embedded Redis, releasing locks), then exit 0."""


def _exit_after_shutdown(signum: int, frame: Any) -> None:
    raise _Signalled(0)


def _exit_now() -> typing.NoReturn:
    """Exit 0 at once, once everything this process holds is released. Skips the interpreter's
    own teardown, which waits for the XLA computation in flight, if any (seconds mid-build)."""
    log.info("stopped by a signal")
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        if stream is not None:
            stream.flush()
    os._exit(0)


def _stop_on_signal(release: typing.Callable[[], None]) -> None:
    """Until the next ``signal.signal``, SIGTERM and SIGINT call ``release`` and exit at once.

    For loading the model (minutes for a first build): an exception raised from a handler is
    lost when the signal arrives inside a garbage-collection callback (JAX has one), so this
    handler does the work itself rather than raise.
    """

    def stop(signum: int, frame: Any) -> None:
        log.info("signal %d while loading the model: stopping", signum)
        release()
        _exit_now()

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, stop)


def bind_http_socket(host: str, port: int) -> socket.socket:
    """A socket bound to ``host:port`` for uvicorn, or a clear exit if that port is taken.

    Done before anything slow (restoring or building the model can take minutes), so that a
    port in use fails at once rather than after the model load. Bound as uvicorn would bind it
    (``SO_REUSEADDR``, so a restart is not held up by connections in TIME_WAIT), but not yet
    listening: until the model is loaded, connections are refused rather than left waiting.

    Raises:
      SystemExit: the address cannot be bound (in use, not a local address, ...).
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP named, not 0: asyncio turns Nagle's algorithm off (TCP_NODELAY) only on
    # sockets that say they are TCP, and accepted connections inherit the listener's protocol.
    # With Nagle on, a response written in two parts (headers, then body) waited for the
    # client's delayed ACK: 40 ms per request (21 requests/s on one connection, /healthz too).
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise SystemExit(
            f"ntk-unlearn serve: cannot listen on {host}:{port} ({e.strerror or e}): another "
            "process may be using that port; stop it or choose another one with --port "
            "(env NTK_UNLEARN_PORT)"
        ) from None
    return sock


def http_url(host: str, port: int) -> str:
    """The base URL of a listening address: ``http://127.0.0.1:8000``, ``http://[::1]:8000``."""
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def _run_http(app: Any, sock: socket.socket, settings: Settings) -> None:
    """Serve ``app`` on the bound ``sock`` with uvicorn until it shuts down.

    Raises:
      SystemExit: the app failed to start (uvicorn has logged why).
    """
    import uvicorn

    async def quiet_forced_exit(scope: dict, receive: Any, send: Any) -> None:
        # A second signal makes uvicorn exit without the application's shutdown: the lifespan
        # task, cancelled then, reported its CancelledError as a 40-line traceback at ERROR.
        if scope["type"] != "lifespan":
            return await app(scope, receive, send)

        async def reported(message: dict) -> None:
            if message["type"] == "lifespan.shutdown.failed" and server.force_exit:
                log.warning("forced exit (a second signal): requests in flight were not waited for")
                message = {"type": message["type"]}
            await send(message)

        await app(scope, receive, reported)

    # uvloop's event loop and httptools' HTTP parser (uvicorn's own "standard" choice) rather
    # than asyncio's loop and pure-Python h11: less of the one event loop's time per request.
    config = uvicorn.Config(
        quiet_forced_exit,
        host=settings.host,
        port=settings.port,
        log_config=None,
        loop="uvloop",
        http="httptools",
    )
    draining = getattr(getattr(app, "state", None), "service", None)
    draining = getattr(draining, "draining", None)

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:
            # The graceful shutdown begins: heavy reads still waiting for a thread are answered
            # 503 now (app.api.heavy) instead of holding the shutdown behind a computation.
            super().handle_exit(sig, frame)
            if draining is not None:
                draining.begin()

        async def startup(self, sockets: list[socket.socket] | None = None) -> None:
            await super().startup(sockets)
            if self.started:  # uvicorn says nothing of sockets it was handed: say it here
                log.info("listening on %s (API docs at /docs)", http_url(*sock.getsockname()[:2]))

    server = Server(config)
    # Everything loaded so far (the model, JAX, the app: ~190,000 objects) lives as long as the
    # process: out of the collector's sight, a full collection no longer walks it. Before this,
    # each one held every request up for 0.1-0.5 s (the p99 of /v1/predict under load). What the
    # app's start-up makes next is frozen at its end (app.main._freeze_startup_heap).
    gc.collect()
    gc.freeze()
    server.run(sockets=[sock])
    if not server.started:
        raise SystemExit(_STARTUP_FAILURE)


def nice_autogroup(autogroup: Path = Path("/proc/self/autogroup")) -> int | None:
    """Give this process's autogroup the nice value the process was started with, when the
    process leads its session (the group is its own), and return that value (``None``: nothing
    changed).

    With Linux's autogroup scheduling (``/proc/sys/kernel/sched_autogroup_enabled``, on by default
    on many distributions and on this project's machines) the CPU is shared between sessions
    first, and a nice value only ranks the threads within their own session: ``nice -n 19
    ntk-unlearn worker`` started in a session of its own (``setsid``, a process manager, the
    load bench) took as much CPU as the API beside it. A session led by a niced process is given
    that nice value as a whole (``/proc/<pid>/autogroup``, raising it needs no privilege). A
    process sharing its session (started from a shell with others) is left alone, so as not to
    lower the priority of the rest of that session.
    """
    try:
        nice = os.getpriority(os.PRIO_PROCESS, 0)
        if nice <= 0 or os.getsid(0) != os.getpid() or not autogroup.exists():
            return None
        text = autogroup.read_text()
        if not text.strip():  # in the root task group (no autogroup of its own): nothing to give
            return None
        current = int(text.rsplit("nice", 1)[1])
        if current >= nice:
            return None
        autogroup.write_text(str(nice))
    except (OSError, ValueError, IndexError) as e:
        log.warning("could not give this session the process's nice value (%s)", e)
        return None
    log.info("nice %d applied to this session's autogroup (%s)", nice, autogroup)
    return nice


def _check_redis(settings: Settings, who: str) -> None:
    """Say at once, before the model loads (tens of seconds), when the Redis of REDIS_URL does
    not answer: not fatal (the worker retries until it does; an API process answers 503 for
    forgets and ``/readyz`` meanwhile), but a wrong URL should not take a model load to show."""
    import redis

    from .redis_client import connect_worker

    try:
        client = connect_worker(settings.redis_url)
    except ValueError as e:  # a port or database that is no number: nothing to retry
        raise SystemExit(f"ntk-unlearn {who}: REDIS_URL is not a valid Redis URL ({e})") from None
    try:
        client.ping()
    except redis.RedisError as e:
        log.warning(
            "%s: the Redis of REDIS_URL does not answer or refuses this client (%s: %s); "
            "loading the model anyway, %s until it does",
            who,
            type(e).__name__,
            e,
            "the worker retries" if who == "worker" else "forgets and /readyz answer 503",
        )
    finally:
        client.close()


def _refuse_unnamespaced_jobs(settings: Settings, who: str, private: bool = False) -> None:
    """Refuse to start a worker while Redis holds jobs queued by a release before per-data-dir
    namespaces (``P:forget``, now ``P:<namespace>:forget``: ``app.service.queue_prefix``): this
    release would never apply them, and their callers would wait for ever. Nothing is checked
    when Redis does not answer (``_check_redis`` has said so).

    Arguments:
      private: REDIS_URL is the data dir's private Redis (``serve`` started it).

    Raises:
      SystemExit: such jobs are queued (one line: how many, and the ways on).
    """
    import redis

    from .queue import JobQueue
    from .redis_client import connect_worker

    stream = f"{settings.redis_prefix}:forget"
    client = connect_worker(settings.redis_url)
    try:
        queued = JobQueue(client, settings.redis_prefix, settings.job_ttl_s).stream_length(stream)
    except redis.RedisError:
        return
    finally:
        client.close()
    if queued:
        way_on = (
            "start that release's 'serve' on this data dir once to finish them (they are in "
            "the data dir's private Redis)"
            if private
            else "let that release's worker finish them, or delete the key to drop them"
        )
        raise SystemExit(
            f"ntk-unlearn {who}: {queued} job(s) are queued under the Redis key {stream} by an "
            "earlier release, which kept one queue per --redis-prefix (this one keeps one per "
            f"data dir under it): {way_on}, then start again"
        )


def _no_worker_elsewhere(settings: Settings) -> None:
    """``serve --no-worker`` without REDIS_URL would run a private Redis: refuse when a worker
    already runs on the data dir (it reads another Redis, and this process's forgets would
    never reach it).

    Raises:
      SystemExit: a worker holds the data dir's worker lock (one line naming it).
    """
    from .locking import DataDirInUseError, worker_lock

    try:
        worker_lock(settings.data_dir, "serve --no-worker").acquire().release()
    except DataDirInUseError as e:
        data_dir = settings.data_dir.absolute()
        raise SystemExit(
            f"ntk-unlearn serve: a solver worker runs on the data directory {data_dir} (pid "
            f"{e.holder_pid}, 'ntk-unlearn {e.holder_role or '?'}'): set REDIS_URL to the Redis "
            "it uses (a 'serve' without REDIS_URL logs its private one's socket: 'embedded "
            "Redis … on SOCKET'; use unix://SOCKET); without it this process would start a "
            "private Redis no worker reads, and its forgets would never be applied"
        ) from None


def serve(settings: Settings) -> None:
    """Run the API (and, unless ``--no-worker``, the worker) until SIGINT or SIGTERM.

    Before anything slow or anything that touches the data dir's Redis, it claims what it must
    not share (see ``app.locking``): the worker lock when it runs the worker, the embedded
    Redis's lock when it runs that, and the HTTP port. A second ``serve`` on the same data dir
    therefore exits at once with a message naming the process in the way, and leaves the
    running one alone.
    """
    from .embedded_redis import EmbeddedRedis
    from .locking import DataDirInUseError, worker_lock
    from .main import create_app
    from .service import load_model

    _private_data_dir(settings, "serve")
    nice_autogroup()

    with contextlib.ExitStack() as held:
        try:
            if settings.worker:
                # Held until this process ends; the kernel releases it if we are killed.
                held.enter_context(worker_lock(settings.data_dir, "serve"))
            sock = held.enter_context(bind_http_socket(settings.host, settings.port))
            if settings.redis_url is None and not settings.worker:
                _no_worker_elsewhere(settings)  # before a token is generated for nothing
            settings = _with_tokens(settings)
            # uvicorn shuts down gracefully on these, then raises them again: exit cleanly
            # instead of dying of the signal, so that the embedded Redis below is stopped too.
            for signum in (signal.SIGTERM, signal.SIGINT):
                signal.signal(signum, _exit_after_shutdown)
            embedded = None
            if settings.redis_url is None:
                embedded = held.enter_context(EmbeddedRedis(settings.data_dir / "redis"))
                embedded.watch()  # started again if it exits (a full disk)
                settings = settings.model_copy(update={"redis_url": embedded.url})
                if not settings.worker:
                    log.warning(
                        "serve --no-worker without REDIS_URL: this process runs the data dir's "
                        "private Redis (%s), which no worker reads unless started with "
                        "REDIS_URL=%s; forgets are accepted and stay queued until then (a "
                        "'serve' with its worker on this data dir applies them). For API "
                        "processes beside a worker, set REDIS_URL to the worker's Redis",
                        settings.data_dir / "redis",
                        embedded.url,
                    )
            else:
                _check_redis(settings, "serve")
            if settings.worker:
                _refuse_unnamespaced_jobs(settings, "serve", private=embedded is not None)
        except DataDirInUseError as e:
            raise SystemExit(f"ntk-unlearn serve: {e}") from None
        # after the checks: a refused start is one line
        if "glibc.malloc.hugetlb=1" in os.environ.get("GLIBC_TUNABLES", ""):
            log.info(
                "XLA's buffers on transparent huge pages (GLIBC_TUNABLES=%s)",
                os.environ["GLIBC_TUNABLES"],
            )
        # uvicorn names the address only when it binds the socket itself.
        host, port = sock.getsockname()[:2]
        log.info("HTTP API will listen on %s:%d once the model is loaded", host, port)
        # Here, not in the app's start-up: uvicorn holds SIGTERM and SIGINT back until its
        # start-up is over, which the first build (minutes) would be part of.
        _stop_on_signal(held.close)
        unlearner = load_model(settings)
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, _exit_after_shutdown)
        _run_http(create_app(settings, unlearner), sock, settings)


def worker(settings: Settings) -> None:
    """Run the worker alone until SIGINT or SIGTERM; it needs the Redis the API uses.

    It holds the data dir's worker lock while it runs: a second worker, or a ``serve`` with its
    own worker, on the same data dir is refused (one worker per model). API processes started
    with ``serve --no-worker`` take no lock and run beside it.
    """
    from prometheus_client import start_http_server

    from .locking import DataDirInUseError, worker_lock
    from .metrics import Metrics
    from .queue import JobQueue
    from .redis_client import connect_api, connect_worker
    from .service import deployment_keys, load_model, make_worker, queue_prefix

    if settings.redis_url is None:
        raise SystemExit(
            "ntk-unlearn worker: set REDIS_URL to the Redis the API processes use "
            "(the private Redis of 'serve' is not shared)"
        )
    _private_data_dir(settings, "worker")
    nice_autogroup()
    lock = worker_lock(settings.data_dir, "worker")
    try:
        lock.acquire()
    except DataDirInUseError as e:
        raise SystemExit(f"ntk-unlearn worker: {e}") from None
    metrics_server = None
    try:
        loaded: dict[str, Any] = {}
        metrics = None
        if settings.metrics_port is not None:
            # Its own client, the API's kind (short timeout, circuit breaker): a scrape must not
            # wait for the worker's long socket timeout (10 s, Prometheus's scrape timeout)
            # when Redis hangs.
            scraped = JobQueue(
                connect_api(settings.redis_url, settings.redis_timeout_s, settings.redis_retry_s),
                queue_prefix(settings),
                settings.job_ttl_s,
            )
            metrics = Metrics(lambda: loaded.get("model"), queue=lambda: scraped)
            try:
                metrics_server, _ = start_http_server(
                    settings.metrics_port, settings.metrics_host, registry=metrics.registry
                )
            except OSError as e:
                raise SystemExit(
                    f"ntk-unlearn worker: cannot serve metrics on {settings.metrics_host}:"
                    f"{settings.metrics_port} ({e.strerror or e}): check --metrics-host and "
                    "--metrics-port"
                ) from None
            log.info(
                "worker metrics at http://%s:%d/metrics",
                settings.metrics_host,
                settings.metrics_port,
            )
        _check_redis(settings, "worker")
        _refuse_unnamespaced_jobs(settings, "worker")
        # Until the worker runs (and then stops after its batch), a signal ends the build or
        # restore at once.
        _stop_on_signal(lock.release)
        u = load_model(settings, "worker")
        keys = deployment_keys(settings)
        prefix = queue_prefix(settings, keys)
        log.info("queue: Redis keys %s:*", prefix)
        queue = JobQueue(
            connect_worker(settings.redis_url), prefix, settings.job_ttl_s, digest=keys.digest
        )
        loaded.update(model=u)
        w = make_worker(settings, u, queue, metrics=metrics)

        def request_stop(signum: int, frame: Any) -> None:
            log.info("signal %d: stopping after the current batch", signum)
            w.request_stop()

        signal.signal(signal.SIGTERM, request_stop)
        signal.signal(signal.SIGINT, request_stop)
        log.info("worker: model version %d loaded from %s", u.version, settings.data_dir)
        w.run()
    finally:
        if metrics_server is not None:
            metrics_server.shutdown()
        lock.release()


class RepeatFilter(logging.Filter):
    """Drops a log record whose message was let through less than ``every_s`` seconds ago.

    Arguments:
      every_s: seconds between two records of the same message.
      clock: seconds, monotonic (tests).
    """

    def __init__(self, every_s: float, clock=time.monotonic):
        super().__init__()
        self.every_s = every_s
        self.clock = clock
        self._last: dict[str, float] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        now = self.clock()
        message = record.getMessage()
        if now - self._last.get(message, -math.inf) < self.every_s:
            return False
        if len(self._last) > 1000:  # many distinct messages: forget the old ones
            self._last = {m: t for m, t in self._last.items() if now - t < self.every_s}
        self._last[message] = now
        return True


def _configure_logging() -> None:
    # force: importing JAX and absl has already put handlers on the root logger.
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True
    )
    # orbax (through absl) and JAX's backend probing log every step at INFO.
    for noisy in ("absl", "jax._src.xla_bridge"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # orbax warns on every listing of a step it cannot read (40 lines a second from a follower
    # retrying an unreadable step): each distinct line once per 30 s.
    logging.getLogger("absl").addFilter(RepeatFilter(30.0))
    from .reader import quiet_closed_loop_errors

    quiet_closed_loop_errors()  # a damaged checkpoint's read: one log line, not tracebacks


# glibc's malloc tunable (2.35+) that asks the kernel for transparent huge pages on its mmap'd chunks.
_HUGETLB = "glibc.malloc.hugetlb=1"
_THP_MODE = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def huge_pages_env(
    environ: typing.Mapping[str, str], thp_mode: str, glibc: str
) -> dict[str, str] | None:
    """The environment to re-execute with so that XLA's buffers are backed by huge pages, or ``None``.

    Every new K-sized array (compacting K_RR after a deletion, the spare K buffer, the NTK blocks)
    is written into freshly mapped memory, and the kernel faults it in 4 KiB at a time: compacting
    MNIST's K_RR (1.4 GB) took 0.52 s, 0.37 s with 2 MiB pages (the bench's per-part profile of
    ``plan_forget``; the whole 10 % deletion 1.47 → 1.38 s). When the kernel gives transparent huge pages only on request (``[madvise]``),
    glibc (≥ 2.35) makes that request for the large chunks it maps if ``GLIBC_TUNABLES`` says
    ``glibc.malloc.hugetlb=1``, read only at process start.

    Arguments:
      environ: the current environment.
      thp_mode: the text of ``/sys/kernel/mm/transparent_hugepage/enabled`` ("" if absent).
      glibc: ``os.confstr("CS_GNU_LIBC_VERSION")``, e.g. ``"glibc 2.36"`` ("" if not glibc).

    Returns:
      ``environ`` with the tunable added, or ``None`` when it would change nothing: turned off
      (``NTK_UNLEARN_HUGE_PAGES=0``), already set, THP ``[always]`` (given anyway) or ``[never]``,
      or glibc older than 2.35.
    """
    if environ.get("NTK_UNLEARN_HUGE_PAGES", "1").strip().lower() in ("0", "false", "no", "off"):
        return None
    named = re.search(
        r"(^|:)glibc\.malloc\.hugetlb(=|:|$)", environ.get("GLIBC_TUNABLES", ""), re.IGNORECASE
    )
    if named or "[madvise]" not in thp_mode:
        return None
    match = re.fullmatch(r"glibc (\d+)\.(\d+).*", glibc.strip())
    if match is None or (int(match[1]), int(match[2])) < (2, 35):
        return None
    env = dict(environ)
    env["GLIBC_TUNABLES"] = ":".join(t for t in (environ.get("GLIBC_TUNABLES", ""), _HUGETLB) if t)
    return env


def _reexec_with_huge_pages() -> None:
    """Replace this process by itself with ``huge_pages_env`` (nothing happens when it is ``None``)."""
    try:
        thp_mode = _THP_MODE.read_text()
        glibc = os.confstr("CS_GNU_LIBC_VERSION") or ""
    except (OSError, ValueError, AttributeError):
        return
    env = huge_pages_env(os.environ, thp_mode, glibc)
    argv = getattr(sys, "orig_argv", None)
    # a program read from stdin ("python -") cannot be read again after the exec
    if env is None or not argv or "-" in argv[1:]:
        return
    for stream in (sys.stdout, sys.stderr):  # None when the descriptor is closed
        if stream is not None:
            stream.flush()
    os.execve(sys.executable, argv, env)


def verify_receipt(argv: Sequence[str]) -> int:
    """``ntk-unlearn verify-receipt RECEIPT.json --public-key KEY.pem``: check a deletion receipt's
    Ed25519 signature offline (``app.receipts.verify``), print its statement and whether its
    certificate was met (``app.receipts.certificate_check``); ``--json``: one JSON object instead.

    Returns:
      0 when the signature verifies (whatever the certificate, unless ``--require-certificate``);
      1 when it does not (altered, or another key), with the reason on stderr; 2 for unreadable
      files, a key that is not Ed25519, or JSON with none of a receipt's fields (an error body
      saved instead); 3 with ``--require-certificate`` when the signature verifies but the certificate
      was not met or is absent.
    """
    import json

    from .receipts import ReceiptError, certificate_check, verify

    parser = argparse.ArgumentParser(
        prog="ntk-unlearn verify-receipt",
        description="Check a deletion receipt (GET /v1/jobs/{id}/receipt) against the "
        "deployment's public key (GET /v1/receipts/public-key), offline, and say whether its "
        "certificate was met.",
    )
    parser.add_argument("receipt", type=Path, help="the receipt, as JSON")
    parser.add_argument(
        "--public-key",
        type=Path,
        required=True,
        help="the public key: PEM, or the JSON of GET /v1/receipts/public-key",
    )
    parser.add_argument(
        "--require-certificate",
        action="store_true",
        help="exit 3 when the signature is valid but the certificate was not met (or is absent)",
    )
    parser.add_argument(
        "--json",
        action="store_true",
        help="print one JSON object: signature_valid, certificate {status, enforced, value, "
        "limit, kind}, payload (or error; signature_valid null when the input cannot be read)",
    )
    args = parser.parse_args(argv)
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
    from cryptography.hazmat.primitives.serialization import load_pem_public_key

    duplicated: list[str] = []

    def no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        names = [k for k, _ in pairs]
        duplicated.extend(sorted({k for k in names if names.count(k) > 1}))
        return dict(pairs)

    try:
        receipt = json.loads(args.receipt.read_text(), object_pairs_hook=no_duplicates)
        key = args.public_key.read_text()
        if key.lstrip().startswith("{"):
            key = json.loads(key).get("public_key_pem")
            if not isinstance(key, str):
                raise ValueError(
                    f"the public key {args.public_key}: its JSON has no string public_key_pem"
                )
        if not isinstance(load_pem_public_key(key.encode()), Ed25519PublicKey):
            raise ValueError(f"the public key {args.public_key} is not an Ed25519 key")
        if not isinstance(receipt, dict) or not receipt.keys() & {
            "payload",
            "signature",
            "algorithm",
        }:
            # an error body saved instead of the receipt (a 404's {"detail": ...}), a list, ...
            raise ValueError(
                f"{args.receipt} is not a receipt (a JSON object with payload, signature and "
                "algorithm, as GET /v1/jobs/{id}/receipt answers); nothing in it was checked"
            )
    except (OSError, ValueError, AttributeError, TypeError) as e:
        # a key that cannot be read says nothing about the receipt: not "NOT VALID" (exit 1)
        if args.json:  # one JSON object whatever the outcome; nothing was checked: null
            print(json.dumps({"signature_valid": None, "error": f"cannot read the input: {e}"}))
        print(f"verify-receipt: cannot read the input: {e}", file=sys.stderr)
        return 2
    try:
        if duplicated:  # JSON readers differ on which value they keep: a signed value hidden
            raise ReceiptError(f"the receipt repeats the key(s) {', '.join(duplicated)}")
        payload = verify(receipt, key)
    except (ReceiptError, ValueError) as e:
        if args.json:
            print(json.dumps({"signature_valid": False, "error": str(e)}))
        print(f"verify-receipt: NOT VALID: {e}", file=sys.stderr)
        return 1
    check = certificate_check(payload)
    if args.json:
        out = {"signature_valid": True, "certificate": check.to_dict(), "payload": payload}
        print(json.dumps(out, ensure_ascii=False))
    else:
        print(
            f"valid: job {payload['job_id']} forgot {len(payload['id_digests'])} record(s), "
            f"version {payload['version_before']} -> {payload['version_after']} at "
            f"{payload['applied_at']}; checkpoint sha256 {payload['checkpoint_sha256']}"
        )
        print(check.line())
    if args.require_certificate and check.status != "met":
        print(
            f"verify-receipt: the signature is valid but the certificate is {check.status} "
            "(--require-certificate)",
            file=sys.stderr,
        )
        return 3
    return 0


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of the ``ntk-unlearn`` command.

    Run from the command line (``argv`` None), it first re-executes itself with huge pages for
    XLA's buffers where that helps (``huge_pages_env``; ``NTK_UNLEARN_HUGE_PAGES=0`` turns it off).
    """
    if (sys.argv[1:2] if argv is None else list(argv)[:1]) == ["verify-receipt"]:
        code = verify_receipt(list(sys.argv[2:] if argv is None else list(argv)[1:]))
        if code:
            raise SystemExit(code)
        return
    if argv is None:
        _reexec_with_huge_pages()
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bench"]:
        # The benchmarks parse their own arguments (options may precede their subcommand); their
        # exit status is ours.
        import bench.cli

        code = bench.cli.main(argv[1:])
        if code:
            raise SystemExit(code)
        return
    args = build_parser().parse_args(argv)
    _configure_logging()
    settings = _settings(args)
    from service_core.errors import SolverError, UnlearnError

    try:
        if args.command == "serve":
            serve(settings)
        else:
            worker(settings)
    except _Signalled:
        _exit_now()  # everything this process held was released while unwinding
    except (UnlearnError, SolverError) as e:
        # a model that cannot be built or restored as configured: one line, what to change (the
        # embedded Redis and the locks were released while unwinding)
        raise SystemExit(f"ntk-unlearn {args.command}: {e}") from None


if __name__ == "__main__":
    main(sys.argv[1:])
