"""Infinitely wide networks: the analytic NTK as a kernel machine (math.md, Infinite-width networks).

``inf-mlp`` and ``inf-cnn`` are the infinite-width limits of the ``mlp`` and ``cnn`` architectures
(``models.mlp_layers``, ``models.cnn_layers``), through neural-tangents ``stax``
``kernel_fn(x1, x2, 'ntk')``. Their NTK is k ⊗ I_d exactly, so K is kept in the engine's **trace
form** ``(N, N)`` (``ntk`` module docstring); it does not depend on ``width`` or on d.

There is no θ: the model is f(x) = f_0(x) + K(x, X) α with f_0 = 0 (the paper's choice; the mean
output of the infinite ensemble at initialisation). Training and forgetting take a
``training.DualProblem`` with form ``'trace'`` and ``f0 = offset(X)`` and reuse ``training.newton``,
``influence.influence_step`` and ``influence.forget`` unchanged. Predictions are K(X_t, X) α and the
change at test points of a deletion is Eq. 8, Δf(X_t) = K(X_t, X) Δα.

Cost: the analytic MLP kernel is a few operations per pair (10⁷ pairs per minute here). The CNN
kernel with pooling tracks the full spatial covariance of every pair, (H·W)² numbers (10⁶ on 32×32
images): about 0.1 s per pair on 2 CPU cores. Without pooling (``ModelConfig.pool = False``) only
per-pixel variances are needed: about 10⁴ pairs per second.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from ._nt import stax
from .config import ModelConfig
from .models import cnn_layers, image_shape, mlp_layers

INFINITE_KINDS = ("inf-mlp", "inf-cnn")


class KernelModel:
    """An infinitely wide ``inf-mlp`` or ``inf-cnn``: f(x) = K(x, X) α, K the analytic NTK.

    Attributes:
      config: the ``ModelConfig`` (``kind`` ``inf-mlp`` or ``inf-cnn``; ``depth``, ``w_std``,
        ``b_std`` and, for the CNN, ``pool`` shape the kernel; ``width`` and ``seed`` do not).
      input_shape: per-example input shape of the data, e.g. ``(784,)`` or ``(32, 32, 3)``.
      output_dim: d.
      dtype: dtype of the kernels returned (float64 needs ``jax_enable_x64``).
      kernel_form: always ``'trace'``: the analytic NTK is k ⊗ I_d exactly.
      n_params: ``None``, there is no θ.
    """

    kernel_form = "trace"
    n_params = None

    def __init__(
        self, config: ModelConfig, input_shape: tuple[int, ...], output_dim: int, dtype=jnp.float32
    ):
        if config.kind == "inf-mlp":
            self._net_shape: tuple[int, ...] = (int(np.prod(input_shape)),)
            layers = mlp_layers(config, output_dim)
        elif config.kind == "inf-cnn":
            self._net_shape = image_shape(input_shape)
            layers = cnn_layers(config, output_dim)
        else:
            raise ValueError(f"KernelModel needs kind 'inf-mlp' or 'inf-cnn', got {config.kind!r}")
        self.config = config
        self.input_shape = tuple(int(s) for s in input_shape)
        self.output_dim = int(output_dim)
        self.dtype = jnp.dtype(dtype)
        _, _, kernel_fn = stax.serial(*layers)
        self._kernel_fn = jax.jit(lambda a, b: kernel_fn(a, b, "ntk"))
        # Diagonal blocks pass x2 = None: stax then knows the pairs (i, i) are identical and
        # evaluates the arc-cosine at exactly 1, instead of at a cosine rounded below 1 (a 1e-8
        # relative error on the diagonal in float64).
        self._kernel_fn_self = jax.jit(lambda a: kernel_fn(a, None, "ntk"))

    def inputs(self, x) -> np.ndarray:
        """Inputs ``(n, ...)`` → ``(n, *network shape)`` in ``dtype``: flat rows for the MLP,
        ``(n, H, W, C)`` for the CNN."""
        x = np.asarray(x, dtype=self.dtype)
        return x.reshape((x.shape[0],) + self._net_shape)

    def offset(self, x) -> jax.Array:
        """f_0(x) = 0, ``(n, d)`` (math.md Eq. 14, f_0 = 0 as in the paper)."""
        return jnp.zeros((np.shape(x)[0], self.output_dim), self.dtype)

    def kernel(self, x1, x2=None, block_size: int = 256, progress: bool = False) -> np.ndarray:
        """The analytic NTK k(X1, X2), trace form, ``(n1, n2)`` numpy in ``dtype``, in blocks.

        Arguments:
          x1: ``(n1, ...)``; x2: ``(n2, ...)`` or ``None`` for X2 = X1, in which case only blocks on
            and above the diagonal are computed and the rest mirrored (K is symmetric).
          block_size: points per block side; edge blocks are padded so one compiled function serves
            all of them (pad rows are cut away).
          progress: show a progress bar over blocks.
        """
        symmetric = x2 is None
        a = self.inputs(x1)
        b = a if symmetric else self.inputs(x2)
        n1, n2 = len(a), len(b)
        bs = max(1, min(block_size, max(n1, n2)))
        nb1, nb2 = -(-n1 // bs), -(-n2 // bs)
        # Pad with copies of the first row, not zeros: a zero input has zero variance when
        # b_std = 0, and the arc-cosine formulas would divide by it (pad entries are cut anyway).
        pad_a = np.concatenate([a, np.repeat(a[:1], nb1 * bs - n1, axis=0)])
        pad_b = pad_a if symmetric else np.concatenate([b, np.repeat(b[:1], nb2 * bs - n2, axis=0)])
        out = np.empty((n1, n2), self.dtype)
        pairs = [(i, j) for i in range(nb1) for j in range(i if symmetric else 0, nb2)]
        for i, j in tqdm(pairs, desc="analytic NTK blocks", disable=not progress, leave=False):
            if symmetric and i == j:
                block = np.asarray(self._kernel_fn_self(pad_a[i * bs : (i + 1) * bs]))
            else:
                block = np.asarray(
                    self._kernel_fn(pad_a[i * bs : (i + 1) * bs], pad_b[j * bs : (j + 1) * bs])
                )
            r0, r1, c0, c1 = i * bs, min((i + 1) * bs, n1), j * bs, min((j + 1) * bs, n2)
            out[r0:r1, c0:c1] = block[: r1 - r0, : c1 - c0]
            if symmetric and i != j:
                out[c0:c1, r0:r1] = out[r0:r1, c0:c1].T
        return out

    def train_kernel(
        self, x, cache_dir: Path | None = None, progress: bool = True, block_size: int = 256
    ) -> np.ndarray:
        """K = k(X, X), trace form ``(N, N)``, cached on disk (see ``cached_kernel``)."""
        k, _ = self.cached_kernel(x, cache_dir, progress, block_size)
        return k

    def cached_kernel(
        self, x, cache_dir: Path | None = None, progress: bool = True, block_size: int = 256
    ) -> tuple[np.ndarray, dict]:
        """``kernel(x)`` with an on-disk cache under ``cache_dir`` (``None``: no cache).

        The file is ``ntk-analytic-<key>.npy``, key = hash of the data, the configuration, d and the
        dtype; ``ntk.purge_cache`` (glob ``ntk-*.npy``) deletes it with the empirical kernels.

        Returns:
          ``(K (N, N), report)``, report = ``{"seconds", "bytes", "cached", "path"}`` (wall seconds).
        """
        t0 = time.perf_counter()
        path = None
        if cache_dir is not None:
            path = Path(cache_dir) / f"ntk-analytic-{self.cache_key(x)}.npy"
            if path.exists():
                k = np.load(path)
                return k, {
                    "seconds": time.perf_counter() - t0,
                    "bytes": k.nbytes,
                    "cached": True,
                    "path": str(path),
                }
        k = self.kernel(x, block_size=block_size, progress=progress)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp.npy")
            np.save(tmp, k)
            os.replace(tmp, path)  # atomic: a crash never leaves a half-written kernel behind
        report = {
            "seconds": time.perf_counter() - t0,
            "bytes": k.nbytes,
            "cached": False,
            "path": str(path) if path else None,
        }
        return k, report

    def cross_kernel(
        self, x_test, x_train, block_size: int = 256, progress: bool = False
    ) -> np.ndarray:
        """K(X_t, X), trace form ``(n_t, N)``."""
        return self.kernel(x_test, x_train, block_size=block_size, progress=progress)

    def predict(self, alpha, x_test, x_train) -> np.ndarray:
        """f(X_t) = f_0 + K(X_t, X) α; α ``(N, d)`` → ``(n_t, d)``. Also Eq. 8 with α := Δα."""
        k = self.cross_kernel(x_test, x_train)
        return np.asarray(self.offset(x_test)) + k @ np.asarray(alpha, self.dtype)

    def cache_key(self, x) -> str:
        """Hash of the data, the kernel-relevant configuration, d and the dtype."""
        h = hashlib.sha256()
        h.update(np.ascontiguousarray(x, dtype=np.float32).tobytes())
        h.update(json.dumps(self.config.to_dict(), sort_keys=True).encode())
        h.update(
            json.dumps(["analytic", self.dtype.name, list(np.shape(x)), self.output_dim]).encode()
        )
        return h.hexdigest()[:24]
