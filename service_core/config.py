"""Configuration objects, one per concern, serialisable and saved in every checkpoint."""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Literal

import jax
import jax.numpy as jnp

# The one list of each: the app's settings and every validation read these.
MODEL_KINDS = ("linear", "mlp", "cnn", "inf-mlp", "inf-cnn")
# The user's own network (``--model FILE.py:NAME``): ``ModelConfig.kind`` is then ``USER_KIND``.
USER_KIND = "user"
LOSSES = ("mse", "ce")
DTYPES = ("auto", "float32", "float64")
KERNEL_FORMS = ("auto", "full", "trace")
TRAINERS = ("newton", "kgd")
SOLVER_METHODS = ("auto", "alpha-cg", "alpha-cholesky", "alpha-paper", "theta-cg")
SOLVER_ALIASES = {"cg": "alpha-cg", "cholesky": "alpha-cholesky", "paper": "alpha-paper"}
# The settings of ModelConfig that shape each kind (the rest mean nothing for it).
KIND_SETTINGS = {
    "linear": ("w_std", "b_std", "seed", "kernel_form"),
    "mlp": ("width", "depth", "w_std", "b_std", "seed", "kernel_form"),
    "cnn": ("width", "depth", "w_std", "b_std", "seed", "kernel_form", "pool"),
    "inf-mlp": ("depth", "w_std", "b_std"),
    "inf-cnn": ("depth", "w_std", "b_std", "pool"),
    USER_KIND: ("network", "params", "trainable", "kernel_form"),
}

ModelKind = Literal[MODEL_KINDS + (USER_KIND,)]
LossName = Literal[LOSSES]
DType = Literal[DTYPES]
KernelForm = Literal[KERNEL_FORMS]
SolverMethod = Literal[SOLVER_METHODS + tuple(SOLVER_ALIASES)]


class _Serialisable:
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[arg-type]

    @classmethod
    def from_dict(cls, data: dict[str, Any]):
        names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        return cls(**{k: v for k, v in data.items() if k in names})


@dataclasses.dataclass(frozen=True)
class ModelConfig(_Serialisable):
    """The network and its linearisation point.

    Attributes:
      kind: ``linear`` (one Dense layer, NTK parameterisation, θ_p = 0), ``mlp`` (``depth``
        hidden ReLU layers of ``width`` units, linearised at its seeded initialisation, θ_p = θ_0),
        ``cnn`` (``depth`` blocks Conv(``width``, 3×3, SAME) → ReLU → AvgPool(2×2), then Flatten and
        Dense(d), linearised like ``mlp``; image inputs (H, W, C)), or the infinitely wide ``inf-mlp``
        and ``inf-cnn`` (the same architectures through their analytic NTK; no θ, see
        ``service_core.infinite``).
      width, depth: hidden width (MLP units, CNN channels) and number of hidden layers / conv blocks.
        The analytic NTK of the ``inf-*`` kinds does not depend on ``width``.
      w_std, b_std: weight and bias standard deviations of the NTK parameterisation.
      seed: PRNG seed of the initialisation θ_0 (and of nothing else).
      kernel_form: ``full`` (N, N, d, d), ``trace`` (N, N) or ``auto``: trace where it is exact
        (the linear model and the analytic NTK of the ``inf-*`` kinds), full otherwise (docs/maths.md,
        Notation).
      pool: ``cnn`` and ``inf-cnn`` only: the AvgPool(2×2) of each block. Without it the analytic
        CNN kernel needs only per-pixel variances and is about 1,000× cheaper to compute (the
        paper's infinite-width CNN, §4.4, has no pooling).
      network: kind ``user`` only: the user's network, ``FILE.py:NAME`` (an absolute path) or
        ``package.module:NAME``; ``NAME()`` returns ``(apply_fn, params)`` (``user_network``),
        linearised at its params θ_0 with θ_p = θ_0.
      params: kind ``user`` only: θ_0 from this ``.npz`` (keyed by leaf path) or orbax checkpoint
        instead of the factory's params; ``None``: the factory's.
      trainable: kind ``user`` only: a regular expression (``re.search``) over '/'-joined leaf
        paths; the leaves it matches are θ, the rest stay at θ_0 (frozen). ``None``: every
        floating-point leaf.
    """

    kind: ModelKind = "mlp"
    width: int = 512
    depth: int = 2
    w_std: float = math.sqrt(2.0)
    b_std: float = 0.1
    seed: int = 0
    kernel_form: KernelForm = "auto"
    pool: bool = True
    network: str | None = None
    params: str | None = None
    trainable: str | None = None

    @property
    def infinite(self) -> bool:
        """Whether the model is infinitely wide (analytic NTK, no θ)."""
        return self.kind.startswith("inf-")

    def shaping(self) -> dict[str, Any]:
        """The settings that shape this kind of model (``KIND_SETTINGS``), with the kind."""
        return {"kind": self.kind, **{k: getattr(self, k) for k in KIND_SETTINGS[self.kind]}}

    def resolved_kernel_form(self) -> Literal["full", "trace"]:
        if self.kernel_form != "auto":
            return self.kernel_form
        return "trace" if self.kind == "linear" or self.infinite else "full"


@dataclasses.dataclass(frozen=True)
class TrainConfig(_Serialisable):
    """The regularised risk L_S of docs/maths.md and how its optimum is found.

    Attributes:
      loss: ``mse`` (ℓ = ½‖f − y‖², one-hot targets for labels) or ``ce`` (softmax cross-entropy).
      lam: λ, the weight of (λ/2)‖θ − θ_p‖².
      tol: stationarity tolerance of Newton in α (relative residual, see ``training.residual``);
        ``None`` picks 1e-5 in float32 and 1e-10 in float64.
      trainer: ``newton`` (damped Newton in α, solves system (A) per step) or ``kgd`` (kernel
        gradient descent, docs/maths.md Eq. 14: the paper's trainer for infinite width; same optimum,
        many more, cheaper steps). Deletions are always refined by Newton.
      max_newton: most Newton steps; max_kgd_steps: most KGD steps.
      dtype: floating point type of K, α, θ and every solve: ``float32``, ``float64``, or ``auto``
        (the default): float32 (the network drawn and K computed in float32) while float32 certifies
        the tolerances; when a certificate misses them, the model is promoted to float64 (K upcast
        exactly, so the model does not change; α, θ and every solve in float64) where memory allows,
        else a clear refusal (docs/design.md, Precision). Tolerances default as for float32.
      accept_floor: the slack the operator grants certificates (≥ 1): a version is published only if
        its relative stationarity residual, recomputed from the published α and K, is at most
        ``tol × accept_floor``. 1 (the default) is none: converged means met the tolerance.
    """

    loss: LossName = "ce"
    lam: float = 1e-3
    trainer: Literal[TRAINERS] = "newton"
    max_kgd_steps: int = 100_000
    tol: float | None = None
    max_newton: int = 50
    dtype: DType = "auto"
    accept_floor: float = 1.0

    def resolved_tol(self) -> float:
        if self.tol is not None:
            return self.tol
        return 1e-10 if self.dtype == "float64" else 1e-5

    def certified(self, residual: float) -> bool:
        """Whether a version with certificate ``residual`` may be published: ``residual`` ≤
        ``resolved_tol() × accept_floor`` (NaN never is)."""
        return bool(residual <= self.resolved_tol() * self.accept_floor)


@dataclasses.dataclass(frozen=True)
class SolverConfig(_Serialisable):
    """How the α-space influence system (A)/(B) of docs/maths.md is solved.

    Attributes:
      method: ``alpha-cg`` (matrix-free CG on the SPD form (B)), ``alpha-cholesky`` (direct),
        ``alpha-paper`` (the paper's premultiplied form, CG; for comparison), ``theta-cg`` (the
        parameter-space baseline, HVP + CG), or ``auto``: the cheapest by a flop-count cost model
        (``solvers.choose_method``), which says why. ``cg``/``cholesky`` are aliases.
      tol: relative residual ‖b − Bz‖/‖b‖ that CG must reach (true residual, recomputed);
        ``None`` picks 1e-6 in float32 and 1e-12 in float64.
      max_iter: most CG iterations per solve.
      refine: after the influence step, Newton on the retain risk to the training tolerance
        (cross-entropy; for squared error the step is already exact and refinement only checks).
      max_refine: most refinement steps.
      cholesky_max_dim: the ``auto`` threshold on the number of unknowns.
      nystrom_rank: rank ℓ of the randomized Nyström approximation of K that preconditions CG
        (``solvers.nystrom``; 0 turns preconditioning off). Same answers, fewer iterations: on
        MNIST FCNN 3×1024 (N = 2,000, d = 10) 12 CG iterations become 4–6.
      nystrom_refresh: recompute the approximation from the new K after each deletion, so that
        nothing derived from forgotten points stays in memory (costs one pass over K with ℓ
        columns, after the new version is published).
      spare_kernel: keep a second K-sized buffer, already written once, for the next deletion to
        write its erased K into. Fresh memory must be mapped and zeroed by the operating system
        on first touch (about 0.4 s for MNIST's 1.7 GB K here, a third of a small deletion); the
        spare is made again after each deletion is published. Costs one more K of memory, which
        the memory planner already reserves for the deletion's working copy. Single device only.
    """

    method: SolverMethod = "auto"
    tol: float | None = None
    max_iter: int = 2000
    refine: bool = True
    max_refine: int = 20
    cholesky_max_dim: int = 4096
    nystrom_rank: int = 128
    nystrom_refresh: bool = True
    spare_kernel: bool = True

    def resolved_tol(self, dtype: str) -> float:
        if self.tol is not None:
            return self.tol
        return 1e-12 if dtype == "float64" else 1e-6


def jax_dtype(name: str):
    """The JAX dtype of a ``DType`` name.

    float64 needs ``jax_enable_x64``: this is the one place the engine turns it on, for the whole
    process (JAX has no per-array switch), when a float64 model is built or restored. float32
    models are unaffected: their networks are drawn with x64 off (``models.build_model``) and every
    array they hold is float32 by construction.
    """
    if name == "float64":
        jax.config.update("jax_enable_x64", True)
        return jnp.float64
    return jnp.float32  # float32, and auto's first precision
