"""Worked example: a small CNN pretrained on a "core" part of MNIST, fine-tuned (linearised at the
pretrained weights) on a disjoint "user" part whose records may be deleted, tested on the rest.

    .venv/bin/python examples/mnist_pretrained.py [--out examples/out]

MNIST here is ``../shared/data/mnist`` (the 10,000 t10k images): per class 700 for training, split
by a seeded permutation into core (5,000) and user (2,000) parts, and the remaining 3,000 for
testing. Steps, each timed, with the results printed as the table in BENCHMARKS.md:

1. pretrain the CNN on the core part (optax Adam, cross-entropy), save it with orbax;
2. write the user part as ``mnist_user.npz`` (``x`` (2000, 28, 28, 1), ``y``, ``ids``, test set),
   so that the service can serve it:
   ``ntk-unlearn serve --model examples/mnist_pretrained.py:net --params OUT/pretrained_cnn
   --dataset npz:OUT/mnist_user.npz --trainable '^head/'``;
3. on the user part (``--user``, 2,000) and on its first ``--small-user`` images (500, where (b)
   with every leaf trainable, a full-form K of (10·N)², fits in minutes on 2 cores), test accuracy
   of (a) the built-in ``mlp`` linearised at its random initialisation, (b) this CNN linearised at
   the pretrained weights (float64), head only and all leaves, (c) ordinary nonlinear fine-tuning of
   every leaf from the pretrained weights with the same λ toward θ0 (full-batch optax L-BFGS,
   float32, until ‖∇‖ < 1e-4 or 300 iterations: the final gradient norm is reported), (d) the
   pretrained network with its head alone refit by nonlinear code (L-BFGS on the frozen features,
   float64, ‖∇‖ < 1e-9), compared with (b) head only: the same convex problem solved another way;
4. forget 1 % and 10 % of the user part from (b): time, distance to exact retraining of the
   linearised model (Newton from α = 0 on the retain set's kernel), and the time to redo (c)
   without those records.

Defaults: ``--parts a,b-head,c,d`` on 2,000 user images, ``--small-parts b-all,b-head,c,d`` on
500. Load averages and the peak resident memory are recorded with each part.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
MNIST = ROOT.parent / "shared" / "data" / "mnist"
LAM = 1e-3


def _conv(x, w, b, stride):
    y = jax.lax.conv_general_dilated(
        x, w, (stride, stride), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
    return y + b


def features(params, x):
    """The frozen feature extractor: the two conv layers, flattened. ``x`` ``(n, 28, 28, 1)`` →
    ``(n, 1568)``."""
    h = jax.nn.relu(_conv(x, params["conv1"]["w"], params["conv1"]["b"], 2))
    h = jax.nn.relu(_conv(h, params["conv2"]["w"], params["conv2"]["b"], 2))
    return h.reshape(h.shape[0], -1)


def apply_fn(params, x):
    """CNN: Conv(16, 3×3, stride 2) → ReLU → Conv(32, 3×3, stride 2) → ReLU → Dense(10) (the head).
    ``x`` ``(n, 28, 28, 1)`` → logits ``(n, 10)``."""
    return features(params, x) @ params["head"]["w"] + params["head"]["b"]


def init(seed: int = 0):
    k = jax.random.split(jax.random.PRNGKey(seed), 3)
    return {
        "conv1": {"w": jax.random.normal(k[0], (3, 3, 1, 16)) / 3.0, "b": jnp.zeros(16)},
        "conv2": {"w": jax.random.normal(k[1], (3, 3, 16, 32)) / 12.0, "b": jnp.zeros(32)},
        "head": {"w": jax.random.normal(k[2], (7 * 7 * 32, 10)) / 40.0, "b": jnp.zeros(10)},
    }


def net():
    """What ``--model examples/mnist_pretrained.py:net`` calls (θ0 from ``--params``)."""
    return apply_fn, init()


def _ce(params, x, y):
    return -jnp.mean(jnp.sum(y * jax.nn.log_softmax(apply_fn(params, x)), axis=1))


def _accuracy(params, x, y) -> float:
    return float(np.mean(np.asarray(jnp.argmax(apply_fn(params, x), 1)) == y))


def pretrain(x, y, epochs: int = 8, batch: int = 128, seed: int = 0):
    import optax

    params = init(seed)
    opt = optax.adam(2e-3)
    state = opt.init(params)
    onehot = jax.nn.one_hot(y, 10)

    @jax.jit
    def step(params, state, xb, yb):
        loss, g = jax.value_and_grad(_ce)(params, xb, yb)
        updates, state = opt.update(g, state)
        return optax.apply_updates(params, updates), state, loss

    rng = np.random.default_rng(seed)
    for _ in range(epochs):
        order = rng.permutation(len(x))
        for i in range(0, len(x) - batch + 1, batch):
            idx = order[i : i + batch]
            params, state, _ = step(params, state, x[idx], onehot[idx])
    return params


def _lbfgs(objective, start, gtol: float, max_iter: int):
    """Full-batch optax L-BFGS (backtracking Armijo line search: the zoom search's curvature test
    stalls in float32 here) from ``start`` until ‖∇‖ < ``gtol`` or ``max_iter`` iterations.
    Returns ``(params, info)``, info: iterations, final gradient norm and objective, seconds."""
    import optax
    import optax.tree_utils as otu

    t0 = time.perf_counter()
    opt = optax.lbfgs(
        linesearch=optax.scale_by_backtracking_linesearch(
            max_backtracking_steps=30, store_grad=True
        )
    )
    value_and_grad = optax.value_and_grad_from_state(objective)

    @jax.jit
    def step(p, state):
        value, g = value_and_grad(p, state=state)
        updates, state = opt.update(g, state, p, value=value, grad=g, value_fn=objective)
        p = optax.apply_updates(p, updates)
        return p, state, otu.tree_norm(otu.tree_get(state, "grad"))

    p, state = start, opt.init(start)
    gnorm = float(otu.tree_norm(jax.grad(objective)(p)))
    it = 0
    while gnorm >= gtol and it < max_iter:
        p, state, g = step(p, state)
        gnorm, it = float(g), it + 1
    info = {
        "iterations": it,
        "grad_norm": gnorm,
        "gtol": gtol,
        "objective": float(objective(p)),
        "seconds": time.perf_counter() - t0,
    }
    return p, info


def fine_tune(theta0, x, y, lam: float, gtol: float = 1e-4, max_iter: int = 300):
    """Ordinary (nonlinear) fine-tuning of every leaf: min (1/N) Σ ce(f(x_i; θ), y_i) +
    (λ/2)‖θ − θ0‖², full batch, L-BFGS from θ0 (``_lbfgs``), in x's dtype. ``x`` ``(N, 28, 28, 1)``,
    ``y`` ``(N,)`` labels. Returns ``(θ, info)``."""
    onehot = jax.nn.one_hot(y, 10, dtype=x.dtype)
    theta0 = jax.tree_util.tree_map(lambda a: jnp.asarray(a, x.dtype), theta0)

    def objective(p):
        diff = jax.tree_util.tree_map(lambda a, b: jnp.sum((a - b) ** 2), p, theta0)
        return _ce(p, x, onehot) + 0.5 * lam * sum(jax.tree_util.tree_leaves(diff))

    if x.dtype == jnp.float32:  # optax's line search promotes float32 to float64 under x64
        from jax.experimental import disable_x64

        with disable_x64():
            return _lbfgs(objective, theta0, gtol, max_iter)
    return _lbfgs(objective, theta0, gtol, max_iter)


def refit_head(theta0, x, y, lam: float, gtol: float = 1e-9, max_iter: int = 2000):
    """The pretrained network with its head alone refit, by nonlinear code: the features of the
    frozen conv layers computed once, then min (1/N) Σ ce(φ(x_i) W + b, y_i) + (λ/2)‖(W, b) −
    (W0, b0)‖² by L-BFGS (a convex problem: multinomial logistic regression toward the pretrained
    head), in x's dtype. Returns ``(θ with the new head, info)``."""
    theta0 = jax.tree_util.tree_map(lambda a: jnp.asarray(a, x.dtype), theta0)
    phi = jax.jit(features)(theta0, x)
    onehot = jax.nn.one_hot(y, 10, dtype=x.dtype)
    head0 = theta0["head"]

    def objective(h):
        logits = phi @ h["w"] + h["b"]
        ce = -jnp.mean(jnp.sum(onehot * jax.nn.log_softmax(logits), axis=1))
        diff = jax.tree_util.tree_map(lambda a, b: jnp.sum((a - b) ** 2), h, head0)
        return ce + 0.5 * lam * sum(jax.tree_util.tree_leaves(diff))

    head, info = _lbfgs(objective, head0, gtol, max_iter)
    return {**theta0, "head": head}, info


def _load() -> str:
    return "/".join(f"{v:.1f}" for v in os.getloadavg())


def _peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def run_user_part(n_user: int, parts: set, ctx: dict) -> dict:
    """Every requested part of step 3–4 on the first ``n_user`` images of the user part (the same
    test set): (a), (b) head / all, (c) with its redos, (d) and its agreement with (b) head."""
    from service_core import ModelConfig, SolverConfig, TrainConfig, Unlearner
    from service_core.data import Dataset
    from service_core.dual import DualProblem, newton
    from service_core.lifecycle import solve_options

    ds, user, img, theta0 = ctx["ds"], ctx["user"][:n_user], ctx["img"], ctx["theta0"]
    x_test, y_test, dtype = ctx["x_test"], ctx["y_test"], ctx["dtype"]
    res: dict = ctx["into"]
    res["n_user"] = n_user
    user_ids = ds.ids[user]
    user_ds = Dataset(
        f"mnist-user-{n_user}",
        user_ids,
        img[user],
        ds.y[user],
        "classification",
        10,
        x_test,
        y_test,
    )
    train = TrainConfig(loss="ce", lam=LAM, dtype=dtype)
    solver = SolverConfig(spare_kernel=False)
    forget_sets = {
        "1%": user_ids[: n_user // 100].tolist(),
        "10%": user_ids[: n_user // 10].tolist(),
    }

    def test_acc(u):
        return float(np.mean(u.predict(x_test).argmax(1) == y_test))

    def done(key, entry):
        entry.update(load_average=_load(), peak_rss_gib=_peak_rss_gib())
        res[key] = entry
        print(f"[{n_user}] {key}", json.dumps(entry), flush=True)
        ctx["save"]()

    # (a) today's mlp linearised at random initialisation on the user part
    if "a" in parts:
        t0 = time.perf_counter()
        flat = Dataset(
            "mnist-user-flat",
            user_ids,
            ds.x[user],
            ds.y[user],
            "classification",
            10,
            ds.x_test,
            y_test,
        )
        u = Unlearner.build(flat, ModelConfig(kind="mlp"), train, solver, progress=False)
        acc = float(np.mean(u.predict(ds.x_test).argmax(1) == y_test))
        done("a_mlp", {"accuracy": acc, "build_s": time.perf_counter() - t0})
        del u
    # (b) linearised at the pretrained weights: head only, then all leaves
    network = f"{Path(__file__).resolve()}:net"
    for label, trainable in (("head", "^head/"), ("all", None)):
        if f"b-{label}" not in parts:
            continue
        t0 = time.perf_counter()
        cfg = ModelConfig(
            kind="user", network=network, params=str(ctx["ckpt"]), trainable=trainable
        )
        u = Unlearner.build(user_ds, cfg, train, solver, progress=False)
        outputs = u.predict(x_test)
        entry = {
            "accuracy": float(np.mean(outputs.argmax(1) == y_test)),
            "build_s": time.perf_counter() - t0,
            "form": u.state.form,
            "n_params": u.model.n_params,
            "ntk": u.state.meta["ntk"]["implementation"],
            "ntk_s": u.state.meta["ntk"]["seconds"],
        }
        if label == "head":  # for (d)'s comparison
            ctx["b_head"] = (u.params()["head"], outputs)
        base_state = u.state
        for name, ids in forget_sets.items():
            u._state = base_state
            t1 = time.perf_counter()
            new, fres = u.plan_forget(ids)
            seconds = time.perf_counter() - t1
            # exact retraining of the linearised model: Newton from α = 0 on the retain set's K
            keep = np.asarray(new.active)
            problem = DualProblem(new.k, new.layout, new.f0, new.y, jnp.asarray(keep), LAM, "ce")
            opts = solve_options(new.solver_config, new.train_config.dtype)
            alpha, info = newton(
                problem, jnp.zeros_like(new.alpha), new.train_config.resolved_tol(), 50, opts
            )
            theta_retrain = u.model.theta(new.x, alpha)
            dist = float(
                jnp.linalg.norm(new.theta - theta_retrain)
                / jnp.linalg.norm(theta_retrain - u.model.theta0)
            )
            xt = jnp.asarray(x_test[:500], new.x.dtype)
            out_f = np.asarray(u.model.outputs_at(new.theta, xt))
            out_r = np.asarray(u.model.outputs_at(theta_retrain, xt))
            entry[f"forget_{name}"] = {
                "records": len(ids),
                "seconds": seconds,
                "method": fres.solve.method,
                "reason": fres.reason,
                "theta_rel_dist": dist,
                "outputs_rel_dist": float(np.linalg.norm(out_f - out_r) / np.linalg.norm(out_r)),
                "retrain_newton_s": info.seconds,
            }
        del u, base_state
        done(f"b_{label}", entry)
    xu, yu = jnp.asarray(img[user], jnp.float32), ds.y[user]
    # (d) the pretrained network, head alone refit by nonlinear code (in the linearised models' dtype)
    if "d" in parts:
        xd = jnp.asarray(img[user], jnp.float64 if dtype == "float64" else jnp.float32)
        refit, info = refit_head(theta0, xd, yu, LAM)
        out_d = np.asarray(apply_fn(refit, jnp.asarray(x_test, xd.dtype)))
        d = {"accuracy": float(np.mean(out_d.argmax(1) == y_test)), "dtype": str(xd.dtype), **info}
        if "b_head" in ctx:  # agreement with (b) head only: the same problem solved another way
            head_b, out_b = ctx["b_head"]
            hb = np.concatenate([np.ravel(head_b["w"]), np.ravel(head_b["b"])])
            hd = np.concatenate([np.ravel(refit["head"]["w"]), np.ravel(refit["head"]["b"])])
            h0 = np.concatenate([np.ravel(theta0["head"]["w"]), np.ravel(theta0["head"]["b"])])
            d["vs_b_head"] = {
                "head_rel_dist": float(np.linalg.norm(hd - hb) / np.linalg.norm(hb - h0)),
                "test_outputs_rel_dist": float(
                    np.linalg.norm(out_d - out_b) / np.linalg.norm(out_b)
                ),
                "same_predictions": float(np.mean(out_d.argmax(1) == out_b.argmax(1))),
            }
        done("d_head_refit", d)
    # (c) ordinary nonlinear fine-tuning of every leaf, same λ toward θ0, and its redos without
    # the forgotten records. float32: the CNN's float64 convolutions are 7× slower on this CPU.
    if "c" in parts:
        ft, info = fine_tune(theta0, xu, yu, LAM)
        c = {"accuracy": _accuracy(ft, x_test, y_test), "dtype": "float32", **info}
        done("c_nonlinear", c)  # saved after each fit: the redos take as long again
        for name, ids in forget_sets.items():
            keep = ~np.isin(user_ids, ids)
            _, rinfo = fine_tune(theta0, xu[keep], yu[keep], LAM)
            c[f"redo_{name}"] = rinfo
            done("c_nonlinear", c)
    ctx.pop("b_head", None)
    return res


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0].replace("\n", " ")
        + " The whole run takes well over an hour on 2 cores (peak 7.8 GiB); "
        "--parts b-head --user 200 --small-user 0 takes about a minute."
    )
    parser.add_argument("--out", type=Path, default=ROOT / "examples" / "out")
    parser.add_argument("--user", type=int, default=2000, help="images of the user part (≤ 2000)")
    parser.add_argument(
        "--parts", default="a,b-head,c,d", help="which of a, b-head, b-all, c, d to run on them"
    )
    parser.add_argument(
        "--small-user",
        type=int,
        default=500,
        help="a smaller user part (its first images) on which (b) all leaves fits in minutes; 0: none",
    )
    parser.add_argument("--small-parts", default="b-all,b-head,c,d", help="the parts run on it")
    parser.add_argument(
        "--dtype",
        default="float64",
        help="of the linearised models (float32 stagnates at λ = 1e-3)",
    )
    args = parser.parse_args(argv)
    import orbax.checkpoint as ocp

    from service_core import load_mnist

    out = args.out.absolute()
    out.mkdir(parents=True, exist_ok=True)
    saved = out / "results.json"
    results: dict = json.loads(saved.read_text()) if saved.exists() else {}
    results.setdefault("user_parts", {})
    ds = load_mnist(MNIST, seed=0, train_per_class=700, test_per_class=None)
    perm = np.random.default_rng(0).permutation(ds.n)
    core, user = perm[:5000], perm[5000:7000]
    img = ds.x.reshape(-1, 28, 28, 1)
    x_test, y_test = ds.x_test.reshape(-1, 28, 28, 1), ds.y_test
    print(f"core {len(core)}, user {len(user)}, test {len(y_test)}; load average {_load()}")

    t0 = time.perf_counter()
    theta0 = pretrain(jnp.asarray(img[core]), ds.y[core])  # seeded: the same weights every run
    results["pretrain_s"] = time.perf_counter() - t0
    results["pretrained"] = _accuracy(theta0, x_test, y_test)
    results["dtype"] = args.dtype
    print(f"pretrained in {results['pretrain_s']:.1f} s: test accuracy {results['pretrained']:.4f}")
    ckpt = out / "pretrained_cnn"
    with ocp.StandardCheckpointer() as c:
        c.save(ckpt, theta0, force=True)
        c.wait_until_finished()
    np.savez(
        out / "mnist_user.npz",
        x=img[user],
        y=ds.y[user],
        ids=ds.ids[user],
        x_test=x_test,
        y_test=y_test,
    )

    def save():
        saved.write_text(json.dumps(results, indent=1))

    ctx = dict(
        ds=ds,
        user=user,
        img=img,
        theta0=theta0,
        out=out,
        ckpt=ckpt,
        x_test=x_test,
        y_test=y_test,
        dtype=args.dtype,
        save=save,
    )
    for n_user, parts in ((args.small_user, args.small_parts), (args.user, args.parts)):
        if n_user <= 0 or not parts:
            continue
        entry = results["user_parts"].setdefault(str(n_user), {})
        ctx_parts = set(parts.split(","))
        run_user_part(n_user, ctx_parts, {**ctx, "into": entry})
        save()
    return results


def table(results: dict) -> str:
    """The BENCHMARKS.md tables from ``results.json``."""

    def pct(entry):
        return f"{100 * entry['accuracy']:.1f} %"

    def fit(e):
        return f"{e['seconds']:.0f} s, {e['iterations']} L-BFGS iterations, final ‖∇‖ {e['grad_norm']:.1e}"

    rows = [
        "| model (test: 3,000 MNIST images) | user images | test accuracy | time |",
        "|---|---|---|---|",
        f"| pretrained CNN alone (5,000 core images, Adam, 8 epochs) | 0 | {100 * results['pretrained']:.1f} % | {results['pretrain_s']:.0f} s |",
    ]
    parts = sorted(results.get("user_parts", {}).values(), key=lambda e: -e["n_user"])
    for r in parts:
        n = f"{r['n_user']:,}"
        if "a_mlp" in r:
            a = r["a_mlp"]
            rows.append(
                f"| (a) built-in `mlp` (2 × 512) linearised at its random initialisation, {results['dtype']} | {n} | {pct(a)} | {a['build_s']:.0f} s build |"
            )
        for label, what in (("head", "head only"), ("all", "all leaves")):
            if f"b_{label}" in r:
                b = r[f"b_{label}"]
                rows.append(
                    f"| (b) this CNN linearised at the pretrained weights, {what} (P = {b['n_params']:,}, {b['form']}-form K), {results['dtype']} | {n} | {pct(b)} | {b['build_s']:.0f} s build (NTK {b['ntk_s']:.0f} s, {b['ntk']}) |"
                )
        if "c_nonlinear" in r:
            c = r["c_nonlinear"]
            rows.append(
                f"| (c) ordinary nonlinear fine-tuning of every leaf from the pretrained weights, same λ toward θ0, {c['dtype']} | {n} | {pct(c)} | {fit(c)} |"
            )
        if "d_head_refit" in r:
            d = r["d_head_refit"]
            rows.append(
                f"| (d) pretrained network, head alone refit (nonlinear code on the frozen features), {d['dtype']} | {n} | {pct(d)} | {fit(d)} |"
            )
    rows += [
        "",
        "| forget | user images | model | time (method) | ‖θ − θ_retrain‖ / ‖θ_retrain − θ0‖ | outputs, relative | nonlinear fine-tuning (c) redone without them |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in parts:
        c = r.get("c_nonlinear", {})
        for name in ("1%", "10%"):
            for label in ("head", "all"):
                f = r.get(f"b_{label}", {}).get(f"forget_{name}")
                if not f:
                    continue
                redo = c.get(f"redo_{name}")
                rows.append(
                    f"| {name} ({f['records']} records) | {r['n_user']:,} | (b) {label} | {f['seconds']:.1f} s ({f['method']}) | {f['theta_rel_dist']:.1e} | {f['outputs_rel_dist']:.1e} | {'—' if redo is None else fit(redo)} |"
                )
    agree = [
        (r["n_user"], r["d_head_refit"]["vs_b_head"])
        for r in parts
        if "vs_b_head" in r.get("d_head_refit", {})
    ]
    if agree:
        rows.append("")
        for n, v in agree:
            rows.append(
                f"(d) against (b) head only, {n:,} user images: heads {v['head_rel_dist']:.1e} apart relative to their change from θ0, test outputs {v['test_outputs_rel_dist']:.1e} relative, {100 * v['same_predictions']:.2f} % of test predictions equal."
            )
    return "\n".join(rows)


if __name__ == "__main__":
    import sys

    if sys.argv[1:2] == ["--table"]:
        path = (
            Path(sys.argv[2]) if len(sys.argv) > 2 else ROOT / "examples" / "out" / "results.json"
        )
        print(table(json.loads(path.read_text())))
    else:
        main()
