"""HTTP load on a running service (``ntk-unlearn bench load``): predictions alone and while forgets run.

The service runs in one of two deployments (``--load-deployment``; ``both`` runs ``single`` and
then ``split`` in one invocation, each on its own copy of the data dir, so their numbers sit side
by side):

* ``single`` (the default): one ``ntk-unlearn serve`` (API and worker in one process, its private
  Redis), as a child process on 127.0.0.1;
* ``split``: a private ``redis-server`` (``app.embedded_redis.EmbeddedRedis``: Unix socket,
  append-only file with ``appendfsync always``, as ``serve``'s own), ``ntk-unlearn worker`` at low
  CPU priority (``nice`` ``--load-worker-nice``, 19 by default) and ``ntk-unlearn serve
  --no-worker`` (the API alone: a follower that loads each version the worker reports, and never
  answers from an older one). The model options go to both; ``--load-serve-args`` to the API
  process (and those of them a worker also takes, to the worker).

Each on 127.0.0.1, in a process group of its own (stopped whole at the end), with the API token
in the environment (never on the command line) and a copy of ``--load-data-dir`` (a data dir
holding a built model, so no run pays for the build; without it the model is built first). Then,
with ``--load-clients`` concurrent clients (closed loop: each sends its next request when the
previous one is answered, on one keep-alive connection of its own):

1. ``predict-1, 1 client`` (one client: the latency of one request), then ``predict-1`` and
   ``predict-100``: ``POST /v1/predict`` with 1 and with 100 rows of the data set, each for
   ``--load-seconds`` after a 1 s warm-up;
2. ``enqueue``: ``POST /v1/forget`` of one id at a time from one client, ``--load-forgets`` times
   (the time to the 202: validation and the Redis enqueue), while the worker applies them;
3. ``predict-1 again, no forgets``: the 16-client phase 1 again with nothing else running (the
   control for the goal read literally, ``goals``: the slowest of this many predictions on a
   service with no forget to run);
4. ``predict-1 during forgets``: phase 1 again while a second task keeps the worker busy with one
   forget after another (each waits for the previous job to be reported succeeded; through a
   follower, its next forget and the predictions wait until the follower serves that version).

Reported per deployment and phase: requests/s, predictions (rows) per second, p50/p99/max
latency in ms, errors, and CPU seconds per request of the API process (all its threads, and its
event loop's thread alone), of the separate worker process (``split``) and of this load
generator; the load average before and after; the commit, the command and the settings; and the
phases against the goals of issue 13 item 9. The results go to ``<out>/load.json`` and
``<out>/load.md``.

CPU per request is the measure that least depends on what else the machine runs: on a shared
machine wall-clock rates and latencies move with the other processes, the CPU a request costs
much less. The clients are plain asyncio streams writing one pre-encoded request (headers and
JSON body) and reading the answer by its ``Content-Length``: about 0.2 ms of CPU per request,
where httpx took a whole core of the two at 150 requests/s. Latency is still the time from
writing the request to having read the whole answer. During each timed phase the clients run at
real-time priority where that is allowed (``_clients_first``; otherwise at normal priority, which
the results say), and their own event loop's stalls are recorded (``_loop_lag``) and set apart
like the machine-wide ones (``StallProbe``): a client that is not running reads its answers late,
whatever the service did.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import os
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import typing
import urllib.error
from pathlib import Path

import numpy as np

from .e2e import Client, Server, _free_port, all_ids, serve_args

DEPLOYMENTS = {
    "single": "one `ntk-unlearn serve` (API and worker in one process, its private Redis)",
    "split": "`ntk-unlearn worker` at nice {nice} and `ntk-unlearn serve --no-worker` "
    "(the API alone, a follower), one private Redis",
}


def _percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q)) if values else float("nan")


def _summary(latencies: list[float], seconds: float, rows: int, errors: int) -> dict:
    ms = [v * 1e3 for v in latencies]
    return {
        "requests": len(ms),
        "errors": errors,
        "seconds": seconds,
        "requests_per_s": len(ms) / seconds if seconds else float("nan"),
        "predictions_per_s": len(ms) * rows / seconds if seconds else float("nan"),
        "p50_ms": _percentile(ms, 50),
        "p99_ms": _percentile(ms, 99),
        "max_ms": max(ms) if ms else float("nan"),
        "mean_ms": statistics.fmean(ms) if ms else float("nan"),
    }


def _cpu_seconds(pid: int, thread: int | None = None) -> float:
    """User + system CPU seconds of process ``pid`` (all its threads), or of one of its threads."""
    path = f"/proc/{pid}/stat" if thread is None else f"/proc/{pid}/task/{thread}/stat"
    try:
        with open(path) as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class _CpuMeter:
    """CPU seconds spent during a phase by the API process (all threads; its main thread, which
    runs the event loop), by a separate worker process (``split``) and by this process (the
    clients).

    Arguments:
      pids: the API process's pid and the worker process's (``None``: not measured, NaN; the
        worker's is ``None`` when the API process runs the worker itself).
    """

    def __init__(self, pids: tuple[int | None, int | None]):
        self.pid, self.worker_pid = pids

    def __enter__(self) -> _CpuMeter:
        self.start = self._read()
        return self

    def __exit__(self, *exc) -> None:
        self.spent = [b - a for a, b in zip(self.start, self._read(), strict=True)]

    def _read(self) -> tuple[float, float, float, float]:
        nan = float("nan")
        server = (
            (nan, nan)
            if self.pid is None
            else (
                _cpu_seconds(self.pid),
                _cpu_seconds(self.pid, self.pid),
            )
        )
        worker = nan if self.worker_pid is None else _cpu_seconds(self.worker_pid)
        return (*server, worker, time.process_time())

    def per_request(self, requests: int) -> dict:
        server, loop, worker, client = (
            1e3 * v / requests if requests else float("nan") for v in self.spent
        )
        return {
            "server_cpu_ms": server,
            "server_loop_cpu_ms": loop,
            "worker_cpu_ms": worker,
            "client_cpu_ms": client,
        }


def _http_request(port: int, method: str, path: str, token: str, body: object) -> bytes:
    """One HTTP/1.1 request, encoded once: what a client writes each time (``body`` ``None``:
    none)."""
    payload = b"" if body is None else json.dumps(body).encode()
    kind = "" if body is None else "Content-Type: application/json\r\n"
    return (
        f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAuthorization: Bearer {token}\r\n"
        f"{kind}Content-Length: {len(payload)}\r\n\r\n"
    ).encode() + payload


class _Connection:
    """A keep-alive HTTP/1.1 connection that sends pre-encoded requests (``_http_request``)."""

    def __init__(self, port: int):
        self.port = port
        self.reader: asyncio.StreamReader | None = None
        self.body = b""  # the last answer's body

    async def send(self, request: bytes) -> int:
        """Write ``request``, read its whole answer; its status code."""
        if self.reader is None:
            self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)
        self.writer.write(request)
        head = await self.reader.readuntil(b"\r\n\r\n")
        length, close = 0, False
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                length = int(value)
            elif name == b"connection" and value.strip().lower() == b"close":
                close = True
        self.body = await self.reader.readexactly(length)
        if close:
            self.close()
        return int(head[9:12])

    def close(self) -> None:
        if self.reader is not None:
            self.writer.close()
            self.reader = None


async def _predict_load(
    port: int,
    token: str,
    x: list,
    clients: int,
    seconds: float,
    pids: tuple[int | None, int | None] = (None, None),
) -> dict:
    """``clients`` closed-loop clients posting ``x`` to /v1/predict for ``seconds``."""
    latencies: list[float] = []
    ends: list[float] = []  # wall-clock end of each answered request (``time.time()``)
    errors = 0
    request = _http_request(port, "POST", "/v1/predict", token, {"x": x})
    stop_at = time.perf_counter() + seconds

    async def one() -> None:
        nonlocal errors
        conn = _Connection(port)
        try:
            while time.perf_counter() < stop_at:
                t0 = time.perf_counter()
                status = await conn.send(request)
                if status == 200:
                    latencies.append(time.perf_counter() - t0)
                    ends.append(time.time())
                else:
                    errors += 1
        finally:
            conn.close()

    lags: list[tuple[float, float]] = []
    with _CpuMeter(pids) as cpu:
        started = time.perf_counter()
        watch = asyncio.create_task(_loop_lag(stop_at, lags))
        await asyncio.gather(*(one() for _ in range(clients)))
        elapsed = time.perf_counter() - started
        watch.cancel()
    return {
        **_summary(latencies, elapsed, len(x), errors),
        **cpu.per_request(len(latencies) + errors),
        # for ``StallProbe.classify``; not written out
        "_spans": (ends, latencies),
        "_generator_lags": lags,
    }


async def _loop_lag(stop_at: float, lags: list[tuple[float, float]]) -> None:
    """The load generator's own stalls: a task of the clients' event loop sleeps 1 ms in a loop
    and appends each wake-up more than 5 ms late to ``lags`` (wall-clock end in s, gap in s).
    While the generator itself does not run (descheduled, a long callback), every request in
    flight is timed as late by as much, whatever the server does."""
    last = time.perf_counter()
    while last < stop_at:
        await asyncio.sleep(0.001)
        now = time.perf_counter()
        if now - last > 0.005:
            lags.append((time.time(), now - last))
        last = now


async def _forget_loop(port: int, token: str, ids: list[str], stop: asyncio.Event) -> dict:
    """Forget ``ids`` one at a time, each after the previous job succeeded, until ``stop``.

    On the load generator's plain connections (``_Connection``), polling the job every 50 ms: it
    shares the event loop with the timed clients, and httpx (about 6 ms of CPU per request here)
    polling every 20 ms delayed their reads, which counted as the service's latency."""
    jobs = []
    unavailable = 0
    conn = _Connection(port)
    try:
        for rid in ids:
            if stop.is_set():
                break
            t0 = time.perf_counter()
            request = _http_request(port, "POST", "/v1/forget", token, {"ids": [rid]})
            while (status := await conn.send(request)) == 503 and not stop.is_set():
                # a follower still loading the version the worker reported: it says when to retry
                unavailable += 1
                await asyncio.sleep(0.1)
            if status == 503:
                break
            if status != 202:
                raise RuntimeError(f"POST /v1/forget answered {status}: {conn.body[:200]!r}")
            job_id = json.loads(conn.body)["job_id"]
            poll = _http_request(port, "GET", f"/v1/jobs/{job_id}", token, None)
            while True:
                await asyncio.sleep(0.05)
                status = await conn.send(poll)
                job = json.loads(conn.body) if status == 200 else {}
                if job.get("status") in ("succeeded", "failed"):
                    break
            jobs.append({"status": job["status"], "seconds": time.perf_counter() - t0})
    finally:
        conn.close()
    return {
        "jobs": len(jobs),
        "succeeded": sum(j["status"] == "succeeded" for j in jobs),
        "seconds": [j["seconds"] for j in jobs],
        "unavailable_503": unavailable,
    }


async def _enqueue_latency(
    port: int, token: str, ids: list[str], pids: tuple[int | None, int | None]
) -> tuple[dict, list[str]]:
    """One forget of one id at a time, timed to its 202; the summary and the accepted jobs' ids."""
    latencies = []
    errors = 0
    jobs = []
    conn = _Connection(port)
    with _CpuMeter(pids) as cpu:
        started = time.perf_counter()
        for rid in ids:
            request = _http_request(port, "POST", "/v1/forget", token, {"ids": [rid]})
            t0 = time.perf_counter()
            if await conn.send(request) == 202:
                latencies.append(time.perf_counter() - t0)
                jobs.append(json.loads(conn.body)["job_id"])
            else:
                errors += 1
        elapsed = time.perf_counter() - started
    conn.close()
    return {**_summary(latencies, elapsed, 1, errors), **cpu.per_request(len(ids))}, jobs


def _wait_applied(
    client: Client,
    jobs: list[str],
    log_path: Path,
    timeout: float,
    follower_log: Path | None = None,
) -> dict:
    """Until every job of ``jobs`` has ended and the worker has logged the post-publish work of
    every version they made (``after publishing:`` in ``log_path``), and a follower API process
    its work after the newest (``after following version V:`` in ``follower_log``), so that the
    next phase finds them idle; or ``timeout``. The jobs that succeeded and the versions
    (batches) they made."""
    deadline = time.monotonic() + timeout
    versions, succeeded = set(), 0
    for job_id in jobs:
        while time.monotonic() < deadline:
            status, job = client.request("GET", f"/v1/jobs/{job_id}")
            if status == 200 and job["status"] in ("succeeded", "failed"):
                succeeded += job["status"] == "succeeded"
                versions.add(job.get("model_version"))
                break
            time.sleep(0.05)
    versions.discard(None)
    _wait_idle(log_path, len(versions), max(0.0, deadline - time.monotonic()))
    if follower_log is not None and versions:
        _wait_idle(
            follower_log,
            1,
            max(0.0, deadline - time.monotonic()),
            f"after following version {max(versions)}:",
        )
    return {"succeeded": succeeded, "batches": len(versions)}


async def _during_forgets(
    base: str,
    port: int,
    token: str,
    x: list,
    ids: list[str],
    args,
    pids: tuple[int | None, int | None],
) -> dict:
    stop = asyncio.Event()
    forgets = asyncio.create_task(_forget_loop(port, token, ids, stop))
    await asyncio.sleep(0.5)  # the first job is being applied
    result = await _predict_load(port, token, x, args.load_clients, args.load_seconds, pids)
    stop.set()
    result["forgets"] = await forgets
    return result


CONTROL = "predict-1 again, no forgets"


def _timed(phase: typing.Coroutine) -> typing.Any:
    """Run one timed phase with this process's cyclic garbage collector off (and what exists
    frozen out of its view) and its clients at real-time priority (``_clients_first``).

    The collector: the load generator imports jax (the data set's rows), and a full collection
    of its heap took up to 85 ms here (``gc.callbacks``), during which every client's request
    counted as that much slower (the slowest of a phase). Collected before, back on after.
    The phase's summary (a dict, or a tuple's first) gets ``clients_realtime``."""
    gc.collect()
    gc.freeze()
    gc.disable()
    try:
        with _clients_first() as realtime:
            result = asyncio.run(phase)
        summary = result[0] if isinstance(result, tuple) else result
        if isinstance(summary, dict):
            summary["clients_realtime"] = realtime
        return result
    finally:
        gc.enable()
        gc.unfreeze()


# The clients' real-time priority (SCHED_FIFO), under the stall probe's (50).
CLIENTS_RT_PRIORITY = 20


@contextlib.contextmanager
def _clients_first() -> typing.Iterator[bool]:
    """The clients' thread at real-time priority (``SCHED_FIFO`` ``CLIENTS_RT_PRIORITY``) while
    the block runs, when allowed (yields whether it is), then back to normal scheduling.

    The clients stand in for callers on other machines, whose reading of an answer never waits
    for the server's cores. Beside the split deployment at normal priority, the clients' own
    event loop was held up 10–55 ms at a time (``_loop_lag``), 1–19 times per phase and only
    while forgets ran, while the API process's event loop (probed alike) was not: each time the
    requests in flight were timed as slow, and they were the slowest of 5 of the 15 runs
    (BENCHMARKS.md, HTTP load, 2026-12-05). At real-time priority: none in nine runs. The
    clients use about 0.1 ms of CPU per request, taken from the same two cores either way."""
    try:
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(CLIENTS_RT_PRIORITY))
    # not allowed (no CAP_SYS_NICE, RLIMIT_RTPRIO 0), or not Linux
    except (OSError, AttributeError):
        yield False
        return
    try:
        yield True
    finally:
        os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))


# A wake-up this late (ms) is a machine-wide stall (``StallProbe``).
STALL_MS = 10.0

_PROBE = r"""
import sys, time
def steal():
    try:
        with open("/proc/stat") as f:
            return int(f.readline().split()[8])
    except (OSError, IndexError, ValueError):
        return -1
with open(sys.argv[1], "a", buffering=1) as out:
    last = time.perf_counter()
    while True:
        time.sleep(0.001)
        now = time.perf_counter()
        if now - last > 0.005:
            out.write(f"{time.time():.6f} {now - last:.6f} {steal()}\n")
        last = now
"""


class StallProbe:
    """Machine-wide stalls while the load runs: a process at real-time priority (``chrt -f 50``:
    SCHED_FIFO, when allowed; else at normal priority, which says less) sleeps 1 ms in a loop and
    records every wake-up more than 5 ms late, with the host's steal counter (``/proc/stat``,
    jiffies). At real-time priority no process of the machine delays it: a wake-up ``STALL_MS``
    late is the whole machine not running (its virtual CPUs descheduled by the host, or the
    kernel). On this project's 2-core VM the host paused all of it for 16–36 ms, at 100 ms
    intervals, while background work kept both virtual CPUs busy (BENCHMARKS.md, HTTP load).
    Every request in flight then is late by as much, whatever the service does.

    Arguments:
      path: the file the probe appends its lines to (``end_wall_time gap_s steal``).
    """

    def __init__(self, path: Path):
        self.path = path
        self.proc: subprocess.Popen | None = None
        self.realtime = False

    def __enter__(self) -> StallProbe:
        self.path.unlink(missing_ok=True)
        command = [sys.executable, "-c", _PROBE, str(self.path)]
        chrt = shutil.which("chrt")
        if chrt is not None:
            allowed = subprocess.run([chrt, "-f", "50", "true"], capture_output=True)
            self.realtime = allowed.returncode == 0
            if self.realtime:
                command = [chrt, "-f", "50", *command]
        self.proc = subprocess.Popen(command, start_new_session=True)
        return self

    def __exit__(self, *exc) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(10)

    def gaps(self) -> np.ndarray:
        """``(n, 2)``: each late wake-up's wall-clock end (s) and length (s)."""
        try:
            lines = self.path.read_text().split("\n")
        except OSError:
            return np.zeros((0, 2))
        rows = [line.split()[:2] for line in lines if len(line.split()) == 3]
        return np.array(rows, float).reshape(-1, 2)

    def classify(self, phase: dict) -> None:
        """Add to a phase (``_predict_load``'s, whose ``_spans`` it takes out) the stalls within
        it (``stalls``: wake-ups ``STALL_MS`` late or more; ``longest_stall_ms``), the slowest
        request in flight during none of them (``max_ms_outside_stalls``); the load generator's
        own stalls of ``STALL_MS`` or more (``_generator_lags``, taken out: ``generator_stalls``,
        ``longest_generator_stall_ms``) and the slowest request in flight during neither kind
        (``max_ms_outside_any_stall``); and the ten slowest requests (``slowest``: wall-clock
        end in s, ms, whether in flight during a machine-wide stall, during a generator's)."""
        spans = phase.pop("_spans", None)
        generator = np.array(phase.pop("_generator_lags", ()), float).reshape(-1, 2)
        if spans is None or not spans[0]:
            return
        ends, latencies = np.asarray(spans[0]), np.asarray(spans[1])
        starts = ends - latencies
        gaps = self.gaps()
        gaps = gaps[(gaps[:, 1] * 1e3 >= STALL_MS) & (gaps[:, 0] > starts.min())]
        gaps = gaps[gaps[:, 0] - gaps[:, 1] < ends.max()]
        hit = np.zeros(len(ends), bool)
        for end, length in gaps:
            hit |= (starts < end) & (end - length < ends)
        phase["stalls"] = len(gaps)
        phase["longest_stall_ms"] = float(gaps[:, 1].max() * 1e3) if len(gaps) else 0.0
        phase["stall_probe_realtime"] = self.realtime
        clear = latencies[~hit]
        phase["max_ms_outside_stalls"] = float(clear.max() * 1e3) if len(clear) else float("nan")
        # The load generator's own stalls (``_loop_lag``): its requests in flight then are late
        # by as much, whatever the server did.
        generator = generator[generator[:, 1] * 1e3 >= STALL_MS]
        late = np.zeros(len(ends), bool)
        for end, length in generator:
            late |= (starts < end) & (end - length < ends)
        phase["generator_stalls"] = len(generator)
        phase["longest_generator_stall_ms"] = (
            float(generator[:, 1].max() * 1e3) if len(generator) else 0.0
        )
        # each one's wall-clock end (s) and length (ms): to set against the logs
        phase["generator_stall_times"] = [[float(e), float(g * 1e3)] for e, g in generator]
        clear = latencies[~(hit | late)]
        phase["max_ms_outside_any_stall"] = float(clear.max() * 1e3) if len(clear) else float("nan")
        # The ten slowest requests (wall-clock end, ms, in a machine-wide stall, in one of the
        # load generator's own): to set against the logs.
        slowest = np.argsort(-latencies)[:10]
        phase["slowest"] = [
            [float(ends[i]), float(latencies[i] * 1e3), bool(hit[i]), bool(late[i])]
            for i in slowest
        ]


def _rows(options: list[str], seed: int) -> list:
    """100 input rows of the served data set (its training points), as JSON lists."""
    from service_core import load_dataset

    dataset = load_dataset(options[options.index("--dataset") + 1], seed=seed)
    x = dataset.x[:100]
    return x.reshape(len(x), -1).tolist()


def _line(phase: dict) -> str:
    worker = phase.get("worker_cpu_ms", float("nan"))
    return (
        f"{phase['requests_per_s']:.0f} req/s, {phase['predictions_per_s']:.0f} rows/s, "
        f"p50 {phase['p50_ms']:.1f} ms, p99 {phase['p99_ms']:.1f} ms, max {phase['max_ms']:.1f} ms, "
        f"{phase['errors']} errors; CPU per request: API process {phase['server_cpu_ms']:.2f} ms "
        f"(event loop {phase['server_loop_cpu_ms']:.2f})"
        + ("" if worker != worker else f", worker process {worker:.2f} ms")
        + f", clients {phase['client_cpu_ms']:.2f} ms"
    )


def goals(phases: dict) -> list[str]:
    """The phases against issue 13 item 9's goals, one line each (met or not, with the numbers):
    ≥ 300 predictions/s at p99 < 100 ms for 1-row requests (16 clients); enqueue p99 < 20 ms;
    1-row p99 while forgets run ≤ 2× its idle p99; and read literally, no prediction while they
    run slower than 2× the idle p99, beside the control phase's slowest against the same bar."""
    lines = []
    idle = phases.get("predict-1")
    if idle:
        met = idle["predictions_per_s"] >= 300 and idle["p99_ms"] < 100
        lines.append(
            f"≥ 300 predictions/s at p99 < 100 ms (1 row): {idle['predictions_per_s']:.0f}/s at "
            f"p99 {idle['p99_ms']:.1f} ms, **{'met' if met else 'not met'}**"
        )
    enqueue = phases.get("enqueue")
    if enqueue:
        met = enqueue["p99_ms"] < 20
        lines.append(
            f"enqueue p99 < 20 ms: {enqueue['p99_ms']:.1f} ms, **{'met' if met else 'not met'}**"
        )
    during = phases.get("predict-1 during forgets")
    if idle and during:
        ratio = during["p99_ms"] / idle["p99_ms"]
        forgets = during.get("forgets") or {}
        ran = forgets.get("succeeded", 0) > 0
        lines.append(
            f"p99 while forgets run ≤ 2× idle p99: {during['p99_ms']:.1f} ms against "
            f"{idle['p99_ms']:.1f} ms, {ratio:.2f}×, "
            + (
                f"**{'met' if ratio <= 2 else 'not met'}**"
                if ran
                else "**not measured** (no forget finished during the phase)"
            )
        )
        if ran:
            lines.append(_slowest_line(idle, during, phases.get(CONTROL)))
    return lines


def _slowest_line(idle: dict, during: dict, control: dict | None) -> str:
    """The goal read literally: no prediction while forgets run slower than 2× the idle p99; with
    the slowest prediction of the control phase (the same load, no forget) against the same bar,
    which says whether the bar is one the service can meet at all on this machine."""
    bar = 2 * idle["p99_ms"]
    line = (
        f"slowest prediction while forgets run ≤ 2× idle p99 ({bar:.1f} ms): "
        f"{during['max_ms']:.1f} ms, {during['max_ms'] / idle['p99_ms']:.2f}×, "
        f"**{'met' if during['max_ms'] <= bar else 'not met'}**"
    )
    if control:
        line += (
            f"; control (the same load, no forget): {control['max_ms']:.1f} ms, "
            f"{control['max_ms'] / idle['p99_ms']:.2f}×, "
            + ("within the bar" if control["max_ms"] <= bar else "over the bar too")
        )
    if "max_ms_outside_stalls" in during:
        line += "; " + _outside_stalls(during, bar, idle["p99_ms"], "while forgets run")
        if control and "max_ms_outside_stalls" in control:
            line += "; " + _outside_stalls(control, bar, idle["p99_ms"], "control")
    return line


def _outside_stalls(phase: dict, bar: float, idle_p99: float, what: str) -> str:
    """The slowest request of a phase in flight during no machine-wide stall (``StallProbe``)."""
    slowest = phase["max_ms_outside_stalls"]
    probe = "a real-time probe" if phase.get("stall_probe_realtime") else "a probe (not real-time)"
    line = (
        f"{what}, outside the {phase['stalls']} machine-wide stall(s) {probe} saw (≥ "
        f"{STALL_MS:g} ms, longest {phase['longest_stall_ms']:.1f} ms): slowest {slowest:.1f} ms, "
        f"{slowest / idle_p99:.2f}×, {'within' if slowest <= bar else 'over'} the bar"
    )
    if "max_ms_outside_any_stall" in phase:
        slowest = phase["max_ms_outside_any_stall"]
        line += (
            f"; outside those and the load generator's own {phase['generator_stalls']} "
            f"(longest {phase['longest_generator_stall_ms']:.1f} ms): slowest {slowest:.1f} ms, "
            f"{slowest / idle_p99:.2f}×, {'within' if slowest <= bar else 'over'} the bar"
        )
    return line


def _table(res: dict) -> list[str]:
    split = res["deployment"] == "split"
    lines = [
        "| phase | requests/s | predictions/s | p50 ms | p99 ms | max ms | errors "
        "| API CPU ms/req | its event loop | "
        + ("worker CPU ms/req | " if split else "")
        + "clients |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|" + ("---:|" if split else "") + "---:|",
    ]
    for name, ph in res["phases"].items():
        rows = "" if name == "enqueue" else f"{ph['predictions_per_s']:.0f}"
        worker = f" {ph.get('worker_cpu_ms', float('nan')):.2f} |" if split else ""
        lines.append(
            f"| {name} | {ph['requests_per_s']:.0f} | {rows} | {ph['p50_ms']:.1f} | "
            f"{ph['p99_ms']:.1f} | {ph['max_ms']:.1f} | {ph['errors']} | "
            f"{ph.get('server_cpu_ms', float('nan')):.2f} | "
            f"{ph.get('server_loop_cpu_ms', float('nan')):.2f} |{worker} "
            f"{ph.get('client_cpu_ms', float('nan')):.2f} |"
        )
    return lines


def markdown(res: dict) -> str:
    """The results of one run: a table per deployment, and each against the goals."""
    lines = [
        f"Commit `{res.get('commit')}`, `{res.get('command')}`; model options "
        f"`{' '.join(res['serve_options'])}`; {res['clients']} clients, "
        f"{res['seconds_per_phase']:g} s per phase; load average "
        f"{', '.join(f'{v:.1f}' for v in res['loadavg_before'])} before, "
        f"{', '.join(f'{v:.1f}' for v in res['loadavg_after'])} after.",
    ]
    for name, dep in res["deployments"].items():
        during = dep["phases"].get("predict-1 during forgets", {}).get("forgets")
        realtime = {p.get("clients_realtime") for p in dep["phases"].values()} - {None}
        clients = (
            "clients at real-time priority (SCHED_FIFO)"
            if realtime == {True}
            else "clients at normal priority (real-time not allowed here)"
            if realtime == {False}
            else None
        )
        lines += [
            "",
            f"**{name}**: {dep['description']}; {clients + '; ' if clients else ''}load average "
            f"{', '.join(f'{v:.1f}' for v in dep['loadavg_before'])} before, "
            f"{', '.join(f'{v:.1f}' for v in dep['loadavg_after'])} after; ready in "
            f"{dep.get('ready_s', float('nan')):.1f} s.",
            "",
            *_table(dep),
        ]
        if during:
            lines += [
                "",
                f"Forgets applied during the last phase: {during['succeeded']} of {during['jobs']}"
                + (
                    f" ({during['unavailable_503']} forget requests answered 503 while the "
                    "follower loaded a version, and retried)"
                    if during.get("unavailable_503")
                    else ""
                )
                + ".",
            ]
        lines += ["", *(f"- {g}" for g in goals(dep["phases"]))]
    return "\n".join(lines) + "\n"


def _wait_idle(log_path: Path, jobs: int, timeout: float, line: str = "after publishing:") -> None:
    """Until ``log_path`` holds ``line`` ``jobs`` times (default: the worker has logged the
    post-publish work of ``jobs`` batches), or ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = log_path.read_text(errors="replace")
        if text.count(line) >= jobs:
            return
        time.sleep(0.1)


def _flag_groups(options: list[str]) -> list[list[str]]:
    """``["--a", "1", "--b"]`` → ``[["--a", "1"], ["--b"]]``: each flag with its values."""
    groups: list[list[str]] = []
    for token in options:
        if token.startswith("--") or not groups:
            groups.append([token])
        else:
            groups[-1].append(token)
    return groups


def worker_options(options: list[str]) -> list[str]:
    """The options of ``options`` (``serve``'s) that ``ntk-unlearn worker`` also takes: all but
    the API's own (``app.cli``'s serve-only flags, ``--no-`` forms included)."""
    from app.cli import _SERVE_ONLY

    kept = []
    for group in _flag_groups(options):
        name = group[0].removeprefix("--").split("=", 1)[0].replace("-", "_")
        if name.removeprefix("no_") not in _SERVE_ONLY:
            kept += group
    return kept


def _ntk_unlearn() -> str:
    exe = Path(sys.executable).parent / "ntk-unlearn"
    return str(exe) if exe.exists() else "ntk-unlearn"


def _niceness(pid: int) -> int | None:
    """The nice value of process ``pid`` (``None`` if it is gone)."""
    try:
        return os.getpriority(os.PRIO_PROCESS, pid)
    except OSError:
        return None


def _stop_group(proc: subprocess.Popen | None) -> None:
    """SIGTERM to ``proc``'s process group, SIGKILL after 30 s."""
    if proc is None or proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
    except ProcessLookupError:
        pass


class SplitDeployment:
    """A private Redis, ``ntk-unlearn worker`` at nice ``nice`` and ``ntk-unlearn serve
    --no-worker`` (the API, a follower) on one data dir; a context manager that always stops
    all three. The same face as ``bench.e2e.Server`` (``port``, ``token``, ``proc``: the API
    process, ``client``, ``wait_ready``, ``log_path``: the worker's log, where it reports its
    post-publish work), plus ``worker``, the worker process.

    Each process is in a process group of its own, stopped whole; the token is in the API
    process's environment, never on a command line.

    Arguments:
      options: the model options (``serve``'s), given to both processes.
      api_options: more options of the API process alone.
      worker_extra: more options of the worker alone.
      log_path: the API process's log; the worker's is beside it (``-worker.log``).
      data_dir: the shared data dir.
      nice: the worker's nice value (19: the lowest CPU priority).
      worker_cpus: ``taskset -c`` list the worker is pinned to (``None``: any CPU).
      worker_idle: run the worker under Linux's ``SCHED_IDLE`` policy (``chrt -i 0``) as well.
    """

    def __init__(
        self,
        options: list[str],
        api_options: list[str],
        worker_extra: list[str],
        log_path: Path,
        data_dir: Path,
        nice: int = 19,
        worker_cpus: str | None = None,
        worker_idle: bool = False,
    ):
        self.port = _free_port()
        self.token = secrets.token_urlsafe(24)
        self.data_dir = data_dir
        self.api_log_path = log_path
        self.log_path = log_path.with_name(log_path.stem + "-worker.log")
        self.nice = nice
        self.worker_cpus = worker_cpus
        self.worker_idle = worker_idle
        exe = _ntk_unlearn()
        self.worker_command = [exe, "worker", *options, *worker_extra, "--data-dir", str(data_dir)]
        self.command = [
            exe, "serve", "--no-worker", *options, *api_options,
            "--host", "127.0.0.1", "--port", str(self.port), "--data-dir", str(data_dir),
        ]  # fmt: skip
        self.redis_dir = Path(tempfile.mkdtemp(prefix="ntk-load-redis-"))
        self.redis = None
        self.proc: subprocess.Popen | None = None
        self.worker: subprocess.Popen | None = None
        self._logs: list = []

    def __enter__(self) -> SplitDeployment:
        from app.embedded_redis import EmbeddedRedis

        try:
            self.redis = EmbeddedRedis(self.redis_dir, owner="bench load").start()
            env = {k: v for k, v in os.environ.items() if not k.startswith("NTK_UNLEARN_")}
            env["REDIS_URL"] = self.redis.url
            # ``nice`` execs the worker: the same pid, and every thread it starts inherits it
            pin = ["taskset", "-c", self.worker_cpus] if self.worker_cpus else []
            if self.worker_idle:
                pin += ["chrt", "-i", "0"]
            self.worker = self._start(
                [*pin, "nice", "-n", str(self.nice), *self.worker_command], self.log_path, env
            )
            # the token: in the environment, not on the command line
            self.proc = self._start(
                self.command, self.api_log_path, {**env, "NTK_UNLEARN_API_TOKEN": self.token}
            )
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self, command: list[str], log_path: Path, env: dict) -> subprocess.Popen:
        log = open(log_path, "w")  # closed by stop()
        self._logs.append(log)
        return subprocess.Popen(
            command,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,  # its own process group: stopped whole
        )

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def client(self) -> Client:
        return Client(f"http://127.0.0.1:{self.port}", self.token)

    def wait_ready(self, timeout: float) -> float:
        """Seconds until the API's ``/readyz`` answers 200 and the worker has logged that it
        serves a version. Raises RuntimeError when either exits first, or on timeout."""
        t0 = time.perf_counter()
        client = self.client
        api_ready = worker_ready = False
        while time.perf_counter() - t0 < timeout:
            for name, proc, log in (
                ("worker", self.worker, self.log_path),
                ("serve --no-worker", self.proc, self.api_log_path),
            ):
                if proc.poll() is not None:
                    raise RuntimeError(f"{name} exited with {proc.returncode}; see {log}")
            if not worker_ready:
                worker_ready = "worker applying the jobs of queue" in self.log_path.read_text(
                    errors="replace"
                )
            if not api_ready:
                try:
                    api_ready = client.request("GET", "/readyz")[0] == 200
                except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                    pass
            if api_ready and worker_ready:
                return time.perf_counter() - t0
            time.sleep(0.5)
        raise RuntimeError(
            f"split deployment not ready after {timeout:.0f} s; see {self.api_log_path} and "
            f"{self.log_path}"
        )

    def stop(self) -> None:
        """Stop the API, then the worker (each its whole process group), then Redis."""
        for proc in (self.proc, self.worker):
            _stop_group(proc)
        if self.redis is not None:
            self.redis.stop()
            self.redis = None
        shutil.rmtree(self.redis_dir, ignore_errors=True)
        for log in self._logs:
            if not log.closed:
                log.close()


def _fresh_data_dir(source: Path | None) -> Path:
    """A new temporary data dir: a copy of ``source`` (a built model) without what belongs to
    the run that made it (Redis, locks, token, deletion log), or empty."""
    data_dir = Path(tempfile.mkdtemp(prefix="ntk-load-"))
    if source is not None:
        shutil.copytree(source, data_dir, dirs_exist_ok=True)
        for stale in ("redis", ".lock", "api_token", "deletions.log"):
            path = data_dir / stale
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
    return data_dir


def run_deployment(kind: str, options: list[str], api_options: list[str], args, log=print) -> dict:
    """The phases against one deployment (``single`` or ``split``) of a model.

    Arguments:
      kind: ``single`` (``serve``: API and worker in one process) or ``split`` (``SplitDeployment``).
      options: the model options (``serve``'s: ``--dataset`` and the model's).
      api_options: more ``serve`` options (``--load-serve-args``); in ``split``, the API
        process's, and those a worker also takes go to the worker as well.
      args: the bench's arguments (``load_*``, ``seed``, ``ready_timeout``).

    Returns:
      ``{"deployment", "description", "phases", "ready_s", "loadavg_before", "loadavg_after",
      "logs", "pids", "worker_nice"}``; each phase as ``_summary`` plus its CPU per request.

    Raises:
      RuntimeError: a process exited or was not ready in time.
    """
    nice = getattr(args, "load_worker_nice", 19)
    res: dict = {
        "deployment": kind,
        "description": DEPLOYMENTS[kind].format(
            nice=f"{nice}, SCHED_IDLE" if getattr(args, "load_worker_idle", False) else nice
        ),
        "loadavg_before": list(os.getloadavg()),
        "phases": {},
    }
    data_dir = _fresh_data_dir(args.load_data_dir)
    log_path = Path(tempfile.gettempdir()) / f"ntk-load-{os.getpid()}-{kind}-serve.log"
    if kind == "single":
        deployment = Server(options + api_options, log_path, data_dir)
    else:
        deployment = SplitDeployment(
            options,
            api_options,
            worker_options(api_options),
            log_path,
            data_dir,
            nice,
            getattr(args, "load_worker_cpus", None),
            getattr(args, "load_worker_idle", False),
        )
    probe = StallProbe(Path(tempfile.gettempdir()) / f"ntk-load-{os.getpid()}-{kind}-stalls.txt")
    try:
        with deployment as server, probe:
            res["ready_s"] = server.wait_ready(args.ready_timeout)
            worker = getattr(server, "worker", None)
            pids = (server.proc.pid, None if worker is None else worker.pid)
            res["pids"] = {"api": pids[0]} | ({} if worker is None else {"worker": pids[1]})
            if worker is not None:
                res["worker_nice"] = _niceness(worker.pid)
            res["logs"] = sorted({str(server.log_path), str(log_path)})
            base = f"http://127.0.0.1:{server.port}"
            port, token = server.port, server.token
            ids = all_ids(server.client)
            rows = _rows(options, args.seed)
            rng = np.random.default_rng(args.seed)
            order = [ids[i] for i in rng.permutation(len(ids))]
            enqueue_ids, forget_ids = (
                order[: args.load_forgets],
                order[args.load_forgets : 2 * args.load_forgets + 200],
            )

            phases = (
                ("predict-1, 1 client", rows[:1], 1),
                ("predict-1", rows[:1], args.load_clients),
                ("predict-100", rows[:100], args.load_clients),
            )
            for name, x, clients in phases:
                asyncio.run(_predict_load(port, token, x, clients, 1.0))
                res["phases"][name] = _timed(
                    _predict_load(port, token, x, clients, args.load_seconds, pids)
                )
                log(f"{kind}: {name}: {_line(res['phases'][name])}")
            enqueue, jobs = _timed(_enqueue_latency(port, token, enqueue_ids, pids))
            res["phases"]["enqueue"] = enqueue
            log(f"{kind}: enqueue: {_line(enqueue)}")
            # Let the worker apply the enqueued jobs (and finish after them) before predictions
            # are measured again.
            follower_log = None if worker is None else server.api_log_path
            enqueue["applied"] = _wait_applied(
                server.client, jobs, server.log_path, 600, follower_log
            )
            log(f"{kind}: enqueued jobs applied: {enqueue['applied']}")
            time.sleep(2.0)
            # The same load again with nothing else running: what the slowest of this many
            # predictions is when no forget runs (the literal goal's control).
            res["phases"][CONTROL] = _timed(
                _predict_load(port, token, rows[:1], args.load_clients, args.load_seconds, pids)
            )
            log(f"{kind}: {CONTROL}: {_line(res['phases'][CONTROL])}")
            during = "predict-1 during forgets"
            res["phases"][during] = _timed(
                _during_forgets(base, port, token, rows[:1], forget_ids, args, pids)
            )
            log(f"{kind}: {during}: {_line(res['phases'][during])}")
            for phase in res["phases"].values():
                probe.classify(phase)
            res["stall_probe"] = {"path": str(probe.path), "realtime": probe.realtime}
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)
    res["loadavg_after"] = list(os.getloadavg())
    return res


def run(args, log=print) -> dict:
    """Every deployment of ``--load-deployment`` (``both``: ``single``, then ``split``), one
    after the other, each on its own copy of the data dir (``run_deployment``)."""
    workload = args.workload if args.workload in ("digits", "mnist") else "digits"
    options = serve_args(workload, args)
    api_options = list(args.load_serve_args or [])
    chosen = getattr(args, "load_deployment", "single")
    kinds = ["single", "split"] if chosen == "both" else [chosen]
    res: dict = {
        "workload": workload,
        "serve_options": options + api_options,
        "clients": args.load_clients,
        "seconds_per_phase": args.load_seconds,
        "loadavg_before": list(os.getloadavg()),
        "deployments": {},
    }
    for kind in kinds:
        res["deployments"][kind] = run_deployment(kind, options, api_options, args, log)
    res["loadavg_after"] = list(os.getloadavg())
    return res
