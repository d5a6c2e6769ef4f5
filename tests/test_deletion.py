"""A deletion's layout: forgotten rows erased or compacted, and the spare K buffer."""

from __future__ import annotations

import numpy as np
import pytest

from service_core import ModelConfig, SolverConfig, TrainConfig, Unlearner, load_digits


@pytest.fixture(scope="module")
def digits():
    return load_digits(seed=0)


def _small_mlp(ds) -> Unlearner:
    return Unlearner.build(
        ds,
        ModelConfig(kind="mlp", width=16),
        TrainConfig(loss="mse", dtype="float64"),
        SolverConfig(),
        progress=False,
    )


def test_erased_rows_are_zero_while_the_bucket_holds(digits):
    """Within a capacity bucket forgotten rows are zeroed, not just masked; below it, compacted."""
    ds = digits.subset(slice(0, 64))
    u = _small_mlp(ds)
    cap = u.state.capacity
    u.forget(u.active_ids()[:2])
    st = u.state
    assert st.capacity == cap and st.n == 62
    gone = ~st.active
    assert not np.any(np.asarray(st.x)[gone]) and not np.any(np.asarray(st.alpha)[gone])
    assert not np.any(np.asarray(st.k)[np.repeat(gone, 10)]) and not np.any(
        np.asarray(st.k)[:, np.repeat(gone, 10)]
    )
    u.forget(u.active_ids()[:30])
    assert u.state.capacity < cap and u.state.n == 32


@pytest.mark.parametrize("loss", ["mse", "ce"])
def test_spare_kernel_buffer_changes_speed_not_answers(digits, loss):
    """With a spare K buffer the erased K is written into it (and F is erased in place while the
    smaller bucket would keep ≥ 85 % of the entries); the published versions equal those of an
    engine without one, the spare is consumed by a deletion and made again after publication."""
    ds = digits.subset(slice(0, 256))
    engines = {
        spare: Unlearner.build(
            ds,
            ModelConfig(kind="mlp", width=16),
            TrainConfig(loss=loss, dtype="float64"),
            SolverConfig(method="alpha-cg", spare_kernel=spare),
            progress=False,
        )
        for spare in (True, False)
    }
    with_spare, without = engines[True], engines[False]
    assert (
        with_spare._spare.buffer is not None
        and with_spare._spare.buffer.shape == with_spare.state.k.shape
    )
    assert without._spare.buffer is None
    cap = with_spare.state.capacity
    assert cap == 256
    for n_forget in (
        10,
        16,
        100,
    ):  # 246 (same bucket), 230 (bucket 240: erased in place only with the spare), 130: compacted
        ids = with_spare.active_ids()[:n_forget]
        spare = with_spare._spare.buffer
        results = [u.forget(ids) for u in (with_spare, without)]
        for u in (with_spare, without):
            u.after_publish()
        a, b = with_spare.state, without.state
        assert a.n == b.n and all(r.solve.converged for r in results)
        if n_forget < 100:
            # erased into the spare, which holds K's values (10: the copy of K made at the build;
            # 16: the previous K reused): only F's rows and columns zeroed in it, and equal to the
            # engine without a spare (below)
            assert a.capacity == cap
            assert a.k is spare
            assert b.capacity == (cap if n_forget == 10 else 240)
            assert not np.any(np.asarray(a.k)[np.repeat(~a.active, 10)])
        else:
            assert a.capacity < cap
        assert (
            with_spare._spare.buffer is not None and with_spare._spare.buffer.shape == a.k.shape
        )  # made again
        ka, kb = np.asarray(a.k), np.asarray(b.k)
        ia, ib = ((np.flatnonzero(s.active)[:, None] * 10 + np.arange(10)).ravel() for s in (a, b))
        np.testing.assert_array_equal(ka[np.ix_(ia, ia)], kb[np.ix_(ib, ib)])
        np.testing.assert_allclose(
            np.asarray(a.theta),
            np.asarray(b.theta),
            rtol=0,
            atol=1e-10 * np.abs(np.asarray(b.theta)).max(),
        )
        assert list(a.ids[a.active]) == list(b.ids[b.active])


def test_nan_in_a_solve_fails_the_deletion_and_leaves_the_version(digits, monkeypatch):
    """NaN injected into the influence solve: the deletion raises, nothing is published."""
    from service_core import SolverError, influence

    u = Unlearner.build(
        digits.subset(slice(0, 40)),
        ModelConfig(kind="mlp", width=16),
        TrainConfig(loss="ce", dtype="float64"),
        SolverConfig(),
        progress=False,
    )
    before = u.state
    original = influence.solve_retain

    def poisoned(*args, **kwargs):
        delta, info = original(*args, **kwargs)
        return delta * np.nan, info

    monkeypatch.setattr(influence, "solve_retain", poisoned)
    with pytest.raises(SolverError, match="non-finite"):
        u.forget(u.active_ids()[:3])
    assert u.state is before and u.version == 0


def test_the_replaced_k_becomes_the_next_spare_holding_no_forgotten_value(digits):
    """After a deletion that erased K, the previous version's K is the next spare buffer (its own
    memory: no fresh mapping) once no request reads it, with the rows and columns of every point
    the new version lacks zeroed first: it then equals the served K, so no value of a forgotten
    point stays in memory. While a reader still holds the previous version, its K is left alone
    (not donated) and a fresh buffer is made instead."""
    ds = digits.subset(slice(0, 60))  # capacity 64: K has padding rows
    u = _small_mlp(ds)
    assert u.state.capacity > u.state.n
    first = u.state.k.unsafe_buffer_pointer()
    u.forget(u.active_ids()[:2])
    u.after_publish()
    spare = u._spare.buffer
    assert u._spare.reused and spare.unsafe_buffer_pointer() == first
    assert np.any(np.asarray(spare)) and spare.shape == u.state.k.shape
    np.testing.assert_array_equal(np.asarray(spare), np.asarray(u.state.k))
    del spare

    reader = u.state  # a request still reading this version
    before = np.array(reader.k)
    u._spare.wait_s = 0.05
    u.forget(u.active_ids()[:2])
    u.after_publish()
    assert not u._spare.reused and not reader.k.is_deleted()
    np.testing.assert_array_equal(np.asarray(reader.k), before)
    assert u._spare.buffer.unsafe_buffer_pointer() != reader.k.unsafe_buffer_pointer()
    del reader
    # the fresh buffer is a copy of the served K: the next deletion zeroes only its removed rows
    assert u._spare.holds(u.state.k)
    np.testing.assert_array_equal(np.asarray(u._spare.buffer), np.asarray(u.state.k))
    u.forget(u.active_ids()[:2])  # and the fresh buffer serves the next deletion as before
    u.after_publish()
    assert u._spare.reused
    np.testing.assert_array_equal(np.asarray(u._spare.buffer), np.asarray(u.state.k))


def test_the_theta_update_after_a_refinement_is_timed_as_delta(digits, monkeypatch):
    """θ = θ_p + J(X)ᵀα after a refinement is counted under ``delta`` (Δθ, as documented), not
    ``refine``: a promoted CNN spent minutes there while its refinement said 0.2 s."""
    import time

    from service_core import models

    u = _small_mlp(digits.subset(slice(0, 60)))
    original = models.Model.theta

    def slow_theta(self, *args, **kwargs):
        time.sleep(0.5)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(models.Model, "theta", slow_theta)
    result = u.forget(u.active_ids()[:3])
    assert result.refine is not None  # refined (squared error, refine on by default)
    assert result.timings["delta"] >= 0.5 and result.timings["refine"] < 0.5, result.timings
