"""``Unlearner``: the façade the service (and any library user) drives.

It owns one immutable ``ModelState`` at a time. Reads take the current state by reference and
never see a half-applied deletion; ``forget`` computes the next version, checkpoints it, and only
then publishes it by swapping the reference.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from . import checkpoint, influence, losses
from .config import ModelConfig, SolverConfig, TrainConfig
from .data import Dataset, targets_matrix
from .errors import (
    AlreadyForgottenError,
    InvalidForgetSetError,
    InvalidInputError,
    ResourceError,
    SolverError,
    UnknownIdsError,
)
from .models import Model, build_model
from .ntk import cached_ntk, kernel_bytes, purge_cache, select
from .solvers import SolveInfo
from .state import ModelState
from .training import DualProblem, newton

log = logging.getLogger(__name__)


class ForgetResult(NamedTuple):
    """Outcome of an applied deletion.

    Attributes:
      version: the new model version.
      solve: the influence solve of system (A).
      refine: Newton refinement on the retain risk (``None`` if not run).
      residual: relative stationarity residual of the new version.
      seconds: wall time of the whole deletion, checkpoint included.
    """

    version: int
    solve: SolveInfo
    refine: SolveInfo | None
    residual: float
    seconds: float


class InfluenceResult(NamedTuple):
    """Estimated changes at test points if a forget set were removed (math.md Eqs. 8–9).

    Attributes:
      version: model version the estimate is for.
      delta_outputs: Δf ``(n, d)``; delta_loss: Δℓ ``(n,)``; solve: the influence solve.
    """

    version: int
    delta_outputs: np.ndarray
    delta_loss: np.ndarray
    solve: SolveInfo


def _dtype(name: str):
    if name == "float64":
        jax.config.update("jax_enable_x64", True)
        return jnp.float64
    return jnp.float32


def _physical_memory_bytes() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return 1 << 62


class Unlearner:
    """A trained linearised network in dual form that forgets on request.

    Build with ``Unlearner.build`` (trains version 0) or ``Unlearner.restore`` (from checkpoints).
    """

    def __init__(self, state: ModelState, model: Model, cache_dir: Path | None = None):
        self._state = state
        self._model = model
        self._cache_dir = cache_dir
        self._forget_lock = threading.Lock()
        self._dtype = model.theta0.dtype
        self._predict = jax.jit(model.f_lin)

    # -- construction -------------------------------------------------------------------------
    @classmethod
    def build(
        cls,
        dataset: Dataset,
        model_cfg: ModelConfig = ModelConfig(),
        train_cfg: TrainConfig = TrainConfig(),
        solver_cfg: SolverConfig = SolverConfig(),
        cache_dir: Path | None = None,
        progress: bool = True,
    ) -> Unlearner:
        """Build the model, compute (or load) its NTK, and train it to the optimum: version 0.

        Raises:
          ResourceError: K would not fit in 60 % of this machine's memory.
          SolverError: training did not reach ``train_cfg`` tolerance.
        """
        dtype = _dtype(train_cfg.dtype)
        model = build_model(model_cfg, dataset.input_shape, dataset.output_dim, dtype)
        form = model_cfg.resolved_kernel_form()
        need = kernel_bytes(dataset.n, dataset.output_dim, form, dtype)
        if need > 0.6 * _physical_memory_bytes():
            raise ResourceError(
                f"K for {dataset.n} points, d = {dataset.output_dim} ({form} form) needs {need / 2**30:.1f} GiB, "
                f"more than 60 % of this machine's {_physical_memory_bytes() / 2**30:.1f} GiB: use fewer points "
                "or the trace form"
            )
        k, report = cached_ntk(model, dataset.x, form, cache_dir, dtype=dtype, progress=progress)
        log.info(
            "NTK %s form %s: %.1f MiB in %.2f s (%s)",
            form, k.shape, report["bytes"] / 2**20, report["seconds"], "cache" if report["cached"] else "computed",
        )
        x = jnp.asarray(dataset.x, dtype)
        y = jnp.asarray(dataset.targets(), dtype)
        k = jnp.asarray(k)
        f0 = model.offset(x)
        problem = DualProblem(k, form, f0, y, jnp.ones(dataset.n, bool), train_cfg.lam, train_cfg.loss)
        alpha, info = newton(
            problem,
            jnp.zeros_like(y),
            train_cfg.resolved_tol(),
            train_cfg.max_newton,
            cls._solver_kwargs(solver_cfg, train_cfg.dtype),
        )
        if not info.converged:
            raise SolverError(
                f"training stopped at relative stationarity residual {info.residual:.2e} after {info.steps} "
                f"Newton steps (tolerance {train_cfg.resolved_tol():.0e}): raise lam or max_newton"
            )
        theta = model.theta_p + model.vjp(x, alpha)
        log.info("trained: %d Newton steps, %d CG iterations, residual %.2e, %.2f s", info.steps, info.cg_iterations, info.residual, info.seconds)
        meta = {
            "dataset": {
                "name": dataset.name,
                "task": dataset.task,
                "output_dim": dataset.output_dim,
                "input_shape": list(dataset.input_shape),
                "n_initial": dataset.n,
            },
            "model": model_cfg.to_dict(),
            "train": train_cfg.to_dict(),
            "solver": solver_cfg.to_dict(),
            "ntk": {"seconds": report["seconds"], "bytes": report["bytes"], "cached": report["cached"]},
        }
        history = ({"version": 0, "n_forgotten": 0, "time": time.time(), "train": info.as_solve_info().to_dict(), "newton_steps": info.steps},)
        state = ModelState(0, np.asarray(dataset.ids, dtype=str), x, y, k, form, f0, alpha, theta, info.residual, (), history, meta)
        return cls(state, model, cache_dir)

    @classmethod
    def restore(cls, checkpoint_dir: Path) -> Unlearner | None:
        """The newest complete checkpoint under ``checkpoint_dir`` (no retraining), or ``None``."""
        state = checkpoint.restore(checkpoint_dir)
        if state is None:
            return None
        train_cfg = TrainConfig.from_dict(state.meta["train"])
        dtype = _dtype(train_cfg.dtype)
        ds = state.meta["dataset"]
        model = build_model(ModelConfig.from_dict(state.meta["model"]), tuple(ds["input_shape"]), ds["output_dim"], dtype)
        return cls(state, model)

    def save(self, checkpoint_dir: Path) -> None:
        """Checkpoint the current version (atomic; older versions are deleted)."""
        checkpoint.save(checkpoint_dir, self._state)

    # -- read side ----------------------------------------------------------------------------
    @property
    def state(self) -> ModelState:
        return self._state

    @property
    def model(self) -> Model:
        return self._model

    @property
    def version(self) -> int:
        return self._state.version

    @property
    def n_train(self) -> int:
        return self._state.n

    @property
    def n_forgotten(self) -> int:
        return len(self._state.forgotten)

    @property
    def output_dim(self) -> int:
        return int(self._state.meta["dataset"]["output_dim"])

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self._state.meta["dataset"]["input_shape"])

    @property
    def task(self) -> str:
        return self._state.meta["dataset"]["task"]

    @property
    def train_config(self) -> TrainConfig:
        return TrainConfig.from_dict(self._state.meta["train"])

    @property
    def solver_config(self) -> SolverConfig:
        return SolverConfig.from_dict(self._state.meta["solver"])

    def active_ids(self) -> list[str]:
        return self._state.ids.tolist()

    def forgotten_ids(self) -> frozenset[str]:
        return frozenset(self._state.forgotten)

    def info(self) -> dict[str, Any]:
        """The fields of ``GET /v1/model`` (design.md), plus the configuration and certificate."""
        st = self._state
        train = self.train_config
        return {
            "version": st.version,
            "n_train": st.n,
            "n_forgotten": len(st.forgotten),
            "output_dim": self.output_dim,
            "n_params": self._model.n_params,
            "loss": train.loss,
            "lambda": train.lam,
            "kernel": {
                "shape": list(st.k.shape),
                "form": st.form,
                "exact": st.form == "full" or self._model.config.kind == "linear",
                "bytes": int(st.k.nbytes),
                "dtype": str(st.k.dtype),
                "devices": [str(dev) for dev in st.k.devices()],
            },
            "model": self._model.config.to_dict(),
            "dataset": st.meta["dataset"],
            "dtype": train.dtype,
            "residual": st.residual,
        }

    def _inputs(self, x) -> jax.Array:
        try:
            arr = np.asarray(x, dtype=np.float64)
        except (TypeError, ValueError) as exc:
            raise InvalidInputError(f"x must be a numeric array: {exc}") from None
        shape = self.input_shape
        flat = int(np.prod(shape))
        if arr.ndim < 2 or arr.shape[0] == 0:
            raise InvalidInputError(f"x must be a non-empty list of rows, each of shape {list(shape)} or {flat} values")
        if arr.shape[1:] != shape and arr.shape[1:] != (flat,):
            raise InvalidInputError(
                f"x rows have shape {list(arr.shape[1:])}; expected {list(shape)} (or {flat} values flattened)"
            )
        if not np.all(np.isfinite(arr)):
            raise InvalidInputError("x has NaN or infinite values")
        return jnp.asarray(arr.reshape((arr.shape[0],) + shape), self._dtype)

    def validate_targets(self, y, n: int) -> jax.Array:
        """Targets for ``n`` test points: class labels ``(n,)`` or target vectors ``(n, d)``.

        Returns the target matrix ``(n, d)``. Raises ``InvalidInputError`` with what to fix.
        """
        d = self.output_dim
        try:
            arr = np.asarray(y, dtype=np.float64)
        except (TypeError, ValueError) as exc:
            raise InvalidInputError(f"y must be numeric: {exc}") from None
        if arr.shape[:1] != (n,):
            raise InvalidInputError(f"y has {arr.shape[0] if arr.ndim else 0} entries; x has {n} rows")
        if not np.all(np.isfinite(arr)):
            raise InvalidInputError("y has NaN or infinite values")
        if self.task == "classification":
            if arr.ndim != 1 or np.any(arr != np.round(arr)) or np.any(arr < 0) or np.any(arr >= d):
                raise InvalidInputError(f"y must be class labels: integers in [0, {d - 1}], one per row of x")
            return jnp.asarray(targets_matrix(arr.astype(np.int64), "classification", d), self._dtype)
        if arr.shape != (n, d):
            raise InvalidInputError(f"y must have shape [{n}, {d}] (one target vector per row of x)")
        return jnp.asarray(arr, self._dtype)

    def predict(self, x) -> np.ndarray:
        """Outputs f_lin(x; θ) of the current version; x ``(n, *input_shape)`` or flattened → ``(n, d)``.

        Raises:
          InvalidInputError: wrong shape, empty, NaN or infinite values.
        """
        state = self._state
        return np.asarray(self._predict(state.theta, self._inputs(x)))

    def predict_with_version(self, x) -> tuple[int, np.ndarray]:
        """``(version, outputs)`` from one consistent state."""
        state = self._state
        return state.version, np.asarray(self._predict(state.theta, self._inputs(x)))

    # -- forget set validation ----------------------------------------------------------------
    def validate_forget(self, ids: Sequence[str], pending: frozenset[str] = frozenset()) -> None:
        """Check a forget request against the current version and the ids already queued.

        Raises:
          InvalidForgetSetError: empty, not strings, duplicated, or would leave no training point.
          UnknownIdsError: ids that were never in the training set.
          AlreadyForgottenError: ids forgotten already or in ``pending``.
        """
        state = self._state
        if not isinstance(ids, (list, tuple)) or len(ids) == 0:
            raise InvalidForgetSetError("ids must be a non-empty list of training ids")
        if not all(isinstance(i, str) for i in ids):
            raise InvalidForgetSetError("ids must be strings (the data set's record ids, not positions)")
        seen, dup = set(), []
        for i in ids:
            if i in seen and i not in dup:
                dup.append(i)
            seen.add(i)
        if dup:
            raise InvalidForgetSetError(f"ids are duplicated: {', '.join(dup[:20])}. List each id once.")
        active = self._index(state)
        forgotten = set(state.forgotten)
        unknown = [i for i in ids if i not in active and i not in forgotten]
        if unknown:
            raise UnknownIdsError(unknown, "Use GET /v1/ids for the active training ids.")
        gone = [i for i in ids if i in forgotten or i in pending]
        if gone:
            raise AlreadyForgottenError(gone)
        remaining = state.n - len(set(ids) | (set(pending) & set(active)))
        if remaining < 1:
            raise InvalidForgetSetError(
                f"forgetting these {len(ids)} ids (with {len(pending)} queued) would remove every remaining "
                "training point; at least one must remain"
            )

    def _index(self, state: ModelState) -> dict[str, int]:
        cached = getattr(self, "_index_cache", None)
        if cached is not None and cached[0] is state:
            return cached[1]
        index = {i: p for p, i in enumerate(state.ids.tolist())}
        self._index_cache = (state, index)
        return index

    def _mask(self, state: ModelState, ids: Sequence[str]) -> jax.Array:
        index = self._index(state)
        mask = np.zeros(state.n, bool)
        mask[[index[i] for i in ids]] = True
        return jnp.asarray(mask)

    def _problem(self, state: ModelState) -> DualProblem:
        train = self.train_config
        return DualProblem(state.k, state.form, state.f0, state.y, jnp.ones(state.n, bool), train.lam, train.loss)

    @staticmethod
    def _solver_kwargs(cfg: SolverConfig, dtype: str) -> dict:
        return {
            "method": cfg.method,
            "tol": cfg.resolved_tol(dtype),
            "max_iter": cfg.max_iter,
            "cholesky_max_dim": cfg.cholesky_max_dim,
        }

    # -- estimates ----------------------------------------------------------------------------
    def influence(self, forget_ids: Sequence[str], x, y, refine: bool = False) -> InfluenceResult:
        """Δf and Δℓ at test points if ``forget_ids`` were removed (Eqs. 8–9); the model does not change.

        Arguments:
          forget_ids: active ids (hypothetical forget set).
          x: test inputs ``(n, *input_shape)``; y: labels ``(n,)`` or targets ``(n, d)``.
          refine: use the refined retain optimum instead of the single influence step.

        Raises:
          InvalidForgetSetError, UnknownIdsError, AlreadyForgottenError, InvalidInputError, SolverError.
        """
        state = self._state
        self._validate_against(state, forget_ids)
        xt = self._inputs(x)
        yt = self.validate_targets(y, xt.shape[0])
        train = self.train_config
        solver_cfg = self.solver_config
        kwargs = self._solver_kwargs(solver_cfg, train.dtype)
        problem = self._problem(state)
        mask = self._mask(state, forget_ids)
        if refine:
            deletion = influence.forget(problem, state.alpha, mask, kwargs, True, train.resolved_tol(), solver_cfg.max_refine)
            delta, info = deletion.delta_alpha, deletion.step
        else:
            delta, info = influence.influence_step(problem, state.alpha, mask, kwargs)
        if not info.converged:
            raise SolverError(f"influence solve stopped at relative residual {info.residual:.2e}: raise max_iter")
        dtheta = influence.delta_theta(self._model, state.x, delta)
        df, dl = influence.test_point_changes(self._model, state.theta, dtheta, xt, yt, train.loss)
        return InfluenceResult(state.version, np.asarray(df), np.asarray(dl), info)

    def _validate_against(self, state: ModelState, ids: Sequence[str]) -> None:
        if state is not self._state:
            raise RuntimeError("state changed during validation")
        self.validate_forget(ids)

    # -- deletion -----------------------------------------------------------------------------
    def forget(self, ids: Sequence[str], checkpoint_dir: Path | None = None) -> ForgetResult:
        """Remove ``ids``: influence step (A), refinement, Δθ = J(X)ᵀΔα, then checkpoint, then publish.

        Nothing is published unless every solve converged and the checkpoint (if asked) is complete.

        Raises:
          InvalidForgetSetError, UnknownIdsError, AlreadyForgottenError: bad request (model unchanged).
          SolverError: a solve missed its tolerance (model unchanged).
          OSError: the checkpoint could not be written (model unchanged).
        """
        t0 = time.perf_counter()
        with self._forget_lock:
            state = self._state
            self.validate_forget(ids)
            train = self.train_config
            solver_cfg = self.solver_config
            kwargs = self._solver_kwargs(solver_cfg, train.dtype)
            mask = self._mask(state, ids)
            deletion = influence.forget(
                self._problem(state), state.alpha, mask, kwargs, solver_cfg.refine, train.resolved_tol(), solver_cfg.max_refine
            )
            if not deletion.step.converged:
                raise SolverError(
                    f"influence solve stopped at relative residual {deletion.step.residual:.2e} after "
                    f"{deletion.step.iterations} iterations: raise max_iter or use method 'cholesky'"
                )
            if deletion.refine is not None and not deletion.refine.converged:
                raise SolverError(
                    f"refinement stopped at relative stationarity residual {deletion.refine.residual:.2e} "
                    f"(tolerance {train.resolved_tol():.0e}): raise max_refine"
                )
            dtheta = influence.delta_theta(self._model, state.x, deletion.delta_alpha)
            keep = np.flatnonzero(~np.asarray(mask))
            refine_info = deletion.refine.as_solve_info() if deletion.refine is not None else None
            new_state = ModelState(
                version=state.version + 1,
                ids=state.ids[keep],
                x=state.x[keep],
                y=state.y[keep],
                k=jnp.asarray(select(state.k, keep, self.output_dim, state.form)),
                form=state.form,
                f0=state.f0[keep],
                alpha=deletion.alpha[keep],
                theta=state.theta + dtheta,
                residual=deletion.residual,
                forgotten=state.forgotten + tuple(ids),
                history=state.history
                + (
                    {
                        "version": state.version + 1,
                        "n_forgotten": len(ids),
                        "time": time.time(),
                        "solve": deletion.step.to_dict(),
                        "refine": refine_info.to_dict() if refine_info else None,
                        "residual": deletion.residual,
                    },
                ),
                meta=state.meta,
            )
            if checkpoint_dir is not None:
                checkpoint.save(checkpoint_dir, new_state)
            self._state = new_state
            purge_cache(self._cache_dir)
        return ForgetResult(new_state.version, deletion.step, refine_info, deletion.residual, time.perf_counter() - t0)
