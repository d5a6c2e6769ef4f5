"""Hooks the benchmark puts around the engine, without editing it.

* ``Recorder``: while active, wraps ``service_core.influence.solve_retain`` (records the true
  ``SolveInfo`` of each influence step), ``service_core.influence.theta_space_delta`` (records
  Δθ and its ``SolveInfo``) and the ``newton`` used by ``Unlearner.plan_forget`` for refinement
  (records the inner solves of the refinement).

  ``allow_unconverged``: ``plan_forget`` raises ``SolverError`` when a solve misses its tolerance.
  The paper's premultiplied solve (``alpha-paper``) is run, like the paper, for a fixed 500 CG
  iterations and does not reach the service tolerance, so the wrapper reports it as converged to
  ``plan_forget`` and keeps the true flag and residual for the results table. Nothing else changes.
"""

from __future__ import annotations

from contextlib import contextmanager

import service_core.engine as engine_mod
import service_core.influence as influence_mod


def clear_theta_cache() -> None:
    """Drop the engine's compiled θ-space solvers (cold-start timings)."""
    influence_mod._THETA_SOLVERS.clear()


class Recorder:
    """What the wrapped engine calls did during the last ``plan_forget``."""

    def __init__(self):
        self.reset()

    def reset(self):
        self.delta_alpha = None
        self.step = None
        self.delta_theta = None
        self.refine_cg = None
        self.refine = None


@contextmanager
def instrument(recorder: Recorder, allow_unconverged: bool = False):
    orig_solve = influence_mod.solve_retain
    orig_theta = influence_mod.theta_space_delta
    orig_newton = engine_mod.newton

    def solve(*args, **kwargs):
        delta, info = orig_solve(*args, **kwargs)
        recorder.step = info
        if allow_unconverged and not info.converged:
            info = info._replace(converged=True)
        return delta, info

    def theta(*args, **kwargs):
        dtheta, info = orig_theta(*args, **kwargs)
        recorder.delta_theta, recorder.step = dtheta, info
        if allow_unconverged and not info.converged:
            info = info._replace(converged=True)
        return dtheta, info

    def newton(*args, **kwargs):
        alpha, info = orig_newton(*args, **kwargs)
        recorder.refine_cg, recorder.refine = info.cg_iterations, info
        return alpha, info

    influence_mod.solve_retain = solve
    influence_mod.theta_space_delta = theta
    engine_mod.newton = newton
    try:
        yield recorder
    finally:
        influence_mod.solve_retain = orig_solve
        influence_mod.theta_space_delta = orig_theta
        engine_mod.newton = orig_newton
