"""Your own network, served by ntk-unlearn: a small MLP in plain JAX, "pretrained" here by a few
steps of gradient descent on the first half of scikit-learn's digits (training split), its weights
written as an ``.npz`` keyed by leaf path, and the other half written as the data set to serve:
the records the service fine-tunes on, and may be asked to forget, were never seen in
pretraining. Serve it, fine-tuning only its head:

    .venv/bin/python examples/own_network.py   # writes examples/own_network_{params,data}.npz
    .venv/bin/ntk-unlearn serve --model examples/own_network.py:net \\
        --params examples/own_network_params.npz --trainable '^head/' \\
        --dataset npz:examples/own_network_data.npz --loss ce --lam 1e-3 \\
        --data-dir data-own-network

``net()`` is what ``--model FILE.py:NAME`` calls: it returns ``(apply_fn, params)`` with
``apply_fn(params, x)`` mapping ``(n, 64)`` to ``(n, 10)``. The service linearises the network at
the params (``--params`` replaces the factory's with the file's), fine-tunes the leaves that
``--trainable`` matches with λ/2‖θ − θ0‖², and forgets records from that fine-tuning exactly.
A record that was in the pretraining data is in θ0 itself: forgetting it from the fine-tuning
would leave its influence on the pretrained weights, so the two sets are kept apart here (as in
``examples/mnist_pretrained.py``).
"""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp

HIDDEN = 64


def apply_fn(params, x):
    """Two tanh layers and a linear head: ``(n, 64)`` → ``(n, 10)``."""
    h = jnp.tanh(x @ params["body"]["w1"] + params["body"]["b1"])
    h = jnp.tanh(h @ params["body"]["w2"] + params["body"]["b2"])
    return h @ params["head"]["w"] + params["head"]["b"]


def init(seed: int = 0):
    """Random weights of the right shapes (θ0 until a --params file replaces them)."""
    k = jax.random.split(jax.random.PRNGKey(seed), 3)
    return {
        "body": {
            "w1": jax.random.normal(k[0], (64, HIDDEN)) / 8.0,
            "b1": jnp.zeros(HIDDEN),
            "w2": jax.random.normal(k[1], (HIDDEN, HIDDEN)) / HIDDEN**0.5,
            "b2": jnp.zeros(HIDDEN),
        },
        "head": {"w": jax.random.normal(k[2], (HIDDEN, 10)) / HIDDEN**0.5, "b": jnp.zeros(10)},
    }


def net():
    """What ``--model examples/own_network.py:net`` calls."""
    return apply_fn, init()


def pretrain(steps: int = 300, lr: float = 0.5):
    """Full-batch gradient descent on softmax cross-entropy over the first half of digits' training
    split (the "core" data; the service is served the other half, ``served_half``). Returns the
    params."""
    from service_core import load_digits

    ds = load_digits()
    half = ds.n // 2
    x = jnp.asarray(ds.x[:half].reshape(half, -1), jnp.float32)
    y = jax.nn.one_hot(ds.y[:half], 10)

    def loss(p):
        return -jnp.mean(jnp.sum(y * jax.nn.log_softmax(apply_fn(p, x)), axis=1))

    step = jax.jit(lambda p: jax.tree_util.tree_map(lambda a, g: a - lr * g, p, jax.grad(loss)(p)))
    params = init()
    for _ in range(steps):
        params = step(params)
    xt = jnp.asarray(ds.x_test.reshape(len(ds.x_test), -1), jnp.float32)
    accuracy = float(jnp.mean(jnp.argmax(apply_fn(params, xt), 1) == ds.y_test))
    print(
        f"pretrained on {half} digits: test accuracy {accuracy:.3f}, loss {float(loss(params)):.3f}"
    )
    return params


def served_half(path: Path) -> Path:
    """Write the second half of digits' training split (the records pretraining never saw), with
    their ids and the test split, as an ``.npz`` data set (``--dataset npz:PATH``)."""
    import numpy as np

    from service_core import load_digits

    ds = load_digits()
    half = ds.n // 2
    np.savez(
        path,
        x=ds.x[half:],
        y=ds.y[half:],
        ids=ds.ids[half:],
        x_test=ds.x_test,
        y_test=ds.y_test,
    )
    print(f"wrote {path}: {ds.n - half} records to serve (none of them seen in pretraining)")
    return path


if __name__ == "__main__":
    from service_core.user_network import save_params

    out = save_params(Path(__file__).with_name("own_network_params.npz"), pretrain())
    print(f"wrote {out}")
    served_half(Path(__file__).with_name("own_network_data.npz"))
