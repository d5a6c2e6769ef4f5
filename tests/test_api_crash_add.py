"""An addition (``POST /v1/records``) killed with SIGKILL between two steps of its order (the same
kill points as a deletion's, docs/design.md, The order of a deletion), in a real ``serve`` process
with its embedded Redis, then restarted: the job is neither lost nor applied twice, and the model
equals an uninterrupted run's."""

from __future__ import annotations

import json
import os
import re
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

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "crash-test-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """One ``serve`` process (linear model, squared error, float64); its output goes to ``log``."""

    def __init__(self, data_dir: Path, dataset: Path, log: Path, env: dict[str, str] | None = None):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        environ = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", CRASH_ENV)}
        environ["PYTHONPATH"] = str(ROOT)
        environ.update(env or {})
        self.log = log
        with open(log, "w") as out:
            self.proc = subprocess.Popen(
                [
                    sys.executable, "-m", "app", "serve", "--dataset", f"npz:{dataset}",
                    "--model", "linear", "--loss", "mse", "--dtype", "float64",
                    "--data-dir", str(data_dir), "--port", str(self.port), "--api-token", TOKEN,
                ],
                cwd=ROOT, env=environ, stdout=out, stderr=subprocess.STDOUT,
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

    def redis(self) -> redis.Redis:
        sock = re.search(r"embedded Redis \S+ on (\S+) \(pid", self.log.read_text()).group(1)
        return redis.Redis(unix_socket_path=sock, decode_responses=True)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(60)


ADDED = ["added-1", "added-2", "added-3"]


def _records(dataset_file: Path) -> dict:
    with np.load(dataset_file) as f:
        x = f["x"][:3].astype(np.float64) * 1.5 - 0.25
    return {"ids": ADDED, "x": x.tolist(), "y": [2, 0, 1]}


def _read(server: Server, x: list) -> dict:
    return {"model": server.get("/v1/model"), "outputs": server.post("/v1/predict", {"x": x})}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory, dataset_file: Path) -> dict:
    """What a run without a crash serves after the addition."""
    tmp = tmp_path_factory.mktemp("uninterrupted-add")
    x = (np.load(dataset_file)["x"][:6] + 0.1).tolist()
    server = Server(tmp / "data", dataset_file, tmp / "ref.log")
    try:
        server.wait_ready()
        job = server.post("/v1/records", _records(dataset_file), status=202)
        assert server.wait_job(job["job_id"])["status"] == "succeeded"
        out = _read(server, x)
    finally:
        server.stop()
    return {"x": x, **out}


@pytest.mark.parametrize("point", ["checkpointed", "logged", "published", "reported", "purged"])
def test_a_kill_between_two_steps_of_an_addition_is_finished_at_restart(
    tmp_path: Path, dataset_file: Path, uninterrupted: dict, point: str
):
    data = tmp_path / "data"
    first = Server(data, dataset_file, tmp_path / "1.log", env={CRASH_ENV: point})
    try:
        first.wait_ready()
        job = first.post("/v1/records", _records(dataset_file), status=202)
        first.proc.wait(120)  # it kills itself at the crash point
    finally:
        first.stop()
    log1 = (tmp_path / "1.log").read_text()
    assert first.proc.returncode == -signal.SIGKILL, f"the server was not killed:\n{log1}"

    second = Server(data, dataset_file, tmp_path / "2.log")
    try:
        second.wait_ready()
        done = second.wait_job(job["job_id"])
        after = _read(second, uninterrupted["x"])
        again = second.post("/v1/records", _records(dataset_file), status=409)
        client = second.redis()
        job_keys = list(client.scan_iter(f"*:job:{job['job_id']}"))
        stored = client.hgetall(job_keys[0])
        pending = [client.scard(k) for k in client.scan_iter("*:pending*")]
        client.close()
    finally:
        second.stop()
    log2 = (tmp_path / "2.log").read_text()
    assert second.proc.returncode == 0, log2
    # 0 lost, 0 applied twice: the job succeeded, as version 1, logged once
    assert done["status"] == "succeeded" and done["model_version"] == 1, log2
    assert done["kind"] == "add"
    assert all(i in again["detail"] for i in ADDED)  # they are in the model now
    versions = [json.loads(line) for line in (data / "deletions.log").read_text().splitlines()]
    assert [(v["version"], v["kind"], v["job_ids"]) for v in versions] == [
        (1, "add", [job["job_id"]])
    ]
    assert len(versions[0]["added_digests"]) == 3
    assert not any(i in (data / "deletions.log").read_text() for i in ADDED)
    # state equal to an uninterrupted run
    for key in ("version", "n_train", "n_forgotten"):
        assert after["model"][key] == uninterrupted["model"][key], key
    np.testing.assert_allclose(
        after["outputs"]["outputs"], uninterrupted["outputs"]["outputs"], rtol=1e-9, atol=1e-12
    )
    # Redis: the job holds neither its records nor its ids any more, and reserves nothing
    assert "records" not in stored and "ids" not in stored and stored["status"] == "succeeded"
    assert pending == [0] * len(pending)
    assert sorted(p.name for p in (data / "checkpoints").iterdir()) == ["1"]
