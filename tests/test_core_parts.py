"""Engine parts: NTK layout and implementation, data loaders, solvers, checkpoints, validation."""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from service_core import (
    AlreadyForgottenError,
    DatasetError,
    InvalidForgetSetError,
    InvalidInputError,
    ModelConfig,
    SolverConfig,
    TrainConfig,
    UnknownIdsError,
    Unlearner,
    build_model,
    checkpoint,
    load_dataset,
    load_digits,
    load_mnist,
    load_npz,
)
from service_core._nt import nt
from service_core.ntk import cached_ntk, empirical_ntk, kernel_to_4d
from service_core.solvers import dense_operator, nystrom, solve_spd

jax.config.update("jax_enable_x64", True)

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="module")
def digits():
    return load_digits(seed=0)


# -- data -----------------------------------------------------------------------------------
def test_digits_split_and_ids(digits):
    assert digits.n == 1437 and digits.x_test.shape == (360, 64)
    assert digits.ids[0].startswith("digits-") and len(set(digits.ids)) == digits.n
    assert 0.0 <= digits.x.min() and digits.x.max() <= 1.0
    assert set(np.unique(digits.y)) == set(range(10))
    again = load_digits(seed=0)
    assert np.array_equal(again.ids, digits.ids)
    other = load_digits(seed=1)
    assert not np.array_equal(other.ids, digits.ids)
    # train and test are disjoint: no test image equals a training image at the same id
    train_index = {int(i.split("-")[1]) for i in digits.ids}
    assert len(train_index) == 1437


def test_npz_loader(tmp_path):
    x = np.random.default_rng(0).normal(size=(6, 3)).astype(np.float32)
    np.savez(
        tmp_path / "labels.npz", x=x, y=np.array([0, 1, 2, 0, 1, 2]), ids=np.array(list("abcdef"))
    )
    ds = load_npz(tmp_path / "labels.npz")
    assert ds.task == "classification" and ds.output_dim == 3 and ds.ids.tolist() == list("abcdef")
    np.savez(tmp_path / "reg.npz", x=x, y=np.ones((6, 2), np.float64))
    ds = load_dataset(f"npz:{tmp_path / 'reg.npz'}")
    assert ds.task == "regression" and ds.output_dim == 2 and ds.ids[0] == "reg-000000"
    np.savez(tmp_path / "dup.npz", x=x, y=np.zeros(6, int), ids=np.array(list("abcdea")))
    with pytest.raises(DatasetError, match="a"):
        load_npz(tmp_path / "dup.npz")
    np.savez(tmp_path / "nan.npz", x=np.full((2, 2), np.nan), y=np.zeros(2, int))
    with pytest.raises(DatasetError, match="NaN"):
        load_npz(tmp_path / "nan.npz")
    with pytest.raises(DatasetError, match="unknown dataset"):
        load_dataset("cifar100")


@pytest.mark.skipif(not (SHARED / "mnist").exists(), reason="../shared/data/mnist is absent")
def test_mnist_idx_loader():
    ds = load_mnist(SHARED / "mnist", seed=0, train_per_class=20, test_per_class=10)
    assert ds.x.shape == (200, 784) and ds.x_test.shape == (100, 784)
    assert np.bincount(ds.y).tolist() == [20] * 10
    assert not set(ds.ids) & {f"mnist-t10k-{i:05d}" for i in range(0)}
    assert 0 <= ds.x.min() and ds.x.max() <= 1.0 and ds.x.max() > 0.9


# -- NTK --------------------------------------------------------------------------------------
def test_full_ntk_equals_jacobian_products(digits):
    """Full form (N·d, N·d), point-major output-minor, equals J Jᵀ from the Jacobian itself."""
    model = build_model(ModelConfig(kind="mlp", width=32), (64,), 10, jnp.float64)
    x = digits.x[:37]  # not a multiple of the block size: the padded last block must be cut
    k = empirical_ntk(model, x, form="full", block_size=16, dtype=np.float64, progress=False)
    f = lambda t: model.f(t, jnp.asarray(x, jnp.float64))  # noqa: E731
    jac = np.asarray(jax.jacrev(f)(model.theta0)).reshape(37 * 10, -1)
    assert k.shape == (370, 370)
    assert np.allclose(k, jac @ jac.T, rtol=1e-10, atol=1e-10)
    # neural-tangents' JACOBIAN_CONTRACTION, in its own (N, N, d, d) layout
    ref = nt.empirical_ntk_fn(
        model.apply_fn, trace_axes=(), implementation=nt.NtkImplementation.JACOBIAN_CONTRACTION
    )
    ref = np.asarray(ref(jnp.asarray(x), None, model.params0))
    assert np.allclose(kernel_to_4d(k, 37, 10), ref, rtol=1e-10, atol=1e-10)


def test_trace_form_is_exact_for_linear_model_only(digits):
    x = digits.x[:20]
    lin = build_model(ModelConfig(kind="linear"), (64,), 10, jnp.float64)
    full = kernel_to_4d(empirical_ntk(lin, x, "full", dtype=np.float64, progress=False), 20, 10)
    trace = empirical_ntk(lin, x, "trace", dtype=np.float64, progress=False)
    assert np.allclose(full, np.einsum("ij,ab->ijab", trace, np.eye(10)), atol=1e-12)
    mlp = build_model(ModelConfig(kind="mlp", width=64), (64,), 10, jnp.float64)
    full = kernel_to_4d(empirical_ntk(mlp, x, "full", dtype=np.float64, progress=False), 20, 10)
    off_diagonal = np.abs(full * (1 - np.eye(10))).sum() / np.abs(full * np.eye(10)).sum()
    assert off_diagonal > 0.01  # the trace form would drop this mass


def test_ntk_cache(tmp_path, digits):
    model = build_model(ModelConfig(kind="mlp", width=16), (64,), 10, jnp.float32)
    k1, r1 = cached_ntk(model, digits.x[:30], "full", tmp_path, progress=False)
    k2, r2 = cached_ntk(model, digits.x[:30], "full", tmp_path, progress=False)
    assert not r1["cached"] and r2["cached"] and np.array_equal(k1, k2)
    other = build_model(ModelConfig(kind="mlp", width=16, seed=3), (64,), 10, jnp.float32)
    _, r3 = cached_ntk(other, digits.x[:30], "full", tmp_path, progress=False)
    assert not r3["cached"] and len(list(tmp_path.glob("ntk-*.npy"))) == 2


# -- solvers ----------------------------------------------------------------------------------
def test_cg_and_cholesky_agree_and_cg_reports_non_convergence():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(60, 200))
    k = jnp.asarray(a @ a.T)  # trace form (N, N), N = 60
    s = jnp.asarray(np.stack([np.diag(rng.uniform(0.1, 1, 3)) for _ in range(60)]))
    mask = jnp.asarray(rng.uniform(size=60) < 0.8)
    rhs = jnp.asarray(rng.normal(size=(60, 3))) * mask[:, None]
    x_ch, i_ch = solve_spd(k, "trace", s, mask, rhs, 0.5, "cholesky", 1e-12, 100)
    x_cg, i_cg = solve_spd(k, "trace", s, mask, rhs, 0.5, "cg", 1e-12, 1000)
    assert i_ch.converged and i_cg.converged and i_cg.iterations > 0
    assert np.allclose(x_ch, x_cg, atol=1e-9)
    assert np.all(np.asarray(x_cg)[~np.asarray(mask)] == 0)
    _, bad = solve_spd(k, "trace", s, mask, rhs, 0.5, "cg", 1e-12, 2, max_restarts=0)
    assert not bad.converged and bad.iterations == 2 and bad.residual > 1e-12


@pytest.mark.parametrize("form", ["full", "trace"])
def test_nystrom_preconditioned_cg_gives_the_same_answer_in_fewer_iterations(form):
    """PCG with the Nyström preconditioner (Frangella et al.) against a dense float64 solve of the
    same system (B), with a spectrum like an NTK's (a few large eigenvalues, then a decaying tail)."""
    rng = np.random.default_rng(1)
    n, d = (80, 3) if form == "full" else (200, 3)
    side = n * d if form == "full" else n
    q, _ = np.linalg.qr(rng.normal(size=(side, side)))
    spectrum = np.concatenate([[400.0, 250, 120, 80, 60], 30.0 * 0.9 ** np.arange(side - 5)])
    k = jnp.asarray((q * spectrum) @ q.T)
    s = None
    if form == "full":  # cross-entropy-like blocks W^{1/2}, PSD
        p = rng.dirichlet(np.ones(d), size=n)
        w = np.stack([np.diag(pi) - np.outer(pi, pi) for pi in p])
        s = jnp.asarray(np.stack([scipy_sqrtm(wi) for wi in w]))
    mask = jnp.asarray(rng.uniform(size=n) < 0.85)
    rhs = jnp.asarray(rng.normal(size=(n, d))) * mask[:, None]
    c = 2.0
    ny = nystrom(k, 20)
    assert (
        ny is not None and ny.u.shape == (side, 20) and np.all(np.diff(np.asarray(ny.lam)) <= 1e-9)
    )
    dense = np.asarray(dense_operator(k, form, s, mask, c))
    flat = np.asarray(rhs).reshape(-1) if dense.shape[0] == n * d else np.asarray(rhs)
    exact = np.linalg.solve(dense, flat).reshape(rhs.shape)
    x_cg, plain = solve_spd(k, form, s, mask, rhs, c, "cg", 1e-10, 1000)
    x_pcg, pre = solve_spd(k, form, s, mask, rhs, c, "cg", 1e-10, 1000, nystrom=ny)
    assert (
        plain.converged
        and pre.converged
        and pre.preconditioner == "nystrom-20"
        and plain.preconditioner == ""
    )
    assert np.abs(np.asarray(x_pcg) - exact).max() <= 1e-8 * np.abs(exact).max()
    assert np.abs(np.asarray(x_cg) - exact).max() <= 1e-8 * np.abs(exact).max()
    assert pre.iterations * 2 <= plain.iterations, (pre.iterations, plain.iterations)
    # rows outside the mask stay exactly zero, and a compacted factor preconditions the compacted K
    assert np.all(np.asarray(x_pcg)[~np.asarray(mask)] == 0)
    keep = np.flatnonzero(np.asarray(mask))
    rows = (keep[:, None] * d + np.arange(d)).ravel() if form == "full" else keep
    k_rr = k[np.ix_(rows, rows)]
    sub = ny.take_rows(rows, len(rows))
    s_r = None if s is None else s[keep]
    x_sub, info = solve_spd(
        k_rr, form, s_r, jnp.ones(len(keep), bool), rhs[keep], c, "cg", 1e-10, 1000, nystrom=sub
    )
    assert info.converged and info.iterations * 2 <= plain.iterations
    assert np.abs(np.asarray(x_sub) - exact[keep]).max() <= 1e-8 * np.abs(exact).max()


def scipy_sqrtm(w: np.ndarray) -> np.ndarray:
    vals, vecs = np.linalg.eigh(w)
    return (vecs * np.sqrt(np.clip(vals, 0, None))) @ vecs.T


# -- engine: validation, checkpoints ------------------------------------------------------------
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
    assert back.version == 1 and back.n_train == 45 and back.forgotten_ids() == frozenset(gone)
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


def test_erased_rows_are_zero_while_the_bucket_holds(digits):
    """Within a capacity bucket forgotten rows are zeroed, not just masked; below it, compacted."""
    ds = digits.subset(slice(0, 64))
    u = Unlearner.build(
        ds,
        ModelConfig(kind="mlp", width=16),
        TrainConfig(loss="mse", dtype="float64"),
        SolverConfig(),
        progress=False,
    )
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
    assert with_spare._spare is not None and with_spare._spare.shape == with_spare.state.k.shape
    assert without._spare is None
    cap = with_spare.state.capacity
    assert cap == 256
    for n_forget in (
        10,
        16,
        100,
    ):  # 246 (same bucket), 230 (bucket 240: erased in place only with the spare), 130: compacted
        ids = with_spare.active_ids()[:n_forget]
        spare = with_spare._spare
        results = [u.forget(ids) for u in (with_spare, without)]
        a, b = with_spare.state, without.state
        assert a.n == b.n and all(r.solve.converged for r in results)
        if n_forget < 100:
            assert a.capacity == cap and spare.is_deleted()  # erased in place into the spare
            assert b.capacity == (cap if n_forget == 10 else 240)
            assert not np.any(np.asarray(a.k)[np.repeat(~a.active, 10)])
        else:
            assert a.capacity < cap
        assert with_spare._spare is not None and with_spare._spare.shape == a.k.shape  # made again
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


def test_validation_against_a_snapshot(small):
    """An estimate validates against the version it reads, not one published since (no 500 in a race)."""
    old = small.state
    gone = small.active_ids()[:2]
    new_state, _ = small.plan_forget(gone)
    small.validate_forget(gone, state=old)  # still valid for the snapshot
    with pytest.raises(AlreadyForgottenError):
        small.validate_forget(gone, state=new_state)


@pytest.mark.parametrize("loss", ["mse", "ce"])
def test_certificates_are_the_residual_of_the_published_alpha(digits, loss):
    """float32, λ = 1e-3: each version is published with the stationarity residual of its own α,
    recomputed from K (Newton used to report that of an f carried along by its updates: 3.6e-8
    against 1.5e-5 recomputed, mse). Above the training tolerance only when Newton stagnated, and then
    within FLOOR_FACTOR of the rounding floor, which float64 puts about nine orders lower."""
    from service_core.ntk import kernel_matvec
    from service_core.training import FLOOR_FACTOR, rounding_floor, stationarity

    ds = digits.subset(slice(0, 200))
    u = Unlearner.build(
        ds,
        ModelConfig(kind="mlp", width=64),
        TrainConfig(loss=loss, lam=1e-3),
        SolverConfig(),
        progress=False,
    )
    tol = u.train_config.resolved_tol()
    for version in range(3):
        st = u.state
        assert st.version == version
        problem = u._problem(st)
        _, direct = stationarity(problem, st.alpha)
        assert st.residual == pytest.approx(direct, rel=1e-3), (st.residual, direct)
        f = problem.f0 + kernel_matvec(problem.k, st.alpha, problem.form)
        floor = rounding_floor(problem, st.alpha, f)
        assert 0 < floor < 1e-3
        record = st.history[-1]
        if st.residual > tol:
            assert (
                record["rounding_floor"] > 0
                and st.residual <= FLOOR_FACTOR * record["rounding_floor"]
            )
        u.forget(u.active_ids()[:5])
    wide = Unlearner.build(
        ds,
        ModelConfig(kind="mlp", width=64),
        TrainConfig(loss=loss, lam=1e-3, dtype="float64"),
        SolverConfig(),
        progress=False,
    )
    p64 = wide._problem(wide.state)
    floor64 = rounding_floor(
        p64, wide.state.alpha, p64.f0 + kernel_matvec(p64.k, wide.state.alpha, p64.form)
    )
    assert floor64 < 1e-7 * floor and wide.state.residual <= wide.train_config.resolved_tol()


def test_network_is_the_same_whatever_x64_says_and_restore_checks_it(tmp_path, digits, monkeypatch):
    """A float64 engine turns on jax_enable_x64 for the whole process; θ0 of a float32 network must
    not change with it (restore recomputes K from the re-initialised network), and a checkpoint whose
    network cannot be re-created is refused instead of silently restored as another model."""
    from service_core import SolverError
    from service_core import engine as engine_module

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
    monkeypatch.setattr(engine_module, "_fingerprint", lambda model: 1.0)
    with pytest.raises(SolverError, match="differs from the one the checkpoint"):
        Unlearner.restore(tmp_path / "ck", progress=False)


@pytest.mark.parametrize("loss", ["mse", "ce"])
def test_newton_stagnation_exit_reports_the_kept_alphas_own_residual(digits, loss):
    """Asked for a tolerance float32 cannot reach, Newton stops on stagnation (not at its step
    limit) with the better α, its residual recomputed from K α (the certificate), and a floor."""
    from service_core.training import FLOOR_FACTOR, newton, stationarity

    ds = digits.subset(slice(0, 200))
    u = Unlearner.build(
        ds,
        ModelConfig(kind="mlp", width=64),
        TrainConfig(loss=loss, lam=1e-3),
        SolverConfig(),
        progress=False,
    )
    problem = u._problem(u.state)
    _, start = stationarity(problem, u.state.alpha)
    kwargs = u._solver_kwargs(u.solver_config, "float32", "auto")
    alpha, info = newton(problem, u.state.alpha, 1e-12, 20, kwargs)
    assert info.steps < 20 and info.floor > 0
    _, direct = stationarity(problem, alpha)
    assert info.residual == pytest.approx(direct, rel=1e-6)
    assert info.residual <= start * (1 + 1e-6)  # never worse than where it started
    assert info.converged == (info.residual <= FLOOR_FACTOR * info.floor)


@pytest.mark.parametrize("form", ["trace", "full"])
def test_cg_stagnation_on_the_rounding_floor(form):
    """A float32 CG solve that cannot reach its tolerance stops on stagnation with the estimated
    rounding floor of its residual (not "raise max_iter"): the floor is real (the float64 residual of
    the float32 answer is not below it either), a miss that rounding explains and that is small is
    accepted, a large one fails, and float64 reaches the same tolerance with no floor."""
    from jax.experimental import enable_x64

    from service_core.solvers import FLOOR_FACTOR, FLOOR_SLACK

    rng = np.random.default_rng(0)
    n, d, c = 120, 3, 0.1
    rows = n if form == "trace" else n * d
    g = rng.standard_normal((rows, rows // 2))
    k64 = (
        g @ g.T
    )  # PSD, rank-deficient: x is large on K's null space, so K x and c x nearly cancel in rounding
    rhs = rng.standard_normal((n, d))
    mask = jnp.ones(n, bool)

    def residual64(x):
        x = np.asarray(x, np.float64)
        kx = k64 @ x if form == "trace" else (k64 @ x.reshape(-1)).reshape(x.shape)
        return np.linalg.norm(rhs - c * x - kx) / np.linalg.norm(rhs)

    k32, b32 = jnp.asarray(k64, jnp.float32), jnp.asarray(rhs, jnp.float32)
    x, info = solve_spd(k32, form, None, mask, b32, c, "alpha-cg", tol=1e-10, max_iter=2000)
    assert (
        not info.converged and info.floor > 0 and info.iterations < 4 * 2000
    )  # stagnated, not out of iterations
    assert info.floor / 10 <= info.residual <= FLOOR_FACTOR * info.floor
    assert residual64(x) >= info.floor / 10
    near = info.residual / (0.5 * FLOOR_SLACK)  # a tolerance the stagnated residual misses by ~5×
    x, info = solve_spd(k32, form, None, mask, b32, c, "alpha-cg", tol=near, max_iter=2000)
    assert info.residual > near and info.converged and info.floor > 0
    assert info.to_dict()["rounding_floor"] == info.floor
    with enable_x64():
        x, info64 = solve_spd(
            jnp.asarray(k64),
            form,
            None,
            mask,
            jnp.asarray(rhs),
            c,
            "alpha-cg",
            tol=1e-10,
            max_iter=2000,
        )
        assert info64.converged and info64.floor == 0.0 and info64.residual <= 1e-10
        assert residual64(x) <= 1e-9


@pytest.mark.parametrize("method", ["alpha-cg", "alpha-cholesky"])
def test_tiny_right_hand_sides_are_solved_and_certified(method):
    """float32 squared norms of a 1e-15 rhs underflow: CG reported residual 0 for an answer whose
    float64 residual was 3e-5, and returned x = 0 as converged at 1e-20. The system is solved for
    rhs / max|rhs| and scaled back."""
    rng = np.random.default_rng(1)
    n, d, c = 30, 3, 1e-3
    g = rng.standard_normal((n, 50)).astype(np.float32)
    k = g @ g.T
    base = rng.standard_normal((n, d)).astype(np.float32)
    a = c * np.eye(n) + k.astype(np.float64)
    for scale in (1e-15, 1e-20, 1e-30):
        rhs = base * np.float32(scale)
        x, info = solve_spd(
            jnp.asarray(k), "trace", None, jnp.ones(n, bool), jnp.asarray(rhs), c, method, 1e-6, 300
        )
        x = np.asarray(x, np.float64)
        true = np.linalg.norm(rhs - a @ x) / np.linalg.norm(rhs.astype(np.float64))
        assert info.converged and 0 < info.residual <= 1e-6 and true <= 2e-6, (scale, info, true)
        assert info.residual == pytest.approx(
            true, rel=1.0
        )  # the certificate is the answer's, not an underflow


def test_inexact_newton_with_cg_inner_solves_converges_for_a_small_lambda(digits):
    """ce, λ = 1e-5 (c = λN = 3e-3), float32, CG inner solves: Newton meets its forcing term on (B),
    but δ = (b − S z)/c amplifies (B)'s residual by ~‖S K b‖/(c‖b‖), so δ was useless far from the
    optimum and Newton stalled at 0.87 after 50 steps (full digits: 93 s, then "raise lam or
    max_newton"). (B)'s tolerance is now divided by that amplification."""
    ds = digits.subset(slice(0, 300))
    u = Unlearner.build(
        ds,
        ModelConfig(kind="mlp", width=64),
        TrainConfig(loss="ce", lam=1e-5, tol=1e-3, max_newton=20),
        SolverConfig(method="alpha-cg"),
        progress=False,
    )
    info = u.state.history[0]["train"]
    assert info["converged"] and u.state.residual <= 1e-3 and info["iterations"] <= 12, info
