"""Networks in neural-tangents ``stax`` (NTK parameterisation) and their linearisation.

``f_lin(x; θ) = f(x; θ_0) + J(x)(θ − θ_0)`` (math.md, Notation). Parameters are handled as one flat
vector θ of shape ``(P,)``; ``unravel`` maps it back to the stax pytree.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from ._nt import stax
from .config import ModelConfig


@dataclasses.dataclass(frozen=True)
class Model:
    """A stax network with its initialisation θ_0 and regularisation centre θ_p.

    Attributes:
      config: the ``ModelConfig`` it was built from.
      apply_fn: stax ``apply_fn(params_pytree, x)``, x of shape ``(n, n_in)`` → ``(n, d)``.
      params0: θ_0 as the stax pytree (for the empirical NTK).
      theta0: θ_0 flat, shape ``(P,)``.
      theta_p: θ_p flat, ``(P,)``: zeros for ``linear``, θ_0 for ``mlp``.
      unravel: flat ``(P,)`` → pytree.
      input_dim: n_in, inputs are flattened to it.
      output_dim: d.
    """

    config: ModelConfig
    apply_fn: Callable
    params0: object
    theta0: jax.Array
    theta_p: jax.Array
    unravel: Callable
    input_dim: int
    output_dim: int

    @property
    def n_params(self) -> int:
        return int(self.theta0.shape[0])

    def flatten_inputs(self, x) -> jax.Array:
        x = jnp.asarray(x)
        return x.reshape(x.shape[0], -1)

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


def build_model(config: ModelConfig, input_shape: tuple[int, ...], output_dim: int, dtype=jnp.float32) -> Model:
    """Build ``linear`` or ``mlp`` (design.md, Command line) and draw θ_0 from ``config.seed``.

    Arguments:
      config: model kind and sizes.
      input_shape: per-example input shape; inputs are flattened.
      output_dim: d.
      dtype: dtype of θ.

    Raises:
      ValueError: an unknown model kind.
    """
    w, b = config.w_std, config.b_std
    if config.kind == "linear":
        layers = [stax.Dense(output_dim, W_std=w, b_std=b, parameterization="ntk")]
    elif config.kind == "mlp":
        layers = []
        for _ in range(config.depth):
            layers += [stax.Dense(config.width, W_std=w, b_std=b, parameterization="ntk"), stax.Relu()]
        layers.append(stax.Dense(output_dim, W_std=w, b_std=b, parameterization="ntk"))
    else:
        raise ValueError(f"unknown model kind {config.kind!r}: use 'linear' or 'mlp'")
    init_fn, apply_fn, _ = stax.serial(*layers)
    input_dim = int(np.prod(input_shape))
    _, params = init_fn(jax.random.PRNGKey(config.seed), (-1, input_dim))
    params = jax.tree_util.tree_map(lambda a: jnp.asarray(a, dtype), params)
    theta0, unravel = ravel_pytree(params)
    theta_p = jnp.zeros_like(theta0) if config.kind == "linear" else theta0
    return Model(config, apply_fn, params, theta0, theta_p, unravel, input_dim, output_dim)
