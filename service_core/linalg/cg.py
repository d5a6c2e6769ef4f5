"""Conjugate gradients, and the restart loop every CG solve of the engine runs through."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp


def cg(
    matvec, b: jax.Array, x0: jax.Array | None, tol, max_iter: int, precond=None
) -> tuple[jax.Array, jax.Array]:
    """Conjugate gradients for an SPD operator (Hestenes–Stiefel; preconditioned when ``precond``
    is given), traceable under ``jit``.

    Arguments:
      matvec: v ↦ A v on arrays shaped like ``b``.
      b: right-hand side (any shape); x0: initial guess, or ``None`` to start from 0 without
        spending an operator product on it.
      tol: stop when the recursive residual ‖r‖ ≤ tol·‖b‖ (unpreconditioned norm, so the
        stopping rule is the same with or without ``precond``).
      max_iter: most iterations.
      precond: r ↦ P⁻¹ r for an SPD P ≈ A, or ``None``.

    Returns:
      ``(x, iterations)``. The caller recomputes the true residual.
    """
    apply_p = (lambda r: r) if precond is None else precond
    bnorm2 = jnp.vdot(b, b).real
    if x0 is None:
        x0, r0 = jnp.zeros_like(b), b
    else:
        r0 = b - matvec(x0)
    z0 = apply_p(r0)
    thresh = (tol**2) * bnorm2

    def cond(state):
        _, r, _, _, _, it = state
        return (jnp.vdot(r, r).real > thresh) & (it < max_iter)

    def body(state):
        x, r, z, p, rz, it = state
        ap = matvec(p)
        step = rz / jnp.vdot(p, ap).real
        x = x + step * p
        r = r - step * ap
        z = apply_p(r)
        rz_new = jnp.vdot(r, z).real
        p = z + (rz_new / rz) * p
        return x, r, z, p, rz_new, it + 1

    init = (x0, r0, z0, z0, jnp.vdot(r0, z0).real, jnp.asarray(0))
    x, _, _, _, _, it = jax.lax.while_loop(cond, body, init)
    return x, it


def restarted(
    run: Callable, x0: jax.Array, tol: float, max_iter: int, max_restarts: int, zero_start: bool
) -> tuple[jax.Array, int, float, bool]:
    """Run CG (``run(x, zero_start) -> (x, iterations, true relative residual)``) and restart it
    from its answer while the true residual misses ``tol``: CG's recursive residual drifts from the
    true one in float32, and a restart recomputes it.

    Returns:
      ``(x, total iterations, residual, out_of_iterations)``; the last is true when the final run
      used all ``max_iter`` iterations (as opposed to stagnating short of them).
    """
    x, total, res, it = x0, 0, float("inf"), 0
    for _ in range(max_restarts + 1):
        x, it, res = run(x, zero_start)
        zero_start = False
        total += int(it)
        res = float(res)
        if res <= tol or int(it) >= max_iter:
            break
    return x, total, res, int(it) >= max_iter
