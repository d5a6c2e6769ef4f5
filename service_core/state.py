"""The model state: one immutable value per version (design.md, Model state and versions)."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np


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
      k: K over the active points, engine layout of ``form`` (``ntk`` module docstring).
      form: ``full`` or ``trace``.
      f0: f_0 ``(C, d)``; alpha: α ``(C, d)``; theta: θ ``(P,)``, ``None`` for an infinitely wide
        model (a kernel machine, math.md Eq. 14).
      residual: relative stationarity residual of α (the version's certificate).
      forgotten: ids forgotten so far (the deletion log keeps ids, never data).
      history: one dict per version: version, n_forgotten, solver info, timestamps.
      meta: data set description and the configurations (model, train, solver) that made it.
      f_star: the outputs f_0 + K α on the training rows ``(C, d)``, kept after a deletion so the
        next one need not pass over K for them; ``None`` after build or restore (not checkpointed).
      nystrom: the CG preconditioner of K (``solvers.Nystrom``) or ``None``; recomputed from K
        after build, restore and (by default) each deletion; not checkpointed.
    """

    version: int
    ids: np.ndarray
    x: jax.Array
    y: jax.Array
    k: jax.Array
    form: str
    f0: jax.Array
    alpha: jax.Array
    theta: jax.Array
    residual: float
    forgotten: tuple[str, ...]
    history: tuple[dict, ...]
    meta: dict[str, Any]
    f_star: jax.Array | None = None
    nystrom: Any = None

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

    def active_ids(self) -> list[str]:
        return self.ids[self.active].tolist()

    def arrays(self) -> dict[str, jax.Array]:
        arrays = {
            "x": self.x,
            "y": self.y,
            "k": self.k,
            "f0": self.f0,
            "alpha": self.alpha,
            "theta": self.theta,
        }
        return {name: a for name, a in arrays.items() if a is not None}

    def metadata(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "ids": self.ids.tolist(),
            "form": self.form,
            "residual": self.residual,
            "forgotten": list(self.forgotten),
            "history": list(self.history),
            "meta": self.meta,
        }


def bucket(n: int, multiple: int = 1) -> int:
    """Row capacity for n points: n rounded up to a step of about 1/16 of n (at least 16), and to
    a multiple of ``multiple`` (the device count). Sizes in one bucket share compiled solvers."""
    step = max(16, (1 << max(n.bit_length() - 1, 0)) // 16)
    step = int(np.lcm(step, multiple))
    return -(-n // step) * step


def pad_rows(a, capacity: int):
    """``a`` with zero rows appended up to ``capacity`` rows (numpy or jax)."""
    extra = capacity - a.shape[0]
    if extra == 0:
        return a
    widths = [(0, extra)] + [(0, 0)] * (a.ndim - 1)
    if isinstance(a, np.ndarray):
        fill = "" if a.dtype.kind in "US" else 0
        return np.pad(a, widths, constant_values=fill)
    return jax.numpy.pad(a, widths)
