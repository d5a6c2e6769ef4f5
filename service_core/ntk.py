"""The empirical NTK of a linearised network, computed in blocks and cached on disk.

Layout, stated once (math.md, Notation): K is point-major, output-minor. The engine keeps it as a
matrix:

* **full form**: shape ``(N·d, N·d)``, entry ``[i·d + a, j·d + b] = K(x_i, x_j)[a, b]``. It is the
  (N, N, d, d) tensor of neural-tangents with axes (i, a, j, b) flattened, so that a kernel-vector
  product is one matrix-vector product on contiguous memory.
* **trace form**: shape ``(N, N)``, K = k ⊗ I_d. Exact for one Dense layer (``linear``); an
  approximation for a finite-width MLP (the caller must label it so).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from . import sharding
from ._nt import nt
from .models import Model

log = logging.getLogger(__name__)


def kernel_bytes(n: int, d: int, form: str, dtype) -> int:
    """Bytes of K in the engine's layout."""
    side = n * d if form == "full" else n
    return side * side * np.dtype(dtype).itemsize


def _block_fn(model: Model, form: str):
    trace_axes = () if form == "full" else (-1,)
    fn = nt.empirical_ntk_fn(
        model.apply_fn,
        trace_axes=trace_axes,
        vmap_axes=0,
        implementation=nt.NtkImplementation.STRUCTURED_DERIVATIVES,
    )
    return jax.jit(lambda a, b: fn(a, b, model.params0))


def empirical_ntk(
    model: Model,
    x: np.ndarray,
    form: str = "full",
    block_size: int = 128,
    dtype=np.float32,
    progress: bool = True,
) -> np.ndarray:
    """K(X, X) of ``model`` at θ_0, in blocks of ``block_size`` points.

    Uses neural-tangents' STRUCTURED_DERIVATIVES (equal to JACOBIAN_CONTRACTION to float precision,
    about 100× faster here). Only blocks on or above the diagonal are computed; the rest mirror them.

    Arguments:
      model: the network; its ``params0`` is the linearisation point.
      x: inputs ``(N, ...)``.
      form: ``full`` → ``(N·d, N·d)``; ``trace`` → ``(N, N)`` (see module docstring). For the trace
        form neural-tangents returns the mean over the output diagonal, which equals k for k ⊗ I_d.
      block_size: points per block; the last block is padded so one compiled function serves all.
      dtype: dtype of the result.
      progress: show a progress bar.

    Returns:
      numpy array, the kernel in the engine's layout.
    """
    x = np.asarray(model.flatten_inputs(x), dtype=dtype)
    n, d = len(x), model.output_dim
    nb = -(-n // block_size)
    padded = np.zeros((nb * block_size, x.shape[1]), dtype=dtype)
    padded[:n] = x
    fn = _block_fn(model, form)
    side = n * d if form == "full" else n
    out = np.empty((side, side), dtype=dtype)
    pairs = [(i, j) for i in range(nb) for j in range(i, nb)]
    for i, j in tqdm(pairs, desc="NTK blocks", disable=not progress, leave=False):
        a = padded[i * block_size : (i + 1) * block_size]
        b = padded[j * block_size : (j + 1) * block_size]
        block = np.asarray(fn(a, b), dtype=dtype)
        r0, r1 = i * block_size, min((i + 1) * block_size, n)
        c0, c1 = j * block_size, min((j + 1) * block_size, n)
        block = block[: r1 - r0, : c1 - c0]
        if form == "full":
            block = block.transpose(0, 2, 1, 3).reshape((r1 - r0) * d, (c1 - c0) * d)
            r0, r1, c0, c1 = r0 * d, r1 * d, c0 * d, c1 * d
        out[r0:r1, c0:c1] = block
        if i != j:
            out[c0:c1, r0:r1] = block.T
    return out


def cache_key(model: Model, x: np.ndarray, form: str, dtype) -> str:
    """Hash of the data, the model configuration (incl. seed), the kernel form and dtype."""
    h = hashlib.sha256()
    h.update(np.ascontiguousarray(x, dtype=np.float32).tobytes())
    h.update(json.dumps(model.config.to_dict(), sort_keys=True).encode())
    h.update(json.dumps([form, np.dtype(dtype).name, list(np.shape(x)), model.output_dim]).encode())
    return h.hexdigest()[:24]


def cached_ntk(
    model: Model,
    x: np.ndarray,
    form: str,
    cache_dir: Path | None,
    dtype=np.float32,
    progress: bool = True,
) -> tuple[np.ndarray, dict]:
    """``empirical_ntk`` with an on-disk cache under ``cache_dir`` (``None``: no cache).

    Returns:
      ``(K, report)``, report = ``{"seconds", "bytes", "cached", "path"}`` (seconds: wall time).
    """
    t0 = time.perf_counter()
    path = None
    if cache_dir is not None:
        cache_dir = Path(cache_dir)
        path = cache_dir / f"ntk-{cache_key(model, x, form, dtype)}.npy"
        if path.exists():
            k = np.load(path)
            return k, {
                "seconds": time.perf_counter() - t0,
                "bytes": k.nbytes,
                "cached": True,
                "path": str(path),
            }
    k = empirical_ntk(model, x, form=form, dtype=dtype, progress=progress)
    if path is not None:
        cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp.npy")
        np.save(tmp, k)
        os.replace(tmp, path)
    return k, {
        "seconds": time.perf_counter() - t0,
        "bytes": k.nbytes,
        "cached": False,
        "path": str(path) if path else None,
    }


def purge_cache(cache_dir: Path | None) -> int:
    """Delete every cached kernel under ``cache_dir`` (they hold rows of forgotten points once a
    deletion has been applied). Returns the number of files removed."""
    if cache_dir is None or not Path(cache_dir).exists():
        return 0
    removed = 0
    for p in Path(cache_dir).glob("ntk-*.npy"):
        p.unlink(missing_ok=True)
        removed += 1
    return removed


def kernel_matvec(k: jax.Array, v: jax.Array, form: str) -> jax.Array:
    """K v for v of shape ``(N, d)``; ``k`` in the engine layout of ``form``. Returns ``(N, d)``.

    With a multi-device mesh in use (``sharding.use_mesh``), K's row blocks multiply on their devices.
    """
    mesh = sharding.current_mesh()
    if mesh is not None:
        return sharding.matvec(k, v if form == "trace" else v.reshape(-1), mesh).reshape(v.shape)
    if form == "trace":
        return jnp.matmul(k, v, precision=jax.lax.Precision.HIGHEST)
    return jnp.matmul(k, v.reshape(-1), precision=jax.lax.Precision.HIGHEST).reshape(v.shape)


def kernel_abs_matvec(k: jax.Array, v: jax.Array, form: str) -> jax.Array:
    """|K| v (entrywise absolute values of K) for v ``(N, d)``, by blocks of rows: no copy of K's
    size. Used to bound rounding errors (``training.rounding_floor``). Returns ``(N, d)``."""
    flat = v if form == "trace" else v.reshape(-1)
    mesh = sharding.current_mesh()
    if mesh is not None:
        return sharding.matvec(k, flat, mesh, op=_abs_rows_matvec).reshape(v.shape)
    return _abs_rows_matvec_jit(k, flat).reshape(v.shape)


def _abs_rows_matvec(k: jax.Array, v: jax.Array) -> jax.Array:
    rows = k.shape[0]
    block = next(b for b in range(min(rows, 1024), 0, -1) if rows % b == 0)
    blocks = k.reshape(rows // block, block, k.shape[1])
    out = jax.lax.map(
        lambda kb: jnp.matmul(jnp.abs(kb), v, precision=jax.lax.Precision.HIGHEST), blocks
    )
    return out.reshape((rows,) + v.shape[1:])


_abs_rows_matvec_jit = jax.jit(_abs_rows_matvec)


def kernel_to_4d(k: np.ndarray, n: int, d: int) -> np.ndarray:
    """Full-form matrix ``(N·d, N·d)`` → neural-tangents' ``(N, N, d, d)``."""
    return np.asarray(k).reshape(n, d, n, d).transpose(0, 2, 1, 3)


_CROSS_FNS: dict = {}


def cross_ntk(
    model: Model,
    x_test: np.ndarray,
    x_train: np.ndarray,
    form: str = "full",
    block_size: int = 128,
    dtype=np.float32,
) -> np.ndarray:
    """K(X_t, X) of ``model`` at θ_0 between test and training points, in blocks of ``block_size``.

    Both sets are padded to whole blocks, so one compiled function serves every request size.

    Arguments:
      x_test: ``(n_t, ...)``; x_train: ``(N, ...)``; form, dtype: as ``empirical_ntk``.

    Returns:
      numpy ``(n_t·d, N·d)`` (full: row t·d + a, column j·d + b holds K(x_t, x_j)[a, b]) or
      ``(n_t, N)`` (trace).
    """
    xt = np.asarray(model.flatten_inputs(x_test), dtype=dtype)
    xs = np.asarray(model.flatten_inputs(x_train), dtype=dtype)
    n_t, n, d = len(xt), len(xs), model.output_dim

    def padded(a):
        out = np.zeros((-(-len(a) // block_size) * block_size, a.shape[1]), dtype=dtype)
        out[: len(a)] = a
        return out

    key = (id(model), form)
    cached = _CROSS_FNS.get(key)
    if cached is None or cached[0] is not model:  # compiled once per model, not per request
        cached = _CROSS_FNS[key] = (model, _block_fn(model, form))
    fn = cached[1]
    xt_p, xs_p = padded(xt), padded(xs)
    blocks = []
    for i in range(0, len(xt_p), block_size):
        row = [
            np.asarray(fn(xt_p[i : i + block_size], xs_p[j : j + block_size]), dtype=dtype)
            for j in range(0, len(xs_p), block_size)
        ]
        blocks.append(np.concatenate(row, axis=1))
    k = np.concatenate(blocks, axis=0)[:n_t, :n]
    if form == "full":
        k = k.transpose(0, 2, 1, 3).reshape(n_t * d, n * d)
    return np.ascontiguousarray(k)
