"""``service_core.linalg.nogil``: scipy's LAPACK/BLAS reached through its Cython function pointers,
called with the GIL released. Results against numpy (independent: numpy's own LAPACK calls), and the
GIL measured: another thread keeps running during a call (scipy's f2py wrapper stops it)."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import scipy.linalg.lapack as f2py_lapack

from service_core.linalg import nogil


def _spd(n: int, dtype, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, n))
    return (x @ x.T + n * np.eye(n)).astype(dtype)


def _tol(dtype) -> dict:
    return {"rtol": 1e-10, "atol": 1e-10} if dtype == np.float64 else {"rtol": 2e-4, "atol": 2e-4}


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("n", [1, 7, 1100])  # 1100: more than one block of the upper-zeroing
def test_cholesky_and_inverse_equal_numpys(dtype, n):
    a = _spd(n, dtype)
    lower = np.asfortranarray(a.copy())
    assert nogil.potrf_lower(lower) == 0
    np.testing.assert_allclose(lower, np.linalg.cholesky(a.astype(np.float64)), **_tol(dtype))
    assert not np.triu(lower, 1).any()  # the strict upper triangle is zero
    inverse = lower.copy(order="F")
    assert nogil.trtri_lower(inverse) == 0
    np.testing.assert_allclose(
        inverse @ lower.astype(np.float64), np.eye(n), **_tol(dtype) | {"atol": 1e-3}
    )
    assert not np.triu(inverse, 1).any()


def test_a_matrix_that_is_not_positive_definite_reports_lapacks_info():
    a = np.asfortranarray(np.diag([1.0, 2.0, -1.0, 4.0]))
    assert nogil.potrf_lower(a) == 3  # the leading minor of order 3


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("side", ["L", "R"])
@pytest.mark.parametrize("trans", ["N", "T"])
def test_triangular_products_and_solves_equal_numpys(dtype, side, trans):
    rng = np.random.default_rng(1)
    m, n = 6, 9
    k = m if side == "L" else n
    lower = np.tril(rng.standard_normal((k, k))) + 3 * np.eye(k)
    lower[np.triu_indices(k, 1)] = 99.0  # never read
    b = rng.standard_normal((m, n))
    op = np.tril(lower).T if trans == "T" else np.tril(lower)
    product = 2.0 * (op @ b if side == "L" else b @ op)
    solved = 2.0 * (np.linalg.solve(op, b) if side == "L" else np.linalg.solve(op.T, b.T).T)
    for fn, want in ((nogil.trmm_lower, product), (nogil.trsm_lower, solved)):
        got = np.asfortranarray(b.astype(dtype))
        fn(np.asfortranarray(lower.astype(dtype)), got, side=side, trans=trans, alpha=2.0)
        np.testing.assert_allclose(got, want, **_tol(dtype))


def test_arrays_that_do_not_fit_are_refused_before_the_call():
    square = np.asfortranarray(np.eye(3))
    with pytest.raises(ValueError, match="Fortran"):
        nogil.potrf_lower(np.eye(3) + np.ones((3, 3)) * 0.1)  # C-ordered, not 1×1: refused
    with pytest.raises(ValueError, match="square"):
        nogil.potrf_lower(np.asfortranarray(np.ones((2, 3))))
    with pytest.raises(TypeError, match="float32 or float64"):
        nogil.potrf_lower(np.asfortranarray(np.eye(3, dtype=np.int64)))
    with pytest.raises(ValueError, match="4 × 4"):
        nogil.trsm_lower(square, np.asfortranarray(np.ones((4, 2))))
    with pytest.raises(TypeError, match="dtypes differ"):
        nogil.trmm_lower(square, np.asfortranarray(np.ones((3, 2), np.float32)))
    b = np.asfortranarray(np.ones((3, 2)))
    for side, trans in (("l", "N"), ("L", "Q"), ("", "N")):  # BLAS would read "l" as left, …
        with pytest.raises(ValueError, match="side must be"):
            nogil.trsm_lower(square, b, side=side, trans=trans)
    readonly = np.asfortranarray(np.eye(3))
    readonly.flags.writeable = False
    with pytest.raises(ValueError, match="writeable"):
        nogil.potrf_lower(readonly)


def _ticks_during(call) -> int:
    """How many times this thread ran a short Python loop while ``call`` ran in another thread."""
    done = threading.Event()

    def run():
        call()
        done.set()

    worker = threading.Thread(target=run)
    ticks = 0
    worker.start()
    while not done.is_set():
        time.sleep(0.0005)
        ticks += 1
    worker.join()
    return ticks


def test_the_gil_is_released_during_a_factorisation():
    """The reason for the module: scipy's f2py ``dpotrf`` holds the GIL for its whole run (another
    thread of the service, the HTTP event loop included, stops); ours lets it run."""
    a = _spd(3000, np.float64)
    mine, theirs = np.asfortranarray(a.copy()), np.asfortranarray(a.copy())
    ours_ticks = _ticks_during(lambda: nogil.potrf_lower(mine))
    f2py_ticks = _ticks_during(lambda: f2py_lapack.dpotrf(theirs, lower=1, overwrite_a=1))
    assert ours_ticks > 4 * f2py_ticks + 10, (ours_ticks, f2py_ticks)


def test_one_blas_thread_bodies_share_the_setting_and_the_last_restores_it():
    """OpenBLAS's thread count is process-wide: while any ``one_blas_thread`` body runs (a
    factorisation that must stay on one thread), the count stays 1, even when another body (the
    worker's post-publish sketch) ends first; neither waits for the other; the last to end
    restores the count from before."""
    from threadpoolctl import threadpool_info

    def blas_threads() -> list[int]:
        return [i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"]

    before = blas_threads()
    inside, release = threading.Event(), threading.Event()
    seen = {}

    def long_one():
        with nogil.one_blas_thread():
            inside.set()
            assert release.wait(10)
            seen["long, after the short one ended"] = blas_threads()

    t = threading.Thread(target=long_one)
    t.start()
    assert inside.wait(10)
    started = time.monotonic()
    with nogil.one_blas_thread():  # does not wait for the long one
        seen["short"] = blas_threads()
    assert time.monotonic() - started < 5
    seen["between"] = blas_threads()  # the long one still runs: still one thread
    release.set()
    t.join(10)
    assert all(n == 1 for counts in seen.values() for n in counts) and len(seen) == 3, seen
    assert blas_threads() == before
    with pytest.raises(RuntimeError):  # an error in a body restores the count too
        with nogil.one_blas_thread():
            raise RuntimeError
    assert blas_threads() == before


def test_one_blas_thread_works_from_every_thread():
    """threadpoolctl 3.8 lets only the first Python thread that set a limit (while it lives)
    change a pthreads OpenBLAS's count, silently ignoring the others: the worker thread's
    sketch would leave a request thread's > 1.75 GiB Cholesky threaded. ``one_blas_thread`` sets
    the count itself: one thread inside it whichever thread enters, first or later."""
    from threadpoolctl import threadpool_info

    def blas_threads() -> list[int]:
        return [i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"]

    before, seen = blas_threads(), []

    def body():
        with nogil.one_blas_thread():
            seen.append(blas_threads())

    def control_and_keep_living(done: threading.Event):
        # the worker thread's post-publish sketch: sets one thread, ends, the thread lives on
        with nogil.one_blas_thread():
            pass
        done.wait(10)

    done = threading.Event()
    controller = threading.Thread(target=control_and_keep_living, args=(done,))
    controller.start()
    try:
        for _ in range(2):
            t = threading.Thread(target=body)
            t.start()
            t.join(10)
        body()
    finally:
        done.set()
        controller.join(10)
    assert len(seen) == 3 and all(n == 1 for counts in seen for n in counts), seen
    assert blas_threads() == before
