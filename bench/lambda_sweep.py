"""The paper's §4.3 (Figures 2 and 3): how λ makes a nonlinear network linearisable, and how well
the α- and θ-space influence steps then forget from the *nonlinear* network.

Setting (the paper's, scaled to a 2-core machine; every scale is a flag):

* binary MNIST 3 vs 8 from the MNIST test split (1,010 threes, 974 eights; ``--mnist-dir``):
  ``--per-class`` of each class for training (seeded), every other image of the two classes for
  testing; pixels / 255; targets +1 (three) and −1 (eight); squared error ½(f − y)²;
* scalar-output FCNN, two hidden ReLU layers of ``--width``, NTK parameterisation, θ_0 from
  ``--seed``; float32 as the paper;
* full-batch gradient descent (``optax.sgd``), learning rate 0.1, ``--epochs`` epochs, risk
  (1/N) Σ ℓ + (λ/2)‖θ − θ_0‖² (``service_core.nonlinear``, Eq. (NL) of docs/maths.md).

Figure 3 (``--lams3``): the network and its linearisation trained side by side from θ_0; per epoch
the gradient norms and ‖θ − θ_lin‖/‖θ_lin‖, every ``--record-every`` epochs the test RMSE between
their outputs and both test accuracies.

Figure 2 (``--lams2`` × ``--fractions``, one run each): from the network trained in Figure 3,
remove a stratified random fraction of each class (seeded) by

* ``alpha``: the α-space step, empirical NTK at θ_0, α* from the nonlinear outputs (Cholesky);
* ``theta``: the θ-space step, Hessian of the nonlinear retain risk at θ* (HVPs, CG to a relative
  residual 1e-5, at most ``--cg-max-iter`` iterations);
* ``random``: θ* + ρ, ρ a random direction with ‖ρ‖ = ‖θ_retrain − θ*‖;
* ``original``: θ* itself (no forgetting);
* ``retrain``: gradient descent on the retain set from θ_0, same optimiser and epochs (ground truth).

Reported: the paper's relative distance ‖θ − θ_retrain‖/‖θ_retrain‖, the distance relative to the
true change ‖θ − θ_retrain‖/‖θ_retrain − θ*‖ (1 for ``original``), and retain/forget/test accuracy.
No Newton refinement runs here: a ReLU network's risk is piecewise smooth and gradient descent
stalls at a gradient norm the tables report (``service_core.nonlinear.build_mlp``).

Run: ``ntk-unlearn bench lambda [--quick] [--out bench/results]``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

REPO = Path(__file__).resolve().parent.parent
MARK_BEGIN, MARK_END = "<!-- bench lambda: begin -->", "<!-- bench lambda: end -->"


def _floats(text: str) -> list[float]:
    return [float(t) for t in text.replace(" ", "").split(",") if t]


def _ints(text: str) -> list[int]:
    return [int(t) for t in text.replace(" ", "").split(",") if t]


def parse_args(argv):
    ap = argparse.ArgumentParser(prog="ntk-unlearn bench lambda", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    ap.add_argument("--mnist-dir", type=Path, default=REPO / ".." / "shared" / "data" / "mnist")
    ap.add_argument("--width", type=int, default=256, help="hidden width (paper: 2048)")
    ap.add_argument("--per-class", type=int, default=200, help="training images per class (paper: 5000)")  # fmt: skip
    ap.add_argument("--epochs", type=int, default=1500, help="GD epochs (paper: 4000)")
    ap.add_argument("--lr", type=float, default=0.1)
    ap.add_argument("--record-every", type=int, default=10, help="epochs between test evaluations")
    ap.add_argument("--lams3", type=_floats, default=[1e-1, 1e-2, 1e-3, 1e-4])
    ap.add_argument("--lams2", type=_floats, default=[1e-1, 1e-2, 1e-4], help="paper: 1e-2, 1e-4")
    ap.add_argument("--fractions", type=_ints, default=[10, 30, 50, 70, 90], help="removal %%")
    ap.add_argument("--cg-max-iter", type=int, default=500)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    ap.add_argument("--md", type=Path, default=None,
                    help="Markdown to put the section in (default BENCHMARKS.md for a full run into "
                    "bench/results, else OUT/BENCHMARKS.md)")  # fmt: skip
    ap.add_argument("--quick", action="store_true", help="tiny sizes for a smoke test")
    args = ap.parse_args(argv)
    if args.quick:
        args.width, args.per_class, args.epochs, args.record_every = 16, 15, 40, 10
        args.lams3, args.lams2, args.fractions, args.cg_max_iter = [1e-1, 1e-3], [1e-1, 1e-3], [10, 50], 50  # fmt: skip
    missing = [lam for lam in args.lams2 if lam not in args.lams3]
    if missing:
        ap.error(f"--lams2 {missing} must also be in --lams3 (Figure 2 starts from Figure 3's networks)")  # fmt: skip
    if args.epochs % args.record_every:
        ap.error("--record-every must divide --epochs")
    return args


def load_3_vs_8(directory: Path, per_class: int, seed: int):
    """MNIST test-split images of 3 (+1) and 8 (−1): ``per_class`` of each for training (seeded),
    the rest for testing. Returns ``(x, y, x_test, y_test)``, x ``(n, 784)`` float32 in [0, 1],
    y ``(n, 1)``."""
    from service_core.data import DatasetError, _find, _read_idx

    xs, ls = _find(directory, "t10k-images-idx3-ubyte"), _find(directory, "t10k-labels-idx1-ubyte")
    if xs is None or ls is None:
        raise DatasetError(f"{directory} has no t10k-images-idx3-ubyte(.gz) / t10k-labels-idx1-ubyte(.gz)")  # fmt: skip
    x = _read_idx(xs).reshape(-1, 784).astype(np.float32) / 255.0
    labels = _read_idx(ls)
    rng = np.random.default_rng(seed)
    train, test = [], []
    for c in (3, 8):
        idx = rng.permutation(np.flatnonzero(labels == c))
        if per_class >= len(idx):
            raise DatasetError(f"class {c} has {len(idx)} images; --per-class {per_class} leaves no test images")  # fmt: skip
        train.append(idx[:per_class])
        test.append(idx[per_class:])
    train, test = np.sort(np.concatenate(train)), np.sort(np.concatenate(test))
    sign = np.where(labels == 3, 1.0, -1.0).astype(np.float32)[:, None]
    return x[train], sign[train], x[test], sign[test]


def forget_mask(y: np.ndarray, fraction: int, seed: int) -> np.ndarray:
    """round(fraction % of each class), seeded per fraction."""
    rng = np.random.default_rng([seed, fraction])
    mask = np.zeros(len(y), bool)
    for c in (1.0, -1.0):
        idx = np.flatnonzero(y[:, 0] == c)
        mask[rng.permutation(idx)[: int(round(fraction / 100 * len(idx)))]] = True
    return mask


def run(args, log=print) -> dict:
    from service_core import nonlinear as nl
    from service_core.config import ModelConfig
    from service_core.linalg import SolveOptions

    t_start = time.perf_counter()
    x, y, xt, yt = load_3_vs_8(args.mnist_dir.resolve(), args.per_class, args.seed)
    cfg = ModelConfig(kind="mlp", width=args.width, depth=2, seed=args.seed)
    model = nl.build_mlp(cfg, 784, 1, "relu", jnp.float32)
    log(f"lambda: N = {len(x)} train, {len(xt)} test, P = {model.n_params}, {args.epochs} epochs")

    def acc(theta, xs, ys):
        return float(nl.accuracy(model.f(jnp.asarray(theta), xs), jnp.asarray(ys)))

    fig3, trained = [], {}
    for lam in args.lams3:
        t0 = time.perf_counter()
        theta, theta_lin, tr = nl.train_pair(
            model, x, y, xt, yt, lam, args.epochs, args.lr, record_every=args.record_every
        )
        jax.block_until_ready(theta)
        sec = time.perf_counter() - t0
        trained[lam] = (theta, theta_lin, tr)
        fig3.append({"lam": lam, "seconds": sec, **{k: np.asarray(v).tolist() for k, v in tr._asdict().items()}})  # fmt: skip
        log(f"  figure 3, λ={lam:g}: {sec:.0f} s; ‖θ−θ_lin‖/‖θ_lin‖ {tr.param_distance[-1]:.3g}, "
            f"test RMSE {tr.test_rmse[-1]:.3g}, test acc {tr.test_acc_nl[-1]:.3f}/{tr.test_acc_lin[-1]:.3f}, "
            f"‖∇‖ {tr.grad_nl[-1]:.3g}/{tr.grad_lin[-1]:.3g}")  # fmt: skip

    k = None
    rows = []
    for lam in args.lams2:
        theta, theta_lin, tr = trained[lam]
        if k is None:
            t0 = time.perf_counter()
            k, _ = model.train_kernel(x, "full", progress=False)
            k_seconds = time.perf_counter() - t0
        g_star = float(jnp.linalg.norm(nl.risk_grad(model, theta, x, y, lam)))
        for frac in args.fractions:
            forget = forget_mask(y, frac, args.seed)
            t0 = time.perf_counter()
            theta_r, norms = nl.train(model, x, y, lam, args.epochs, args.lr, mask=~forget)
            jax.block_until_ready(theta_r)
            t_retrain = time.perf_counter() - t0
            g_r = float(jnp.linalg.norm(nl.risk_grad(model, theta_r, x, y, lam, mask=~forget)))
            d_a, info_a = nl.alpha_step(model, theta, x, y, forget, lam, k,
                                        options=SolveOptions(method="alpha-cholesky", tol=1e-5))  # fmt: skip
            d_t, info_t = nl.theta_step(model, theta, x, y, forget, lam, tol=1e-5, max_iter=args.cg_max_iter)  # fmt: skip
            candidates = {
                "alpha": (theta + d_a, info_a),
                "theta": (theta + d_t, info_t),
                "random": (jnp.asarray(nl.random_perturbation(theta, theta_r, args.seed)), None),
                "original": (theta, None),
                "retrain": (theta_r, None),
            }
            change = float(np.linalg.norm(np.asarray(theta_r, np.float64) - np.asarray(theta, np.float64)))  # fmt: skip
            for method, (th, info) in candidates.items():
                dist = float(np.linalg.norm(np.asarray(th, np.float64) - np.asarray(theta_r, np.float64)))  # fmt: skip
                row = {
                    "lam": lam, "fraction": frac, "method": method, "n_forget": int(forget.sum()),
                    "rel_distance": nl.relative_distance(th, theta_r),
                    "rel_to_change": dist / change,
                    "retain_acc": acc(th, x[~forget], y[~forget]),
                    "forget_acc": acc(th, x[forget], y[forget]),
                    "test_acc": acc(th, xt, yt),
                }  # fmt: skip
                if info is not None:
                    row.update(solve=info.method, iterations=info.iterations, residual=info.residual,
                               converged=info.converged, seconds=info.seconds)  # fmt: skip
                if method == "retrain":
                    row.update(seconds=t_retrain, grad_norm=g_r, grad_norm_start=float(norms[0]))
                if method == "original":
                    row.update(grad_norm=g_star, grad_norm_start=float(tr.grad_nl[0]))
                rows.append(row)
            a, t = rows[-5], rows[-4]
            log(f"  figure 2, λ={lam:g}, {frac} %: distance to retraining α {a['rel_distance']:.3g} "
                f"({a['rel_to_change']:.3g} of the change), θ {t['rel_distance']:.3g} ({t['rel_to_change']:.3g}); "
                f"θ-CG {t['iterations']} it, retrain {t_retrain:.0f} s")  # fmt: skip
    return {
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "n_train": len(x), "n_test": len(xt), "n_params": model.n_params,
        "ntk_seconds": k_seconds if k is not None else None,
        "figure3": fig3, "figure2": rows, "claim": claim(rows),
        "seconds_total": time.perf_counter() - t_start,
    }  # fmt: skip


def claim(rows: list[dict]) -> dict:
    """The paper's claim in numbers: for each method and fraction, is the distance to retraining
    smaller at the larger λ? Counts over (method, fraction, consecutive λ pair)."""
    out = {}
    lams = sorted({r["lam"] for r in rows}, reverse=True)
    for method in ("alpha", "theta"):
        for key in ("rel_distance", "rel_to_change"):
            held, total = 0, 0
            for frac in sorted({r["fraction"] for r in rows}):
                vals = [next(r[key] for r in rows if r["lam"] == lam and r["fraction"] == frac and r["method"] == method) for lam in lams]  # fmt: skip
                for big, small in zip(vals, vals[1:], strict=False):
                    total += 1
                    held += big < small
            out[f"{method}/{key}"] = {"held": held, "of": total}
    return out


def _g(v, spec=".3g"):
    return "—" if v is None else format(v, spec)


def markdown(res: dict) -> str:
    s = res["settings"]
    lines = [
        MARK_BEGIN,
        "## Nonlinear networks and λ (the paper's Figures 2 and 3, §4.3; issue 15)",
        "",
        f"**Produced by:** `{res['command']}` at commit `{res['commit']}` ({res['date_utc']}), "
        f"{res['seconds_total'] / 60:.1f} min on {res['cores']} shared cores. Protocol: `bench/lambda_sweep.py`.",
        "",
        f"**Scaled setting** (paper → here): FCNN 2 hidden ReLU layers, width 2048 → {s['width']} "
        f"(P = {res['n_params']:,}); binary MNIST 3 vs 8, 5,000 per class → {s['per_class']} per class "
        f"from the MNIST test split (N = {res['n_train']}; test: the other {res['n_test']} threes and eights); "
        f"4,000 → {s['epochs']} epochs of full-batch GD, learning rate {s['lr']}, squared error, ±1 targets, "
        f"NTK parameterisation, float32; Figure 2 for λ ∈ {{{', '.join(f'{lam:g}' for lam in s['lams2'])}}} "
        f"(paper: 1e-2, 1e-4), one run per setting (paper: 5), fractions "
        f"{', '.join(str(f) for f in s['fractions'])} %.",
        "",
        "### Figure 3: the network beside its linearisation",
        "",
        "| λ | ‖θ−θ_lin‖/‖θ_lin‖ end (max) | test RMSE f vs f_lin end (max) | test acc f / f_lin | ‖∇L‖ f start → end | ‖∇L‖ f_lin end | seconds |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in res["figure3"]:
        lines.append(
            f"| {r['lam']:g} | {r['param_distance'][-1]:.3g} ({max(r['param_distance']):.3g}) | "
            f"{r['test_rmse'][-1]:.3g} ({max(r['test_rmse']):.3g}) | {r['test_acc_nl'][-1]:.3f} / {r['test_acc_lin'][-1]:.3f} | "
            f"{r['grad_nl'][0]:.3g} → {r['grad_nl'][-1]:.3g} | {r['grad_lin'][-1]:.3g} | {r['seconds']:.0f} |"
        )
    lines += ["", "![Figure 3](bench/results/lambda-figure3.png)", "",
              "### Figure 2: forgetting from the nonlinear network", "",
              "Distance = ‖θ − θ_retrain‖/‖θ_retrain‖ (the paper's); of change = ‖θ − θ_retrain‖/‖θ_retrain − θ*‖ "
              "(1 for the original model, about √2 for the random baseline). Retraining: GD from θ_0 on the retain set, "
              "same epochs; its final ‖∇L_R‖ is in the last column (the original model's ‖∇L‖ on its row).", "",
              "| λ | removed | method | distance | of change | retain acc | forget acc | test acc | solve | ‖∇L‖ |",
              "|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in res["figure2"]:
        solve = ""
        if r.get("solve"):
            solve = f"{r['solve']} {r['iterations']} it, {r['seconds']:.1f} s" + ("" if r["converged"] else f", residual {r['residual']:.2g} (missed)")  # fmt: skip
        elif r["method"] == "retrain":
            solve = f"{r['seconds']:.0f} s"
        lines.append(
            f"| {r['lam']:g} | {r['fraction']} % ({r['n_forget']}) | {r['method']} | {r['rel_distance']:.3g} | "
            f"{r['rel_to_change']:.3g} | {r['retain_acc']:.3f} | {r['forget_acc']:.3f} | {r['test_acc']:.3f} | {solve} | "
            f"{_g(r.get('grad_norm'))} |"
        )
    lines += ["", "![Figure 2](bench/results/lambda-figure2.png)", "",
              "**The paper's claim, checked** (distance to retraining falls as λ grows, for both methods): "
              "over every fraction and each pair of consecutive λ,", ""]  # fmt: skip
    for key, v in res["claim"].items():
        lines.append(f"- {key}: smaller at the larger λ in {v['held']} of {v['of']}")
    lines += ["", MARK_END, ""]
    return "\n".join(lines)


def plot(res: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig3 = res["figure3"]
    fig, axes = plt.subplots(2, 3, figsize=(14, 7.5))
    ax = axes.ravel()
    for i, r in enumerate(fig3):
        c = f"C{i}"
        lab = f"λ={r['lam']:g}"
        ep = np.arange(len(r["grad_nl"]))
        ax[0].plot(ep, r["param_distance"], c, label=lab)
        ax[1].plot(r["record_epochs"], r["test_rmse"], c, label=lab)
        ax[2].plot(r["record_epochs"], r["test_acc_nl"], c, label=f"{lab} f")
        ax[2].plot(r["record_epochs"], r["test_acc_lin"], c, ls="--", label=f"{lab} f_lin")
        ax[3].semilogy(ep, r["grad_nl"], c, label=lab)
        ax[4].semilogy(ep, r["grad_lin"], c, label=lab)
    titles = ["‖θ − θ_lin‖ / ‖θ_lin‖", "test RMSE, f vs f_lin", "test accuracy (f solid, f_lin dashed)",
              "‖∇L‖ of f", "‖∇L‖ of f_lin"]  # fmt: skip
    for a, t in zip(ax, titles, strict=False):
        a.set_title(t)
        a.set_xlabel("epoch")
        a.legend(fontsize=7)
    ax[5].axis("off")
    fig.suptitle(
        f"Figure 3 (scaled): FCNN width {res['settings']['width']}, N = {res['n_train']}, MNIST 3 vs 8"
    )
    fig.tight_layout()
    fig.savefig(out / "lambda-figure3.png", dpi=90)
    plt.close(fig)

    rows = res["figure2"]
    fig, axes = plt.subplots(1, 4, figsize=(17, 4))
    lams = sorted({r["lam"] for r in rows}, reverse=True)
    styles = {"alpha": "-o", "theta": "-s", "random": ":x", "original": ":."}
    keys = [("rel_distance", "‖θ − θ_retrain‖ / ‖θ_retrain‖", True),
            ("rel_to_change", "‖θ − θ_retrain‖ / ‖θ_retrain − θ*‖", True),
            ("forget_acc", "forget-set accuracy", False), ("test_acc", "test accuracy", False)]  # fmt: skip
    for a, (key, title, log_y) in zip(axes, keys, strict=True):
        for i, lam in enumerate(lams):
            methods = list(styles) + (["retrain"] if not log_y else [])
            for method in methods:
                pts = [(r["fraction"], r[key]) for r in rows if r["lam"] == lam and r["method"] == method]  # fmt: skip
                if pts:
                    fx, fy = zip(*pts, strict=True)
                    a.plot(fx, fy, styles.get(method, "--"), color=f"C{i}", label=f"λ={lam:g} {method}", ms=4)  # fmt: skip
        if log_y:
            a.set_yscale("log")
        a.set_title(title, fontsize=9)
        a.set_xlabel("removed (%)")
    axes[0].legend(fontsize=6)
    axes[2].legend(fontsize=6)
    fig.suptitle("Figure 2 (scaled): forgetting from the nonlinear FCNN")
    fig.tight_layout()
    fig.savefig(out / "lambda-figure2.png", dpi=90)
    plt.close(fig)


def put_section(md_path: Path, section: str) -> None:
    """Replace this bench's section of ``md_path`` (between its markers), or append it."""
    text = md_path.read_text() if md_path.exists() else "# Benchmarks\n"
    if MARK_BEGIN in text and MARK_END in text:
        head, rest = text.split(MARK_BEGIN, 1)
        tail = rest.split(MARK_END, 1)[1].lstrip("\n")
        text = head + section + tail
    else:
        text = text.rstrip("\n") + "\n\n" + section
    md_path.write_text(text)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    from .machine import machine_info

    machine = machine_info()
    args.out = args.out.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    res = run(args)
    res["command"] = "ntk-unlearn bench lambda " + " ".join(argv)
    res["commit"] = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
                                   capture_output=True, text=True).stdout.strip()  # fmt: skip
    res["date_utc"], res["cores"] = machine["date_utc"], machine["usable_cores"]
    res["machine"] = machine
    (args.out / "lambda.json").write_text(json.dumps(res, indent=1, default=float))
    plot(res, args.out)
    md = markdown(res)
    (args.out / "lambda.md").write_text(md)
    default = args.out == (REPO / "bench" / "results").resolve() and not args.quick
    put_section(args.md or (REPO / "BENCHMARKS.md" if default else args.out / "BENCHMARKS.md"), md)
    print(md)
    print(f"bench lambda: {res['seconds_total']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
