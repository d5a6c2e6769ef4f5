"""Linear algebra of the α-space systems: the operator, its solvers, preconditioner and choice."""

from .cg import cg, restarted
from .choose import CostEstimate, canonical_method, cg_iterations, choose_method, power_iteration
from .nystrom import Nystrom, nystrom
from .result import (
    FLOOR_FACTOR,
    SolveInfo,
    SolveOptions,
    floor_accepts,
    relative_residual,
)
from .solve import solve_paper_form, solve_spd, solve_system_a
from .system import SPDSystem

__all__ = [
    "FLOOR_FACTOR",
    "CostEstimate",
    "Nystrom",
    "SPDSystem",
    "SolveInfo",
    "SolveOptions",
    "canonical_method",
    "cg",
    "cg_iterations",
    "choose_method",
    "floor_accepts",
    "nystrom",
    "power_iteration",
    "relative_residual",
    "restarted",
    "solve_paper_form",
    "solve_spd",
    "solve_system_a",
]
