"""Leave-one-out attribution and self-influence against brute-force retraining, float64.

The oracle retrains the linearised network without each record, one at a time, in parameter space
with numpy: the Jacobian J(X) comes straight from the network (``jax.jacfwd``), θ − θ_p is written in
an orthonormal basis V of J's row space over all training points (every retrained optimum lies there,
math.md Dual representation), and each retain risk is minimised by the normal equations (squared error)
or damped Newton with a dense Hessian (cross-entropy). Nothing in it uses the engine's kernels, dual
variables, solvers or the ``attribution`` module.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from service_core import (
    InvalidInputError,
    ModelConfig,
    RefinementLimitError,
    SolverConfig,
    TrainConfig,
    Unlearner,
    load_digits,
)
from service_core.attribution import factor
from service_core.deletion import problem_of
from service_core.influence import deletion_step
from service_core.linalg import SolveOptions

LAM = 1e-2
N_TEST = 6


def softmax(z):
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def loss_value(loss, f, y):
    if loss == "mse":
        return 0.5 * np.sum((f - y) ** 2, axis=-1)
    z = f - f.max(axis=-1, keepdims=True)
    return -np.sum(y * (z - np.log(np.exp(z).sum(axis=-1, keepdims=True))), axis=-1)


class Oracle:
    """Exact retraining of the linearised model in θ-space, reduced to J's row space."""

    def __init__(self, u: Unlearner, x, y, x_test, loss):
        model = u.model
        theta0 = np.asarray(model.theta0, np.float64)
        theta_p = np.asarray(model.theta_p, np.float64)

        def f(t, xs):
            return model.apply_fn(
                model.unravel(t), jnp.asarray(xs, jnp.float64).reshape(len(xs), -1)
            )

        def base_and_jac(xs):
            out = np.asarray(f(jnp.asarray(theta0), xs))
            jac = np.asarray(jax.jacfwd(lambda t: f(t, xs))(jnp.asarray(theta0))).reshape(
                out.size, -1
            )
            return out.reshape(-1) + jac @ (theta_p - theta0), jac

        base, jac = base_and_jac(x)
        _, sv, vt = np.linalg.svd(jac, full_matrices=False)
        basis = vt[sv > sv[0] * 1e-12].T  # (P, r)
        self.n, self.d = y.shape
        self.a = (jac @ basis).reshape(self.n, self.d, -1)
        self.base = base.reshape(self.n, self.d)
        tbase, tjac = base_and_jac(x_test)
        self.ta = (tjac @ basis).reshape(len(x_test), self.d, -1)
        self.tbase = tbase.reshape(len(x_test), self.d)
        self.y, self.loss = y, loss

    def fit(self, keep: np.ndarray) -> np.ndarray:
        """v minimising (1/|keep|) Σ ℓ(base_j + A_j v, y_j) + (λ/2)‖v‖² over the rows ``keep``."""
        a = self.a[keep].reshape(-1, self.a.shape[2])
        base, y, n = self.base[keep].reshape(-1), self.y[keep].reshape(-1), int(keep.sum())
        r = a.shape[1]
        if self.loss == "mse":
            return np.linalg.solve(a.T @ a / n + LAM * np.eye(r), a.T @ (y - base) / n)
        d = self.d

        def risk(v):
            return (
                np.sum(loss_value("ce", (base + a @ v).reshape(n, d), y.reshape(n, d))) / n
                + 0.5 * LAM * v @ v
            )

        v = np.zeros(r)
        for _ in range(100):
            p = softmax((base + a @ v).reshape(n, d))
            grad = a.T @ (p.reshape(-1) - y) / n + LAM * v
            w = np.einsum("na,ab->nab", p, np.eye(d)) - np.einsum("na,nb->nab", p, p)
            wa = np.matmul(w, a.reshape(n, d, r)).reshape(n * d, r)
            hess = a.T @ wa / n + LAM * np.eye(r)
            step = np.linalg.solve(hess, grad)
            t, r0 = 1.0, risk(v)
            while t > 1e-10 and risk(v - t * step) > r0 - 1e-4 * t * (grad @ step):
                t *= 0.5
            v = v - t * step
            # quadratic convergence: after a full step this small, v is exact to rounding
            if t == 1.0 and np.linalg.norm(step) <= 1e-9 * (1.0 + np.linalg.norm(v)):
                break
        return v

    def loo(self):
        """Δℓ at the test points ``(n_t, N)`` and self-influence ``(N,)`` for every record."""
        full = self.fit(np.ones(self.n, bool))
        f_test = self.tbase + self.ta @ full
        f_train = self.base + self.a @ full
        yt = self.y_test
        d_test = np.zeros((len(f_test), self.n))
        d_self = np.zeros(self.n)
        for i in range(self.n):
            keep = np.ones(self.n, bool)
            keep[i] = False
            v = self.fit(keep)
            d_test[:, i] = loss_value(self.loss, self.tbase + self.ta @ v, yt) - loss_value(
                self.loss, f_test, yt
            )
            fi = self.base[i] + self.a[i] @ v
            d_self[i] = loss_value(self.loss, fi, self.y[i]) - loss_value(
                self.loss, f_train[i], self.y[i]
            )
        return d_test, d_self


def build(ds, kind, loss):
    return Unlearner.build(
        ds,
        ModelConfig(kind=kind, width=32, depth=1, seed=1),
        TrainConfig(loss=loss, lam=LAM, dtype="float64"),
        SolverConfig(),
        progress=False,
    )


@pytest.fixture(scope="module")
def digits():
    return load_digits(seed=0)


_ORACLES: dict = {}


def setting(digits, kind, loss, n):
    """(Unlearner, test set, oracle Δℓ (n_t, N), oracle self-influence (N,)), built once per case."""
    key = (kind, loss, n)
    if key not in _ORACLES:
        train = digits.subset(slice(0, n))
        test = digits.subset(slice(500, 500 + N_TEST))
        u = build(train, kind, loss)
        oracle = Oracle(u, train.x, train.targets(), test.x, loss)
        oracle.y_test = test.targets()
        _ORACLES[key] = (u, test, *oracle.loo())
    return _ORACLES[key]


# linear: trace form (K = k ⊗ I_d); N = 80 > 65 features makes k singular. mlp: full form.
MSE_CASES = [("linear", 40), ("linear", 80), ("mlp", 40)]
CE_CASES = [("linear", 24), ("mlp", 24)]


def close(actual, expected, rtol):
    """Equal to ``rtol`` relative to the largest expected magnitude."""
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=rtol * np.max(np.abs(expected)))


@pytest.mark.parametrize("kind,n", MSE_CASES)
def test_squared_error_equals_retraining(digits, kind, n):
    u, test, d_test, d_self = setting(digits, kind, "mse", n)
    si = u.self_influence()
    assert si.exact
    index = {i: p for p, i in enumerate(u.active_ids())}
    order = [index[i] for i in si.ids]
    close(si.self_influence, d_self[order], 1e-6)
    assert np.all(np.diff(si.self_influence) <= 0)
    k = 5
    a = u.attribute(test.x, test.y, k=k)
    assert a.exact and a.helpful_ids.shape == (N_TEST, k)
    for t in range(N_TEST):
        want_helpful = np.argsort(-d_test[t])[:k]
        want_harmful = np.argsort(d_test[t])[:k]
        assert [index[i] for i in a.helpful_ids[t]] == want_helpful.tolist()
        assert [index[i] for i in a.harmful_ids[t]] == want_harmful.tolist()
        close(a.helpful.delta_loss[t], d_test[t, want_helpful], 1e-6)
        close(a.harmful.delta_loss[t], d_test[t, want_harmful], 1e-6)
    assert np.all(a.helpful.delta_loss[:, 0] > 0) and np.all(a.harmful.delta_loss[:, 0] < 0)


@pytest.mark.slow  # a Newton solve per refined record, engine and oracle: ~30 s on two cores
@pytest.mark.parametrize("kind,n", CE_CASES)
def test_cross_entropy_exact_equals_retraining(digits, kind, n):
    u, test, d_test, d_self = setting(digits, kind, "ce", n)
    k, rows = 2, 2
    a = u.attribute(test.x[:rows], test.y[:rows], k=k, exact=True)
    assert a.exact
    index = {i: p for p, i in enumerate(u.active_ids())}
    for t in range(rows):
        rows_h = [index[i] for i in a.helpful_ids[t]]
        rows_b = [index[i] for i in a.harmful_ids[t]]
        close(a.helpful.delta_loss[t], d_test[t, rows_h], 1e-5)
        close(a.harmful.delta_loss[t], d_test[t, rows_b], 1e-5)
        assert rows_h == np.argsort(-d_test[t])[:k].tolist()
        assert rows_b == np.argsort(d_test[t])[:k].tolist()
    if kind == "mlp":  # every record refined: one case is enough
        si = u.self_influence(exact=True)
        assert si.exact and si.exact_top == len(si.ids)
        close(si.self_influence, d_self[[index[i] for i in si.ids]], 1e-5)
        # only the 5 the influence step ranks highest refined: those exact, sorted by exact values;
        # the rest keep the step's values and order
        step = u.self_influence()
        head = u.self_influence(exact=True, top=5)
        assert head.exact_top == 5 and not head.exact
        assert set(head.ids[:5]) == set(step.ids[:5])
        close(head.self_influence[:5], d_self[[index[i] for i in head.ids[:5]]], 1e-5)
        assert np.all(np.diff(head.self_influence[:5]) <= 0)
        assert list(head.ids[5:]) == list(step.ids[5:])
        np.testing.assert_array_equal(head.self_influence[5:], step.self_influence[5:])


@pytest.mark.slow  # the oracle retrains every record by Newton: ~60 s on two shared cores
@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_cross_entropy_first_order_is_the_influence_step(digits, kind):
    """The default for cross-entropy is one Newton step on the retain risk: system (A) with F = {i}
    as the engine's deletion solves it, here for a few records, at the test points and at the
    record itself (self-influence)."""
    u, test, d_test, d_self = setting(digits, kind, "ce", 24)
    st = u.state
    a = u.attribute(test.x, test.y, k=24)
    assert not a.exact
    problem = problem_of(st)
    solver = SolveOptions("alpha-cholesky", 1e-12, 100, 10_000)
    xt = jnp.asarray(test.x, jnp.float64)
    self_first = u.self_influence()
    f_star = np.asarray(st.f0 + st.layout.matvec(st.k, st.alpha))
    for row in (0, 7, 23):
        mask = np.zeros(st.capacity, bool)
        mask[row] = True
        delta = deletion_step(
            problem, st.alpha, jnp.asarray(mask), solver, certify=False
        ).delta_alpha
        df = u.model.f0_and_jvp(xt, u.model.theta(st.x, delta, delta=True))[1]
        for t in range(N_TEST):
            pos = list(a.helpful_ids[t]).index(st.ids[row])
            close(a.helpful.delta_outputs[t, pos], np.asarray(df)[t], 1e-8)
        own = np.asarray(st.layout.matvec(st.k, delta))[row]
        y = np.asarray(st.y)[row]
        want = loss_value("ce", f_star[row] + own, y) - loss_value("ce", f_star[row], y)
        got = dict(zip(self_first.ids, self_first.self_influence, strict=True))[st.ids[row]]
        assert got == pytest.approx(want, rel=1e-8)
    # first order is close to retraining on this small set, and ranks alike
    si = self_first
    index = {i: p for p, i in enumerate(u.active_ids())}
    first = np.empty(len(index))
    first[[index[i] for i in si.ids]] = si.self_influence
    assert np.corrcoef(first, d_self)[0, 1] > 0.99


def test_of_output_ranks_by_the_labelled_output(digits):
    u, test, *_ = setting(digits, "mlp", "mse", 40)
    a = u.attribute(test.x, test.y, k=3, of="output")
    label = np.asarray(test.y)
    for t in range(N_TEST):
        helpful = a.helpful.delta_outputs[t, :, label[t]]
        harmful = a.harmful.delta_outputs[t, :, label[t]]
        assert np.all(np.diff(helpful) >= 0) and np.all(np.diff(harmful) <= 0)
        assert helpful[0] <= harmful[-1]


def test_bad_requests_are_refused(digits):
    u, test, *_ = setting(digits, "linear", "mse", 40)
    for k in (0, -1, 41, 2.5, True):
        with pytest.raises(InvalidInputError, match="from 1 to 40"):
            u.attribute(test.x, test.y, k=k)
    with pytest.raises(InvalidInputError, match="of must be"):
        u.attribute(test.x, test.y, of="gradient")
    with pytest.raises(InvalidInputError, match="class labels"):
        u.attribute(test.x, np.full(N_TEST, 11), k=2)
    assert u.version == 0


def test_factor_cached_per_version_and_follows_a_deletion(digits, caplog):
    train = digits.subset(slice(0, 30))
    test = digits.subset(slice(500, 503))
    u = build(train, "mlp", "mse")
    caplog.set_level("INFO", logger="service_core.attribution")
    first = u.self_influence()
    u.self_influence()
    # the factorisation (a cold one took a minute, with nothing said) is logged, once per version
    said = [m for m in caplog.messages if "leave-one-out system factored in" in m]
    assert len(said) == 1 and said[0].startswith("version 0: "), caplog.messages
    cached = u._loo.get(u.state, lambda: pytest.fail("recomputed for the same version"))
    assert cached is factor(u.state, u._loo) is u.loo_factor()
    gone = list(first.ids[:3])
    u.forget(gone)
    after = u.self_influence()
    assert after.version == 1 and len(after.ids) == 27 and not set(gone) & set(after.ids)
    a = u.attribute(test.x, test.y, k=27)
    assert not set(gone) & set(a.helpful_ids.ravel()) and not set(gone) & set(a.harmful_ids.ravel())
    # after the deletion, still exact: against a model trained on the retained records from scratch
    keep = np.flatnonzero(~np.isin(train.ids, gone))
    fresh = build(train.subset(keep), "mlp", "mse").self_influence()
    got = dict(zip(after.ids, after.self_influence, strict=True))
    close([got[i] for i in fresh.ids], fresh.self_influence, 1e-6)


def test_a_large_cholesky_runs_on_one_blas_thread(monkeypatch):
    """``_potrf`` of a matrix over its byte limit (OpenBLAS's threaded Cholesky crashes on ~2 GB
    matrices here) runs with one BLAS thread, and factorises exactly as the threaded call."""
    from threadpoolctl import threadpool_info

    from service_core import attribution

    rng = np.random.default_rng(0)
    x = rng.standard_normal((300, 300))
    spd = x @ x.T + 300 * np.eye(300)
    threaded, info = attribution._potrf(np.asfortranarray(spd.copy()))
    assert info == 0
    seen = []
    real = attribution.potrf_lower

    def spy(*args, **kwargs):
        seen.append([i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"])
        return real(*args, **kwargs)

    monkeypatch.setattr(attribution, "potrf_lower", spy)
    monkeypatch.setattr(attribution, "_POTRF_THREADED_MAX_BYTES", spd.nbytes - 1)
    one, info = attribution._potrf(np.asfortranarray(spd.copy()))
    assert info == 0 and seen and all(n == 1 for n in seen[0])
    np.testing.assert_allclose(np.tril(one), np.tril(threaded), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(np.tril(one) @ np.tril(one).T, spd, rtol=1e-10)


def test_exact_self_influence_refines_each_record_once_per_version(digits, monkeypatch):
    """Refined (exact) self-influence values are kept per version: a later request refines only
    the records no earlier one did, gets the same values as a cold computation, and a new
    version starts afresh (nothing of a forgotten record's version is kept)."""
    from service_core import attribution

    u = build(digits.subset(slice(0, 20)), "linear", "ce")
    refined_rows = []
    real = attribution.refined_deltas

    def spy(problem, alpha, rows, *args, **kwargs):
        refined_rows.append(len(rows))
        return real(problem, alpha, rows, *args, **kwargs)

    monkeypatch.setattr(attribution, "refined_deltas", spy)
    first = u.self_influence(exact=True, top=3)
    assert sum(refined_rows) == 3
    again = u.self_influence(exact=True, top=3)
    assert sum(refined_rows) == 3  # nothing refined again
    np.testing.assert_array_equal(again.self_influence, first.self_influence)
    wider = u.self_influence(exact=True, top=6)
    assert sum(refined_rows) == 6  # only the three new ones
    cold = attribution.self_influence(u.state, attribution.FactorCache(), True, 6)
    assert list(cold.ids) == list(wider.ids)
    np.testing.assert_allclose(wider.self_influence, cold.self_influence, rtol=1e-12, atol=0)

    u.forget([str(wider.ids[-1])])
    refined_rows.clear()
    u.self_influence(exact=True, top=3)
    assert sum(refined_rows) == 3  # a new version: refined again


def test_exact_refinements_are_capped_and_stop_when_cancelled(digits, monkeypatch):
    """``max_refinements`` refuses an exact attribution that would refine more records, before
    any Newton solve; ``cancelled`` stops the refinements between two records
    (``ComputationCancelled``), and the self-influence values refined before it are kept: the
    next call refines only the rest and equals a cold computation."""
    from service_core import ComputationCancelled, attribution

    u = build(digits.subset(slice(0, 20)), "linear", "ce")
    test = digits.subset(slice(500, 502))
    solves = []
    real = attribution.deletion_step
    monkeypatch.setattr(
        attribution, "deletion_step", lambda *a, **kw: solves.append(1) or real(*a, **kw)
    )
    whole = u.attribute(test.x, test.y, k=2, exact=True)
    needed = len(solves)  # the distinct leading 4 per side over both rows
    assert 4 <= needed <= 16 and whole.exact
    solves.clear()
    with pytest.raises(
        InvalidInputError, match=f"would refine {needed} records.*at most {needed - 1}"
    ) as refused:
        u.attribute(test.x, test.y, k=2, exact=True, max_refinements=needed - 1)
    assert solves == []  # refused before any solve
    assert isinstance(refused.value, RefinementLimitError)  # the API names its flag from it
    assert (refused.value.count, refused.value.limit) == (needed, needed - 1)
    told = []
    capped = u.attribute(
        test.x, test.y, k=2, exact=True, max_refinements=needed, progress=lambda *p: told.append(p)
    )
    # when the refinements begin, then after each one
    assert told == [(i, needed) for i in range(needed + 1)]
    np.testing.assert_array_equal(capped.helpful_ids, whole.helpful_ids)
    np.testing.assert_array_equal(capped.harmful.delta_loss, whole.harmful.delta_loss)

    def after(n: int):
        asked = []
        return lambda: asked.append(1) or len(asked) > n

    solves.clear()
    with pytest.raises(ComputationCancelled, match="after refining 2 of"):
        u.attribute(test.x, test.y, k=2, exact=True, cancelled=after(2))
    assert len(solves) == 2
    solves.clear()
    with pytest.raises(ComputationCancelled, match="after refining 2 of 5"):
        u.self_influence(exact=True, top=5, cancelled=after(2))
    assert len(solves) == 2
    rest = u.self_influence(exact=True, top=5, cancelled=lambda: False)
    assert len(solves) == 5  # the two kept, three more
    cold = attribution.self_influence(u.state, attribution.FactorCache(), True, 5)
    assert list(rest.ids) == list(cold.ids)
    np.testing.assert_allclose(rest.self_influence, cold.self_influence, rtol=1e-12, atol=0)


def test_rank_takes_both_ends_of_one_ordering_even_with_ties():
    """Top and bottom come from one ordering of the active records: disjoint when 2k ≤ N, so a
    row of tied scores (two sorts put the same records first in both) still has 2k distinct
    candidates, the count the attribution route checks its limit with before any work."""
    from service_core.attribution import rank

    active = np.array([True, True, False, True, True, True, True])
    tied = np.zeros((1, 7))
    top, bottom = rank(tied, active, 3)
    assert set(top[0]).isdisjoint(bottom[0]) and 2 not in set(top[0]) | set(bottom[0])
    scores = np.array([[5.0, -1.0, 99.0, 3.0, np.nan, 0.0, 7.0]])  # nan: never ranked
    active_all = np.ones(7, bool)
    top, bottom = rank(scores, active_all, 2)
    assert list(top[0]) == [2, 6] and list(bottom[0]) == [1, 5]
    top, bottom = rank(scores, active, 2)  # record 2 inactive
    assert list(top[0]) == [6, 0] and list(bottom[0]) == [1, 5]
