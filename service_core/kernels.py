"""Kernel matrices computed in blocks, and the one on-disk kernel cache.

Both NTKs the engine uses go through ``blocked``: the empirical NTK of a finite network
(neural-tangents ``empirical_ntk_fn``, ``empirical_block_fn``) and the analytic NTK of an infinitely
wide one (``stax`` ``kernel_fn``, ``models.KernelModel``). The result is in the layout of
``service_core.layout`` (full form ``(n1·d, n2·d)``, or trace form ``(n1, n2)``). Cached kernels are
files ``ntk-<key>.npy`` under one directory; they hold rows of the points they were computed on,
so ``purge_cache`` deletes them all once a deletion is published.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

import jax
import numpy as np
from tqdm.auto import tqdm

from ._nt import nt

# neural-tangents' empirical-NTK implementations, by the name the service reports.
NTK_IMPLEMENTATIONS = {
    "structured_derivatives": nt.NtkImplementation.STRUCTURED_DERIVATIVES,
    "jacobian_contraction": nt.NtkImplementation.JACOBIAN_CONTRACTION,
    "ntk_vector_products": nt.NtkImplementation.NTK_VECTOR_PRODUCTS,
}

_log = logging.getLogger(__name__)


def empirical_block_fn(
    apply_fn: Callable, params, form: str, implementation: str = "structured_derivatives"
) -> Callable:
    """K(A, B) of a network at ``params`` by neural-tangents' ``empirical_ntk_fn``: ``(n1, n2, d, d)``
    for the full form, ``(n1, n2)`` for the trace form (the mean over the output diagonal, k for
    k ⊗ I_d).

    ``implementation`` (``NTK_IMPLEMENTATIONS``): ``structured_derivatives`` by default (equal to
    ``jacobian_contraction`` to float precision and about 100× faster on the stax networks);
    ``choose_implementation`` measures them for a user's network."""
    fn = nt.empirical_ntk_fn(
        apply_fn,
        trace_axes=() if form == "full" else (-1,),
        vmap_axes=0,
        implementation=NTK_IMPLEMENTATIONS[implementation],
    )
    return jax.jit(lambda a, b: fn(a, b, params))


def choose_implementation(
    apply_fn: Callable, params, x: np.ndarray, form: str, rtol: float
) -> tuple[str, dict]:
    """The fastest empirical-NTK implementation that gives this network's kernel correctly.

    Each of ``NTK_IMPLEMENTATIONS`` computes K(x, x) on the sample ``x`` (a block's worth of
    training inputs); the best of three calls after the first (which compiles) is timed. One that raises, or whose
    kernel differs from ``jacobian_contraction`` (the plain J Jᵀ, the reference) by more than
    ``rtol`` relative in the Frobenius norm, is not used.

    Returns:
      ``(name, report)``: report ``{name: {"seconds", "rel_diff"} or {"error"}}``.

    Raises:
      ValueError: even the reference fails (the message names neural-tangents' error).
    """
    report: dict[str, dict] = {}
    kernels: dict[str, np.ndarray] = {}
    for name in ("jacobian_contraction", "structured_derivatives", "ntk_vector_products"):
        try:
            fn = empirical_block_fn(apply_fn, params, form, name)
            np.asarray(fn(x, x))
            times = []
            for _ in range(3):
                t0 = time.perf_counter()
                k = np.asarray(fn(x, x))
                times.append(time.perf_counter() - t0)
            report[name] = {"seconds": min(times)}
            kernels[name] = k
        except Exception as e:  # an implementation that does not support this function
            report[name] = {"error": f"{type(e).__name__}: {' '.join(str(e).split())[:200]}"}
            if name == "jacobian_contraction":
                raise ValueError(
                    f"the empirical NTK of this network failed: {report[name]['error']}"
                ) from None
    ref = kernels["jacobian_contraction"]
    scale = max(float(np.linalg.norm(ref)), np.finfo(ref.dtype).tiny)
    usable = []
    for name, k in kernels.items():
        diff = float(np.linalg.norm(k - ref)) / scale
        report[name]["rel_diff"] = diff
        if np.all(np.isfinite(k)) and diff <= rtol:
            usable.append((report[name]["seconds"], name))
    return min(usable)[1] if usable else "jacobian_contraction", report


def blocked(
    block_fn: Callable,
    a: np.ndarray,
    b: np.ndarray | None = None,
    *,
    block_size: int,
    dtype,
    progress: bool = False,
    self_block_fn: Callable | None = None,
    pad_with_first: bool = False,
) -> np.ndarray:
    """K(A, B) assembled from ``block_size`` × ``block_size`` blocks of ``block_fn``.

    Arguments:
      block_fn: ``(A_block, B_block) -> (bs, bs)`` (trace form) or ``(bs, bs, d, d)`` (full form,
        turned into ``(bs·d, bs·d)`` point-major rows).
      a: inputs ``(n1, ...)``; b: ``(n2, ...)``, or ``None`` for B = A: then only blocks on and above
        the diagonal are computed and the rest mirrored (K is symmetric).
      block_size: points per block side; edge blocks are padded so one compiled function serves
        them all (pad rows are cut away).
      dtype: dtype of the result.
      progress: show a progress bar over blocks.
      self_block_fn: ``A_block -> block`` for diagonal blocks of a symmetric K (the analytic NTK is
        exact there only when told the pairs (i, i) are identical).
      pad_with_first: pad with copies of the first row instead of zeros (a zero input has zero
        variance when b_std = 0, and the analytic formulas would divide by it).

    Returns:
      numpy ``(n1·d, n2·d)`` or ``(n1, n2)``.
    """
    symmetric = b is None
    b = a if symmetric else b
    n1, n2 = len(a), len(b)
    bs = max(1, min(block_size, max(n1, n2)))
    pa, pb = _padded(a, bs, pad_with_first), (None if symmetric else _padded(b, bs, pad_with_first))
    pb = pa if symmetric else pb
    out = None
    pairs = [
        (i, j) for i in range(-(-n1 // bs)) for j in range(i if symmetric else 0, -(-n2 // bs))
    ]
    # disable=None: a bar only on a terminal; in a log file tqdm's carriage returns made one
    # line of every update (the service's log at a build)
    for i, j in tqdm(pairs, desc="kernel blocks", disable=None if progress else True, leave=False):
        xa, xb = pa[i * bs : (i + 1) * bs], pb[j * bs : (j + 1) * bs]
        diag = symmetric and i == j and self_block_fn is not None
        block = np.asarray(self_block_fn(xa) if diag else block_fn(xa, xb), dtype=dtype)
        r0, r1, c0, c1 = i * bs, min((i + 1) * bs, n1), j * bs, min((j + 1) * bs, n2)
        block = block[: r1 - r0, : c1 - c0]
        d = 1
        if block.ndim == 4:  # full form: (i, j, a, b) → rows (i, a), columns (j, b)
            d = block.shape[2]
            block = block.transpose(0, 2, 1, 3).reshape((r1 - r0) * d, (c1 - c0) * d)
        if out is None:
            out = np.empty((n1 * d, n2 * d), dtype=dtype)
        out[r0 * d : r1 * d, c0 * d : c1 * d] = block
        if symmetric and i != j:
            out[c0 * d : c1 * d, r0 * d : r1 * d] = block.T
    return out


def _padded(x: np.ndarray, bs: int, with_first: bool) -> np.ndarray:
    n = len(x)
    extra = -(-n // bs) * bs - n
    fill = (
        np.repeat(x[:1], extra, axis=0) if with_first else np.zeros((extra,) + x.shape[1:], x.dtype)
    )
    return np.concatenate([x, fill])


def cache_key(config: dict, x: np.ndarray, *parts) -> str:
    """Hash of the inputs, the model configuration and whatever else shapes the kernel (``parts``:
    its kind, form, dtype, d)."""
    h = hashlib.sha256()
    h.update(np.ascontiguousarray(x, dtype=np.float32).tobytes())
    h.update(json.dumps(config, sort_keys=True).encode())
    h.update(json.dumps([*parts, list(np.shape(x))]).encode())
    return h.hexdigest()[:24]


def cached(
    cache_dir: Path | None, key: str, compute: Callable[[], np.ndarray]
) -> tuple[np.ndarray, dict]:
    """``compute()`` with an on-disk cache ``cache_dir/ntk-<key>.npy`` (``None``: no cache). Written
    to a temporary file and renamed: a crash never leaves a half-written kernel behind. A write
    that fails (a full or read-only disk) is a warning, and the kernel is returned uncached.

    Returns:
      ``(K, report)``, report = ``{"seconds", "bytes", "cached", "path"}`` (seconds: wall time).
    """
    t0 = time.perf_counter()
    path = None if cache_dir is None else Path(cache_dir) / f"ntk-{key}.npy"
    if path is not None and path.exists():
        k = np.load(path)
        return k, {
            "seconds": time.perf_counter() - t0,
            "bytes": k.nbytes,
            "cached": True,
            "path": str(path),
        }
    k = compute()
    if path is not None:
        # Its own temporary file: processes restoring together may compute the same kernel.
        tmp = path.with_suffix(f".{os.getpid()}.tmp.npy")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            np.save(tmp, k)
            os.replace(tmp, path)
        except OSError as e:  # a full or read-only disk: a cache only saves time next start
            _log.warning("could not cache the kernel at %s (%s): not cached", path, e)
            tmp.unlink(missing_ok=True)
            path = None
    report = {"seconds": time.perf_counter() - t0, "bytes": k.nbytes, "cached": False}
    return k, {**report, "path": str(path) if path else None}


def purge_cache(cache_dir: Path | None, keep: str | Path | None = None) -> int:
    """Delete every cached kernel under ``cache_dir`` (they hold rows of forgotten points once a
    deletion has been applied), and half-written ones, but ``keep`` (a path ``cached`` reported).
    Returns the number of files removed."""
    if cache_dir is None or not Path(cache_dir).exists():
        return 0
    kept = None if keep is None else Path(keep).name
    removed = 0
    for p in Path(cache_dir).glob("ntk-*.npy"):
        if p.name != kept:
            p.unlink(missing_ok=True)
            removed += 1
    return removed
