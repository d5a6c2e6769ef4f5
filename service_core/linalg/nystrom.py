"""Randomized Nyström preconditioning of system (B) (Frangella, Tropp & Udell, "Randomized Nyström
preconditioning", SIAM J. Matrix Anal. Appl. 44(2), 2023, Alg. 2.1; docs/maths.md, Nyström preconditioning)."""

from __future__ import annotations

import time
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import jax.scipy.linalg as jsl
import numpy as np

from .nogil import one_blas_thread
from .system import SPDSystem


class Nystrom(NamedTuple):
    """A randomized Nyström approximation K ≈ U diag(lam) Uᵀ of rank ℓ.

    Attributes:
      u: ``(rows, ℓ)`` in K's layout (rows = C·d for the full form, C for the trace form).
      lam: ``(ℓ,)`` non-negative, descending.

    K − U diag(lam) Uᵀ is positive semidefinite, and so is every principal submatrix of it: the
    rows of the retained points are a Nyström approximation of K_RR as good as the whole one.
    """

    u: jax.Array
    lam: jax.Array

    @property
    def rank(self) -> int:
        return int(self.lam.shape[0])

    def mask_rows(self, keep: jax.Array) -> Nystrom:
        """Rows outside ``keep`` (bool over K's rows) set to zero."""
        return self._replace(u=self.u * keep[:, None].astype(self.u.dtype))


@partial(jax.jit, static_argnames=("n", "rank", "dtype"))
def _test_matrix(key, n, rank, dtype):
    omega, _ = jnp.linalg.qr(jax.random.normal(key, (n, rank), dtype))
    return omega


def _sketch_one_core(k: jax.Array, omega: jax.Array) -> jax.Array | None:
    """K Ω on one BLAS thread, reading K in place (a CPU array viewed by numpy, no copy); ``None``
    when K is not one CPU buffer (sharded, or on an accelerator)."""
    if len(k.devices()) != 1 or next(iter(k.devices())).platform != "cpu":
        return None
    with one_blas_thread():
        return jnp.asarray(np.asarray(k) @ np.asarray(omega))


@jax.jit
def _finish(k_omega, omega):
    n = omega.shape[0]
    y = k_omega
    shift = jnp.sqrt(n) * jnp.finfo(y.dtype).eps * jnp.linalg.norm(y)
    y = y + shift * omega
    chol = jnp.linalg.cholesky(omega.T @ y)
    b = jsl.solve_triangular(chol, y.T, lower=True).T
    u, sigma, _ = jnp.linalg.svd(b, full_matrices=False)
    return u, jnp.maximum(sigma**2 - shift, 0.0)


def nystrom(
    k: jax.Array, rank: int, seed: int = 0, one_core: bool = False
) -> tuple[Nystrom | None, float]:
    """Rank-``rank`` randomized Nyström approximation of the PSD matrix ``k`` ``(n, n)``: one pass over
    K with ``rank`` columns (2n²ℓ flops), then a QR and an SVD of ``(n, ℓ)``.

    ``one_core``: the pass over K runs on one BLAS thread (when K is one CPU buffer), for work done
    beside requests (a deletion's post-publish work, a follower's): XLA's matmul takes every core,
    and while it ran 10 % of the predictions beside it took over twice their idle p99 (``bench
    load``); on one core it takes about twice as long. Same approximation up to rounding.

    Returns:
      ``(approximation, seconds)``; the approximation is ``None`` when the rank is 0, not below n,
      or the float arithmetic failed (the solvers then run unpreconditioned).
    """
    t0 = time.perf_counter()
    if rank <= 0 or rank >= k.shape[0]:
        return None, 0.0
    n = int(k.shape[0])
    omega = _test_matrix(jax.random.PRNGKey(seed), n, int(rank), k.dtype)
    k_omega = _sketch_one_core(k, omega) if one_core else None
    if k_omega is None:  # one pass over K, ℓ columns
        k_omega = jnp.matmul(k, omega, precision=jax.lax.Precision.HIGHEST)
    u, lam = _finish(k_omega, omega)
    if not (bool(jnp.all(jnp.isfinite(u))) and bool(jnp.all(jnp.isfinite(lam)))):
        return None, time.perf_counter() - t0
    return Nystrom(u, lam), time.perf_counter() - t0


def usable(ny: Nystrom | None, system: SPDSystem) -> bool:
    """Whether ``preconditioner`` applies: the full form, or the trace form without S."""
    return ny is not None and (system.layout.form == "full" or system.s is None)


def preconditioner(ny: Nystrom, system: SPDSystem):
    """r ↦ P⁻¹ r for P = c·I + V diag(lam) Vᵀ ≈ B, V = M S U, by the Woodbury identity:
    P⁻¹ r = (r − V (c·diag(1/lam) + VᵀV)⁻¹ Vᵀ r) / c.

    Exact in arithmetic whatever the quality of U: it only changes how many CG iterations (B) takes.
    Components with lam ≤ 1e-3·c are dropped (they cannot help: B is within 0.1 % of c·I there).
    Call only when ``usable``.
    """
    c, s, mask = system.c, system.s, system.mask
    m = mask[:, None].astype(ny.u.dtype)
    keep = ny.lam > 1e-3 * c
    inv_lam = jnp.where(keep, 1.0 / jnp.where(keep, ny.lam, 1.0), 0.0)
    if system.layout.form == "full":
        n, d = mask.shape[0], ny.u.shape[0] // mask.shape[0]
        v = ny.u.reshape(n, d, -1) * m[:, :, None]
        if s is not None:
            v = jnp.einsum("iab,ibl->ial", s, v)
        v = v * keep[None, None, :]
        core = jnp.einsum("ial,iam->lm", v, v) + jnp.diag(c * inv_lam + (~keep))
        factor = jsl.cho_factor(core, lower=True)

        def apply(r):
            z = jsl.cho_solve(factor, jnp.einsum("ial,ia->l", v, r))
            return (r - jnp.einsum("ial,l->ia", v, z)) / c

        return apply
    v = ny.u * m * keep[None, :]
    core = v.T @ v + jnp.diag(c * inv_lam + (~keep))
    factor = jsl.cho_factor(core, lower=True)

    def apply(r):
        return (r - v @ jsl.cho_solve(factor, v.T @ r)) / c

    return apply
