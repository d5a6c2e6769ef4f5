"""Linear algebra of system (B): CG and Cholesky, Nyström preconditioning, rounding floors."""

from __future__ import annotations

import contextlib
import importlib

import jax.numpy as jnp
import numpy as np
import pytest
from threadpoolctl import threadpool_info

from service_core.layout import KernelLayout
from service_core.linalg import SolveOptions, SPDSystem, canonical_method, nystrom
from service_core.linalg import solve_spd as _solve_spd


def solve_spd(
    k, form, s, mask, rhs, c, method, tol, max_iter, max_restarts=3, nystrom=None, accept_floor=1.0
):
    """System (B) (c·I + M S K S M) x = rhs by the engine's solver, K given as a matrix."""
    d = rhs.shape[1]
    layout = KernelLayout(form, d)
    system = SPDSystem.make(k, layout, s, mask, c)
    options = SolveOptions(
        canonical_method(method),
        tol,
        max_iter,
        max_restarts=max_restarts,
        nystrom=nystrom,
        accept_floor=accept_floor,
    )
    return _solve_spd(system, rhs, options)


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
    ny, _ = nystrom(k, 20)
    assert (
        ny is not None and ny.u.shape == (side, 20) and np.all(np.diff(np.asarray(ny.lam)) <= 1e-9)
    )
    dense = np.asarray(SPDSystem.make(k, KernelLayout(form, d), s, mask, c).dense())
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
    # in job records and the API: null when CG ran unpreconditioned, never ""
    assert plain.to_dict()["preconditioner"] is None
    assert pre.to_dict()["preconditioner"] == "nystrom-20"
    assert np.abs(np.asarray(x_pcg) - exact).max() <= 1e-8 * np.abs(exact).max()
    assert np.abs(np.asarray(x_cg) - exact).max() <= 1e-8 * np.abs(exact).max()
    assert pre.iterations * 2 <= plain.iterations, (pre.iterations, plain.iterations)
    # rows outside the mask stay exactly zero, and a compacted factor preconditions the compacted K
    assert np.all(np.asarray(x_pcg)[~np.asarray(mask)] == 0)
    keep = np.flatnonzero(np.asarray(mask))
    rows = (keep[:, None] * d + np.arange(d)).ravel() if form == "full" else keep
    k_rr = k[np.ix_(rows, rows)]
    sub = ny._replace(u=KernelLayout(form, d).take_factor_rows(ny.u, keep, len(keep)))
    s_r = None if s is None else s[keep]
    x_sub, info = solve_spd(
        k_rr, form, s_r, jnp.ones(len(keep), bool), rhs[keep], c, "cg", 1e-10, 1000, nystrom=sub
    )
    assert info.converged and info.iterations * 2 <= plain.iterations
    assert np.abs(np.asarray(x_sub) - exact[keep]).max() <= 1e-8 * np.abs(exact).max()


def scipy_sqrtm(w: np.ndarray) -> np.ndarray:
    vals, vecs = np.linalg.eigh(w)
    return (vecs * np.sqrt(np.clip(vals, 0, None))) @ vecs.T


@pytest.mark.parametrize("form", ["trace", "full"])
def test_cg_stagnation_on_the_rounding_floor(form):
    """A float32 CG solve that cannot reach its tolerance stops on stagnation with the estimated
    rounding floor of its residual (not "raise max_iter"): the floor is real (the float64 residual of
    the float32 answer is not below it either), a miss that rounding explains and that is small is
    accepted only within the slack the operator granted (none by default), and float64 reaches the
    same tolerance with no floor."""
    from jax.experimental import enable_x64

    from service_core.linalg import FLOOR_FACTOR

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
    near = info.residual / 5  # a tolerance the stagnated residual misses by ~5×
    x, info = solve_spd(k32, form, None, mask, b32, c, "alpha-cg", tol=near, max_iter=2000)
    assert info.residual > near and not info.converged and info.floor > 0  # no slack by default
    assert info.to_dict()["rounding_floor"] == info.floor
    x, info = solve_spd(
        k32, form, None, mask, b32, c, "alpha-cg", tol=near, max_iter=2000, accept_floor=10
    )
    assert near < info.residual <= 10 * near and info.converged and info.floor > 0
    x, info = solve_spd(
        k32, form, None, mask, b32, c, "alpha-cg", tol=near, max_iter=2000, accept_floor=2
    )
    assert info.residual > 2 * near and not info.converged  # the slack is a bound
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


def test_nystrom_on_one_core_is_the_same_approximation(monkeypatch):
    """``one_core`` (post-publish work beside requests): K Ω on one BLAS thread, the same
    rank-ℓ approximation up to rounding, which is still below K (K − U Λ Uᵀ PSD)."""
    nystrom_module = importlib.import_module("service_core.linalg.nystrom")

    rng = np.random.default_rng(0)
    a = rng.standard_normal((300, 60))
    k = jnp.asarray(a @ a.T + 1e-3 * np.eye(300), jnp.float32)
    limits = []
    real = nystrom_module.one_blas_thread

    @contextlib.contextmanager
    def spy():
        with real():
            limits.append([i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"])
            yield

    monkeypatch.setattr(nystrom_module, "one_blas_thread", spy)
    threaded, _ = nystrom(k, 40)
    assert limits == []
    one, _ = nystrom(k, 40, one_core=True)
    assert len(limits) == 1 and limits[0] and all(n == 1 for n in limits[0])

    def dense(ny):
        u, lam = np.asarray(ny.u, np.float64), np.asarray(ny.lam, np.float64)
        return (u * lam) @ u.T

    kd = np.asarray(k, np.float64)
    np.testing.assert_allclose(dense(one), dense(threaded), atol=1e-4 * np.abs(kd).max())
    assert np.linalg.eigvalsh(kd - dense(one)).min() > -1e-4 * np.abs(kd).max()


@pytest.mark.parametrize("form,d,points", [("full", 3, 300), ("trace", 1, 257), ("full", 10, 20)])
def test_erase_into_the_spare_by_rows_equals_the_whole_array_product(form, d, points):
    """A deletion erases K into the spare buffer one block of rows at a time (one core): the
    same values as K·m mᵀ over the whole array, for sizes that are and are not a multiple of
    the block, in both forms."""
    from service_core import layout as layout_module

    rng = np.random.default_rng(1)
    side = points * d if form == "full" else points
    k = jnp.asarray(rng.standard_normal((side, side)), jnp.float32)
    keep = jnp.asarray(rng.random(points) > 0.3)
    lay = KernelLayout(form, d)
    expected = np.asarray(layout_module._erase(k, keep, form == "full", d))
    spare = jnp.full((side, side), 7.0, jnp.float32)  # whatever the buffer held before
    got = np.asarray(lay.erase(k, keep, into=spare))
    np.testing.assert_array_equal(got, expected)
    rows = np.repeat(np.asarray(keep), d)
    assert not got[~rows].any() and not got[:, ~rows].any()


def test_kernel_progress_bar_only_on_a_terminal(capfd):
    """``progress=True`` draws tqdm's bar on a terminal only: written to a log file its carriage
    returns made one line of every update (the service's log at a build)."""
    from service_core.kernels import blocked

    a = np.arange(12.0).reshape(6, 2)
    k = blocked(lambda x, y: x @ y.T, a, block_size=2, dtype=np.float64, progress=True)
    np.testing.assert_allclose(k, a @ a.T)
    assert "kernel blocks" not in capfd.readouterr().err  # pytest's stderr is not a terminal


def test_the_auto_choice_says_which_kappa_it_used():
    """The 'auto' reason names its κ: a bound from K's λ_max, or the Nyström-preconditioned
    estimate (a κ ≈ 2 beside /v1/model's κ ≈ 551 read as a contradiction to a user)."""
    from service_core.linalg.choose import cg_iterations, choose_method

    args = (500, 10, "full", True, 10_000)
    bound = choose_method(*args, 551.0, 1e-6, 4096)
    pre = choose_method(*args, 2.0, 1e-6, 4096, kappa_theta=551.0, preconditioned=True)
    assert "κ ≤ 551 (" in bound.reason and "preconditioned" not in bound.reason
    assert "preconditioned κ ≈ 2 (Nyström" in pre.reason
    assert f"≈{cg_iterations(2.0, 1e-6):.0f} CG iterations" in pre.reason
