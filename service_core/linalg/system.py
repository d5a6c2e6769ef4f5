"""System (B) of docs/maths.md as one operator object: B = c·I + M S K S M on the masked points.

M = diag(mask), S = W^{1/2} per point (identity for squared error). Rows outside the mask are c·I
with a zero right-hand side, so their solution is 0 and no slicing of K is needed.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from ..layout import KernelLayout
from ..losses import apply_blocks


@jax.tree_util.register_pytree_node_class
@dataclasses.dataclass(frozen=True)
class SPDSystem:
    """B = c·I + M S K S M (docs/maths.md, Eq. (B)), a pytree: jitted solvers take it whole.

    Attributes:
      k: K in ``layout``.
      s: S = W^{1/2} per point ``(C, d, d)``, or ``None`` for S = I (squared error).
      mask: bool ``(C,)``, the points of the system.
      c: the shift c = λ N_R (> 0), a scalar.
      layout: K's layout (static).
    """

    k: jax.Array
    s: jax.Array | None
    mask: jax.Array
    c: jax.Array
    layout: KernelLayout

    @classmethod
    def make(cls, k: jax.Array, layout: KernelLayout, s, mask: jax.Array, c: float) -> SPDSystem:
        """B for K ``k`` in ``layout``, S ``s`` (or ``None``), ``mask`` and the shift ``c``."""
        return cls(k, s, mask, jnp.asarray(c, k.dtype), layout)

    def tree_flatten(self):
        return (self.k, self.s, self.mask, self.c), self.layout

    @classmethod
    def tree_unflatten(cls, layout, children):
        return cls(*children, layout)

    @property
    def m(self) -> jax.Array:
        """The mask as a ``(C, 1)`` column in K's dtype."""
        return self.mask[:, None].astype(self.k.dtype)

    @property
    def dim(self) -> int:
        """Unknowns of the dense system a direct solve factorises."""
        n = self.mask.shape[0]
        if self.layout.form == "trace" and self.s is None:
            return n
        return n * self.layout.d

    def matvec(self, v: jax.Array) -> jax.Array:
        """B v, v ``(C, d)`` → ``(C, d)``."""
        m = self.m
        u = apply_blocks(self.s, v * m)
        return self.c * v + m * apply_blocks(self.s, self.layout.matvec(self.k, u))

    def dense(self) -> jax.Array:
        """B as a matrix: ``(C·d, C·d)``, or ``(C, C)`` for the trace form without S."""
        k, s, n = self.k, self.s, self.mask.shape[0]
        m = self.mask.astype(k.dtype)
        if self.layout.form == "trace" and s is None:
            return self.c * jnp.eye(n, dtype=k.dtype) + (m[:, None] * k * m[None, :])
        if self.layout.form == "trace":
            a = jnp.einsum("ij,iac,jcb->iajb", k, s, s)
        else:
            d = k.shape[0] // n
            k4 = k.reshape(n, d, n, d)
            a = k4 if s is None else jnp.einsum("iab,ibjc,jdc->iajd", s, k4, s)
        d = a.shape[1]
        a = a * m[:, None, None, None] * m[None, None, :, None]
        return self.c * jnp.eye(n * d, dtype=k.dtype) + a.reshape(n * d, n * d)

    def rounding_floor(self, x: jax.Array, rhs: jax.Array) -> float:
        """How small the true relative residual of B x = rhs can be computed in K's dtype (an estimate).

        The residual is evaluated with unit roundoff u (2⁻²⁴ in float32); the first-order
        componentwise model of rounding in a product (Higham, *Accuracy and Stability of Numerical
        Algorithms*, §3.5, without its dimension factor) bounds its error by about
        u (c|x| + M|S||K||S|M|x| + |rhs|), so (docs/maths.md, Eq. (F2))

            floor = u ‖c|x| + M|S||K||S|M|x| + |rhs|‖ / ‖rhs‖,

        one pass over |K| by row blocks (no copy). With a small λ, c x and K x nearly cancel, and CG
        stagnates near this level whatever its iteration count.

        Arguments:
          x: the answer ``(C, d)``; rhs: ``(C, d)``.
        """
        m = self.m
        u = float(jnp.finfo(self.k.dtype).eps) / 2
        abs_s = None if self.s is None else jnp.abs(self.s)
        ax = jnp.abs(x) * m
        k_ax = self.layout.abs_matvec(self.k, apply_blocks(abs_s, ax))
        bound = self.c * ax + m * apply_blocks(abs_s, k_ax) + jnp.abs(rhs)
        tiny = jnp.finfo(self.k.dtype).tiny
        return float(u * jnp.linalg.norm(bound) / jnp.maximum(jnp.linalg.norm(rhs), tiny))
