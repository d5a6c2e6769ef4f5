"""``ntk-unlearn serve`` as a real process, killed with SIGKILL and restarted on its data dir.

It runs with its embedded Redis (no REDIS_URL), so the append-only file and the orphaned server's
shutdown are tested too.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import redis

from app.faults import CRASH_ENV
from service_core import checkpoint

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "crash-test-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """One ``serve`` process; its output goes to ``log``."""

    def __init__(
        self,
        data_dir: Path,
        dataset: Path,
        log: Path,
        dtype: str,
        *extra: str,
        env: dict[str, str] | None = None,
        prefix: tuple[str, ...] = (),
    ):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        environ = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", CRASH_ENV)}
        environ["PYTHONPATH"] = str(ROOT)
        environ.update(env or {})
        self.log = log
        with open(log, "w") as out:
            self.proc = subprocess.Popen(
                [
                    *prefix, sys.executable, "-m", "app", "serve",
                    "--dataset", f"npz:{dataset}",
                    "--model", "linear", "--loss", "mse", "--dtype", dtype,
                    "--data-dir", str(data_dir),
                    "--port", str(self.port),
                    "--api-token", TOKEN,
                    *extra,
                ],
                cwd=ROOT,
                env=environ,
                stdout=out,
                stderr=subprocess.STDOUT,
            )  # fmt: skip

    def wait_ready(self, timeout: float = 180.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.log.read_text()
            try:
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise AssertionError(f"not ready in {timeout} s:\n{self.log.read_text()}")

    def get(self, path: str) -> dict:
        r = httpx.get(self.url + path, headers=AUTH, timeout=30)
        assert r.status_code == 200, r.text
        return r.json()

    def post(self, path: str, body: dict, status: int = 200) -> dict:
        r = httpx.post(self.url + path, json=body, headers=AUTH, timeout=30)
        assert r.status_code == status, r.text
        return r.json()

    def wait_job(self, job_id: str, timeout: float = 120.0) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            job = self.get(f"/v1/jobs/{job_id}")
            if job["status"] in ("succeeded", "failed"):
                return job
            time.sleep(0.1)
        raise AssertionError(f"job {job_id} unfinished:\n{self.log.read_text()}")

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(60)


def _gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.1)
    return False


@pytest.mark.parametrize("dtype", ["auto", "float64"])
def test_a_killed_server_restarts_on_its_checkpoints(tmp_path: Path, dataset_file: Path, dtype):
    data = tmp_path / "data"
    x = np.load(dataset_file)["x"][:4].tolist()

    # 1. API only (no worker): a job is accepted, then the process dies before anyone runs it.
    first = Server(data, dataset_file, tmp_path / "1.log", dtype, "--no-worker")
    try:
        first.wait_ready()
        queued = first.post("/v1/forget", {"ids": ["r01", "r02"]}, status=202)
        redis_pid = int((data / "redis" / "redis.pid").read_text())
        first.kill()
    finally:
        first.stop()
    # The orphaned private Redis is told to stop when its parent dies.
    assert _gone(redis_pid, 30), "embedded redis-server outlived its killed parent"
    assert "building the model" in (tmp_path / "1.log").read_text()
    assert (data / "api_token").exists() is False  # a token was given: none is generated

    # 2. Restart with the worker: the accepted job is applied; apply one more, then kill.
    second = Server(data, dataset_file, tmp_path / "2.log", dtype)
    try:
        second.wait_ready()
        assert second.wait_job(queued["job_id"])["model_version"] == 1
        later = second.post("/v1/forget", {"ids": ["r03"]}, status=202)
        assert second.wait_job(later["job_id"])["model_version"] == 2
        before = second.post("/v1/predict", {"x": x})
        model_before = second.get("/v1/model")
        second.kill()
    finally:
        second.stop()
    log2 = (tmp_path / "2.log").read_text()
    assert "restored model version 0" in log2 and "building the model" not in log2

    # 3. Restart again: same version, same predictions, jobs remembered, nothing retrained.
    third = Server(data, dataset_file, tmp_path / "3.log", dtype)
    try:
        third.wait_ready()
        assert third.get("/v1/model") == model_before
        after = third.post("/v1/predict", {"x": x})
        assert after["model_version"] == 2
        np.testing.assert_array_equal(after["outputs"], before["outputs"])
        assert third.get(f"/v1/jobs/{queued['job_id']}")["status"] == "succeeded"
        assert third.get("/v1/ids?limit=1000")["total"] == 45
        third.post("/v1/forget", {"ids": ["r03"]}, status=409)
    finally:
        third.stop()
    log3 = (tmp_path / "3.log").read_text()
    assert "restored model version 2" in log3 and "building the model" not in log3
    assert third.proc.returncode == 0, log3
    assert "embedded Redis stopped" in log3

    versions = [line for line in (data / "deletions.log").read_text().splitlines() if line]
    assert len(versions) == 2


def test_a_second_serve_on_the_same_data_dir_leaves_the_first_working(
    tmp_path: Path, dataset_file: Path
):
    data = tmp_path / "data"
    first = Server(data, dataset_file, tmp_path / "1.log", "float64")
    try:
        first.wait_ready()
        started = time.monotonic()
        second = Server(data, dataset_file, tmp_path / "2.log", "float64")
        try:
            second.proc.wait(60)
        finally:
            second.stop()
        log2 = (tmp_path / "2.log").read_text()
        assert second.proc.returncode != 0, log2
        assert time.monotonic() - started < 30, "the second serve did not fail fast"
        assert str(data.absolute()) in log2 and f"pid {first.proc.pid}" in log2, log2
        assert "stopping leftover redis-server" not in log2

        # The first one's queue still works: a job is accepted and applied.
        assert first.get("/readyz")["status"] == "ready"
        job = first.post("/v1/forget", {"ids": ["r01"]}, status=202)
        assert first.wait_job(job["job_id"])["status"] == "succeeded"
    finally:
        first.stop()
    assert first.proc.returncode == 0, (tmp_path / "1.log").read_text()


# -- Kill points of a deletion (docs/design.md, The order of a deletion) ---------------------------

PLANTED = "planted-c0ffee-record"
PLANTED_X = np.array([7.123457, -3.456789, 5.987654, -1.234567], np.float32)


@pytest.fixture(scope="module")
def planted_file(tmp_path_factory: pytest.TempPathFactory, dataset_file: Path) -> Path:
    """The small data set with one more record, ``PLANTED``, whose x values occur nowhere else."""
    d = np.load(dataset_file)
    path = tmp_path_factory.mktemp("planted") / "planted.npz"
    np.savez(
        path,
        x=np.concatenate([d["x"], PLANTED_X[None]]),
        y=np.concatenate([d["y"], [0]]),
        ids=np.concatenate([d["ids"], [PLANTED]]),
    )
    return path


FORGET = [PLANTED, "r05"]


def _run_and_read(server: Server, x: list) -> dict:
    return {"model": server.get("/v1/model"), "outputs": server.post("/v1/predict", {"x": x})}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory, planted_file: Path) -> dict:
    """What a run without a crash serves after forgetting ``FORGET``, and the planted record's K
    row as version 0 held it (read from its cached kernel)."""
    tmp = tmp_path_factory.mktemp("uninterrupted")
    x = np.load(planted_file)["x"][:6].tolist()
    server = Server(tmp / "data", planted_file, tmp / "ref.log", "float64")
    try:
        server.wait_ready()
        (cached,) = (tmp / "data" / "ntk-cache").glob("ntk-*.npy")
        k = np.load(cached)
        n = len(np.load(planted_file)["ids"])
        d = k.shape[0] // n
        k_row = k[(n - 1) * d, : 8 * d]  # the planted record's first row, 8 points' columns
        job = server.post("/v1/forget", {"ids": FORGET}, status=202)
        assert server.wait_job(job["job_id"])["status"] == "succeeded"
        out = _run_and_read(server, x)
    finally:
        server.stop()
    return {"x": x, "k_row": k_row, **out}


def _needles(k_row: np.ndarray) -> dict[str, bytes]:
    return {
        "id": PLANTED.encode(),
        "x float32": PLANTED_X.tobytes(),
        "x float64": PLANTED_X.astype(np.float64).tobytes(),
        "K row": np.ascontiguousarray(k_row).tobytes(),
        "K row float32": np.ascontiguousarray(k_row, np.float32).tobytes(),
    }


def _redis_dump(server: Server) -> list[bytes]:
    """Every key of the server's embedded Redis, and the DUMP of each (its socket from the log)."""
    sock = re.search(r"embedded Redis \S+ on (\S+) \(pid", server.log.read_text()).group(1)
    client = redis.Redis(unix_socket_path=sock)
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # the worker's AOF rewrite, then the dump
            info = client.info("persistence")
            if not info["aof_rewrite_in_progress"] and not info["aof_rewrite_scheduled"]:
                break
            time.sleep(0.1)
        return [client.dump(k) or b"" for k in client.scan_iter()] + [k for k in client.scan_iter()]
    finally:
        client.close()


def _assert_nothing_left(data: Path, k_row: np.ndarray, redis_values: list[bytes]) -> None:
    needles = _needles(k_row)
    for path in sorted(p for p in data.rglob("*") if p.is_file()):
        raw = path.read_bytes()
        found = [name for name, needle in needles.items() if needle in raw]
        assert not found, f"{path.relative_to(data)} holds the forgotten record's {found}"
    for value in redis_values:
        assert needles["id"] not in value, "a Redis key holds the forgotten id in clear"
    # Decoded: the one checkpoint left holds neither the record's x nor its id.
    assert sorted(p.name for p in (data / "checkpoints").iterdir()) == ["1"]
    state = checkpoint.restore(data / "checkpoints")
    assert PLANTED not in state.ids.tolist()
    assert not np.any(np.all(np.isclose(np.asarray(state.x), PLANTED_X, atol=1e-6), axis=1))
    assert PLANTED not in json.dumps(state.metadata())


def _crash_then_recover(tmp_path, planted_file, uninterrupted, env=None, prefix=()) -> None:
    data = tmp_path / "data"
    first = Server(data, planted_file, tmp_path / "1.log", "float64", env=env, prefix=prefix)
    try:
        first.wait_ready()
        job = first.post("/v1/forget", {"ids": FORGET}, status=202)
        first.proc.wait(120)  # it kills itself at the crash point
    finally:
        first.stop()
    log1 = (tmp_path / "1.log").read_text()
    assert first.proc.returncode != 0, f"the server was not killed:\n{log1}"

    second = Server(data, planted_file, tmp_path / "2.log", "float64")
    try:
        second.wait_ready()
        done = second.wait_job(job["job_id"])
        after = _run_and_read(second, uninterrupted["x"])
        values = _redis_dump(second)
    finally:
        second.stop()
    log2 = (tmp_path / "2.log").read_text()
    assert second.proc.returncode == 0, log2
    # 0 lost, 0 applied twice: the job succeeded, as version 1, logged once.
    assert done["status"] == "succeeded" and done["model_version"] == 1, log2
    versions = [json.loads(line) for line in (data / "deletions.log").read_text().splitlines()]
    assert [(v["version"], v["job_ids"]) for v in versions] == [(1, [job["job_id"]])]
    # state equal to an uninterrupted run
    for key in ("version", "n_train", "n_forgotten"):
        assert after["model"][key] == uninterrupted["model"][key], key
    np.testing.assert_allclose(
        after["outputs"]["outputs"], uninterrupted["outputs"]["outputs"], rtol=1e-9, atol=1e-12
    )
    _assert_nothing_left(data, uninterrupted["k_row"], values)


@pytest.mark.parametrize("point", ["checkpointed", "logged", "published", "reported", "purged"])
def test_a_kill_between_two_steps_of_a_deletion_is_finished_at_restart(
    tmp_path: Path, planted_file: Path, uninterrupted: dict, point: str
):
    _crash_then_recover(tmp_path, planted_file, uninterrupted, env={CRASH_ENV: point})


@pytest.mark.skipif(shutil.which("strace") is None, reason="strace is not installed")
def test_a_kill_at_the_first_file_deletion_is_finished_at_restart(
    tmp_path: Path, planted_file: Path, uninterrupted: dict
):
    trace = tmp_path / "strace.out"
    prefix = (
        "strace", "-f", "-o", str(trace), "-e", "trace=unlinkat",
        "-e", "inject=unlinkat:signal=SIGKILL:when=1",
    )  # fmt: skip
    _crash_then_recover(tmp_path, planted_file, uninterrupted, prefix=prefix)
    assert "+++ killed by SIGKILL" in trace.read_text()


def test_a_kill_during_the_first_start_is_finished_at_restart(
    tmp_path: Path, planted_file: Path, uninterrupted: dict
):
    """Killed after training version 0, before its checkpoint: the restart builds it again, and
    the model then forgets like an uninterrupted one."""
    data = tmp_path / "data"
    first = Server(data, planted_file, tmp_path / "1.log", "float64", env={CRASH_ENV: "built"})
    try:
        first.proc.wait(180)
    finally:
        first.stop()
    log1 = (tmp_path / "1.log").read_text()
    assert first.proc.returncode != 0 and "built and trained" in log1, log1
    assert not any(p.name.isdigit() for p in (data / "checkpoints").glob("*"))

    second = Server(data, planted_file, tmp_path / "2.log", "float64")
    try:
        second.wait_ready()
        job = second.post("/v1/forget", {"ids": FORGET}, status=202)
        assert second.wait_job(job["job_id"])["model_version"] == 1
        after = _run_and_read(second, uninterrupted["x"])
        values = _redis_dump(second)
    finally:
        second.stop()
    assert "building the model" in (tmp_path / "2.log").read_text()
    np.testing.assert_allclose(
        after["outputs"]["outputs"], uninterrupted["outputs"]["outputs"], rtol=1e-9, atol=1e-12
    )
    _assert_nothing_left(data, uninterrupted["k_row"], values)
