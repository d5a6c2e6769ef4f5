"""Losses in model outputs: value ℓ, gradient g = ∂ℓ/∂f, Hessian W = ∂²ℓ/∂f² and S = W^{1/2}.

docs/maths.md, Notation: squared error ℓ = ½‖f − y‖² (W = I, S = I, returned as ``None``) and softmax
cross-entropy ℓ = −Σ_a y_a log p_a (W = diag(p) − p pᵀ for targets summing to one).
Shapes: f, y ``(n, d)``; values ``(n,)``; g ``(n, d)``; W, S ``(n, d, d)``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def value(loss: str, f: jax.Array, y: jax.Array) -> jax.Array:
    """Per-point loss ``(n,)``."""
    if loss == "mse":
        return 0.5 * jnp.sum((f - y) ** 2, axis=-1)
    return -jnp.sum(y * jax.nn.log_softmax(f, axis=-1), axis=-1)


def grad(loss: str, f: jax.Array, y: jax.Array) -> jax.Array:
    """g = ∂ℓ/∂f, ``(n, d)``."""
    if loss == "mse":
        return f - y
    return jax.nn.softmax(f, axis=-1) * jnp.sum(y, axis=-1, keepdims=True) - y


def hessian(loss: str, f: jax.Array, y: jax.Array) -> jax.Array | None:
    """W = ∂²ℓ/∂f², ``(n, d, d)``; ``None`` for squared error (W = I)."""
    if loss == "mse":
        return None
    p = jax.nn.softmax(f, axis=-1)
    w = jax.vmap(jnp.diag)(p) - p[:, :, None] * p[:, None, :]
    return w * jnp.sum(y, axis=-1)[:, None, None]


def hessian_sqrt(loss: str, f: jax.Array, y: jax.Array) -> jax.Array | None:
    """S = W^{1/2} (symmetric PSD square root, per point), ``(n, d, d)``; ``None`` for squared error."""
    w = hessian(loss, f, y)
    if w is None:
        return None
    evals, evecs = jnp.linalg.eigh(w)
    root = jnp.sqrt(jnp.clip(evals, 0.0, None))
    return jnp.einsum("nab,nb,ncb->nac", evecs, root, evecs)


def hessian_bound(loss: str, y: jax.Array) -> float:
    """w_max ≥ ‖W_i‖₂ for every point: 1 for squared error, ½·max_i Σ_a y_ia for softmax
    cross-entropy (½ for one-hot targets)."""
    if loss == "mse":
        return 1.0
    return 0.5 * float(jnp.max(jnp.sum(y, axis=-1)))


def apply_blocks(blocks: jax.Array | None, v: jax.Array) -> jax.Array:
    """Per-point d×d blocks times v: ``(n, d, d) @ (n, d)`` → ``(n, d)``; identity for ``None``."""
    if blocks is None:
        return v
    return jnp.einsum("nab,nb->na", blocks, v)
