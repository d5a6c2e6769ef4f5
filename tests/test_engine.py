"""The engine's façade: validation, checkpoints and restore, snapshots."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from service_core import (
    AlreadyForgottenError,
    InvalidForgetSetError,
    InvalidInputError,
    ModelConfig,
    SolverConfig,
    TrainConfig,
    UnknownIdsError,
    Unlearner,
    build_model,
    checkpoint,
    load_digits,
)
from service_core.layout import KernelLayout


@pytest.fixture(scope="module")
def digits():
    return load_digits(seed=0)


@pytest.fixture(scope="module")
def small(digits):
    return Unlearner.build(
        digits.subset(slice(0, 60)),
        ModelConfig(kind="mlp", width=16),
        TrainConfig(loss="ce", dtype="float64"),
        SolverConfig(),
        progress=False,
    )


def test_validation_messages(small):
    ids = small.active_ids()
    with pytest.raises(InvalidForgetSetError, match="non-empty"):
        small.validate_forget([])
    with pytest.raises(InvalidForgetSetError, match="duplicated"):
        small.validate_forget([ids[0], ids[0]])
    with pytest.raises(UnknownIdsError) as err:
        small.validate_forget([ids[0], "nope"])
    assert err.value.ids == ["nope"]
    with pytest.raises(AlreadyForgottenError):
        small.validate_forget([ids[1]], pending=frozenset({ids[1]}))
    with pytest.raises(InvalidForgetSetError, match="every remaining"):
        small.validate_forget(ids)
    with pytest.raises(InvalidInputError, match="NaN"):
        small.predict([[np.nan] * 64])
    with pytest.raises(InvalidInputError, match="expected"):
        small.predict([[0.0] * 63])
    with pytest.raises(InvalidInputError, match="too large"):
        small.predict([[1e200] * 64])  # finite in JSON, beyond what the model's dtype can carry
    with pytest.raises(InvalidInputError, match="labels"):
        small.influence(ids[:2], [[0.0] * 64], [11])
    assert small.predict([[0.0] * 64, [1.0] * 64]).shape == (2, 10)


def test_checkpoint_roundtrip_prunes_and_keeps_no_forgotten_rows(tmp_path, digits):
    ds = digits.subset(slice(0, 50))
    u = Unlearner.build(
        ds,
        ModelConfig(kind="mlp", width=16),
        TrainConfig(loss="mse", dtype="float64"),
        SolverConfig(),
        cache_dir=tmp_path / "cache",
        progress=False,
    )
    assert list((tmp_path / "cache").glob("ntk-*.npy"))
    u.save(tmp_path / "ckpt")
    gone = u.active_ids()[:5]
    before = u.state.nystrom
    result = u.forget(gone, checkpoint_dir=tmp_path / "ckpt")
    # the older checkpoint and the cached K stay until the deletion is reported, then go
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["0", "1"]
    assert u.purge(tmp_path / "ckpt") == {"checkpoints": 1, "kernels": 1}
    u.after_publish()
    assert not list((tmp_path / "cache").glob("ntk-*.npy"))  # cached K held the forgotten rows
    # the preconditioner was derived from the forgotten rows too: recomputed from the new K
    assert before is not None and u.state.nystrom is not None and u.state.nystrom is not before
    assert u.state.nystrom.u.shape[0] == u.state.k.shape[0]
    inactive_rows = np.repeat(~u.state.active, 10)
    assert np.abs(np.asarray(u.state.nystrom.u)[inactive_rows]).max(initial=0.0) <= 1e-6
    # per-part seconds of the deletion, within its total
    assert {"validate", "compact", "rhs", "solve", "delta", "residual"} <= set(result.timings)
    assert (
        all(v >= 0 for v in result.timings.values())
        and sum(result.timings.values()) <= result.seconds
    )
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir() if p.name.isdigit()) == ["1"]
    back = Unlearner.restore(tmp_path / "ckpt")
    assert back.version == 1 and back.n_train == 45 and back.is_forgotten(gone)
    assert back.forgotten_digests() == {back.digest(i) for i in gone}
    assert np.array_equal(back.predict(ds.x_test[:5]), u.predict(ds.x_test[:5]))
    restored = checkpoint.restore(tmp_path / "ckpt")
    assert restored.n == 45 and not set(gone) & set(restored.ids.tolist())
    assert restored.k is None  # K is recomputed from the active inputs, never written
    inactive = np.repeat(~back.state.active, 10)
    assert back.state.k.shape[0] >= 450 and not np.any(np.asarray(back.state.k)[inactive])
    assert np.allclose(back.state.k, u.state.k, atol=1e-12)
    xs = np.asarray(restored.x)
    for i in range(5):
        assert not np.any(np.all(np.isclose(xs, ds.x[i]), axis=1))
    with pytest.raises(AlreadyForgottenError):
        back.forget(gone[:1])
    assert Unlearner.restore(tmp_path / "nothing") is None


def test_validation_against_a_snapshot(small):
    """An estimate validates against the version it reads, not one published since (no 500 in a race)."""
    old = small.state
    gone = small.active_ids()[:2]
    new_state, _ = small.plan_forget(gone)
    small.validate_forget(gone, state=old)  # still valid for the snapshot
    with pytest.raises(AlreadyForgottenError):
        small.validate_forget(gone, state=new_state)


def test_network_is_the_same_whatever_x64_says_and_restore_checks_it(tmp_path, digits, monkeypatch):
    """A float64 engine turns on jax_enable_x64 for the whole process; θ0 of a float32 network must
    not change with it (restore recomputes K from the re-initialised network), and a checkpoint whose
    network cannot be re-created is refused instead of silently restored as another model."""
    from service_core import SolverError, lifecycle

    cfg = ModelConfig(kind="mlp", width=16)
    was = jax.config.jax_enable_x64
    try:
        thetas = []
        for x64 in (False, True):
            jax.config.update("jax_enable_x64", x64)
            thetas.append(np.asarray(build_model(cfg, (64,), 10, jnp.float32).theta0))
    finally:
        jax.config.update("jax_enable_x64", was)
    np.testing.assert_array_equal(thetas[0], thetas[1])
    ds = digits.subset(slice(0, 40))
    u = Unlearner.build(ds, cfg, TrainConfig(loss="mse"), SolverConfig(), progress=False)
    u.save(tmp_path / "ck")
    back = Unlearner.restore(tmp_path / "ck", progress=False)
    np.testing.assert_array_equal(np.asarray(back.state.k), np.asarray(u.state.k))
    monkeypatch.setattr(lifecycle, "fingerprint", lambda model: 1.0)
    with pytest.raises(SolverError, match="differs from the one the checkpoint"):
        Unlearner.restore(tmp_path / "ck", progress=False)


def _worker_and_follower(tmp_path, digits):
    """(data, worker, follower): a small float64 model built, checkpointed, and restored by a
    process without the worker."""
    ds = digits.subset(slice(0, 80))
    cfg = (
        ModelConfig(kind="mlp", width=16),
        TrainConfig(loss="ce", dtype="float64"),
        SolverConfig(),
    )
    worker = Unlearner.build(ds, *cfg, progress=False)
    worker.save(tmp_path / "ck")
    return ds, worker, Unlearner.restore(tmp_path / "ck", progress=False)


@pytest.mark.parametrize("n_forget", [3, 40])
def test_a_follower_erases_forgotten_rows_instead_of_recomputing_k(
    tmp_path, digits, n_forget, monkeypatch
):
    """A process without the worker follows each new checkpoint by erasing (3 ids: same bucket) or
    compacting (40 ids: smaller bucket) the K it holds: it never computes a kernel, and serves
    exactly what the worker published."""
    ds, worker, follower = _worker_and_follower(tmp_path, digits)
    assert not follower.follow_checkpoint(tmp_path / "ck")  # nothing newer yet

    def no_kernels(*args, **kwargs):
        raise AssertionError("a follower must not compute a kernel")

    def no_matvec(*args, **kwargs):
        raise AssertionError("a follower must not make a pass over K")

    object.__setattr__(follower.model, "train_kernel", no_kernels)
    gone = worker.active_ids()[:n_forget]
    worker.forget(gone, checkpoint_dir=tmp_path / "ck")
    with monkeypatch.context() as m:  # f* is the worker's, from its checkpoint: no pass over K
        m.setattr(KernelLayout, "matvec", no_matvec)
        assert follower.follow_checkpoint(tmp_path / "ck", finish=False)
    follower.after_follow()
    a, b = worker.state, follower.state
    assert b.version == a.version == 1 and b.capacity == a.capacity and list(b.ids) == list(a.ids)
    np.testing.assert_array_equal(np.asarray(b.k), np.asarray(a.k))
    np.testing.assert_array_equal(np.asarray(b.f_star), np.asarray(a.f_star))
    # and it is f_0 + K α, recomputed here in numpy
    k_np, alpha_np = np.asarray(b.k, np.float64), np.asarray(b.alpha, np.float64)
    act = np.repeat(b.active, 10)
    f_np = np.asarray(b.f0).reshape(-1) + k_np[:, act] @ alpha_np.reshape(-1)[act]
    np.testing.assert_allclose(np.asarray(b.f_star).reshape(-1)[act], f_np[act], rtol=0, atol=1e-10)
    np.testing.assert_array_equal(follower.predict(ds.x_test[:5]), worker.predict(ds.x_test[:5]))
    assert not set(gone) & set(follower.active_ids())
    with pytest.raises(AlreadyForgottenError):
        follower.validate_forget(gone[:1])
    # erased (same bucket): the K it served before is its next spare, holding what K holds;
    # compacted: a new buffer of the smaller shape
    assert follower._spare.reused == (n_forget == 3)
    assert follower._spare.buffer.shape == b.k.shape
    if n_forget == 3:
        np.testing.assert_array_equal(np.asarray(follower._spare.buffer), np.asarray(b.k))
        # the next version: its K is that spare with only the new forgotten rows zeroed in it
        spare = follower._spare.buffer
        del a, b
        worker.forget(worker.active_ids()[:3], checkpoint_dir=tmp_path / "ck")
        assert follower.follow_checkpoint(tmp_path / "ck")
        assert follower.version == worker.version == 2 and follower.state.k is spare
        np.testing.assert_array_equal(np.asarray(follower.state.k), np.asarray(worker.state.k))
        np.testing.assert_array_equal(
            follower.predict(ds.x_test[:5]), worker.predict(ds.x_test[:5])
        )


def test_a_follower_of_a_checkpoint_without_f_star_computes_it(tmp_path, digits, monkeypatch):
    """A checkpoint written before f* was saved (or a float64 f* for a float32 K): the follower
    computes f* = f_0 + K α itself, equal to the worker's to rounding."""
    ds, worker, follower = _worker_and_follower(tmp_path, digits)
    saved_arrays = checkpoint._saved_arrays

    def without_f_star(state):
        arrays = saved_arrays(state)
        assert "f_star" in arrays
        del arrays["f_star"]
        return arrays

    monkeypatch.setattr(checkpoint, "_saved_arrays", without_f_star)
    worker.forget(worker.active_ids()[:3], checkpoint_dir=tmp_path / "ck")
    assert checkpoint.restore(tmp_path / "ck").f_star is None
    assert follower.follow_checkpoint(tmp_path / "ck")
    a, b = worker.state, follower.state
    assert b.version == a.version == 1
    np.testing.assert_allclose(np.asarray(b.f_star), np.asarray(a.f_star), rtol=0, atol=1e-12)
    np.testing.assert_array_equal(follower.predict(ds.x_test[:5]), worker.predict(ds.x_test[:5]))


def test_a_follower_uses_the_workers_f_star_only_when_their_k_has_one_origin(
    tmp_path, digits, monkeypatch
):
    """After a restart one process's K is recomputed over fewer points than the other's, which
    differs by rounding: the follower then computes f* from its own K (equal to f_0 + K α of the
    K it serves, in numpy); once both K have the same origin (both restored at one version) it
    takes the worker's, with no pass over K."""
    ds, worker, _ = _worker_and_follower(tmp_path, digits)
    worker.forget(worker.active_ids()[:3], checkpoint_dir=tmp_path / "ck")
    follower = Unlearner.restore(tmp_path / "ck", progress=False)  # K over version 1's points
    assert (worker.state.k_origin, follower.state.k_origin) == (0, 1)
    passes = []
    matvec = KernelLayout.matvec

    def counted(self, *args, **kwargs):
        passes.append(1)
        return matvec(self, *args, **kwargs)

    monkeypatch.setattr(KernelLayout, "matvec", counted)
    worker.forget(worker.active_ids()[:3], checkpoint_dir=tmp_path / "ck")
    passes.clear()
    assert follower.follow_checkpoint(tmp_path / "ck", finish=False) and passes
    b = follower.state
    assert b.k_origin == 1 and b.version == 2
    # the premise: the two K differ (by rounding)
    assert not np.array_equal(np.asarray(b.k), np.asarray(worker.state.k))
    k_np, alpha_np = np.asarray(b.k, np.float64), np.asarray(b.alpha, np.float64)
    act = np.repeat(b.active, 10)
    f_np = np.asarray(b.f0).reshape(-1) + k_np[:, act] @ alpha_np.reshape(-1)[act]
    np.testing.assert_allclose(np.asarray(b.f_star).reshape(-1)[act], f_np[act], rtol=0, atol=1e-12)
    # the worker restarts too: both K recomputed over version 2's points
    worker = Unlearner.restore(tmp_path / "ck", progress=False)
    follower = Unlearner.restore(tmp_path / "ck", progress=False)
    np.testing.assert_array_equal(np.asarray(follower.state.k), np.asarray(worker.state.k))
    worker.forget(worker.active_ids()[:3], checkpoint_dir=tmp_path / "ck")
    passes.clear()
    assert follower.follow_checkpoint(tmp_path / "ck", finish=False) and not passes
    np.testing.assert_array_equal(
        np.asarray(follower.state.f_star), np.asarray(worker.state.f_star)
    )
    np.testing.assert_array_equal(np.asarray(follower.state.k), np.asarray(worker.state.k))


def test_a_checkpoint_keeps_f_star_of_active_rows_only(tmp_path, digits):
    """f* in a checkpoint: the active rows as the worker computed them, a forgotten record's rows
    zero (the checkpoint keeps nothing of it)."""
    ds, worker, _ = _worker_and_follower(tmp_path, digits)
    worker.forget(worker.active_ids()[:3], checkpoint_dir=tmp_path / "ck")
    saved = checkpoint.restore(tmp_path / "ck")
    st = worker.state
    f_saved, f_now = np.asarray(saved.f_star), np.asarray(st.f_star)
    assert f_saved.shape == f_now.shape and st.n == 77 and (~st.active).sum() > 0
    np.testing.assert_array_equal(f_saved[st.active], f_now[st.active])
    assert not np.any(f_saved[~st.active])
    # whatever the state holds in a forgotten record's rows
    arrays = checkpoint._saved_arrays(st.replace(f_star=st.f_star + 1.0))
    assert not np.any(arrays["f_star"][~st.active])
    np.testing.assert_array_equal(arrays["f_star"][st.active], f_now[st.active] + 1.0)
    assert Unlearner.restore(tmp_path / "ck", progress=False).state.f_star is not None


def test_a_follower_serves_a_new_version_first_and_makes_its_preconditioner_after(
    tmp_path, digits, monkeypatch
):
    """``follow_checkpoint(finish=False)`` serves the new version at once, with no preconditioner
    (nothing derived from the forgotten rows); ``after_follow`` then makes the one the worker
    made from the same K after publishing, and never puts one made for a version that a newer
    one replaced meanwhile."""
    from service_core import engine

    ds, worker, follower = _worker_and_follower(tmp_path, digits)
    assert follower.state.nystrom is not None

    worker.forget(worker.active_ids()[:3], checkpoint_dir=tmp_path / "ck")
    worker.after_publish()
    assert follower.follow_checkpoint(tmp_path / "ck", finish=False)
    assert follower.version == 1 and follower.state.nystrom is None
    np.testing.assert_array_equal(follower.predict(ds.x_test[:5]), worker.predict(ds.x_test[:5]))
    seconds = follower.after_follow()
    assert set(seconds) == {"preconditioner", "spare"}
    np.testing.assert_array_equal(
        np.asarray(follower.state.nystrom.u), np.asarray(worker.state.nystrom.u)
    )
    np.testing.assert_array_equal(
        np.asarray(follower.state.nystrom.lam), np.asarray(worker.state.nystrom.lam)
    )

    # version 2: none made when asked for none (``serve --no-follow-preconditioner``)
    worker.forget(worker.active_ids()[:3], checkpoint_dir=tmp_path / "ck")
    assert follower.follow_checkpoint(tmp_path / "ck", finish=False)
    follower.after_follow(preconditioner=False)
    assert follower.version == 2 and follower.state.nystrom is None
    # version 3 is followed while the preconditioner of version 2 is being made
    worker.forget(worker.active_ids()[:3], checkpoint_dir=tmp_path / "ck")
    made = engine.lifecycle.preconditioner

    def newer_followed_meanwhile(*args, **kwargs):
        ny = made(*args, **kwargs)
        assert follower.follow_checkpoint(tmp_path / "ck", finish=False)
        return ny

    monkeypatch.setattr(engine.lifecycle, "preconditioner", newer_followed_meanwhile)
    follower.after_follow()
    assert follower.version == 3 and follower.state.nystrom is None
    monkeypatch.undo()
    follower.after_follow()  # made for the version served: put in
    assert follower.state.nystrom is not None


def test_warm_up_compiles_what_requests_of_up_to_16_rows_use(unlearner):
    """``serve`` calls ``warm_up`` before its first request: afterwards a 1-row or 16-row
    prediction compiles nothing (the jitted program's cache does not grow) and gets the outputs
    it would get otherwise."""
    jitted = unlearner.model._jit_f_lin
    x = np.asarray(unlearner.state.x)[:16]
    before = jitted._cache_size()
    assert unlearner.warm_up() >= 0
    assert jitted._cache_size() == before + 1
    one, sixteen = unlearner.predict(x[:1]), unlearner.predict(x)
    assert jitted._cache_size() == before + 1
    np.testing.assert_array_equal(one, sixteen[:1])
    assert unlearner.warm_up(max_rows=32) >= 0 and jitted._cache_size() == before + 2


def _follower_skips(tmp_path, digits, steps) -> None:
    """A follower restored first, then the worker runs ``steps(worker, ids, ck)``; the follower
    follows the newest version at once (skipping those between): its K equals a fresh restore of
    that version's checkpoint."""
    ds = digits.subset(slice(0, 200))
    cfg = (ModelConfig(kind="mlp", width=16), TrainConfig(loss="ce", dtype="float64"))
    worker = Unlearner.build(ds, *cfg, SolverConfig(), progress=False)
    ck = tmp_path / "ck"
    worker.save(ck)
    follower = Unlearner.restore(ck, progress=False)
    steps(worker, worker.active_ids(), ds, ck)
    assert follower.follow_checkpoint(ck)
    restored = Unlearner.restore(ck, progress=False)
    assert follower.version == worker.version == restored.version
    np.testing.assert_allclose(
        np.asarray(follower.state.k), np.asarray(restored.state.k), rtol=0, atol=1e-9
    )
    assert list(follower.state.ids) == list(worker.state.ids)
    np.testing.assert_allclose(
        np.asarray(follower.state.f_star), np.asarray(worker.state.f_star), rtol=0, atol=1e-9
    )


def test_a_follower_skipping_a_forget_and_re_add_of_one_id_computes_its_new_rows(tmp_path, digits):
    """Break-it finding: an id forgotten and added again (another x, in its old row) between two
    versions a follower reads; the ids alone matched, and the follower kept the forgotten
    record's K rows for the new record (influence off by 4×). The same id with another x is
    another record: its rows are computed."""

    def steps(worker, ids, ds, ck):
        worker.forget(ids[:1], checkpoint_dir=ck)
        worker.add(ids[:1], ds.x[150:151], ds.y[150:151], checkpoint_dir=ck)
        assert worker.state.index[ids[0]] == 0  # back in its old row

    _follower_skips(tmp_path, digits, steps)


def test_a_follower_skipping_a_compaction_then_erasures_places_each_row(tmp_path, digits):
    """Break-it finding: versions skipped across a compaction into a smaller bucket followed by
    erasures in place (gaps): compacting into the first rows put the kept rows in other rows than
    the version's (a permuted K). They go to their rows."""

    def steps(worker, ids, ds, ck):
        worker.forget(ids[0:7], checkpoint_dir=ck)
        cap = worker.state.capacity
        worker.forget(ids[7:8], checkpoint_dir=ck)
        assert worker.state.capacity < cap  # compacted
        worker.forget(ids[12:14], checkpoint_dir=ck)  # erased in place: gaps
        assert not worker.state.active[: worker.state.n].all()

    _follower_skips(tmp_path, digits, steps)
