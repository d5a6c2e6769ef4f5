"""The parameter-space baseline (docs/maths.md, Eqs. 1–4): Hessian-vector products and CG in θ.

H_R Δθ = (1/N) Σ_{i∈F} ∇θ[ℓ_i + (λ/2)‖θ − θ_p‖²], with
H_R = (1/N) Σ_{i∈R} J_iᵀ W_i J_i + (N_R/N) λ I applied by Hessian-vector products
(forward-over-reverse on the linearised retain risk), solved by CG, never materialised.
"""

from __future__ import annotations

import time
from functools import partial

import jax
import jax.numpy as jnp

from . import losses
from .linalg import SolveInfo, cg, relative_residual, restarted
from .models import Model


def _theta_solve(apply_fn, unravel, loss, max_iter, theta0, theta_p, theta_star, xf, y, m_f, m_r, lam, tol, x0, zero_start=False):  # fmt: skip
    """One CG (re)start of the θ-space system, traced once per shape: data are arguments, so XLA
    neither recompiles per call nor constant-folds the network over captured inputs."""
    n = jnp.sum(m_f) + jnp.sum(m_r)

    def f_lin(theta):
        base, shift = jax.jvp(lambda t: apply_fn(unravel(t), xf), (theta0,), (theta - theta0,))
        return base + shift

    def point_risk(theta, weights):
        reg = 0.5 * lam * jnp.sum((theta - theta_p) ** 2)
        return jnp.sum(weights * (losses.value(loss, f_lin(theta), y) + reg)) / n

    grad_r = jax.grad(point_risk)
    rhs = grad_r(theta_star, m_f)

    def hvp(v):  # forward-over-reverse: jvp of the retain gradient
        return jax.jvp(lambda t: grad_r(t, m_r), (theta_star,), (v,))[1]

    sol, it = cg(hvp, rhs, None if zero_start else x0, tol, max_iter)
    return sol, it, relative_residual(hvp, sol, rhs)


def _compiled(model: Model, loss: str, max_iter: int):
    """The jitted θ-space solve of ``model`` for ``loss``, kept on the model (one per model, loss
    and iteration limit; later calls with the same shapes reuse its compilation)."""
    cache = model.compiled
    key = ("theta-space", loss, int(max_iter))
    if key not in cache:
        fn = partial(_theta_solve, model.apply_fn, model.unravel, loss, int(max_iter))
        cache[key] = jax.jit(fn, static_argnames=("zero_start",))
    return cache[key]


def theta_space_delta(
    model: Model,
    theta_star: jax.Array,
    x: jax.Array,
    y: jax.Array,
    forget_mask: jax.Array,
    lam: float,
    loss: str,
    tol: float = 1e-10,
    max_iter: int = 5000,
    retain_mask: jax.Array | None = None,
) -> tuple[jax.Array, SolveInfo]:
    """Δθ of removing F by the parameter-space baseline (module docstring).

    Arguments:
      model: the network; theta_star: θ* ``(P,)``; x ``(C, ...)``; y targets ``(C, d)``;
      forget_mask: bool ``(C,)``; lam: λ; loss: ``mse`` or ``ce``.
      tol: relative residual of CG (true residual recomputed); max_iter: most CG iterations.
      retain_mask: bool ``(C,)``, default every row not in F (pass it when rows are padding).

    Returns:
      ``(Δθ (P,), SolveInfo)``; θ after the deletion is θ* + Δθ.
    """
    t0 = time.perf_counter()
    fn = _compiled(model, loss, max_iter)
    dtype = theta_star.dtype
    m_f = forget_mask.astype(dtype)
    m_r = (1.0 - m_f) if retain_mask is None else retain_mask.astype(dtype)
    args = (model.theta0, model.theta_p, theta_star, model.flatten_inputs(x), y, m_f, m_r,
            jnp.asarray(lam, dtype), jnp.asarray(tol, dtype))  # fmt: skip

    def run(x0, zero_start):
        return fn(*args, x0, zero_start=zero_start)

    sol, total, res, _ = restarted(run, jnp.zeros_like(theta_star), tol, max_iter, 3, True)
    return sol, SolveInfo("theta-cg", total, res, bool(res <= tol), time.perf_counter() - t0)
