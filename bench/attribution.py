"""``ntk-unlearn bench attribution``: leave-one-out attribution and self-influence (issue 14).

Protocol. Every "actual" number comes from retraining to the optimum without the record(s), done here
independently of ``service_core.attribution``: a dense float64 Newton solve of the dual retain risk
(math.md, Dual representation; squared error in closed form) on the served model's own K and
K(X_t, X), cast to float64. Predictions come from the served (float32) model through
``Unlearner.attribute``'s arrays (``attribution.test_changes``) and ``Unlearner.self_influence``.

* ``loo``: Pearson and Spearman correlation of predicted against actual Δℓ over every pair of
  ``--attr-tests`` test points × ``--attr-records`` random training records.
* ``lds``: linear datamodeling score as TRAK / dattri define it: ``--lds-subsets`` random 50 %
  subsets S, actual test loss after training on S, predicted −Σ_{i∈S} Δℓ_t^(−i) (the LOO scores as a
  linear datamodel), Spearman across subsets per test point, averaged over test points.
* ``mislabel``: 10 % of the training labels flipped to another class; records ranked by
  self-influence; AUC (flipped = positive) and the share of flipped records in the top 10 %.
* ``mia``: loss-threshold membership inference (AUC of −loss, forget set against as many held-out
  test points) for the original model, the model after ``Unlearner.forget`` and a model built from
  scratch on the retained records.
* ``cost``: self-influence for every record and top-k for 100 test points on the MNIST FCNN workload
  (bench/figure1.py's: N = 2,000, d = 10, 3×1024, full form, cross-entropy), cold (first call of
  the version: factorisation included) and warm, with the process's peak resident memory.
"""

from __future__ import annotations

import dataclasses
import gc
import os
import time
from pathlib import Path

import numpy as np
from scipy import linalg, stats

from service_core import (
    ModelConfig,
    SolverConfig,
    TrainConfig,
    Unlearner,
    attribution,
    load_digits,
    load_mnist,
    validation,
)
from service_core.data import Dataset

from .machine import peak_rss_gib

LAM = 1e-2
# λ grid of the mislabel part's validation rule (clean held-out loss picks one; flips never seen);
# it reaches 1e-7 so that the MNIST FCNN's minimum (1e-6 at N = 2,000) is inside it
MISLABEL_LAMS = (1e-2, 1e-3, 1e-4, 1e-5, 1e-6, 1e-7)
# the pretrained CNN's head is fitted toward the pretrained head (λ toward θ0): its grid reaches up
PRETRAINED_LAMS = (100.0, 10.0, 1.0, 0.1, 1e-2, 1e-3, 1e-4)
PRETRAIN_EPOCHS = 10
PRETRAINED_TITLE = (
    "MNIST CNN pretrained on the other MNIST images (clean), head linearised, cross-entropy"
)


def stratified(ds: Dataset, per_class: int, seed: int = 0) -> Dataset:
    rng = np.random.default_rng(seed)
    idx = np.concatenate(
        [rng.permutation(np.flatnonzero(ds.y == c))[:per_class] for c in range(ds.output_dim)]
    )
    return ds.subset(np.sort(idx))


def build(
    ds: Dataset,
    kind: str,
    loss: str,
    width: int = 512,
    depth: int = 2,
    lam: float = LAM,
    model: ModelConfig | None = None,
) -> Unlearner:
    return Unlearner.build(
        ds,
        model or ModelConfig(kind=kind, width=width, depth=depth, seed=0),
        TrainConfig(loss=loss, lam=lam),
        SolverConfig(),
        progress=False,
    )


def _softmax(z):
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def loss_value(loss: str, f, y):
    if loss == "mse":
        return 0.5 * np.sum((f - y) ** 2, axis=-1)
    z = f - f.max(axis=-1, keepdims=True)
    return -np.sum(y * (z - np.log(np.exp(z).sum(axis=-1, keepdims=True))), axis=-1)


class Dense:
    """The served model's dual problem over its active records in float64, full form, and its
    kernel to test points: exact retraining on any subset by a dense solve."""

    def __init__(self, u: Unlearner, x_test, y_test):
        st = u.state
        d = u.state.layout.d
        self.rows = np.flatnonzero(st.active)
        self.n, self.d = len(self.rows), d
        k = np.asarray(st.k, np.float64)
        t = attribution.cross_kernel(st, u.model, _inputs(st, x_test)).astype(np.float64)
        if st.form == "full":
            cols = (self.rows[:, None] * d + np.arange(d)).ravel()
            self.k = k[np.ix_(cols, cols)]
            self.kt = t[:, cols]
        else:
            self.k = np.kron(k[np.ix_(self.rows, self.rows)], np.eye(d))
            self.kt = np.kron(t[:, self.rows], np.eye(d))
        self.f0 = np.asarray(st.f0, np.float64)[self.rows]
        self.y = np.asarray(st.y, np.float64)[self.rows]
        self.yt = np.asarray(_targets(st, y_test), np.float64)
        self.f0t = np.asarray(u.model.offset(_inputs(st, x_test)), np.float64)
        self.loss = u.train_config.loss
        self.lam = u.train_config.lam
        self.alpha_full = self.fit(np.ones(self.n, bool))

    def fit(self, keep: np.ndarray, alpha0: np.ndarray | None = None) -> np.ndarray:
        """α over the records ``keep`` (zeros elsewhere) ``(n, d)``, optimal for their risk."""
        d, m = self.d, int(keep.sum())
        cols = (np.flatnonzero(keep)[:, None] * d + np.arange(d)).ravel()
        kss = self.k[np.ix_(cols, cols)]
        f0, y = self.f0[keep].reshape(-1), self.y[keep].reshape(-1)
        c = self.lam * m
        if self.loss == "mse":
            a = linalg.solve(kss + c * np.eye(len(cols)), y - f0, assume_a="pos")
        else:
            a = np.zeros(len(cols)) if alpha0 is None else alpha0[keep].reshape(-1)

            def risk(a):
                f = (f0 + kss @ a).reshape(m, d)
                return np.sum(loss_value("ce", f, y.reshape(m, d))) / m + 0.5 * self.lam * a @ (
                    kss @ a
                )

            for _ in range(50):
                f = (f0 + kss @ a).reshape(m, d)
                p = _softmax(f)
                r = (p.reshape(-1) - y) + c * a
                if np.linalg.norm(r) <= 1e-11 * (np.linalg.norm(p.reshape(-1) - y) + 1e-300):
                    break
                w = np.einsum("na,ab->nab", p, np.eye(d)) - np.einsum("na,nb->nab", p, p)
                ev, evec = np.linalg.eigh(w)
                s = np.einsum("nab,nb,ncb->nac", evec, np.sqrt(np.clip(ev, 0, None)), evec)

                def sm(
                    v, s=s
                ):  # blockdiag(S) @ v, v (m·d, ...); einsum: one pass, not m BLAS calls
                    return np.einsum("iab,ib...->ia...", s, v.reshape(m, d, *v.shape[1:])).reshape(
                        v.shape
                    )

                sk = sm(kss)
                # S K S = (S K) S: blockdiag(S) on the right, S symmetric
                b = np.einsum("nja,jab->njb", sk.reshape(-1, m, d), s).reshape(sk.shape)
                b[np.diag_indices_from(b)] += c
                # Newton step of (W K + c I) δ = −r through its SPD form (math.md (B))
                z = linalg.solve(b, sk @ -r, assume_a="pos")
                step = (-r - sm(z)) / c
                # Armijo backtracking; the slack of a few ulps of the risk lets the full step through
                # once the decrease is below rounding (near the optimum Newton's step is the answer,
                # and the stationarity test above, not the risk, decides convergence)
                t, r0 = 1.0, risk(a)
                slack = 1e-13 * abs(r0)
                while (
                    t > 1e-8 and risk(a + t * step) > r0 + 1e-4 * t * ((kss @ r / m) @ step) + slack
                ):
                    t *= 0.5
                a = a + t * step
            else:
                raise RuntimeError(
                    "reference Newton did not reach relative stationarity 1e-11 in 50 steps "
                    f"(residual {np.linalg.norm(r) / np.linalg.norm(p.reshape(-1) - y):.1e})"
                )
        out = np.zeros((self.n, d))
        out[keep] = a.reshape(m, d)
        return out

    def test_outputs(self, alpha: np.ndarray) -> np.ndarray:
        return self.f0t + (self.kt @ alpha.reshape(-1)).reshape(-1, self.d)

    def test_loss(self, alpha: np.ndarray) -> np.ndarray:
        return loss_value(self.loss, self.test_outputs(alpha), self.yt)


def _inputs(st, x):
    return validation.inputs(x, st.input_shape, st.x.dtype)


def _targets(st, y):
    return validation.targets(y, len(y), st.task, st.layout.d, st.x.dtype)


def predicted_changes(u: Unlearner, x_test, y_test) -> attribution.LooChanges:
    """Δℓ and Δf for every record at the test points, as ``Unlearner.attribute`` computes them."""
    st = u.state
    xt = _inputs(st, x_test)
    yt = np.asarray(_targets(st, y_test))
    factor = u.loo_factor()
    return attribution.test_changes(
        factor, attribution.cross_kernel(st, u.model, xt), u.predict(x_test), yt
    )


def loo_workloads(args) -> list[tuple[str, Dataset, str, str, dict]]:
    digits = load_digits(seed=0)
    per = args.attr_per_class
    d_small = stratified(digits, per)
    out = [
        ("digits MLP 2×512, squared error", d_small, "mlp", "mse", {}),
        ("digits MLP 2×512, cross-entropy", d_small, "mlp", "ce", {}),
    ]
    mnist_dir = Path(args.mnist_dir)
    if any(mnist_dir.glob("t10k-images-idx3-ubyte*")):
        mnist = load_mnist(mnist_dir, seed=0, train_per_class=per, test_per_class=20)
        out += [
            ("MNIST logistic regression (linear), cross-entropy", mnist, "linear", "ce", {}),
            (
                f"MNIST FCNN 3×{args.mnist_width}, cross-entropy",
                mnist,
                "mlp",
                "ce",
                {"width": args.mnist_width, "depth": 3},
            ),
        ]
    return out


def run_loo(args, log) -> list[dict]:
    rng = np.random.default_rng(args.seed)
    results = []
    for title, ds, kind, loss, extra in loo_workloads(args):
        if getattr(args, "only", None) and args.only not in title:
            continue
        t0 = time.perf_counter()
        u = build(ds, kind, loss, **extra)
        n_t = min(args.attr_tests, len(ds.x_test))
        pick = np.sort(rng.choice(len(ds.x_test), size=n_t, replace=False))
        xt, yt = ds.x_test[pick], ds.y_test[pick]
        pred = predicted_changes(u, xt, yt)
        dense = Dense(u, xt, yt)
        records = np.sort(rng.choice(dense.n, size=min(args.attr_records, dense.n), replace=False))
        base = dense.test_loss(dense.alpha_full)
        actual = np.zeros((n_t, len(records)))
        for j, i in enumerate(records):
            keep = np.ones(dense.n, bool)
            keep[i] = False
            actual[:, j] = dense.test_loss(dense.fit(keep, dense.alpha_full)) - base
        predicted = pred.delta_loss[:, dense.rows[records]]
        res = {
            "title": title,
            "n": dense.n,
            "d": dense.d,
            "form": u.state.form,
            "tests": n_t,
            "records": len(records),
            "pearson": float(stats.pearsonr(predicted.ravel(), actual.ravel())[0]),
            "spearman": float(stats.spearmanr(predicted.ravel(), actual.ravel())[0]),
            "max_abs_error": float(np.max(np.abs(predicted - actual))),
            "max_abs_actual": float(np.max(np.abs(actual))),
            "exact": bool(pred.exact),
            "seconds": time.perf_counter() - t0,
            "scatter": {"predicted": predicted.ravel()[::5], "actual": actual.ravel()[::5]},
        }
        log(
            f"loo {title}: N = {dense.n}, Pearson {res['pearson']:.6f}, Spearman "
            f"{res['spearman']:.6f} ({res['seconds']:.0f} s)"
        )
        results.append(res)
    return results


def run_lds(args, log) -> list[dict]:
    rng = np.random.default_rng(args.seed + 1)
    digits = stratified(load_digits(seed=0), args.attr_per_class)
    results = []
    for loss in ("mse", "ce"):
        t0 = time.perf_counter()
        u = build(digits, "mlp", loss)
        n_t = min(args.attr_tests, len(digits.x_test))
        pick = np.sort(rng.choice(len(digits.x_test), size=n_t, replace=False))
        xt, yt = digits.x_test[pick], digits.y_test[pick]
        dense = Dense(u, xt, yt)
        tau = predicted_changes(u, xt, yt).delta_loss[:, dense.rows]  # (n_t, N)
        actual = np.zeros((args.lds_subsets, n_t))
        predicted = np.zeros((args.lds_subsets, n_t))
        for s in range(args.lds_subsets):
            keep = np.zeros(dense.n, bool)
            keep[rng.choice(dense.n, size=dense.n // 2, replace=False)] = True
            actual[s] = dense.test_loss(dense.fit(keep, dense.alpha_full))
            predicted[s] = -tau[:, keep].sum(axis=1)
        per_test = [stats.spearmanr(predicted[:, t], actual[:, t])[0] for t in range(n_t)]
        res = {
            "title": f"digits MLP 2×512, {'squared error' if loss == 'mse' else 'cross-entropy'}",
            "n": dense.n,
            "tests": n_t,
            "subsets": args.lds_subsets,
            "lds": float(np.mean(per_test)),
            "lds_min": float(np.min(per_test)),
            "seconds": time.perf_counter() - t0,
        }
        log(f"lds {res['title']}: {res['lds']:.4f} ({res['seconds']:.0f} s)")
        results.append(res)
    return results


def _pretrained_cnn(args, mnist: Dataset, log) -> tuple[Dataset, dict]:
    """The mislabel set as images, and a CNN (``bench/mnist_cnn.py``) pretrained on every other
    MNIST image: those of ``args.mnist_dir`` in neither the training set nor the test pool, with
    their own (clean) labels; the flips (drawn afterwards, as for every case) never reach it.
    Served linearised at the pretrained weights with its head trainable (``kind="user"``)."""
    import orbax.checkpoint as ocp

    from . import mnist_cnn

    everything = load_mnist(
        Path(args.mnist_dir), seed=0, train_per_class=args.mislabel_per_class, test_per_class=None
    )  # training set as ``mnist``'s; every other image as its test set
    assert np.array_equal(everything.ids, mnist.ids)
    in_pool = {row.tobytes() for row in mnist.x_test}
    other = np.array([row.tobytes() not in in_pool for row in everything.x_test])
    x_pre = everything.x_test[other].reshape(-1, 28, 28, 1)
    y_pre = everything.y_test[other]
    t0 = time.perf_counter()
    epochs = 1 if getattr(args, "quick", False) else PRETRAIN_EPOCHS
    theta0 = mnist_cnn.pretrain(x_pre, y_pre, epochs=epochs)
    images = dataclasses.replace(
        mnist, x=mnist.x.reshape(-1, 28, 28, 1), x_test=mnist.x_test.reshape(-1, 28, 28, 1)
    )
    acc = mnist_cnn.accuracy(theta0, images.x_test, images.y_test)
    log(
        f"mislabel {PRETRAINED_TITLE}: pretrained on {len(y_pre)} other images ({epochs} epoch{'s' if epochs != 1 else ''}) in "
        f"{time.perf_counter() - t0:.0f} s, test-pool accuracy {acc:.4f}"
    )
    path = Path(args.out).absolute() / "mnist_cnn_pretrained"
    with ocp.StandardCheckpointer() as c:
        c.save(path, theta0, force=True)
        c.wait_until_finished()
    model = ModelConfig(
        kind="user",
        network=f"{Path(mnist_cnn.__file__).resolve()}:net",
        params=str(path),
        trainable="^head/",
    )
    return images, {"model": model}


def _flip(ds: Dataset, fraction: float, seed: int) -> tuple[Dataset, np.ndarray]:
    rng = np.random.default_rng(seed)
    flipped = np.zeros(ds.n, bool)
    flipped[rng.choice(ds.n, size=int(round(fraction * ds.n)), replace=False)] = True
    y = ds.y.copy()
    shift = rng.integers(1, ds.output_dim, size=ds.n)
    y[flipped] = (y[flipped] + shift[flipped]) % ds.output_dim
    return dataclasses.replace(ds, y=y), flipped


def _ranked_scores(noisy: Dataset, si) -> np.ndarray:
    """Self-influence per training row of ``noisy`` (``si`` is sorted by value, keyed by id)."""
    index = {i: p for p, i in enumerate(noisy.ids.tolist())}
    score = np.empty(noisy.n)
    score[[index[i] for i in si.ids]] = si.self_influence
    return score


def _found_top(score: np.ndarray, flipped: np.ndarray, fraction: float = 0.1) -> float:
    top = np.argsort(-score, kind="stable")[: int(round(fraction * len(score)))]
    return float(flipped[top].sum() / flipped.sum())


def run_mislabel(args, log) -> list[dict]:
    """Flip 10 % of the labels, rank by self-influence. λ is never chosen by the flips: the served
    default (``TrainConfig().lam``) and the λ of ``MISLABEL_LAMS`` (``PRETRAINED_LAMS`` for the
    pretrained CNN, whose head is fitted toward the pretrained one) with the lowest mean
    cross-entropy on a clean held-out validation set (the first half of the test pool, labels
    untouched). Self-influence is the default influence step and the refined (exact) one."""
    cases = [("digits MLP 2×512, cross-entropy", load_digits(seed=0), "mlp", {})]
    mnist_dir = Path(args.mnist_dir)
    if any(mnist_dir.glob("t10k-images-idx3-ubyte*")):
        mnist = load_mnist(
            mnist_dir, seed=0, train_per_class=args.mislabel_per_class, test_per_class=40
        )
        cases.append(("MNIST logistic regression (linear), cross-entropy", mnist, "linear", {}))
        cases.append(
            (
                f"MNIST FCNN 3×{args.mnist_width}, cross-entropy",
                mnist,
                "mlp",
                {"width": args.mnist_width, "depth": 3},
            )
        )
        cases.append((PRETRAINED_TITLE, mnist, "user", {}))
    only = getattr(args, "only", None)
    cases = [case for case in cases if not only or only in case[0]]
    served = TrainConfig().lam
    results = []
    for title, ds, kind, extra in cases:
        lams = sorted(set(MISLABEL_LAMS) | {served}, reverse=True)
        if kind == "user":  # pretrained now (only when run): its flips are drawn below as for all
            ds, extra = _pretrained_cnn(args, ds, log)
            lams = sorted(set(PRETRAINED_LAMS) | {served}, reverse=True)
        if ds.name.startswith("digits"):
            ds = stratified(ds, args.mislabel_per_class)
        noisy, flipped = _flip(ds, 0.1, args.seed)
        half = len(noisy.x_test) // 2
        xv, tv = noisy.x_test[:half], noisy.targets(noisy.y_test[:half])
        models, val_loss = {}, {}
        for lam in lams:
            t0 = time.perf_counter()
            models[lam] = build(noisy, kind, "ce", lam=lam, **extra)
            f = models[lam].predict(xv).astype(np.float64)
            val_loss[lam] = float(np.mean(loss_value("ce", f, tv)))
            log(
                f"mislabel {title}: λ = {lam:g}, clean validation loss {val_loss[lam]:.4f} "
                f"({time.perf_counter() - t0:.0f} s)"
            )
            # keep only the served model and the best so far: at N = 2,000 (MNIST FCNN, full
            # form) each holds a 20,000² kernel, and six of them would not fit in memory
            best = min(val_loss, key=val_loss.get)
            models = {k: v for k, v in models.items() if k in (served, best)}
        chosen = min(lams, key=lambda lam: val_loss[lam])
        picks = [(served, "served default")]
        if chosen != served:
            picks.append((chosen, "lowest clean validation loss"))
        else:
            picks = [(served, "served default = lowest clean validation loss")]
        for lam, rule in picks:
            # each model is dropped once ranked: the next one's factor (float64 after a
            # promotion: (N·d)² values several times over) needs the memory
            u = models.pop(lam)
            for exact in (False, True) if getattr(args, "mislabel_exact", False) else (False,):
                t0 = time.perf_counter()
                score = _ranked_scores(noisy, u.self_influence(exact=exact))
                res = {
                    "title": title,
                    "n": noisy.n,
                    "flipped": int(flipped.sum()),
                    "lam": lam,
                    "rule": rule,
                    "val_loss": val_loss[lam],
                    "val_losses": {f"{k:g}": v for k, v in val_loss.items()},
                    "auc": float(_auc(score[flipped], score[~flipped])),
                    "found_top10": _found_top(score, flipped),
                    "exact": bool(exact),
                    "seconds": time.perf_counter() - t0,
                }
                log(
                    f"mislabel {title}: λ = {lam:g} ({rule}), "
                    f"{'exact' if exact else 'influence step'}: AUC {res['auc']:.4f}, found "
                    f"{res['found_top10']:.1%} ({res['seconds']:.0f} s)"
                )
                results.append(res)
            del u
            gc.collect()
    return results


def _auc(pos: np.ndarray, neg: np.ndarray) -> float:
    """P(score of a positive > score of a negative), ties counted half (Mann-Whitney)."""
    ranks = stats.rankdata(np.concatenate([pos, neg]))
    return (ranks[: len(pos)].sum() - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg))


def _mia_auc(model: Unlearner, loss: str, xf, tf, xh, th) -> tuple[float, np.ndarray]:
    """Loss-threshold attack: AUC of −loss, forget set (members) against held-out points; and the
    forget set's losses."""
    lf = loss_value(loss, model.predict(xf).astype(np.float64), tf)
    lh = loss_value(loss, model.predict(xh).astype(np.float64), th)
    return float(_auc(-lf, -lh)), lf


def run_mia(args, log) -> list[dict]:
    rng = np.random.default_rng(args.seed + 2)
    ds = stratified(load_digits(seed=0), args.attr_per_class)
    results = []
    for loss in ("mse", "ce"):
        t0 = time.perf_counter()
        u = build(ds, "mlp", loss)
        forget = np.sort(rng.choice(ds.n, size=ds.n // 10, replace=False))
        held = rng.choice(len(ds.x_test), size=len(forget), replace=False)
        xf, yf = ds.x[forget], ds.y[forget]
        xh, yh = ds.x_test[held], ds.y_test[held]
        tf, th = ds.targets(yf), ds.targets(yh)

        probe = (loss, xf, tf, xh, th)
        original, _ = _mia_auc(u, *probe)
        u.forget([ds.ids[i] for i in forget])
        after, lf_after = _mia_auc(u, *probe)
        keep = np.setdiff1d(np.arange(ds.n), forget)
        retrained, lf_re = _mia_auc(build(ds.subset(keep), "mlp", loss), *probe)
        res = {
            "title": f"digits MLP 2×512, {'squared error' if loss == 'mse' else 'cross-entropy'}",
            "n": ds.n,
            "forget": len(forget),
            "auc_original": original,
            "auc_after_forget": after,
            "auc_retrained": retrained,
            "max_loss_difference": float(np.max(np.abs(lf_after - lf_re))),
            "seconds": time.perf_counter() - t0,
        }
        log(f"mia {res['title']}: {original:.4f} → {after:.4f} (retrained {retrained:.4f})")
        results.append(res)
    return results


def run_cost(args, log) -> dict:
    mnist_dir = Path(args.mnist_dir)
    if not any(mnist_dir.glob("t10k-images-idx3-ubyte*")):
        return {"skipped": f"no MNIST IDX files in {mnist_dir}"}
    per = 20 if args.quick else args.cost_per_class
    ds = load_mnist(mnist_dir, seed=0, train_per_class=per, test_per_class=10)
    t0 = time.perf_counter()
    u = build(ds, "mlp", "ce", width=args.mnist_width, depth=3)
    out = {
        "title": f"MNIST FCNN 3×{args.mnist_width}, cross-entropy, full form",
        "n": u.n_train,
        "d": u.state.layout.d,
        "capacity": u.state.capacity,
        "build_s": time.perf_counter() - t0,
        "rss_after_build_gib": peak_rss_gib(),
        "loadavg_start": list(os.getloadavg()),
    }
    log(f"cost: built N = {u.n_train} in {out['build_s']:.0f} s")
    for label in ("cold", "warm"):
        t = time.perf_counter()
        u.self_influence()
        out[f"self_influence_{label}_s"] = time.perf_counter() - t
        log(f"cost: self-influence {label} {out[f'self_influence_{label}_s']:.1f} s")
    xt, yt = ds.x_test[:100], ds.y_test[:100]
    for label in ("cold", "warm"):
        t = time.perf_counter()
        u.attribute(xt, yt, k=10)
        out[f"topk_{label}_s"] = time.perf_counter() - t
        log(f"cost: top-10 for {len(xt)} test points {label} {out[f'topk_{label}_s']:.1f} s")
    t = time.perf_counter()
    attribution.cross_kernel(u.state, u.model, _inputs(u.state, xt))
    out["cross_kernel_s"] = time.perf_counter() - t
    log(f"cost: of which K(X_t, X) for {len(xt)} test points {out['cross_kernel_s']:.1f} s")
    out["tests"] = len(xt)
    out["factor_s"] = float(u.loo_factor().seconds)
    out["peak_rss_gib"] = peak_rss_gib()
    out["loadavg_end"] = list(os.getloadavg())
    out["kernel_gib"] = u.state.k.nbytes / 2**30
    return out


PARTS = ("loo", "lds", "mislabel", "mia", "cost")


def run(args, log=print) -> dict:
    t0 = time.perf_counter()
    res = {
        "settings": {
            k: v for k, v in vars(args).items() if k.startswith(("attr", "lds", "mis", "cost"))
        }
    }
    res["settings"].update(lam=LAM, seed=args.seed, mnist_width=args.mnist_width)
    for part in args.parts:
        res[part] = globals()[f"run_{part}"](args, log)
        res.setdefault("part_seconds", {})[part] = time.perf_counter() - t0
    res["seconds_total"] = time.perf_counter() - t0
    return res


def scatter(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = res.get("loo", [])
    if not rows:
        return
    fig, axes = plt.subplots(1, len(rows), figsize=(4 * len(rows), 4), squeeze=False)
    for ax, r in zip(axes[0], rows, strict=True):
        p, a = np.asarray(r["scatter"]["predicted"]), np.asarray(r["scatter"]["actual"])
        ax.scatter(a, p, s=3, alpha=0.5)
        lim = [min(a.min(), p.min()), max(a.max(), p.max())]
        ax.plot(lim, lim, "k--", lw=0.8)
        ax.set_title(f"{r['title']}\nPearson {r['pearson']:.4f}", fontsize=8)
        ax.set_xlabel("actual Δloss (retrained)")
        ax.set_ylabel("predicted Δloss")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def markdown(res: dict) -> str:
    s = res["settings"]
    lines = [
        "## Attribution and self-influence (issue 14; bench/attribution.py)",
        "",
    ]
    runs = res.get("part_runs")
    if runs:  # parts measured by separate commands (merged by hand into one JSON)
        lines += ["Runs (protocol in the module docstring of `bench/attribution.py`):", ""]
        for r in runs:
            lines.append(
                f"- {r['parts']}: `{r['command']}` at commit `{r['commit']}` ({r['date']}; load "
                f"average {r['load']} on the 2 cores)"
            )
        lines += [
            "",
            f"λ = {s['lam']:g} (float32 served models) except where a table says otherwise; seed "
            f"{s['seed']}.",
            "",
        ]
    else:
        lines += [
            f"Command: `{res.get('command', '')}` at commit `{res.get('commit', '')}`"
            f" ({res.get('machine', {}).get('date_utc', '')}); λ = {s['lam']:g}, float32 served "
            f"models, except where a table says otherwise; seed {s['seed']}. Wall time {res['seconds_total'] / 60:.1f} min. Protocol in "
            "the module docstring of `bench/attribution.py`; load average "
            + ", ".join(f"{x:.1f}" for x in res.get("machine", {}).get("loadavg_1_5_15") or [])
            + " at its start, on 2 cores. Correlations do not depend on the load; timings do.",
            "",
        ]
    if "loo" in res:
        lines += [
            "### Leave-one-out: predicted against retrained Δloss",
            "",
            f"{s['attr_tests']} test points × {s['attr_records']} random training records per "
            f"workload (issue: 50 × 200), {s['attr_per_class']} training points per class; the actual "
            "change is dense float64 retraining without each record. Goal: ≥ 0.999 squared error, "
            "≥ 0.99 cross-entropy. Anchor: dattri's best method on MNIST logistic regression ≈ 0.88 "
            "(LOO correlation). The squared-error row is exact by construction (closed form); the "
            "cross-entropy rows are the default first-order (influence-step) ranking, and "
            '`"exact": true` refines returned records to retraining (1e-5 in `tests/test_attribution.py`).',
            "",
            "| workload | N | form | predicted by | Pearson | Spearman | max abs error / max abs Δloss |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in res["loo"]:
            lines.append(
                f"| {r['title']} | {r['n']} | {r['form']} | "
                f"{'exact closed form' if r['exact'] else 'influence step (first order)'} | "
                f"{r['pearson']:.6f} | {r['spearman']:.6f} | "
                f"{r['max_abs_error']:.2e} / {r['max_abs_actual']:.2e} |"
            )
        lines += ["", "![LOO scatter](bench/results/attribution-loo.png)", ""]
    if "lds" in res:
        lines += [
            "### Linear datamodeling score (LDS)",
            "",
            f"{s['lds_subsets']} random 50 % subsets, Spearman across subsets per test point, averaged "
            "over test points; the LOO scores used as a linear datamodel (predicted subset loss "
            "−Σ_{i∈S} Δℓ^(−i)), actual = dense float64 training on S. Goal ≥ 0.95.",
            "",
            "| workload | N | test points | LDS (mean) | LDS (worst test point) |",
            "|---|---|---|---|---|",
        ]
        for r in res["lds"]:
            lines.append(
                f"| {r['title']} | {r['n']} | {r['tests']} | {r['lds']:.4f} | {r['lds_min']:.4f} |"
            )
        lines.append("")
    if "mislabel" in res:
        lines += [
            "### Mislabel detection by self-influence",
            "",
            "10 % of the training labels flipped to another class at random; every record ranked by its "
            "self-influence (its own loss after retraining without it minus its loss now). λ is never "
            "chosen by the flips: the served default λ, and the λ of "
            f"{', '.join(f'{v:g}' for v in MISLABEL_LAMS)} (for the pretrained CNN, whose head is "
            f"fitted toward the pretrained one: {', '.join(f'{v:g}' for v in PRETRAINED_LAMS)}) with "
            "the lowest mean cross-entropy on a clean "
            "held-out validation set (half of the test pool, labels untouched). Goal: AUC ≥ 0.99 and "
            "≥ 90 % found in the top 10 %. Anchors: dattri's noisy-label AUC ≈ 0.98 (MNIST logistic "
            "regression); kronfluence ≈ 80 % found by inspecting 10 % (CIFAR-10).",
            "",
            "| workload | N | flipped | λ (rule) | clean validation loss | self-influence | AUC | found in top 10 % |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in res["mislabel"]:
            lam = f"{r['lam']:g} ({r['rule']})" if "lam" in r else f"{s['lam']:g}"
            val = f"{r['val_loss']:.4f}" if "val_loss" in r else "–"
            lines.append(
                f"| {r['title']} | {r['n']} | {r['flipped']} | {lam} | {val} | "
                f"{'exact (refined)' if r['exact'] else 'influence step'} | {r['auc']:.4f} | "
                f"{r['found_top10']:.1%} |"
            )
        lines.append("")
    if "mia" in res:
        lines += [
            "### Forgetting quality: loss-threshold membership inference",
            "",
            "AUC of −loss between the forget set (10 % of the training set) and as many held-out test "
            "points. After an exact deletion the model equals the retrained one, so the last two columns "
            "must match.",
            "",
            "| workload | N | forget | AUC original | AUC after forget | AUC retrained | max loss difference after forget vs retrained |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in res["mia"]:
            lines.append(
                f"| {r['title']} | {r['n']} | {r['forget']} | {r['auc_original']:.4f} | "
                f"{r['auc_after_forget']:.4f} | {r['auc_retrained']:.4f} | {r['max_loss_difference']:.1e} |"
            )
        lines.append("")
    if "cost" in res:
        c = res["cost"]
        lines += ["### Cost on the MNIST FCNN workload", ""]
        if "skipped" in c:
            lines += [f"Skipped: {c['skipped']}", ""]
        else:
            lines += [
                f"{c['title']}, N = {c['n']}, d = {c['d']} (K {c['kernel_gib']:.2f} GiB, capacity "
                f"{c['capacity']}). Goals on this 2-core machine: self-influence for every record < 3 min; "
                "top-k for 100 test points < 30 s warm.",
                "",
                "| what | cold | warm |",
                "|---|---|---|",
                f"| self-influence, every record | {c['self_influence_cold_s']:.1f} s (factorisation "
                f"{c['factor_s']:.1f} s) | {c['self_influence_warm_s']:.2f} s |",
                f"| top-10 for {c['tests']} test points | {c['topk_cold_s']:.1f} s | {c['topk_warm_s']:.1f} s |",
                "",
                f"Peak resident memory of the process: {c['peak_rss_gib']:.1f} GiB "
                f"(after build: {c['rss_after_build_gib']:.1f} GiB). Build (kernel and training) "
                f"{c['build_s']:.0f} s."
                + (
                    " Load average (1, 5, 15 min) on the 2 cores: "
                    + ", ".join(f"{x:.1f}" for x in c["loadavg_start"])
                    + " at the cost part's start, "
                    + ", ".join(f"{x:.1f}" for x in c["loadavg_end"])
                    + " at its end."
                    if "loadavg_start" in c
                    else ""
                ),
                "",
            ]
            if c["n"] < 2000:
                scale = (2000 / c["n"]) ** 3
                lines += [
                    f"**Not the issue's size.** Measured at N = {c['n']} (the issue asks N = 2,000): at the "
                    "load of this run the N = 2,000 factorisation alone would have taken longer than the "
                    "time left for the whole benchmark. The factorisation is O((N·d)³) (Cholesky of "
                    "B = cI + SKS, n³/3 flops, and Z = L⁻¹SK, n³ flops, n = N·d; about 1.1e13 flops at "
                    f"N = 2,000): expect about (2000/{c['n']})³ ≈ {scale:.0f}× the factorisation time above "
                    "on the same machine state, and K, B and Z of 1.6 GB each. Top-k per test point "
                    "costs about 3 n² d flops after it. The 3-minute goal for every record's "
                    "self-influence at N = 2,000 is therefore not shown to be met on this machine.",
                    "",
                ]
    if res.get("notes"):  # the reading of a hand-merged run (bench report keeps it)
        lines += [res["notes"].rstrip(), ""]
    return "\n".join(lines)
