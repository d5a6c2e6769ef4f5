"""HTTP load on a running service (``ntk-unlearn bench load``): predictions alone and while forgets run.

One ``ntk-unlearn serve`` (API and worker, its private Redis) is started as a child process on
127.0.0.1 with a copy of ``--load-data-dir`` (a data dir holding a built model, so no run pays for
the build; without it the model is built first), then, with ``--load-clients`` concurrent clients
(asyncio + httpx, one keep-alive connection each, closed loop: each sends its next request when
the previous one is answered):

1. ``predict-1, 1 client`` (one client: the latency of one request), then ``predict-1`` and
   ``predict-100``: ``POST /v1/predict`` with 1 and with 100 rows of the data set, each for
   ``--load-seconds`` after a 1 s warm-up;
2. ``enqueue``: ``POST /v1/forget`` of one id at a time from one client, ``--load-forgets`` times
   (the time to the 202: validation and the Redis enqueue), while the worker applies them;
3. ``predict-1 during forgets``: phase 1 again while a second task keeps the worker busy with one
   forget after another (each waits for the previous job to succeed).

Reported per phase: requests/s, predictions (rows) per second, p50/p99/max latency in ms,
errors; the load average before and after; the commit, the command and the settings. The
results go to ``<out>/load.json`` and ``<out>/load.md``.
"""

from __future__ import annotations

import asyncio
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


async def _predict_load(base: str, token: str, x: list, clients: int, seconds: float) -> dict:
    """``clients`` closed-loop clients posting ``x`` to /v1/predict for ``seconds``."""
    import httpx

    latencies: list[float] = []
    errors = 0
    headers = {"Authorization": f"Bearer {token}"}
    body = {"x": x}
    stop_at = time.perf_counter() + seconds

    async def one(client: httpx.AsyncClient) -> None:
        nonlocal errors
        while time.perf_counter() < stop_at:
            t0 = time.perf_counter()
            r = await client.post("/v1/predict", json=body, headers=headers)
            if r.status_code == 200:
                latencies.append(time.perf_counter() - t0)
            else:
                errors += 1

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=base, limits=limits, timeout=60) as client:
        started = time.perf_counter()
        await asyncio.gather(*(one(client) for _ in range(clients)))
        elapsed = time.perf_counter() - started
    return _summary(latencies, elapsed, len(x), errors)


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


async def _enqueue_latency(base: str, token: str, ids: list[str]) -> dict:
    import httpx

    headers = {"Authorization": f"Bearer {token}"}
    latencies = []
    errors = 0
    async with httpx.AsyncClient(base_url=base, timeout=60) as client:
        started = time.perf_counter()
        for rid in ids:
            t0 = time.perf_counter()
            r = await client.post("/v1/forget", json={"ids": [rid]}, headers=headers)
            if r.status_code == 202:
                latencies.append(time.perf_counter() - t0)
            else:
                errors += 1
        elapsed = time.perf_counter() - started
    return _summary(latencies, elapsed, 1, errors)


async def _during_forgets(base: str, token: str, x: list, ids: list[str], args) -> dict:
    stop = asyncio.Event()
    forgets = asyncio.create_task(_forget_loop(base, token, ids, stop))
    await asyncio.sleep(0.5)  # the first job is being applied
    result = await _predict_load(base, token, x, args.load_clients, args.load_seconds)
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
        f"{phase['errors']} errors"
    )


def markdown(res: dict) -> str:
    """The results table of one run."""
    lines = [
        f"Commit `{res.get('commit')}`, `{res.get('command')}`; `serve {' '.join(res['serve_options'])}`; "
        f"{res['clients']} clients, {res['seconds_per_phase']:g} s per phase; load average "
        f"{', '.join(f'{v:.1f}' for v in res['loadavg_before'])} before, "
        f"{', '.join(f'{v:.1f}' for v in res['loadavg_after'])} after.",
        "",
        "| phase | requests/s | predictions/s | p50 ms | p99 ms | max ms | errors |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, ph in res["phases"].items():
        rows = "" if name == "enqueue" else f"{ph['predictions_per_s']:.0f}"
        lines.append(
            f"| {name} | {ph['requests_per_s']:.0f} | {rows} | {ph['p50_ms']:.1f} | "
            f"{ph['p99_ms']:.1f} | {ph['max_ms']:.1f} | {ph['errors']} |"
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
                asyncio.run(_predict_load(base, server.token, x, clients, 1.0))
                res["phases"][name] = asyncio.run(
                    _predict_load(base, server.token, x, clients, args.load_seconds)
                )
                log(f"{name}: {_line(res['phases'][name])}")
            res["phases"]["enqueue"] = asyncio.run(
                _enqueue_latency(base, server.token, enqueue_ids)
            )
            log(f"enqueue: {_line(res['phases']['enqueue'])}")
            # Let the worker apply the enqueued jobs before predictions are measured again.
            _wait_idle(server, 1, 300)
            time.sleep(2.0)
            res["phases"]["predict-1 during forgets"] = asyncio.run(
                _during_forgets(base, server.token, rows[:1], forget_ids, args)
            )
            log(f"predict-1 during forgets: {_line(res['phases']['predict-1 during forgets'])}")
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)
    res["loadavg_after"] = list(os.getloadavg())
    res["serve_log"] = str(log_path)
    return res
