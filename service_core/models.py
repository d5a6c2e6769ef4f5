"""Networks in neural-tangents ``stax`` (NTK parameterisation) and their linearisation.

``f_lin(x; θ) = f(x; θ_0) + J(x)(θ − θ_0)`` (math.md, Notation). Parameters are handled as one flat
vector θ of shape ``(P,)``; ``unravel`` maps it back to the stax pytree.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import disable_x64
from jax.flatten_util import ravel_pytree

from ._nt import stax
from .config import ModelConfig


@dataclasses.dataclass(frozen=True)
class Model:
    """A stax network with its initialisation θ_0 and regularisation centre θ_p.

    Attributes:
      config: the ``ModelConfig`` it was built from.
      apply_fn: ``apply_fn(params_pytree, x)``, x of shape ``(n, n_in)`` (rows flattened) → ``(n, d)``.
        For ``cnn`` it restores the image shape ``(n, H, W, C)`` before the stax network (a no-op
        on inputs that have it already), so every caller can hand it flattened rows.
      params0: θ_0 as the stax pytree (for the empirical NTK).
      theta0: θ_0 flat, shape ``(P,)``.
      theta_p: θ_p flat, ``(P,)``: zeros for ``linear``, θ_0 for ``mlp`` and ``cnn``.
      unravel: flat ``(P,)`` → pytree.
      input_dim: n_in = prod(input_shape), inputs are flattened to it.
      output_dim: d.
      input_shape: the per-example shape the stax network itself takes: ``(n_in,)`` for ``linear``
        and ``mlp``, ``(H, W, C)`` for ``cnn``.
    """

    config: ModelConfig
    apply_fn: Callable
    params0: object
    theta0: jax.Array
    theta_p: jax.Array
    unravel: Callable
    input_dim: int
    output_dim: int
    input_shape: tuple[int, ...] = ()

    @property
    def n_params(self) -> int:
        return int(self.theta0.shape[0])

    def flatten_inputs(self, x) -> jax.Array:
        """Inputs ``(n, ...)`` → the layout ``apply_fn`` takes: rows flattened, ``(n, n_in)``.

        Rows stay flat for every kind (the CNN's ``apply_fn`` restores the image shape itself)
        because the blocked NTK code pads inputs as ``(n, n_in)``.
        """
        x = jnp.asarray(x)
        return x.reshape(x.shape[0], -1)

    def image_inputs(self, x) -> jax.Array:
        """Inputs ``(n, ...)`` → ``(n, *input_shape)``, the shape of the stax network itself."""
        x = jnp.asarray(x)
        return x.reshape((x.shape[0],) + tuple(self.input_shape or (self.input_dim,)))

    def f(self, theta: jax.Array, x: jax.Array) -> jax.Array:
        """The network f(x; θ), θ flat ``(P,)``, x ``(n, ...)`` → ``(n, d)``."""
        return self.apply_fn(self.unravel(theta), self.flatten_inputs(x))

    def f_lin(self, theta: jax.Array, x: jax.Array) -> jax.Array:
        """The linearised model f(x; θ_0) + J(x)(θ − θ_0), one JVP; ``(n, d)``."""
        base, shift = self.f0_and_jvp(x, theta - self.theta0)
        return base + shift

    def f0_and_jvp(self, x: jax.Array, tangent: jax.Array) -> tuple[jax.Array, jax.Array]:
        """``(f(x; θ_0), J(x) tangent)``, each ``(n, d)``, by one forward-mode pass."""
        x = self.flatten_inputs(x)
        return jax.jvp(lambda t: self.f(t, x), (self.theta0,), (tangent,))

    def vjp(self, x: jax.Array, cotangent: jax.Array) -> jax.Array:
        """J(x)ᵀ cotangent, cotangent ``(n, d)`` → ``(P,)`` (math.md, Back to parameters)."""
        x = self.flatten_inputs(x)
        _, pullback = jax.vjp(lambda t: self.f(t, x), self.theta0)
        return pullback(cotangent)[0]

    def offset(self, x: jax.Array) -> jax.Array:
        """f_0 = f(x; θ_0) + J(x)(θ_p − θ_0), the linearised output at θ = θ_p; ``(n, d)``."""
        base, shift = self.f0_and_jvp(x, self.theta_p - self.theta0)
        return base + shift


def image_shape(input_shape: tuple[int, ...]) -> tuple[int, int, int]:
    """The ``(H, W, C)`` a convolutional model reads its inputs as: 3-D shapes as given, 2-D
    ``(H, W)`` with one channel.

    Raises:
      ValueError: any other rank (flattened rows carry no image geometry).
    """
    shape = tuple(int(s) for s in input_shape)
    if len(shape) == 3:
        return shape  # type: ignore[return-value]
    if len(shape) == 2:
        return shape + (1,)  # type: ignore[return-value]
    raise ValueError(
        f"a convolutional model needs image inputs (N, H, W, C) or (N, H, W); got per-example shape "
        f"{list(shape)}: use a data set that keeps image shape (cifar2:FILE.npz, npz:FILE with 4-D x)"
    )


def _avg_pool(dtype=None):
    """stax AvgPool(2×2, stride 2); with ``dtype``, its outputs are cast to ``dtype``.

    Why the cast: stax's AvgPool divides by a window count made in JAX's default float type, which
    turns float32 activations into float64 whenever ``jax_enable_x64`` is on (e.g. after a float64
    model was built in the same process), and the next Conv then refuses its float32 weights. The
    parameters (none) and the kernel are stax's own, so θ keeps the plain stax layout.
    """
    init_fn, apply_fn, kernel_fn = stax.AvgPool((2, 2), strides=(2, 2))
    if dtype is None:
        return init_fn, apply_fn, kernel_fn

    def cast_apply_fn(params, inputs, **kwargs):
        return apply_fn(params, inputs, **kwargs).astype(dtype)

    return init_fn, cast_apply_fn, kernel_fn


def cnn_layers(config: ModelConfig, output_dim: int, dtype=None) -> list:
    """stax layers of the CNN: ``depth`` × [Conv(width, 3×3, SAME) → ReLU → AvgPool(2×2, stride 2)],
    Flatten, Dense(d); NTK parameterisation. ``config.pool = False`` drops the pooling.
    ``dtype``: the activation dtype of a finite network (see ``_avg_pool``); ``None`` for kernels.
    """
    w, b = config.w_std, config.b_std
    layers = []
    for _ in range(config.depth):
        layers += [
            stax.Conv(
                config.width, (3, 3), padding="SAME", W_std=w, b_std=b, parameterization="ntk"
            ),
            stax.Relu(),
        ]
        if config.pool:
            layers.append(_avg_pool(dtype))
    layers += [stax.Flatten(), stax.Dense(output_dim, W_std=w, b_std=b, parameterization="ntk")]
    return layers


def mlp_layers(config: ModelConfig, output_dim: int) -> list:
    """stax layers of the MLP: ``depth`` × [Dense(width) → ReLU], Dense(d); NTK parameterisation."""
    w, b = config.w_std, config.b_std
    layers = []
    for _ in range(config.depth):
        layers += [stax.Dense(config.width, W_std=w, b_std=b, parameterization="ntk"), stax.Relu()]
    layers.append(stax.Dense(output_dim, W_std=w, b_std=b, parameterization="ntk"))
    return layers


def build_model(
    config: ModelConfig, input_shape: tuple[int, ...], output_dim: int, dtype=jnp.float32
) -> Model:
    """Build ``linear``, ``mlp`` or ``cnn`` (design.md, Command line) and draw θ_0 from ``config.seed``.

    Arguments:
      config: model kind and sizes.
      input_shape: per-example input shape; ``linear`` and ``mlp`` flatten it, ``cnn`` needs
        ``(H, W, C)`` or ``(H, W)`` (see ``image_shape``).
      output_dim: d.
      dtype: dtype of θ.

    Raises:
      ValueError: an unknown model kind (the ``inf-*`` kinds have no θ: ``infinite.KernelModel``),
        or flat inputs for ``cnn``.
    """
    w, b = config.w_std, config.b_std
    input_dim = int(np.prod(input_shape))
    net_shape: tuple[int, ...] = (input_dim,)
    if config.kind == "linear":
        layers = [stax.Dense(output_dim, W_std=w, b_std=b, parameterization="ntk")]
    elif config.kind == "mlp":
        layers = mlp_layers(config, output_dim)
    elif config.kind == "cnn":
        net_shape = image_shape(input_shape)
        layers = cnn_layers(config, output_dim, dtype)
    elif config.kind in ("inf-mlp", "inf-cnn"):
        raise ValueError(
            f"{config.kind!r} is infinitely wide and has no parameters: use service_core.infinite.KernelModel"
        )
    else:
        raise ValueError(f"unknown model kind {config.kind!r}: use 'linear', 'mlp' or 'cnn'")
    init_fn, stax_apply, _ = stax.serial(*layers)
    if config.kind == "cnn":
        # The blocked NTK pads inputs as flat rows (n, n_in); restoring the image shape inside the
        # network keeps every caller on that one layout.
        def apply_fn(params, x, **kwargs):
            return stax_apply(params, x.reshape((x.shape[0],) + net_shape), **kwargs)
    else:
        apply_fn = stax_apply
    # A float32 network is drawn with x64 off whatever jax_enable_x64 says (a float64 engine turns it
    # on for the whole process, and stax then draws different numbers from the same seed): the same
    # ModelConfig is the same network in every process, which restoring a checkpoint relies on. A
    # float64 network needs x64 on, so it is always drawn that way.
    with disable_x64() if jnp.dtype(dtype) != jnp.float64 else contextlib.nullcontext():
        _, params = init_fn(jax.random.PRNGKey(config.seed), (-1,) + net_shape)
    params = jax.tree_util.tree_map(lambda a: jnp.asarray(a, dtype), params)
    theta0, unravel = ravel_pytree(params)
    theta_p = jnp.zeros_like(theta0) if config.kind == "linear" else theta0
    return Model(
        config, apply_fn, params, theta0, theta_p, unravel, input_dim, output_dim, net_shape
    )
