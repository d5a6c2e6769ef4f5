"""``ntk-unlearn serve`` as a real process, killed with SIGKILL and restarted on its data dir.

It runs with its embedded Redis (no REDIS_URL), so the append-only file and the orphaned server's
shutdown are tested too.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

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

    def __init__(self, data_dir: Path, dataset: Path, log: Path, dtype: str, *extra: str):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {k: v for k, v in os.environ.items() if k != "REDIS_URL"}
        env["PYTHONPATH"] = str(ROOT)
        self.log = log
        with open(log, "w") as out:
            self.proc = subprocess.Popen(
                [
                    sys.executable, "-m", "app", "serve",
                    "--dataset", f"npz:{dataset}",
                    "--model", "linear", "--loss", "mse", "--dtype", dtype,
                    "--data-dir", str(data_dir),
                    "--port", str(self.port),
                    "--api-token", TOKEN,
                    *extra,
                ],
                cwd=ROOT,
                env=env,
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


@pytest.mark.parametrize("dtype", ["float32", "float64"])
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
