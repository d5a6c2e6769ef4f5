"""What a solve is asked to do (``SolveOptions``) and what it did (``SolveInfo``).

Every residual a solver reports is the *true* relative residual ‖rhs − A x‖ / ‖rhs‖ of its answer,
recomputed after the solve (``relative_residual``), never CG's recursive estimate.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

# How far above an estimated rounding floor (``SPDSystem.rounding_floor``, ``dual.rounding_floor``) a
# stagnated solve may stop and still count as converged: float32 Newton stagnated at 0.1-2.5 times
# its estimate on digits (mse and ce, λ = 1e-2 to 1e-4, N = 200 and 1,437).
FLOOR_FACTOR = 4.0


class SolveInfo(NamedTuple):
    """What a solve did.

    Attributes:
      method: ``alpha-cg``, ``alpha-cholesky``, ``alpha-paper``, ``theta-cg``, ``kgd``, or
        ``newton/<inner>`` for several Newton steps.
      iterations: CG iterations (0 for a direct solve; Newton steps for ``newton/...``).
      residual: true relative residual of the final answer (dimensionless).
      converged: whether ``residual`` met the requested tolerance.
      seconds: wall time.
      preconditioner: ``nystrom-<rank>`` when CG was preconditioned, else ``""``.
      floor: the estimated rounding floor of the residual when the solve stagnated (for Newton
        on cross-entropy, possibly after meeting its residual tolerance), else 0; ``converged``
        is then true if the tolerance was met or rounding explains a small miss
        (``floor_accepts``: no answer in this dtype can be certified closer, and the miss is within
        the slack the operator granted, ``SolveOptions.accept_floor``).
    """

    method: str
    iterations: int
    residual: float
    converged: bool
    seconds: float
    preconditioner: str = ""
    floor: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "iterations": int(self.iterations),
            "residual": float(self.residual),
            "converged": bool(self.converged),
            "seconds": float(self.seconds),
            "preconditioner": self.preconditioner or None,  # null, not "", when none
            "rounding_floor": float(self.floor),
        }


@dataclasses.dataclass(frozen=True)
class SolveOptions:
    """How a linear system (B) is solved (``linalg.solve_spd``).

    Attributes:
      method: ``alpha-cg``, ``alpha-cholesky``, ``alpha-paper`` (the paper's premultiplied form, for
        comparison) or ``auto`` (Cholesky up to ``cholesky_max_dim`` unknowns, else CG).
      tol: relative residual to reach (true residual, recomputed).
      max_iter: most CG iterations per (re)start.
      cholesky_max_dim: the ``auto`` threshold on the number of unknowns.
      max_restarts: CG restarts from its answer while the true residual misses ``tol`` (the
        recursive residual drifts from the true one in float32).
      nystrom: a Nyström approximation of K (``linalg.nystrom``) preconditioning CG, or ``None``.
      accept_floor: slack (≥ 1) within which a solve that stagnated on its rounding floor still
        counts as converged (``floor_accepts``); 1: none.
    """

    method: str = "auto"
    tol: float = 1e-6
    max_iter: int = 2000
    cholesky_max_dim: int = 4096
    max_restarts: int = 3
    nystrom: Any = None
    accept_floor: float = 1.0

    def replace(self, **changes) -> SolveOptions:
        return dataclasses.replace(self, **changes)


def relative_residual(matvec, x: jax.Array, rhs: jax.Array) -> jax.Array:
    """‖rhs − A x‖ / ‖rhs‖ (a traced scalar), A given by ``matvec``; 0/0 reads 0."""
    tiny = jnp.finfo(rhs.dtype).tiny
    return jnp.linalg.norm(rhs - matvec(x)) / jnp.maximum(jnp.linalg.norm(rhs), tiny)


def floor_accepts(residual: float, tol: float, floor: float, slack: float) -> bool:
    """Whether a solve that stagnated at ``residual`` > ``tol`` counts as converged: rounding explains
    the miss (``residual`` ≤ FLOOR_FACTOR · ``floor``, with ``floor`` > 0 estimated) and the miss is
    within the slack the operator granted (``residual`` ≤ ``slack`` · ``tol``; ``slack`` = 1: never)."""
    return floor > 0.0 and residual <= FLOOR_FACTOR * floor and residual <= slack * tol
