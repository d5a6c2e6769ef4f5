"""The model state: one immutable value per version (design.md, Model state and versions)."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np


@dataclasses.dataclass(frozen=True)
class ModelState:
    """Everything a version of the service holds, over the *active* training points only.

    Forgotten points have no row in any array here: their x, y, α and K rows/columns are gone.

    Attributes:
      version: 0 for the trained model, +1 per applied deletion.
      ids: str ``(N,)``, active ids in data-set order.
      x: inputs ``(N, *input_shape)``; y: targets ``(N, d)`` (one-hot for labels).
      k: K over the active points, engine layout of ``form`` (``ntk`` module docstring).
      form: ``full`` or ``trace``.
      f0: f_0 ``(N, d)``; alpha: α ``(N, d)``; theta: θ ``(P,)``.
      residual: relative stationarity residual of α (the version's certificate).
      forgotten: ids forgotten so far (the deletion log keeps ids, never data).
      history: one dict per version: version, n_forgotten, solver info, timestamps.
      meta: data set description and the configurations (model, train, solver) that made it.
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

    @property
    def n(self) -> int:
        return int(self.ids.shape[0])

    def arrays(self) -> dict[str, jax.Array]:
        return {"x": self.x, "y": self.y, "k": self.k, "f0": self.f0, "alpha": self.alpha, "theta": self.theta}

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
