"""Scale-out as real processes on one data dir and one Redis: ``worker`` processes and
``serve --no-worker`` API processes started together on an empty data dir build the model once
and all come up; once a job is reported succeeded, no API process serves the version before it,
and a re-forget through any of them is 409.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import numpy as np
import pytest
import redis

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "scale-out-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Proc:
    """One ``ntk-unlearn`` process (``worker``, or ``serve --no-worker`` when given a port)."""

    def __init__(self, name: str, command: list[str], log: Path, env: dict[str, str], port=None):
        self.name, self.log, self.port = name, log, port
        self.url = f"http://127.0.0.1:{port}" if port else None
        with open(log, "w") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "app", *command],
                cwd=ROOT,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )

    def text(self) -> str:
        return self.log.read_text()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


@pytest.fixture(scope="module")
def scale_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """200 points: building version 0 (with compilation) overlaps the other processes' start."""
    rng = np.random.default_rng(1)
    n, features, classes = 200, 8, 3
    y = np.arange(n) % classes
    x = rng.normal(scale=2.0, size=(classes, features))[y] + rng.normal(size=(n, features))
    ids = np.array([f"p{i:03d}" for i in range(n)])
    path = tmp_path_factory.mktemp("scale") / "scale.npz"
    np.savez(path, x=x.astype(np.float32), y=y, ids=ids)
    return path


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, scale_dataset: Path, redis_url: str):
    """2 workers and 2 API processes without a worker, started at once on an empty data dir
    (once for the module: starting them is most of its time)."""
    tmp_path = tmp_path_factory.mktemp("cluster")
    data = tmp_path / "data"
    redis_prefix = f"test-{uuid.uuid4().hex[:12]}"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("REDIS_URL", "NTK_UNLEARN"))}
    env.update(REDIS_URL=redis_url, NTK_UNLEARN_API_TOKEN=TOKEN, PYTHONPATH=str(ROOT))
    common = [
        "--dataset", f"npz:{scale_dataset}", "--model", "mlp", "--width", "64", "--depth", "1",
        "--loss", "mse", "--nystrom-rank", "0", "--data-dir", str(data), "--redis-prefix", redis_prefix,
    ]  # fmt: skip
    procs: list[Proc] = []
    for i in range(2):
        procs.append(Proc(f"worker{i}", ["worker", *common], tmp_path / f"worker{i}.log", env))
        port = _free_port()
        procs.append(
            Proc(
                f"api{i}",
                ["serve", "--no-worker", "--port", str(port), *common],
                tmp_path / f"api{i}.log",
                env,
                port,
            )
        )
    try:
        yield data, procs
    finally:
        for p in procs:
            p.stop()
        client = redis.Redis.from_url(redis_url)
        keys = list(client.scan_iter(f"{redis_prefix}:*"))
        if keys:
            client.delete(*keys)
        client.close()


def _wait_ready(procs: list[Proc], timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    pending = {p.name for p in procs}
    while pending:
        for p in procs:
            if p.name not in pending:
                continue
            assert p.proc.poll() is None, f"{p.name} exited:\n{p.text()}"
            if p.url is None:
                if "worker applying the jobs of queue" in p.text():
                    pending.discard(p.name)
                continue
            try:
                if httpx.get(f"{p.url}/readyz", timeout=2).status_code == 200:
                    pending.discard(p.name)
            except httpx.HTTPError:
                pass
        assert time.monotonic() < deadline, "\n\n".join(f"{p.name}:\n{p.text()}" for p in procs)
        time.sleep(0.1)


def _read(api: Proc, method: str, path: str, **kwargs) -> httpx.Response:
    """A read; a 503 (still following) must say when to retry, and is retried."""
    for _ in range(50):
        r = httpx.request(method, api.url + path, headers=AUTH, timeout=30, **kwargs)
        if r.status_code != 503:
            return r
        assert int(r.headers["Retry-After"]) >= 1, r.text
        time.sleep(0.2)
    raise AssertionError(f"{path} on {api.name}: 503 for 10 s: {r.text}")


def _split_workers(procs: list[Proc]) -> tuple[Proc, Proc]:
    """``(running, refused)``: one worker per model, the second is refused at once."""
    workers = [p for p in procs if p.url is None]
    deadline = time.monotonic() + 240
    while all(w.proc.poll() is None for w in workers):
        assert time.monotonic() < deadline, "\n".join(w.text() for w in workers)
        time.sleep(0.1)
    refused = next(w for w in workers if w.proc.poll() is not None)
    return next(w for w in workers if w is not refused), refused


def test_started_together_they_build_once_and_all_serve_it(cluster, scale_dataset):
    data, procs = cluster
    # One worker per model: the second is refused at once, naming the first; it builds nothing.
    worker, refused = _split_workers(procs)
    assert refused.proc.returncode != 0 and "one solver worker per model" in refused.text()
    assert "Traceback" not in refused.text()
    running = [p for p in procs if p is not refused]
    _wait_ready(running)

    logs = {p.name: p.text() for p in procs}
    builders = [name for name, text in logs.items() if "built and trained the model" in text]
    assert len(builders) == 1, logs
    assert sorted(p.name for p in (data / "checkpoints").iterdir()) == ["0"]
    assert not any("Traceback" in text for text in logs.values()), logs
    for p in running:
        if p.name not in builders:
            assert "restored model version 0" in logs[p.name], logs[p.name]
    for api in (p for p in running if p.url):
        assert _read(api, "GET", "/v1/model").json()["version"] == 0
    assert worker.proc.poll() is None


def test_no_api_process_serves_a_version_before_a_reported_deletion(cluster, scale_dataset):
    data, procs = cluster
    worker, _ = _split_workers(procs)
    apis = [p for p in procs if p.url]
    _wait_ready([worker, *apis])
    x = np.load(scale_dataset)["x"][:3].tolist()

    for round_, forgotten in enumerate(["p007", "p123", "p150", "p042"]):
        via, other = apis[round_ % 2], apis[(round_ + 1) % 2]
        r = httpx.post(f"{via.url}/v1/forget", json={"ids": [forgotten]}, headers=AUTH)
        assert r.status_code == 202, r.text
        job_url = via.url + r.json()["status_url"]
        while (job := httpx.get(job_url, headers=AUTH).json())["status"] not in (
            "succeeded",
            "failed",
        ):
            time.sleep(0.01)
        assert job["status"] == "succeeded", job
        version = job["model_version"]
        # At once, through both API processes: nothing older than the job's version.
        for api in (other, via):
            ids = _read(api, "GET", "/v1/ids", params={"limit": 10_000}).json()["ids"]
            assert forgotten not in ids, f"{api.name} still serves {forgotten}"
            out = _read(api, "POST", "/v1/predict", json={"x": x}).json()
            assert out["model_version"] >= version, (api.name, out["model_version"], version)
            assert _read(api, "GET", "/v1/model").json()["version"] >= version
        again = httpx.post(f"{other.url}/v1/forget", json={"ids": [forgotten]}, headers=AUTH)
        assert again.status_code == 409, again.text
