"""The other model kinds over HTTP, built by the service itself from real data in ../shared/data:
an infinitely wide MLP on MNIST and a linearised CNN on CIFAR-10 airplane/automobile."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from app.main import create_app
from service_core import load_dataset

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
HEADERS = {"Authorization": "Bearer write-token"}

KINDS = [
    pytest.param(
        {
            "dataset": f"mnist:{SHARED / 'mnist'}",
            "model": "inf-mlp",
            "n_train": 100,
            "loss": "ce",
            "depth": 3,
        },
        marks=pytest.mark.skipif(
            not (SHARED / "mnist").exists(), reason="../shared/data/mnist is absent"
        ),
        id="inf-mlp-mnist",
    ),
    pytest.param(
        {
            "dataset": f"cifar2:{SHARED / 'cifar10' / 'airplane_automobile_train.npz'}",
            "model": "cnn",
            "n_train": 40,
            "width": 4,
            "depth": 2,
            "loss": "mse",
        },
        marks=pytest.mark.skipif(
            not (SHARED / "cifar10").exists(), reason="../shared/data/cifar10 is absent"
        ),
        id="cnn-cifar2",
    ),
]


@pytest.mark.slow
@pytest.mark.parametrize("fields", KINDS)
def test_serve_forget_predict(fields, make_settings, wait_for_job):
    settings = make_settings(**{**fields, "lam": 1e-2, "dtype": "float32"})
    data = load_dataset(settings.dataset, settings.seed, **settings.dataset_kwargs())
    x = data.x_test[:3].tolist()
    with TestClient(create_app(settings)) as client:  # builds, trains and checkpoints version 0
        assert client.get("/readyz").status_code == 200
        model = client.get("/v1/model", headers=HEADERS).json()
        assert model["n_train"] == len(data.ids)
        assert (model["n_params"] is None) == fields["model"].startswith("inf-")
        before = client.post("/v1/predict", json={"x": x}, headers=HEADERS).json()["outputs"]
        gone = client.get("/v1/ids?limit=10", headers=HEADERS).json()["ids"]
        est = client.post(
            "/v1/influence",
            json={"forget_ids": gone, "x": x, "y": data.y_test[:3].tolist()},
            headers=HEADERS,
        )
        assert est.status_code == 200, est.text
        job = client.post("/v1/forget", json={"ids": gone}, headers=HEADERS).json()
        done = wait_for_job(client, job["job_id"], timeout=300)
        assert done["status"] == "succeeded", done
        after = client.post("/v1/predict", json={"x": x}, headers=HEADERS).json()
        assert after["model_version"] == 1 and not np.allclose(after["outputs"], before)
        assert client.get("/v1/model", headers=HEADERS).json()["n_train"] == len(data.ids) - 10
        if fields["loss"] == "mse":  # Eq. 8 is exact for squared error
            assert np.allclose(
                est.json()["delta_outputs"], np.subtract(after["outputs"], before), atol=1e-4
            )
