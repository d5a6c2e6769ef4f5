"""``Unlearner``: the façade the service (and any library user) drives.

It owns one immutable ``ModelState`` at a time. Reads take the current state by reference and never
see a half-applied deletion; ``forget`` computes the next version (``deletion.plan``), checkpoints it,
hands it to the caller's ``before_publish`` (the service logs it there) and only then publishes it by
swapping the reference; once the caller has reported it, ``purge`` deletes what holds forgotten data
on disk and ``after_publish`` does the rest of the work that follows a published deletion
(docs/design.md, The order of a deletion).
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import jax
import numpy as np

from . import (
    addition,
    attribution,
    checkpoint,
    deletion,
    influence,
    lifecycle,
    precision,
    validation,
)
from .config import ModelConfig, SolverConfig, TrainConfig, jax_dtype
from .data import Dataset
from .deletion import ForgetResult
from .errors import NotCertifiedError
from .influence import InfluenceResult
from .kernels import purge_cache
from .layout import SpareBuffer
from .models import KernelModel, Network
from .state import ModelState

log = logging.getLogger(__name__)

# Rows of one call of the network's outputs (``Unlearner._rows_outputs``): powers of two from 16.
_PREDICT_ROWS = (16, 32, 64, 128, 256, 512, 1024)


@dataclasses.dataclass(frozen=True)
class PreparedVersion:
    """A followed version ready to be served (``Unlearner.prepare_follow``): ``state`` (with K),
    the network it is served with (``model``: a promoted float64 one after a ``dtype auto``
    promotion), and the served state it was made from (``base``)."""

    base: ModelState
    state: ModelState
    model: Network

    @property
    def version(self) -> int:
        return self.state.version


class Unlearner:
    """A trained linearised network (or kernel machine) in dual form that forgets on request.

    Build with ``Unlearner.build`` (trains version 0) or ``Unlearner.restore`` (from checkpoints).
    """

    def __init__(
        self,
        state: ModelState,
        model: Network,
        cache_dir: Path | None = None,
        id_key: bytes | None = None,
    ):
        """``id_key``: the secret of the forgotten ids' digests (``ModelState.digest``); ``None``
        keeps the state's."""
        self._state = state if id_key is None else state.replace(id_key=id_key)
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
        id_key: bytes = b"",
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
        return cls(*built, cache_dir, id_key)

    @classmethod
    def restore(
        cls,
        checkpoint_dir: Path,
        cache_dir: Path | None = None,
        progress: bool = True,
        devices: list | None = None,
        id_key: bytes = b"",
        prune: bool = False,
        expect: lifecycle.Identity | None = None,
        max_version: int | None = None,
    ) -> Unlearner | None:
        """The newest complete checkpoint under ``checkpoint_dir`` (at most ``max_version`` when
        given), or ``None``; with ``prune``, every other checkpoint and cached kernel is deleted;
        with ``expect``, a checkpoint of another model raises ``CheckpointMismatchError``
        (``lifecycle.restore``)."""
        restored = lifecycle.restore(
            checkpoint_dir,
            cache_dir,
            progress,
            devices,
            id_key,
            prune,
            expect,
            max_version=max_version,
        )
        return None if restored is None else cls(*restored, cache_dir, id_key)

    def save(self, checkpoint_dir: Path) -> None:
        """Checkpoint the current version (atomic), then delete every other one (``purge``)."""
        checkpoint.save(checkpoint_dir, self._state)
        checkpoint.prune(checkpoint_dir, keep=self._state.version)

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

    def digest(self, record_id: str) -> str:
        """The keyed digest a forgotten id is remembered by (``ModelState.digest``)."""
        return self._state.digest(record_id)

    def use_id_key(self, id_key: bytes) -> None:
        """Digest forgotten ids under ``id_key`` from now on (a model built or restored without the
        service's secret, before it forgot anything).

        Raises:
          ValueError: the model has forgotten records under another key already.
        """
        with self._forget_lock:
            if id_key != self._state.id_key and self._state.forgotten:
                raise ValueError(
                    "this model has forgotten records under another id key: restore it with "
                    "that key"
                )
            self._state = self._state.replace(id_key=id_key)

    def renumber(self, version: int) -> None:
        """Number the served model ``version`` without changing it, so that the next version is
        ``version + 1``: a model restored or rebuilt behind a deletion log that already numbers
        later versions (checkpoints rolled back or deleted) makes its next versions after the
        log's newest instead of reusing its numbers. Only forward, and only before the model is
        served or saved again (the next ``forget``/``add`` checkpoints at the new number).

        Raises:
          ValueError: ``version`` is lower than the current one.
        """
        with self._forget_lock:
            if version < self._state.version:
                raise ValueError(
                    f"version {version} is older than the model's {self._state.version}"
                )
            self._state = self._state.replace(version=int(version))

    def forgotten_digests(self) -> frozenset[str]:
        """Keyed digests of the ids forgotten so far (the ids themselves are kept nowhere)."""
        return frozenset(self._state.forgotten)

    def is_forgotten(self, ids: Sequence[str]) -> bool:
        """Whether every id of ``ids`` is forgotten by the current version."""
        forgotten = self.forgotten_digests()
        return all(self.digest(i) in forgotten for i in ids)

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
        return state.version, self.checked_outputs(self._rows_outputs(state, self._inputs(x)))

    def prepare_inputs(self, x) -> np.ndarray:
        """``x`` validated as model inputs ``(n, *input_shape)`` (host memory), for
        ``predict_batch``.

        Raises:
          InvalidInputError: as ``predict``.
        """
        st = self._state
        return validation.input_rows(x, st.input_shape, st.x.dtype, st.bound_dtype)

    def predict_batch(self, inputs: Sequence[np.ndarray]) -> tuple[int, list[np.ndarray]]:
        """Outputs of several requests' inputs (each from ``prepare_inputs``) in one device call,
        from one version: ``(version, [(n_i, d) outputs])``. Each request's outputs are those
        ``predict`` gives it alone (rows are computed in the same padded shapes,
        ``_rows_outputs``); check each with ``checked_outputs``.
        """
        state = self._state
        out = self._rows_outputs(state, np.concatenate(list(inputs)))
        ends = np.cumsum([len(x) for x in inputs])[:-1]
        return state.version, np.split(out, ends)

    @staticmethod
    def checked_outputs(out: np.ndarray) -> np.ndarray:
        """``out``, if every value is finite.

        Raises:
          InvalidInputError: the outputs overflow (inputs far larger than the training data).
        """
        if not np.all(np.isfinite(out)):
            raise validation.InvalidInputError(
                "x is too large: the model's outputs overflow; scale inputs like the training data"
            )
        return out

    def _inputs(self, x) -> jax.Array:
        st = self._state
        return validation.inputs(x, st.input_shape, st.x.dtype, st.bound_dtype)

    def _test_points(self, state: ModelState, x, y) -> tuple[jax.Array, jax.Array]:
        bound = state.bound_dtype
        xt = validation.inputs(x, state.input_shape, state.x.dtype, bound)
        d = state.layout.d
        return xt, validation.targets(y, xt.shape[0], state.task, d, xt.dtype, bound)

    def warm_up(self, max_rows: int = _PREDICT_ROWS[0]) -> float:
        """Compile the prediction program for the padded row shapes (``_PREDICT_ROWS``) up to
        ``max_rows`` rows on the current version, so that no request pays for that compilation
        (about 0.1 s per shape for the digits MLP; later versions keep the shapes). By default
        the smallest shape: every request of up to 16 rows, and micro-batches of them. Nothing
        changes. Nothing for an infinitely wide model (``KernelModel``): its predictions are
        kernel evaluations, not a compiled program of the row shape.

        Returns:
          seconds taken.
        """
        started = time.perf_counter()
        if isinstance(self.model, KernelModel):
            # f(x) = K(x, X) α: a prediction evaluates the kernel against every training point
            # (minutes for an inf-cnn over a few hundred images), which no warm-up saves
            return 0.0
        shape = self._state.input_shape
        for rows in (r for r in _PREDICT_ROWS if r <= max(max_rows, _PREDICT_ROWS[0])):
            self.predict_batch([self.prepare_inputs(np.zeros((rows, *shape)))])
        return time.perf_counter() - started

    def _rows_outputs(self, state: ModelState, x) -> np.ndarray:
        """The outputs ``(n, d)`` at inputs ``x``, computed in shapes of ``_PREDICT_ROWS`` rows
        (zero rows pad the last call): one compiled program per shape, not per row count, and
        a row's outputs do not depend on the rows it is computed with (XLA's CPU products give
        a row other roundings below 16 rows than from 16 on), so micro-batched requests get
        exactly what each would get alone. Padding is done in numpy: one JAX call per chunk,
        so a request thread needs the GIL rarely while the event loop runs."""
        x = np.asarray(x)
        n = x.shape[0]
        parts = []
        for start in range(0, n, _PREDICT_ROWS[-1]):
            chunk = x[start : start + _PREDICT_ROWS[-1]]
            rows = next(r for r in _PREDICT_ROWS if r >= chunk.shape[0])
            if rows > chunk.shape[0]:
                pad = np.zeros((rows - chunk.shape[0], *chunk.shape[1:]), chunk.dtype)
                chunk = np.concatenate([chunk, pad])
            parts.append(np.asarray(self.model.outputs(state, chunk)))
        return np.concatenate(parts)[:n]

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
        self,
        x,
        y,
        k: int = 10,
        exact: bool = False,
        of: str = "loss",
        max_refinements: int | None = None,
        cancelled: Callable[[], bool] | None = None,
        progress: Callable[[int, int], None] | None = None,
    ) -> attribution.Attribution:
        """The k records whose removal alone would raise (helpful) and lower (harmful) the loss at
        each row of x most (``attribution.attribute``: arguments, shapes, units, errors, the
        limit ``max_refinements``, ``cancelled`` and ``progress``); x ``(n, *input_shape)``, y labels ``(n,)``
        or targets ``(n, d)``. The model does not change."""
        state = self._state
        xt, yt = self._test_points(state, x, y)
        return attribution.attribute(
            state,
            self.model,
            self._loo,
            xt,
            np.asarray(yt),
            k,
            exact,
            of,
            max_refinements=max_refinements,
            cancelled=cancelled,
            progress=progress,
        )

    def self_influence(
        self,
        exact: bool = False,
        top: int | None = None,
        cancelled: Callable[[], bool] | None = None,
        progress: Callable[[int, int], None] | None = None,
    ) -> attribution.SelfInfluence:
        """Each active record's own loss after retraining without it minus its loss now, sorted
        descending (``attribution.self_influence``): ids ``(N,)``, values ``(N,)`` in loss units;
        with ``exact`` (cross-entropy) the ``top`` leading records (all when None) refined to
        exact retraining and re-sorted; ``cancelled`` is asked before each refinement,
        ``progress`` called after each with (refined, to refine).

        Raises:
          InvalidInputError: ``top`` < 1.
          SolverError: the factorisation or a refinement failed.
          ComputationCancelled: ``cancelled()`` returned True before the refinements were done.
        """
        return attribution.self_influence(self._state, self._loo, exact, top, cancelled, progress)

    def loo_factor(self) -> attribution.LooFactor:
        """The served version's leave-one-out factor (computed once per version)."""
        return attribution.factor(self._state, self._loo)

    # -- deletion -------------------------------------------------------------------------------
    def forget(
        self,
        ids: Sequence[str],
        checkpoint_dir: Path | None = None,
        before_publish: Callable[[ForgetResult], None] | None = None,
        note: dict | None = None,
    ) -> ForgetResult:
        """Remove ``ids``: compute the next version (``deletion.plan``), checkpoint it (atomic; the
        older checkpoint stays until ``purge``), call ``before_publish`` (the service appends the
        deletion-log record there), publish it. The caller then reports the deletion and calls
        ``purge`` and ``after_publish`` (docs/design.md, The order of a deletion). Nothing is
        published unless every solve converged, the checkpoint is complete and ``before_publish``
        returned. ``ForgetResult.timings`` gains ``checkpoint``, ``before_publish`` and
        ``publish``; ``seconds`` is their total with the computation.

        Arguments:
          note: JSON-able facts stored with the version's history record (its checkpoint), e.g.
            the service's job ids, so that a lost log record can be written again from it.

        Raises:
          InvalidForgetSetError, UnknownIdsError, AlreadyForgottenError, SolverError, OSError (the
          checkpoint), or what ``before_publish`` raised: the model served is unchanged (a
          checkpoint may be written; the caller may retry or restart).
        """
        t0 = time.perf_counter()
        with self._forget_lock:
            model = self.model
            try:
                holds = self._spare.holds(self._state.k)
                new_state, result = deletion.plan(
                    self._state, model, ids, spare=self._spare.take(), spare_holds_k=holds
                )
            except NotCertifiedError as e:
                base, model = self._promoted(e)  # dtype auto: finish in float64, else re-raise
                new_state, result = deletion.plan(base, model, ids)
            if note:
                record = {**new_state.history[-1], "note": dict(note)}
                new_state = new_state.replace(history=new_state.history[:-1] + (record,))
            t1 = time.perf_counter()
            try:
                if checkpoint_dir is not None:
                    checkpoint.save(checkpoint_dir, new_state)
                t2 = time.perf_counter()
                timings = {**(result.timings or {}), "checkpoint": t2 - t1}
                if before_publish is not None:
                    before_publish(result._replace(seconds=t2 - t0, timings=timings))
            except BaseException:
                # Not published: drop its checkpoint, or a restart would restore it.
                if checkpoint_dir is not None:
                    checkpoint.prune(checkpoint_dir, keep=self._state.version)
                raise
            t3 = time.perf_counter()
            self.model = model  # before the state: a float64 network reads float32 states too
            old, self._state = self._state, new_state
            self._retire(old, new_state)
            del old
            t4 = time.perf_counter()
        timings.update(before_publish=t3 - t2, publish=t4 - t3)
        return result._replace(seconds=t4 - t0, timings=timings)

    def add(
        self,
        ids: Sequence[str],
        x,
        y,
        checkpoint_dir: Path | None = None,
        before_publish: Callable[[addition.AddResult], None] | None = None,
        note: dict | None = None,
    ) -> addition.AddResult:
        """Add the records ``(ids, x, y)``: the next version, trained on the current records and these
        (``addition.plan``: K gains their rows and columns, Newton from the current α), checkpointed,
        handed to ``before_publish`` (the service logs it there), then published: the order of a
        deletion (docs/design.md). x ``(k, *input_shape)`` or flattened rows; y labels ``(k,)`` or
        targets ``(k, d)``. ``result.timings`` gains ``checkpoint``, ``before_publish`` and
        ``publish``.

        Arguments:
          note: JSON-able facts stored with the version's history record (its checkpoint), e.g.
            the service's job ids, so that a lost log record can be written again from it.

        Raises:
          InvalidForgetSetError (bad ids), AlreadyActiveError (ids in the training set, listed),
          InvalidInputError, ResourceError, SolverError, OSError (the checkpoint), or what
          ``before_publish`` raised: the model served is unchanged.
        """
        t0 = time.perf_counter()
        with self._forget_lock:
            new_state, result = addition.plan(self._state, self.model, ids, x, y)
            if note:
                record = {**new_state.history[-1], "note": dict(note)}
                new_state = new_state.replace(history=new_state.history[:-1] + (record,))
            t1 = time.perf_counter()
            try:
                if checkpoint_dir is not None:
                    checkpoint.save(checkpoint_dir, new_state)
                t2 = time.perf_counter()
                timings = {**result.timings, "checkpoint": t2 - t1}
                if before_publish is not None:
                    before_publish(result._replace(timings=timings))
            except BaseException:
                # Not published: drop its checkpoint, or a restart would restore it.
                if checkpoint_dir is not None:
                    checkpoint.prune(checkpoint_dir, keep=self._state.version)
                raise
            t3 = time.perf_counter()
            self._spare.take()  # K's shape may have grown; made again below
            self._state = new_state
            t4 = time.perf_counter()
        purge_cache(self._cache_dir)  # the cached kernel is of the old inputs
        if before_publish is None:  # the service makes it in after_publish, off the job's time
            self.ready_spare()
        timings.update(before_publish=t3 - t2, publish=t4 - t3, total=t4 - t0)
        return result._replace(timings=timings)

    def validate_add(
        self,
        ids: Sequence[str],
        x,
        y,
        pending: frozenset[str] = frozenset(),
        state: ModelState | None = None,
    ) -> int:
        """Check an addition against a version (default: the current one) and the ids queued
        (``addition.validate``; nothing is computed). Returns the number of records.

        Raises:
          InvalidForgetSetError, AlreadyActiveError, QueuedIdsError, InvalidInputError.
        """
        ids, _, _ = addition.validate(self._state if state is None else state, ids, x, y, pending)
        return len(ids)

    def check_add_fits(self, n_more: int, state: ModelState | None = None) -> None:
        """Refuse (``ResourceError``, naming bytes) adding ``n_more`` points whose K would not fit
        the devices (``addition.check_fits``)."""
        addition.check_fits(self._state if state is None else state, n_more)

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
            try:
                return deletion.plan(
                    self._state, self.model, ids, method, refine, self._spare.take(), strict
                )
            except NotCertifiedError as e:
                base, model = self._promoted(e)
                return deletion.plan(base, model, ids, method, refine, None, strict)

    def _promoted(self, error: NotCertifiedError) -> tuple[ModelState, Network]:
        """The current version promoted to float64 with its network (``precision``), for a
        ``dtype auto`` model still in float32 whose deletion ``error`` could not be certified.

        Raises:
          NotCertifiedError: ``error`` itself, when the model is not ``dtype auto`` in float32.
          ResourceError: K in float64 would not fit the memory plan.
        """
        st = self._state
        if st.train_config.dtype != "auto" or st.dtype == "float64":
            raise error
        devices = list(st.layout.mesh.devices.flat) if st.layout.mesh is not None else None
        precision.check_promotion_fits(
            st.layout.side(st.capacity), devices or jax.local_devices(), 0.6, "the deletion"
        )
        log.warning(
            "%s: promoting the model to float64 (dtype auto)", precision.promotion_reason(error)
        )
        model = precision.promoted_network(st.model_config, st.input_shape, st.layout.d)
        impl = getattr(self.model, "ntk_implementation", None)
        if getattr(model, "user", None) is not None:  # a user's network: as measured at build
            model = dataclasses.replace(model, ntk_implementation=impl)
        base = precision.promote_arrays(st)
        ny = lifecycle.preconditioner(base.k, st.solver_config, st.form, st.train_config.loss)
        info = {
            **base.meta["precision"],
            "kernel_dtype": "float32",
            "promoted": precision.promotion_reason(error),
        }
        meta = {**base.meta, "precision": {**info, "promoted_at_version": st.version + 1}}
        return base.replace(nystrom=ny, meta=meta), model

    def purge(self, checkpoint_dir: Path | None) -> dict[str, int]:
        """Delete what holds forgotten data on disk once a deletion is published and reported:
        every checkpoint but the current version's (and unfinished saves, ``checkpoint.prune``),
        and every cached kernel (they hold the forgotten rows; ``kernels.purge_cache``).

        Returns:
          files/directories deleted: ``checkpoints``, ``kernels``.

        Raises:
          OSError: a deletion failed (the next purge, or the next start, tries again).
        """
        with self._forget_lock:
            version = self._state.version
            pruned = 0 if checkpoint_dir is None else checkpoint.prune(checkpoint_dir, version)
            return {"checkpoints": pruned, "kernels": purge_cache(self._cache_dir)}

    def after_publish(self) -> dict[str, float]:
        """The work that follows a published (and purged) deletion, off its latency: recompute the
        Nyström preconditioner from the new K (so nothing derived from forgotten points stays in
        memory; its pass over K on one core, leaving the others to requests), make the spare K
        buffer.

        Returns:
          seconds per part: ``preconditioner``, ``spare``.
        """
        seconds: dict[str, float] = {}
        with self._forget_lock:
            t0 = time.perf_counter()
            st = self._state
            if st.nystrom is not None and self.solver_config.nystrom_refresh:
                ny = lifecycle.preconditioner(
                    st.k, self.solver_config, st.form, self.train_config.loss, one_core=True
                )
                self._state = st.replace(nystrom=ny)
            seconds["preconditioner"] = time.perf_counter() - t0
        seconds["spare"] = self.ready_spare()
        return seconds

    def follow(self, newer: ModelState, finish: bool = True) -> None:
        """Serve ``newer``, a later version of the same model read from a checkpoint (a follower
        process): ``prepare_follow`` then ``serve_prepared``.

        Arguments:
          finish: run ``after_follow`` before returning; ``False`` leaves it to the caller, so that
            requests waiting for ``newer`` need not wait for it too (``app.service.ModelFollower``).

        Raises:
          ValueError: ``newer`` is not a later version of this model.
        """
        with self._forget_lock:
            if not self.serve_prepared(self.prepare_follow(newer)):  # cannot happen: locked
                raise RuntimeError("the served version changed while following")
        if finish:
            self.after_follow()

    def prepare_follow(self, newer: ModelState) -> PreparedVersion:
        """Everything serving ``newer`` needs, without serving it yet: its K is this version's with
        the forgotten rows erased, or compacted into ``newer``'s rows (the layout operations the
        worker's deletion used), never recomputed; when ``newer`` holds records this version does
        not (an addition), only their rows and columns of K are computed (``addition.follow``).
        It has no preconditioner (nothing derived from the forgotten rows is kept);
        ``after_follow`` makes the new one and the spare K buffer. The served version is untouched
        (K is erased into the spare buffer, never in place), so a follower prepares a version as
        soon as its checkpoint appears and serves it (``serve_prepared``, instantaneous) once the
        worker reports it.

        Raises:
          ValueError: ``newer`` is not a later version of this model.
        """
        with self._forget_lock:
            base = self._state
            newer = newer.replace(id_key=base.id_key)
            if deletion.follows_by_removal(base, newer):
                holds = self._spare.holds(base.k)
                state = deletion.follow(base, newer, self._spare.take(), holds)
            else:  # records added, or moved: K placed row by row (``addition.follow``)
                self._spare.take()
                state = addition.follow(base, newer, self.model)
            model = self.model
            if state.dtype != base.dtype and state.train_config.dtype == "auto":
                model = precision.promoted_network(
                    state.model_config, state.input_shape, state.layout.d
                )  # the worker promoted the model to float64 (``precision``)
                if getattr(model, "user", None) is not None:
                    impl = getattr(self.model, "ntk_implementation", None)
                    model = dataclasses.replace(model, ntk_implementation=impl)
            return PreparedVersion(base=base, state=state, model=model)

    def serve_prepared(self, prepared: PreparedVersion) -> bool:
        """Serve a version ``prepare_follow`` made, if it was made from the version served now
        (else nothing changes: prepare it again). Returns whether it is served."""
        with self._forget_lock:
            if self._state is not prepared.base:
                return False
            self.model = prepared.model  # before the state: a float64 network reads float32 states
            self._state = prepared.state
            self._retire(prepared.base, prepared.state)
            return True

    def after_follow(self, preconditioner: bool = True) -> dict[str, float]:
        """The work that follows a followed version (``follow``), off the wait of the requests for
        it: the Nyström preconditioner of the served K (solves run unpreconditioned until it is
        in: same answers, more iterations), then the spare K buffer. The preconditioner is computed
        without holding the model, and put in only if the version it was computed for is still
        the one served (a newer one followed meanwhile needs its own).

        Arguments:
          preconditioner: ``False``: make none (the version stays without one).

        Returns:
          seconds per part: ``preconditioner`` (0 when there was none to make), ``spare``.
        """
        t0 = time.perf_counter()
        st = self._state
        if preconditioner and st.nystrom is None:
            ny = lifecycle.preconditioner(
                st.k, st.solver_config, st.form, st.train_config.loss, one_core=True
            )
            if ny is not None:
                with self._forget_lock:
                    if self._state is st:
                        self._state = st.replace(nystrom=ny)
        seconds = {"preconditioner": time.perf_counter() - t0}
        seconds["spare"] = self.ready_spare()
        return seconds

    def follow_checkpoint(self, checkpoint_dir: Path, finish: bool = True) -> bool:
        """Follow the newest checkpoint under ``checkpoint_dir`` if it is newer (``follow``, with
        its ``finish``).

        Returns:
          whether a newer version is now served.
        """
        newer = self.read_newer(checkpoint_dir)
        if newer is not None:
            self.follow(newer, finish)
        return newer is not None

    def read_newer(self, checkpoint_dir: Path, reader=None) -> ModelState | None:
        """The newest checkpoint under ``checkpoint_dir`` (without K) if it is newer than the
        served version, else ``None`` (``checkpoint.restore_newer``, with its ``reader``: how the
        files are read, e.g. in another process).

        Raises:
          FileNotFoundError: the worker pruned the step while it was read (read again).
          OSError and orbax errors: the checkpoint could not be read.
        """
        return checkpoint.restore_newer(
            checkpoint_dir,
            self._state.version,
            lambda meta: jax_dtype(lifecycle.held_dtype(meta["meta"])),
            self._state.id_key,
            reader,
        )

    def _retire(self, old: ModelState, new: ModelState) -> None:
        """Offer the K of the version just replaced as the next spare buffer when the new K is
        its erasure (same shape and dtype): ``ready_spare`` reuses its memory once no request
        reads it, with the rows and columns of the points ``old`` holds and ``new`` lacks zeroed
        first (the others are zero in both: every erasure zeroes all but the kept points, and
        K's padding rows are zero)."""
        old_k = old.k
        erased = (
            old_k is not new.k
            and old_k.shape == new.k.shape
            and old_k.dtype == new.k.dtype
            and not new.layout.sharded
            and new.solver_config.spare_kernel
            # the records kept where they were and nothing added: new K is old K erased
            and np.array_equal(np.where(new.active, old.ids, ""), new.ids)
            and np.array_equal(np.asarray(new.x)[new.active], np.asarray(old.x)[new.active])
        )
        if not erased:
            self._spare.retire(None, np.zeros(0, np.int32), new.k)  # withdraw an older offer
            return
        gone = old.active & ~new.active
        self._spare.retire(old_k, new.layout.rows(np.flatnonzero(gone)), new.k)

    def ready_spare(self) -> float:
        """Make the spare K buffer the next deletion erases K into (``layout.SpareBuffer``).

        Returns:
          seconds spent (the operating system mapping and zeroing K's bytes once).
        """
        with self._forget_lock:  # not while a deletion is planned (it may take the spare)
            st = self._state
            seconds = self._spare.ready(
                st.k, st.solver_config.spare_kernel and not st.layout.sharded
            )
        if self._spare.reused:
            log.info("spare K buffer: the previous version's K, reused in %.2f s", seconds)
        return seconds
