"""The user's own network (``--model FILE.py:NAME``), over HTTP with a real Redis, against an
oracle computed here independently: Jacobian features of the network written in this file
(``jax.jacfwd`` per point, numpy float64) and the closed-form ridge toward θ0 (squared error), or
numpy Newton in θ (cross-entropy), on the retain set (docs/maths.md, Eq. (R), θ_p = θ0)."""

from __future__ import annotations

import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from fastapi.testclient import TestClient

from app.main import create_app
from service_core import ModelConfig, SolverConfig, TrainConfig, Unlearner, load_dataset
from service_core.lifecycle import CheckpointMismatchError
from service_core.user_network import ModelLoadError, named_leaves, save_params

HEADERS = {"Authorization": "Bearer write-token"}

# Two tanh layers, 4 → 6 → 3, written as plain JAX: the network under test.
NETWORK = """
import jax
import jax.numpy as jnp

def net():
    k1, k2 = jax.random.split(jax.random.PRNGKey(7))
    params = {
        "hidden": {"w": jax.random.normal(k1, (4, 6)) * 0.6, "b": jnp.full((6,), 0.1)},
        "head": {"w": jax.random.normal(k2, (6, 3)) * 0.5, "b": jnp.zeros(3)},
    }
    return apply_fn, params

def apply_fn(p, x):
    h = jnp.tanh(x @ p["hidden"]["w"] + p["hidden"]["b"])
    return jnp.tanh(h) @ p["head"]["w"] + p["head"]["b"]
"""

# The same kind of network in Flax linen, Equinox and neural-tangents stax: each returned as its
# users write it, with no glue.
FLAX_NETWORK = """
import jax
import jax.numpy as jnp
import flax.linen as nn

class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = jnp.tanh(nn.Dense(6, name="hidden")(x))
        return nn.Dense(3, name="head")(jnp.tanh(h))

def net():
    module = Net()
    return module, module.init(jax.random.PRNGKey(7), jnp.zeros((1, 4)))
"""
EQUINOX_NETWORK = """
import jax
import jax.numpy as jnp
import equinox as eqx

def net():
    return eqx.nn.MLP(4, 3, 6, 1, activation=jnp.tanh, key=jax.random.PRNGKey(7))
"""
STAX_NETWORK = """
import jax
from neural_tangents import stax

def net():
    init_fn, apply_fn, _ = stax.serial(stax.Dense(6), stax.Erf(), stax.Dense(3))
    _, params = init_fn(jax.random.PRNGKey(7), (-1, 4))
    return apply_fn, params
"""


def _network(tmp_path: Path, source: str = NETWORK, name: str = "mynet.py") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(source))
    return path


def _reference(path: Path):
    """The network's (apply_fn, params) on a batch, imported here on its own (Flax: module.apply;
    Equinox: eqx.partition / eqx.combine, vmapped over the batch)."""
    scope: dict = {}
    exec(compile(path.read_text(), str(path), "exec"), scope)
    out = scope["net"]()
    if isinstance(out, tuple):
        first, params = out
        return getattr(first, "apply", first), params
    import equinox as eqx

    params, static = eqx.partition(out, eqx.is_array)
    return (lambda p, x: jax.vmap(eqx.combine(p, static))(x)), params


def _perturbed(params, scale=0.05):
    """Other weights of the same shapes (the 'pretrained' θ0 a --params file brings)."""
    leaves, treedef = jax.tree_util.tree_flatten(params)
    rng = np.random.default_rng(3)
    return jax.tree_util.tree_unflatten(
        treedef, [np.asarray(a) + scale * rng.normal(size=np.shape(a)) for a in leaves]
    )


def _oracle(apply_fn, params, trainable, x, y_onehot, x_test, lam, loss, dtype):
    """Test outputs of the linearised model at θ0 retrained on (x, y): float64, numpy.

    θ0 is ``params`` cast to ``dtype`` (as the service casts them), then float64. Features
    J_i = ∂f(x_i; θ0)/∂θ over the trainable leaves by ``jax.jacfwd``; squared error: the ridge
    (JᵀJ/N + λI)Δ = Jᵀ(y − f0)/N; cross-entropy: Newton in θ to a 1e-13 gradient.
    """
    names = list(named_leaves(params))
    leaves, treedef = jax.tree_util.tree_flatten(params)
    leaves = [np.asarray(np.asarray(a, dtype), np.float64) for a in leaves]
    mask = [trainable in n for n in names] if trainable else [True] * len(names)
    shapes = [a.shape for a, m in zip(leaves, mask, strict=True) if m]
    sizes = [int(np.prod(s)) for s in shapes]
    theta0 = np.concatenate([a.ravel() for a, m in zip(leaves, mask, strict=True) if m])

    def f(theta, xi):
        parts, k, it = [], 0, iter(sizes)
        for a, m in zip(leaves, mask, strict=True):
            if m:
                n = next(it)
                parts.append(theta[k : k + n].reshape(a.shape))
                k += n
            else:
                parts.append(jnp.asarray(a))
        return apply_fn(jax.tree_util.tree_unflatten(treedef, parts), xi[None])[0]

    with jax.experimental.enable_x64():
        t0 = jnp.asarray(theta0)

        jac_fn, f_fn = jax.jit(jax.jacfwd(f)), jax.jit(f)

        def feats(xs):
            xs = jnp.asarray(np.asarray(np.asarray(xs, dtype), np.float64))
            jac = np.stack([np.asarray(jac_fn(t0, xi)) for xi in xs])  # (n, d, P), point by point
            f0 = np.stack([np.asarray(f_fn(t0, xi)) for xi in xs])
            return f0, jac

        f0, jac = feats(x)
        f0t, jact = feats(x_test)
    n, d, p = jac.shape
    jm = jac.reshape(n * d, p)
    if loss == "mse":
        delta = np.linalg.solve(jm.T @ jm / n + lam * np.eye(p), jm.T @ (y_onehot - f0).ravel() / n)
    else:
        delta = np.zeros(p)
        for _ in range(100):
            logits = f0 + (jac @ delta)
            prob = np.exp(logits - logits.max(1, keepdims=True))
            prob /= prob.sum(1, keepdims=True)
            grad = np.einsum("nap,na->p", jac, prob - y_onehot) / n + lam * delta
            w = np.einsum("na,ab->nab", prob, np.eye(d)) - np.einsum("na,nb->nab", prob, prob)
            hess = np.einsum("nap,nab,nbq->pq", jac, w, jac) / n + lam * np.eye(p)
            step = np.linalg.solve(hess, grad)
            delta -= step
            if np.linalg.norm(grad) < 1e-13:
                break
    return f0t + jact @ delta


def _rel(a, b) -> float:
    return float(np.linalg.norm(np.asarray(a) - np.asarray(b)) / np.linalg.norm(np.asarray(b)))


CASES = [
    pytest.param(NETWORK, "mse", "float64", None, "npz", 1e-8, id="jax-mse-float64-all-npz"),
    pytest.param(NETWORK, "mse", "float32", "head", "orbax", 1e-4, id="jax-mse-float32-head-orbax"),
    pytest.param(NETWORK, "ce", "float64", None, None, 1e-6, id="jax-ce-float64-all"),
    pytest.param(FLAX_NETWORK, "mse", "float64", "head", None, 1e-8, id="flax-mse-float64-head"),
]


@pytest.mark.parametrize(("source", "loss", "dtype", "trainable", "params_kind", "tol"), CASES)
def test_forget_equals_retraining_over_http(
    tmp_path, make_settings, wait_for_job, source, loss, dtype, trainable, params_kind, tol
):
    path = _network(tmp_path, source)
    apply_fn, params = _reference(path)
    extra = {}
    if params_kind is not None:
        params = _perturbed(params)
        if params_kind == "npz":
            extra["params"] = save_params(tmp_path / "pretrained.npz", params)
        else:
            extra["params"] = tmp_path / "pretrained-orbax"
            with ocp.StandardCheckpointer() as ckptr:
                ckptr.save(extra["params"].absolute(), params)
                ckptr.wait_until_finished()
    if trainable is not None:
        extra["trainable"] = trainable
    lam = 1e-2
    settings = make_settings(
        model=f"{path}:net", loss=loss, dtype=dtype, lam=lam, nystrom_rank=0, **extra
    )
    data = load_dataset(settings.dataset)
    rng = np.random.default_rng(1)
    x_test = data.x[:5] + 0.1 * rng.normal(size=data.x[:5].shape)
    with TestClient(create_app(settings)) as client:
        info = client.get("/v1/model", headers=HEADERS).json()
        assert info["ntk"]["implementation"] in (
            "structured_derivatives",
            "jacobian_contraction",
            "ntk_vector_products",
        )
        # a linear head fine-tuned alone has K = k ⊗ I_d: the trace form, exact
        assert info["kernel"]["form"] == ("trace" if trainable else "full")
        assert info["kernel"]["exact"]
        user = info["user_network"]
        assert user["framework"] == ("flax" if "flax" in source else "jax")
        expected_trainable = [n for n in named_leaves(params) if not trainable or trainable in n]
        assert user["trainable_leaves"] == expected_trainable
        gone = client.get("/v1/ids?limit=7", headers=HEADERS).json()["ids"]
        job = client.post("/v1/forget", json={"ids": gone}, headers=HEADERS).json()
        done = wait_for_job(client, job["job_id"])
        assert done["status"] == "succeeded", done
        out = client.post("/v1/predict", json={"x": x_test.tolist()}, headers=HEADERS).json()
        assert out["model_version"] == 1
        u = client.app.state.service.unlearner
        after = named_leaves(u.params())
    keep = np.array([i not in set(gone) for i in data.ids])
    y = np.eye(3)[data.y[keep]]
    want = _oracle(apply_fn, params, trainable, data.x[keep], y, x_test, lam, loss, dtype)
    rel = _rel(out["outputs"], want)
    print(f"relative distance to the oracle: {rel:.2e} (tolerance {tol:g})")
    assert rel < tol
    # the frozen leaves are θ0's bit for bit; the trainable ones moved
    for name, leaf in named_leaves(params).items():
        theta0 = np.asarray(leaf, dtype)
        if trainable and trainable not in name:
            assert np.asarray(after[name]).tobytes() == theta0.tobytes(), name
        else:
            assert not np.array_equal(np.asarray(after[name]), theta0), name


@pytest.mark.parametrize(
    ("source", "trainable"),
    [(EQUINOX_NETWORK, "layers/1"), (STAX_NETWORK, None)],
    ids=["equinox-last-layer", "stax-all"],
)
def test_equinox_and_stax_networks_forget_exactly(tmp_path, dataset_file, source, trainable):
    """Library use (no HTTP): an Equinox module and a stax network as their users return them;
    squared-error forgetting equals the oracle's retraining (float64)."""
    path = _network(tmp_path, source)
    apply_fn, params = _reference(path)
    u = _build(path, dataset_file, trainable=trainable)
    gone = u.active_ids()[:6]
    u.forget(gone)
    data = load_dataset(f"npz:{dataset_file}")
    keep = np.array([i not in set(gone) for i in data.ids])
    x_test = data.x[:5] + 0.3
    want = _oracle(
        apply_fn,
        params,
        trainable,
        data.x[keep],
        np.eye(3)[data.y[keep]],
        x_test,
        1e-2,
        "mse",
        "float64",
    )
    assert _rel(u.predict(x_test), want) < 1e-8
    assert u.model.user.framework == ("equinox" if trainable else "jax")


def _build(path, dataset_file, **cfg):
    train = TrainConfig(loss="mse", lam=1e-2, dtype="float64")
    model = ModelConfig(kind="user", network=f"{path}:net", **cfg)
    return Unlearner.build(
        load_dataset(f"npz:{dataset_file}"), model, train, SolverConfig(), progress=False
    )


def test_params_round_trip_npz_and_keystr_names(tmp_path, dataset_file):
    path = _network(tmp_path)
    _, params = _reference(path)
    theta0 = _perturbed(params, 0.2)
    # keystr spelling of the keys is read as well as the '/'-joined one
    keyed = {
        jax.tree_util.keystr(p): np.asarray(v)
        for p, v in jax.tree_util.tree_flatten_with_path(theta0)[0]
    }
    np.savez(tmp_path / "keystr.npz", **keyed)
    for file in (save_params(tmp_path / "slash.npz", theta0), tmp_path / "keystr.npz"):
        u = _build(path, dataset_file, params=str(file))
        assert u.version == 0
        # version 0's frozen-free θ is trained, but the linearisation point is the file's θ0
        got = named_leaves(u.model.params_of(u.model.theta0))
        for name, leaf in named_leaves(theta0).items():
            assert np.asarray(got[name]).tobytes() == np.asarray(leaf, np.float64).tobytes()


def test_bad_networks_say_what_to_fix(tmp_path, dataset_file):
    with pytest.raises(ModelLoadError, match="no such file"):
        _build(tmp_path / "absent.py", dataset_file)
    path = _network(tmp_path)
    with pytest.raises(ModelLoadError, match="defines no 'other'"):
        train = TrainConfig(loss="mse", dtype="float64")
        Unlearner.build(
            load_dataset(f"npz:{dataset_file}"),
            ModelConfig(kind="user", network=f"{path}:other"),
            train,
            progress=False,
        )
    wide = _network(
        tmp_path, NETWORK.replace("(6, 3)", "(6, 5)").replace("zeros(3)", "zeros(5)"), "wide.py"
    )
    with pytest.raises(ModelLoadError, match=r"shape \(4, 5\).*must return \(4, 3\)"):
        _build(wide, dataset_file)
    nan = _network(
        tmp_path, NETWORK.replace("jnp.full((6,), 0.1)", "jnp.full((6,), jnp.nan)"), "nan.py"
    )
    with pytest.raises(ModelLoadError, match="NaN"):
        _build(nan, dataset_file)
    _, params = _reference(path)
    bad = dict(named_leaves(params))
    bad["head/w"] = np.zeros((6, 4))
    del bad["hidden/b"]
    bad["extra"] = np.zeros(2)
    np.savez(tmp_path / "bad.npz", **{k: np.asarray(v) for k, v in bad.items()})
    with pytest.raises(ModelLoadError) as err:
        _build(path, dataset_file, params=str(tmp_path / "bad.npz"))
    msg = str(err.value)
    assert (
        "missing hidden/b (6)" in msg
        and "extra (2)" in msg
        and "head/w (6, 4) (network (6, 3))" in msg
    )
    # the same mismatch from an orbax checkpoint
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save((tmp_path / "bad-orbax").absolute(), {k: np.asarray(v) for k, v in bad.items()})
        ckptr.wait_until_finished()
    with pytest.raises(ModelLoadError, match=r"missing hidden/b \(6\)"):
        _build(path, dataset_file, params=str(tmp_path / "bad-orbax"))
    with pytest.raises(ModelLoadError, match="matches no floating-point leaf.*head/w"):
        _build(path, dataset_file, trainable="^nothing$")
    # a file of another format (a receipt's JSON given by mistake): no advice to unpickle it
    (tmp_path / "receipt.json").write_text('{"receipt": {}}')
    with pytest.raises(ModelLoadError, match=r"it is no \.npz of arrays") as err:
        _build(path, dataset_file, params=str(tmp_path / "receipt.json"))
    assert "pickle" not in str(err.value)


def test_checkpoint_of_other_settings_is_refused(tmp_path, dataset_file):
    from service_core.lifecycle import Identity

    path = _network(tmp_path)
    u = _build(path, dataset_file, trainable="head")
    u.save(tmp_path / "ck")
    same = Identity.of(u.state.model_config, u.train_config, f"npz:{dataset_file}")
    assert Unlearner.restore(tmp_path / "ck", expect=same) is not None
    other = Identity.of(
        ModelConfig(kind="user", network=f"{path}:net", trainable="hidden"),
        TrainConfig(loss="ce", lam=1e-2, dtype="float64"),
        "digits",
    )
    with pytest.raises(CheckpointMismatchError) as err:
        Unlearner.restore(tmp_path / "ck", expect=other)
    msg = str(err.value)
    for what in (
        "trainable 'head' (checkpoint) ≠ 'hidden' (now)",
        "loss 'mse'",
        "dataset",
        "--data-dir",
    ):
        assert what in msg, msg
    # the network's weights changed under the same settings: the params fingerprint differs
    path.write_text(NETWORK.replace("PRNGKey(7)", "PRNGKey(8)"))
    with pytest.raises(CheckpointMismatchError, match="params fingerprint"):
        Unlearner.restore(tmp_path / "ck", expect=same)


def test_a_promoted_user_network_restarts_and_is_linearised_at_the_float32_params(
    tmp_path, dataset_file
):
    """``dtype auto`` promoted to float64 at build: its checkpoint carried the fingerprint of the
    params cast to float64, the restart compared it with the float32 network's, and every restart
    was refused ("the weights … changed"; a new user's own network with every leaf trainable).
    The fingerprint is now the float32 θ_0's, the promoted network is linearised at that float32
    θ_0 (a float64 params file is rounded as the network its K came from), and it restarts."""
    from service_core import precision
    from service_core.lifecycle import Identity
    from service_core.models import make_network

    path = _network(tmp_path)
    _, params = _reference(path)
    wide = {
        k: {n: np.asarray(v, np.float64) * 1.0000001 for n, v in d.items()}
        for k, d in params.items()
    }
    params_file = save_params(tmp_path / "wide.npz", wide)  # float64 values no float32 holds
    with np.load(params_file) as f:
        assert all(f[k].dtype == np.float64 for k in f.files)
    model = ModelConfig(kind="user", network=f"{path}:net", params=str(params_file))
    train = TrainConfig(loss="mse", lam=1e-6)  # singular K (51 parameters): float32 cannot certify
    u = Unlearner.build(
        load_dataset(f"npz:{dataset_file}"), model, train, SolverConfig(), progress=False
    )
    assert u.state.dtype == "float64" and u.state.meta["precision"]["promoted"]
    low = make_network(model, (4,), 3, jnp.float32)
    high = precision.promoted_network(model, (4,), 3)
    assert high.user.digest == low.user.digest == u.model.user.digest
    assert np.array_equal(np.asarray(high.theta0), np.asarray(low.theta0, np.float64))
    u.save(tmp_path / "ck")
    same = Identity.of(model, train, f"npz:{dataset_file}")
    again = Unlearner.restore(tmp_path / "ck", expect=same, progress=False)
    assert again is not None and again.state.dtype == "float64"
    x = np.asarray(load_dataset(f"npz:{dataset_file}").x[:5])
    np.testing.assert_array_equal(np.asarray(again.predict(x)), np.asarray(u.predict(x)))
