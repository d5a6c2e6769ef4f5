"""Micro-batched predictions (``app.batching``): concurrent requests computed in one device call,
each answered exactly as it would be alone."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from app.main import create_app
from service_core import Unlearner

READ = {"Authorization": "Bearer read-token"}


@pytest.fixture
def rows(dataset_file: Path) -> np.ndarray:
    with np.load(dataset_file) as f:
        return f["x"]


def test_a_batch_gives_each_request_its_outputs_alone(unlearner: Unlearner, rows):
    """Bit for bit, at request sizes below and above the 16-row threshold where XLA's CPU
    products would otherwise round a row differently; and equal (to rounding) to the linearised
    network evaluated directly, f(x; θ0) + J(x)(θ − θ0), without any padding."""
    requests = [rows[0:1], rows[1:4], rows[4:9], rows[9:29], rows[29:30]]
    version, batched = unlearner.predict_batch([unlearner.prepare_inputs(x) for x in requests])
    assert version == unlearner.version
    for x, out in zip(requests, batched, strict=True):
        alone = unlearner.predict(x)
        assert out.shape == alone.shape == (len(x), 3)
        assert np.array_equal(out, alone)
        direct = np.asarray(unlearner.model.outputs_at(unlearner.state.theta, x))
        np.testing.assert_allclose(out, direct, rtol=1e-10, atol=1e-12)


def test_more_rows_than_one_call_are_computed_in_chunks(unlearner: Unlearner, rows):
    x = np.concatenate([rows] * 25)[:1100]  # over the 1,024 rows of one call
    out = unlearner.predict(x)
    assert out.shape == (1100, 3)
    assert np.array_equal(out[1024:], unlearner.predict(x[1024:]))
    assert np.array_equal(out[:48], unlearner.predict(rows))


@pytest.mark.redis
def test_concurrent_requests_share_device_calls(make_settings, unlearner: Unlearner, rows):
    settings = make_settings(predict_batch_wait_ms=50)
    app = create_app(settings, unlearner)
    with TestClient(app) as client:
        sizes = [1, 2, 1, 5, 1, 17, 1, 3] * 2

        def post(i: int):
            x = rows[i : i + sizes[i]]
            r = client.post("/v1/predict", json={"x": x.tolist()}, headers=READ)
            return x, r

        with ThreadPoolExecutor(len(sizes)) as pool:
            answers = list(pool.map(post, range(len(sizes))))
        for x, r in answers:
            assert r.status_code == 200, r.text
            assert r.json()["model_version"] == 0
            assert np.array_equal(np.asarray(r.json()["outputs"]), unlearner.predict(x))
        assert app.state.service.batcher.groups < len(sizes)
        # A bad request is refused alone, before it joins a group.
        bad = client.post("/v1/predict", json={"x": [[1.0, 2.0]]}, headers=READ)
        assert bad.status_code == 422 and "shape" in bad.json()["detail"]
