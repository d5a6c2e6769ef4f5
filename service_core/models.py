"""The networks the engine serves, behind one protocol (``Network``).

* ``Model``: a finite network in neural-tangents ``stax`` (NTK parameterisation) and its
  linearisation ``f_lin(x; θ) = f(x; θ_0) + J(x)(θ − θ_0)`` (docs/maths.md, Notation). Parameters
  are one flat vector θ ``(P,)``; ``unravel`` maps it back to the stax pytree. Its kernel is the
  empirical NTK at θ_0.
* ``KernelModel``: the infinitely wide limit of the same architectures (``inf-mlp``, ``inf-cnn``),
  a kernel machine f(x) = f_0(x) + K(x, X) α with f_0 = 0 and the analytic NTK (Eq. (14)); no θ.
  Its NTK is k ⊗ I_d exactly, so K is kept in the trace form.

The engine asks a network only what the protocol says: its offset f_0, its kernel, its outputs for
a version, the change of outputs for a Δα (Eq. (8)) and θ for an α (Eq. (T)); "is it infinitely
wide?" is never asked.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import re
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import disable_x64
from jax.flatten_util import ravel_pytree

from . import kernels, user_network
from ._nt import stax
from .config import USER_KIND, ModelConfig
from .user_network import ModelLoadError


class Network(Protocol):
    """What the engine needs of a network (``Model`` or ``KernelModel``).

    ``n_params`` is ``None`` for a network without θ (then ``theta`` returns ``None`` and the
    θ-space baseline does not apply).
    """

    config: ModelConfig
    output_dim: int
    n_params: int | None
    kernel_form: str | None

    def offset(self, x) -> jax.Array: ...

    def train_kernel(
        self, x, form: str, cache_dir: Path | None, progress: bool
    ) -> tuple[np.ndarray, dict]: ...

    def theta(self, x, alpha, delta: bool = False) -> jax.Array | None: ...

    def outputs(self, state, x) -> jax.Array: ...

    def delta_outputs(self, state, delta_alpha, x) -> jax.Array: ...

    def cross_kernel(self, x, x_train, form: str) -> np.ndarray: ...


@dataclasses.dataclass(frozen=True)
class Model:
    """A stax network with its initialisation θ_0 and regularisation centre θ_p.

    Attributes:
      config: the ``ModelConfig`` it was built from.
      apply_fn: ``apply_fn(params_pytree, x)``, x of shape ``(n, n_in)`` (rows flattened) → ``(n, d)``.
        For ``cnn`` it restores the image shape ``(n, H, W, C)`` before the stax network (a no-op
        on inputs that have it already), so every caller can hand it flattened rows.
      params0: θ_0 as the stax pytree (for the empirical NTK).
      theta0: θ_0 flat, shape ``(P,)``.
      theta_p: θ_p flat, ``(P,)``: zeros for ``linear``, θ_0 for ``mlp`` and ``cnn``.
      unravel: flat ``(P,)`` → pytree.
      input_dim: n_in = prod(input_shape), inputs are flattened to it.
      output_dim: d.
      input_shape: the per-example shape the stax network itself takes: ``(n_in,)`` for ``linear``
        and ``mlp``, ``(H, W, C)`` for ``cnn``, the data set's for a user's network.
      ntk_implementation: the neural-tangents empirical-NTK implementation its kernels use
        (``kernels.NTK_IMPLEMENTATIONS``; measured per user network, ``kernels.choose_implementation``).
      user: a user's network only (kind ``user``): its leaves, the frozen ones and the
        trainable/frozen split (``UserParts``); ``params0`` is then the list of trainable leaves.
      low: a promoted ``dtype auto`` model only (``precision.promoted_network``): the same network
        in float32, the one its K was computed with. Every evaluation of the network (θ's map
        J(X)ᵀα, outputs, offsets, kernel rows) runs through it, inputs, tangents and cotangents
        cast to float32 (exact for x and θ_0, float32 numbers), and its results are upcast: float64
        covers the dual solve and its certificate, where float32 could not; these products have
        no inverse to amplify rounding, and float64 convolutions on XLA's CPU backend ran 200×
        slower (a CIFAR CNN's forget took minutes, a 1-row prediction 11 s). docs/design.md,
        Precision.
    """

    config: ModelConfig
    apply_fn: Callable
    params0: object
    theta0: jax.Array
    theta_p: jax.Array
    unravel: Callable
    input_dim: int
    output_dim: int
    input_shape: tuple[int, ...] = ()
    ntk_implementation: str = "structured_derivatives"
    user: UserParts | None = None
    low: Model | None = None

    kernel_form = None  # full or trace, as configured

    @functools.cached_property
    def _kernel_low(self) -> Model:
        """``low`` with this network's NTK implementation (set after a user network's build)."""
        low = self.low
        if low.ntk_implementation == self.ntk_implementation:
            return low
        return dataclasses.replace(low, ntk_implementation=self.ntk_implementation)

    def _to_low(self, a) -> jax.Array:
        return jnp.asarray(a, self.low.theta0.dtype)

    def _up(self, a) -> jax.Array:
        return jnp.asarray(a, self.theta0.dtype)

    @property
    def n_params(self) -> int:
        return int(self.theta0.shape[0])

    @functools.cached_property
    def compiled(self) -> dict:
        """Compiled functions of this network, kept with it (e.g. the θ-space solver)."""
        return {}

    @functools.cached_property
    def _jit_f_lin(self):
        return jax.jit(self.f_lin)

    @functools.cached_property
    def _jit_vjp(self):
        return jax.jit(self.vjp)

    def train_kernel(
        self,
        x,
        form: str,
        cache_dir: Path | None = None,
        progress: bool = True,
        block_size: int = 128,
    ) -> tuple[np.ndarray, dict]:
        """The empirical NTK K(X, X) at θ_0 in the engine layout of ``form`` (``layout``), cached
        under ``cache_dir`` (``kernels.cached``).

        Returns:
          ``(K, report)``: K numpy ``(N·d, N·d)`` or ``(N, N)``, report ``{"seconds", "bytes",
          "cached", "path"}``; a promoted model's (``low``) computed in float32, upcast.
        """
        if self.low is not None:
            k, report = self._kernel_low.train_kernel(
                np.asarray(x, np.float32), form, cache_dir, progress, block_size
            )
            return np.asarray(k, self.theta0.dtype), report
        dtype = self.theta0.dtype
        xf = np.asarray(self.flatten_inputs(x), dtype=dtype)
        key = kernels.cache_key(
            self.config.to_dict(), xf, form, np.dtype(dtype).name, self.output_dim,
            *self._cache_parts(),
        )  # fmt: skip

        def compute():
            fn = kernels.empirical_block_fn(
                self.apply_fn, self.params0, form, self.ntk_implementation
            )
            return kernels.blocked(fn, xf, block_size=block_size, dtype=dtype, progress=progress)

        return kernels.cached(cache_dir, key, compute)

    def cross_kernel(self, x, x_train, form: str, block_size: int = 128) -> np.ndarray:
        """The empirical NTK K(X_t, X) at θ_0 between test and training points, in ``form``'s layout:
        ``(n_t·d, N·d)`` or ``(n_t, N)`` (``kernels.blocked``; compiled once per network and form;
        a promoted model's through ``low``, upcast)."""
        if self.low is not None:
            k = self._kernel_low.cross_kernel(
                np.asarray(x, np.float32), np.asarray(x_train, np.float32), form, block_size
            )
            return np.asarray(k, self.theta0.dtype)
        dtype = self.theta0.dtype
        key = ("cross-ntk", form)
        if key not in self.compiled:
            self.compiled[key] = kernels.empirical_block_fn(
                self.apply_fn, self.params0, form, self.ntk_implementation
            )
        a = np.asarray(self.flatten_inputs(x), dtype=dtype)
        b = np.asarray(self.flatten_inputs(x_train), dtype=dtype)
        return kernels.blocked(self.compiled[key], a, b, block_size=block_size, dtype=dtype)

    def _cache_parts(self) -> tuple:
        # a user's weights are not in its config (only their file's path is): key on their digest
        return () if self.user is None else (self.user.digest, self.ntk_implementation)

    def params_of(self, theta: jax.Array):
        """The network's whole parameter pytree at θ (flat ``(P,)``): for a user's network, its own
        pytree with the trainable leaves from θ and the frozen ones θ_0's, unchanged."""
        trainable = self.unravel(theta)
        return trainable if self.user is None else self.user.merge(trainable)

    def check_outputs(self, x) -> None:
        """Check the network on a few training inputs ``x`` ``(n, ...)``: outputs ``(n, d)`` in θ's
        dtype, finite.

        Raises:
          ModelLoadError: another shape or dtype, or NaN/inf; the message says what was returned.
        """
        x = self.flatten_inputs(x)
        where = f"--model {self.config.network!r}" if self.user else f"model {self.config.kind}"
        try:
            out = self.apply_fn(self.params0, x)
        except Exception as e:
            raise ModelLoadError(
                f"{where}: apply_fn(params, x) failed on x of shape "
                f"{(x.shape[0], *self.input_shape)}: {user_network._err(e)}"
            ) from None
        n = x.shape[0]
        if tuple(np.shape(out)) != (n, self.output_dim):
            raise ModelLoadError(
                f"{where}: apply_fn returned shape {tuple(np.shape(out))} for x of shape "
                f"{(n, *self.input_shape)}; it must return ({n}, {self.output_dim}): one output per "
                "class of the data set (or per target column)"
            )
        if jnp.dtype(out.dtype) != self.theta0.dtype:
            raise ModelLoadError(
                f"{where}: apply_fn returned {out.dtype} outputs for {self.theta0.dtype} parameters: "
                "compute in the parameters' dtype (see --dtype)"
            )
        if not bool(jnp.all(jnp.isfinite(out))):
            raise ModelLoadError(
                f"{where}: apply_fn returned NaN or inf on training inputs: check the params and the "
                "input scaling"
            )

    def theta(self, x, alpha, delta: bool = False) -> jax.Array:
        """θ = θ_p + J(X)ᵀα (Eq. (T)), or Δθ = J(X)ᵀΔα with ``delta``; x ``(C, ...)``, α ``(C, d)``
        (a promoted model's product through ``low``, upcast)."""
        if self.low is not None:
            j_t_alpha = self._up(self.low._jit_vjp(self._to_low(x), self._to_low(alpha)))
        else:
            j_t_alpha = self._jit_vjp(x, jnp.asarray(alpha, self.theta0.dtype))
        return j_t_alpha if delta else self.theta_p + j_t_alpha

    def outputs_at(self, theta, x) -> jax.Array:
        """f_lin(x; θ) ``(n, d)``, compiled once per shape."""
        return self._jit_f_lin(theta, x)

    def outputs(self, state, x) -> jax.Array:
        """f_lin(x; θ) of a version (``state.theta``); ``(n, d)``."""
        return self._jit_f_lin(state.theta, x)

    def delta_outputs(self, state, delta_alpha, x) -> jax.Array:
        """Δf(x) = J(x) J(X)ᵀ Δα = K(x, X) Δα (Eq. (8)) over the version's training rows
        (``state.x``, Δα ``(C, d)``), by one VJP and one JVP; ``(n, d)``."""
        tangent = self.theta(state.x, delta_alpha, delta=True)
        if self.low is not None:
            return self._up(self.low.f0_and_jvp(self._to_low(x), self._to_low(tangent))[1])
        return self.f0_and_jvp(x, tangent)[1]

    def flatten_inputs(self, x) -> jax.Array:
        """Inputs ``(n, ...)`` → the layout ``apply_fn`` takes: rows flattened, ``(n, n_in)``.

        Rows stay flat for every kind (the CNN's ``apply_fn`` restores the image shape itself)
        because the blocked NTK code pads inputs as ``(n, n_in)``.
        """
        x = jnp.asarray(x)
        return x.reshape(x.shape[0], -1)

    def image_inputs(self, x) -> jax.Array:
        """Inputs ``(n, ...)`` → ``(n, *input_shape)``, the shape of the stax network itself."""
        x = jnp.asarray(x)
        return x.reshape((x.shape[0],) + tuple(self.input_shape or (self.input_dim,)))

    def f(self, theta: jax.Array, x: jax.Array) -> jax.Array:
        """The network f(x; θ), θ flat ``(P,)``, x ``(n, ...)`` → ``(n, d)``."""
        return self.apply_fn(self.unravel(theta), self.flatten_inputs(x))

    def f_lin(self, theta: jax.Array, x: jax.Array) -> jax.Array:
        """The linearised model f(x; θ_0) + J(x)(θ − θ_0), one JVP; ``(n, d)``. A promoted
        model's JVP runs through ``low`` (θ − θ_0 taken in float64 first, then cast)."""
        if self.low is not None:
            low = self.low
            base, shift = low.f0_and_jvp(self._to_low(x), self._to_low(theta - self.theta0))
            return self._up(base) + self._up(shift)
        base, shift = self.f0_and_jvp(x, theta - self.theta0)
        return base + shift

    def f0_and_jvp(self, x: jax.Array, tangent: jax.Array) -> tuple[jax.Array, jax.Array]:
        """``(f(x; θ_0), J(x) tangent)``, each ``(n, d)``, by one forward-mode pass."""
        x = self.flatten_inputs(x)
        return jax.jvp(lambda t: self.f(t, x), (self.theta0,), (tangent,))

    def vjp(self, x: jax.Array, cotangent: jax.Array) -> jax.Array:
        """J(x)ᵀ cotangent, cotangent ``(n, d)`` → ``(P,)`` (docs/maths.md, Back to parameters)."""
        x = self.flatten_inputs(x)
        _, pullback = jax.vjp(lambda t: self.f(t, x), self.theta0)
        return pullback(cotangent)[0]

    def offset(self, x: jax.Array) -> jax.Array:
        """f_0 = f(x; θ_0) + J(x)(θ_p − θ_0), the linearised output at θ = θ_p; ``(n, d)``
        (a promoted model's through ``low``, upcast)."""
        if self.low is not None:
            return self._up(self.low.offset(self._to_low(x)))
        base, shift = self.f0_and_jvp(x, self.theta_p - self.theta0)
        return base + shift


@dataclasses.dataclass(frozen=True)
class UserParts:
    """The pytree of a user's network split into trainable and frozen leaves.

    Attributes:
      treedef: the structure of the user's params.
      names: every leaf's '/'-joined path (``user_network.leaf_name``), in flattening order.
      trainable: per leaf, whether θ holds it (``ModelConfig.trainable``).
      frozen: the frozen leaves at θ_0, in order (they never change).
      digest: sha256 of θ_0's leaves (``user_network.digest``), the params fingerprint.
      framework: ``jax``, ``flax`` or ``equinox`` (``user_network.adapt``).
    """

    treedef: object
    names: tuple[str, ...]
    trainable: tuple[bool, ...]
    frozen: tuple
    digest: str
    framework: str

    def merge(self, trainable_leaves):
        """The full pytree from the trainable leaves (a list, in order) and the frozen ones."""
        it_t, it_f = iter(trainable_leaves), iter(self.frozen)
        return jax.tree_util.tree_unflatten(
            self.treedef, [next(it_t) if t else next(it_f) for t in self.trainable]
        )

    @property
    def trainable_names(self) -> list[str]:
        return [n for n, t in zip(self.names, self.trainable, strict=True) if t]


def build_user_model(
    config: ModelConfig,
    input_shape: tuple[int, ...],
    output_dim: int,
    dtype=jnp.float32,
    draw_dtype=None,
) -> Model:
    """The user's network of ``config.network`` (``user_network``), linearised at its params θ_0
    (``config.params`` overrides the factory's), θ_p = θ_0 (docs/maths.md, Notation).

    Floating-point leaves are cast to ``dtype``, through ``draw_dtype`` first when given (a
    promoted model, ``precision.promoted_network``: the float32 θ_0 its K was computed at, and
    the float32 fingerprint its checkpoints carry, whatever the file's dtype; a promoted model's
    checkpoint, fingerprinted in float64, was refused at every restart as "the weights changed");
    θ is the flat vector of the leaves that are
    floating point and match ``config.trainable`` (``re.search`` on the '/'-joined leaf path); the
    others are frozen: closed over, exactly θ_0's, never differentiated. The wrapped ``apply_fn``
    takes flat rows ``(n, n_in)`` like the built-in networks' and hands the user's function
    ``(n, *input_shape)``.

    Raises:
      ModelLoadError: the file, NAME, factory, params or trainable set is unusable (one line).
    """
    spec = config.network or ""
    factory = user_network.load_factory(spec)
    try:
        result = factory()
    except Exception as e:
        raise ModelLoadError(
            f"--model {spec!r}: calling it failed: {user_network._err(e)}"
        ) from None
    user_apply, params, framework = user_network.adapt(result, spec)
    if config.params:
        params = user_network.load_params(config.params, params)
    named = user_network.named_leaves(params)
    leaves, treedef = jax.tree_util.tree_flatten(params)
    if not leaves:
        raise ModelLoadError(f"--model {spec!r}: its params have no leaves: nothing to linearise")

    def cast(leaf, to):
        a = jnp.asarray(leaf)
        return a.astype(to) if jnp.issubdtype(a.dtype, jnp.floating) else a

    drawn = dtype if draw_dtype is None else draw_dtype
    with disable_x64() if jnp.dtype(drawn) != jnp.float64 else contextlib.nullcontext():
        leaves = [cast(leaf, drawn) for leaf in leaves]
    # the params fingerprint: of θ_0 as drawn (float32 for a promoted model, as before promotion)
    params_digest = user_network.digest(jax.tree_util.tree_unflatten(treedef, leaves))
    if jnp.dtype(dtype) != jnp.dtype(drawn):
        with disable_x64() if jnp.dtype(dtype) != jnp.float64 else contextlib.nullcontext():
            leaves = [cast(leaf, dtype) for leaf in leaves]
    names = tuple(named)
    try:
        pattern = None if config.trainable is None else re.compile(config.trainable)
    except re.error as e:
        raise ModelLoadError(
            f"--trainable {config.trainable!r} is not a regular expression: {e}"
        ) from None
    floating = [bool(jnp.issubdtype(leaf.dtype, jnp.floating)) for leaf in leaves]
    mask = tuple(
        f and (pattern is None or pattern.search(n) is not None)
        for n, f in zip(names, floating, strict=True)
    )
    if not any(mask):
        shown = ", ".join(names[:20]) + (" …" if len(names) > 20 else "")
        raise ModelLoadError(
            f"--trainable {config.trainable!r} matches no floating-point leaf of the network; its "
            f"leaf paths: {shown}"
        )
    parts = UserParts(
        treedef,
        names,
        mask,
        tuple(leaf for leaf, t in zip(leaves, mask, strict=True) if not t),
        params_digest,
        framework,
    )
    shape = tuple(int(s) for s in input_shape)

    def apply_fn(trainable_leaves, x, **kwargs):
        return user_apply(parts.merge(trainable_leaves), x.reshape((x.shape[0],) + shape))

    params0 = [leaf for leaf, t in zip(leaves, mask, strict=True) if t]
    theta0, unravel = ravel_pytree(params0)
    return Model(
        config, apply_fn, params0, theta0, theta0, unravel, int(np.prod(shape)), output_dim,
        shape, user=parts,
    )  # fmt: skip


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

    Cost: the analytic MLP kernel is a few operations per pair (10⁷ pairs per minute here). The CNN
    kernel with pooling tracks the full spatial covariance of every pair, (H·W)² numbers: about
    0.1 s per pair on 2 CPU cores. Without pooling only per-pixel variances are needed: about 10⁴
    pairs per second.
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
        """f_0(x) = 0, ``(n, d)`` (Eq. (14), f_0 = 0 as in the paper)."""
        return jnp.zeros((np.shape(x)[0], self.output_dim), self.dtype)

    def kernel(self, x1, x2=None, block_size: int = 256, progress: bool = False) -> np.ndarray:
        """The analytic NTK k(X1, X2), trace form, ``(n1, n2)`` numpy in ``dtype``, in blocks
        (``kernels.blocked``; ``x2=None``: X2 = X1, symmetric)."""
        a = self.inputs(x1)
        b = None if x2 is None else self.inputs(x2)
        return kernels.blocked(
            self._kernel_fn, a, b, block_size=block_size, dtype=self.dtype, progress=progress,
            self_block_fn=self._kernel_fn_self, pad_with_first=True,
        )  # fmt: skip

    def train_kernel(
        self, x, form: str = "trace", cache_dir: Path | None = None, progress: bool = True,
        block_size: int = 256,
    ) -> tuple[np.ndarray, dict]:  # fmt: skip
        """K = k(X, X), trace form ``(N, N)``, cached under ``cache_dir`` (``kernels.cached``).

        Raises:
          ValueError: ``form`` is not ``trace`` (the analytic NTK is exact in the trace form).
        """
        if form != "trace":
            raise ValueError(
                "the analytic NTK is exact in the trace form: use kernel_form 'trace' or 'auto'"
            )
        config = {**self.config.to_dict(), "width": None, "seed": None}  # they do not shape it
        key = kernels.cache_key(config, x, "analytic", self.dtype.name, self.output_dim)
        return kernels.cached(
            cache_dir, key, lambda: self.kernel(x, block_size=block_size, progress=progress)
        )

    def cross_kernel(self, x, x_train, form: str = "trace") -> np.ndarray:
        """K(X_t, X) in the trace form ``(n_t, N)`` (the analytic NTK is k ⊗ I_d)."""
        return self.kernel(x, x_train)

    def theta(self, x, alpha, delta: bool = False) -> None:
        """There is no θ."""
        return None

    def outputs(self, state, x) -> jax.Array:
        """f(x) = f_0 + K(x, X) α of a version (its active points); ``(n, d)``."""
        return self.offset(x) + self.delta_outputs(state, state.alpha, x)

    def delta_outputs(self, state, delta_alpha, x) -> jax.Array:
        """Δf(x) = K(x, X) Δα (Eq. (8)) over the version's active points, Δα ``(C, d)``; ``(n, d)``."""
        rows = np.flatnonzero(state.active)
        k = self.kernel(x, np.asarray(state.x)[rows])
        return jnp.asarray(k @ np.asarray(delta_alpha, self.dtype)[rows])


def image_shape(input_shape: tuple[int, ...]) -> tuple[int, int, int]:
    """The ``(H, W, C)`` a convolutional model reads its inputs as: 3-D shapes as given, 2-D
    ``(H, W)`` with one channel.

    Raises:
      ValueError: any other rank (flattened rows carry no image geometry).
    """
    shape = tuple(int(s) for s in input_shape)
    if len(shape) == 3:
        return shape  # type: ignore[return-value]
    if len(shape) == 2:
        return shape + (1,)  # type: ignore[return-value]
    raise ValueError(
        f"a convolutional model needs image inputs (N, H, W, C) or (N, H, W); got per-example shape "
        f"{list(shape)}: use a data set that keeps image shape (cifar2:FILE.npz, npz:FILE with 4-D x)"
    )


def _avg_pool(dtype=None):
    """stax AvgPool(2×2, stride 2); with ``dtype``, its outputs are cast to ``dtype``.

    Why the cast: stax's AvgPool divides by a window count made in JAX's default float type, which
    turns float32 activations into float64 whenever ``jax_enable_x64`` is on (e.g. after a float64
    model was built in the same process), and the next Conv then refuses its float32 weights. The
    parameters (none) and the kernel are stax's own, so θ keeps the plain stax layout.
    """
    init_fn, apply_fn, kernel_fn = stax.AvgPool((2, 2), strides=(2, 2))
    if dtype is None:
        return init_fn, apply_fn, kernel_fn

    def cast_apply_fn(params, inputs, **kwargs):
        return apply_fn(params, inputs, **kwargs).astype(dtype)

    return init_fn, cast_apply_fn, kernel_fn


def cnn_layers(config: ModelConfig, output_dim: int, dtype=None) -> list:
    """stax layers of the CNN: ``depth`` × [Conv(width, 3×3, SAME) → ReLU → AvgPool(2×2, stride 2)],
    Flatten, Dense(d); NTK parameterisation. ``config.pool = False`` drops the pooling.
    ``dtype``: the activation dtype of a finite network (see ``_avg_pool``); ``None`` for kernels.
    """
    w, b = config.w_std, config.b_std
    layers = []
    for _ in range(config.depth):
        layers += [
            stax.Conv(
                config.width, (3, 3), padding="SAME", W_std=w, b_std=b, parameterization="ntk"
            ),
            stax.Relu(),
        ]
        if config.pool:
            layers.append(_avg_pool(dtype))
    layers += [stax.Flatten(), stax.Dense(output_dim, W_std=w, b_std=b, parameterization="ntk")]
    return layers


def mlp_layers(config: ModelConfig, output_dim: int) -> list:
    """stax layers of the MLP: ``depth`` × [Dense(width) → ReLU], Dense(d); NTK parameterisation."""
    w, b = config.w_std, config.b_std
    layers = []
    for _ in range(config.depth):
        layers += [stax.Dense(config.width, W_std=w, b_std=b, parameterization="ntk"), stax.Relu()]
    layers.append(stax.Dense(output_dim, W_std=w, b_std=b, parameterization="ntk"))
    return layers


def build_model(
    config: ModelConfig,
    input_shape: tuple[int, ...],
    output_dim: int,
    dtype=jnp.float32,
    draw_dtype=None,
) -> Model:
    """Build ``linear``, ``mlp`` or ``cnn`` (docs/design.md, Command line) and draw θ_0 from ``config.seed``.

    Arguments:
      config: model kind and sizes.
      input_shape: per-example input shape; ``linear`` and ``mlp`` flatten it, ``cnn`` needs
        ``(H, W, C)`` or ``(H, W)`` (see ``image_shape``).
      output_dim: d.
      dtype: dtype of θ.
      draw_dtype: dtype θ_0 is drawn in (default ``dtype``): a ``dtype auto`` model promoted to
        float64 keeps the θ_0 it was drawn with in float32, cast exactly (``precision.promote``).

    Raises:
      ValueError: an unknown model kind (the ``inf-*`` kinds have no θ: ``KernelModel``),
        or flat inputs for ``cnn``.
    """
    w, b = config.w_std, config.b_std
    input_dim = int(np.prod(input_shape))
    net_shape: tuple[int, ...] = (input_dim,)
    if config.kind == "linear":
        layers = [stax.Dense(output_dim, W_std=w, b_std=b, parameterization="ntk")]
    elif config.kind == "mlp":
        layers = mlp_layers(config, output_dim)
    elif config.kind == "cnn":
        net_shape = image_shape(input_shape)
        layers = cnn_layers(config, output_dim, dtype)
    elif config.kind in ("inf-mlp", "inf-cnn"):
        raise ValueError(
            f"{config.kind!r} is infinitely wide and has no parameters: use service_core.models.KernelModel"
        )
    else:
        raise ValueError(f"unknown model kind {config.kind!r}: use 'linear', 'mlp' or 'cnn'")
    init_fn, stax_apply, _ = stax.serial(*layers)
    if config.kind == "cnn":
        # The blocked NTK pads inputs as flat rows (n, n_in); restoring the image shape inside the
        # network keeps every caller on that one layout.
        def apply_fn(params, x, **kwargs):
            return stax_apply(params, x.reshape((x.shape[0],) + net_shape), **kwargs)
    else:
        apply_fn = stax_apply
    # A float32 network is drawn with x64 off whatever jax_enable_x64 says (a float64 engine turns it
    # on for the whole process, and stax then draws different numbers from the same seed): the same
    # ModelConfig is the same network in every process, which restoring a checkpoint relies on. A
    # float64 network needs x64 on, so it is always drawn that way.
    draw_dtype = dtype if draw_dtype is None else draw_dtype
    with disable_x64() if jnp.dtype(draw_dtype) != jnp.float64 else contextlib.nullcontext():
        _, params = init_fn(jax.random.PRNGKey(config.seed), (-1,) + net_shape)
    params = jax.tree_util.tree_map(lambda a: jnp.asarray(a, dtype), params)
    theta0, unravel = ravel_pytree(params)
    theta_p = jnp.zeros_like(theta0) if config.kind == "linear" else theta0
    return Model(
        config, apply_fn, params, theta0, theta_p, unravel, input_dim, output_dim, net_shape
    )


def make_network(
    config: ModelConfig,
    input_shape: tuple[int, ...],
    output_dim: int,
    dtype=jnp.float32,
    draw_dtype=None,
) -> Model | KernelModel:
    """A finite network to linearise (``build_model``; θ_0 drawn in ``draw_dtype``, default
    ``dtype``), the user's own (``build_user_model``; its params cast to ``dtype`` through
    ``draw_dtype``), or an
    infinitely wide one (``KernelModel``, nothing drawn)."""
    if config.kind == USER_KIND:
        return build_user_model(config, input_shape, output_dim, dtype, draw_dtype)
    if config.infinite:
        return KernelModel(config, input_shape, output_dim, dtype)
    return build_model(config, input_shape, output_dim, dtype, draw_dtype)
