"""Dense triangular LAPACK/BLAS routines that release the GIL while they run.

``scipy.linalg.lapack`` and ``scipy.linalg.blas`` are f2py wrappers that hold the GIL for the whole
call: a Cholesky or triangular solve of the leave-one-out system (tens of seconds for the digits
cross-entropy model, C·d ≈ 18,000) froze every other thread of the process, the HTTP event loop
included (a prediction waited 14 s behind one cold ``/v1/attribute``). The same routines are
reached here through the function pointers scipy exports for Cython (``cython_lapack`` and
``cython_blas``'s ``__pyx_capi__``), called with ``ctypes``, which releases the GIL for a foreign
call. Same library, same threads, same results; only the GIL differs.

Every routine works in place on Fortran-ordered (column-major) arrays of float32 or float64 and
checks shapes, dtypes and order before the call (a wrong pointer would corrupt memory).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import threading
from collections.abc import Iterator
from typing import Any

import numpy as np
import scipy.linalg.cython_blas as _cython_blas
import scipy.linalg.cython_lapack as _cython_lapack
from threadpoolctl import ThreadpoolController

_INT = ctypes.c_int
_P_CHAR = ctypes.c_char_p
_P_VOID = ctypes.c_void_p

_capsule_name = ctypes.pythonapi.PyCapsule_GetName
_capsule_name.restype = ctypes.c_char_p
_capsule_name.argtypes = [ctypes.py_object]
_capsule_pointer = ctypes.pythonapi.PyCapsule_GetPointer
_capsule_pointer.restype = ctypes.c_void_p
_capsule_pointer.argtypes = [ctypes.py_object, ctypes.c_char_p]


@functools.cache
def _routine(module_name: str, name: str, n_args: int):
    """A ctypes function (``void``, all arguments pointers, GIL released) for scipy's exported
    routine ``name`` of ``cython_lapack`` or ``cython_blas``."""
    module = {"lapack": _cython_lapack, "blas": _cython_blas}[module_name]
    capsule = module.__pyx_capi__[name]
    address = _capsule_pointer(capsule, _capsule_name(capsule))
    return ctypes.CFUNCTYPE(None, *([_P_VOID] * n_args))(address)


# OpenBLAS's thread count is one process-wide setting, and with the GIL released a call in one thread
# can run while another changes it: a factorisation that must run on one thread (the threaded
# OpenBLAS Cholesky crashes on matrices of about 2 GB: ``attribution._potrf``) could find it set
# back to every core by another thread's ``threadpool_limits`` ending. Every body that wants one
# thread shares one setting: the first to enter sets it, the last to leave restores the count
# from before (none waits for another: the worker's post-publish sketch must not wait behind a
# minutes-long factorisation of a read request). The count is set here directly, not through
# ``threadpool_limits``: threadpoolctl 3.8 lets only one Python thread (the first to set a limit,
# while it lives) change a pthreads OpenBLAS's count and silently ignores every other thread, so
# a factorisation on a request thread stayed threaded once the worker thread had set a limit.
_ONE_THREAD = threading.Lock()
_one_thread_users = 0
_one_thread_saved: list[tuple[Any, int]] = []


@functools.cache
def _blas_controllers() -> tuple:
    """threadpoolctl's controllers of the BLAS libraries loaded (numpy's and scipy's OpenBLAS)."""
    return tuple(c for c in ThreadpoolController().lib_controllers if c.user_api == "blas")


def _set_blas_threads(controller, n: int) -> None:
    setter = None
    if controller.internal_api == "openblas" and controller.threading_layer != "openmp":
        # the library's own symbol, with the affixes of scipy's builds (scipy_…64_)
        setter = getattr(
            controller.dynlib,
            f"{controller._symbol_prefix}openblas_set_num_threads{controller._symbol_suffix}",
            None,
        )
    if setter is not None:
        setter(int(n))  # process-wide, from any thread
    else:  # OpenMP layers and other BLAS: threadpoolctl's own (per calling thread)
        controller.set_num_threads(int(n))


@contextlib.contextmanager
def one_blas_thread() -> Iterator[None]:
    """Run the body with BLAS (OpenBLAS) on one thread, process-wide; bodies in other threads may
    run at the same time, and the count is restored only when the last of them ends.

    For work that must not run threaded (the > 1.75 GiB Cholesky of ``attribution._potrf``) and
    work beside requests (the Nyström sketch K Ω, docs/maths.md (Ny)). Raises nothing of its own;
    an error in the body restores the count as its end would."""
    global _one_thread_users
    with _ONE_THREAD:
        if _one_thread_users == 0:
            _one_thread_saved[:] = [(c, c.get_num_threads()) for c in _blas_controllers()]
            for c, _ in _one_thread_saved:
                _set_blas_threads(c, 1)
        _one_thread_users += 1
    try:
        yield
    finally:
        with _ONE_THREAD:
            _one_thread_users -= 1
            if _one_thread_users == 0:
                for c, n in _one_thread_saved:
                    if n:
                        _set_blas_threads(c, n)
                _one_thread_saved.clear()


def _prefix(a: np.ndarray) -> str:
    if a.dtype == np.float64:
        return "d"
    if a.dtype == np.float32:
        return "s"
    raise TypeError(f"float32 or float64 arrays only, got {a.dtype}")


def _check_fortran(a: np.ndarray, what: str) -> None:
    if a.ndim != 2 or not a.flags.f_contiguous or not a.flags.writeable:
        raise ValueError(f"{what} must be a writeable Fortran-ordered 2-D array")


def _check_square(a: np.ndarray) -> int:
    _check_fortran(a, "a")
    if a.shape[1] != a.shape[0]:
        raise ValueError(f"a must be square, got {a.shape}")
    return a.shape[0]


def _char(c: str):
    return _P_CHAR(c.encode())


def _int(v: int):
    return ctypes.byref(_INT(int(v)))


def _ptr(a: np.ndarray):
    return _P_VOID(a.ctypes.data)


def _scalar(value: float, dtype) -> ctypes._SimpleCData:
    return (ctypes.c_double if dtype == np.float64 else ctypes.c_float)(value)


def _zero_strict_upper(a: np.ndarray, block: int = 1024) -> None:
    """a[i, j] = 0 for j > i, by blocks of columns (no n² index arrays)."""
    n = a.shape[0]
    for j0 in range(0, n, block):
        j1 = min(n, j0 + block)
        a[:j0, j0:j1] = 0
        a[j0:j1, j0:j1] = np.tril(a[j0:j1, j0:j1])


def potrf_lower(a: np.ndarray) -> int:
    """Lower Cholesky factor L of a symmetric positive definite ``a`` in place (a = L Lᵀ), the
    strict upper triangle set to zero (LAPACK ``?potrf``, uplo L).

    Arguments:
      a: ``(n, n)`` float32/float64, Fortran-ordered, writeable; only its lower triangle is read.

    Returns:
      LAPACK's ``info``: 0 on success, i > 0 when the leading minor of order i is not positive
      definite (``a`` then holds a partial factor).

    Raises:
      ValueError, TypeError: not a square writeable Fortran-ordered float32/float64 array.
    """
    n = _check_square(a)
    info = _INT(0)
    if n:
        fn = _routine("lapack", _prefix(a) + "potrf", 5)
        fn(_char("L"), _int(n), _ptr(a), _int(max(1, n)), ctypes.byref(info))
    if info.value == 0:
        _zero_strict_upper(a)
    return int(info.value)


def trtri_lower(a: np.ndarray) -> int:
    """Inverse of a lower triangular ``a`` (non-unit diagonal) in place (LAPACK ``?trtri``); the
    strict upper triangle is neither read nor written.

    Returns LAPACK's ``info`` (i > 0: a[i-1, i-1] is exactly zero). Raises as ``potrf_lower``."""
    n = _check_square(a)
    info = _INT(0)
    if n:
        fn = _routine("lapack", _prefix(a) + "trtri", 6)
        fn(_char("L"), _char("N"), _int(n), _ptr(a), _int(max(1, n)), ctypes.byref(info))
    return int(info.value)


def _triangular_blas(
    name: str, lower: np.ndarray, b: np.ndarray, side: str, trans: str, alpha: float
) -> None:
    if side not in ("L", "R") or trans not in ("N", "T"):
        raise ValueError(f"side must be 'L' or 'R' and trans 'N' or 'T', got {side!r}, {trans!r}")
    _check_fortran(lower, "the triangular matrix")
    _check_fortran(b, "b")
    if lower.dtype != b.dtype:
        raise TypeError(f"dtypes differ: {lower.dtype} and {b.dtype}")
    m, n = b.shape
    k = m if side == "L" else n
    if lower.shape != (k, k):
        raise ValueError(f"the triangular matrix must be {k} × {k} for b {b.shape}, side {side}")
    if m == 0 or n == 0:
        return
    fn = _routine("blas", _prefix(b) + name, 11)
    scale = _scalar(alpha, b.dtype)
    fn(
        _char(side),
        _char("L"),
        _char(trans),
        _char("N"),
        _int(m),
        _int(n),
        ctypes.byref(scale),
        _ptr(lower),
        _int(max(1, k)),
        _ptr(b),
        _int(max(1, m)),
    )


def trmm_lower(
    lower: np.ndarray, b: np.ndarray, side: str = "L", trans: str = "N", alpha: float = 1.0
) -> None:
    """b ← alpha · op(L) b (side ``L``) or alpha · b op(L) (side ``R``) in place, L lower
    triangular with non-unit diagonal, op(L) = L (``N``) or Lᵀ (``T``) (BLAS ``?trmm``).

    Arguments:
      lower: ``(k, k)`` Fortran-ordered, k = b's rows (side L) or columns (side R); its strict
        upper triangle is not read.
      b: ``(m, n)`` Fortran-ordered, writeable, the same dtype.

    Raises:
      ValueError, TypeError: shapes, order or dtypes that do not fit.
    """
    _triangular_blas("trmm", lower, b, side, trans, alpha)


def trsm_lower(
    lower: np.ndarray, b: np.ndarray, side: str = "L", trans: str = "N", alpha: float = 1.0
) -> None:
    """b ← alpha · op(L)^{-1} b (side ``L``) or alpha · b op(L)^{-1} (side ``R``) in place, as
    ``trmm_lower`` (BLAS ``?trsm``)."""
    _triangular_blas("trsm", lower, b, side, trans, alpha)
