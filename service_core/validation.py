"""Checks of what callers hand the engine: inputs, targets and forget sets, against one version."""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from .data import targets_matrix
from .errors import AlreadyForgottenError, InvalidForgetSetError, InvalidInputError, UnknownIdsError
from .state import ModelState


def inputs(x, input_shape: tuple[int, ...], dtype, bound_dtype=None) -> jax.Array:
    """Rows of ``x`` as model inputs ``(n, *input_shape)`` in ``dtype``; rows may be flattened.

    Raises:
      InvalidInputError: as ``input_rows``.
    """
    return jnp.asarray(input_rows(x, input_shape, dtype, bound_dtype))


def input_rows(x, input_shape: tuple[int, ...], dtype, bound_dtype=None) -> np.ndarray:
    """``inputs`` as a host (numpy) array, with no JAX dispatch: for request threads. The
    magnitude bound is ``bound_dtype``'s (default ``dtype``; ``ModelState.bound_dtype``).

    Raises:
      InvalidInputError: not numeric, empty, wrong row shape, NaN or infinite values, or values so
        large that the network's products would overflow ``dtype``.
    """
    try:
        arr = np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise InvalidInputError(f"x must be a numeric array: {exc}") from None
    flat = math.prod(input_shape)
    if arr.ndim < 2 or arr.shape[0] == 0:
        raise InvalidInputError(
            f"x must be a non-empty list of rows, each of shape {list(input_shape)} or {flat} values"
        )
    # Flat training inputs take rows of any shape with as many values, flattened row-major as the
    # loaders flatten them: MNIST's 28 × 28 images are stored as 784 values.
    reshapable = len(input_shape) == 1 and int(np.prod(arr.shape[1:])) == flat
    if arr.shape[1:] != tuple(input_shape) and arr.shape[1:] != (flat,) and not reshapable:
        raise InvalidInputError(
            f"x rows have shape {list(arr.shape[1:])}; expected {list(input_shape)} (or {flat} values flattened)"
        )
    # One reduction for both checks (NaN propagates through max): a few of numpy's per-call
    # overheads fewer for each small request.
    largest = float(np.abs(arr).max())
    if not math.isfinite(largest):
        raise InvalidInputError("x has NaN or infinite values")
    dtype = jnp.dtype(dtype)
    bound = jnp.dtype(dtype if bound_dtype is None else bound_dtype)
    limit = _input_limit(bound)
    if largest > limit:
        raise InvalidInputError(
            f"x has values beyond ±{limit:.1e}, too large for the model's {bound.name} network"
        )
    return arr.reshape((arr.shape[0],) + tuple(input_shape)).astype(dtype)


@functools.cache
def _input_limit(dtype: np.dtype) -> float:
    """The largest input magnitude accepted in ``dtype``: √max, headroom for the network's
    products."""
    return float(jnp.finfo(dtype).max) ** 0.5


@functools.cache
def _target_limit(dtype: np.dtype) -> float:
    """The largest regression target magnitude accepted in ``dtype``: max^(1/4), headroom for
    the residuals' squares and α = O(y/λ) (a target of 1e300 made an addition's solve non-finite
    and failed the jobs batched with it)."""
    return float(jnp.finfo(dtype).max) ** 0.25


def targets(y, n: int, task: str, d: int, dtype, bound_dtype=None) -> jax.Array:
    """Targets for ``n`` test points: class labels ``(n,)`` or target vectors ``(n, d)``.

    Returns:
      the target matrix ``(n, d)`` (one-hot for labels).

    Raises:
      InvalidInputError: what to fix (the shape, labels out of range, non-finite values, or
        regression targets beyond ``_target_limit``).
    """
    try:
        arr = np.asarray(y, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise InvalidInputError(f"y must be numeric: {exc}") from None
    if arr.shape[:1] != (n,):
        raise InvalidInputError(f"y has {arr.shape[0] if arr.ndim else 0} entries; x has {n} rows")
    if not np.all(np.isfinite(arr)):
        raise InvalidInputError("y has NaN or infinite values")
    if task == "classification":
        if arr.ndim != 1 or np.any(arr != np.round(arr)) or np.any(arr < 0) or np.any(arr >= d):
            raise InvalidInputError(
                f"y must be class labels: integers in [0, {d - 1}], one per row of x"
            )
        return jnp.asarray(targets_matrix(arr.astype(np.int64), "classification", d), dtype)
    if arr.shape == (n,) and d == 1:
        arr = arr.reshape(n, 1)  # one output: a number per row, as the loaders take it
    if arr.shape != (n, d):
        raise InvalidInputError(f"y must have shape [{n}, {d}] (one target vector per row of x)")
    bound = jnp.dtype(dtype if bound_dtype is None else bound_dtype)
    limit = _target_limit(bound)
    if arr.size and float(np.abs(arr).max()) > limit:
        raise InvalidInputError(
            f"y has values beyond ±{limit:.1e}, too large for the model's {bound.name} network: "
            "scale the targets down"
        )
    return jnp.asarray(arr, dtype)


def forget_set(
    state: ModelState, ids: Sequence[str], pending: frozenset[str] = frozenset()
) -> None:
    """Check a forget request against a version and the ids queued.

    Raises:
      InvalidForgetSetError: empty, not strings, duplicated, or would leave no training point.
      UnknownIdsError: ids that were never in the training set.
      AlreadyForgottenError: ids forgotten already or in ``pending``.
    """
    if not isinstance(ids, list | tuple) or len(ids) == 0:
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
    active = state.index
    forgotten = set(state.forgotten)  # keyed digests (ModelState.digest)
    gone_before = {i for i in ids if i not in active and state.digest(i) in forgotten}
    unknown = [i for i in ids if i not in active and i not in gone_before]
    if unknown:
        raise UnknownIdsError(unknown)
    gone = [i for i in ids if i in gone_before or i in pending]
    if gone:
        raise AlreadyForgottenError(gone)
    remaining = state.n - len(set(ids) | (set(pending) & set(active)))
    if remaining < 1:
        raise InvalidForgetSetError(
            f"forgetting these {len(ids)} ids (with {len(pending)} queued) would remove every remaining "
            "training point; at least one must remain"
        )
