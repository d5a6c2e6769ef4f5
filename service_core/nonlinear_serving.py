"""Serving a trained *nonlinear* network (``serve --nonlinear``, issue 15 item 3; paper §4.3).

``NonlinearUnlearner`` is an ``Unlearner`` whose served model is the network f(x; θ) itself, trained
on the regularised risk (NL) of docs/maths.md (λ/2‖θ − θ_0‖², ``nonlinear`` module), not its
linearisation. It keeps the service's whole deletion order (``Unlearner.forget``'s contract: compute,
checkpoint, ``before_publish``, publish; then ``purge``, ``after_publish``) and the ``ModelState``
container (ids, inputs, targets, forgotten digests, history, K at θ_0 for the α-space step), with
these meanings in nonlinear mode:

* ``state.theta``: the published nonlinear θ; ``state.alpha``: α = −g(f(X; θ))/(λN) of Eq. (O) from
  the nonlinear outputs (the α-space step's α*, zero on inactive rows);
* ``state.residual`` and the history's ``residual``: the honest certificate, ‖∇L_R(θ)‖ of (NL) over
  the retain set at the published θ relative to its norm at the previous θ (version 0: ‖∇L(θ*)‖
  relative to ‖∇L(θ_0)‖), never a linearised quantity;
* ``state.meta["nonlinear"]``: the mode, the influence step, λ, the training report and the
  linearisation gap measured at build (``linearisation_gap``), with its WARNING.

Build (``build``): ``lifecycle.build`` trains the linearised model (the certified dual optimum, and
K at θ_0); the network is trained from θ_0 by full-batch gradient descent (``nonlinear.train``) and
polished by Newton-CG (``nonlinear.newton_cg``) to ``tol`` relative to ‖∇L(θ_0)‖; the gap is the RMSE
between the nonlinear network's and the linearised optimum's outputs on the training inputs.

A deletion (``forget``): the influence step (α-space with the NTK at θ_0, as the paper, or θ-space
with the Hessian of the nonlinear retain risk), then at most ``refine`` Newton-CG steps on the
nonlinear retain risk. With ``refine`` > 0 a certificate above ``tol`` fails the deletion
(``SolverError``) and nothing changes; without it the certificate is reported, not enforced.

Answers that would be linearised estimates of a nonlinear model (influence, attribution,
self-influence) and additions raise ``NotAvailableError``.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from . import checkpoint, lifecycle, losses, nonlinear, validation
from .config import ModelConfig, SolverConfig, TrainConfig
from .data import Dataset
from .deletion import ForgetResult
from .engine import PreparedVersion, Unlearner
from .errors import NotCertifiedError, SolverError, UnlearnError
from .linalg import SolveInfo
from .models import Model
from .state import ModelState

log = logging.getLogger(__name__)

STEPS = ("alpha", "theta")
# The start-up WARNING: the linearisation does not hold at this λ when the network's outputs on the
# training inputs differ from the linearised optimum's by more than this fraction of how far the
# linearised optimum moved them from f(X; θ_0) (``linearisation_gap``, docs/design.md).
GAP_WARN_RELATIVE = 0.1


class NotAvailableError(UnlearnError):
    """An answer a nonlinear model has no honest value for (a linearised estimate), or an
    operation it does not support (additions). The service answers 409."""


@dataclasses.dataclass(frozen=True)
class NonlinearOptions:
    """How a nonlinear model is trained and forgets.

    Attributes:
      step: ``alpha`` (α-space step with the NTK at θ_0, the paper's) or ``theta`` (θ-space step,
        Hessian of the nonlinear retain risk at θ by HVPs and CG).
      refine: most Newton-CG steps on the nonlinear retain risk after each step (0: none; the
        certificate is then reported, not enforced).
      tol: the certificate's tolerance: ‖∇L_R(θ_new)‖ ≤ tol · ‖∇L_R(θ_prev)‖ (and, at build,
        ‖∇L(θ*)‖ ≤ tol · ‖∇L(θ_0)‖).
      epochs, lr: full-batch gradient descent at build before the Newton-CG polish.
      train_newton_steps: most Newton-CG steps of the polish at build.
    """

    step: str = "alpha"
    refine: int = 0
    tol: float = 1e-6
    epochs: int = 200
    lr: float = 0.1
    train_newton_steps: int = 30

    def __post_init__(self):
        if self.step not in STEPS:
            raise ValueError(f"unknown nonlinear step {self.step!r}: use one of {STEPS}")


class NonlinearNetwork:
    """A ``models.Model`` whose ``outputs`` are the network's f(x; θ) at a version's θ (not f_lin);
    every other attribute is the model's."""

    def __init__(self, model: Model):
        self.model = model
        self._f = jax.jit(lambda theta, x: model.apply_fn(model.unravel(theta), x))

    def __getattr__(self, name):
        return getattr(self.model, name)

    def outputs(self, state: ModelState, x) -> jax.Array:
        """f(x; θ) of a version (``state.theta``): x ``(n, ...)`` → ``(n, d)``."""
        return self._f(state.theta, self.model.flatten_inputs(x).astype(state.theta.dtype))

    def f(self, theta, x) -> jax.Array:
        """f(x; θ), θ ``(P,)``, x ``(n, ...)`` → ``(n, d)``."""
        return self._f(theta, self.model.flatten_inputs(x).astype(theta.dtype))


def _active(state: ModelState) -> tuple[np.ndarray, jax.Array, jax.Array]:
    """Rows of the active points, and their inputs and targets."""
    points = np.flatnonzero(state.active)
    return points, state.x[points], state.y[points]


def _full_kernel(state: ModelState, points: np.ndarray) -> jax.Array:
    """K(X, X) at θ_0 over ``points`` in the full form ``(n·d, n·d)`` (a trace-form K, exact for
    this model, is expanded as k ⊗ I_d)."""
    rows = jnp.asarray(state.layout.rows(points))
    k = jnp.asarray(state.k)[rows][:, rows]
    if state.form == "trace" and state.layout.d > 1:
        k = jnp.kron(k, jnp.eye(state.layout.d, dtype=k.dtype))
    return k


def _alpha(f, y, lam: float, loss: str, n: int) -> jax.Array:
    """α = −g(f)/(λN) (docs/maths.md Eq. (O)) from the network's outputs."""
    return -losses.grad(loss, f, y) / (lam * n)


def _pad(a: jax.Array, points: np.ndarray, capacity: int) -> jax.Array:
    out = jnp.zeros((capacity, *a.shape[1:]), a.dtype)
    return out.at[jnp.asarray(points)].set(a)


def linearisation_gap(f_nl: np.ndarray, f_lin: np.ndarray, f0: np.ndarray, lam: float) -> dict:
    """How far the trained network is from its linearisation, on the training inputs.

    Arguments:
      f_nl: f(X; θ*) of the trained network ``(N, d)``; f_lin: the linearised optimum's outputs
        f_0 + K α* ``(N, d)``; f0: f(X; θ_0) ``(N, d)``.

    Returns:
      ``rmse`` = RMSE(f_nl − f_lin) (output units), ``relative`` = rmse / RMS(f_lin − f0) (the
      fraction of what training changed that the linearisation misses), ``threshold``
      (``GAP_WARN_RELATIVE``) and ``warning`` (a sentence when relative > threshold, else None).
    """
    f_nl, f_lin, f0 = (np.asarray(a, np.float64) for a in (f_nl, f_lin, f0))
    rmse = float(np.sqrt(np.mean((f_nl - f_lin) ** 2)))
    moved = float(np.sqrt(np.mean((f_lin - f0) ** 2)))
    relative = rmse / moved if moved > 0 else float("inf")
    warning = None
    if not relative <= GAP_WARN_RELATIVE:
        warning = (
            f"the linearisation does not hold at lam {lam:g}: the network's training outputs "
            f"differ from its linearisation's by RMSE {rmse:.3g}, {relative:.1%} of what training "
            f"changed (threshold {GAP_WARN_RELATIVE:.0%}); influence steps may land far from "
            "retraining: use a larger lam, or --nonlinear-refine with a tolerance"
        )
    return {"rmse": rmse, "relative": relative, "threshold": GAP_WARN_RELATIVE, "warning": warning}


class NonlinearUnlearner(Unlearner):
    """An ``Unlearner`` serving the nonlinear network f(x; θ) (module docstring).

    Build with ``NonlinearUnlearner.build``, or ``restore`` a checkpoint it wrote.
    """

    def __init__(self, state, model, cache_dir=None, id_key=None, options=None):
        if not isinstance(model, NonlinearNetwork):
            model = NonlinearNetwork(model)
        super().__init__(state, model, cache_dir, id_key)
        self.options = options or NonlinearOptions(**state.meta["nonlinear"]["options"])

    @classmethod
    def build(
        cls,
        dataset: Dataset,
        model_cfg: ModelConfig = ModelConfig(),
        train_cfg: TrainConfig = TrainConfig(),
        solver_cfg: SolverConfig = SolverConfig(),
        cache_dir: Path | None = None,
        progress: bool = True,
        devices: list | None = None,
        memory_budget: float = 0.6,
        id_key: bytes = b"",
        source: str | None = None,
        options: NonlinearOptions | None = None,
    ) -> NonlinearUnlearner:
        """Version 0: the linearised optimum and K at θ_0 (``lifecycle.build``), then the network
        trained on (NL) by gradient descent and Newton-CG (module docstring).

        Raises:
          InvalidInputError: a model without parameters (``linear`` is linear in θ already;
            ``inf-*`` have none).
          NotCertifiedError: the training gave a non-finite gradient. (A training that stops above
            ‖∇L(θ*)‖ ≤ tol · ‖∇L(θ_0)‖, as a ReLU network's can, is served with a WARNING and
            the miss in its certificate.)
          what ``lifecycle.build`` raises.
        """
        options = options or NonlinearOptions()
        if train_cfg.dtype == "auto":  # a gradient-norm certificate of 1e-6 needs float64
            train_cfg = dataclasses.replace(train_cfg, dtype="float64")
        if model_cfg.infinite or model_cfg.kind == "linear":
            raise validation.InvalidInputError(
                f"--nonlinear needs a finite nonlinear network (mlp, cnn or your own), not "
                f"{model_cfg.kind!r}"
            )
        state, model = lifecycle.build(
            dataset, model_cfg, train_cfg, solver_cfg, cache_dir, progress, devices,
            memory_budget, source,
        )  # fmt: skip
        t0 = time.perf_counter()
        lam, loss = train_cfg.lam, train_cfg.loss
        points, x, y = _active(state)
        theta, gd_norms = nonlinear.train(model, x, y, lam, options.epochs, options.lr, loss)
        g_start = float(gd_norms[0])
        theta, report = nonlinear.newton_cg(
            model, theta, x, y, lam, loss, tol=options.tol * g_start,
            max_steps=options.train_newton_steps, relative=False,
        )  # fmt: skip
        g_end = report.grad_norms[-1]
        relative = g_end / g_start
        seconds = time.perf_counter() - t0
        if not np.isfinite(relative):
            raise NotCertifiedError(
                "training the nonlinear network gave a non-finite gradient: lower "
                "--nonlinear-lr or raise lam"
            )
        met = bool(relative <= options.tol)
        if not met:
            # A ReLU network's risk is only piecewise smooth: its minimiser can sit on a kink where
            # ‖∇L‖ never reaches zero (``nonlinear.build_mlp``). Served, with the miss reported.
            log.warning(
                "the nonlinear network's training stopped at ‖∇L‖ %.2e, %.1e of its start, above "
                "--nonlinear-tol %.0e after %d epochs and %d Newton steps (a ReLU network's risk is "
                "only piecewise smooth); served with this certificate, and refinements held to that "
                "tolerance may fail", g_end, relative, options.tol, options.epochs,
                len(report.step_lengths),
            )  # fmt: skip
        net = NonlinearNetwork(model)
        f_nl = net.f(theta, x)
        n = len(points)
        gap = linearisation_gap(f_nl, state.f_star[points], state.f0[points], lam)
        log.info(
            "trained the nonlinear network: ‖∇L‖ %.2e → %.2e (%.1e relative) in %d epochs + %d "
            "Newton steps, %.2f s; linearisation gap RMSE %.3g (%.1f%% of the training change)",
            g_start, g_end, relative, options.epochs, len(report.step_lengths), seconds,
            gap["rmse"], 100 * gap["relative"],
        )  # fmt: skip
        if gap["warning"]:
            log.warning(gap["warning"])
        solve = SolveInfo(
            "nonlinear-gd+newton-cg", len(report.step_lengths), relative, met, seconds
        ).to_dict()
        record = {
            **state.history[0],
            "solve": solve,
            "residual": relative,
            "tolerance": options.tol,
            "accept_floor": 1.0,
            "rounding_floor": 0.0,
            "newton_steps": len(report.step_lengths),
            "certificate": {
                "kind": "gradient norm of the nonlinear training risk at the trained θ",
                "grad_norm": g_end,
                "reference": g_start,
                "relative": relative,
                "tol": options.tol,
                "met": met,
                "enforced": False,
                "step": None,
                "refine_steps": len(report.step_lengths),
                "linearisation_gap": gap,
            },  # fmt: skip
            "linearised_residual": float(state.residual),
        }
        meta = {
            **state.meta,
            "nonlinear": {
                "mode": "nonlinear",
                "options": dataclasses.asdict(options),
                "lambda": lam,
                "training": {
                    "epochs": options.epochs,
                    "lr": options.lr,
                    "newton_steps": len(report.step_lengths),
                    "grad_norm_start": g_start,
                    "grad_norm_end": g_end,
                    "relative": relative,
                    "met": met,
                    "seconds": seconds,
                },
                "linearisation_gap": gap,
            },
        }
        alpha = _pad(_alpha(f_nl, y, lam, loss, n), points, state.capacity)
        state = state.replace(
            theta=theta, alpha=alpha, residual=relative, history=(record,), meta=meta,
            f_star=_pad(f_nl, points, state.capacity), nystrom=None,
        )  # fmt: skip
        return cls(state, net, cache_dir, id_key, options)

    @classmethod
    def restore(
        cls,
        checkpoint_dir: Path,
        cache_dir: Path | None = None,
        progress: bool = True,
        devices: list | None = None,
        id_key: bytes = b"",
        prune: bool = False,
        expect: lifecycle.Identity | None = None,
        options: NonlinearOptions | None = None,
        max_version: int | None = None,
    ) -> NonlinearUnlearner | None:
        """The newest checkpoint (``lifecycle.restore`` without re-certifying α: α is not the
        linearised optimum here), θ as saved; ``options`` (default: the saved ones) may change the
        step and refinement of later deletions; ``max_version`` as ``Unlearner.restore``.

        Raises:
          CheckpointMismatchError: another model, or a checkpoint not built with --nonlinear.
          what ``lifecycle.restore`` raises.
        """
        restored = lifecycle.restore(
            checkpoint_dir,
            cache_dir,
            progress,
            devices,
            id_key,
            prune,
            expect,
            recertify=False,
            max_version=max_version,
        )
        if restored is None:
            return None
        state, model = restored
        if "nonlinear" not in state.meta:
            raise lifecycle.CheckpointMismatchError(
                lifecycle.mismatch_message(
                    checkpoint_dir, state.version, ["mode 'linearised' (checkpoint) ≠ 'nonlinear'"]
                )
            )
        state = state.replace(nystrom=None)
        return cls(state, model, cache_dir, id_key, options)

    def ready_spare(self) -> float:
        """No spare K buffer: a nonlinear deletion erases K's rows by a product, and K is used only
        by the α-space step. Returns 0 (seconds)."""
        return 0.0

    def after_follow(self, preconditioner: bool = True) -> dict[str, float]:
        """Nothing to make after a followed version: no preconditioner (K is used only by the
        α-space step), no spare K buffer (``ready_spare``). Returns ``{}``."""
        return {}

    # -- answers a nonlinear model has no honest value for -------------------------------------
    def _unavailable(self, what: str, why: str) -> NotAvailableError:
        return NotAvailableError(
            f"{what} is not available for a nonlinear model (--nonlinear): {why}"
        )

    def influence(self, forget_ids, x, y, refine: bool = False):
        """Refused (``NotAvailableError``, 409): the estimate would be of the linearised model."""
        raise self._unavailable(
            "the influence estimate",
            "it would be a linearised estimate; forget the records (POST /v1/forget) and compare "
            "predictions instead",
        )

    def attribute(self, x, y, k: int = 10, exact: bool = False, of: str = "loss", **_):
        """Refused (``NotAvailableError``, 409): leave-one-out scores here are linearised."""
        raise self._unavailable("attribution", "leave-one-out scores here are linearised")

    def self_influence(self, exact: bool = False, top: int | None = None, cancelled=None):
        """Refused (``NotAvailableError``, 409): leave-one-out scores here are linearised."""
        raise self._unavailable("self-influence", "leave-one-out scores here are linearised")

    def loo_factor(self):
        """Refused (``NotAvailableError``): the factor is of the linearised model."""
        raise self._unavailable("the leave-one-out factor", "it is of the linearised model")

    def _no_additions(self) -> NotAvailableError:
        return self._unavailable(
            "adding records", "the nonlinear network would have to be retrained; rebuild the model"
        )

    def add(self, ids, x, y, checkpoint_dir=None, **kwargs):
        """Refused (``NotAvailableError``, 409): an addition would need the network retrained."""
        raise self._no_additions()

    def validate_add(self, ids, x, y, pending=frozenset(), state=None) -> int:
        """Refuses: ``POST /v1/records`` answers 409 before anything is queued."""
        raise self._no_additions()

    def check_add_fits(self, n_more: int, state=None) -> None:
        """Refused (``NotAvailableError``, 409), as ``validate_add``."""
        raise self._no_additions()

    def plan_forget(self, ids, method=None, refine=None, strict=True):
        """Refused (``NotAvailableError``): a nonlinear deletion is only applied (``forget``)."""
        raise self._unavailable("planning a deletion", "use forget")

    def prepare_follow(self, newer: ModelState) -> PreparedVersion:
        """``newer``, a later version read from a checkpoint, ready to be served
        (``Unlearner.serve_prepared``): its θ as saved, K at θ_0 with the forgotten rows erased
        (not recomputed; K is only used by the α-space step). Nothing follows it
        (``after_follow``).

        Raises:
          ValueError: ``newer`` is not an erasure of this version's rows.
        """
        with self._forget_lock:
            newer = newer.replace(id_key=self._state.id_key)
            st = self._state
            keep = np.zeros(st.capacity, bool)
            for i, p in st.index.items():
                keep[p] = i in newer.index and newer.index[i] == p
            if newer.capacity != st.capacity or keep.sum() != newer.n:
                raise ValueError("the newer checkpoint is not an erasure of this version's rows")
            state = newer.replace(
                k=_erase(st, keep), layout=st.layout, nystrom=None, k_origin=st.k_origin
            )
            return PreparedVersion(base=st, state=state, model=self.model)

    # -- deletion -------------------------------------------------------------------------------
    def forget(
        self,
        ids: Sequence[str],
        checkpoint_dir: Path | None = None,
        before_publish: Callable[[ForgetResult], None] | None = None,
        note: dict | None = None,
    ) -> ForgetResult:
        """Remove ``ids`` from the nonlinear network: influence step, optional Newton-CG
        refinement, certificate; then checkpoint, ``before_publish``, publish (the contract of
        ``Unlearner.forget``). ``result.certificate`` holds the nonlinear certificate
        (``nonlinear`` key: grad_norm, reference, relative, tol, met, step, refine steps) and the
        linearisation gap measured at build.

        Raises:
          InvalidForgetSetError, UnknownIdsError, AlreadyForgottenError: bad ids.
          SolverError: a non-finite step, a θ-space solve that missed, or a refinement whose
            certificate missed ``tol``: the model is unchanged.
          OSError, or what ``before_publish`` raised (the checkpoint is dropped).
        """
        t0 = time.perf_counter()
        with self._forget_lock:
            st = self._state
            validation.forget_set(st, ids)
            new_state, result = self._plan(st, list(ids))
            if note:
                record = {**new_state.history[-1], "note": dict(note)}
                new_state = new_state.replace(history=new_state.history[:-1] + (record,))
            t1 = time.perf_counter()
            try:
                if checkpoint_dir is not None:
                    checkpoint.save(checkpoint_dir, new_state)
                t2 = time.perf_counter()
                timings = {**result.timings, "checkpoint": t2 - t1}
                if before_publish is not None:
                    before_publish(result._replace(seconds=t2 - t0, timings=timings))
            except BaseException:
                if checkpoint_dir is not None:
                    checkpoint.prune(checkpoint_dir, keep=self._state.version)
                raise
            t3 = time.perf_counter()
            self._state = new_state
            t4 = time.perf_counter()
        timings.update(before_publish=t3 - t2, publish=t4 - t3)
        return result._replace(seconds=t4 - t0, timings=timings)

    def _plan(self, st: ModelState, ids: list[str]) -> tuple[ModelState, ForgetResult]:
        opts, model = self.options, self.model.model
        lam, loss = st.train_config.lam, st.train_config.loss
        timings = {}
        t = time.perf_counter()
        points, x, y = _active(st)
        forget = st.mask(ids)[points]
        retain = ~forget
        theta_prev = st.theta
        if opts.step == "alpha":
            delta, solve = nonlinear.alpha_step(
                model, theta_prev, x, y, forget, lam, _full_kernel(st, points), loss
            )
        else:
            delta, solve = nonlinear.theta_step(model, theta_prev, x, y, forget, lam, loss)
        theta = theta_prev + delta
        timings["solve"] = time.perf_counter() - t
        if not (solve.converged and bool(jnp.all(jnp.isfinite(theta)))):
            raise SolverError(
                f"the {opts.step}-space influence step did not converge ({solve.method}, relative "
                f"residual {solve.residual:.2e}); the model is unchanged"
                + (": try --nonlinear-step alpha or a larger lam" if opts.step == "theta" else "")
            )
        t = time.perf_counter()
        refine_info, steps = None, 0
        if opts.refine > 0:
            theta, report, cert = nonlinear.refine(
                model, theta, theta_prev, x, y, forget, lam, loss, opts.tol, opts.refine
            )
            steps = len(report.step_lengths)
            refine_info = SolveInfo(
                "nonlinear-newton-cg", steps, cert.relative, cert.met, time.perf_counter() - t
            )
        else:
            cert = nonlinear.certificate(
                model, theta, theta_prev, x, y, retain, lam, loss, opts.tol
            )
        timings["refine"] = time.perf_counter() - t
        if not np.isfinite(cert.relative):
            raise SolverError("the deletion produced a non-finite θ; the model is unchanged")
        if opts.refine > 0 and not cert.met:
            raise SolverError(
                f"the refinement missed its tolerance: ‖∇L_R‖ {cert.grad_norm:.2e} is "
                f"{cert.relative:.2e} of its norm at the previous θ after {steps} Newton-CG "
                f"step(s) (tolerance {opts.tol:.0e}); the model is unchanged: raise "
                "--nonlinear-refine or --nonlinear-tol, or lam"
            )
        t = time.perf_counter()
        keep_rows = np.zeros(st.capacity, bool)
        keep_rows[points[retain]] = True
        keep = jnp.asarray(keep_rows)
        n_r = int(retain.sum())
        f_r = self.model.f(theta, x[retain])
        alpha = _pad(_alpha(f_r, y[retain], lam, loss, n_r), points[retain], st.capacity)
        zero = keep[:, None].astype(st.x.dtype)
        x_new = st.x * keep.reshape((-1,) + (1,) * (st.x.ndim - 1)).astype(st.x.dtype)
        version = st.version + 1
        gap = st.meta["nonlinear"]["linearisation_gap"]
        nl_cert = {
            "kind": "gradient norm of the nonlinear retain risk at the published θ",
            "grad_norm": cert.grad_norm,
            "reference": cert.reference,
            "relative": cert.relative,
            "tol": cert.tol,
            "met": cert.met,
            "enforced": opts.refine > 0,
            "step": opts.step,
            "refine_steps": steps,
            "linearisation_gap": gap,
        }
        certificate = {
            "residual": cert.relative,
            "tolerance": opts.tol,
            "accept_floor": 1.0,
            "rounding_floor": 0.0,
            "tolerance_ratio": cert.relative / opts.tol,
            "dtype": st.dtype,
            "nonlinear": nl_cert,
        }
        digests = tuple(st.digest(i) for i in ids)
        record = {
            "version": version,
            "n_forgotten": len(ids),
            "solve": solve.to_dict(),
            "residual": cert.relative,
            "refine": None if refine_info is None else refine_info.to_dict(),
            "reason": f"configured (--nonlinear-step {opts.step})",
            "rounding_floor": 0.0,
            "newton_steps": steps,
            "refine_cg_iterations": 0,
            "tolerance": opts.tol,
            "accept_floor": 1.0,
            "dtype": st.dtype,
            "time": time.time(),
            "certificate": nl_cert,
        }
        ids_new = st.ids.copy()
        ids_new[~keep_rows] = ""
        new_state = st.replace(
            version=version, ids=ids_new, x=x_new, y=st.y * zero, f0=st.f0 * zero,
            k=_erase(st, keep_rows), alpha=alpha, theta=theta, residual=cert.relative,
            forgotten=st.forgotten + digests, history=st.history + (record,),
            f_star=_pad(f_r, points[retain], st.capacity), nystrom=None,
        )  # fmt: skip
        timings["state"] = time.perf_counter() - t
        result = ForgetResult(
            version=version, solve=solve, refine=refine_info, residual=cert.relative,
            seconds=0.0, reason=record["reason"], timings=timings, certificate=certificate,
        )  # fmt: skip
        return new_state, result


def _erase(st: ModelState, keep_rows: np.ndarray) -> jax.Array:
    """K with the rows and columns of points not in ``keep_rows`` (bool ``(C,)``) zeroed."""
    rows = jnp.asarray(st.layout.row_mask(jnp.asarray(keep_rows))).astype(st.k.dtype)
    return st.k * rows[:, None] * rows[None, :]
