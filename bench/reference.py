"""Float64 references for a deletion, computed on the engine's own (float32) K, α*, f_0 and y.

Two references per forget set F (docs/maths.md):

* the **exact influence step**: the solution of system (A),
  (W_R K_RR + λ N_R I) Δα_R = λ N_F α*_R + W_R K_RF α*_F, Δα_F = −α*_F, to a float64 relative
  residual of about 1e-13 (what a direct float64 solve gives);
* **exact retraining**: the minimiser of the retain risk L_R(α), Newton in float64 until the relative
  stationarity residual is about 1e-12.

Both are solved by mixed-precision iterative refinement: residuals in float64 (K's float32 entries
are exact in float64; products in row chunks so K is never copied whole), corrections by the engine's
float32 CG solver of (A) (``linalg.solve_system_a``), which gains about six digits per round.
None of this is timed as a method: it is the yardstick.
"""

from __future__ import annotations

import time

import jax.numpy as jnp
import numpy as np

from service_core.layout import KernelLayout
from service_core.linalg import SolveOptions, SPDSystem, solve_system_a


class Float64Kernel:
    """K (engine layout, float32, on the host) applied in float64, ``chunk`` rows at a time."""

    def __init__(self, k, form: str, d: int, chunk: int = 2048):
        self.k = np.asarray(k)
        self.form = form
        self.d = d
        self.chunk = chunk

    def matvec(self, v: np.ndarray) -> np.ndarray:
        """K v for v ``(C, d)`` float64 → ``(C, d)``."""
        shape = v.shape
        flat = v.reshape(-1) if self.form == "full" else v
        out = np.empty((self.k.shape[0],) + flat.shape[1:], np.float64)
        for r0 in range(0, self.k.shape[0], self.chunk):
            r1 = min(r0 + self.chunk, self.k.shape[0])
            out[r0:r1] = self.k[r0:r1].astype(np.float64) @ flat
        return out.reshape(shape)


def softmax(f: np.ndarray) -> np.ndarray:
    z = f - f.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def loss_terms(loss: str, f: np.ndarray, y: np.ndarray):
    """(values (n,), g (n, d), W (n, d, d) or None) in float64."""
    if loss == "mse":
        return 0.5 * np.sum((f - y) ** 2, axis=-1), f - y, None
    p = softmax(f)
    scale = y.sum(axis=-1)
    z = f - f.max(axis=-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=-1, keepdims=True))
    values = -np.sum(y * logp, axis=-1)
    g = p * scale[:, None] - y
    w = (np.einsum("na,ab->nab", p, np.eye(f.shape[-1])) - p[:, :, None] * p[:, None, :]) * scale[
        :, None, None
    ]
    return values, g, w


def sqrt_blocks(w: np.ndarray | None) -> np.ndarray | None:
    if w is None:
        return None
    evals, evecs = np.linalg.eigh(w)
    root = np.sqrt(np.clip(evals, 0.0, None))
    return np.einsum("nab,nb,ncb->nac", evecs, root, evecs)


def apply_blocks(w: np.ndarray | None, v: np.ndarray) -> np.ndarray:
    return v if w is None else np.einsum("nab,nb->na", w, v)


class ReferenceSolver:
    """Float64 solves of system (A) and of the retain risk for one trained state.

    Arguments:
      k: K (jax or numpy, float32, engine layout); layout: its ``KernelLayout`` (form, d).
      f0, y, alpha: ``(C, d)`` (capacity rows; inactive rows are zero); active: bool ``(C,)``.
      lam, loss: as trained.
    """

    def __init__(self, k, layout: KernelLayout, f0, y, alpha, active, lam: float, loss: str):
        self.k32 = k
        self.layout = layout
        self.form = layout.form
        self.f0 = np.asarray(f0, np.float64)
        self.y = np.asarray(y, np.float64)
        self.alpha = np.asarray(alpha, np.float64)
        self.active = np.asarray(active, bool)
        self.d = self.y.shape[1]
        self.kern = Float64Kernel(k, self.form, self.d)
        self.lam = float(lam)
        self.loss = loss
        self.f_star = self.f0 + self.kern.matvec(self.alpha * self.active[:, None])

    def _solve32(
        self, s: np.ndarray | None, retain: np.ndarray, rhs: np.ndarray, c: float, tol: float = 1e-6
    ):
        """Approximate solution of (W K + c I) δ = rhs on ``retain`` by the engine's float32 CG."""
        scale = float(np.max(np.abs(rhs)))
        if scale == 0.0:
            return np.zeros_like(rhs), 0
        dtype = jnp.float32
        s32 = None if s is None else jnp.asarray(s, dtype)
        system = SPDSystem.make(jnp.asarray(self.k32), self.layout, s32, jnp.asarray(retain), c)
        options = SolveOptions(method="alpha-cg", tol=tol, max_iter=5000, cholesky_max_dim=0)
        delta, info = solve_system_a(system, jnp.asarray(rhs / scale, dtype), options)
        return np.asarray(delta, np.float64) * scale, int(info.iterations)

    def _apply_a(self, w, retain, delta, c):
        """(W K + c I) δ on ``retain`` (float64), δ zero elsewhere."""
        m = retain[:, None].astype(np.float64)
        kd = self.kern.matvec(delta * m)
        return m * (apply_blocks(w, kd) + c * delta)

    def solve_a(
        self, w, s, retain, b, c, rtol: float = 1e-13, max_rounds: int = 8
    ) -> tuple[np.ndarray, dict]:
        """Iterative refinement for (W K_RR + c I) δ = b; returns δ and {rounds, residual, cg}."""
        m = retain[:, None].astype(np.float64)
        b = b * m
        bnorm = np.linalg.norm(b)
        delta = np.zeros_like(b)
        rounds, cg_total, rel = 0, 0, 1.0
        best = np.inf
        while rounds < max_rounds:
            rounds += 1
            r = b - self._apply_a(w, retain, delta, c)
            rel = float(np.linalg.norm(r) / bnorm) if bnorm > 0 else 0.0
            if rel <= rtol or rel >= best:
                break
            best = rel
            e, it = self._solve32(s, retain, r, c)
            cg_total += it
            delta = delta + e * m
        return delta, {"rounds": rounds, "residual": rel, "cg_iterations": cg_total}

    def exact_step(self, forget: np.ndarray) -> tuple[np.ndarray, dict]:
        """Δα of the exact influence step (system (A)) for removing ``forget``; float64 ``(C, d)``."""
        t0 = time.perf_counter()
        retain = self.active & ~forget
        n_f, n_r = int(forget.sum()), int(retain.sum())
        m_r = retain[:, None].astype(np.float64)
        m_f = forget[:, None].astype(np.float64)
        _, _, w = loss_terms(self.loss, self.f_star, self.y)
        s = sqrt_blocks(w)
        k_rf_alpha_f = m_r * self.kern.matvec(self.alpha * m_f)
        b = self.lam * n_f * self.alpha * m_r + apply_blocks(w, k_rf_alpha_f) * m_r
        c = self.lam * n_r
        delta_r, info = self.solve_a(w, s, retain, b, c)
        info["seconds"] = time.perf_counter() - t0
        return delta_r * m_r - self.alpha * m_f, info

    def stationarity(self, alpha: np.ndarray, retain: np.ndarray, f: np.ndarray | None = None):
        """(r, relative residual, f, loss values, g) of the retain risk at α (float64)."""
        m = retain[:, None].astype(np.float64)
        n_r = int(retain.sum())
        if f is None:
            f = self.f0 + self.kern.matvec(alpha * m)
        values, g, _ = loss_terms(self.loss, f, self.y)
        g = g * m
        reg = self.lam * n_r * alpha * m
        r = g + reg
        rel = float(np.linalg.norm(r) / max(np.linalg.norm(g) + np.linalg.norm(reg), 1e-300))
        return r, rel, f, values, g

    def risk(self, alpha, retain, f, values) -> float:
        m = retain.astype(np.float64)
        n_r = m.sum()
        return float(
            np.sum(values * m) / n_r + 0.5 * self.lam * np.sum(alpha * m[:, None] * (f - self.f0))
        )

    def retrain(
        self, forget: np.ndarray, start: np.ndarray, tol: float = 1e-12, max_steps: int = 30
    ) -> tuple[np.ndarray, dict]:
        """α minimising the retain risk (float64 Newton with backtracking), started at α* + ``start``.

        Returns Δα = α_retrain − α* ``(C, d)`` and {steps, residual, seconds}.
        """
        t0 = time.perf_counter()
        retain = self.active & ~forget
        m = retain[:, None].astype(np.float64)
        n_r = int(retain.sum())
        c = self.lam * n_r
        alpha = (self.alpha + start) * m
        r, rel, f, values, _ = self.stationarity(alpha, retain)
        steps, stalls = 0, 0
        while rel > tol and steps < max_steps:
            _, _, w = loss_terms(self.loss, f, self.y)
            s = sqrt_blocks(w)
            if rel > 1e-6:
                delta, _ = self._solve32(s, retain, -r, c)
                delta = delta * m
            else:
                delta, _ = self.solve_a(w, s, retain, -r, c, rtol=1e-10, max_rounds=3)
            kd = self.kern.matvec(delta)
            step = 1.0
            if self.loss != "mse" and rel > 1e-4:
                base = self.risk(alpha, retain, f, values)
                slope = float(np.vdot(kd * m, r)) / n_r
                while step > 1e-8:
                    f_try = f + step * kd
                    v_try, _, _ = loss_terms(self.loss, f_try, self.y)
                    if (
                        self.risk(alpha + step * delta, retain, f_try, v_try)
                        <= base + 1e-4 * step * slope
                    ):
                        break
                    step *= 0.5
            alpha = alpha + step * delta
            f = f + step * kd
            r, new_rel, f, values, _ = self.stationarity(alpha, retain, f)
            steps += 1
            if new_rel >= rel:
                stalls += 1
                if stalls >= 2:
                    rel = min(rel, new_rel)
                    break
            rel = new_rel
        # one fresh residual from scratch (f accumulated step by step drifts at 1e-16 only)
        _, rel, _, _, _ = self.stationarity(alpha, retain)
        return alpha - self.alpha * self.active[:, None], {
            "steps": steps,
            "residual": rel,
            "seconds": time.perf_counter() - t0,
        }
