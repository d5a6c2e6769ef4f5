"""``Unlearner``: the façade the service (and any library user) drives.

It owns one immutable ``ModelState`` at a time. Reads take the current state by reference and
never see a half-applied deletion; ``forget`` computes the next version, checkpoints it, and only
then publishes it by swapping the reference.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from . import attribution, checkpoint, influence, losses, sharding
from .config import ModelConfig, SolverConfig, TrainConfig
from .data import Dataset, targets_matrix
from .errors import (
    AlreadyForgottenError,
    InvalidForgetSetError,
    InvalidInputError,
    SolverError,
    UnknownIdsError,
)
from .infinite import KernelModel
from .models import Model, build_model
from .ntk import cached_ntk, cross_ntk, kernel_matvec, purge_cache
from .solvers import SolveInfo, canonical_method, choose_method, largest_eigenvalue, nystrom
from .state import ModelState, bucket, pad_rows
from .training import DualProblem, kernel_gradient_descent, newton, stationarity

log = logging.getLogger(__name__)


class ForgetResult(NamedTuple):
    """Outcome of an applied deletion.

    Attributes:
      version: the new model version.
      solve: the influence solve of system (A) (or of θ-space for ``theta-cg``).
      refine: Newton refinement on the retain risk (``None`` if not run).
      residual: relative stationarity residual of the new version.
      seconds: wall time of the whole deletion, checkpoint included.
      reason: why this solver method was used (the ``auto`` cost model, or "configured").
      refine_cg_iterations: CG iterations of the refinement's inner solves, summed (0 if none).
      timings: seconds per part of ``plan_forget``: ``validate``, ``compact`` (K_RR and the
        preconditioner gathered, or F erased in place), ``rhs`` (system (A)'s right-hand side),
        ``solve``, ``delta`` (Δθ = J(X)ᵀΔα, or α of the θ-space answer), ``refine``, ``residual``
        (f and the stationarity certificate of the new version).
    """

    version: int
    solve: SolveInfo
    refine: SolveInfo | None
    residual: float
    seconds: float
    reason: str = ""
    refine_cg_iterations: int = 0
    timings: dict | None = None


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


class Unlearner:
    """A trained linearised network in dual form that forgets on request.

    Build with ``Unlearner.build`` (trains version 0) or ``Unlearner.restore`` (from checkpoints).
    """

    def __init__(self, state: ModelState, model: Model, cache_dir: Path | None = None, mesh=None):
        self._mesh = mesh
        self._state = state
        self._model = model
        self._cache_dir = cache_dir
        self._forget_lock = threading.RLock()
        self._infinite = isinstance(model, KernelModel)
        self._spare: jax.Array | None = None
        if self._infinite:  # no θ: predictions and Eq. 8 go through kernels (math.md, Eq. 14)
            self._dtype = model.dtype
        else:
            self._dtype = model.theta0.dtype
            self._predict = jax.jit(model.f_lin)
            self._vjp = jax.jit(model.vjp)
        self.ready_next_deletion()

    def ready_next_deletion(self) -> float:
        """Make the spare K buffer the next deletion erases K into (``SolverConfig.spare_kernel``).

        The engine calls it after build, restore and each published deletion, off the deletion's
        latency; a benchmark that plans without publishing calls it between timed calls. No-op
        when turned off, sharded over several devices, or already there.

        Returns:
          seconds spent (the operating system mapping and zeroing K's bytes once).
        """
        with self._forget_lock:  # not while a deletion is planned (it may take the spare)
            k = self._state.k
            if not self.solver_config.spare_kernel or (
                self._mesh is not None and self._mesh.size > 1
            ):
                self._spare = None
                return 0.0
            if (
                self._spare is not None
                and self._spare.shape == k.shape
                and self._spare.dtype == k.dtype
            ):
                return 0.0
            t0 = time.perf_counter()
            self._spare = None  # the old one is freed before the new one is mapped
            self._spare = jax.block_until_ready(_touched(k.shape, k.dtype))
            return time.perf_counter() - t0

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
        devices: list | None = None,
        memory_budget: float = 0.6,
    ) -> Unlearner:
        """Build the model, compute (or load) its NTK, and train it to the optimum: version 0.

        Arguments:
          dataset, model_cfg, train_cfg, solver_cfg: what to build.
          cache_dir: NTK cache directory (``None``: no cache).
          progress: progress bar for the NTK.
          devices: devices K's rows are split over (default: every local device; ``sharding``).
          memory_budget: fraction of each device's memory K and the solver's working copy may use.

        Raises:
          ResourceError: K would not fit the devices (checked before computing it).
          SolverError: training did not reach ``train_cfg`` tolerance.
        """
        dtype = _dtype(train_cfg.dtype)
        model = _model(model_cfg, dataset.input_shape, dataset.output_dim, dtype)
        if model_cfg.infinite and canonical_method(solver_cfg.method) == "theta-cg":
            raise InvalidInputError(
                f"{model_cfg.kind} has no parameters: theta-cg is not available, use alpha-cg"
            )
        form = model_cfg.resolved_kernel_form()
        mesh = sharding.make_mesh(devices)
        cap = bucket(dataset.n, mesh.size)
        rows = cap * dataset.output_dim if form == "full" else cap
        plan = sharding.plan_memory(
            rows, np.dtype(dtype).itemsize, list(mesh.devices.flat), memory_budget
        )
        sharding.check_fits(
            plan, f"K for {dataset.n} points, d = {dataset.output_dim} ({form} form)"
        )
        with sharding.use_mesh(mesh):
            return cls._build(
                dataset,
                model,
                model_cfg,
                train_cfg,
                solver_cfg,
                cache_dir,
                progress,
                mesh,
                dtype,
                form,
                cap,
            )

    @classmethod
    def _build(
        cls,
        dataset,
        model,
        model_cfg,
        train_cfg,
        solver_cfg,
        cache_dir,
        progress,
        mesh,
        dtype,
        form,
        cap,
    ):
        k, report = _kernel(model, dataset.x, form, cache_dir, dtype, progress)
        log.info(
            "NTK %s form %s: %.1f MiB in %.2f s (%s)",
            form,
            k.shape,
            report["bytes"] / 2**20,
            report["seconds"],
            "cache" if report["cached"] else "computed",
        )
        n, d = dataset.n, dataset.output_dim
        x = jnp.asarray(pad_rows(dataset.x, cap), dtype)
        y = jnp.asarray(pad_rows(dataset.targets(), cap), dtype)
        rows = cap * d if form == "full" else cap
        k = sharding.place(np.pad(k, ((0, rows - k.shape[0]), (0, rows - k.shape[1]))), mesh)
        active = np.arange(cap) < n
        f0 = model.offset(x) * jnp.asarray(active, dtype)[:, None]
        lambda_max = largest_eigenvalue(k, form, cap, d)
        ny = _nystrom(k, solver_cfg, mesh, form, train_cfg.loss)
        problem = DualProblem(k, form, f0, y, jnp.asarray(active), train_cfg.lam, train_cfg.loss)
        if train_cfg.trainer == "kgd":
            alpha, info = kernel_gradient_descent(
                problem,
                jnp.zeros_like(y),
                tol=train_cfg.resolved_tol(),
                max_steps=train_cfg.max_kgd_steps,
            )
            limit = "max_kgd_steps (or use trainer newton)"
        else:
            alpha, info = newton(
                problem,
                jnp.zeros_like(y),
                train_cfg.resolved_tol(),
                train_cfg.max_newton,
                {**cls._solver_kwargs(solver_cfg, train_cfg.dtype), "nystrom": ny},
            )
            limit = "max_newton"
        if not info.converged:
            raise SolverError(
                f"training ({train_cfg.trainer}) stopped at relative stationarity residual {info.residual:.2e} after "
                f"{info.steps} steps (tolerance {train_cfg.resolved_tol():.0e})"
                + (
                    _floor_hint(info.floor, train_cfg.dtype)
                    if getattr(info, "floor", 0.0)
                    else f": raise lam or {limit}"
                )
            )
        theta = None if model_cfg.infinite else model.theta_p + model.vjp(x, alpha)
        log.info(
            "trained (%s): %d steps, residual %.2e (rounding floor %.1e), %.2f s",
            train_cfg.trainer,
            info.steps,
            info.residual,
            getattr(info, "floor", 0.0),
            info.seconds,
        )
        meta = {
            "dataset": {
                "name": dataset.name,
                "task": dataset.task,
                "output_dim": dataset.output_dim,
                "input_shape": list(dataset.input_shape),
                "n_initial": dataset.n,
            },
            "model": model_cfg.to_dict(),
            "theta0_fingerprint": _fingerprint(model),
            "train": train_cfg.to_dict(),
            "solver": solver_cfg.to_dict(),
            "ntk": {
                "seconds": report["seconds"],
                "bytes": report["bytes"],
                "cached": report["cached"],
            },
            "lambda_max": lambda_max,
        }
        history = (
            {
                "version": 0,
                "n_forgotten": 0,
                "time": time.time(),
                "train": info.as_solve_info().to_dict(),
                "steps": info.steps,
                "rounding_floor": float(getattr(info, "floor", 0.0)),
            },
        )
        ids = pad_rows(np.asarray(dataset.ids, dtype=str), cap)
        state = ModelState(
            0, ids, x, y, k, form, f0, alpha, theta, info.residual, (), history, meta, nystrom=ny
        )
        return cls(state, model, cache_dir, mesh)

    @classmethod
    def restore(
        cls,
        checkpoint_dir: Path,
        cache_dir: Path | None = None,
        progress: bool = True,
        devices: list | None = None,
    ) -> Unlearner | None:
        """The newest complete checkpoint under ``checkpoint_dir`` (no retraining), or ``None``.

        K is recomputed from the checkpointed active inputs (``checkpoint`` module docstring), or
        read from ``cache_dir`` when it holds the kernel of exactly these inputs.
        """
        state = checkpoint.restore(
            checkpoint_dir, before_arrays=lambda meta: _dtype(meta["meta"]["train"]["dtype"])
        )
        if state is None:
            return None
        dtype = _dtype(state.meta["train"]["dtype"])
        ds = state.meta["dataset"]
        d = ds["output_dim"]
        model = _model(
            ModelConfig.from_dict(state.meta["model"]), tuple(ds["input_shape"]), d, dtype
        )
        saved = state.meta.get("theta0_fingerprint")
        if (
            saved is not None
            and _fingerprint(model) is not None
            and not np.isclose(_fingerprint(model), saved, rtol=1e-6, atol=0)
        ):
            # K is recomputed from this network: a different θ0 would silently give another model
            raise SolverError(
                f"{checkpoint_dir}: the network re-initialised from its ModelConfig differs from the one the checkpoint "
                f"was trained with (‖θ0‖ {_fingerprint(model):.9g} against {saved:.9g}); restore with the jax/ntk-unlearn "
                "versions that wrote it"
            )
        mesh = sharding.make_mesh(devices)
        cap = -(-state.capacity // mesh.size) * mesh.size  # saved under another device count
        if cap != state.capacity:
            state = dataclasses.replace(
                state,
                ids=pad_rows(state.ids, cap),
                **{
                    k: pad_rows(v, cap)
                    for k, v in state.arrays().items()
                    if k not in ("k", "theta")
                },
            )
        rows = np.flatnonzero(state.active)
        k, report = _kernel(
            model, np.asarray(state.x)[rows], state.form, cache_dir, dtype, progress
        )
        if state.form == "full":
            rows = (rows[:, None] * d + np.arange(d)).ravel()
        side = state.capacity * d if state.form == "full" else state.capacity
        full = np.zeros((side, side), dtype=k.dtype)
        full[np.ix_(rows, rows)] = k
        log.info(
            "restored version %d: K %s recomputed in %.2f s",
            state.version,
            full.shape,
            report["seconds"],
        )
        k = sharding.place(full, mesh)
        ny = _nystrom(
            k,
            SolverConfig.from_dict(state.meta["solver"]),
            mesh,
            state.form,
            state.meta["train"]["loss"],
        )
        return cls(dataclasses.replace(state, k=k, nystrom=ny), model, cache_dir, mesh)

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
        return self._state.active_ids()

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
                "capacity": st.capacity,
                "form": st.form,
                "exact": st.form == "full" or self._model.config.kind == "linear" or self._infinite,
                "bytes": int(st.k.nbytes),
                "dtype": str(st.k.dtype),
                "devices": [str(dev) for dev in st.k.devices()],
                "bytes_per_device": sharding.bytes_per_device(st.k),
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
            raise InvalidInputError(
                f"x must be a non-empty list of rows, each of shape {list(shape)} or {flat} values"
            )
        if arr.shape[1:] != shape and arr.shape[1:] != (flat,):
            raise InvalidInputError(
                f"x rows have shape {list(arr.shape[1:])}; expected {list(shape)} (or {flat} values flattened)"
            )
        if not np.all(np.isfinite(arr)):
            raise InvalidInputError("x has NaN or infinite values")
        limit = float(jnp.finfo(self._dtype).max) ** 0.5  # headroom for the network's products
        if np.max(np.abs(arr)) > limit:
            raise InvalidInputError(
                f"x has values beyond ±{limit:.1e}, too large for the model's {jnp.dtype(self._dtype).name}"
            )
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
            raise InvalidInputError(
                f"y has {arr.shape[0] if arr.ndim else 0} entries; x has {n} rows"
            )
        if not np.all(np.isfinite(arr)):
            raise InvalidInputError("y has NaN or infinite values")
        if self.task == "classification":
            if arr.ndim != 1 or np.any(arr != np.round(arr)) or np.any(arr < 0) or np.any(arr >= d):
                raise InvalidInputError(
                    f"y must be class labels: integers in [0, {d - 1}], one per row of x"
                )
            return jnp.asarray(
                targets_matrix(arr.astype(np.int64), "classification", d), self._dtype
            )
        if arr.shape != (n, d):
            raise InvalidInputError(
                f"y must have shape [{n}, {d}] (one target vector per row of x)"
            )
        return jnp.asarray(arr, self._dtype)

    def predict(self, x) -> np.ndarray:
        """Outputs f_lin(x; θ) of the current version; x ``(n, *input_shape)`` or flattened → ``(n, d)``.

        Raises:
          InvalidInputError: wrong shape, empty, NaN or infinite values.
        """
        return self.predict_with_version(x)[1]

    def predict_with_version(self, x) -> tuple[int, np.ndarray]:
        """``(version, outputs)`` from one consistent state."""
        state = self._state
        return state.version, self._outputs(state, self._inputs(x))

    def _outputs(self, state: ModelState, x: jax.Array) -> np.ndarray:
        """f_lin(x; θ), or f(x) = K(x, X) α without θ (infinite width; f_0 = 0).

        Raises:
          InvalidInputError: inputs so large that the outputs overflow.
        """
        if self._infinite:
            out = self._kernel_apply(state, x, state.alpha)
        else:
            out = np.asarray(self._predict(state.theta, x))
        if not np.all(np.isfinite(out)):
            raise InvalidInputError(
                "x is too large: the model's outputs overflow; scale inputs like the training data"
            )
        return out

    def _kernel_apply(self, state: ModelState, x: jax.Array, alpha: jax.Array) -> np.ndarray:
        """K(x, X_active) α_active, ``(n, d)`` (Eq. 8 with α := Δα)."""
        rows = np.flatnonzero(state.active)
        k_tx = self._model.cross_kernel(np.asarray(x), np.asarray(state.x)[rows])
        return np.asarray(self._model.offset(x)) + k_tx @ np.asarray(alpha)[rows]

    # -- forget set validation ----------------------------------------------------------------
    def validate_forget(
        self,
        ids: Sequence[str],
        pending: frozenset[str] = frozenset(),
        state: ModelState | None = None,
    ) -> None:
        """Check a forget request against a version (default: the current one) and the ids queued.

        Raises:
          InvalidForgetSetError: empty, not strings, duplicated, or would leave no training point.
          UnknownIdsError: ids that were never in the training set.
          AlreadyForgottenError: ids forgotten already or in ``pending``.
        """
        state = self._state if state is None else state
        if not isinstance(ids, (list, tuple)) or len(ids) == 0:
            raise InvalidForgetSetError("ids must be a non-empty list of training ids")
        if not all(isinstance(i, str) for i in ids):
            raise InvalidForgetSetError(
                "ids must be strings (the data set's record ids, not positions)"
            )
        seen, dup = set(), []
        for i in ids:
            if i in seen and i not in dup:
                dup.append(i)
            seen.add(i)
        if dup:
            raise InvalidForgetSetError(
                f"ids are duplicated: {', '.join(dup[:20])}. List each id once."
            )
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
        index = {i: p for p, i in enumerate(state.ids.tolist()) if i}
        self._index_cache = (state, index)
        return index

    def _mask(self, state: ModelState, ids: Sequence[str]) -> jax.Array:
        index = self._index(state)
        mask = np.zeros(state.capacity, bool)
        mask[[index[i] for i in ids]] = True
        return jnp.asarray(mask)

    def _problem(self, state: ModelState) -> DualProblem:
        train = self.train_config
        return DualProblem(
            state.k, state.form, state.f0, state.y, jnp.asarray(state.active), train.lam, train.loss
        )

    @staticmethod
    def _solver_kwargs(cfg: SolverConfig, dtype: str, method: str | None = None) -> dict:
        return {
            "method": canonical_method(method or cfg.method),
            "tol": cfg.resolved_tol(dtype),
            "max_iter": cfg.max_iter,
            "cholesky_max_dim": cfg.cholesky_max_dim,
        }

    def choose_solver(self, n_retain: int, method: str | None = None) -> tuple[str, str]:
        """The solver method for a forget set leaving ``n_retain`` points, and why.

        ``auto`` asks ``solvers.choose_method`` (flop-count cost model with κ bounded by λ_max of K,
        computed at build time); any other configured method is used as is.
        """
        state = self._state
        cfg = self.solver_config
        method = canonical_method(method or cfg.method)
        if method != "auto":
            return method, f"{method}: configured"
        train = self.train_config
        w_max = 1.0 if train.loss == "mse" else 0.5
        top = state.meta.get("lambda_max", float("inf"))
        kappa_theta = 1.0 + top * w_max / (train.lam * n_retain)  # θ-space CG is not preconditioned
        if (
            state.nystrom is not None
        ):  # preconditioned: about the first eigenvalue the approximation leaves out
            top = float(state.nystrom.lam[-1])
        kappa = 1.0 + top * w_max / (train.lam * n_retain)
        est = choose_method(
            n_retain,
            self.output_dim,
            state.form,
            train.loss != "mse",
            self._model.n_params,
            kappa,
            cfg.resolved_tol(train.dtype),
            cfg.cholesky_max_dim,
            kappa_theta,
        )
        return est.method, est.reason

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
        with sharding.use_mesh(self._mesh):
            return self._influence(forget_ids, x, y, refine)

    def _influence(self, forget_ids, x, y, refine):
        state = (
            self._state
        )  # one snapshot: a deletion published meanwhile does not affect this estimate
        self.validate_forget(forget_ids, state=state)
        xt = self._inputs(x)
        yt = self.validate_targets(y, xt.shape[0])
        train = self.train_config
        solver_cfg = self.solver_config
        kwargs = self._solver_kwargs(solver_cfg, train.dtype)
        problem = self._problem(state)
        mask = self._mask(state, forget_ids)
        method, _ = self.choose_solver(state.n - len(forget_ids))
        if method == "theta-cg":  # estimates need Δα; the α-space step gives the same Δθ
            method = "alpha-cg"
        kwargs = {**self._solver_kwargs(solver_cfg, train.dtype, method), "nystrom": state.nystrom}
        if refine:
            deletion = influence.forget(
                problem,
                state.alpha,
                mask,
                kwargs,
                True,
                train.resolved_tol(),
                solver_cfg.max_refine,
            )
            delta, info = deletion.delta_alpha, deletion.step
        else:
            delta, info = influence.influence_step(
                problem, state.alpha, mask, kwargs, self._f_star(state)
            )
        if not info.converged:
            raise SolverError(_not_converged(info, solver_cfg.max_iter, train.dtype))
        if self._infinite:
            df = self._kernel_apply(state, xt, delta) - np.asarray(self._model.offset(xt))
            g = losses.grad(train.loss, jnp.asarray(self._outputs(state, xt)), yt)
            df, dl = jnp.asarray(df), jnp.sum(g * df, axis=-1)
        else:
            dtheta = self._vjp(state.x, delta)
            df, dl = influence.test_point_changes(
                self._model, state.theta, dtheta, xt, yt, train.loss
            )
        return InfluenceResult(state.version, np.asarray(df), np.asarray(dl), info)

    # -- deletion -----------------------------------------------------------------------------
    def forget(
        self, ids: Sequence[str], checkpoint_dir: Path | None = None, ready_next: bool = True
    ) -> ForgetResult:
        """Remove ``ids``: influence step (A), refinement, Δθ = J(X)ᵀΔα, then checkpoint, then publish.

        Nothing is published unless every solve converged and the checkpoint (if asked) is complete.
        After publishing, the Nyström preconditioner is recomputed from the new K and, unless
        ``ready_next`` is false (a caller that reports the deletion first and then calls
        ``ready_next_deletion`` itself), the spare K buffer is made.

        Raises:
          InvalidForgetSetError, UnknownIdsError, AlreadyForgottenError: bad request (model unchanged).
          SolverError: a solve missed its tolerance (model unchanged).
          OSError: the checkpoint could not be written (model unchanged).
        """
        t0 = time.perf_counter()
        with self._forget_lock:
            new_state, result = self.plan_forget(ids)
            if checkpoint_dir is not None:
                checkpoint.save(checkpoint_dir, new_state)
            self._state = new_state
            purge_cache(self._cache_dir)
            seconds = time.perf_counter() - t0
            if new_state.nystrom is not None and self.solver_config.nystrom_refresh:
                # published already; from here on nothing derived from the forgotten points remains
                with sharding.use_mesh(self._mesh):
                    self._state = dataclasses.replace(
                        new_state,
                        nystrom=_nystrom(
                            new_state.k,
                            self.solver_config,
                            self._mesh,
                            new_state.form,
                            self.train_config.loss,
                        ),
                    )
            del new_state
            if ready_next:
                self.ready_next_deletion()
        return result._replace(seconds=seconds)

    def plan_forget(
        self, ids: Sequence[str], method: str | None = None, refine: bool | None = None
    ) -> tuple[ModelState, ForgetResult]:
        """The next version without ``ids``, computed but not published (dry runs, benchmarks).

        Arguments:
          ids: active ids to forget.
          method: solver method overriding the configured one (``solvers.METHODS``).
          refine: overrides the configured refinement.

        Returns:
          ``(new_state, ForgetResult)``; ``seconds`` is the compute time.

        Raises:
          as ``forget``.
        """
        with (
            self._forget_lock,
            sharding.use_mesh(self._mesh),
        ):  # one plan at a time: it may take the spare K
            return self._plan_forget(ids, method, refine)

    def _plan_forget(self, ids, method, refine):
        t0 = time.perf_counter()
        timings: dict[str, float] = {}
        clock = [t0]

        def lap(name: str, *arrays):
            """Seconds of the part just done (its arrays computed, not just dispatched)."""
            jax.block_until_ready(arrays)
            now = time.perf_counter()
            timings[name] = timings.get(name, 0.0) + now - clock[0]
            clock[0] = now

        state = self._state
        self.validate_forget(ids, state=state)
        train = self.train_config
        solver_cfg = self.solver_config
        refine = solver_cfg.refine if refine is None else refine
        mask = self._mask(state, ids)
        retain = jnp.asarray(state.active) & ~mask
        n_retain = state.n - len(ids)
        method, reason = self.choose_solver(n_retain, method)
        if method == "theta-cg" and self._infinite:
            raise InvalidInputError(
                f"{self._model.config.kind} has no parameters: theta-cg is not available, use alpha-cg"
            )
        kwargs = self._solver_kwargs(solver_cfg, train.dtype, method)
        problem = self._problem(state)
        lap("validate")
        # The retained points first, compacted into their capacity bucket (or F erased in place):
        # every solve below runs on K_RR, so its cost scales with N_R, not with the N it started from.
        shell, rows = self._without(state, mask)
        new_mask = jnp.asarray(shell.active)
        new_problem = DualProblem(
            shell.k, state.form, shell.f0, shell.y, new_mask, train.lam, train.loss
        )
        lap("compact", shell.k)
        if method == "theta-cg":
            dtheta, step = influence.theta_space_delta(
                self._model,
                state.theta,
                state.x,
                state.y,
                mask,
                train.lam,
                train.loss,
                kwargs["tol"],
                kwargs["max_iter"],
                retain_mask=retain,
            )
            theta_step = state.theta + dtheta
            lap("solve", theta_step)
            # α of the θ-space answer: α_R = −g_R / (λ N_R) at its outputs (math.md, optimality)
            out = self._predict(theta_step, shell.x)
            alpha_step = (
                -losses.grad(train.loss, out, shell.y) * new_mask[:, None] / (train.lam * n_retain)
            )
            lap("delta", alpha_step)
        else:
            f_star = self._f_star(state)
            k_rf_alpha_f = None
            # K_RF α*_F: from the N_F·d rows K[F, :] (read and copied), or as (K α*)_R − K_RR α*_R with
            # one pass over the compacted K_RR, whichever touches fewer bytes
            if n_retain**2 <= 2 * state.n * len(ids):
                k_rr_alpha_r = kernel_matvec(shell.k, shell.alpha, state.form)
                spread = np.zeros(state.alpha.shape, np.asarray(k_rr_alpha_r).dtype)
                spread[rows] = np.asarray(k_rr_alpha_r)[: len(rows)]
                k_rf_alpha_f = (f_star - state.f0) - jnp.asarray(spread)
            system = influence.retain_system(problem, state.alpha, mask, f_star, k_rf_alpha_f)
            lap("rhs", system.b)
            kwargs["nystrom"] = shell.nystrom
            delta_r, step = influence.solve_retain(
                shell.k, state.form, system.take(rows, shell.capacity), new_mask, kwargs
            )
            alpha_step = shell.alpha + delta_r
            lap("solve", alpha_step)
            theta_step = None
            if not self._infinite:  # Δθ = J(X)ᵀΔα over D, with Δα_F = −α*_F (math.md)
                m_f = mask[:, None].astype(self._dtype)
                spread = np.zeros(state.alpha.shape, np.asarray(delta_r).dtype)
                spread[rows] = np.asarray(delta_r)[: len(rows)]
                delta = jnp.asarray(spread) - state.alpha * m_f
                theta_step = state.theta + self._vjp(state.x, delta)
            lap("delta", theta_step)
        if not step.converged:
            raise SolverError(_not_converged(step, solver_cfg.max_iter, train.dtype))
        refine_info = None
        alpha_new, theta_new = alpha_step, theta_step
        if refine:
            refine_kwargs = {
                **self._solver_kwargs(solver_cfg, train.dtype, "auto"),
                "nystrom": shell.nystrom,
            }
            change = None
            if (
                train.loss != "mse"
            ):  # ‖Δα‖, F's part −α*_F included: refine until α's error is small against it
                m_f = mask[:, None].astype(self._dtype)
                change = float(
                    jnp.sqrt(
                        jnp.sum((alpha_step - shell.alpha) ** 2) + jnp.sum((state.alpha * m_f) ** 2)
                    )
                )
            alpha_new, refined = newton(
                new_problem,
                alpha_step,
                train.resolved_tol(),
                solver_cfg.max_refine,
                refine_kwargs,
                change,
            )
            if not refined.converged:
                raise SolverError(
                    f"refinement stopped at relative stationarity residual {refined.residual:.2e} "
                    f"(tolerance {train.resolved_tol():.0e})"
                    + (
                        ": raise max_refine"
                        if refined.steps >= solver_cfg.max_refine
                        else f" after {refined.steps} Newton step(s)"
                    )
                    + _floor_hint(refined.floor, train.dtype)
                )
            if not self._infinite and (refined.steps or method == "theta-cg"):
                # θ = θ_p + J(X)ᵀα (math.md, Dual representation) for the refined α; the θ-space
                # step's own θ need not lie on that map when it is not optimal (cross-entropy)
                theta_new = self._model.theta_p + self._vjp(shell.x, alpha_new)
            refine_info = refined.as_solve_info()
            lap("refine", alpha_new, theta_new)
        f_new = shell.f0 + kernel_matvec(
            shell.k, alpha_new * new_mask[:, None].astype(self._dtype), state.form
        )
        _, residual = stationarity(
            new_problem, alpha_new, f_new
        )  # the published version's certificate
        lap("residual")
        new_state = dataclasses.replace(
            shell,
            alpha=alpha_new,
            theta=theta_new,
            f_star=f_new,
            version=state.version + 1,
            residual=residual,
            forgotten=state.forgotten + tuple(ids),
            history=state.history
            + (
                {
                    "version": state.version + 1,
                    "n_forgotten": len(ids),
                    "time": time.time(),
                    "solve": step.to_dict(),
                    "reason": reason,
                    "refine": refine_info.to_dict() if refine_info else None,
                    "refine_cg_iterations": refined.cg_iterations if refine_info else 0,
                    "rounding_floor": float(refined.floor) if refine_info else 0.0,
                    "residual": residual,
                },
            ),
        )
        result = ForgetResult(
            new_state.version,
            step,
            refine_info,
            residual,
            time.perf_counter() - t0,
            reason,
            refined.cg_iterations if refine_info else 0,
            timings,
        )
        return new_state, result

    def _f_star(self, state: ModelState) -> jax.Array:
        """The trained outputs f* = f_0 + K α* of ``state`` (kept in the state after a deletion,
        computed once after build or restore)."""
        if state.f_star is not None:
            return state.f_star
        cached = getattr(self, "_f_star_cache", None)
        if cached is not None and cached[0] is state:
            return cached[1]
        m = jnp.asarray(state.active, self._dtype)[:, None]
        f = state.f0 + kernel_matvec(state.k, state.alpha * m, state.form)
        self._f_star_cache = (state, f)
        return f

    def _without(self, state: ModelState, forget: jax.Array) -> tuple[ModelState, np.ndarray]:
        """``state`` with the rows of ``forget`` erased, and where each row came from.

        While the capacity bucket still fits (or, with a spare K buffer, the smaller bucket would
        keep ``_ERASE_MIN_FILL`` of K's entries), rows of F are zeroed in place (``rows`` is the
        identity; K is written into the spare when there is one); else every array is compacted
        into the smaller bucket and row i of the result is row ``rows[i]`` of ``state``. α keeps α*
        on the retained rows (the caller adds Δα_R), θ and f* are left for the caller.
        """
        d = self.output_dim
        keep = state.active & ~np.asarray(forget)
        n_keep = int(keep.sum())
        cap = bucket(n_keep, self._mesh.size if self._mesh is not None else 1)
        spare = (
            self._spare
            if self._spare is not None
            and self._spare.shape == state.k.shape
            and self._spare.dtype == state.k.dtype
            else None
        )
        if cap == state.capacity or (
            spare is not None and cap * cap >= _ERASE_MIN_FILL * state.capacity**2
        ):
            if (
                spare is not None
            ):  # written into memory that is mapped already (SolverConfig.spare_kernel)
                self._spare = None
                k = _erase_into(spare, state.k, jnp.asarray(keep), state.form == "full", d)
            else:
                k = _erase(state.k, jnp.asarray(keep), state.form == "full", d)
            m = jnp.asarray(keep, state.x.dtype)
            x = state.x * m.reshape((-1,) + (1,) * (state.x.ndim - 1))
            shell = dataclasses.replace(
                state,
                ids=np.where(keep, state.ids, ""),
                x=x,
                y=state.y * m[:, None],
                k=k,
                f0=state.f0 * m[:, None],
                alpha=state.alpha * m[:, None],
                f_star=None,
                nystrom=None
                if state.nystrom is None
                else state.nystrom.mask_rows(
                    jnp.repeat(jnp.asarray(keep), d) if state.form == "full" else jnp.asarray(keep)
                ),
            )
            return shell, np.arange(state.capacity)
        self._spare = (
            None  # its shape will not fit the new K: freed first, so that K, the new K and
        )
        # the solver's working set stay within the memory plan's two copies of K
        del spare
        rows = np.flatnonzero(keep)
        krows = (rows[:, None] * d + np.arange(d)).ravel() if state.form == "full" else rows
        kside = cap * d if state.form == "full" else cap
        if self._mesh is None or self._mesh.size == 1:
            k = _compact(state.k, jnp.asarray(krows), kside)
        else:  # XLA's sharded gather fails its HLO verifier on the takes (jax 0.5.3)
            block = state.k[np.ix_(krows, krows)]
            k = jnp.zeros((kside, kside), state.k.dtype).at[: len(krows), : len(krows)].set(block)
        k = sharding.place(k, self._mesh)
        shell = dataclasses.replace(
            state,
            ids=pad_rows(state.ids[rows], cap),
            x=pad_rows(state.x[rows], cap),
            y=pad_rows(state.y[rows], cap),
            k=k,
            f0=pad_rows(state.f0[rows], cap),
            alpha=pad_rows(state.alpha[rows], cap),
            f_star=None,
            nystrom=None
            if state.nystrom is None
            else _take_nystrom(state.nystrom, krows, kside, self._mesh),
        )
        return shell, rows

    # -- attribution (math.md, Leave-one-out for every record; ``attribution`` module) ---------
    def attribute(
        self, x, y, k: int = 10, exact: bool = False, of: str = "loss"
    ) -> attribution.Attribution:
        """The k training records whose removal alone would raise (helpful) and lower (harmful)
        the loss at each test point most; the model does not change.

        Δℓ = loss after retraining without the record (risk normalised by 1/(N − 1), as a forget)
        minus the loss now. Exact for squared error; for cross-entropy the influence step (Eq. 9
        with F = {i}) unless ``exact``, which refines the 2k best candidates per side by Newton to
        the retrained optimum, re-sorts them and returns the k best. The leave-one-out factor is computed once per version.

        Arguments:
          x: test inputs ``(n, *input_shape)`` or flattened; y: labels ``(n,)`` or targets ``(n, d)``.
          k: records per side, 1 ≤ k ≤ N.
          exact: refine the candidates (cross-entropy; squared error is exact already); costs one
            Newton solve per distinct candidate record.
          of: ``loss`` (Δℓ, loss units) or ``output`` (the change of the labelled class's output,
            or of the only output: helpful lower it most when removed, harmful raise it most).

        Returns:
          ``attribution.Attribution``: ids ``(n, k)``, Δℓ ``(n, k)`` and Δf ``(n, k, d)`` per side.

        Raises:
          InvalidInputError: k out of range, unknown ``of``, inputs or targets of the wrong shape.
          SolverError: the factorisation or a refinement failed.
        """
        with sharding.use_mesh(self._mesh):
            state = self._state
            train = self.train_config
            attribution.check_request(k, state.n, of, self.task, self.output_dim)
            xt = self._inputs(x)
            yt = np.asarray(self.validate_targets(y, xt.shape[0]))
            factor = self._loo_factor(state)
            k_tx = self._loo_cross_kernel(state, xt)
            f_t = self._outputs(state, xt)
            changes = attribution.test_changes(factor, k_tx, f_t, yt, state.k)
            score = attribution.scores(changes, yt, of)
            top, bottom = attribution.rank(score, state.active, k)
            if exact and train.loss != "mse":
                # refine twice as many candidates per side as returned, so that a record the step
                # ranks just outside the top k can still enter it
                top, bottom = attribution.rank(score, state.active, min(2 * k, state.n))
                rows = np.unique(np.concatenate([top.ravel(), bottom.ravel()]))
                delta = attribution.refined_deltas(
                    self._problem(state), state.alpha, rows, *self._loo_refine_args(state)
                )
                changes = attribution.refine_changes(
                    changes, rows, delta, k_tx, state.form, f_t, yt, train.loss
                )
                score = attribution.scores(changes, yt, of)
                top = attribution.rerank(score, top, True)[:, :k]
                bottom = attribution.rerank(score, bottom, False)[:, :k]
            return attribution.Attribution(
                state.version,
                state.ids[top],
                state.ids[bottom],
                attribution.pick(changes, top),
                attribution.pick(changes, bottom),
                changes.exact,
                of,
            )

    def self_influence(self, exact: bool = False) -> attribution.SelfInfluence:
        """Each active record's own loss after retraining without it minus its loss now, sorted
        descending: the usual signal of mislabelled or anomalous records.

        Exact for squared error; for cross-entropy the influence step, or with ``exact`` Newton
        retraining for every record (N refinements: for small sets). Cached with the version.

        Returns:
          ``attribution.SelfInfluence``: ids ``(N,)`` and self-influence ``(N,)`` in loss units.

        Raises:
          SolverError: the factorisation or a refinement failed.
        """
        with sharding.use_mesh(self._mesh):
            state = self._state
            train = self.train_config
            changes = attribution.self_changes(self._loo_factor(state))
            values = changes.delta_loss
            rows = np.flatnonzero(state.active)
            if exact and train.loss != "mse":
                delta = attribution.refined_deltas(
                    self._problem(state), state.alpha, rows, *self._loo_refine_args(state)
                )
                f_star = np.asarray(self._f_star(state))
                values = np.array(values)
                for j, i in enumerate(rows):
                    df = np.asarray(kernel_matvec(state.k, jnp.asarray(delta[j]), state.form))[i]
                    values[i] = float(
                        losses.value(train.loss, f_star[i : i + 1] + df, state.y[i : i + 1])[0]
                        - losses.value(train.loss, f_star[i : i + 1], state.y[i : i + 1])[0]
                    )
            order = rows[np.argsort(-values[rows], kind="stable")]
            return attribution.SelfInfluence(
                state.version,
                state.ids[order],
                values[order],
                changes.exact or bool(exact),
            )

    def _loo_factor(self, state: ModelState) -> attribution.LooFactor:
        cache = self.__dict__.setdefault("_loo_cache", attribution.FactorCache())
        train = self.train_config
        return cache.get(
            state,
            lambda: attribution.loo_factor(
                state.k,
                state.form,
                state.f0,
                state.y,
                state.alpha,
                state.active,
                train.lam,
                train.loss,
            ),
        )

    def _loo_cross_kernel(self, state: ModelState, x: jax.Array) -> np.ndarray:
        """K(X_t, X) over the state's rows (columns of inactive rows zero), in its layout."""
        rows = np.flatnonzero(state.active)
        xs = np.asarray(state.x)[rows]
        if self._infinite:
            part = self._model.cross_kernel(np.asarray(x), xs)
        else:
            part = cross_ntk(self._model, np.asarray(x), xs, state.form, dtype=self._dtype)
        if state.form == "full":
            d = self.output_dim
            cols = (rows[:, None] * d + np.arange(d)).ravel()
            out = np.zeros((part.shape[0], state.capacity * d), part.dtype)
        else:
            cols = rows
            out = np.zeros((part.shape[0], state.capacity), part.dtype)
        out[:, cols] = part
        return out

    def _loo_refine_args(self, state: ModelState) -> tuple[dict, float, int]:
        """(solver keyword arguments, Newton tolerance, step limit) of a leave-one-out refinement."""
        cfg, train = self.solver_config, self.train_config
        solver = {**self._solver_kwargs(cfg, train.dtype, "auto"), "nystrom": state.nystrom}
        return solver, train.resolved_tol(), cfg.max_refine


def _nystrom(k: jax.Array, cfg: SolverConfig, mesh, form: str, loss: str):
    """The CG preconditioner of ``k`` (``solvers.nystrom``), or ``None`` when turned off or when the
    solvers cannot use it (trace form with cross-entropy: ``solvers.nystrom_preconditioner``)."""
    if cfg.nystrom_rank <= 0 or (form == "trace" and loss != "mse"):
        return None
    ny = nystrom(k, cfg.nystrom_rank)
    if ny is not None:
        log.info("Nyström preconditioner of rank %d: %.2f s", cfg.nystrom_rank, ny.seconds)
    return ny


def _take_nystrom(ny, krows: np.ndarray, side: int, mesh):
    """The Nyström factor on the compacted rows (on the host when sharded: XLA's sharded gather
    fails its verifier on jax 0.5.3)."""
    if mesh is None or mesh.size == 1:
        return ny.take_rows(krows, side)
    u = np.asarray(ny.u)[krows]
    return ny._replace(u=jnp.asarray(np.pad(u, ((0, side - u.shape[0]), (0, 0)))))


def _fingerprint(model) -> float | None:
    """‖θ0‖ in float64 (``None`` for a kernel model): restore checks it before recomputing K."""
    theta0 = getattr(model, "theta0", None)
    return None if theta0 is None else float(np.linalg.norm(np.asarray(theta0, np.float64)))


def _floor_hint(floor: float, dtype: str) -> str:
    """What to change when Newton stagnated (``training.newton``; ``floor``: ``training.rounding_floor``)."""
    if not floor:
        return ""
    return (
        f"; it stagnated: no step lowers the residual in {dtype}, whose rounding alone leaves about {floor:.1e}: "
        "use dtype float64, a looser training tol, or a larger lam"
    )


def _not_converged(info: SolveInfo, max_iter: int, dtype: str) -> str:
    """What to change when a solve missed its tolerance."""
    head = f"influence solve ({info.method}) stopped at relative residual {info.residual:.2e} after {info.iterations} iterations"
    if info.iterations >= max_iter:
        return f"{head}, its limit: raise max_iter, or use the solver alpha-cholesky for a small retain set"
    floor = f" (rounding in {dtype} alone leaves about {info.floor:.1e})" if info.floor else ""
    return (
        f"{head}: CG stagnated at {dtype} precision{floor}; use a looser cg_tol, dtype float64, a larger lam, "
        "or the solver alpha-cholesky for a small retain set"
    )


def _model(
    config: ModelConfig, input_shape: tuple[int, ...], output_dim: int, dtype
) -> Model | KernelModel:
    """A finite network to linearise, or an infinitely wide one (analytic NTK, ``infinite``)."""
    if config.infinite:
        return KernelModel(config, input_shape, output_dim, dtype)
    return build_model(config, input_shape, output_dim, dtype)


def _kernel(
    model, x: np.ndarray, form: str, cache_dir: Path | None, dtype, progress: bool
) -> tuple[np.ndarray, dict]:
    """K(X, X) in the engine layout: the empirical NTK (``ntk``) or the analytic one (``infinite``)."""
    if isinstance(model, KernelModel):
        if form != "trace":
            raise InvalidInputError(
                "the analytic NTK is exact in the trace form: use kernel_form 'trace' or 'auto'"
            )
        return model.cached_kernel(x, cache_dir, progress)
    return cached_ntk(model, x, form, cache_dir, dtype=dtype, progress=progress)


@partial(jax.jit, static_argnames=("side",))
def _compact(k: jax.Array, rows: jax.Array, side: int) -> jax.Array:
    """K[rows][:, rows] zero-padded to ``(side, side)``: two takes, one compiled program (a fancy-
    index ``np.ix_`` on a jax array took 5.9 of an 8 s forget, MNIST 10 %)."""
    block = jnp.take(jnp.take(k, rows, axis=0), rows, axis=1)
    pad = side - rows.shape[0]
    return jnp.pad(block, ((0, pad), (0, pad)))


# Erase F in place (into the spare buffer) rather than compact into a smaller bucket while that
# bucket would keep at least this share of K's entries. Measured on MNIST (K 1.7 GB, C = 2,048): erasing
# into mapped memory 0.30 s against compacting into fresh memory 0.6-0.7 s, but each of the ~8 passes
# of the solve and the certificate then reads C² instead of bucket(N_R)² entries: at 1 % removal the
# whole deletion took 1.40 s against 1.90 s, at 10 % (bucket 1,856, 82 % of the entries) 1.74 s both ways.
_ERASE_MIN_FILL = 0.85


@partial(jax.jit, static_argnames=("shape", "dtype"))
def _touched(shape: tuple[int, ...], dtype) -> jax.Array:
    """A zero array of ``shape`` whose memory has been written once (mapped by the OS)."""
    return jnp.zeros(shape, dtype)


@partial(jax.jit, static_argnames=("full", "d"), donate_argnums=(0,))
def _erase_into(spare: jax.Array, k: jax.Array, keep: jax.Array, full: bool, d: int) -> jax.Array:
    """``_erase(k, keep)`` written into ``spare``'s memory (donated: ``spare`` is consumed)."""
    rows = jnp.repeat(keep, d) if full else keep
    m = rows.astype(k.dtype)
    return spare.at[...].set(k * m[:, None] * m[None, :])


@partial(jax.jit, static_argnames=("full", "d"))
def _erase(k: jax.Array, keep: jax.Array, full: bool, d: int) -> jax.Array:
    """K with the rows and columns of points not in ``keep`` set to zero."""
    rows = jnp.repeat(keep, d) if full else keep
    m = rows.astype(k.dtype)
    return k * m[:, None] * m[None, :]
