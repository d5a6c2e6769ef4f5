"""Building and training version 0: nothing non-finite is ever published."""

from __future__ import annotations

import numpy as np
import pytest

from service_core import ModelConfig, SolverConfig, SolverError, TrainConfig, Unlearner
from service_core.errors import NotCertifiedError
from service_core.linalg import FLOOR_FACTOR


def test_a_singular_float32_system_is_never_published(rank_deficient):
    """float32, λ = 1e-8, squared error, a rank-deficient kernel: training produced NaN and was
    published as converged (residual nan, 608 NaN in α). It now fails, saying what to change."""
    with pytest.raises(SolverError, match="lam") as caught:
        Unlearner.build(
            rank_deficient(),
            ModelConfig(kind="linear"),
            TrainConfig(loss="mse", lam=1e-8, dtype="float32"),
            SolverConfig(),
            progress=False,
        )
    assert "float64" in str(caught.value)


def test_the_same_system_in_float64_is_finite_and_published_only_within_the_slack_granted(
    rank_deficient,
):
    """At λ = 1e-8 even float64 stagnates on its rounding floor above its 1e-10 tolerance: with no
    slack the build fails (the old floor rule published it); with accept_floor = 100 it is published,
    finite, its certificate within 100 × tol and explained by the floor."""
    settings = (rank_deficient(), ModelConfig(kind="linear"))
    with pytest.raises(NotCertifiedError, match="accept_floor"):
        Unlearner.build(*settings, TrainConfig(loss="mse", lam=1e-8, dtype="float64"))
    u = Unlearner.build(
        *settings,
        TrainConfig(loss="mse", lam=1e-8, dtype="float64", accept_floor=100),
        SolverConfig(),
        progress=False,
    )
    assert np.all(np.isfinite(np.asarray(u.state.alpha))) and np.all(np.isfinite(u.state.theta))
    record = u.state.history[0]
    tol = u.state.train_config.resolved_tol()
    assert u.state.residual <= 100 * tol and record["accept_floor"] == 100
    assert u.state.residual <= tol or u.state.residual <= FLOOR_FACTOR * record["rounding_floor"]
