"""Precision: ``dtype auto`` (float32 while it certifies, else float64) and conditioning.

A ``dtype auto`` model starts in float32: its network is drawn and its kernel K computed in float32.
When a certificate misses its tolerance in float32 (training, or a deletion's refinement), the model
is *promoted*: K is upcast to float64 (exactly: every float32 number is a float64 number, so the
model, whose kernel is that K, does not change), so are α, θ, x, y and f_0, the network is rebuilt
in float64 around the θ_0 it was drawn with (and evaluated through its float32 twin, ``Model.low``:
the products J(X)ᵀα, J(x)t and kernel rows in the precision K was computed in, upcast), and the
solve is finished in float64 from where float32 stopped (docs/design.md, Precision). The promoted K needs twice the memory; when it does not fit,
the refusal says how many bytes it needs.

Conditioning (docs/maths.md, Eq. (κ)): κ = 1 + w·μ_max/(λN) bounds the condition number of system
(A), μ_max the top eigenvalue of K and w the largest Hessian weight of the loss. The float32
rounding floor of the stationarity residual (``dual.rounding_floor``, Eq. (F1)) grows like 1/λ at
small λ, which gives the smallest λ whose optimum float32 can certify (Eq. (F3)).
"""

from __future__ import annotations

import dataclasses
import logging
import re

import jax.numpy as jnp
import numpy as np

from . import losses, sharding
from .config import jax_dtype
from .dual import DualProblem, rounding_floor
from .errors import ResourceError
from .models import Model, Network, make_network
from .state import ModelState

log = logging.getLogger(__name__)

FLOAT32_UNIT_ROUNDOFF = float(np.finfo(np.float32).eps) / 2


def kernel_network(state_meta: dict, model_cfg, input_shape, output_dim) -> Network:
    """The network K is computed with: float32 for ``dtype auto`` (promoted or not), else the
    model's own dtype (``restore`` recomputes K exactly as the build did)."""
    name = "float64" if state_meta["train"]["dtype"] == "float64" else "float32"
    return make_network(model_cfg, input_shape, output_dim, jax_dtype(name))


def promoted_network(model_cfg, input_shape, output_dim) -> Network:
    """The float64 network of a promoted ``dtype auto`` model: θ_0 drawn in float32 (the same θ_0 as
    before promotion), held in float64; a finite network's evaluations run through its float32
    twin (``Model.low``: the network K was computed with), their results upcast."""
    high = make_network(model_cfg, input_shape, output_dim, jax_dtype("float64"), jnp.float32)
    if isinstance(high, Model):
        low = make_network(model_cfg, input_shape, output_dim, jax_dtype("float32"))
        high = dataclasses.replace(high, low=low)
    return high


def check_promotion_fits(k_rows: int, devices: list, budget: float, what: str) -> None:
    """Raise ``ResourceError`` (with the bytes) when K of ``k_rows`` rows in float64, with the
    solver's working copy, does not fit ``budget`` of each device's memory."""
    plan = sharding.plan_memory(k_rows, 8, devices, budget)
    if not plan.fits:
        gib = 2.0**30
        raise ResourceError(
            f"{what}: float32 cannot certify the tolerance and promoting K to float64 needs "
            f"{plan.working_bytes / gib:.2f} GiB per device with the solver's working copy, more than "
            f"{budget:.0%} of {plan.device_bytes / gib:.2f} GiB: raise lam, loosen tol (or grant "
            "slack with accept_floor), or use fewer points or more devices"
        )


def promote_arrays(state: ModelState) -> ModelState:
    """``state`` with K, x, y, f_0, α, θ and f* upcast to float64 (exact), the Nyström
    preconditioner dropped (the caller recomputes it from the float64 K)."""
    f64 = jax_dtype("float64")

    def up(a):
        return None if a is None else jnp.asarray(a, f64)

    meta = {**state.meta, "precision": {**state.meta.get("precision", {}), "dtype": "float64"}}
    return state.replace(
        k=up(state.k), x=up(state.x), y=up(state.y), f0=up(state.f0), alpha=up(state.alpha),
        theta=up(state.theta), f_star=up(state.f_star), nystrom=None, meta=meta,
    )  # fmt: skip


def conditioning(problem: DualProblem, alpha, f, lambda_max: float, tol: float) -> dict:
    """κ of system (A) and the smallest λ float32 can certify, at the optimum ``alpha``.

    Arguments:
      problem: the dual risk; alpha, f: its optimum ``(C, d)`` and f_0 + K α.
      lambda_max: μ_max, the top eigenvalue of K (power iteration at build).
      tol: the stationarity tolerance to certify.

    Returns:
      ``{"kappa", "lambda_max", "float32_floor", "min_lam_float32"}``: κ (Eq. (κ)); the float32
      rounding floor of the residual at this optimum (Eq. (F1) with float32's unit roundoff,
      whatever α's dtype); and λ_min = λ · floor / tol (Eq. (F3): the floor's dominant term
      scales as 1/λ for squared error; for cross-entropy W shrinks as the fit tightens, so the
      estimate errs on the safe side), below which float32 stagnates above ``tol``. Measured on 400
      digits (MLP 128, tol 1e-5): float32 reached 1.9e-5 at λ = 1e-3 (mse) where the floor
      estimate was 4.2e-5.
    """
    w_max = losses.hessian_bound(problem.loss, problem.y)
    kappa = 1.0 + w_max * lambda_max / (problem.lam * problem.n)
    floor = rounding_floor(problem, alpha, f, unit_roundoff=FLOAT32_UNIT_ROUNDOFF)
    return {
        "kappa": float(kappa),
        "lambda_max": float(lambda_max),
        "float32_floor": float(floor),
        "min_lam_float32": float(problem.lam * floor / tol),
    }


_DTYPE_ADVICE = re.compile(r"(use )?dtype auto or float64, | or use dtype auto or float64")


def promotion_reason(error: Exception) -> str:
    """Why ``dtype auto`` promotes a model: the float32 failure's message without its advice to
    use dtype auto or float64 (the model is auto, and is being promoted), as logged and kept in
    ``meta.precision.promoted``."""
    return _DTYPE_ADVICE.sub("", str(error))


def warn_if_near_limit(cond: dict, lam: float, dtype: str) -> str | None:
    """The line logged at start-up when ``lam`` is below ten times float32's limit
    (``cond["min_lam_float32"]``, Eq. (F3)), ``None`` if not or for float64: below the limit, or
    within 10x of it. The caller logs it as a WARNING for float32, and for auto when ``lam`` is
    below the limit (a promotion to float64 is then likely); as INFO otherwise (``promoted``: an
    auto model promoted at build)."""
    limit = cond["min_lam_float32"]
    if lam >= 10 * limit or dtype == "float64":
        return None
    where = {
        "float32": "deletions may fail to certify: use dtype auto or float64, or raise lam",
        "auto": "deletions may be promoted to float64 (twice K's memory, slower solves)",
        "promoted": "the model was promoted to float64 at build (twice K's memory, slower solves)",
    }[dtype]
    relation = "is below" if lam < limit else "is within 10x of"
    return (
        f"lam = {lam:g} {relation} the smallest lam float32 can certify "
        f"(~{limit:.1e}, an estimate; κ ≈ {cond['kappa']:.1e}): {where}"
    )
