"""The model state: one immutable value per version (docs/design.md, Model state and versions)."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import hmac
import time
from typing import Any

import jax
import numpy as np

from . import sharding
from .config import ModelConfig, SolverConfig, TrainConfig
from .layout import KernelLayout


@dataclasses.dataclass(frozen=True)
class VersionRecord:
    """What made one version: the training of version 0, or a deletion.

    Attributes:
      version: the version number.
      n_forgotten: records forgotten by this version (0 for training).
      solve: the version's main solve (training, or the deletion's influence step) as
        ``SolveInfo.to_dict()``.
      refine: the Newton refinement of a deletion, or ``None``.
      reason: why this solver method (the ``auto`` cost model, or "configured").
      residual: the published certificate (relative stationarity residual of α).
      rounding_floor: estimated rounding floor of the residual at this version's α
        (``dual.certified_floor``).
      newton_steps: Newton steps (training, or refinement).
      refine_cg_iterations: CG iterations of the refinement's inner solves, summed.
      tolerance: the stationarity tolerance the certificate was held to (``TrainConfig.tol``).
      accept_floor: the slack the operator granted (``residual`` ≤ ``tolerance × accept_floor``).
      dtype: the precision the version was computed in (``float64`` once a ``dtype auto`` model
        was promoted).
      time: Unix time it was computed.
    """

    version: int
    n_forgotten: int
    solve: dict
    residual: float
    refine: dict | None = None
    reason: str = ""
    rounding_floor: float = 0.0
    newton_steps: int = 0
    refine_cg_iterations: int = 0
    tolerance: float | None = None
    accept_floor: float = 1.0
    dtype: str = ""
    time: float = dataclasses.field(default_factory=time.time)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class ModelState:
    """Everything a version of the service holds.

    Arrays have ``capacity`` C ≥ N rows (C from ``bucket``), so that compiled solvers keep their
    shapes while deletions shrink N. A row is active when its id is non-empty; every other row
    (padding, or a point forgotten since the last compaction) is all zeros in x, y, f_0, α and in
    K's rows and columns: forgotten data is gone, not hidden behind a mask.

    Attributes:
      version: 0 for the trained model, +1 per applied deletion.
      ids: str ``(C,)``, active ids in data-set order, ``""`` on inactive rows.
      x: inputs ``(C, *input_shape)``; y: targets ``(C, d)`` (one-hot for labels).
      k: K over the active points, in ``layout``.
      layout: K's layout (``layout.KernelLayout``: form, d, devices).
      f0: f_0 ``(C, d)``; alpha: α ``(C, d)``; theta: θ ``(P,)``, ``None`` for an infinitely wide
        model (a kernel machine, docs/maths.md Eq. (14)).
      residual: relative stationarity residual of α (the version's certificate).
      forgotten: keyed digests (``digest``) of the ids forgotten so far: the id itself is kept
        nowhere once its deletion is applied, yet a re-forget is told it was forgotten.
      history: ``VersionRecord.to_dict()`` of every version.
      meta: data set description and the configurations (model, train, solver) that made it.
      f_star: the outputs f_0 + K α on the training rows ``(C, d)`` (checkpointed, as its writer
        computed it, for followers; a restore recomputes it from the K it recomputes, and a
        nonlinear model's restore keeps none).
      nystrom: the CG preconditioner of K (``linalg.Nystrom``) or ``None`` (not checkpointed).
      k_origin: the version over whose active points this process computed its K (build: 0; a
        restore: the restored version), kept by erasures and compactions; ``None`` once K holds
        rows computed for an addition, or when unknown. Two processes whose K has the same
        origin hold the same K (the same computation; a K recomputed over fewer points differs by
        rounding); a follower uses the worker's checkpointed f* only then
        (``deletion.followed_f_star``). A checkpoint records its writer's.
      id_key: the secret of ``digest`` (not checkpointed: the service keeps it in its data
        directory; ``b""`` for library use, where a digest is then an unkeyed hash).
    """

    version: int
    ids: np.ndarray
    x: jax.Array
    y: jax.Array
    k: jax.Array
    layout: KernelLayout
    f0: jax.Array
    alpha: jax.Array
    theta: jax.Array | None
    residual: float
    forgotten: tuple[str, ...]
    history: tuple[dict, ...]
    meta: dict[str, Any]
    f_star: jax.Array | None = None
    nystrom: Any = None
    k_origin: int | None = None
    id_key: bytes = dataclasses.field(default=b"", repr=False)

    def digest(self, record_id: str) -> str:
        """HMAC-SHA256 of a record id under ``id_key``, hex (64 characters)."""
        return id_digest(self.id_key, record_id)

    @property
    def form(self) -> str:
        return self.layout.form

    @property
    def dtype(self) -> str:
        """The precision the arrays are held and solved in: ``float32`` or ``float64``."""
        return np.dtype(self.alpha.dtype).name

    @property
    def bound_dtype(self) -> str:
        """The dtype whose magnitude bounds inputs and targets must meet (``validation``):
        ``float32`` for a ``dtype auto`` model, promoted or not (its network is evaluated, and
        its K was computed, in float32: a promoted model took a target of 1e60 and could then
        predict and forget nothing), else the held dtype."""
        return "float32" if self.train_config.dtype == "auto" else self.dtype

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Per-example input shape of the data set."""
        return tuple(self.meta["dataset"]["input_shape"])

    @property
    def task(self) -> str:
        """``classification`` (labels) or ``regression`` (target vectors)."""
        return self.meta["dataset"]["task"]

    @property
    def active(self) -> np.ndarray:
        """bool ``(C,)``: rows holding a training point."""
        return self.ids != ""

    @property
    def n(self) -> int:
        return int(np.count_nonzero(self.active))

    @property
    def capacity(self) -> int:
        return int(self.ids.shape[0])

    @functools.cached_property
    def index(self) -> dict[str, int]:
        """Row of each active id."""
        return {i: p for p, i in enumerate(self.ids.tolist()) if i}

    @functools.cached_property
    def model_config(self) -> ModelConfig:
        return ModelConfig.from_dict(self.meta["model"])

    @functools.cached_property
    def train_config(self) -> TrainConfig:
        return TrainConfig.from_dict(self.meta["train"])

    @functools.cached_property
    def solver_config(self) -> SolverConfig:
        return SolverConfig.from_dict(self.meta["solver"])

    def kernel_summary(self) -> dict[str, Any]:
        """K as held: shape, capacity (points), form, whether the form is exact for this model
        (full form, one Dense layer, the analytic NTK, or a user's network whose K was measured
        to be k ⊗ I_d: ``lifecycle.trace_exact``), bytes (total and per device), dtype,
        devices."""
        cfg = self.model_config
        return {
            "shape": list(self.k.shape),
            "capacity": self.capacity,
            "form": self.form,
            "exact": self.form == "full"
            or cfg.kind == "linear"
            or cfg.infinite
            or bool(self.meta.get("ntk", {}).get("trace_exact")),
            "bytes": int(self.k.nbytes),
            "dtype": str(self.k.dtype),
            "devices": [str(dev) for dev in self.k.devices()],
            "bytes_per_device": sharding.bytes_per_device(self.k),
        }

    def certificate(self) -> dict[str, Any]:
        """The version's certificate (docs/design.md, Certificates): its relative stationarity
        residual, the tolerance and slack it was held to, the estimated rounding floor of the
        residual in its dtype (``dual.certified_floor``), the ratio residual / tolerance, and the
        precision it was computed in."""
        record = self.history[-1] if self.history else {}
        tol = record.get("tolerance") or self.train_config.resolved_tol()
        return {
            "residual": float(self.residual),
            "tolerance": float(tol),
            "accept_floor": float(record.get("accept_floor", 1.0)),
            "rounding_floor": float(record.get("rounding_floor", 0.0)),
            "tolerance_ratio": float(self.residual) / float(tol),
            "dtype": record.get("dtype") or self.dtype,
        }

    def mask(self, ids) -> np.ndarray:
        """bool ``(C,)``: the rows of the active ``ids``."""
        mask = np.zeros(self.capacity, bool)
        mask[[self.index[i] for i in ids]] = True
        return mask

    def active_ids(self) -> list[str]:
        return self.ids[self.active].tolist()

    def replace(self, **changes) -> ModelState:
        """A new state (the cached index and configs are not carried over)."""
        return dataclasses.replace(self, **changes)

    def arrays(self) -> dict[str, jax.Array]:
        arrays = {"x": self.x, "y": self.y, "f0": self.f0, "alpha": self.alpha, "theta": self.theta}
        return {name: a for name, a in arrays.items() if a is not None}

    def metadata(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "ids": self.ids.tolist(),
            "form": self.form,
            "residual": self.residual,
            "forgotten": list(self.forgotten),
            "forgotten_form": FORGOTTEN_FORM,
            "k_origin": self.k_origin,
            "history": list(self.history),
            "meta": self.meta,
        }


# How ``forgotten`` is written in a checkpoint; checkpoints without it hold clear ids.
FORGOTTEN_FORM = "hmac-sha256"


def id_digest(key: bytes, record_id: str) -> str:
    """HMAC-SHA256 (RFC 2104) of ``record_id`` (UTF-8) under ``key``, as 64 hex characters."""
    return hmac.new(key, record_id.encode(), hashlib.sha256).hexdigest()


def bucket(n: int, multiple: int = 1) -> int:
    """Row capacity for n points: n rounded up to a step of about 1/16 of n (at least 16), and to
    a multiple of ``multiple`` (the device count). Sizes in one bucket share compiled solvers."""
    step = max(16, (1 << max(n.bit_length() - 1, 0)) // 16)
    step = int(np.lcm(step, multiple))
    return -(-n // step) * step
