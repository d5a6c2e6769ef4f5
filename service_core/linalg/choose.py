"""Which solver a deletion uses: the names, and the ``auto`` choice by a flop-count cost model."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

from ..config import SOLVER_ALIASES, SOLVER_METHODS


def canonical_method(name: str) -> str:
    """Normalise a method name (``cg`` → ``alpha-cg`` …).

    Raises:
      ValueError: an unknown name (the message lists the known ones).
    """
    name = SOLVER_ALIASES.get(name, name)
    if name not in SOLVER_METHODS:
        raise ValueError(f"unknown solver method {name!r}: use one of {', '.join(SOLVER_METHODS)}")
    return name


class CostEstimate(NamedTuple):
    """The ``auto`` choice and why: estimated flops per method and the chosen one."""

    method: str
    reason: str
    flops: dict


def cg_iterations(kappa: float, tol: float) -> float:
    """CG iterations to reach ``tol`` for condition number κ: ½ √κ ln(2/tol) (standard bound)."""
    return max(1.0, 0.5 * math.sqrt(max(kappa, 1.0)) * math.log(2.0 / tol))


def choose_method(
    n_retain: int,
    d: int,
    form: str,
    has_w: bool,
    n_params: int | None,
    kappa: float,
    tol: float,
    cholesky_max_dim: int,
    kappa_theta: float | None = None,
    preconditioned: bool = False,
) -> CostEstimate:
    """Pick the cheapest exact solver for the influence system by a flop-count cost model.

    * ``alpha-cholesky``: n³/3 for n unknowns (n = N_R·d, or N_R for the trace form with W = I),
      allowed up to ``cholesky_max_dim`` unknowns (memory: n² values).
    * ``alpha-cg``: iterations × one operator product, 2(N_R d)² (full form) or 2 N_R² d (trace),
      iterations from ``cg_iterations``.
    * ``theta-cg``: iterations × one HVP ≈ 8 P N_R (forward-over-reverse on N_R points); only for
      models with parameters (``n_params`` not ``None``).

    Arguments:
      kappa: an upper bound on κ(B) = 1 + λ_max(S K S)/c (from λ_max of the full K, by interlacing),
        or an estimate of the preconditioned κ when α-space CG is preconditioned.
      kappa_theta: κ for θ-space CG (never preconditioned); default ``kappa``.
      preconditioned: ``kappa`` is of the Nyström-preconditioned system (the reason says so:
        it is not the model's κ of ``/v1/model``).

    Returns:
      ``CostEstimate(method, reason, flops)``.
    """
    iters = cg_iterations(kappa, tol)
    dim = n_retain * d if (form == "full" or has_w) else n_retain
    product = 2.0 * (n_retain * d) ** 2 if form == "full" else 2.0 * n_retain**2 * d
    flops = {"alpha-cg": iters * product}
    if dim <= cholesky_max_dim:
        flops["alpha-cholesky"] = dim**3 / 3.0 + (dim**2 * d if form == "trace" else 0.0)
    if n_params is not None:
        iters_theta = cg_iterations(kappa if kappa_theta is None else kappa_theta, tol)
        flops["theta-cg"] = iters_theta * 8.0 * n_params * n_retain
    best = min(flops, key=flops.get)
    ranked = ", ".join(f"{k} {v:.2g}" for k, v in sorted(flops.items(), key=lambda kv: kv[1]))
    reason = (
        f"{best}: fewest estimated flops ({ranked}) for N_R = {n_retain}, d = {d}, {form} form"
        + (f", P = {n_params}" if n_params is not None else "")
        + (
            f", preconditioned κ ≈ {kappa:.3g} (Nyström; ≈{iters:.0f} CG iterations)"
            if preconditioned
            else f", κ ≤ {kappa:.3g} (≈{iters:.0f} CG iterations)"
        )
        + (
            ""
            if dim <= cholesky_max_dim
            else f"; Cholesky excluded above {cholesky_max_dim} unknowns"
        )
    )
    return CostEstimate(best, reason, flops)


def power_iteration(
    matvec: Callable, v0: jax.Array, iterations: int = 30, rtol: float = 0.0
) -> float:
    """The largest eigenvalue of a PSD operator by power iteration (an estimate from below).

    Arguments:
      matvec: v ↦ A v; v0: a random start (any shape); iterations: most steps; rtol: stop early
        when successive Rayleigh quotients agree to this (0: run every step).
    """
    v = v0 / jnp.linalg.norm(v0)
    mu = 0.0
    for _ in range(iterations):
        w = matvec(v)
        new_mu = float(jnp.vdot(v, w))
        v = w / jnp.linalg.norm(w)
        if rtol and abs(new_mu - mu) <= rtol * abs(new_mu):
            return new_mu
        mu = new_mu
    return mu
