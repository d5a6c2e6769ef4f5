"""Shared fixtures: a real Redis, a small model, and apps built on them.

Redis comes from ``REDIS_URL`` (``make test`` starts one) or, when that is unset, from a private
``redis-server`` started here. Each test gets its own key prefix, so tests never see each other's
queues and a shared Redis is never flushed.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis
from fastapi.testclient import TestClient

from app.core.config import Settings
from app.embedded_redis import EmbeddedRedis
from app.main import create_app
from app.queue import JobQueue
from service_core import Dataset, Unlearner, load_dataset, load_digits

WRITE = {"Authorization": "Bearer write-token"}
READ = {"Authorization": "Bearer read-token"}


@pytest.fixture(autouse=True)
def _no_start_up_heap_freeze(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch):
    """An app started in the test process skips the start-up ``gc.collect(); gc.freeze()``
    (``app.main._freeze_startup_heap``), unless the test is marked ``gc_freeze``: each start
    collected pytest's whole heap and each stop handed it back to the oldest generation
    (tests/test_api.py: 94 s without, 113 s with). Served processes (``ntk-unlearn serve``)
    always freeze; tests/test_api.py checks the freeze itself."""
    if request.node.get_closest_marker("gc_freeze") is None:
        import app.main

        monkeypatch.setattr(app.main, "_freeze_startup_heap", lambda: 0)


# A small classification problem: fast to build, and every solver path (CE with refinement) runs.
N_POINTS, N_FEATURES, N_CLASSES = 48, 4, 3
MODEL = {
    "model": "mlp",
    "width": 64,
    "depth": 2,
    "loss": "ce",
    "lam": 1e-2,
    "dtype": "float64",
    "seed": 0,
}


@pytest.fixture(scope="session")
def digits() -> Dataset:
    """scikit-learn's digits (``load_digits(seed=0)``); modules may define their own."""
    return load_digits(seed=0)


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    url = os.environ.get("REDIS_URL")
    if url:
        yield url
        return
    server = EmbeddedRedis(tmp_path_factory.mktemp("redis")).start()
    try:
        yield server.url
    finally:
        server.stop()


@pytest.fixture
def redis_prefix(redis_url: str) -> Iterator[str]:
    prefix = f"test-{uuid.uuid4().hex[:12]}"
    yield prefix
    client = redis.Redis.from_url(redis_url)
    keys = list(client.scan_iter(f"{prefix}:*"))
    if keys:
        client.delete(*keys)
    client.close()


@pytest.fixture(scope="session")
def dataset_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An ``.npz`` data set with ids ``r00`` … ``r47``."""
    rng = np.random.default_rng(0)
    centres = rng.normal(scale=2.0, size=(N_CLASSES, N_FEATURES))
    y = np.arange(N_POINTS) % N_CLASSES
    x = centres[y] + rng.normal(size=(N_POINTS, N_FEATURES))
    ids = np.array([f"r{i:02d}" for i in range(N_POINTS)])
    path = tmp_path_factory.mktemp("data") / "small.npz"
    np.savez(path, x=x.astype(np.float32), y=y.astype(np.int64), ids=ids)
    return path


@pytest.fixture(scope="session")
def base_checkpoint(tmp_path_factory: pytest.TempPathFactory, dataset_file: Path) -> Path:
    """Version 0 of the small model, built once per session and restored by each test."""
    settings = Settings(dataset=f"npz:{dataset_file}", **MODEL)
    u = Unlearner.build(
        load_dataset(settings.dataset, settings.seed),
        settings.to_model_config(),
        settings.to_train_config(),
        settings.to_solver_config(),
        cache_dir=None,
        progress=False,
    )
    directory = tmp_path_factory.mktemp("base") / "checkpoints"
    u.save(directory)
    return directory


@pytest.fixture
def unlearner(base_checkpoint: Path) -> Unlearner:
    """A fresh copy of version 0 (its forgets checkpoint into the test's own data dir)."""
    u = Unlearner.restore(base_checkpoint)
    assert u is not None
    return u


@pytest.fixture
def make_settings(
    tmp_path: Path, dataset_file: Path, redis_url: str, redis_prefix: str
) -> Callable[..., Settings]:
    def make(**overrides: Any) -> Settings:
        fields: dict[str, Any] = {
            "dataset": f"npz:{dataset_file}",
            **MODEL,
            "data_dir": tmp_path / "data",
            "api_token": "write-token",
            "read_token": "read-token",
            "redis_url": redis_url,
            "redis_prefix": redis_prefix,
        }
        fields.update(overrides)
        return Settings(**fields)

    return make


@pytest.fixture
def settings(make_settings: Callable[..., Settings]) -> Settings:
    return make_settings()


@pytest.fixture
def client(settings: Settings, unlearner: Unlearner) -> Iterator[TestClient]:
    """The app serving a fresh small model, with its worker running."""
    with TestClient(create_app(settings, unlearner)) as c:
        yield c


@pytest.fixture
def wait_for_job() -> Callable[..., dict[str, Any]]:
    """``wait_for_job(client, job_id)``: poll the job until it finished; return its body. A 503
    (Redis stalled a moment: the answer says to retry) is polled again, as a client would."""

    def wait(client: TestClient, job_id: str, timeout: float = 120.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            r = client.get(f"/v1/jobs/{job_id}", headers=READ)
            body = r.json()
            if r.status_code == 503 and time.monotonic() < deadline:
                assert "Retry-After" in r.headers, r.text
                time.sleep(0.2)
                continue
            if body["status"] in ("succeeded", "failed") or time.monotonic() > deadline:
                return body
            time.sleep(0.05)

    return wait


def pytest_configure(config: pytest.Config) -> None:
    """float64 on for the whole session, before collection: float64 engines need
    ``jax_enable_x64``, and JAX has no per-array switch, so it is set once here instead of by
    whichever test module happens to be imported first (results never depend on test order). float32
    engines are unaffected: their networks are drawn with x64 off and their arrays are float32."""
    import jax

    jax.config.update("jax_enable_x64", True)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Every test that talks to a Redis server carries the ``redis`` marker, whether it asks for one
    through the ``redis_url`` fixture (directly or through another fixture) or its module starts
    servers that run their own (``REDIS_SERVER_MODULES``)."""
    for item in items:
        if "redis_url" in getattr(item, "fixturenames", ()) or item.module.__name__.endswith(
            REDIS_SERVER_MODULES
        ):
            item.add_marker(pytest.mark.redis)


# Modules whose tests start `ntk-unlearn serve` (with its embedded Redis) or a redis-server.
REDIS_SERVER_MODULES = ("test_api_crash", "test_api_locking", "test_api_cli")


@pytest.fixture(scope="session")
def rank_deficient() -> Callable[..., Dataset]:
    """``rank_deficient(n=600, features=10)``: a linear model's kernel on 10 features has rank ≤ 11
    for 600 points: singular (3 classes)."""

    def make(n: int = 600, features: int = 10) -> Dataset:
        rng = np.random.default_rng(0)
        x = rng.normal(size=(n, features)).astype(np.float32)
        y = rng.integers(0, 3, size=n)
        ids = np.array([f"p{i:03d}" for i in range(n)])
        return Dataset("singular", ids, x, y, "classification", 3, x[:20], y[:20])

    return make


@pytest.fixture
def queue(redis_url: str, redis_prefix: str) -> Iterator[JobQueue]:
    """A job queue on the test run's Redis, under this test's own prefix."""
    q = JobQueue(redis.Redis.from_url(redis_url, decode_responses=True), redis_prefix, ttl_s=600)
    q.ensure_group()
    yield q
    q.client.close()
