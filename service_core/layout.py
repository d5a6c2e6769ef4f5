"""K's layout, stated once, and all of its index arithmetic (docs/maths.md, Notation).

K is point-major, output-minor, kept as a matrix:

* **full form**: shape ``(C·d, C·d)``, entry ``[i·d + a, j·d + b] = K(x_i, x_j)[a, b]``: the
  ``(C, C, d, d)`` tensor of neural-tangents with axes (i, a, j, b) flattened, so that a
  kernel-vector product is one matrix-vector product on contiguous memory;
* **trace form**: shape ``(C, C)``, K = k ⊗ I_d. Exact for one Dense layer and for the analytic NTK
  of an infinitely wide network; an approximation for a finite-width MLP.

C is the capacity (``state.bucket``): rows of points that are not active (padding, or forgotten
since the last compaction) are zero in K's rows and columns. With a multi-device mesh, K's rows are
split over the devices (``sharding``) and products run on each device's rows.
"""

from __future__ import annotations

import ctypes
import dataclasses
import sys
import time
import warnings
import weakref
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from . import sharding

_HI = jax.lax.Precision.HIGHEST


@dataclasses.dataclass(frozen=True)
class KernelLayout:
    """How K is stored: its form, the output dimension d and the devices its rows live on.

    Hashable: jitted solvers take it as a static argument.

    Attributes:
      form: ``full`` or ``trace`` (module docstring).
      d: outputs per point.
      mesh: a 1-D device mesh K's rows are split over, or ``None`` for one device.
    """

    form: str
    d: int
    mesh: Mesh | None = None

    @property
    def sharded(self) -> bool:
        """Whether K's rows are split over several devices."""
        return self.mesh is not None and self.mesh.size > 1

    @property
    def devices(self) -> int:
        return 1 if self.mesh is None else self.mesh.size

    def side(self, capacity: int) -> int:
        """Rows of K for ``capacity`` points."""
        return capacity * self.d if self.form == "full" else capacity

    def rows(self, points: np.ndarray) -> np.ndarray:
        """K's rows of the points ``points`` (int ``(n,)``): ``(n·d,)`` for the full form."""
        points = np.asarray(points)
        if self.form == "trace":
            return points
        return (points[:, None] * self.d + np.arange(self.d)).ravel()

    def row_mask(self, points: jax.Array) -> jax.Array:
        """A bool mask over points ``(C,)`` as a mask over K's rows."""
        return jnp.repeat(points, self.d) if self.form == "full" else points

    def place(self, k) -> jax.Array:
        """K on this layout's devices, rows split (``sharding.place``)."""
        return sharding.place(k, self.mesh)

    def embed(self, k: np.ndarray, points: np.ndarray, capacity: int) -> jax.Array:
        """K of the points ``points`` (numpy, in this layout) written into a zero K of ``capacity``
        points at their rows, and placed on the devices (build pads; restore scatters)."""
        side = self.side(capacity)
        rows = self.rows(points)
        if len(rows) == side and np.array_equal(rows, np.arange(side)):
            return self.place(k)
        if np.array_equal(rows, np.arange(len(rows))):
            pad = side - len(rows)
            return self.place(np.pad(k, ((0, pad), (0, pad))))
        full = np.zeros((side, side), dtype=k.dtype)
        full[np.ix_(rows, rows)] = k
        return self.place(full)

    # -- products -------------------------------------------------------------------------------
    def matvec(self, k: jax.Array, v: jax.Array) -> jax.Array:
        """K v for v ``(C, d)`` → ``(C, d)``; on the devices' row blocks when sharded."""
        flat = v if self.form == "trace" else v.reshape(-1)
        if self.sharded:
            return sharding.matvec(k, flat, self.mesh).reshape(v.shape)
        return jnp.matmul(k, flat, precision=_HI).reshape(v.shape)

    def abs_matvec(self, k: jax.Array, v: jax.Array) -> jax.Array:
        """|K| v (entrywise absolute values of K) for v ``(C, d)``, by blocks of rows: no copy of
        K's size. Bounds rounding errors (``dual.rounding_floor``, ``linalg.SPDSystem``)."""
        flat = v if self.form == "trace" else v.reshape(-1)
        if self.sharded:
            return sharding.matvec(k, flat, self.mesh, op=_abs_rows_matvec).reshape(v.shape)
        return _abs_rows_matvec_jit(k, flat).reshape(v.shape)

    def columns_matvec(self, k: jax.Array, points: np.ndarray, v: jax.Array) -> jax.Array:
        """K[:, F] v_F for the points ``points`` of F, v ``(C, d)`` → ``(C, d)``: reads N_F·d columns.

        K is symmetric, so on one device this reads the rows K[F, :] instead (contiguous, several
        times faster than a strided column gather) and computes K[F, :]ᵀ v_F.
        """
        idx = self.rows(points)
        v_f = v[points].reshape(-1) if self.form == "full" else v[points]
        if not self.sharded:
            out = jnp.matmul(v_f.T, jnp.take(k, jnp.asarray(idx), axis=0), precision=_HI)
            return out.reshape(v.shape) if self.form == "full" else out.T
        return jnp.matmul(k[:, idx], v_f, precision=_HI).reshape(v.shape)

    # -- removing points ------------------------------------------------------------------------
    def erase(
        self,
        k: jax.Array,
        keep: jax.Array,
        into: jax.Array | None = None,
        gone: np.ndarray | None = None,
    ) -> jax.Array:
        """K with the rows and columns of points outside ``keep`` (bool ``(C,)``) set to zero;
        written into ``into``'s memory (donated: consumed) when given.

        Arguments:
          gone: with ``into``, the points (int) ``keep`` drops that K still holds, when ``into``
            already holds K's values (a spare buffer that was the previous version's K,
            ``SpareBuffer.holds``): only their rows and columns are zeroed in ``into``, with no
            pass over K (every other point outside ``keep`` is zero in K already).
        """
        full = self.form == "full"
        if into is not None and gone is not None and not self.sharded:
            view = _cpu_view(jax.block_until_ready(into))
            if view is not None:  # only the caller holds ``into``: nobody sees it change
                rows = self.rows(gone)
                view[rows, :] = 0
                view[:, rows] = 0
                return into
        if into is not None and not self.sharded:
            return _erase_into_by_rows(into, k, keep, full, self.d)
        if into is not None:
            return _erase_into(into, k, keep, full, self.d)
        return _erase(k, keep, full, self.d)

    def compact(self, k: jax.Array, points: np.ndarray, capacity: int) -> jax.Array:
        """K[rows][:, rows] of the points ``points`` (in order), zero-padded to ``capacity`` points."""
        rows = self.rows(points)
        side = self.side(capacity)
        if not self.sharded:
            return _compact(k, jnp.asarray(rows), side)
        # XLA's sharded gather fails its HLO verifier on the takes (jax 0.5.3): gather on the host
        block = np.asarray(k)[np.ix_(rows, rows)]
        return self.place(np.pad(block, ((0, side - len(rows)), (0, side - len(rows)))))

    def take_factor_rows(self, u: jax.Array, points: np.ndarray, capacity: int) -> jax.Array:
        """Rows of a factor U ``(C·d or C, ℓ)`` of K for the points ``points``, zero-padded to
        ``capacity`` points (the Nyström factor follows K's compaction)."""
        rows = self.rows(points)
        pad = ((0, self.side(capacity) - len(rows)), (0, 0))
        if not self.sharded:
            return jnp.pad(jnp.take(u, jnp.asarray(rows), axis=0), pad)
        return jnp.asarray(np.pad(np.asarray(u)[rows], pad))


class SpareBuffer:
    """One K-sized buffer, already mapped by the operating system, for the next deletion to write
    its erased K into (``KernelLayout.erase(into=...)``, donated): fresh memory is mapped and zeroed
    on first touch (about 0.4 s for MNIST's 1.7 GB K here, a third of a small deletion). A fresh
    buffer is a copy of the served K, so it holds K's values (``holds``) as a reused one does.

    The previous version's K, once a deletion has erased it into the spare, is that memory already
    mapped: ``retire`` hands it here, and ``ready`` makes it the next spare as soon as nothing else
    holds it (the requests that read the previous version have ended), with the rows and columns of
    every point the new version lacks zeroed in place first, so that it holds no value of a
    forgotten point. Else (still read after ``wait_s``, another shape) it is let go and a buffer is
    made as before.

    "Nobody holds it" is CPython's reference count, and the zeroing is numpy writing into the
    buffer (XLA, given the buffer donated, copied it about one time in three). That is safe while
    every reader of a version keeps a reference to it (its state, K, or a numpy view of K, which
    references the array) until the computations it started on K have finished: the engine's reads
    all bring their results to the host (or wait for a solve's convergence flag, computed after its
    last pass over K) before they return. A new read that dispatched work on K and dropped the
    version without waiting for it would break this.
    """

    def __init__(self, wait_s: float = 1.0):
        self._buffer: jax.Array | None = None
        self._retired: jax.Array | None = None
        self._retired_rows: np.ndarray | None = None
        self._retired_for: weakref.ref | None = None  # the K it holds once zeroed
        self.wait_s = wait_s
        self.reused = False  # whether the last ``ready`` made the retired K's memory the spare
        self._mirror: weakref.ref | None = None  # the K whose values the buffer holds

    def retire(self, k: jax.Array | None, zero_rows: np.ndarray, becomes: jax.Array) -> None:
        """Offer ``k`` (the K of a version no longer served) as the next spare, or withdraw
        what was offered (``None``). ``zero_rows`` (int, K's rows) are the rows and columns
        ``ready`` zeroes in it, after which it holds ``becomes``'s values (the K that replaced
        it); ``ready`` uses it only while ``becomes`` is the K served. The caller keeps no other
        reference to ``k`` (its memory is reused once free)."""
        self._retired, self._retired_rows = k, np.asarray(zero_rows, np.int32)
        self._retired_for = None if k is None else weakref.ref(becomes)

    def ready(self, k: jax.Array, enabled: bool) -> float:
        """Have a buffer of ``k``'s shape and dtype (none when not ``enabled``). Returns seconds spent."""
        retired, rows, target = self._retired, self._retired_rows, self._retired_for
        self._retired = self._retired_rows = self._retired_for = None
        if retired is not None and (target is None or target() is not k):
            retired = None  # offered for a K no longer served: it would not hold k's values
        self.reused = False
        if not enabled:
            self._buffer = self._mirror = None
            return 0.0
        b = self._buffer
        if b is not None and b.shape == k.shape and b.dtype == k.dtype:
            return 0.0
        t0 = time.perf_counter()
        self._buffer = self._mirror = None  # the old one is freed before the new one is mapped
        if retired is not None and retired.shape == k.shape and retired.dtype == k.dtype:
            address = _buffer_address(retired)
            box, retired = [retired], None
            self._buffer = _recycled(box, rows, self.wait_s)
            del box
            if self._buffer is not None:
                # XLA (not on the CPU) may still copy: then it is a fresh buffer, as made below
                self.reused = address is not None and _buffer_address(self._buffer) == address
                self._mirror = weakref.ref(k)  # zeroed where k is: it holds k's values
                return time.perf_counter() - t0
        del retired
        # a copy of k rather than zeros: the same pages written once, and the next deletion's
        # erase only zeroes its removed rows in it (``holds``), no pass over K
        self._buffer = jax.block_until_ready(jnp.copy(k))
        self._mirror = weakref.ref(k)
        return time.perf_counter() - t0

    def holds(self, k: jax.Array) -> bool:
        """Whether the buffer holds exactly ``k``'s values: it is the previous version's K, made
        the spare (``ready``) while ``k`` was served. A deletion from ``k`` then only zeroes the
        rows it removes in it (``KernelLayout.erase(gone=...)``)."""
        mirror = self._mirror
        return self._buffer is not None and mirror is not None and mirror() is k

    def take(self) -> jax.Array | None:
        """The buffer, handed over: no reference stays here (a deletion may consume it)."""
        buffer, self._buffer, self._mirror = self._buffer, None, None
        return buffer

    @property
    def buffer(self) -> jax.Array | None:
        return self._buffer


def _recycled(box: list[jax.Array], rows: np.ndarray, wait_s: float) -> jax.Array | None:
    """The array in ``box`` (its one reference here) with ``rows`` and those columns zeroed in its
    own memory, once nobody else holds it (polled for ``wait_s`` seconds); ``None`` when someone
    still does by then, or its buffer cannot be donated (it is then let go)."""
    deadline = time.monotonic() + wait_s
    while sys.getrefcount(box[0]) > 2:  # the list's slot and getrefcount's argument
        if time.monotonic() > deadline:
            return None
        time.sleep(0.01)
    k = jax.block_until_ready(box.pop())
    view = _cpu_view(k)
    if view is not None:
        # Nobody else holds this array (above), so nobody sees it change: zero the rows in its
        # memory from numpy, on this thread. Through XLA with the buffer donated, the result was
        # a copy about one time in three (jax 0.5.3, CPU).
        view[rows, :] = 0
        view[:, rows] = 0
        del view
        return k
    # a power of two of indices (repeats zero the same row again): few compiled shapes
    padded = np.resize(rows, 1 << (len(rows) - 1).bit_length()) if len(rows) else rows
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # "donated buffers were not usable": not in place
            return jax.block_until_ready(_zero_rows_cols(k, jnp.asarray(padded, jnp.int32)))
    except (RuntimeError, ValueError, UserWarning):
        return None


def _cpu_view(a: jax.Array) -> np.ndarray | None:
    """A writable numpy array over ``a``'s memory when ``a`` is one buffer in host memory (the CPU
    backend), else ``None``. Only for an array nobody else holds."""
    devices = a.devices()
    if len(devices) != 1 or next(iter(devices)).platform != "cpu":
        return None
    address = _buffer_address(a)
    if address is None:
        return None
    memory = (ctypes.c_byte * a.nbytes).from_address(address)
    return np.ndarray(a.shape, a.dtype, buffer=memory)


def _buffer_address(a: jax.Array) -> int | None:
    try:
        return a.unsafe_buffer_pointer()
    except (RuntimeError, ValueError):  # sharded, or deleted
        return None


@partial(jax.jit, donate_argnums=(0,))
def _zero_rows_cols(k: jax.Array, rows: jax.Array) -> jax.Array:
    """``k`` with rows ``rows`` and those columns set to zero, in ``k``'s memory (donated)."""
    return k.at[rows, :].set(0).at[:, rows].set(0)


def spread(values: jax.Array, rows: np.ndarray, capacity: int) -> jax.Array:
    """Point rows of a compacted array (row i belongs to point ``rows[i]``) put back at their
    points in an array of ``capacity`` rows, zeros elsewhere."""
    out = np.zeros((capacity,) + tuple(values.shape[1:]), np.asarray(values).dtype)
    out[rows] = np.asarray(values)[: len(rows)]
    return jnp.asarray(out)


def pad_rows(a, capacity: int):
    """``a`` with zero rows (``""`` for strings) appended up to ``capacity`` rows (numpy or jax)."""
    extra = capacity - a.shape[0]
    if extra == 0:
        return a
    widths = [(0, extra)] + [(0, 0)] * (a.ndim - 1)
    if isinstance(a, np.ndarray):
        fill = "" if a.dtype.kind in "US" else 0
        return np.pad(a, widths, constant_values=fill)
    return jnp.pad(a, widths)


def _abs_rows_matvec(k: jax.Array, v: jax.Array) -> jax.Array:
    rows = k.shape[0]
    block = next(b for b in range(min(rows, 1024), 0, -1) if rows % b == 0)
    blocks = k.reshape(rows // block, block, k.shape[1])
    out = jax.lax.map(lambda kb: jnp.matmul(jnp.abs(kb), v, precision=_HI), blocks)
    return out.reshape((rows,) + v.shape[1:])


_abs_rows_matvec_jit = jax.jit(_abs_rows_matvec)


@partial(jax.jit, static_argnames=("side",))
def _compact(k: jax.Array, rows: jax.Array, side: int) -> jax.Array:
    """K[rows][:, rows] zero-padded to ``(side, side)``: two takes, one compiled program (a fancy-
    index ``np.ix_`` on a jax array took 5.9 of an 8 s forget, MNIST 10 %)."""
    block = jnp.take(jnp.take(k, rows, axis=0), rows, axis=1)
    pad = side - rows.shape[0]
    return jnp.pad(block, ((0, pad), (0, pad)))


def _erased(k: jax.Array, keep: jax.Array, full: bool, d: int) -> jax.Array:
    rows = jnp.repeat(keep, d) if full else keep
    m = rows.astype(k.dtype)
    return k * m[:, None] * m[None, :]


_erase = jax.jit(_erased, static_argnames=("full", "d"))


@partial(jax.jit, static_argnames=("full", "d"), donate_argnums=(0,))
def _erase_into(spare: jax.Array, k: jax.Array, keep: jax.Array, full: bool, d: int) -> jax.Array:
    return spare.at[...].set(_erased(k, keep, full, d))


_ERASE_BLOCK_ROWS = 256


@partial(jax.jit, static_argnames=("full", "d"), donate_argnums=(0,))
def _erase_into_by_rows(
    spare: jax.Array, k: jax.Array, keep: jax.Array, full: bool, d: int
) -> jax.Array:
    """``_erase_into`` one block of rows at a time (a loop in the program): one core, where the
    whole-array product ran on every core: 0.18 s against 0.08 s for digits' 14,370² K, but a
    deletion's erase no longer takes the cores the requests beside it need (``bench load``: the
    forget enqueues and predictions that overlapped it were the slowest). Same values."""
    rows = jnp.repeat(keep, d) if full else keep
    m = rows.astype(k.dtype)
    n = k.shape[0]
    block = min(_ERASE_BLOCK_ROWS, n)

    def one(i, out):
        kb = jax.lax.dynamic_slice_in_dim(k, i * block, block, 0)
        mb = jax.lax.dynamic_slice_in_dim(m, i * block, block, 0)
        return jax.lax.dynamic_update_slice_in_dim(out, kb * mb[:, None] * m[None, :], i * block, 0)

    out = jax.lax.fori_loop(0, n // block, one, spare)
    done = (n // block) * block
    if done < n:
        out = out.at[done:].set(k[done:] * m[done:, None] * m[None, :])
    return out
