"""Leave-one-out attribution and self-influence for every training record at once.

docs/maths.md, Leave-one-out for every record. Removing record i retrains on R = D \\ {i} with N_R = N − 1, so
the regulariser constant is c = λ(N − 1) (risk normalised by 1/N_R, as a forget of one record). In the
θ-space of the linearised model, with θ measured from θ_p, one Newton step on the retain risk from the
trained θ* is

    Δθ^(−i) = (H − J_iᵀ W_i J_i)^{-1} (J_iᵀ g_i + λ θ*),     H = Σ_j J_jᵀ W_j J_j + c I,

which is exact retraining for squared error (the risk is quadratic) and the influence step (A) with
F = {i} for cross-entropy (docs/maths.md Eq. 9). Everything it needs at test points is a kernel expression:

    R = J H^{-1} Jᵀ = (K − K S B^{-1} S K) / c,    B = c I + S K S   (SPD; S = W^{1/2}, docs/maths.md (B))

(squared error: S = I and R = K (K + c I)^{-1} = I − c G with G = (K + c I)^{-1}). The Woodbury
identity on the rank-d downdate J_iᵀ W_i J_i gives, with q = λ R α*, h_i = R_ii g_i + q_i and

    m_i = g_i + S_i (I − S_i R_ii S_i)^{-1} S_i h_i,

the output change at any point t (a test point, or t = i for self-influence):

    Δf_t^(−i) = q_t + R_ti m_i,          R_ti = J_t H^{-1} J_iᵀ  (d × d).

For squared error this is docs/maths.md's closed form (``α^(−i) = β − G_{:,i} G_ii^{-1} β_i``) written in
outputs; unlike it, it never inverts K, so it holds when K is singular (a linear model with P < N·d).
Loss changes are ℓ(f_t + Δf_t, y_t) − ℓ(f_t, y_t): exact for squared error; for cross-entropy the loss
at the influence step's outputs (first order in the step, not linearised in the loss). ``refined``
replaces the step by Newton on the retain risk (exact retraining) for a few records.

Test points. Every record's change at a test point is one row of R_tX M, M = blockdiag(m_i) as a
``(C·d, C)`` matrix, and R_tX = K_tX G (squared error) or (K_tX − K_tX S B^{-1} S K)/c (cross-entropy).
So the factor keeps, once per version,

    Q = G [M, λα*]                                    (squared error)
    Q = ([M, α*] − S B^{-1} S K [M, α*]) / c,  last column times λ     (cross-entropy)

and a request costs one product K(X_t, X) Q: its first C columns are R_tX M, the last λ R_tX α* = q_t.
L^{-1} S K [M, α*] is Z's block columns times the m_i (n·C·d flops), so forming Q costs one
triangular solve with C + 1 columns; Z, L and L^{-1} are freed after it.

Layout (``ntk`` module docstring): K full ``(C·d, C·d)`` point-major output-minor, or trace ``(C, C)``
(K = k ⊗ I_d); C ≥ N rows, rows of inactive points zero. Squared error in trace form works on k alone
(R = r ⊗ I_d, and test points use r_tX = k_tX G directly); cross-entropy in trace form expands K to
the full form (W couples the outputs).

Cost for n = C·d unknowns (full form): Cholesky of B, n³/3 flops, then for squared error the inverse
of the factor (n³/3) and for cross-entropy Z = L^{-1} S K (n³); Q adds n²·C (one triangular product
or solve with C + 1 columns). A request for n_t test points then costs 2·n_t·d·n·C flops beside
K(X_t, X). Memory: B (and Z) beside K while factoring; the cached factor holds Q, ``(n, C + 1)``.
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any, NamedTuple

import jax.numpy as jnp
import numpy as np

from . import losses
from .dual import DualProblem
from .errors import ComputationCancelled, InvalidInputError, RefinementLimitError, SolverError
from .influence import Refinement, deletion_step
from .linalg import SolveOptions
from .linalg.nogil import one_blas_thread, potrf_lower, trmm_lower, trsm_lower, trtri_lower

log = logging.getLogger(__name__)

OF = ("loss", "output")


class LooFactor(NamedTuple):
    """Everything leave-one-out needs from one model version (cache it per version).

    Attributes:
      form: ``full`` or ``trace`` (the state's K layout).
      loss: ``mse`` or ``ce``.
      c: the shift λ(N − 1).
      d: output dimension.
      dk: block size of the factored matrix: d (full form, or trace form expanded for cross-entropy)
        or 1 (squared error in trace form, where R = r ⊗ I_d).
      linv: squared error in trace form only (dk = 1): L^{-1} ``(C, C)``, L the Cholesky factor of
        B = k + c I (Fortran order, lower triangle); ``None`` otherwise (freed once ``qmat`` is formed).
      qmat: block size d: Q ``(C·d, C + 1)`` with R_tX M = K_tX Q[:, :C] and λ R_tX α* =
        K_tX Q[:, C] (M = blockdiag(m_i) as a ``(C·d, C)`` matrix; module docstring, "Test points"),
        so every record's output change at test points is one product with K(X_t, X);
        ``None`` for dk = 1.
      s: S = W^{1/2} at the trained outputs ``(C, d, d)``; ``None`` for squared error.
      r_diag: diagonal blocks R_ii ``(C, dk, dk)``.
      q: λ R α* ``(C, d)`` (the shared part of every record's change, from N → N − 1).
      m: m_i ``(C, d)``, so that Δf_t^(−i) = q_t + R_ti m_i.
      f_star: trained outputs f* ``(C, d)``; y: targets ``(C, d)``; alpha: α* ``(C, d)``;
      active: bool ``(C,)``.
      lam: λ.
      seconds: wall time of the factorisation.
    """

    form: str
    loss: str
    c: float
    d: int
    dk: int
    linv: np.ndarray | None
    qmat: np.ndarray | None
    s: np.ndarray | None
    r_diag: np.ndarray
    q: np.ndarray
    m: np.ndarray
    f_star: np.ndarray
    y: np.ndarray
    alpha: np.ndarray
    active: np.ndarray
    lam: float
    seconds: float


class LooChanges(NamedTuple):
    """Output and loss changes if each record alone were removed.

    Attributes:
      delta_outputs: Δf ``(n_t, C, d)`` (test points) or ``(C, d)`` (self-influence): outputs after
        retraining without record i minus outputs now, model output units.
      delta_loss: Δℓ ``(n_t, C)`` or ``(C,)``, loss units (per-point loss, not the risk). Rows of
        inactive records are NaN.
      exact: whether the changes are exact retraining (squared error, or refined) or the influence step.
    """

    delta_outputs: np.ndarray
    delta_loss: np.ndarray
    exact: bool


class RankedRecords(NamedTuple):
    """The k records chosen per test point, in rank order.

    Attributes:
      rows: record rows in the state's layout ``(n_t, k)`` int.
      delta_loss: ``(n_t, k)``; delta_outputs: ``(n_t, k, d)`` (as ``LooChanges``).
    """

    rows: np.ndarray
    delta_loss: np.ndarray
    delta_outputs: np.ndarray


class Attribution(NamedTuple):
    """Top-k attribution of test points (``Unlearner.attribute``).

    Attributes:
      version: model version.
      ids: record ids, ``helpful_ids`` and ``harmful_ids`` ``(n_t, k)`` str.
      helpful: records whose removal raises the test loss most (Δℓ > 0 first); with ``of="output"``,
        whose removal lowers the ranked output most.
      harmful: records whose removal lowers the test loss most (Δℓ < 0 first); with ``of="output"``,
        whose removal raises the ranked output most.
      exact: the returned changes are exact retraining (squared error, or ``exact=True``).
      of: ``loss`` or ``output``.
    """

    version: int
    helpful_ids: np.ndarray
    harmful_ids: np.ndarray
    helpful: RankedRecords
    harmful: RankedRecords
    exact: bool
    of: str


class SelfInfluence(NamedTuple):
    """Self-influence of every active record (``Unlearner.self_influence``).

    Attributes:
      version: model version.
      ids: active ids ``(N,)`` str, sorted by ``self_influence`` descending.
      self_influence: ℓ_i after retraining without i minus ℓ_i now ``(N,)``, loss units.
      exact: every value is exact retraining (squared error, or all refined) rather than the
        influence step.
      exact_top: how many leading records carry exact values (``self_influence``'s ``top``).
    """

    version: int
    ids: np.ndarray
    self_influence: np.ndarray
    exact: bool
    exact_top: int


def _full_kernel(k: np.ndarray, form: str, d: int, loss: str) -> tuple[np.ndarray, int]:
    """K as the matrix to factor, and its block size: k itself for squared error in trace form
    (dk = 1), K ⊗ I_d expanded for cross-entropy in trace form, the full form as it is."""
    if form == "full":
        return k, d
    if loss == "mse":
        return k, 1
    return np.kron(k, np.eye(d, dtype=k.dtype)), d


def _left_blocks(s: np.ndarray, a: np.ndarray) -> np.ndarray:
    """blockdiag(S) @ a for a ``(C·d, m)``, S ``(C, d, d)``."""
    cap, d, _ = s.shape
    # einsum, not matmul: a stack of d × d by d × m products is one BLAS call per record in
    # matmul, 5–7× slower on two shared cores (820 records, m = 8,200: 3.2–5.4 s against 0.45–1.1 s)
    return np.einsum("iab,ibm->iam", s, a.reshape(cap, d, -1)).reshape(a.shape)


def _diag_gram(a: np.ndarray, cap: int, dk: int, chunk: int = 2048) -> np.ndarray:
    """Diagonal blocks of aᵀ a, ``(C, dk, dk)``, for a ``(n, C·dk)``, by chunks of rows."""
    out = np.zeros((cap, dk, dk), dtype=np.float64 if a.dtype == np.float64 else a.dtype)
    for r0 in range(0, a.shape[0], chunk):
        rows = np.ascontiguousarray(a[r0 : r0 + chunk]).reshape(-1, cap, dk)
        out += np.matmul(rows.transpose(1, 2, 0), rows.transpose(1, 0, 2))
    return out


def _apply_blocks(r: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Per-record blocks times vectors: r ``(C, dk, dk)``, v ``(C, d)`` → ``(C, d)`` (dk = 1: scalars)."""
    if r.shape[-1] == 1 and v.shape[-1] != 1:
        return r[:, 0, 0, None] * v
    return np.einsum("iab,ib->ia", r, v)


def _solve_blocks(a: np.ndarray, v: np.ndarray) -> np.ndarray:
    """a_i^{-1} v_i per record: a ``(C, dk, dk)``, v ``(C, d)``."""
    if a.shape[-1] == 1 and v.shape[-1] != 1:
        return v / a[:, 0, 0, None]
    return np.linalg.solve(a, v[..., None])[..., 0]


def loo_factor(
    k,
    form: str,
    f0,
    y,
    alpha,
    active,
    lam: float,
    loss: str,
) -> LooFactor:
    """Factor the leave-one-out system of a trained model once; every record's change follows.

    Arguments:
      k: K in the engine layout of ``form`` (``(C·d, C·d)`` or ``(C, C)``), float32 or float64;
        rows and columns of inactive points zero.
      form: ``full`` or ``trace``.
      f0: f_0 ``(C, d)``; y: targets ``(C, d)``; alpha: α* ``(C, d)``, optimal on the active points.
      active: bool ``(C,)``, the training set D (N = its count, N ≥ 2).
      lam: λ; loss: ``mse`` or ``ce``.

    Returns:
      ``LooFactor`` (module docstring: B, R_ii, q, m). Computed in K's dtype.

    Raises:
      InvalidInputError: fewer than two active records (nothing is left without one).
      SolverError: B is not numerically positive definite (Cholesky failed).
    """
    t0 = time.perf_counter()
    active = np.asarray(active, bool)
    n = int(active.sum())
    if n < 2:
        raise InvalidInputError("leave-one-out needs at least two training records")
    k = np.asarray(k)
    dtype = k.dtype
    f0, y, alpha = (np.asarray(a, dtype) for a in (f0, y, alpha))
    cap, d = alpha.shape
    m_act = active[:, None].astype(dtype)
    c = float(lam) * (n - 1)
    kmat, dk = _full_kernel(k, form, d, loss)
    a_cols = alpha if dk == 1 else alpha.reshape(-1, 1)  # α* as columns of kmat's side
    k_alpha = (kmat @ a_cols).reshape(cap, d)
    f_star = (f0 + k_alpha) * m_act
    g = np.asarray(losses.grad(loss, jnp.asarray(f_star), jnp.asarray(y))) * m_act
    linv = qmat = s = None
    if loss == "mse":
        b = np.array(kmat, order="C")
        b[np.diag_indices_from(b)] += c
        lf, info = _potrf(b.T)
        _check_chol(info)
        linv, info = _trtri(lf)
        _check_chol(info)
        g_diag = _diag_gram(linv, cap, dk)  # G = L^{-T} L^{-1}: its diagonal blocks
        r_diag = np.eye(dk, dtype=dtype)[None] - c * g_diag
        g_alpha = linv.T @ (linv @ a_cols)  # G α*
        q = lam * (a_cols - c * g_alpha).reshape(cap, d)  # λ R α*, R = I − c G
        h = _apply_blocks(r_diag, g) + q
        ident = np.eye(dk, dtype=dtype)[None]
        m = (g + _solve_blocks(ident - r_diag, h)) * m_act
        if dk != 1:  # Q = G [M, λα*]: R_tX = K_tX G
            cols = np.empty((cap * d, cap + 1), dtype)
            _block_columns(linv, m, out=cols[:, :cap])  # L^{-1} M
            cols[:, cap] = lam * (linv @ a_cols[:, 0])
            cols_f = np.asfortranarray(cols)
            del cols
            trmm_lower(linv, cols_f, side="L", trans="T")  # G = L^{-T} L^{-1}
            qmat = np.ascontiguousarray(cols_f)
            linv = None
    else:
        s = np.asarray(losses.hessian_sqrt(loss, jnp.asarray(f_star), jnp.asarray(y)), dtype)
        s = s * active[:, None, None]
        z = _left_blocks(s, kmat)  # S K, later overwritten by Z = L^{-1} S K
        b = np.empty_like(z)
        for r0 in range(0, cap * d, 4096):  # B = (S K) S + c I, by blocks of rows
            rows = z[r0 : r0 + 4096].reshape(-1, cap, d)
            b[r0 : r0 + 4096] = np.einsum("nja,jab->njb", rows, s).reshape(-1, cap * d)
        b[np.diag_indices_from(b)] += c
        chol, info = _potrf(b.T)
        _check_chol(info)
        del b
        _trsm_left(chol, z)
        kdiag = np.stack([kmat[i * d : (i + 1) * d, i * d : (i + 1) * d] for i in range(cap)])
        r_diag = (kdiag - _diag_gram(z, cap, d)) / c
        z_alpha = z @ alpha.reshape(-1)
        r_alpha = (k_alpha.reshape(-1) - z.T @ z_alpha) / c
        q = lam * r_alpha.reshape(cap, d)
        h = _apply_blocks(r_diag, g) + q
        srs = np.matmul(np.matmul(s, r_diag), s)
        m = g + np.einsum(
            "iab,ib->ia", s, _solve_blocks(np.eye(d, dtype=dtype)[None] - srs, _apply_blocks(s, h))
        )
        m = m * m_act
        # Q = ([M, α*] − S B^{-1} S K [M, α*]) / c, its last column times λ; L^{-1} S K [M, α*] is
        # Z's block columns times m_i (and Z α*), so one triangular solve with C + 1 columns is left
        zx = np.empty((cap * d, cap + 1), dtype)
        _block_columns(z, m, out=zx[:, :cap])
        zx[:, cap] = z_alpha
        del z
        _trsm_left(chol, zx, transpose=True)  # B^{-1} S K [M, α*] = L^{-T} Z [M, α*]
        del chol
        qmat = _left_blocks(s, zx)
        del zx
        qmat /= -c
        qmat[np.arange(cap * d), np.repeat(np.arange(cap), d)] += (m / c).reshape(-1)
        qmat[:, cap] += alpha.reshape(-1) / c
        qmat[:, cap] *= lam
    return LooFactor(
        form,
        loss,
        c,
        d,
        dk,
        linv,
        qmat,
        s,
        r_diag,
        q * m_act,
        m,
        f_star,
        y,
        alpha * m_act,
        active,
        float(lam),
        time.perf_counter() - t0,
    )


def _block_columns(a: np.ndarray, v: np.ndarray, out: np.ndarray, chunk: int = 2048) -> None:
    """out[:, i] = a[:, i·d:(i+1)·d] @ v_i for every record i: a ``(n, C·d)`` times the block-diagonal
    ``(C·d, C)`` matrix of the vectors v ``(C, d)``, in n·C·d flops, by chunks of rows."""
    cap, d = v.shape
    for r0 in range(0, a.shape[0], chunk):
        block = a[r0 : r0 + chunk].reshape(-1, cap, d)
        out[r0 : r0 + chunk] = np.einsum("nia,ia->ni", block, v)


# OpenBLAS 0.3.31 (the build in scipy's and numpy's wheels) segfaults in its multithreaded
# Cholesky of a matrix of about 2 GB or more on the SkylakeX kernels it picks here (float64
# n = 16,000 and 20,000 crash; float64 n = 14,000, 1.57 GB, and float32 n = 20,480, 1.68 GB, pass;
# np.linalg.cholesky crashes too); its one-thread path does not (float64 n = 20,000: 40 s).
_POTRF_THREADED_MAX_BYTES = int(1.75 * 2**30)


def _potrf(a_f: np.ndarray):
    """In-place lower Cholesky of a Fortran-ordered SPD matrix; returns (L Fortran-ordered, info).
    The GIL is released meanwhile (``linalg.nogil``: scipy's f2py wrapper held it, freezing every
    other thread of the service). A matrix over ``_POTRF_THREADED_MAX_BYTES`` is factorised with
    one BLAS thread (the OpenBLAS fault above)."""
    if a_f.nbytes <= _POTRF_THREADED_MAX_BYTES:
        return a_f, potrf_lower(a_f)
    with one_blas_thread():
        return a_f, potrf_lower(a_f)


def _trtri(l_f: np.ndarray):
    """In-place inverse of a lower triangular Fortran-ordered matrix; returns (L^{-1}, info)."""
    return l_f, trtri_lower(l_f)


def _trsm_left(l_f: np.ndarray, x: np.ndarray, transpose: bool = False) -> None:
    """x ← L^{-1} x (or L^{-T} x) in place, x C-ordered ``(n, m)`` (solved as xᵀ L^{-T} (xᵀ L^{-1})
    on its Fortran view)."""
    if x.flags.c_contiguous and x.flags.writeable:
        trsm_lower(l_f, x.T, side="R", trans="N" if transpose else "T")
        return
    xt = np.asfortranarray(x.T)  # pragma: no cover - callers pass C-ordered arrays
    trsm_lower(l_f, xt, side="R", trans="N" if transpose else "T")
    x[...] = xt.T


def _check_chol(info: int) -> None:
    if info != 0:
        raise SolverError(
            f"leave-one-out factorisation failed (LAPACK info {info}): B = cI + SKS is not numerically "
            "positive definite; use dtype float64 or a larger lam"
        )


def self_changes(factor: LooFactor) -> LooChanges:
    """Each active record's own output and loss change without it (self-influence, t = i).

    Returns:
      ``LooChanges`` with Δf ``(C, d)`` = q_i + R_ii m_i and Δℓ ``(C,)`` (NaN on inactive rows);
      exact for squared error, the influence step for cross-entropy.
    """
    df = factor.q + _apply_blocks(factor.r_diag, factor.m)
    dl = _loss_change(factor.loss, factor.f_star, df, factor.y)
    return LooChanges(df, np.where(factor.active, dl, np.nan), factor.loss == "mse")


def test_changes(factor: LooFactor, k_tx: np.ndarray, f_t, y_t) -> LooChanges:
    """Δf_t^(−i) = q_t + R_ti m_i and the loss change at test points, for every record i.

    With Q from the factor this is one product, K(X_t, X) Q (module docstring, "Test points"):
    2·n_t·d·(C·d)·C flops; squared error in trace form (dk = 1) uses R_tX = k_tX G.

    Arguments:
      k_tx: K(X_t, X) ``(n_t·d, C·d)`` (full form) or ``(n_t, C)`` (trace form), columns of inactive
        records zero.
      f_t: current outputs at the test points ``(n_t, d)``; y_t: their targets ``(n_t, d)``.

    Returns:
      ``LooChanges`` with Δf ``(n_t, C, d)`` and Δℓ ``(n_t, C)`` (NaN on inactive records).
    """
    dtype = factor.r_diag.dtype
    f_t, y_t = np.asarray(f_t, dtype), np.asarray(y_t, dtype)
    n_t, d = f_t.shape
    cap = factor.m.shape[0]
    k_tx = np.asarray(k_tx, dtype)
    if factor.qmat is not None:
        if factor.form == "trace":  # cross-entropy in trace form: K = k ⊗ I_d expanded
            k_tx = np.kron(k_tx, np.eye(d, dtype=dtype))
        out = k_tx @ factor.qmat  # (n_t·d, C + 1)
        df = np.ascontiguousarray(out[:, :cap].reshape(n_t, d, cap).transpose(0, 2, 1))
        q_t = out[:, cap].reshape(n_t, d)
    else:  # squared error, trace form: R = r ⊗ I_d, r_tX = k_tX G (G = L^{-T} L^{-1} of k + cI)
        r_tx = np.array(k_tx, order="F", copy=True)
        trmm_lower(factor.linv, r_tx, side="R", trans="T")  # k_tX L^{-T}
        trmm_lower(factor.linv, r_tx, side="R", trans="N")  # k_tX L^{-T} L^{-1}
        q_t = factor.lam * (r_tx @ factor.alpha)  # λ R_tX α*
        df = r_tx[:, :, None] * factor.m[None]
    df += q_t[:, None, :]
    dl = _loss_change(factor.loss, f_t[:, None], df, y_t[:, None])
    return LooChanges(df, np.where(factor.active[None], dl, np.nan), factor.loss == "mse")


def _loss_change(loss: str, f: np.ndarray, df: np.ndarray, y: np.ndarray) -> np.ndarray:
    """ℓ(f + Δf, y) − ℓ(f, y), shapes broadcasting over leading axes; for squared error in the
    cancellation-free form Δfᵀ(f − y) + ½‖Δf‖²."""
    if loss == "mse":
        return np.sum(df * (f - y), axis=-1) + 0.5 * np.sum(df * df, axis=-1)
    shape = np.broadcast_shapes(f.shape, df.shape, y.shape)
    f_b, y_b = np.broadcast_to(f, shape), np.broadcast_to(y, shape)
    z0 = f_b - f_b.max(axis=-1, keepdims=True)
    z1 = f_b + df
    z1 = z1 - z1.max(axis=-1, keepdims=True)
    lse0 = np.log(np.sum(np.exp(z0), axis=-1, keepdims=True))
    lse1 = np.log(np.sum(np.exp(z1), axis=-1, keepdims=True))
    return -np.sum(y_b * ((z1 - lse1) - (z0 - lse0)), axis=-1)


def refined_deltas(
    problem: DualProblem,
    alpha,
    rows: np.ndarray,
    solver: SolveOptions,
    tol: float,
    max_refine: int,
    cancelled: Callable[[], bool] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> np.ndarray:
    """Exact retraining without each record of ``rows`` alone: the influence step, then Newton on
    the retain risk to relative stationarity ``tol`` (``influence.deletion_step``; docs/maths.md,
    Exactness beyond one step).

    Arguments:
      problem: the dual risk of the current training set (its mask: the active points).
      alpha: α* ``(C, d)``; rows: record rows ``(r,)`` int.
      solver: the linear solves' options; tol, max_refine: Newton's tolerance and step limit.
      cancelled: asked before each record; ``True`` stops with ``ComputationCancelled``.
      progress: called after each record with (records refined, records in ``rows``).

    Returns:
      Δα ``(r, C, d)``: α after retraining without ``rows[j]`` minus α* (its own row −α*_i).
      Output changes follow as K(·, X) Δα.

    Raises:
      SolverError: a refinement missed its tolerance.
      ComputationCancelled: ``cancelled()`` returned True before every record was refined.
    """
    out = []
    if progress is not None:
        progress(0, len(rows))  # the refinements begin (the factorisation before is done)
    for i in np.asarray(rows, int):
        if cancelled is not None and cancelled():
            raise ComputationCancelled(
                f"stopped after refining {len(out)} of {len(rows)} record(s): the caller cancelled"
            )
        mask = np.zeros(problem.mask.shape, bool)
        mask[i] = True
        refinement = Refinement(tol, max_refine, solver)
        deletion = deletion_step(problem, alpha, jnp.asarray(mask), solver, refinement)
        if deletion.refine is not None and not deletion.refine.converged:
            raise SolverError(
                f"leave-one-out refinement of record row {int(i)} stopped at relative stationarity "
                f"residual {deletion.refine.residual:.2e} (tolerance {tol:.0e}): raise max_refine"
            )
        retained_alpha = np.asarray(alpha) * np.asarray(problem.mask)[:, None]
        out.append(np.asarray(deletion.alpha) - retained_alpha)  # its own row: −α*_i
        if progress is not None:
            progress(len(out), len(rows))
    return np.stack(out) if out else np.zeros((0,) + tuple(np.shape(alpha)))


def rank(scores: np.ndarray, active: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per row of ``scores`` ``(n_t, C)``, the k active records with the largest and the k with the
    smallest scores, each in rank order (largest first; smallest first).

    Both ends of one ordering (ties by index): the two sets are disjoint whenever 2k ≤ N active,
    so one row's top and bottom hold min(2k, N) distinct records, ties or not (two sorts put
    tied records at the front of both).

    Returns:
      ``(top (n_t, k), bottom (n_t, k))`` int rows.
    """
    scores = np.asarray(scores)
    valid = np.asarray(active, bool)[None] & ~np.isnan(scores)  # a NaN score is never ranked
    # valid records ascending (ties by index), then the others
    order = np.lexsort((np.where(valid, scores, 0.0), ~valid), axis=1)
    bottom = order[:, :k]
    n_valid = valid.sum(axis=1)[:, None]
    back = n_valid - 1 - np.arange(k)[None]  # the valid ones from the largest down
    top = np.take_along_axis(order, np.where(back >= 0, back, n_valid - 1 - back), axis=1)
    return top, bottom


def check_request(k: int, n_active: int, of: str, task: str, d: int) -> None:
    """Validate an attribution request against the model.

    Raises:
      InvalidInputError: k outside [1, N]; ``of`` not ``loss``/``output``; ``of="output"`` for a
        regression model with more than one output (no single output to rank by).
    """
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= n_active:
        raise InvalidInputError(
            f"k must be an integer from 1 to {n_active} (the number of active training records); got {k!r}"
        )
    if of not in OF:
        raise InvalidInputError(f"of must be 'loss' or 'output'; got {of!r}")
    if of == "output" and task != "classification" and d != 1:
        raise InvalidInputError(
            f"of='output' ranks by the change of one output: the labelled class (classification) or "
            f"the only output; this regression model has {d} outputs, use of='loss'"
        )


def scores(changes: LooChanges, y_t, of: str) -> np.ndarray:
    """What ``rank`` sorts by, ``(n_t, C)``: Δℓ (``of="loss"``), or minus the change of the ranked
    output (``of="output"``: the labelled class for one-hot targets, else the only output), so that
    "helpful" (largest first) are the records whose removal lowers that output most."""
    if of == "loss":
        return changes.delta_loss
    y_t = np.asarray(y_t)
    if y_t.shape[-1] == 1:
        return -changes.delta_outputs[..., 0]
    label = np.argmax(y_t, axis=-1)
    return -np.take_along_axis(changes.delta_outputs, label[:, None, None], axis=2)[..., 0]


def refine_changes(
    changes: LooChanges,
    rows: np.ndarray,
    delta_alpha: np.ndarray,
    k_tx: np.ndarray,
    form: str,
    f_t,
    y_t,
    loss: str,
) -> LooChanges:
    """``changes`` with the records ``rows`` replaced by their exact retraining (``refined_deltas``):
    Δf_t = K(X_t, X) Δα (docs/maths.md, Back to parameters, and predictions).

    Arguments:
      rows: ``(r,)`` record rows; delta_alpha: ``(r, C, d)``; k_tx: K(X_t, X) as in ``test_changes``.
      f_t, y_t: current outputs and targets ``(n_t, d)``.
    """
    df = np.array(changes.delta_outputs)
    n_t, d = df.shape[0], df.shape[2]
    for j, i in enumerate(np.asarray(rows, int)):
        if form == "full":
            df[:, i] = (k_tx @ delta_alpha[j].reshape(-1)).reshape(n_t, d)
        else:
            df[:, i] = k_tx @ delta_alpha[j]
    dl = np.array(changes.delta_loss)
    dl[:, rows] = _loss_change(
        loss, np.asarray(f_t)[:, None], df[:, rows], np.asarray(y_t)[:, None]
    )
    return LooChanges(df, dl, True)


def pick(changes: LooChanges, rows: np.ndarray) -> RankedRecords:
    """The changes of the records ``rows`` ``(n_t, k)`` per test point."""
    t = np.arange(rows.shape[0])[:, None]
    return RankedRecords(rows, changes.delta_loss[t, rows], changes.delta_outputs[t, rows])


def rerank(score: np.ndarray, rows: np.ndarray, descending: bool) -> np.ndarray:
    """``rows`` ``(n_t, k)`` re-sorted per test point by ``score`` ``(n_t, C)``."""
    s = np.take_along_axis(score, rows, axis=1)
    order = np.argsort(-s if descending else s, axis=1, kind="stable")
    return np.take_along_axis(rows, order, axis=1)


class FactorCache:
    """One ``LooFactor`` per model version, keyed on the ``ModelState`` object itself (the engine
    publishes a new object per version) through a weak reference: the factor is dropped with the
    version it came from, so nothing derived from forgotten records outlives their version."""

    def __init__(self):
        self._lock = threading.Lock()
        self._entry: tuple[weakref.ref, Any] | None = None
        self._refined: tuple[weakref.ref, dict[int, float]] | None = None

    def refined(self, state: Any) -> dict[int, float]:
        """The exact (Newton-refined) self-influence values of ``state`` computed so far, by row:
        a dict the caller fills; dropped with its version, as the factor."""
        with self._lock:
            if self._refined is None or self._refined[0]() is not state:
                self._refined = (weakref.ref(state, self._drop_refined), {})
            return self._refined[1]

    def _drop_refined(self, ref: weakref.ref) -> None:
        entry = self._refined
        if entry is not None and entry[0] is ref:
            self._refined = None

    def get(self, state: Any, compute: Callable[[], LooFactor]) -> LooFactor:
        """The factor of ``state``, computed once (callers for the same version wait for it)."""
        with self._lock:
            if self._entry is not None and self._entry[0]() is state:
                return self._entry[1]
            self._entry = None  # the old version's factor is freed before the new one is built
            factor = compute()
            self._entry = (weakref.ref(state, self._drop), factor)
            return factor

    def _drop(self, ref: weakref.ref) -> None:
        entry = self._entry
        if entry is not None and entry[0] is ref:
            self._entry = None


def attribute(
    state,
    model,
    cache: FactorCache,
    x,
    y: np.ndarray,
    k: int = 10,
    exact: bool = False,
    of: str = "loss",
    max_refinements: int | None = None,
    cancelled: Callable[[], bool] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> Attribution:
    """The k training records whose removal alone would raise (helpful) and lower (harmful) the
    loss at each test point most (docs/maths.md, Leave-one-out for every record); nothing changes.

    Δℓ = loss after retraining without the record (risk normalised by 1/(N − 1), as a forget) minus
    the loss now. Exact for squared error; for cross-entropy the influence step unless ``exact``,
    which refines the 2k best candidates per side by Newton to the retrained optimum, re-sorts them
    and keeps the k best.

    Arguments:
      state: the version (``ModelState``); model: its network; cache: the version's factor cache.
      x: test inputs ``(n, *input_shape)`` (validated); y: targets ``(n, d)`` numpy.
      k: records per side, 1 ≤ k ≤ N; exact, of: as ``Unlearner.attribute``.
      max_refinements: with ``exact`` (cross-entropy), the most records one call may refine (the
        distinct candidates of every row: up to 4k per row, each a Newton retraining); more
        raise ``RefinementLimitError`` before any is refined. ``None``: no limit.
      cancelled: asked before each refinement; progress: called after each (``refined_deltas``).

    Raises:
      InvalidInputError: k or ``of`` out of range; ``RefinementLimitError``: more refinements
        than ``max_refinements``.
      SolverError: the factorisation or a refinement failed.
      ComputationCancelled: ``cancelled()`` returned True before the refinements were done.
    """
    from .deletion import problem_of
    from .lifecycle import solve_options

    train, cfg = state.train_config, state.solver_config
    check_request(k, state.n, of, state.task, state.layout.d)
    loo = factor(state, cache)
    k_tx = cross_kernel(state, model, x)
    f_t = np.asarray(model.outputs(state, x))
    changes = test_changes(loo, k_tx, f_t, y)
    score = scores(changes, y, of)
    top, bottom = rank(score, state.active, k)
    if exact and train.loss != "mse":
        # twice as many candidates per side as returned: a record the step ranks just outside the
        # top k can still enter it
        top, bottom = rank(score, state.active, min(2 * k, state.n))
        rows = np.unique(np.concatenate([top.ravel(), bottom.ravel()]))
        if max_refinements is not None and len(rows) > max_refinements:
            raise RefinementLimitError(
                f"exact=true would refine {len(rows)} records (the distinct leading "
                f"{min(2 * k, state.n)} per side of {len(x)} row(s), one Newton retraining "
                f"each); at most {max_refinements} here: lower k, send fewer rows, or leave "
                "exact false",
                len(rows),
                max_refinements,
            )
        options = solve_options(cfg, train.dtype, "auto").replace(nystrom=state.nystrom)
        delta = refined_deltas(
            problem_of(state),
            state.alpha,
            rows,
            options,
            train.resolved_tol(),
            cfg.max_refine,
            cancelled,
            progress,
        )
        changes = refine_changes(changes, rows, delta, k_tx, state.form, f_t, y, train.loss)
        score = scores(changes, y, of)
        top = rerank(score, top, True)[:, :k]
        bottom = rerank(score, bottom, False)[:, :k]
    ids = state.ids
    return Attribution(
        state.version,
        ids[top],
        ids[bottom],
        pick(changes, top),
        pick(changes, bottom),
        changes.exact,
        of,
    )


def self_influence(
    state,
    cache: FactorCache,
    exact: bool = False,
    top: int | None = None,
    cancelled: Callable[[], bool] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> SelfInfluence:
    """Each active record's own loss after retraining without it minus its loss now, sorted
    descending (exact for squared error; the influence step, or with ``exact`` Newton retraining,
    for cross-entropy).

    Arguments:
      exact: cross-entropy only (squared error is exact already): refine by Newton to the retrained
        optimum (``refined_deltas``) the ``top`` records the influence step ranks highest (every
        record when ``top`` is None), then sort those by their exact values; the records after them
        keep the influence step's values and order.
      top: how many leading records to refine (1 ≤ top; capped at N).
      cancelled: asked before each refinement; the records refined before it said True stay in
        ``cache`` for the next call.
      progress: called after each refinement with (records refined, records this call refines).

    Returns:
      ``SelfInfluence``; its ``exact_top`` leading records carry exact values (N when exact
      throughout, 0 when none are).

    Raises:
      InvalidInputError: ``top`` < 1.
      SolverError: the factorisation or a refinement failed.
      ComputationCancelled: ``cancelled()`` returned True before the refinements were done.
    """
    from .deletion import problem_of
    from .lifecycle import solve_options

    train, cfg = state.train_config, state.solver_config
    changes = self_changes(factor(state, cache))
    values = changes.delta_loss
    rows = np.flatnonzero(state.active)
    order = rows[np.argsort(-values[rows], kind="stable")]
    if top is not None and (isinstance(top, bool) or int(top) < 1):
        raise InvalidInputError(f"top must be at least 1; got {top!r}")
    exact_top = len(order) if changes.exact else 0
    if exact and not changes.exact:
        head = order[: len(order) if top is None else min(int(top), len(order))]
        # Refined values are kept per version (``cache.refined``): a later request refines only
        # the records no earlier one did (each is a Newton retraining).
        known = cache.refined(state)
        todo = np.array([i for i in head if int(i) not in known], dtype=head.dtype)
        if len(todo):
            options = solve_options(cfg, train.dtype, "auto").replace(nystrom=state.nystrom)
            problem = problem_of(state)
            f_star = np.asarray(state.f_star)
            if progress is not None:
                progress(0, len(todo))  # the refinements begin (the factorisation before is done)
            for done, i in enumerate(todo):  # one at a time: each value kept once it is known
                if cancelled is not None and cancelled():
                    raise ComputationCancelled(
                        f"stopped after refining {done} of {len(todo)} record(s) (kept for the "
                        "next request): the caller cancelled"
                    )
                delta = refined_deltas(
                    problem,
                    state.alpha,
                    np.array([i]),
                    options,
                    train.resolved_tol(),
                    cfg.max_refine,
                )[0]
                df = np.asarray(state.layout.matvec(state.k, jnp.asarray(delta)))[i]
                after = losses.value(train.loss, f_star[i : i + 1] + df, state.y[i : i + 1])[0]
                now = losses.value(train.loss, f_star[i : i + 1], state.y[i : i + 1])[0]
                known[int(i)] = float(after - now)
                if progress is not None:
                    progress(done + 1, len(todo))
        values = np.array(values)
        for i in head:
            values[i] = known[int(i)]
        head = head[np.argsort(-values[head], kind="stable")]
        order = np.concatenate([head, order[len(head) :]])
        exact_top = len(head)
    return SelfInfluence(
        state.version,
        state.ids[order],
        values[order],
        exact_top == len(order),
        exact_top,
    )


def factor(state, cache: FactorCache) -> LooFactor:
    """The leave-one-out factor of ``state``, computed once per version (``cache``)."""
    return cache.get(state, lambda: _factor_of(state))


def _factor_of(state) -> LooFactor:
    train = state.train_config
    started = time.perf_counter()
    log.info(
        "version %d: factoring the leave-one-out system of %d records (once per version; "
        "attribution and self-influence wait for it)",
        state.version,
        int(np.count_nonzero(state.active)),
    )
    made = loo_factor(
        state.k, state.form, state.f0, state.y, state.alpha, state.active, train.lam, train.loss
    )
    log.info(
        "version %d: leave-one-out system factored in %.1f s",
        state.version,
        time.perf_counter() - started,
    )
    return made


def cross_kernel(state, model, x) -> np.ndarray:
    """K(X_t, X) over the version's rows (columns of inactive rows zero), in its layout:
    ``(n_t·d, C·d)`` (full form) or ``(n_t, C)`` (trace form)."""
    rows = np.flatnonzero(state.active)
    part = model.cross_kernel(np.asarray(x), np.asarray(state.x)[rows], state.form)
    cols = state.layout.rows(rows)
    out = np.zeros((part.shape[0], state.layout.side(state.capacity)), part.dtype)
    out[:, cols] = part
    return out
