"""The Figure 4 script end to end on a few points (the full run is ``python -m bench.figure4``)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from bench import figure4

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def test_metrics_and_forget_set():
    act = np.array([1.0, -2.0, 3.0, 0.5])
    m = figure4.metrics(2.0 * act, act)
    assert (
        m["pearson"] == pytest.approx(1.0)
        and m["rel_error"] == pytest.approx(1.0)
        and m["slope"] == pytest.approx(2.0)
    )
    labels = np.repeat(np.arange(3), [4, 6, 10])
    mask = figure4.forget_half(labels, 0.5, seed=0)
    assert [int(mask[labels == c].sum()) for c in range(3)] == [2, 3, 5]
    assert np.array_equal(mask, figure4.forget_half(labels, 0.5, seed=0))


@pytest.mark.skipif(
    not (SHARED / "mnist").exists()
    or not (SHARED / "cifar10" / "airplane_automobile_train.npz").exists(),
    reason="../shared/data/mnist or cifar10 is absent",
)
def test_figure4_small_run(tmp_path):
    argv = [
        "--out-dir",
        str(tmp_path),
        "--mnist-train-per-class",
        "8",
        "--mnist-test-per-class",
        "4",
        "--cifar-n-train",
        "16",
        "--cifar-test-per-class",
        "4",
        "--depth-cnn",
        "2",
    ]
    assert figure4.main(argv) == 0
    meta = json.loads((tmp_path / "figure4.json").read_text())
    mnist, cifar = meta["experiments"]
    assert mnist["n_train"] == 80 and mnist["n_removed"] == 40 and mnist["n_test"] == 40
    assert cifar["n_train"] == 16 and cifar["n_removed"] == 8 and cifar["output_dim"] == 1
    for r in (mnist, cifar):
        assert r["kgd"]["converged"] and r["kgd"]["rel_distance_to_newton"] < 1e-8
        assert r["outputs"]["pearson"] > 0.9 and r["loss_change"]["pearson"] > 0.9
        assert (tmp_path / r["plot"]).stat().st_size > 10_000
    # squared error: the single influence step is exact retraining
    assert cifar["outputs"]["rel_error"] < 1e-8
    assert "| mnist-inf-fcnn |" in (tmp_path / "figure4.md").read_text()
