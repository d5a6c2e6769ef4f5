"""The MNIST CNN of the mislabel benchmark's pretrained workload (``bench attribution``).

Conv(32, 3×3, SAME) → ReLU → AvgPool(2×2) → Conv(64, 3×3, SAME) → ReLU → AvgPool(2×2) → Dense(10)
(the head), plain JAX. ``bench/attribution.py`` pretrains it with optax Adam on MNIST images that
are neither in the mislabel training set nor in its test pool, with their own (clean) labels, saves
it with orbax and serves it through ``ModelConfig(kind="user", network="…/mnist_cnn.py:net",
params=…, trainable="^head/")``: the network linearised at the pretrained weights, its head
trainable (linear fine-tuning of the head toward the pretrained one, λ toward θ0).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def _conv(x, w, b):
    y = jax.lax.conv_general_dilated(
        x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
    return y + b


def _pool(x):
    return jax.lax.reduce_window(x, 0.0, jax.lax.add, (1, 2, 2, 1), (1, 2, 2, 1), "VALID") / 4.0


def features(params, x):
    """The feature extractor: ``x`` ``(n, 28, 28, 1)`` → ``(n, 3136)``, in the params' dtype."""
    x = jnp.asarray(x, params["conv1"]["w"].dtype)
    h = _pool(jax.nn.relu(_conv(x, params["conv1"]["w"], params["conv1"]["b"])))
    h = _pool(jax.nn.relu(_conv(h, params["conv2"]["w"], params["conv2"]["b"])))
    return h.reshape(h.shape[0], -1)


def apply_fn(params, x):
    """Logits ``(n, 10)`` of images ``x`` ``(n, 28, 28, 1)`` (pixels in [0, 1])."""
    return features(params, x) @ params["head"]["w"] + params["head"]["b"]


def init(seed: int = 0):
    """Seeded float32 params (whether or not JAX runs with 64-bit types enabled)."""
    k = jax.random.split(jax.random.PRNGKey(seed), 3)
    f32 = jnp.float32

    def normal(key, shape, scale):
        return jax.random.normal(key, shape, f32) / scale

    return {
        "conv1": {"w": normal(k[0], (3, 3, 1, 32), 3.0), "b": jnp.zeros(32, f32)},
        "conv2": {"w": normal(k[1], (3, 3, 32, 64), 17.0), "b": jnp.zeros(64, f32)},
        "head": {"w": normal(k[2], (7 * 7 * 64, 10), 56.0), "b": jnp.zeros(10, f32)},
    }


def net():
    """What ``ModelConfig(kind="user", network=".../mnist_cnn.py:net")`` calls (θ0 from
    ``params``)."""
    return apply_fn, init()


def pretrain(x, y, epochs: int = 10, batch: int = 128, seed: int = 0):
    """Adam (1e-3), cross-entropy, ``epochs`` passes over ``x`` ``(n, 28, 28, 1)`` float32 with
    labels ``y`` ``(n,)`` int in minibatches of ``batch`` (seeded order). Returns the params."""
    import optax

    params = init(seed)
    opt = optax.adam(1e-3)
    state = opt.init(params)
    onehot = jax.nn.one_hot(y, 10, dtype=jnp.float32)
    x = np.asarray(x, np.float32)

    def ce(p, xb, yb):
        return -jnp.mean(jnp.sum(yb * jax.nn.log_softmax(apply_fn(p, xb)), axis=1))

    @jax.jit
    def step(p, s, xb, yb):
        g = jax.grad(ce)(p, xb, yb)
        updates, s = opt.update(g, s)
        return optax.apply_updates(p, updates), s

    rng = np.random.default_rng(seed)
    for _ in range(epochs):
        order = rng.permutation(len(x))
        for i in range(0, len(x) - batch + 1, batch):
            idx = order[i : i + batch]
            params, state = step(params, state, x[idx], onehot[idx])
    return params


def accuracy(params, x, y) -> float:
    """Share of images ``x`` ``(n, 28, 28, 1)`` whose arg-max logit is their label ``y`` ``(n,)``."""
    return float(np.mean(np.asarray(jnp.argmax(apply_fn(params, x), 1)) == np.asarray(y)))
