"""Figure 4 of the paper: estimated vs actual change of outputs and loss at test points after
removing half of each class from an infinitely wide network's training set.

Two experiments (paper §4.4):

* ``mnist``: infinite-width FCNN (3 hidden ReLU layers; analytic NTK) on MNIST, softmax
  cross-entropy, λ = 0.1, d = 10.
* ``cifar``: infinite-width CNN (3 conv layers with ReLU; analytic NTK) on CIFAR-10 airplane vs
  automobile, squared error with ±1 targets, λ = 0.1, d = 1.

For each: train α* to the optimum (``dual.newton``, docs/maths.md Dual representation), remove 50 %
of each class (seeded), then

* estimated: one influence step Δα (system (A), ``influence.deletion_step`` without refinement), Δf(X_t) =
  K(X_t, X) Δα (Eq. 8) and Δℓ_t given Δf: second order g_tᵀΔf + ½Δfᵀ W_t Δf (exact for squared
  error; docs/maths.md Eqs. (9-mse), (9-ce)) and the paper's first order g_tᵀΔf (Eq. 9), both reported;
* actual: retrain on the retain set to the optimum from α = 0 (``dual.newton``) and take the
  differences of outputs and of losses at the test points.

Reported per quantity: Pearson r, relative error ‖est − act‖ / ‖act‖ and the least-squares slope of
est on act (with intercept; 1 is perfect). Outputs: a Markdown table, a JSON record (settings,
metrics, timings, peak memory) and one PNG scatter plot per experiment, in ``--out-dir``.

Run: ``python -m bench.figure4 [--only mnist|cifar] [--out-dir bench/results]``.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import resource
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from service_core import influence, losses
from service_core.config import ModelConfig
from service_core.data import load_cifar2, load_mnist, mnist_class_counts
from service_core.dual import DualProblem, kernel_gradient_descent, newton
from service_core.layout import KernelLayout
from service_core.linalg import SolveOptions
from service_core.models import KernelModel

log = logging.getLogger("bench.figure4")

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="ntk-unlearn bench figure4", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--only", choices=["mnist", "cifar"], help="run one experiment (default: both)")
    p.add_argument("--out-dir", type=Path, default=ROOT / "bench" / "results")
    p.add_argument("--mnist-dir", type=Path, default=SHARED / "mnist")
    p.add_argument(
        "--cifar-train", type=Path, default=SHARED / "cifar10" / "airplane_automobile_train.npz"
    )
    p.add_argument(
        "--cifar-test", type=Path, default=SHARED / "cifar10" / "airplane_automobile.npz"
    )
    p.add_argument(
        "--mnist-train-per-class",
        type=int,
        default=1000,
        help="training images per class, capped at what the data allow beside the test images",
    )
    p.add_argument("--mnist-test-per-class", type=int, default=200)
    p.add_argument("--cifar-n-train", type=int, default=1000)
    p.add_argument("--cifar-test-per-class", type=int, default=200)
    p.add_argument(
        "--cnn-pool",
        action="store_true",
        help="AvgPool(2×2) in each CNN block (about 1,000× dearer kernel)",
    )
    p.add_argument("--depth-mlp", type=int, default=3)
    p.add_argument("--depth-cnn", type=int, default=3)
    p.add_argument("--lam", type=float, default=1e-1)
    p.add_argument("--remove-fraction", type=float, default=0.5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", choices=["float32", "float64"], default="float64")
    p.add_argument(
        "--tol",
        type=float,
        default=None,
        help="Newton stationarity tolerance (default 1e-10 / 1e-5)",
    )
    p.add_argument(
        "--no-kgd",
        action="store_true",
        help="skip the kernel-gradient-descent check of the optimum",
    )
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--progress", action="store_true")
    return p.parse_args(argv)


def metrics(est: np.ndarray, act: np.ndarray) -> dict[str, float]:
    """Pearson r, ‖est − act‖/‖act‖ and the least-squares slope of est on act (with intercept)."""
    est, act = np.ravel(est).astype(np.float64), np.ravel(act).astype(np.float64)
    return {
        "pearson": float(np.corrcoef(est, act)[0, 1]),
        "rel_error": float(np.linalg.norm(est - act) / np.linalg.norm(act)),
        "slope": float(np.polyfit(act, est, 1)[0]),
        "n": int(est.size),
    }


def forget_half(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """bool mask: ``round(fraction · n_c)`` points of each class c, chosen with ``seed``."""
    rng = np.random.default_rng(seed)
    mask = np.zeros(len(labels), bool)
    for c in np.unique(labels):
        pool = np.flatnonzero(labels == c)
        mask[rng.choice(pool, size=int(round(fraction * len(pool))), replace=False)] = True
    return mask


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def run(
    name: str,
    km: KernelModel,
    x: np.ndarray,
    y: np.ndarray,
    labels: np.ndarray,
    xt: np.ndarray,
    yt: np.ndarray,
    loss: str,
    args: argparse.Namespace,
) -> dict:
    """One experiment: kernels, training, forget set, estimate, retraining, metrics.

    Arguments:
      x ``(N, ...)``, y targets ``(N, d)``, labels ``(N,)`` (for the per-class forget set);
      xt ``(n_t, ...)``, yt targets ``(n_t, d)``.

    Returns:
      the experiment's record (settings, metrics, timings, the arrays for plotting under ``_arrays``).
    """
    dtype = km.dtype
    tol = args.tol if args.tol is not None else (1e-10 if dtype == np.float64 else 1e-5)
    solver = SolveOptions(
        method="auto",
        tol=1e-12 if dtype == np.float64 else 1e-6,
        max_iter=2000,
        cholesky_max_dim=4096,
    )
    t: dict[str, float] = {}
    n, d = y.shape

    t0 = time.perf_counter()
    k, _ = km.train_kernel(x, progress=args.progress)
    t["kernel_train_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    kt = km.kernel(xt, x, progress=args.progress)
    t["kernel_test_s"] = time.perf_counter() - t0
    log.info(
        "%s: K %s in %.1f s, K(X_t, X) %s in %.1f s",
        name,
        k.shape,
        t["kernel_train_s"],
        kt.shape,
        t["kernel_test_s"],
    )

    kj, ktj = jnp.asarray(k), jnp.asarray(kt)
    yj, ytj = jnp.asarray(y, dtype), jnp.asarray(yt, dtype)
    layout = KernelLayout("trace", d)
    problem = DualProblem(kj, layout, km.offset(x), yj, jnp.ones(n, bool), args.lam, loss)
    t0 = time.perf_counter()
    alpha, info = newton(problem, jnp.zeros_like(yj), tol, 50, solver)
    t["train_s"] = time.perf_counter() - t0
    if not info.converged:
        raise RuntimeError(f"{name}: training stopped at residual {info.residual:.1e}")
    record: dict = {
        "train": {
            "newton_steps": info.steps,
            "cg_iterations": info.cg_iterations,
            "residual": info.residual,
        }
    }

    if not args.no_kgd:
        t0 = time.perf_counter()
        alpha_kgd, kinfo = kernel_gradient_descent(
            problem, jnp.zeros_like(yj), tol=tol, max_steps=100_000
        )
        t["kgd_s"] = time.perf_counter() - t0
        record["kgd"] = {
            "steps": kinfo.steps,
            "residual": kinfo.residual,
            "converged": kinfo.converged,
            "lr": kinfo.lr,
            "top_eigenvalue": kinfo.top_eigenvalue,
            "rel_distance_to_newton": float(
                jnp.linalg.norm(alpha_kgd - alpha) / jnp.linalg.norm(alpha)
            ),
        }

    forget = forget_half(labels, args.remove_fraction, args.seed)
    fmask = jnp.asarray(forget)
    t0 = time.perf_counter()
    step = influence.deletion_step(problem, alpha, fmask, solver, certify=False)
    delta, step_info = step.delta_alpha, step.step
    t["influence_step_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    alpha_r, rinfo = newton(
        problem._replace(mask=jnp.asarray(~forget)), jnp.zeros_like(yj), tol, 50, solver
    )
    t["retrain_s"] = time.perf_counter() - t0
    if not rinfo.converged:
        raise RuntimeError(f"{name}: retraining stopped at residual {rinfo.residual:.1e}")

    f_old = np.asarray(ktj @ alpha)
    df_est = np.asarray(ktj @ delta)  # Eq. 8
    df_act = np.asarray(ktj @ alpha_r) - f_old
    # Δℓ given the estimated Δf: second order (exact for squared error, Eq. (9-mse); Eq. (9-ce)),
    # and the paper's first-order Eq. 9, g_tᵀΔf
    second, first = influence.loss_changes(loss, jnp.asarray(f_old), ytj, jnp.asarray(df_est))
    dl_est, dl_est_first = np.asarray(second), np.asarray(first)
    dl_act = np.asarray(
        losses.value(loss, jnp.asarray(f_old + df_act), ytj)
        - losses.value(loss, jnp.asarray(f_old), ytj)
    )
    if d > 1:
        acc_old = float(np.mean(f_old.argmax(1) == yt.argmax(1)))
        acc_new = float(np.mean((f_old + df_act).argmax(1) == yt.argmax(1)))
    else:
        acc_old = float(np.mean(np.sign(f_old) == yt))
        acc_new = float(np.mean(np.sign(f_old + df_act) == yt))
    record.update(
        {
            "name": name,
            "model": km.config.to_dict(),
            "loss": loss,
            "lam": args.lam,
            "dtype": str(np.dtype(dtype)),
            "n_train": n,
            "n_removed": int(forget.sum()),
            "n_test": len(xt),
            "output_dim": d,
            "kernel_bytes": int(k.nbytes),
            "influence_step": step_info.to_dict(),
            "retrain": {
                "newton_steps": rinfo.steps,
                "cg_iterations": rinfo.cg_iterations,
                "residual": rinfo.residual,
            },
            "test_accuracy": {"before": acc_old, "after_retraining": acc_new},
            "outputs": metrics(df_est, df_act),
            "loss_change": metrics(dl_est, dl_act),
            "loss_change_first_order": metrics(dl_est_first, dl_act),
            "seconds": t,
            "peak_rss_mib": peak_rss_mib(),
            "_arrays": {
                "df_est": df_est,
                "df_act": df_act,
                "dl_est": dl_est,
                "dl_est_first": dl_est_first,
                "dl_act": dl_act,
            },
        }
    )
    log.info("%s: outputs %s, loss %s", name, record["outputs"], record["loss_change"])
    return record


def mnist_experiment(args: argparse.Namespace, dtype) -> dict:
    """Infinite-width FCNN on MNIST with cross-entropy (paper §4.4)."""
    # ../shared/data/mnist holds only the 10,000 test images: training and test points are
    # disjoint draws from them, so a class gives at most (its count − test_per_class) for training.
    counts = mnist_class_counts(args.mnist_dir)
    per_class = min(args.mnist_train_per_class, int(counts.min()) - args.mnist_test_per_class)
    ds = load_mnist(
        args.mnist_dir,
        seed=args.seed,
        train_per_class=per_class,
        test_per_class=args.mnist_test_per_class,
    )
    km = KernelModel(ModelConfig(kind="inf-mlp", depth=args.depth_mlp), ds.input_shape, 10, dtype)
    record = run(
        "mnist-inf-fcnn", km, ds.x, ds.targets(), ds.y, ds.x_test, ds.targets(ds.y_test), "ce", args
    )
    record["train_per_class"] = per_class
    record["train_per_class_asked"] = args.mnist_train_per_class
    return record


def cifar_experiment(args: argparse.Namespace, dtype) -> dict:
    """Infinite-width CNN on CIFAR-10 airplane/automobile with squared error on ±1 targets."""
    ds = load_cifar2(
        args.cifar_train,
        seed=args.seed,
        n_train=args.cifar_n_train,
        test_path=args.cifar_test,
        n_test=2 * args.cifar_test_per_class,
        binary_pm1=True,
    )
    km = KernelModel(
        ModelConfig(kind="inf-cnn", depth=args.depth_cnn, pool=args.cnn_pool),
        ds.input_shape,
        1,
        dtype,
    )
    labels = (ds.y[:, 0] > 0).astype(int)
    return run("cifar2-inf-cnn", km, ds.x, ds.y, labels, ds.x_test, ds.y_test, "mse", args)


def plot(record: dict, path: Path) -> None:
    """Scatter est vs actual for outputs and loss, with the identity line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    arrays = record["_arrays"]
    fig, axes = plt.subplots(1, 2, figsize=(9, 4.2))
    for ax, key, title in (
        (axes[0], ("df_act", "df_est"), "change in outputs"),
        (axes[1], ("dl_act", "dl_est"), "change in loss"),
    ):
        act, est = np.ravel(arrays[key[0]]), np.ravel(arrays[key[1]])
        m = record["outputs" if key[0] == "df_act" else "loss_change"]
        lo, hi = float(min(act.min(), est.min())), float(max(act.max(), est.max()))
        ax.plot([lo, hi], [lo, hi], color="0.5", lw=1, ls="--", zorder=1)
        ax.scatter(act, est, s=4, alpha=0.4, lw=0, zorder=2)
        ax.xaxis.set_major_locator(MaxNLocator(5))
        ax.yaxis.set_major_locator(MaxNLocator(5))
        ax.ticklabel_format(style="sci", scilimits=(-2, 3))
        ax.set_xlabel("actual (retrained)")
        ax.set_ylabel("estimated (one influence step)")
        ax.set_title(
            f"{title}\nr = {m['pearson']:.5f}, rel. err. = {m['rel_error']:.1e}, slope = {m['slope']:.4f}",
            fontsize=9,
        )
    fig.suptitle(
        f"{record['name']}: N = {record['n_train']}, {record['n_removed']} removed, "
        f"{record['n_test']} test points, {record['loss']}, λ = {record['lam']}",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def table(records: list[dict]) -> str:
    """The Markdown report: one row per experiment and quantity, then settings and timings."""
    lines = [
        "| experiment | N train (removed) | test points | quantity | Pearson r | rel. error | slope |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in records:
        for q, label in (
            ("outputs", "Δ outputs"),
            ("loss_change", "Δ loss (second order; exact for mse given Δf)"),
            ("loss_change_first_order", "Δ loss, first order (paper's Eq. 9)"),
        ):
            if q not in r:  # records written before both were reported
                continue
            m = r[q]
            lines.append(
                f"| {r['name']} | {r['n_train']} ({r['n_removed']}) | {r['n_test']} | {label} (n = {m['n']}) "
                f"| {m['pearson']:.6f} | {m['rel_error']:.2e} | {m['slope']:.4f} |"
            )
    lines += [
        "",
        "| experiment | model | loss, λ | kernel K (train / test) | train (Newton) | KGD check | influence step | retrain | peak RSS |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in records:
        s, mdl = r["seconds"], r["model"]
        arch = f"{mdl['kind']} depth {mdl['depth']}" + (
            f", pool={mdl['pool']}" if mdl["kind"] == "inf-cnn" else ""
        )
        kgd = (
            f"{r['kgd']['steps']} steps, {s['kgd_s']:.1f} s, ‖α_KGD − α_Newton‖/‖α‖ = {r['kgd']['rel_distance_to_newton']:.1e}"
            if "kgd" in r
            else "skipped"
        )
        lines.append(
            f"| {r['name']} | {arch} | {r['loss']}, {r['lam']} | {r['kernel_bytes'] / 2**20:.0f} MiB; "
            f"{s['kernel_train_s']:.1f} s / {s['kernel_test_s']:.1f} s | {r['train']['newton_steps']} steps, "
            f"{s['train_s']:.1f} s, residual {r['train']['residual']:.1e} | {kgd} | "
            f"{r['influence_step']['method']} {r['influence_step']['iterations']} it, {s['influence_step_s']:.1f} s | "
            f"{r['retrain']['newton_steps']} steps, {s['retrain_s']:.1f} s | {r['peak_rss_mib']:.0f} MiB |"
        )
    lines += [
        "",
        "Estimated: one influence step in α-space (docs/maths.md system (A)), Δf = K(X_t, X) Δα (Eq. 8), "
        "Δℓ given Δf: second order g_tᵀΔf + ½ΔfᵀW_tΔf (exact for squared error, maths.md (9-mse)) and the "
        "paper's first order g_tᵀΔf (Eq. 9). Actual: retrained to the optimum on the retain set (Newton from α = 0). "
        "Slope: least-squares fit of estimated on actual, with intercept. "
        + "; ".join(
            f"{r['name']}: test accuracy {r['test_accuracy']['before']:.3f} before, "
            f"{r['test_accuracy']['after_retraining']:.3f} after retraining"
            for r in records
        )
        + ".",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if args.dtype == "float64":
        jax.config.update("jax_enable_x64", True)
    dtype = np.float64 if args.dtype == "float64" else np.float32
    args.out_dir.mkdir(parents=True, exist_ok=True)
    records = []
    t0 = time.perf_counter()
    if args.only in (None, "mnist"):
        records.append(mnist_experiment(args, dtype))
    if args.only in (None, "cifar"):
        records.append(cifar_experiment(args, dtype))
    total = time.perf_counter() - t0
    for r in records:
        if not args.no_plots:
            path = args.out_dir / f"figure4_{r['name']}.png"
            plot(r, path)
            r["plot"] = str(path.relative_to(args.out_dir))
    md = table(records)
    (args.out_dir / "figure4.md").write_text(md)
    meta = {
        "argv": sys.argv[1:] if argv is None else list(argv),
        "total_seconds": total,
        "machine": {
            "python": platform.python_version(),
            "jax": jax.__version__,
            "devices": [str(d) for d in jax.devices()],
        },
        "experiments": [{k: v for k, v in r.items() if k != "_arrays"} for r in records],
    }
    (args.out_dir / "figure4.json").write_text(json.dumps(meta, indent=2, default=str))
    print(md)
    print(f"total {total:.1f} s; results in {args.out_dir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
