"""The load generator's HTTP client and CPU meter (``bench.load``), against a plain asyncio
server that records what it receives; the split deployment (``worker`` + ``serve --no-worker``)
through every phase on a small model."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time
from pathlib import Path

import numpy as np
import pytest

from bench import load
from bench.load import _Connection, _cpu_seconds, _http_request, worker_options


def test_a_connection_sends_the_encoded_request_and_reads_each_whole_answer():
    received: list[bytes] = []
    connections = 0

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        while True:
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except asyncio.IncompleteReadError:
                break
            length = int(
                next(ln for ln in head.split(b"\r\n") if ln.startswith(b"Content-Length"))[15:]
            )
            body = await reader.readexactly(length)
            received.append(body)
            answer = b'{"n": %d}' % len(received) * 3  # a body longer than one header line
            close = b"Connection: close\r\n" if len(received) == 2 else b""
            writer.write(
                b"HTTP/1.1 %d OK\r\nContent-Length: %d\r\n%s\r\n"
                % (200 if len(received) != 3 else 422, len(answer), close)
                + answer
            )
            await writer.drain()
            if close:
                break
        writer.close()

    async def run() -> list[int]:
        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        request = _http_request(port, "POST", "/v1/predict", "tok", {"x": [[1.5, 2]]})
        conn = _Connection(port)
        codes = [await conn.send(request) for _ in range(4)]
        conn.close()
        server.close()
        await server.wait_closed()
        return codes

    codes = asyncio.run(run())
    assert codes == [200, 200, 422, 200]
    # the body as JSON, the same each time; the connection reopened after "Connection: close"
    assert [json.loads(b) for b in received] == [{"x": [[1.5, 2]]}] * 4
    assert connections == 2


def test_cpu_seconds_of_a_process_follow_its_cpu_time():
    before, own_before = _cpu_seconds(os.getpid()), time.process_time()
    end = time.process_time() + 0.3
    while time.process_time() < end:
        pass
    spent, own = _cpu_seconds(os.getpid()) - before, time.process_time() - own_before
    assert abs(spent - own) < 0.05 + 0.1 * own


def test_worker_options_drop_the_api_only_flags():
    options = ["--predict-batch-wait-ms", "0", "--lam", "0.01", "--no-worker", "--refine"]
    assert worker_options(options) == ["--lam", "0.01", "--refine"]


@pytest.mark.slow
def test_the_split_deployment_runs_every_phase_and_applies_its_forgets(tmp_path):
    """``worker`` (niced) + ``serve --no-worker`` on a private Redis, through every phase of
    ``bench load`` on a small model: no error, the forgets of the last phase succeed through the
    follower, and all three processes are gone afterwards."""
    rng = np.random.default_rng(2)
    n, features, classes = 120, 6, 3
    y = np.arange(n) % classes
    x = rng.normal(scale=2.0, size=(classes, features))[y] + rng.normal(size=(n, features))
    data = tmp_path / "small.npz"
    np.savez(data, x=x.astype(np.float32), y=y, ids=np.array([f"r{i:03d}" for i in range(n)]))
    options = [
        "--dataset", f"npz:{data}", "--model", "mlp", "--width", "32", "--depth", "1",
        "--loss", "mse", "--nystrom-rank", "0",
    ]  # fmt: skip
    args = argparse.Namespace(
        load_clients=2,
        load_seconds=1.5,
        load_forgets=3,
        load_data_dir=None,
        load_worker_nice=19,
        seed=0,
        ready_timeout=240,
    )
    res = load.run_deployment("split", options, ["--predict-batch-wait-ms", "0"], args)

    assert res["deployment"] == "split" and res["worker_nice"] == 19
    assert list(res["phases"]) == [
        "predict-1, 1 client",
        "predict-1",
        "predict-100",
        "enqueue",
        "predict-1 again, no forgets",
        "predict-1 during forgets",
    ]
    for name, phase in res["phases"].items():
        assert phase["errors"] == 0, name
        assert phase["requests"] > 0, name
        assert phase["worker_cpu_ms"] >= 0, name  # the worker's CPU is metered apart
        assert "_spans" not in phase, name  # per-request times stay out of load.json
        if name != "enqueue":  # the stall probe's classification of each prediction phase
            assert phase["stalls"] >= 0 and phase["max_ms_outside_stalls"] <= phase["max_ms"]
    assert res["stall_probe"]["path"] and not load.StallProbe(Path("/nonexistent")).gaps().size
    json.dumps(res)  # what load.json holds
    assert res["phases"]["enqueue"]["requests"] == args.load_forgets
    forgets = res["phases"]["predict-1 during forgets"]["forgets"]
    assert forgets["jobs"] >= 1 and forgets["succeeded"] == forgets["jobs"]
    # the worker's log reports its applied batches; every process of the deployment has stopped
    worker_log = next(Path(p) for p in res["logs"] if p.endswith("-worker.log"))
    assert worker_log.read_text().count("after publishing:") >= 1
    for pid in res["pids"].values():
        assert not Path(f"/proc/{pid}").exists()
    markdown = load.markdown(
        {
            "serve_options": options,
            "clients": 2,
            "seconds_per_phase": 1.5,
            "loadavg_before": res["loadavg_before"],
            "loadavg_after": res["loadavg_after"],
            "deployments": {"split": res},
        }
    )
    assert "**split**" in markdown and "worker CPU ms/req" in markdown


def test_a_timed_phase_runs_with_the_load_generators_collector_off():
    """No cyclic collection inside a timed phase (its pause would count as the service's
    latency); the collector is on again afterwards, whatever the phase raised."""
    import gc

    async def phase():
        return gc.isenabled()

    async def failing():
        raise RuntimeError("phase failed")

    assert gc.isenabled()
    assert load._timed(phase()) is False
    assert gc.isenabled() and gc.get_freeze_count() == 0
    with pytest.raises(RuntimeError):
        load._timed(failing())
    assert gc.isenabled()


def test_the_stall_probe_sets_apart_the_requests_in_flight_during_a_machine_wide_stall(
    tmp_path,
):
    """``StallProbe.classify``: a request overlapping a late wake-up of ``STALL_MS`` or more is
    set apart; the slowest of the others is ``max_ms_outside_stalls``; shorter gaps and gaps
    outside the phase count for nothing. The probe process itself records late wake-ups."""
    probe = load.StallProbe(tmp_path / "stalls.txt")
    t = 1000.0
    probe.path.write_text(
        f"{t + 1.00:.6f} 0.030000 5\n"  # a 30 ms stall ending at t + 1
        f"{t + 2.00:.6f} 0.006000 0\n"  # 6 ms: below STALL_MS
        f"{t + 99.0:.6f} 0.050000 7\n"  # after the phase
    )
    ends = [t + 0.5, t + 1.01, t + 0.99, t + 2.0, t + 3.0]
    latencies = [0.010, 0.045, 0.020, 0.025, 0.015]  # the 2nd and 3rd overlap the stall
    phase = {"max_ms": 45.0, "_spans": (ends, latencies)}
    probe.classify(phase)
    assert "_spans" not in phase and phase["stalls"] == 1
    assert phase["longest_stall_ms"] == pytest.approx(30.0)
    assert phase["max_ms_outside_stalls"] == pytest.approx(25.0)
    assert [s[1] for s in phase["slowest"]] == pytest.approx([45.0, 25.0, 20.0, 15.0, 10.0])
    assert [s[2] for s in phase["slowest"]] == [True, False, True, False, False]
    line = load._outside_stalls(phase, 40.0, 20.0, "while forgets run")
    assert "1 machine-wide stall(s)" in line and "25.0 ms, 1.25×, within the bar" in line

    with load.StallProbe(tmp_path / "live.txt") as live:
        deadline = time.monotonic() + 0.3
        while time.monotonic() < deadline:  # keep this core busy: the probe still wakes
            pass
        time.sleep(0.3)
    assert live.proc.poll() is not None  # stopped
    assert live.path.exists() and live.gaps().shape[1] == 2


def test_the_load_generators_own_stalls_are_set_apart_too(tmp_path):
    """A request in flight while the load generator's event loop was 10 ms or more late
    (``_loop_lag``) is set apart from ``max_ms_outside_any_stall`` like one in a machine-wide
    stall; and the lag task itself records a loop that was held up."""
    probe = load.StallProbe(tmp_path / "stalls.txt")
    t = 1000.0
    probe.path.write_text(f"{t + 1.00:.6f} 0.030000 5\n")  # machine-wide, ending at t + 1
    ends = [t + 0.5, t + 1.01, t + 2.01, t + 3.0]
    latencies = [0.010, 0.045, 0.040, 0.015]  # the 2nd in the machine's, the 3rd in the generator's
    lags = [(t + 2.0, 0.035), (t + 2.5, 0.007)]  # 35 ms, then 7 ms: below STALL_MS
    phase = {"max_ms": 45.0, "_spans": (ends, latencies), "_generator_lags": lags}
    probe.classify(phase)
    assert "_generator_lags" not in phase
    assert phase["stalls"] == 1 and phase["generator_stalls"] == 1
    assert phase["longest_generator_stall_ms"] == pytest.approx(35.0)
    assert phase["max_ms_outside_stalls"] == pytest.approx(40.0)
    assert phase["max_ms_outside_any_stall"] == pytest.approx(15.0)
    assert [s[3] for s in phase["slowest"]] == [False, True, False, False]

    async def held_up() -> list:
        lags: list = []
        watch = asyncio.create_task(load._loop_lag(time.perf_counter() + 0.2, lags))
        await asyncio.sleep(0.05)
        time.sleep(0.03)  # the loop held for 30 ms
        await watch
        return lags

    lags = asyncio.run(held_up())
    assert any(gap >= 0.025 for _, gap in lags)


def test_a_timed_phase_runs_its_clients_at_real_time_priority_when_allowed():
    """The clients' thread is SCHED_FIFO during a timed phase where that is allowed (root, or
    CAP_SYS_NICE), normal scheduling after it whatever the phase raised, and the phase's summary
    says which it was."""

    async def phase():
        return {"policy": os.sched_getscheduler(0)}

    async def failing():
        raise RuntimeError("phase failed")

    try:
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(1))
        os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))
        allowed = True
    except OSError:
        allowed = False
    summary = load._timed(phase())
    assert summary["clients_realtime"] is allowed
    assert summary["policy"] == (os.SCHED_FIFO if allowed else os.SCHED_OTHER)
    assert os.sched_getscheduler(0) == os.SCHED_OTHER
    with pytest.raises(RuntimeError):
        load._timed(failing())
    assert os.sched_getscheduler(0) == os.SCHED_OTHER
    enqueue, jobs = load._timed(_pair())
    assert enqueue["clients_realtime"] is allowed and jobs == []


async def _pair() -> tuple[dict, list]:
    return {}, []
