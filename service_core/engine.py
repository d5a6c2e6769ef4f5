"""``Unlearner``: the façade the service (and any library user) drives.

It owns one immutable ``ModelState`` at a time. Reads take the current state by reference and never
see a half-applied deletion; ``forget`` computes the next version (``deletion.plan``), checkpoints it,
and only then publishes it by swapping the reference; ``after_publish`` then does the work that
follows a published deletion (docs/design.md, The order of a deletion).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from pathlib import Path

import jax
import numpy as np

from . import addition, attribution, checkpoint, deletion, influence, lifecycle, validation
from .config import ModelConfig, SolverConfig, TrainConfig
from .data import Dataset
from .deletion import ForgetResult
from .influence import InfluenceResult
from .kernels import purge_cache
from .layout import SpareBuffer
from .models import Network
from .state import ModelState


class Unlearner:
    """A trained linearised network (or kernel machine) in dual form that forgets on request.

    Build with ``Unlearner.build`` (trains version 0) or ``Unlearner.restore`` (from checkpoints).
    """

    def __init__(self, state: ModelState, model: Network, cache_dir: Path | None = None):
        self._state = state
        self.model = model  # the network never changes; its state does
        self._cache_dir = cache_dir
        self._forget_lock = threading.RLock()
        self._spare = SpareBuffer()
        self._loo = attribution.FactorCache()
        self.ready_spare()

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
        source: str | None = None,
    ) -> Unlearner:
        """Build the model, compute (or load) its kernel and train it: version 0 (``lifecycle.build``;
        ``source``: how the data set was asked for, part of the model's identity).

        Raises:
          InvalidInputError, ModelLoadError, ResourceError, SolverError: as ``lifecycle.build``.
        """
        configs = (model_cfg, train_cfg, solver_cfg)
        built = lifecycle.build(
            dataset, *configs, cache_dir, progress, devices, memory_budget, source
        )
        return cls(*built, cache_dir)

    @classmethod
    def restore(
        cls,
        checkpoint_dir: Path,
        cache_dir: Path | None = None,
        progress: bool = True,
        devices: list | None = None,
        expect: lifecycle.Identity | None = None,
    ) -> Unlearner | None:
        """The newest complete checkpoint under ``checkpoint_dir``, or ``None`` (``lifecycle.restore``;
        with ``expect``, a checkpoint of another model raises ``CheckpointMismatchError``)."""
        restored = lifecycle.restore(checkpoint_dir, cache_dir, progress, devices, expect)
        return None if restored is None else cls(*restored, cache_dir)

    def save(self, checkpoint_dir: Path) -> None:
        """Checkpoint the current version (atomic; older versions are deleted)."""
        checkpoint.save(checkpoint_dir, self._state)

    # -- read side ------------------------------------------------------------------------------
    @property
    def state(self) -> ModelState:
        """The served version: one immutable value (read it once per request)."""
        return self._state

    @property
    def version(self) -> int:
        return self._state.version

    def active_ids(self) -> list[str]:
        return self._state.active_ids()

    @property
    def n_train(self) -> int:
        """Active training points."""
        return self._state.n

    def forgotten_ids(self) -> frozenset[str]:
        return frozenset(self._state.forgotten)

    @property
    def n_forgotten(self) -> int:
        return len(self._state.forgotten)

    @property
    def train_config(self) -> TrainConfig:
        """The risk and how version 0 was trained (saved with every checkpoint)."""
        return self._state.train_config

    @property
    def solver_config(self) -> SolverConfig:
        return self._state.solver_config

    def params(self):
        """The network's parameters of the current version as its own pytree: θ unravelled, and
        for a user's network its frozen leaves exactly θ_0's (``Model.params_of``); ``None`` for an
        infinitely wide model."""
        theta = self._state.theta
        if theta is None or not hasattr(self.model, "params_of"):
            return None
        return self.model.params_of(theta)

    def predict(self, x) -> np.ndarray:
        """Outputs of the current version; x ``(n, *input_shape)`` or flattened → ``(n, d)``.

        Raises:
          InvalidInputError: wrong shape, empty, NaN or infinite values, outputs that overflow.
        """
        return self.predict_with_version(x)[1]

    def predict_with_version(self, x) -> tuple[int, np.ndarray]:
        """``(version, outputs)`` from one consistent state."""
        state = self._state
        return state.version, self._outputs(state, self._inputs(x))

    def _inputs(self, x) -> jax.Array:
        return validation.inputs(x, self._state.input_shape, self._state.x.dtype)

    def _test_points(self, state: ModelState, x, y) -> tuple[jax.Array, jax.Array]:
        xt = validation.inputs(x, state.input_shape, state.x.dtype)
        return xt, validation.targets(y, xt.shape[0], state.task, state.layout.d, xt.dtype)

    def _outputs(self, state: ModelState, x: jax.Array) -> np.ndarray:
        out = np.asarray(self.model.outputs(state, x))
        if not np.all(np.isfinite(out)):
            raise validation.InvalidInputError(
                "x is too large: the model's outputs overflow; scale inputs like the training data"
            )
        return out

    def validate_forget(
        self,
        ids: Sequence[str],
        pending: frozenset[str] = frozenset(),
        state: ModelState | None = None,
    ) -> None:
        """Check a forget request against a version (default: the current one) and the ids queued
        (``validation.forget_set``)."""
        validation.forget_set(self._state if state is None else state, ids, pending)

    def influence(self, forget_ids: Sequence[str], x, y, refine: bool = False) -> InfluenceResult:
        """Δf and Δℓ at test points if ``forget_ids`` were removed (Eqs. (8)–(9)); the model does not
        change.

        Arguments:
          forget_ids: active ids (hypothetical forget set).
          x: test inputs ``(n, *input_shape)``; y: labels ``(n,)`` or targets ``(n, d)``.
          refine: use the refined retain optimum instead of the single influence step.

        Raises:
          InvalidForgetSetError, UnknownIdsError, AlreadyForgottenError, InvalidInputError, SolverError.
        """
        state = self._state  # one snapshot: a deletion published meanwhile changes nothing here
        validation.forget_set(state, forget_ids)
        xt, yt = self._test_points(state, x, y)
        result = influence.estimate(state, self.model, forget_ids, xt, yt, refine)
        arrays = ("delta_outputs", "delta_loss", "delta_loss_first_order")
        return result._replace(**{name: np.asarray(getattr(result, name)) for name in arrays})

    def attribute(
        self, x, y, k: int = 10, exact: bool = False, of: str = "loss"
    ) -> attribution.Attribution:
        """The k records whose removal alone would raise (helpful) and lower (harmful) the loss at
        each row of x most (``attribution.attribute``: arguments, shapes, units, errors); x
        ``(n, *input_shape)``, y labels ``(n,)`` or targets ``(n, d)``. The model does not change."""
        state = self._state
        xt, yt = self._test_points(state, x, y)
        return attribution.attribute(state, self.model, self._loo, xt, np.asarray(yt), k, exact, of)

    def self_influence(self, exact: bool = False) -> attribution.SelfInfluence:
        """Each active record's own loss after retraining without it minus its loss now, sorted
        descending (``attribution.self_influence``): ids ``(N,)``, values ``(N,)`` in loss units.

        Raises:
          SolverError: the factorisation or a refinement failed.
        """
        return attribution.self_influence(self._state, self._loo, exact)

    def loo_factor(self) -> attribution.LooFactor:
        """The served version's leave-one-out factor (computed once per version)."""
        return attribution.factor(self._state, self._loo)

    # -- deletion -------------------------------------------------------------------------------
    def forget(self, ids: Sequence[str], checkpoint_dir: Path | None = None) -> ForgetResult:
        """Remove ``ids``: compute the next version (``deletion.plan``), checkpoint it, publish it;
        the caller reports the deletion, then calls ``after_publish``. Nothing is published unless
        every solve converged and the checkpoint is complete. ``ForgetResult.timings`` gains
        ``checkpoint`` and ``publish``; ``seconds`` is their total with the computation.

        Raises:
          InvalidForgetSetError, UnknownIdsError, AlreadyForgottenError, SolverError, OSError (the
          checkpoint): the model is unchanged.
        """
        t0 = time.perf_counter()
        with self._forget_lock:
            new_state, result = deletion.plan(
                self._state, self.model, ids, spare=self._spare.take()
            )
            t1 = time.perf_counter()
            if checkpoint_dir is not None:
                checkpoint.save(checkpoint_dir, new_state)
            t2 = time.perf_counter()
            self._state = new_state
            t3 = time.perf_counter()
        timings = {**(result.timings or {}), "checkpoint": t2 - t1, "publish": t3 - t2}
        return result._replace(seconds=t3 - t0, timings=timings)

    def add(
        self, ids: Sequence[str], x, y, checkpoint_dir: Path | None = None
    ) -> addition.AddResult:
        """Add the records ``(ids, x, y)``: the next version, trained on the current records and these
        (``addition.plan``: K gains their rows and columns, Newton from the current α), checkpointed,
        then published. x ``(k, *input_shape)`` or flattened rows; y labels ``(k,)`` or targets
        ``(k, d)``. ``result.timings`` gains ``checkpoint`` and ``publish``.

        Raises:
          InvalidForgetSetError (bad ids), AlreadyActiveError (ids in the training set, listed),
          InvalidInputError, ResourceError, SolverError, OSError (the checkpoint): the model is
          unchanged.
        """
        t0 = time.perf_counter()
        with self._forget_lock:
            new_state, result = addition.plan(self._state, self.model, ids, x, y)
            t1 = time.perf_counter()
            if checkpoint_dir is not None:
                checkpoint.save(checkpoint_dir, new_state)
            t2 = time.perf_counter()
            self._spare.take()  # K's shape may have grown; made again below
            self._state = new_state
            t3 = time.perf_counter()
        purge_cache(self._cache_dir)  # the cached kernel is of the old inputs
        self.ready_spare()
        timings = {**result.timings, "checkpoint": t2 - t1, "publish": t3 - t2}
        return result._replace(timings={**timings, "total": t3 - t0})

    def plan_forget(
        self,
        ids: Sequence[str],
        method: str | None = None,
        refine: bool | None = None,
        strict: bool = True,
    ) -> tuple[ModelState, ForgetResult]:
        """The next version without ``ids``, computed but not published (dry runs, benchmarks):
        ``deletion.plan`` on the current state, with the spare K buffer."""
        with self._forget_lock:  # one plan at a time: it may take the spare K
            return deletion.plan(
                self._state, self.model, ids, method, refine, self._spare.take(), strict
            )

    def after_publish(self) -> dict[str, float]:
        """The work that follows a published deletion, off its latency: recompute the Nyström
        preconditioner from the new K (so nothing derived from forgotten points stays in memory),
        delete the cached kernels on disk (they hold forgotten rows), make the spare K buffer.

        Returns:
          seconds per part: ``preconditioner``, ``purge``, ``spare``.
        """
        seconds: dict[str, float] = {}
        with self._forget_lock:
            t0 = time.perf_counter()
            st = self._state
            if st.nystrom is not None and self.solver_config.nystrom_refresh:
                ny = lifecycle.preconditioner(
                    st.k, self.solver_config, st.form, self.train_config.loss
                )
                self._state = st.replace(nystrom=ny)
            t1 = time.perf_counter()
            purge_cache(self._cache_dir)
            seconds.update(preconditioner=t1 - t0, purge=time.perf_counter() - t1)
        seconds["spare"] = self.ready_spare()
        return seconds

    def follow(self, newer: ModelState) -> None:
        """Serve ``newer``, a later version of the same model read from a checkpoint (a follower
        process): its K is this one's with the forgotten rows erased, or compacted into ``newer``'s
        rows (the layout operations the worker's deletion used), never recomputed; the
        preconditioner is recomputed from that K.

        Raises:
          ValueError: ``newer`` is not a later version of this model.
        """
        with self._forget_lock:
            self._state = deletion.follow(self._state, newer, self._spare.take())
        self.ready_spare()

    def follow_checkpoint(self, checkpoint_dir: Path) -> bool:
        """Follow the newest checkpoint under ``checkpoint_dir`` if it is newer (``follow``).

        Returns:
          whether a newer version is now served.
        """
        newer = checkpoint.restore_newer(checkpoint_dir, self._state.version)
        if newer is not None:
            self.follow(newer)
        return newer is not None

    def ready_spare(self) -> float:
        """Make the spare K buffer the next deletion erases K into (``layout.SpareBuffer``).

        Returns:
          seconds spent (the operating system mapping and zeroing K's bytes once).
        """
        with self._forget_lock:  # not while a deletion is planned (it may take the spare)
            st = self._state
            return self._spare.ready(st.k, st.solver_config.spare_kernel and not st.layout.sharded)
