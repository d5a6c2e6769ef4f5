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
3. test accuracy of (a) the built-in ``mlp`` linearised at its random initialisation on the user
   part, (b) this CNN linearised at the pretrained weights, all leaves and head only, (c) ordinary
   nonlinear fine-tuning from the pretrained weights with the same λ toward θ0, (d) the pretrained
   network with its head alone refit (nonlinear code, optax), and the pretrained network alone;
4. forget 1 % and 10 % of the user part from (b): time, distance to exact retraining of the
   linearised model (Newton from α = 0 on the retain set's kernel), and the time to redo (c)
   without those records.
"""

from __future__ import annotations

import argparse
import json
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


def apply_fn(params, x):
    """CNN: Conv(16, 3×3, stride 2) → ReLU → Conv(32, 3×3, stride 2) → ReLU → Dense(10) (the head).
    ``x`` ``(n, 28, 28, 1)`` → logits ``(n, 10)``."""
    h = jax.nn.relu(_conv(x, params["conv1"]["w"], params["conv1"]["b"], 2))
    h = jax.nn.relu(_conv(h, params["conv2"]["w"], params["conv2"]["b"], 2))
    h = h.reshape(h.shape[0], -1)
    return h @ params["head"]["w"] + params["head"]["b"]


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


def fine_tune(theta0, x, y, lam: float, head_only: bool = False, steps: int = 150):
    """Ordinary (nonlinear) fine-tuning: min (1/N) Σ ce(f(x_i; θ), y_i) + (λ/2)‖θ − θ0‖² over every
    leaf, or over the head alone (the rest stay θ0), full batch, optax L-BFGS from θ0, until the
    gradient norm is below 1e-4 or ``steps``."""
    import optax

    onehot = jax.nn.one_hot(y, 10)
    start = theta0["head"] if head_only else theta0

    def full(p):
        return {**theta0, "head": p} if head_only else p

    def objective(p):
        diff = jax.tree_util.tree_map(lambda a, b: jnp.sum((a - b) ** 2), p, start)
        return _ce(full(p), x, onehot) + 0.5 * lam * sum(jax.tree_util.tree_leaves(diff))

    opt = optax.lbfgs()
    value_and_grad = optax.value_and_grad_from_state(objective)

    @jax.jit
    def step(p, state):
        value, g = value_and_grad(p, state=state)
        updates, state = opt.update(g, state, p, value=value, grad=g, value_fn=objective)
        return optax.apply_updates(p, updates), state, optax.tree_utils.tree_norm(g)

    p, state = start, opt.init(start)
    for _ in range(steps):
        p, state, gnorm = step(p, state)
        if float(gnorm) < 1e-4:
            break
    return full(p)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "examples" / "out")
    parser.add_argument(
        "--parts", default="a,b-head,b-all,c,d", help="which of a, b-head, b-all, c, d to run"
    )
    parser.add_argument(
        "--dtype",
        default="float64",
        help="of the linearised models (float32 stagnates at λ = 1e-3)",
    )
    args = parser.parse_args(argv)
    import orbax.checkpoint as ocp

    from service_core import ModelConfig, SolverConfig, TrainConfig, Unlearner, load_mnist
    from service_core.data import Dataset
    from service_core.dual import DualProblem, newton
    from service_core.lifecycle import solve_options

    out = args.out.absolute()
    out.mkdir(parents=True, exist_ok=True)
    parts = set(args.parts.split(","))
    saved = out / "results.json"
    results: dict = json.loads(saved.read_text()) if saved.exists() else {}
    ds = load_mnist(MNIST, seed=0, train_per_class=700, test_per_class=None)
    perm = np.random.default_rng(0).permutation(ds.n)
    core, user = perm[:5000], perm[5000:7000]
    img = ds.x.reshape(-1, 28, 28, 1)
    x_test, y_test = ds.x_test.reshape(-1, 28, 28, 1), ds.y_test
    print(f"core {len(core)}, user {len(user)}, test {len(y_test)}")

    t0 = time.perf_counter()
    theta0 = pretrain(jnp.asarray(img[core]), ds.y[core])  # seeded: the same weights every run
    results["pretrain_s"] = time.perf_counter() - t0
    results["pretrained"] = _accuracy(theta0, x_test, y_test)
    print(f"pretrained in {results['pretrain_s']:.1f} s: test accuracy {results['pretrained']:.4f}")
    ckpt = out / "pretrained_cnn"
    with ocp.StandardCheckpointer() as c:
        c.save(ckpt, theta0, force=True)
        c.wait_until_finished()
    user_ids = ds.ids[user]
    np.savez(
        out / "mnist_user.npz",
        x=img[user],
        y=ds.y[user],
        ids=user_ids,
        x_test=x_test,
        y_test=y_test,
    )
    user_ds = Dataset(
        "mnist-user", user_ids, img[user], ds.y[user], "classification", 10, x_test, y_test
    )

    def test_acc(u):
        return float(np.mean(u.predict(x_test).argmax(1) == y_test))

    train = TrainConfig(loss="ce", lam=LAM, dtype=args.dtype)
    results["dtype"] = args.dtype
    solver = SolverConfig(spare_kernel=False)
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
        results["a_mlp"] = {
            "accuracy": float(np.mean(u.predict(ds.x_test).argmax(1) == y_test)),
            "build_s": time.perf_counter() - t0,
        }
        print("(a) mlp", results["a_mlp"])
        del u
    # (b) linearised at the pretrained weights: head only, then all leaves
    network = f"{Path(__file__).resolve()}:net"
    forget_sets = {"1%": user_ids[:20].tolist(), "10%": user_ids[:200].tolist()}
    for label, trainable in (("head", "^head/"), ("all", None)):
        if f"b-{label}" not in parts:
            continue
        t0 = time.perf_counter()
        cfg = ModelConfig(kind="user", network=network, params=str(ckpt), trainable=trainable)
        u = Unlearner.build(user_ds, cfg, train, solver, progress=False)
        entry = {
            "accuracy": test_acc(u),
            "build_s": time.perf_counter() - t0,
            "form": u.state.form,
            "n_params": u.model.n_params,
            "ntk": u.state.meta["ntk"]["implementation"],
            "ntk_s": u.state.meta["ntk"]["seconds"],
        }
        base_state = u.state
        for name, ids in forget_sets.items():
            u._state = base_state
            t1 = time.perf_counter()
            new, res = u.plan_forget(ids)
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
            out_f = np.asarray(
                u.model.outputs_at(new.theta, jnp.asarray(x_test[:500], new.x.dtype))
            )
            out_r = np.asarray(
                u.model.outputs_at(theta_retrain, jnp.asarray(x_test[:500], new.x.dtype))
            )
            entry[f"forget_{name}"] = {
                "seconds": seconds,
                "method": res.solve.method,
                "reason": res.reason,
                "theta_rel_dist": dist,
                "outputs_rel_dist": float(np.linalg.norm(out_f - out_r) / np.linalg.norm(out_r)),
                "retrain_newton_s": info.seconds,
            }
        results[f"b_{label}"] = entry
        print(f"(b) {label}", json.dumps(entry))
        del u, base_state
        saved.write_text(json.dumps(results, indent=1))
    # (c) ordinary nonlinear fine-tuning, same λ toward θ0; (d) head refit alone (nonlinear code)
    xu, yu = jnp.asarray(img[user]), ds.y[user]
    if "c" in parts:
        t0 = time.perf_counter()
        ft = fine_tune(theta0, xu, yu, LAM)
        c = {"accuracy": _accuracy(ft, x_test, y_test), "seconds": time.perf_counter() - t0}
        for name, ids in forget_sets.items():
            keep = ~np.isin(user_ids, ids)
            t0 = time.perf_counter()
            fine_tune(theta0, xu[keep], yu[keep], LAM)
            c[f"redo_{name}_s"] = time.perf_counter() - t0
        results = {**(json.loads(saved.read_text()) if saved.exists() else {}), "c_nonlinear": c}
        print("(c)", c)
        saved.write_text(json.dumps(results, indent=1))
    if "d" in parts:
        t0 = time.perf_counter()
        head = fine_tune(theta0, xu, yu, LAM, head_only=True)
        d = {"accuracy": _accuracy(head, x_test, y_test), "seconds": time.perf_counter() - t0}
        results = {**(json.loads(saved.read_text()) if saved.exists() else {}), "d_head_refit": d}
        print("(d)", d)
        saved.write_text(json.dumps(results, indent=1))
    return results


def table(results: dict) -> str:
    """The BENCHMARKS.md table from ``results.json``."""

    def pct(entry):
        return "—" if entry is None else f"{100 * entry['accuracy']:.1f} %"

    rows = [
        "| model (test: 3,000 MNIST images) | test accuracy | time |",
        "|---|---|---|",
        f"| pretrained CNN alone (5,000 core images, Adam, 8 epochs) | {100 * results['pretrained']:.1f} % | {results['pretrain_s']:.0f} s |",
    ]
    a = results.get("a_mlp")
    if a:
        rows.append(
            f"| (a) built-in `mlp` (2 × 512) linearised at random init, user part | {pct(a)} | {a['build_s']:.0f} s build |"
        )
    for label, what in (("head", "head only (trace-form K)"), ("all", "all leaves (full-form K)")):
        b = results.get(f"b_{label}")
        if b:
            rows.append(
                f"| (b) this CNN linearised at the pretrained weights, {what}, P = {b['n_params']:,} | {pct(b)} | {b['build_s']:.0f} s build (NTK {b['ntk_s']:.0f} s, {b['ntk']}) |"
            )
    c = results.get("c_nonlinear")
    if c:
        rows.append(
            f"| (c) nonlinear fine-tuning from the pretrained weights, same λ toward θ0 (L-BFGS) | {pct(c)} | {c['seconds']:.0f} s |"
        )
    d = results.get("d_head_refit")
    if d:
        rows.append(
            f"| (d) pretrained network, head alone refit (nonlinear code, L-BFGS) | {pct(d)} | {d['seconds']:.0f} s |"
        )
    rows += [
        "",
        "| forget | model | time | ‖θ − θ_retrain‖ / ‖θ_retrain − θ0‖ | outputs, relative | nonlinear fine-tuning redone |",
        "|---|---|---|---|---|---|",
    ]
    for name in ("1%", "10%"):
        for label in ("head", "all"):
            b = results.get(f"b_{label}")
            if not b or f"forget_{name}" not in b:
                continue
            f = b[f"forget_{name}"]
            redo = c.get(f"redo_{name}_s") if c else None
            rows.append(
                f"| {name} ({20 if name == '1%' else 200} records) | (b) {label} | {f['seconds']:.1f} s ({f['method']}) | {f['theta_rel_dist']:.1e} | {f['outputs_rel_dist']:.1e} | {'—' if redo is None else f'{redo:.0f} s'} |"
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
