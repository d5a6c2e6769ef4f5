"""Building and training version 0: nothing non-finite is ever published."""

from __future__ import annotations

import logging
from pathlib import Path

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


def test_restore_says_whether_k_was_read_from_the_cache_or_recomputed(
    base_checkpoint: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
):
    """The start-up log names where K came from (the README's restart times depend on it); the
    kernel read from the cache equals the recomputed one."""
    from service_core import lifecycle

    caplog.set_level(logging.INFO, logger=lifecycle.log.name)
    first = lifecycle.restore(base_checkpoint, cache_dir=tmp_path, progress=False)
    assert first is not None
    assert "recomputed in" in caplog.text and "read from the NTK cache" not in caplog.text
    caplog.clear()
    second = lifecycle.restore(base_checkpoint, cache_dir=tmp_path, progress=False)
    assert second is not None
    assert "read from the NTK cache in" in caplog.text and "recomputed in" not in caplog.text
    np.testing.assert_array_equal(np.asarray(first[0].k), np.asarray(second[0].k))


def test_a_kernel_cached_for_a_version_already_superseded_is_deleted(
    base_checkpoint: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
):
    """A follower restoring version 0 while the worker publishes version 1 and purges the cache
    wrote version 0's kernel (rows of the record version 1 forgot) after the purge, and it stayed
    until the next deletion. The kernel just written is deleted when a newer checkpoint exists;
    a restore of the newest version keeps its own."""
    import shutil

    from service_core import lifecycle

    directory = tmp_path / "checkpoints"
    shutil.copytree(base_checkpoint, directory)
    u = Unlearner.restore(directory, progress=False)
    assert u is not None
    u.forget(u.active_ids()[:1], checkpoint_dir=directory)
    assert u.version == 1
    cache = tmp_path / "cache"
    caplog.set_level(logging.INFO, logger=lifecycle.log.name)
    old = lifecycle.restore(directory, cache_dir=cache, progress=False, max_version=0)
    assert old is not None and old[0].version == 0
    assert list(cache.glob("ntk-*.npy")) == []  # version 1 exists: version 0's kernel is gone
    assert "deleted the kernel of version 0 just cached: version 1 is newer" in caplog.text
    newest = lifecycle.restore(directory, cache_dir=cache, progress=False)
    assert newest is not None and newest[0].version == 1
    assert len(list(cache.glob("ntk-*.npy"))) == 1  # the newest version's own stays


def test_a_mode_mismatch_does_not_also_report_the_dtype_the_nonlinear_mode_implies():
    """``--nonlinear`` takes dtype auto as float64: a linearised ``auto`` data dir started with
    ``--nonlinear`` was told ``dtype 'auto' ≠ 'float64'`` beside the mode, a setting the user
    never gave. Any other dtype difference is still said, within a mode or across."""
    import dataclasses

    from service_core.lifecycle import Identity

    linear = Identity({"kind": "mlp"}, "digits", "cross_entropy", 0.01, "auto")
    nonlinear = dataclasses.replace(linear, dtype="float64", mode="nonlinear")
    said = linear.differences(nonlinear)
    assert len(said) == 1 and said[0].startswith("mode 'linearised' (checkpoint)"), said
    assert len(nonlinear.differences(linear)) == 1
    assert linear.differences(dataclasses.replace(linear, dtype="float64")) == [
        "dtype 'auto' (checkpoint) ≠ 'float64' (now)"
    ]
    float32 = dataclasses.replace(linear, dtype="float32")
    assert "dtype 'float32' (checkpoint) ≠ 'float64' (now)" in float32.differences(nonlinear)
