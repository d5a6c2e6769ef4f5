"""HTTP load on a running service (``ntk-unlearn bench load``): predictions alone and while forgets run.

One ``ntk-unlearn serve`` (API and worker, its private Redis) is started as a child process on
127.0.0.1 with a copy of ``--load-data-dir`` (a data dir holding a built model, so no run pays for
the build; without it the model is built first), then, with ``--load-clients`` concurrent clients
(closed loop: each sends its next request when the previous one is answered, on one keep-alive
connection of its own):

1. ``predict-1, 1 client`` (one client: the latency of one request), then ``predict-1`` and
   ``predict-100``: ``POST /v1/predict`` with 1 and with 100 rows of the data set, each for
   ``--load-seconds`` after a 1 s warm-up;
2. ``enqueue``: ``POST /v1/forget`` of one id at a time from one client, ``--load-forgets`` times
   (the time to the 202: validation and the Redis enqueue), while the worker applies them;
3. ``predict-1 during forgets``: phase 1 again while a second task keeps the worker busy with one
   forget after another (each waits for the previous job to succeed).

Reported per phase: requests/s, predictions (rows) per second, p50/p99/max latency in ms,
errors, and CPU seconds per request of the server process (all its threads, and its event loop's
thread alone) and of this load generator; the load average before and after; the commit, the
command and the settings. The results go to ``<out>/load.json`` and ``<out>/load.md``.

CPU per request is the measure that least depends on what else the machine runs: on a shared
machine wall-clock rates and latencies move with the other processes, the CPU a request costs
much less. The clients are plain asyncio streams writing one pre-encoded request (headers and
JSON body) and reading the answer by its ``Content-Length``: about 0.2 ms of CPU per request,
where httpx took a whole core of the two at 150 requests/s. Latency is still the time from
writing the request to having read the whole answer.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from .e2e import Server, all_ids, serve_args


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
    """CPU seconds spent during a phase by the server (all threads; its main thread, which runs
    the event loop) and by this process (the clients)."""

    def __init__(self, server_pid: int | None):
        self.pid = server_pid

    def __enter__(self) -> _CpuMeter:
        self.start = self._read()
        return self

    def __exit__(self, *exc) -> None:
        self.spent = [b - a for a, b in zip(self.start, self._read(), strict=True)]

    def _read(self) -> tuple[float, float, float]:
        if self.pid is None:
            return (float("nan"),) * 2 + (time.process_time(),)
        return _cpu_seconds(self.pid), _cpu_seconds(self.pid, self.pid), time.process_time()

    def per_request(self, requests: int) -> dict:
        server, loop, client = (
            1e3 * v / requests if requests else float("nan") for v in self.spent
        )
        return {"server_cpu_ms": server, "server_loop_cpu_ms": loop, "client_cpu_ms": client}


def _http_request(port: int, method: str, path: str, token: str, body: object) -> bytes:
    """One HTTP/1.1 request, encoded once: what a client writes each time."""
    payload = json.dumps(body).encode()
    return (
        f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAuthorization: Bearer {token}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n"
    ).encode() + payload


class _Connection:
    """A keep-alive HTTP/1.1 connection that sends pre-encoded requests (``_http_request``)."""

    def __init__(self, port: int):
        self.port = port
        self.reader: asyncio.StreamReader | None = None

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
        await self.reader.readexactly(length)
        if close:
            self.close()
        return int(head[9:12])

    def close(self) -> None:
        if self.reader is not None:
            self.writer.close()
            self.reader = None


async def _predict_load(
    port: int, token: str, x: list, clients: int, seconds: float, server_pid: int | None = None
) -> dict:
    """``clients`` closed-loop clients posting ``x`` to /v1/predict for ``seconds``."""
    latencies: list[float] = []
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
                else:
                    errors += 1
        finally:
            conn.close()

    with _CpuMeter(server_pid) as cpu:
        started = time.perf_counter()
        await asyncio.gather(*(one() for _ in range(clients)))
        elapsed = time.perf_counter() - started
    return {
        **_summary(latencies, elapsed, len(x), errors),
        **cpu.per_request(len(latencies) + errors),
    }


async def _forget_loop(base: str, token: str, ids: list[str], stop: asyncio.Event) -> dict:
    """Forget ``ids`` one at a time, each after the previous job succeeded, until ``stop``."""
    import httpx

    headers = {"Authorization": f"Bearer {token}"}
    jobs = []
    async with httpx.AsyncClient(base_url=base, timeout=120) as client:
        for rid in ids:
            if stop.is_set():
                break
            t0 = time.perf_counter()
            r = await client.post("/v1/forget", json={"ids": [rid]}, headers=headers)
            r.raise_for_status()
            url = r.json()["status_url"]
            while (job := (await client.get(url, headers=headers)).json())["status"] not in (
                "succeeded",
                "failed",
            ):
                await asyncio.sleep(0.02)
            jobs.append({"status": job["status"], "seconds": time.perf_counter() - t0})
    return {"jobs": len(jobs), "succeeded": sum(j["status"] == "succeeded" for j in jobs)}


async def _enqueue_latency(port: int, token: str, ids: list[str], server_pid: int | None) -> dict:
    latencies = []
    errors = 0
    conn = _Connection(port)
    with _CpuMeter(server_pid) as cpu:
        started = time.perf_counter()
        for rid in ids:
            request = _http_request(port, "POST", "/v1/forget", token, {"ids": [rid]})
            t0 = time.perf_counter()
            if await conn.send(request) == 202:
                latencies.append(time.perf_counter() - t0)
            else:
                errors += 1
        elapsed = time.perf_counter() - started
    conn.close()
    return {**_summary(latencies, elapsed, 1, errors), **cpu.per_request(len(ids))}


async def _during_forgets(
    base: str, port: int, token: str, x: list, ids: list[str], args, server_pid: int | None
) -> dict:
    stop = asyncio.Event()
    forgets = asyncio.create_task(_forget_loop(base, token, ids, stop))
    await asyncio.sleep(0.5)  # the first job is being applied
    result = await _predict_load(port, token, x, args.load_clients, args.load_seconds, server_pid)
    stop.set()
    result["forgets"] = await forgets
    return result


def _rows(options: list[str], seed: int) -> list:
    """100 input rows of the served data set (its training points), as JSON lists."""
    from service_core import load_dataset

    dataset = load_dataset(options[options.index("--dataset") + 1], seed=seed)
    x = dataset.x[:100]
    return x.reshape(len(x), -1).tolist()


def _line(phase: dict) -> str:
    return (
        f"{phase['requests_per_s']:.0f} req/s, {phase['predictions_per_s']:.0f} rows/s, "
        f"p50 {phase['p50_ms']:.1f} ms, p99 {phase['p99_ms']:.1f} ms, max {phase['max_ms']:.1f} ms, "
        f"{phase['errors']} errors; CPU per request: server {phase['server_cpu_ms']:.2f} ms "
        f"(event loop {phase['server_loop_cpu_ms']:.2f}), clients {phase['client_cpu_ms']:.2f} ms"
    )


def markdown(res: dict) -> str:
    """The results table of one run."""
    lines = [
        f"Commit `{res.get('commit')}`, `{res.get('command')}`; `serve {' '.join(res['serve_options'])}`; "
        f"{res['clients']} clients, {res['seconds_per_phase']:g} s per phase; load average "
        f"{', '.join(f'{v:.1f}' for v in res['loadavg_before'])} before, "
        f"{', '.join(f'{v:.1f}' for v in res['loadavg_after'])} after.",
        "",
        "| phase | requests/s | predictions/s | p50 ms | p99 ms | max ms | errors "
        "| server CPU ms/req | its event loop | clients |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, ph in res["phases"].items():
        rows = "" if name == "enqueue" else f"{ph['predictions_per_s']:.0f}"
        lines.append(
            f"| {name} | {ph['requests_per_s']:.0f} | {rows} | {ph['p50_ms']:.1f} | "
            f"{ph['p99_ms']:.1f} | {ph['max_ms']:.1f} | {ph['errors']} | "
            f"{ph.get('server_cpu_ms', float('nan')):.2f} | "
            f"{ph.get('server_loop_cpu_ms', float('nan')):.2f} | "
            f"{ph.get('client_cpu_ms', float('nan')):.2f} |"
        )
    during = res["phases"].get("predict-1 during forgets", {}).get("forgets")
    if during:
        lines += [
            "",
            f"Forgets applied during the last phase: {during['succeeded']} of {during['jobs']}.",
        ]
    return "\n".join(lines) + "\n"


def _wait_idle(server: Server, jobs: int, timeout: float) -> None:
    """Until the worker has logged the post-publish work of ``jobs`` batches (or ``timeout``)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = server.log_path.read_text(errors="replace")
        if text.count("after publishing:") >= jobs:
            return
        time.sleep(0.1)


def run(args, log=print) -> dict:
    workload = args.workload if args.workload in ("digits", "mnist") else "digits"
    options = serve_args(workload, args) + list(args.load_serve_args or [])
    data_dir = Path(tempfile.mkdtemp(prefix="ntk-load-"))
    if args.load_data_dir is not None:
        shutil.copytree(args.load_data_dir, data_dir, dirs_exist_ok=True)
        for stale in ("redis", ".lock", "api_token", "deletions.log"):
            path = data_dir / stale
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
    log_path = Path(tempfile.gettempdir()) / f"ntk-load-{os.getpid()}-serve.log"
    res: dict = {
        "workload": workload,
        "serve_options": options,
        "clients": args.load_clients,
        "seconds_per_phase": args.load_seconds,
        "loadavg_before": list(os.getloadavg()),
        "phases": {},
    }
    try:
        with Server(options, log_path, data_dir) as server:
            res["ready_s"] = server.wait_ready(args.ready_timeout)
            base = f"http://127.0.0.1:{server.port}"
            port, pid = server.port, server.proc.pid
            client = server.client
            ids = all_ids(client)
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
                asyncio.run(_predict_load(port, server.token, x, clients, 1.0))
                res["phases"][name] = asyncio.run(
                    _predict_load(port, server.token, x, clients, args.load_seconds, pid)
                )
                log(f"{name}: {_line(res['phases'][name])}")
            res["phases"]["enqueue"] = asyncio.run(
                _enqueue_latency(port, server.token, enqueue_ids, pid)
            )
            log(f"enqueue: {_line(res['phases']['enqueue'])}")
            # Let the worker apply the enqueued jobs before predictions are measured again.
            _wait_idle(server, 1, 300)
            time.sleep(2.0)
            res["phases"]["predict-1 during forgets"] = asyncio.run(
                _during_forgets(base, port, server.token, rows[:1], forget_ids, args, pid)
            )
            log(f"predict-1 during forgets: {_line(res['phases']['predict-1 during forgets'])}")
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)
    res["loadavg_after"] = list(os.getloadavg())
    res["serve_log"] = str(log_path)
    return res
