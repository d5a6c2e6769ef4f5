"""How a model comes to be: built and trained (version 0), or restored from its newest checkpoint."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from . import checkpoint, kernels, precision, sharding
from .config import ModelConfig, SolverConfig, TrainConfig, jax_dtype
from .data import Dataset
from .dual import DualProblem, certified_floor, kernel_gradient_descent, newton, stationarity
from .errors import InvalidInputError, NotCertifiedError, SolverError, UnlearnError
from .kernels import purge_cache
from .layout import KernelLayout, pad_rows
from .linalg import Nystrom, SolveOptions, canonical_method, nystrom, power_iteration
from .models import Model, Network, make_network
from .state import ModelState, VersionRecord, bucket
from .user_network import ModelLoadError

log = logging.getLogger(__name__)


def build(
    dataset: Dataset,
    model_cfg: ModelConfig,
    train_cfg: TrainConfig,
    solver_cfg: SolverConfig,
    cache_dir: Path | None = None,
    progress: bool = True,
    devices: list | None = None,
    memory_budget: float = 0.6,
    source: str | None = None,
) -> tuple[ModelState, Network]:
    """The model of ``model_cfg`` on ``dataset``, its kernel, trained to the optimum: version 0.

    Arguments:
      dataset, model_cfg, train_cfg, solver_cfg: what to build.
      source: how the data set was asked for (e.g. ``mnist:DIR, n_train 1000``), saved as part of
        the model's identity (``identity``); default: ``dataset.name``.
      cache_dir: kernel cache directory (``None``: no cache).
      progress: progress bar for the kernel.
      devices: devices K's rows are split over (default: every local device; ``sharding``).
      memory_budget: fraction of each device's memory K and the solver's working copy may use.

    Raises:
      InvalidInputError: a setting that does not apply to this model (theta-cg without θ).
      ModelLoadError: a user's network that cannot be loaded or gives outputs of the wrong shape,
        dtype or NaN (``models.build_user_model``, ``Model.check_outputs``).
      ResourceError: K would not fit the devices (checked before computing it).
      SolverError: training did not reach ``train_cfg``'s tolerance.
    """
    dtype = jax_dtype("float64" if train_cfg.dtype == "float64" else "float32")
    model = make_network(model_cfg, dataset.input_shape, dataset.output_dim, dtype)
    ntk_choice: dict = {}
    form = model_cfg.resolved_kernel_form()
    if isinstance(model, Model) and model.user is not None:
        model, ntk_choice, form = prepare_user_model(model, dataset.x, model_cfg.kernel_form)
    if model.n_params is None and canonical_method(solver_cfg.method) == "theta-cg":
        raise InvalidInputError(
            f"{model_cfg.kind} has no parameters: theta-cg is not available, use alpha-cg"
        )
    mesh = sharding.make_mesh(devices)
    layout = KernelLayout(form, dataset.output_dim, mesh)
    cap = bucket(dataset.n, mesh.size)
    what = f"K for {dataset.n} points, d = {dataset.output_dim} ({layout.form} form)"
    plan = sharding.plan_memory(
        layout.side(cap), np.dtype(dtype).itemsize, list(mesh.devices.flat), memory_budget
    )
    sharding.check_fits(plan, what)
    k, report = _kernel(model, dataset.x, layout.form, cache_dir, progress)
    shape = k.shape
    k = layout.embed(k, np.arange(dataset.n), cap)
    log.info(
        "NTK %s form %s, held padded to %s (capacity %d points): %.1f MiB in %.2f s (%s)",
        layout.form, shape, k.shape, cap, k.nbytes / 2**20, report["seconds"],
        "cache" if report["cached"] else "computed",
    )  # fmt: skip
    x = jnp.asarray(pad_rows(dataset.x, cap), dtype)
    y = jnp.asarray(pad_rows(dataset.targets(), cap), dtype)
    active = np.arange(cap) < dataset.n
    f0 = model.offset(x) * jnp.asarray(active, dtype)[:, None]
    v0 = jax.random.normal(
        jax.random.PRNGKey(0), (cap, layout.d if layout.form == "full" else 1), k.dtype
    )
    lambda_max = 1.01 * power_iteration(lambda v: layout.matvec(k, v), v0, 30)
    ny = preconditioner(k, solver_cfg, layout.form, train_cfg.loss)
    problem = DualProblem(k, layout, f0, y, jnp.asarray(active), train_cfg.lam, train_cfg.loss)
    precision_meta = {"dtype": np.dtype(dtype).name, "kernel_dtype": np.dtype(dtype).name}
    try:
        alpha, record = train(problem, train_cfg, solver_cfg, ny)
    except NotCertifiedError as e:
        if train_cfg.dtype != "auto":
            raise
        # float32 cannot certify the tolerance: finish in float64 from where it stopped (K exact)
        precision.check_promotion_fits(
            layout.side(cap), list(mesh.devices.flat), memory_budget, what
        )
        log.warning(
            "%s: promoting the model to float64 (dtype auto)", precision.promotion_reason(e)
        )
        impl = getattr(model, "ntk_implementation", None)
        model = precision.promoted_network(model_cfg, dataset.input_shape, dataset.output_dim)
        if isinstance(model, Model) and model.user is not None:  # as measured in float32
            model = dataclasses.replace(model, ntk_implementation=impl)
        f64 = model.theta0.dtype if model.n_params is not None else jax_dtype("float64")
        k, x, y, f0 = (a.astype(f64) for a in (k, x, y, f0))
        ny = preconditioner(k, solver_cfg, layout.form, train_cfg.loss)
        problem = DualProblem(k, layout, f0, y, jnp.asarray(active), train_cfg.lam, train_cfg.loss)
        start = None if e.alpha is None else jnp.asarray(e.alpha, f64)
        alpha, record = train(problem, train_cfg, solver_cfg, ny, start)
        precision_meta = {
            "dtype": "float64",
            "kernel_dtype": "float32",
            "promoted": precision.promotion_reason(e),
        }
    theta = model.theta(x, alpha)
    meta = {
        "dataset": {
            "name": dataset.name,
            "task": dataset.task,
            "output_dim": dataset.output_dim,
            "input_shape": list(dataset.input_shape),
            "n_initial": dataset.n,
            "source": source or dataset.name,
        },
        "model": model_cfg.to_dict(),
        "theta0_fingerprint": fingerprint(model),
        "train": train_cfg.to_dict(),
        "solver": solver_cfg.to_dict(),
        "ntk": {
            "seconds": report["seconds"],
            "bytes": report["bytes"],
            "cached": report["cached"],
            **_ntk_implementation(model),
            **({"measured": ntk_choice} if ntk_choice else {}),
            **(
                {"trace_exact": ntk_choice["trace_form_exact"]}
                if "trace_form_exact" in ntk_choice
                else {}
            ),
        },
        "lambda_max": lambda_max,
        "precision": {
            **precision_meta,
            "promoted_at_version": 0 if "promoted" in precision_meta else None,
        },
        **_user_meta(model),
    }
    ids = pad_rows(np.asarray(dataset.ids, dtype=str), cap)
    f_star = problem.outputs(alpha)
    # float32's limit for the tolerance float32 would be held to (a float64 model's 1e-10 is out of its reach)
    tol32 = train_cfg.resolved_tol() if train_cfg.dtype != "float64" else 1e-5
    # promoted at build: the line says so, not "deletions may be promoted" (and is INFO: the
    # promotion's WARNING said why already)
    held = "promoted" if "promoted" in precision_meta else train_cfg.dtype
    meta["conditioning"] = conditioning_report(problem, alpha, f_star, lambda_max, tol32, held)
    state = ModelState(
        0, ids, x, y, k, layout, f0, alpha, theta, record.residual, (), (record.to_dict(),), meta,
        f_star=f_star, nystrom=ny, k_origin=0,
    )  # fmt: skip
    return state, model


def train(
    problem: DualProblem,
    train_cfg: TrainConfig,
    solver_cfg: SolverConfig,
    ny: Nystrom | None,
    alpha0: jax.Array | None = None,
) -> tuple[jax.Array, VersionRecord]:
    """α* of ``problem`` by Newton (``dual.newton``) or kernel gradient descent from ``alpha0``
    (default zeros), and the record of version 0.

    Raises:
      NotCertifiedError: the certificate (relative stationarity residual of the α returned, f
        recomputed from it) is above ``tol × accept_floor``; the message says what to change.
      SolverError: the solve produced non-finite values.
    """
    tol = train_cfg.resolved_tol()
    start = jnp.zeros_like(problem.y) if alpha0 is None else alpha0
    if train_cfg.trainer == "kgd":
        alpha, info = kernel_gradient_descent(
            problem, start, tol=tol, max_steps=train_cfg.max_kgd_steps
        )
        limit, floor, steps = "max_kgd_steps (or use trainer newton)", 0.0, info.steps
    else:
        options = solve_options(
            solver_cfg, train_cfg.dtype, accept_floor=train_cfg.accept_floor
        ).replace(nystrom=ny)
        alpha, info = newton(problem, start, tol, train_cfg.max_newton, options)
        limit, floor, steps = "max_newton", info.floor, info.steps
    if not finite(alpha, info.residual):
        raise NotCertifiedError(non_finite("training", train_cfg, alpha.dtype))
    if not (info.converged and train_cfg.certified(info.residual)):
        raise NotCertifiedError(
            f"training ({train_cfg.trainer}) stopped at relative stationarity residual {info.residual:.2e} after "
            f"{info.steps} steps (tolerance {tol:.0e}{_slack(train_cfg)})"
            + _training_hint(info, floor, train_cfg, solver_cfg, limit, alpha.dtype),
            alpha,
        )
    floor = certified_floor(problem, alpha, floor)
    log.info(
        "trained (%s): %d steps, residual %.2e (rounding floor %.1e), %.2f s",
        train_cfg.trainer, info.steps, info.residual, floor, info.seconds,
    )  # fmt: skip
    solve = info.as_solve_info().to_dict()
    return alpha, VersionRecord(
        0, 0, solve, info.residual, rounding_floor=floor, newton_steps=steps,
        tolerance=tol, accept_floor=train_cfg.accept_floor, dtype=np.dtype(alpha.dtype).name,
    )  # fmt: skip


def _slack(train_cfg: TrainConfig) -> str:
    return f" × accept_floor {train_cfg.accept_floor:g}" if train_cfg.accept_floor != 1 else ""


def conditioning_report(problem, alpha, f, lambda_max: float, tol: float, dtype: str) -> dict:
    """``precision.conditioning`` of the trained model, logged at start-up, with a line when λ is
    within ten times the smallest λ float32 can certify (``precision.warn_if_near_limit``)."""
    cond = precision.conditioning(problem, alpha, f, lambda_max, tol)
    log.info(
        "conditioning: κ ≈ %.2e (μ_max %.3g); float32 certifies lam down to ~%.1e (lam %g)",
        cond["kappa"], cond["lambda_max"], cond["min_lam_float32"], problem.lam,
    )  # fmt: skip
    warning = precision.warn_if_near_limit(cond, problem.lam, dtype)
    if warning:
        likely = dtype == "float32" or (dtype == "auto" and problem.lam < cond["min_lam_float32"])
        log.log(logging.WARNING if likely else logging.INFO, warning)
    return {**cond, "tolerance": tol, "warning": warning}


def restore(
    checkpoint_dir: Path,
    cache_dir: Path | None = None,
    progress: bool = True,
    devices: list | None = None,
    id_key: bytes = b"",
    prune: bool = False,
    expect: Identity | None = None,
    recertify: bool = True,
    max_version: int | None = None,
) -> tuple[ModelState, Network] | None:
    """The newest complete checkpoint under ``checkpoint_dir`` (no retraining), or ``None``.

    K is recomputed from the checkpointed active inputs (``checkpoint`` module docstring), or
    read from ``cache_dir`` when it holds the kernel of exactly these inputs.

    Arguments:
      id_key: the secret of the forgotten ids' digests (``ModelState.digest``).
      prune: finish what a crash left (the worker's start, docs/design.md, The order of a
        deletion): delete every other checkpoint and unfinished save (``checkpoint.prune``) and
        every cached kernel but the one of these inputs (the others hold forgotten rows).
      expect: the model the caller means to serve; a checkpoint of another one is refused
        (``Identity.differences``). ``None``: serve whatever the checkpoint holds.
      recertify: recompute the linearised certificate of α on the recomputed K, re-solving when it
        misses (``recertified``); ``False`` for a nonlinear model, whose α is not that optimum
        (``nonlinear_serving``).
      max_version: the newest version at most this one (``checkpoint.restore``); ``None``: the
        newest.

    Raises:
      CheckpointMismatchError: the checkpoint's model is not ``expect`` (every difference named).
      ModelLoadError: a user's network that can no longer be loaded.
      SolverError: the network rebuilt from the checkpoint's configuration is not the one it was
        trained with (another θ0).
    """
    state = checkpoint.restore(
        checkpoint_dir,
        before_arrays=lambda meta: jax_dtype(held_dtype(meta["meta"])),
        id_key=id_key,
        max_version=max_version,
    )
    if state is None:
        return None
    # K and f* are this process's own from here: K recomputed over the active points below, and f*
    # from it (``recertified``; a nonlinear model keeps none)
    state = state.replace(f_star=None, k_origin=state.version)
    if prune:
        pruned = checkpoint.prune(checkpoint_dir, keep=state.version)
        if pruned:
            log.info("deleted %d checkpoint(s) other than version %d", pruned, state.version)
    saved_identity = Identity.of_meta(state.meta)
    if expect is not None:
        problems = saved_identity.differences(expect)
        if problems:
            raise CheckpointMismatchError(mismatch_message(checkpoint_dir, state.version, problems))
    ds = state.meta["dataset"]
    shape, d = tuple(ds["input_shape"]), ds["output_dim"]

    def as_saved(model: Network) -> Network:
        """A user's network with the NTK implementation measured at build, its params checked."""
        if not (isinstance(model, Model) and model.user is not None):
            return model
        impl = state.meta.get("ntk", {}).get("implementation", "jacobian_contraction")
        if saved_identity.params_digest not in (None, model.user.digest):
            problems = [
                f"params fingerprint {saved_identity.params_digest} (checkpoint) ≠ "
                f"{model.user.digest} (now: the weights of {state.model_config.network!r}"
                + (f" / {state.model_config.params!r}" if state.model_config.params else "")
                + " changed)"
            ]
            raise CheckpointMismatchError(mismatch_message(checkpoint_dir, state.version, problems))
        return dataclasses.replace(model, ntk_implementation=impl)

    kernel_net = as_saved(precision.kernel_network(state.meta, state.model_config, shape, d))
    if held_dtype(state.meta) == "float64" and state.train_config.dtype == "auto":
        model = as_saved(precision.promoted_network(state.model_config, shape, d))
    else:
        model = kernel_net
    saved, now = state.meta.get("theta0_fingerprint"), fingerprint(model)
    if saved is not None and now is not None and not np.isclose(now, saved, rtol=1e-6, atol=0):
        # K is recomputed from this network: a different θ0 would silently give another model
        raise SolverError(
            f"{checkpoint_dir}: the network re-initialised from its ModelConfig differs from the one the checkpoint "
            f"was trained with (‖θ0‖ {now:.9g} against {saved:.9g}); restore with the jax/ntk-unlearn "
            "versions that wrote it"
        )
    mesh = sharding.make_mesh(devices)
    layout = KernelLayout(state.form, int(ds["output_dim"]), mesh)
    cap = -(-state.capacity // mesh.size) * mesh.size  # saved under another device count
    if cap != state.capacity:
        padded = {name: pad_rows(a, cap) for name, a in state.arrays().items() if name != "theta"}
        state = state.replace(ids=pad_rows(state.ids, cap), **padded)
    points = np.flatnonzero(state.active)
    k, report = _kernel(kernel_net, np.asarray(state.x)[points], layout.form, cache_dir, progress)
    if not report["cached"] and report["path"] is not None:
        _drop_if_superseded(checkpoint_dir, state.version, Path(report["path"]))
    if prune:
        purged = purge_cache(cache_dir, keep=report["path"])
        if purged:
            log.info("deleted %d cached kernel(s) of other training sets", purged)
    k = layout.embed(k, points, state.capacity).astype(state.alpha.dtype)  # a promoted K: exact
    log.info(
        "restored version %d: K %s %s in %.2f s",
        state.version,
        k.shape,
        "read from the NTK cache" if report["cached"] else "recomputed",
        report["seconds"],
    )
    ny = preconditioner(k, state.solver_config, layout.form, state.train_config.loss)
    state = state.replace(k=k, layout=layout, nystrom=ny)
    return (recertified(state, model) if recertify else state), model


def _drop_if_superseded(checkpoint_dir: Path, version: int, written: Path) -> None:
    """Delete the kernel just written to the cache for ``version`` when a newer version's
    checkpoint exists: that version may have forgotten some of these rows, and the worker that
    published it may have purged the cache before this write (a follower restoring while the
    worker deletes; docs/design.md, The order of a deletion). Checked after the write: a
    checkpoint finalised after this listing is followed by its worker's purge, which finds the
    file."""
    newest = checkpoint.newest_step_name(checkpoint_dir)
    if newest is not None and newest > version:
        written.unlink(missing_ok=True)
        log.info(
            "deleted the kernel of version %d just cached: version %d is newer (it may have "
            "forgotten some of its rows)",
            version,
            newest,
        )


class CheckpointMismatchError(UnlearnError):
    """The data directory's checkpoint holds another model than the one asked for."""


@dataclasses.dataclass(frozen=True)
class Identity:
    """What makes a model this model (a checkpoint of another one is not served): the network's
    settings (``ModelConfig.shaping``, including a user network's file, params file and trainable
    set), its params fingerprint (user networks), the data set, the loss, λ, the dtype, and the
    mode: ``linearised`` (the dual model) or ``nonlinear`` (``serve --nonlinear``,
    ``nonlinear_serving``).

    ``params_digest`` is compared only when both sides know it (the caller's side usually does not:
    the network is loaded after this check; ``restore`` compares it then).
    """

    model: dict
    dataset: str
    loss: str
    lam: float
    dtype: str
    params_digest: str | None = None
    mode: str = "linearised"

    @classmethod
    def of(
        cls, model_cfg: ModelConfig, train_cfg: TrainConfig, dataset: str, mode: str = "linearised"
    ) -> Identity:
        """The identity of a model about to be built or restored from these settings."""
        return cls(
            model_cfg.shaping(), dataset, train_cfg.loss, train_cfg.lam, train_cfg.dtype, None, mode
        )

    @classmethod
    def of_meta(cls, meta: dict) -> Identity:
        """The identity saved in a checkpoint's ``meta``."""
        ds = meta["dataset"]
        return cls(
            ModelConfig.from_dict(meta["model"]).shaping(),
            ds.get("source") or ds["name"],
            meta["train"]["loss"],
            float(meta["train"]["lam"]),
            meta["train"]["dtype"],
            meta.get("params_digest"),
            "nonlinear" if "nonlinear" in meta else "linearised",
        )

    def differences(self, other: Identity) -> list[str]:
        """Each setting that differs, as ``'name A (checkpoint) ≠ B (now)'`` (self is the
        checkpoint's side)."""
        out = []
        for key in dict.fromkeys([*self.model, *other.model]):
            a, b = self.model.get(key), other.model.get(key)
            if a != b:
                name = "model" if key == "kind" else key
                out.append(f"{name} {a!r} (checkpoint) ≠ {b!r} (now)")
        if self.mode != other.mode:
            flag = "with" if self.mode == "nonlinear" else "without"
            out.append(
                f"mode {self.mode!r} (checkpoint) ≠ {other.mode!r} (now): start {flag} --nonlinear"
            )
        for name in ("dataset", "loss", "lam", "dtype", "params_digest"):
            a, b = getattr(self, name), getattr(other, name)
            if name == "params_digest" and (a is None or b is None):
                continue
            if name == "dtype" and self.mode != other.mode and {a, b} == {"auto", "float64"}:
                # --nonlinear takes dtype auto as float64: said by the mode's line already
                continue
            if a != b:
                label = "params fingerprint" if name == "params_digest" else name
                out.append(f"{label} {a!r} (checkpoint) ≠ {b!r} (now)")
        return out


def mismatch_message(checkpoint_dir: Path, version: int, problems: list[str]) -> str:
    """One line: what differs between a checkpoint and the settings, and the ways out."""
    return (
        f"the checkpoint in {checkpoint_dir} (version {version}) holds a model made with other "
        f"settings: {'; '.join(problems)}. Start with the checkpoint's settings to serve it, give "
        "this model another --data-dir, or delete that checkpoint directory to build anew (the "
        "worker's start then forgets again, before serving, the records the data dir's "
        "deletions.log lists as forgotten; the additions it lists are lost: add them again)"
    )


def prepare_user_model(model: Model, x, kernel_form: str) -> tuple[Model, dict, str]:
    """Check a user's network on its first training inputs (``Model.check_outputs``), pick its
    empirical-NTK implementation by measuring them on up to 16 of them
    (``kernels.choose_implementation``, full form), and resolve ``kernel_form`` ``auto``: the trace
    form when the sample's K is k ⊗ I_d to rounding (``trace_exact``; e.g. a linear head
    fine-tuned alone), which holds d² times fewer numbers, else the full form.

    Returns:
      ``(model with ntk_implementation set, the measurements, the form)``.

    Raises:
      ModelLoadError: wrong output shape or dtype, NaN, or an NTK that cannot be computed.
    """
    dtype = model.theta0.dtype
    model.check_outputs(jnp.asarray(np.asarray(x[:4]), dtype))
    sample = np.asarray(model.flatten_inputs(jnp.asarray(np.asarray(x[:16]), dtype)))
    rtol = 1e-9 if dtype == jnp.float64 else 1e-3
    try:
        name, report = kernels.choose_implementation(
            model.apply_fn, model.params0, sample, "full", rtol
        )
    except ValueError as e:
        raise ModelLoadError(f"--model {model.config.network!r}: {e}") from None
    form = kernel_form
    if kernel_form == "auto":
        reference = kernels.empirical_block_fn(model.apply_fn, model.params0, "full")
        exact = trace_exact(np.asarray(reference(sample, sample)), np.finfo(dtype).eps)
        form = "trace" if exact else "full"
        report["trace_form_exact"] = exact
    log.info(
        "empirical NTK of %s: %s, %s form (%s)", model.config.network, name, form,
        ", ".join(
            f"{k} {v['seconds'] * 1e3:.1f} ms, rel. diff {v.get('rel_diff', float('nan')):.1e}"
            if "seconds" in v else f"{k} failed"
            for k, v in report.items() if isinstance(v, dict)
        ),
    )  # fmt: skip
    return dataclasses.replace(model, ntk_implementation=name), report, form


def trace_exact(k: np.ndarray, eps: float) -> bool:
    """Whether a full-form kernel block ``(n1, n2, d, d)`` is k ⊗ I_d up to rounding: its
    off-output entries and the spread of its output diagonal within 100·eps of its largest entry
    (docs/maths.md, Notation: the trace form is then exact)."""
    d = k.shape[-1]
    scale = float(np.max(np.abs(k))) or 1.0
    diag = np.einsum("ijaa->ija", k)
    off = k * (1 - np.eye(d))
    spread = diag - diag.mean(axis=-1, keepdims=True)
    worst = max(float(np.max(np.abs(off))), float(np.max(np.abs(spread))))
    return bool(worst <= 100 * float(eps) * scale)


def _ntk_implementation(model: Network) -> dict:
    impl = getattr(model, "ntk_implementation", None)
    return {"implementation": impl if impl is not None else "analytic"}


def _user_meta(model: Network) -> dict:
    user = getattr(model, "user", None)
    if user is None:
        return {}
    return {
        "params_digest": user.digest,
        "trainable_leaves": user.trainable_names,
        "frozen_leaves": [n for n, t in zip(user.names, user.trainable, strict=True) if not t],
        "framework": user.framework,
    }


def recertified(state: ModelState, model: Network) -> ModelState:
    """``state`` (K recomputed at restore) with f* and its certificate recomputed from that K.

    K recomputed over the active points may differ from the K the version was solved with by
    rounding (the kernel's blocks hold other points: up to 1 ulp in float32, measured 4.8e-7 on
    entries of 3.5). When that moves the certificate above ``tol × accept_floor`` (a model certified
    to 1e-11 in float64 on a float32 K), Newton re-solves from α on this K: the same version,
    certified again against the K it is served with, θ recomputed (Eq. (T)).

    Raises:
      SolverError: the re-solve did not certify (the message says what to change).
    """
    train = state.train_config
    problem = DualProblem(
        state.k, state.layout, state.f0, state.y, jnp.asarray(state.active), train.lam, train.loss
    )
    f = problem.outputs(state.alpha)
    _, residual = stationarity(problem, state.alpha, f)
    if train.certified(residual):
        return state.replace(f_star=f)
    log.warning(
        "restored version %d: certificate %.2e on the recomputed K (published %.2e); re-solving",
        state.version, residual, state.residual,
    )  # fmt: skip
    options = solve_options(state.solver_config, train.dtype, accept_floor=train.accept_floor)
    alpha, info = newton(
        problem,
        state.alpha,
        train.resolved_tol(),
        train.max_newton,
        options.replace(nystrom=state.nystrom),
    )
    if not (finite(alpha, info.residual) and info.converged and train.certified(info.residual)):
        raise SolverError(
            f"restored version {state.version}: its certificate on the recomputed K is {residual:.2e} and "
            f"re-solving reached {info.residual:.2e} (tolerance {train.resolved_tol():.0e}{_slack(train)})"
            + floor_hint(info.floor, alpha.dtype)
        )
    theta = model.theta(state.x, alpha) if state.theta is not None else None
    return state.replace(
        alpha=alpha, theta=theta, residual=info.residual, f_star=problem.outputs(alpha)
    )


def held_dtype(meta: dict) -> str:
    """The dtype a model's arrays are held in: its ``precision`` record (``dtype auto``: float32
    until promoted), else the configured dtype (checkpoints older than ``dtype auto``)."""
    held = meta.get("precision", {}).get("dtype")
    return held or ("float32" if meta["train"]["dtype"] == "auto" else meta["train"]["dtype"])


def solve_options(
    cfg: SolverConfig, dtype: str, method: str | None = None, accept_floor: float = 1.0
) -> SolveOptions:
    """The linear solves' options from the solver configuration (``method`` overrides its method;
    ``accept_floor``: ``TrainConfig.accept_floor``)."""
    return SolveOptions(
        method=canonical_method(method or cfg.method),
        tol=cfg.resolved_tol(dtype),
        max_iter=cfg.max_iter,
        cholesky_max_dim=cfg.cholesky_max_dim,
        accept_floor=accept_floor,
    )


def preconditioner(
    k: jax.Array, cfg: SolverConfig, form: str, loss: str, one_core: bool = False
) -> Nystrom | None:
    """The CG preconditioner of ``k`` (``linalg.nystrom``), or ``None`` when turned off or when the
    solvers cannot use it (trace form with cross-entropy: ``linalg.nystrom.usable``).
    ``one_core``: its pass over K on one core (work beside requests: ``linalg.nystrom``)."""
    if cfg.nystrom_rank <= 0 or (form == "trace" and loss != "mse"):
        return None
    ny, seconds = nystrom(k, cfg.nystrom_rank, one_core=one_core)
    if ny is not None:
        log.info("Nyström preconditioner of rank %d: %.2f s", cfg.nystrom_rank, seconds)
    return ny


def fingerprint(model: Network) -> float | None:
    """‖θ0‖ in float64 (``None`` without θ): restore checks it before recomputing K."""
    theta0 = getattr(model, "theta0", None)
    return None if theta0 is None else float(np.linalg.norm(np.asarray(theta0, np.float64)))


def _training_hint(
    info, floor: float, train_cfg: TrainConfig, solver_cfg: SolverConfig, limit: str, dtype
) -> str:
    """What to change when training missed its tolerance: the iteration limit of the inner solves
    when they hit it, else the rounding floor of ``dtype`` (the precision the solve ran in) when
    Newton stagnated on it, else λ or the step limit."""
    inner = getattr(info, "inner", ())
    if any(not i.converged and i.iterations >= solver_cfg.max_iter for i in inner):
        return (
            f": its inner CG solves stopped at their iteration limit (max_iter = {solver_cfg.max_iter}): "
            "raise max_iter, or use the solver alpha-cholesky for a small training set"
        )
    if floor:
        return floor_hint(floor, dtype)
    if info.steps >= train_cfg.max_newton and train_cfg.trainer == "newton":
        return f": it hit its step limit (max_newton = {train_cfg.max_newton}): raise max_newton or lam"
    return f": raise lam or {limit}"


def finite(*values) -> bool:
    """Whether every array or number in ``values`` is finite (``None`` counts as finite)."""
    return all(v is None or bool(jnp.all(jnp.isfinite(jnp.asarray(v)))) for v in values)


def non_finite(what: str, train_cfg: TrainConfig, dtype=None) -> str:
    """The message for a solve that produced NaN or inf in ``dtype`` (default the configured one):
    nothing is published."""
    name = np.dtype(dtype).name if dtype is not None else train_cfg.dtype
    return (
        f"{what} produced non-finite values (NaN or inf): the kernel system is too ill-conditioned "
        f"for {name} at lam = {train_cfg.lam:g}; raise lam"
        + (" or use dtype auto or float64" if name != "float64" else "")
        + "; nothing was published"
    )


def floor_hint(floor: float, dtype) -> str:
    """What to change when Newton stagnated on its rounding floor in ``dtype`` (``dual.newton``)."""
    if not floor:
        return ""
    name = np.dtype(dtype).name
    fix = "use dtype auto or float64, " if name != "float64" else ""
    return (
        f"; it stagnated: no step lowers the residual in {name}, whose rounding alone leaves about {floor:.1e}: "
        f"{fix}a looser tol, slack with accept_floor, or a larger lam"
    )


def _kernel(model: Network, x: np.ndarray, form: str, cache_dir: Path | None, progress: bool):
    try:
        return model.train_kernel(x, form, cache_dir, progress)
    except ValueError as e:  # a form the network's kernel is not exact in
        raise InvalidInputError(str(e)) from None
