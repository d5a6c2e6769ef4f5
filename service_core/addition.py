"""Adding records to a trained model: the next version trained on D ∪ A, from the current α.

K gains the rows and columns of the new points (their NTK with the active points and among
themselves; nothing else is recomputed), α gains zero rows there, and Newton re-solves the dual
risk (docs/maths.md, Eq. (R) on D ∪ A, |𝒮| = N + k) warm from the current α. θ follows by
Eq. (D). The new points take free rows (rows of forgotten points, or padding); when there are
too few, every array grows to the next capacity bucket.

An id that was forgotten may be added again: it is then a new record (its id leaves the
``forgotten`` list of the state; the deletion log keeps the earlier deletion).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import NamedTuple

import jax.numpy as jnp
import numpy as np

from . import lifecycle, sharding, validation
from .dual import DualProblem, certified_floor, newton
from .errors import AlreadyForgottenError, InvalidForgetSetError, InvalidInputError, SolverError
from .layout import pad_rows
from .linalg.result import SolveInfo
from .models import Network
from .state import ModelState, VersionRecord, bucket


class AlreadyActiveError(AlreadyForgottenError):
    """Ids that are already in the training set (an addition needs new ids)."""

    _what = "id(s) are already in the training set"


class QueuedIdsError(AlreadyForgottenError):
    """Ids held by a queued or running job (a forget or an addition)."""

    _what = "id(s) are held by a queued or running job (a forget or an addition)"


class AddResult(NamedTuple):
    """What an addition did: the new version, the records added, the Newton solve (a
    ``SolveInfo``, as ``ForgetResult.solve``; its Newton steps in ``newton_steps``), its residual,
    whether K grew to a larger capacity, seconds per part (``kernel``, ``solve``, ``total``), the
    new version's certificate (``ModelState.certificate``), its active and forgotten counts."""

    version: int
    n_added: int
    solve: SolveInfo
    residual: float
    grew: bool
    timings: dict
    certificate: dict | None = None
    n_train: int = 0
    n_forgotten: int = 0
    newton_steps: int = 0


def plan(
    state: ModelState, model: Network, ids: Sequence[str], x, y
) -> tuple[ModelState, AddResult]:
    """The next version of ``state`` with the records ``(ids, x, y)`` added; nothing is published.

    Arguments:
      ids: new ids (non-empty, distinct, none active).
      x: inputs ``(k, *input_shape)`` (rows may be flattened); y: labels ``(k,)`` or targets
        ``(k, d)``, as for training.

    Raises:
      InvalidForgetSetError: empty, duplicated or empty-string ids.
      AlreadyActiveError: ids already in the training set (listed).
      InvalidInputError: x or y of the wrong shape, or not finite.
      ResourceError: the grown K would not fit the devices.
      SolverError: Newton did not reach the training tolerance (the model is unchanged).
    """
    t0 = time.perf_counter()
    ids, xt, yt = validate(state, ids, x, y)
    dtype = state.x.dtype
    layout = state.layout
    active = state.active
    old_points = np.flatnonzero(active)
    free = np.flatnonzero(~active)
    cap = state.capacity
    grew = len(free) < len(ids)
    k_np = np.asarray(state.k)
    arrays = {name: state_array for name, state_array in state.arrays().items() if name != "theta"}
    ids_arr = np.asarray(state.ids)
    if grew:
        cap = grown_capacity(state, len(ids))
        check_fits(state, len(ids))
        side = layout.side(cap)
        k_np = np.pad(k_np, ((0, side - k_np.shape[0]), (0, side - k_np.shape[1])))
        arrays = {name: pad_rows(a, cap) for name, a in arrays.items()}
        ids_arr = pad_rows(ids_arr, cap)
        free = np.flatnonzero(ids_arr == "")
    new_points = free[: len(ids)]
    t1 = time.perf_counter()
    # K's new blocks: K(X_A, X_D) and K(X_A, X_A) (the symmetric assembly for the latter)
    x_old = np.asarray(state.x)[old_points]
    k_ad = model.cross_kernel(xt, x_old, layout.form)
    k_aa, _ = model.train_kernel(xt, layout.form, None, False)
    rows_a, rows_d = layout.rows(new_points), layout.rows(old_points)
    k_np = np.array(k_np, copy=True) if not grew else k_np
    k_np[np.ix_(rows_a, rows_d)] = k_ad
    k_np[np.ix_(rows_d, rows_a)] = np.asarray(k_ad).T
    k_np[np.ix_(rows_a, rows_a)] = k_aa
    k = layout.place(k_np.astype(dtype, copy=False))
    t2 = time.perf_counter()
    at = jnp.asarray(new_points)
    x_new = jnp.asarray(arrays["x"]).at[at].set(xt.reshape((len(ids),) + arrays["x"].shape[1:]))
    y_new = jnp.asarray(arrays["y"]).at[at].set(yt)
    f0_new = jnp.asarray(arrays["f0"]).at[at].set(model.offset(xt).astype(dtype))
    alpha0 = jnp.asarray(arrays["alpha"]).at[at].set(0.0)
    # Widened to the longest id: a fixed-width string array would cut a longer new id short.
    width = max([len(i) for i in ids] + [int(ids_arr.dtype.itemsize // 4) if ids_arr.size else 1])
    ids_arr = np.array(ids_arr, dtype=f"<U{max(width, 1)}", copy=True)
    ids_arr[new_points] = ids
    mask = ids_arr != ""
    train_cfg, solver_cfg = state.train_config, state.solver_config
    problem = DualProblem(
        k, layout, f0_new, y_new, jnp.asarray(mask), train_cfg.lam, train_cfg.loss
    )
    ny = lifecycle.preconditioner(k, solver_cfg, layout.form, train_cfg.loss)
    options = lifecycle.solve_options(
        solver_cfg, train_cfg.dtype, accept_floor=train_cfg.accept_floor
    ).replace(nystrom=ny)
    tol = train_cfg.resolved_tol()
    alpha, info = newton(problem, alpha0, tol, train_cfg.max_newton, options)
    if not lifecycle.finite(alpha, info.residual):
        raise SolverError(lifecycle.non_finite("the addition", train_cfg, alpha.dtype))
    if not (info.converged and train_cfg.certified(info.residual)):
        raise SolverError(
            f"the addition's Newton solve stopped at relative stationarity residual "
            f"{info.residual:.2e} after {info.steps} steps (tolerance {tol:.0e})"
            + lifecycle.floor_hint(info.floor, alpha.dtype)
            + "; the model is unchanged"
        )
    t3 = time.perf_counter()
    theta = model.theta(x_new, alpha)
    solve = {**info.as_solve_info().to_dict(), "newton_steps": info.steps}
    record = VersionRecord(
        state.version + 1, 0, solve, info.residual, reason=f"added {len(ids)} records",
        rounding_floor=certified_floor(problem, alpha, info.floor), newton_steps=info.steps, tolerance=tol,
        accept_floor=train_cfg.accept_floor, dtype=np.dtype(alpha.dtype).name,
    )  # fmt: skip
    added = {state.digest(i) for i in ids}  # forgotten ids are kept as keyed digests
    new_state = state.replace(
        version=state.version + 1, ids=ids_arr, x=x_new, y=y_new, k=k, f0=f0_new, alpha=alpha,
        theta=theta, residual=info.residual,
        forgotten=tuple(i for i in state.forgotten if i not in added),
        history=state.history + (record.to_dict(),), f_star=problem.outputs(alpha), nystrom=ny,
        k_origin=None,  # rows computed here: another process's may differ by rounding
    )  # fmt: skip
    t4 = time.perf_counter()
    timings = {"kernel": t2 - t1, "solve": t3 - t2, "total": t4 - t0}
    result = AddResult(
        new_state.version, len(ids), info.as_solve_info(), info.residual, grew, timings,
        new_state.certificate(), new_state.n, len(new_state.forgotten), info.steps,
    )  # fmt: skip
    return new_state, result


def validate(
    state: ModelState, ids: Sequence[str], x, y, pending: frozenset[str] = frozenset()
) -> tuple[list[str], jnp.ndarray, jnp.ndarray]:
    """Check an addition against a version and the ids queued; nothing is computed.

    Arguments:
      ids: the new ids; x: inputs ``(k, *input_shape)`` or ``(k, prod(input_shape))``; y: labels
        ``(k,)`` or targets ``(k, d)``; pending: ids of queued or running jobs (any kind).

    Returns:
      ``(ids, x, y)``: the ids as strings, x as inputs ``(k, *input_shape)`` and y as the target
      matrix ``(k, d)`` (one-hot for labels), both in the model's dtype.

    Raises:
      InvalidForgetSetError: empty, duplicated or empty-string ids.
      AlreadyActiveError: ids already in the training set (listed).
      QueuedIdsError: ids held by a queued or running job (listed).
      InvalidInputError: x or y of the wrong shape or length, or not finite.
    """
    if not isinstance(ids, list | tuple) or not all(isinstance(i, str) for i in ids):
        raise InvalidForgetSetError("ids to add must be a list of strings (new record ids)")
    ids = list(ids)
    if not ids or any(not i for i in ids) or len(set(ids)) != len(ids):
        dup = sorted({i for i in ids if ids.count(i) > 1})
        raise InvalidForgetSetError(
            "ids to add must be a non-empty list of distinct, non-empty strings"
            + (f" (duplicated: {', '.join(dup[:20])})" if dup else "")
        )
    present = [i for i in ids if i in state.index]
    if present:
        raise AlreadyActiveError(present, "Give new records new ids.")
    queued = [i for i in ids if i in pending]
    if queued:
        raise QueuedIdsError(queued, "Wait for that job to finish.")
    dtype = state.x.dtype
    xt = validation.inputs(x, state.input_shape, dtype, state.bound_dtype)
    if xt.shape[0] != len(ids):
        raise InvalidInputError(
            f"x has {xt.shape[0]} rows for {len(ids)} ids: give one row of x (and one y) per id"
        )
    yt = validation.targets(y, len(ids), state.task, state.layout.d, dtype, state.bound_dtype)
    return ids, xt, yt


def grown_capacity(state: ModelState, n_more: int) -> int:
    """Row capacity after adding ``n_more`` points: the current one while the free rows
    (forgotten or padding) hold them, else the next bucket (``state.bucket``)."""
    if state.capacity - state.n >= n_more:
        return state.capacity
    layout = state.layout
    return max(bucket(state.n + n_more, layout.devices), state.capacity + layout.devices)


def check_fits(state: ModelState, n_more: int) -> None:
    """Refuse, before any work, an addition of ``n_more`` points whose K would not fit the
    devices' memory plan (``sharding.plan_memory``, 60 % of the smallest device).

    Raises:
      ResourceError: naming K's bytes, per device with the solver's working copy, and the limit.
    """
    cap = grown_capacity(state, n_more)
    layout = state.layout
    devices = list(layout.mesh.devices.flat) if layout.mesh is not None else _devices(state)
    memory = sharding.plan_memory(layout.side(cap), state.x.dtype.itemsize, devices, 0.6)
    what = (
        f"adding {n_more} records ({state.n + n_more} points, capacity {cap}; K "
        f"{memory.kernel_bytes} bytes, {memory.working_bytes} per device with the working copy)"
    )
    sharding.check_fits(memory, what)


def follow(state: ModelState, newer: ModelState, model: Network) -> ModelState:
    """``newer`` (a later version read from its checkpoint, without K) with K, when it is not
    ``state`` with points removed (``deletion.follows_by_removal``): records added (an id
    forgotten and added again is a new record), possibly with deletions between, or kept records
    in other rows than a compaction puts them. K's entries
    between points both versions hold are copied from ``state``'s K, and only the blocks of the
    new points are computed (``cross_kernel`` against the kept points, the symmetric assembly
    among themselves), as ``plan`` computed them. No preconditioner: the caller makes one from
    that K (``Unlearner.after_follow``).

    Raises:
      ValueError: ``newer`` is not a later version of ``state``'s model.
    """
    if newer.version <= state.version:
        raise ValueError(f"version {newer.version} does not follow version {state.version}")
    layout = state.layout
    active = np.flatnonzero(newer.active)
    x_new, x_old = np.asarray(newer.x), np.asarray(state.x)
    # held: the same record (id and x); an id forgotten and added again is another record
    held = np.array(
        [i in state.index and np.array_equal(x_new[p], x_old[state.index[i]])
         for p, i in zip(active, newer.ids[active], strict=True)],
        bool,
    )  # fmt: skip
    kept, added = active[held], active[~held]
    old_rows = layout.rows(np.array([state.index[i] for i in newer.ids[kept]], int))
    k_old = np.asarray(state.k)
    side = layout.side(newer.capacity)
    k_np = np.zeros((side, side), k_old.dtype)
    rows_k, rows_a = layout.rows(kept), layout.rows(added)
    k_np[np.ix_(rows_k, rows_k)] = k_old[np.ix_(old_rows, old_rows)]
    if len(added):
        xa = jnp.asarray(x_new[added], state.x.dtype)
        if len(kept):
            k_ad = np.asarray(
                model.cross_kernel(xa, jnp.asarray(x_new[kept], state.x.dtype), layout.form)
            )
            k_np[np.ix_(rows_a, rows_k)] = k_ad
            k_np[np.ix_(rows_k, rows_a)] = k_ad.T
        k_aa, _ = model.train_kernel(xa, layout.form, None, False)
        k_np[np.ix_(rows_a, rows_a)] = np.asarray(k_aa)
    k = layout.place(k_np.astype(newer.alpha.dtype, copy=False))
    m = jnp.asarray(newer.active, k.dtype)[:, None]
    f_star = newer.f0 + layout.matvec(k, newer.alpha * m)
    return newer.replace(k=k, layout=layout, nystrom=None, f_star=f_star, k_origin=None)


def _devices(state: ModelState) -> list:
    return list(state.k.devices())
