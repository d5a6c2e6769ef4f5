"""K sharded over 4 CPU devices gives the answers of one device; the memory planner refuses what
does not fit.

XLA fixes the device count at start-up, so the sharded comparison runs in a child process with
``XLA_FLAGS=--xla_force_host_platform_device_count=4``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import pytest

from service_core import (
    ModelConfig,
    ResourceError,
    SolverConfig,
    TrainConfig,
    Unlearner,
    load_digits,
)
from service_core.sharding import MemoryPlan, check_fits, plan_memory

ROOT = Path(__file__).resolve().parents[1]

CHILD = textwrap.dedent(
    """
    import json, sys
    import jax, numpy as np
    jax.config.update("jax_enable_x64", True)
    from service_core import ModelConfig, SolverConfig, TrainConfig, Unlearner, load_digits

    assert len(jax.devices()) == 4, jax.devices()
    kind, loss, form, method = sys.argv[1:5]
    ds = load_digits(seed=0).subset(slice(0, 90))
    out = {}
    for n_dev in (1, 4):
        u = Unlearner.build(
            ds, ModelConfig(kind=kind, width=16, kernel_form=form), TrainConfig(loss=loss, dtype="float64"),
            SolverConfig(method=method), progress=False, devices=jax.devices()[:n_dev],
        )
        before = u.predict(ds.x_test[:8])
        est = u.influence(u.active_ids()[:7], ds.x_test[:8], ds.y_test[:8])
        res = u.forget(u.active_ids()[3:20])
        u.forget(u.active_ids()[:40])  # crosses a capacity bucket: compaction keeps the sharding
        info = u.state.kernel_summary()
        out[n_dev] = {
            "theta": np.asarray(u.state.theta).tolist(),
            "before": before.tolist(),
            "after": u.predict(ds.x_test[:8]).tolist(),
            "estimate": est.delta_outputs.tolist(),
            "devices": info["devices"],
            "per_device": info["bytes_per_device"],
            "method": res.solve.method,
        }
    print(json.dumps(out))
    """
)


@pytest.mark.slow
@pytest.mark.parametrize(
    "kind,loss,form,method",
    [
        ("mlp", "ce", "full", "alpha-cg"),
        ("mlp", "mse", "full", "alpha-cholesky"),
        ("linear", "ce", "trace", "alpha-cg"),
        ("mlp", "mse", "full", "theta-cg"),
    ],
)
def test_sharded_equals_unsharded_on_4_cpu_devices(kind, loss, form, method):
    env = {
        **os.environ,
        "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
        "JAX_PLATFORMS": "cpu",
    }
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, kind, loss, form, method],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    one, four = out["1"], out["4"]
    assert len(one["devices"]) == 1 and len(four["devices"]) == 4
    sizes = list(four["per_device"].values())
    assert (
        len(sizes) == 4
        and len(set(sizes)) == 1
        and sum(sizes) == list(one["per_device"].values())[0]
    )
    import numpy as np

    for key in ("theta", "after", "estimate"):
        a, b = np.asarray(one[key]), np.asarray(four[key])
        assert np.linalg.norm(a - b) <= 1e-6 * np.linalg.norm(a), key
    assert not np.allclose(one["before"], one["after"])  # the forget changed something


def test_planner_refuses_what_does_not_fit():
    plan = MemoryPlan(
        kernel_bytes=8 << 30,
        per_device_bytes=2 << 30,
        working_bytes=5 << 30,
        device_bytes=4 << 30,
        n_devices=4,
    )
    assert not plan.fits
    with pytest.raises(ResourceError, match="more than 60%"):
        check_fits(plan, "K for 40000 points")
    small = plan_memory(1000, 4)
    assert small.fits and small.kernel_bytes == 4_000_000


def test_build_refuses_a_kernel_larger_than_memory():
    ds = load_digits(seed=0).subset(slice(0, 40))
    with pytest.raises(ResourceError, match="per device"):
        Unlearner.build(
            ds,
            ModelConfig(kind="mlp", width=8),
            TrainConfig(),
            SolverConfig(),
            progress=False,
            memory_budget=1e-9,
        )


def test_model_info_reports_devices_and_bytes():
    ds = load_digits(seed=0).subset(slice(0, 40))
    u = Unlearner.build(
        ds, ModelConfig(kind="linear"), TrainConfig(loss="mse"), SolverConfig(), progress=False
    )
    info = u.state.kernel_summary()
    assert info["devices"] == [str(d) for d in jax.devices()[:1]]
    assert sum(info["bytes_per_device"].values()) == info["bytes"]
