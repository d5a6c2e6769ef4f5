"""Kernels: the empirical NTK's layout and implementation, the trace form, the disk cache."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from service_core import ModelConfig, build_model, load_digits
from service_core._nt import nt


def kernel_to_4d(k: np.ndarray, n: int, d: int) -> np.ndarray:
    """Full-form matrix ``(N·d, N·d)`` → neural-tangents' ``(N, N, d, d)``."""
    return np.asarray(k).reshape(n, d, n, d).transpose(0, 2, 1, 3)


def empirical_ntk(model, x, form, block_size=128, progress=False):
    return model.train_kernel(x, form, None, progress, block_size)[0]


@pytest.fixture(scope="module")
def digits():
    return load_digits(seed=0)


def test_full_ntk_equals_jacobian_products(digits):
    """Full form (N·d, N·d), point-major output-minor, equals J Jᵀ from the Jacobian itself."""
    model = build_model(ModelConfig(kind="mlp", width=32), (64,), 10, jnp.float64)
    x = digits.x[:37]  # not a multiple of the block size: the padded last block must be cut
    k = empirical_ntk(model, x, "full", block_size=16)
    f = lambda t: model.f(t, jnp.asarray(x, jnp.float64))  # noqa: E731
    jac = np.asarray(jax.jacrev(f)(model.theta0)).reshape(37 * 10, -1)
    assert k.shape == (370, 370)
    assert np.allclose(k, jac @ jac.T, rtol=1e-10, atol=1e-10)
    # neural-tangents' JACOBIAN_CONTRACTION, in its own (N, N, d, d) layout
    ref = nt.empirical_ntk_fn(
        model.apply_fn, trace_axes=(), implementation=nt.NtkImplementation.JACOBIAN_CONTRACTION
    )
    ref = np.asarray(ref(jnp.asarray(x), None, model.params0))
    assert np.allclose(kernel_to_4d(k, 37, 10), ref, rtol=1e-10, atol=1e-10)


def test_trace_form_is_exact_for_linear_model_only(digits):
    x = digits.x[:20]
    lin = build_model(ModelConfig(kind="linear"), (64,), 10, jnp.float64)
    full = kernel_to_4d(empirical_ntk(lin, x, "full"), 20, 10)
    trace = empirical_ntk(lin, x, "trace")
    assert np.allclose(full, np.einsum("ij,ab->ijab", trace, np.eye(10)), atol=1e-12)
    mlp = build_model(ModelConfig(kind="mlp", width=64), (64,), 10, jnp.float64)
    full = kernel_to_4d(empirical_ntk(mlp, x, "full"), 20, 10)
    off_diagonal = np.abs(full * (1 - np.eye(10))).sum() / np.abs(full * np.eye(10)).sum()
    assert off_diagonal > 0.01  # the trace form would drop this mass


def test_ntk_cache(tmp_path, digits):
    model = build_model(ModelConfig(kind="mlp", width=16), (64,), 10, jnp.float32)
    k1, r1 = model.train_kernel(digits.x[:30], "full", tmp_path, progress=False)
    k2, r2 = model.train_kernel(digits.x[:30], "full", tmp_path, progress=False)
    assert not r1["cached"] and r2["cached"] and np.array_equal(k1, k2)
    other = build_model(ModelConfig(kind="mlp", width=16, seed=3), (64,), 10, jnp.float32)
    _, r3 = other.train_kernel(digits.x[:30], "full", tmp_path, progress=False)
    assert not r3["cached"] and len(list(tmp_path.glob("ntk-*.npy"))) == 2


def test_a_kernel_cache_that_cannot_be_written_is_skipped(tmp_path, monkeypatch, caplog):
    """A full disk at a worker's start (found by a break-it run: the start exited with a
    traceback from np.save, leaving an empty temporary file): the kernel is returned uncached."""
    import errno

    from service_core import kernels

    def full(path, array):
        open(path, "wb").close()
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(kernels.np, "save", full)
    k, report = kernels.cached(tmp_path / "cache", "abc", lambda: np.eye(3))
    np.testing.assert_array_equal(k, np.eye(3))
    assert report["cached"] is False and report["path"] is None
    assert list((tmp_path / "cache").iterdir()) == []  # no temporary file left
    assert "could not cache the kernel" in caplog.text
