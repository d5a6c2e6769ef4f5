"""Request and response bodies of the v1 HTTP contract (docs/design.md)."""

from __future__ import annotations

import re
from itertools import chain
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainValidator,
    WithJsonSchema,
)

from service_core.data import MAX_ID_CHARS

from ..queue import JobKind, JobStatus


def _number_array(value: Any) -> np.ndarray:
    """A JSON array of numbers (nested to any depth) as a finite float or int array.

    Each element's type is checked, not only the array numpy makes of them: numpy turns
    ``[true, 1]`` into ``[1, 1]`` without complaint. The checks run level by level over the
    flattened lists (``map``, no Python loop per number), so a 10,000 × 784 array costs about
    as much as numpy's own conversion.
    """
    if not isinstance(value, list):
        raise ValueError("must be a JSON array")
    shape = [len(value)]
    items: list = value
    while True:
        kinds = set(map(type, items))
        if kinds == {list}:
            lengths = set(map(len, items))
            if len(lengths) > 1:
                raise ValueError("must be a rectangular array: every row needs the same shape")
            shape.append(lengths.pop())
            items = list(chain.from_iterable(items))
            continue
        if list in kinds:
            raise ValueError("must be a rectangular array: every row needs the same shape")
        wrong = kinds - {int, float}
        if wrong:
            names = ", ".join(sorted(_JSON_NAMES.get(k, k.__name__) for k in wrong))
            raise ValueError(
                f"must hold numbers only (no strings, booleans or nulls); found {names}"
            )
        break
    if float in kinds:
        array = np.array(items, dtype=np.float64)
        if not np.all(np.isfinite(array)):
            raise ValueError("has NaN or infinite values: send finite numbers only")
    else:
        try:
            array = np.array(items, dtype=np.int64)
        except OverflowError:
            raise ValueError("has integers beyond 64 bits: send smaller numbers") from None
    return array.reshape(shape)


_JSON_NAMES = {bool: "booleans", type(None): "nulls", str: "strings", dict: "objects"}
_NUMBER = {"type": "number", "description": "a finite number (true, false and null are refused)"}

Inputs = Annotated[
    np.ndarray,
    PlainValidator(_number_array),
    WithJsonSchema(
        {
            "type": "array",
            "minItems": 1,
            "items": {
                "type": "array",
                "minItems": 1,
                "items": {"anyOf": [_NUMBER, {"type": "array", "minItems": 1}]},
            },
            "description": "One row per point, each of the training inputs' shape, flattened or "
            "not (e.g. 784 numbers, or 28 rows of 28, for MNIST); nested arrays must be "
            "rectangular and hold finite numbers only. The row shape, and the largest magnitude "
            "the model's dtype takes, are the served model's (GET /v1/model): others get 422.",
        }
    ),
]
Targets = Annotated[
    np.ndarray,
    PlainValidator(_number_array),
    WithJsonSchema(
        {
            "type": "array",
            "minItems": 1,
            "items": {"anyOf": [_NUMBER, {"type": "array", "minItems": 1, "items": _NUMBER}]},
            "description": "One per row of x: a class label (an integer in [0, output_dim), "
            "classification), or a target vector of output_dim numbers (regression; a number "
            "when output_dim is 1). Finite numbers only.",
        }
    ),
]


def _non_empty_ids(ids: list[str]) -> list[str]:
    """Refuse ``""``: no record has that id (the model uses it to mark erased rows), and the
    engine's "not in the training set: ." for it says nothing useful."""
    empty = [str(k) for k, i in enumerate(ids) if i == ""]
    if empty:
        raise ValueError(
            f"ids must be non-empty strings (empty at position {', '.join(empty[:20])})"
        )
    long = [str(k) for k, i in enumerate(ids) if len(i) > MAX_ID_CHARS]
    if long:
        raise ValueError(
            f"ids must be at most {MAX_ID_CHARS} characters (longer at position "
            f"{', '.join(long[:20])})"
        )
    # JSON's "\ud800" escapes decode to a lone surrogate, which no UTF-8 text holds (the keyed
    # hash of an id is taken over its UTF-8 bytes: it failed with a 500).
    odd = [str(k) for k, i in enumerate(ids) if not _is_utf8_text(i)]
    if odd:
        raise ValueError(
            "ids must be valid Unicode text: a lone surrogate escape (\\ud800-\\udfff without "
            f"its pair) at position {', '.join(odd[:20])}"
        )
    return ids


def _is_utf8_text(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


Ids = Annotated[
    list[str],
    AfterValidator(_non_empty_ids),
    WithJsonSchema(
        {
            "type": "array",
            "minItems": 1,
            "uniqueItems": True,
            "items": {"type": "string", "minLength": 1, "maxLength": MAX_ID_CHARS},
            "description": "training record ids (non-empty strings of at most 256 characters, "
            "never positions; each once)",
        }
    ),
]


def _plain_digits(value: Any) -> Any:
    if isinstance(value, str) and not re.fullmatch(r"[0-9]+", value):
        raise ValueError(f"must be written as plain decimal digits (e.g. 10), not {value!r}")
    return value


# After ``Query(...)`` in an ``Annotated`` query integer: Python's ``int()`` (pydantic's lax
# mode) also reads "1_0", " 10", "+10" and "10.0"; the schema says integer, so digits only.
DIGITS_ONLY = BeforeValidator(_plain_digits)


class ErrorOut(BaseModel):
    detail: str = Field(description="what went wrong, and what to fix")


def errors(described: dict[int, str]) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` for error codes, all answered with ``ErrorOut``."""
    return {code: {"model": ErrorOut, "description": text} for code, text in described.items()}


INVALID = {422: "the request does not match the schema, or values are out of range"}
# 401: no token, or one that is no token of this service; 403: a valid token without the right
# (every valid token may read, so reads never answer 403).
READ_AUTH = {401: "missing or invalid bearer token"}
WRITE_AUTH = {
    401: "missing or invalid bearer token",
    403: "the read token: forgetting and adding records need the write token",
}
TOO_LARGE = {413: "a request body over the setting max_body_bytes"}


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


IdempotencyKey = Annotated[
    str | None,
    Field(
        min_length=1,
        max_length=256,
        description="a retried request with the same key and the same body returns the same job "
        "(kept as long as job records); the same key with another body, or on the other of "
        "POST /v1/forget and POST /v1/records, is refused (409)",
    ),
]


class ForgetRequest(_Body):
    ids: Ids
    idempotency_key: IdempotencyKey = None


class ForgetAccepted(BaseModel):
    job_id: str
    status: JobStatus
    status_url: str


class SolverInfo(BaseModel):
    method: str = Field(
        description="alpha-cg, alpha-cholesky, alpha-paper, theta-cg, kgd, or newton/<inner> for "
        "several Newton steps"
    )
    iterations: int = Field(
        description="CG iterations (0 for a direct solve; Newton steps for newton/...)"
    )
    residual: float = Field(
        description="this solve's own relative residual of its linear system when it stopped "
        "(dimensionless); not the version's certificate, which is recomputed afterwards from the "
        "published α and K (certificate.residual)"
    )
    seconds: float = Field(description="wall seconds of this solve")
    converged: bool | None = Field(None, description="whether residual met the solve's tolerance")
    preconditioner: str | None = Field(
        None,
        description="'nystrom-<rank>' when CG was preconditioned by a Nyström approximation of K",
    )
    rounding_floor: float | None = Field(
        None,
        description="the residual's estimated rounding floor in the model's dtype, set when the solve "
        "stopped on stagnation, which a Newton refinement on cross-entropy may do after meeting its "
        "residual tolerance (then converged is true); 0 otherwise. The version's own estimate is "
        "certificate.rounding_floor. A solve "
        "stagnating above its tolerance counts as converged only within the slack the operator granted "
        "(accept_floor; none by default) and 4 times this floor",
    )


class LinearisationGap(BaseModel):
    """How far the trained nonlinear network is from its linearisation (measured at build)."""

    rmse: float = Field(
        description="RMSE between the network's and the linearised optimum's outputs on the "
        "training inputs (output units)"
    )
    relative: float = Field(
        description="rmse / RMS of the linearised optimum's change of the training outputs from "
        "f(X; θ0)"
    )
    threshold: float = Field(description="relative above this: the linearisation does not hold")
    warning: str | None = Field(description="why the linearisation does not hold, or null")


class NonlinearCertificate(BaseModel):
    """The honest certificate of a nonlinear network's version (docs/design.md): of a deletion,
    the gradient of the nonlinear retain risk at the published θ relative to the previous θ; of
    version 0, the training risk's gradient at the trained θ relative to θ0."""

    kind: str
    grad_norm: float = Field(
        description="‖∇L_R(θ)‖ of the nonlinear retain risk at the published θ (absolute)"
    )
    reference: float = Field(description="‖∇L_R‖ at the previous version's θ")
    relative: float = Field(description="grad_norm / reference")
    tol: float = Field(description="the tolerance (--nonlinear-tol)")
    met: bool = Field(description="relative ≤ tol")
    enforced: bool = Field(
        description="whether a miss fails the job (only with --nonlinear-refine > 0)"
    )
    step: Literal["alpha", "theta"] | None = Field(
        description="the influence step taken (null for version 0: training)"
    )
    refine_steps: int = Field(
        description="Newton-CG steps of the refinement (version 0: of the training's polish)"
    )
    linearisation_gap: LinearisationGap


class NonlinearInfo(BaseModel):
    """A --nonlinear model: what is served, and how well its linearisation holds."""

    mode: Literal["nonlinear"]
    lambda_: float = Field(alias="lambda")
    options: dict[str, Any] = Field(description="step, refine, tol, epochs, lr, train_newton_steps")
    training: dict[str, Any] = Field(
        description="gradient norms of the training risk at θ0 and at the trained θ, epochs, "
        "Newton steps, met, seconds"
    )
    linearisation_gap: LinearisationGap


class Certificate(BaseModel):
    """What a published version was held to (docs/design.md, Certificates)."""

    residual: float = Field(
        description="relative stationarity residual of the published α, recomputed from α and K"
    )
    tolerance: float = Field(description="the stationarity tolerance (tol)")
    accept_floor: float = Field(
        description="the slack the operator granted: published only if residual ≤ tolerance × accept_floor"
    )
    rounding_floor: float = Field(
        description="estimated rounding floor of the residual in the version's dtype (docs/maths.md, "
        "Eq. (F1)): the last Newton solve's estimate when it stopped on stagnation, else the estimate "
        "at the published α; no solve in this dtype can certify much below it (0 for --nonlinear models, "
        "whose gradient-norm certificate has no such estimate)"
    )
    tolerance_ratio: float = Field(description="residual / tolerance (≤ accept_floor)")
    dtype: str = Field(
        description="precision the version was computed in (float64 once dtype auto promoted it)"
    )
    nonlinear: NonlinearCertificate | None = Field(
        None,
        description="--nonlinear models: the certificate of the nonlinear network (residual is "
        "then its 'relative', tolerance its 'tol'); null for the linearised model",
    )


class InfluenceSolverInfo(SolverInfo):
    reason: str | None = Field(
        None,
        description="why this method was used: the 'auto' cost model's explanation, or that it "
        "was configured (null for versions logged before this field existed)",
    )
    timings: dict[str, float] | None = Field(
        None,
        description="seconds per part of the deletion: validate, compact, rhs, solve, delta, refine, "
        "residual, checkpoint, log, publish, and the total",
    )
    certificate: Certificate | None = Field(
        None, description="the new version's certificate (null for jobs logged before it existed)"
    )


class ReceiptOut(BaseModel):
    payload: dict[str, Any] = Field(
        description="the signed statement: job_id, id_digests (HMAC-SHA256 of the ids under the "
        "deployment's secret), version_before, version_after, submitted_at, applied_at, "
        "certificate {residual, tolerance, method}, checkpoint_sha256"
    )
    algorithm: Literal["Ed25519"]
    signature: str = Field(
        description="base64 Ed25519 signature of the payload's canonical JSON (sorted keys, no "
        "whitespace, UTF-8); verify with GET /v1/receipts/public-key, offline: "
        "ntk-unlearn verify-receipt"
    )


class JobOut(BaseModel):
    job_id: str
    status: JobStatus
    kind: JobKind = Field(
        "forget", description="'forget' (POST /v1/forget) or 'add' (POST /v1/records)"
    )
    ids: list[str] = Field(
        description="the ids while the job is queued or running; empty once it has ended (only "
        "their keyed digests are kept, id_digests)"
    )
    id_digests: list[str] = Field(
        [], description="HMAC-SHA256 of the ids (hex) once the job has ended"
    )
    receipt: ReceiptOut | None = Field(None, description="the signed receipt, once succeeded")
    model_version: int | None = Field(None, description="the version that applied the job")
    submitted_at: str
    finished_at: str | None = None
    solver: InfluenceSolverInfo | None = Field(
        None, description="the influence solve of the job's batch"
    )
    refine: SolverInfo | None = Field(None, description="the Newton refinement, if any")
    error: str | None = Field(None, description="why the job failed")


class AddRecordsRequest(_Body):
    ids: Annotated[
        list[str],
        AfterValidator(_non_empty_ids),
        WithJsonSchema(
            {
                "type": "array",
                "minItems": 1,
                "uniqueItems": True,
                "items": {"type": "string", "minLength": 1, "maxLength": MAX_ID_CHARS},
                "description": "new record ids (non-empty strings of at most 256 characters, "
                "each once, none active or held by a queued job); an id forgotten before may be "
                "added as a new record",
            }
        ),
    ]
    x: Inputs
    y: Targets
    idempotency_key: IdempotencyKey = None


class AddAccepted(ForgetAccepted):
    kind: Literal["add"] = "add"


class InfluenceRequest(_Body):
    forget_ids: Ids
    x: Inputs
    y: Targets


class NonFiniteResultError(Exception):
    """A result that overflowed the model's floating point type: answered 422, never sent as
    ``null`` or ``NaN`` where the contract promises a number (``app.api.errors``).

    Not a ``ValueError``: pydantic passes other exceptions from a validator on unchanged,
    rather than turning them into a validation error (a 500 for a response)."""


def _finite(what: str) -> AfterValidator:
    def check(values: list) -> list:
        if not np.all(np.isfinite(np.asarray(values, dtype=np.float64))):
            raise NonFiniteResultError(
                f"{what} overflows the model's floating point type (it is not a finite "
                "number): x or y has values too large in magnitude; scale them down"
            )
        return values

    return AfterValidator(check)


class InfluenceOut(BaseModel):
    model_version: int
    delta_outputs: Annotated[list[list[float]], _finite("the estimated change of outputs")] = Field(
        description="change of outputs, shape (n, d)"
    )
    delta_loss: Annotated[list[float], _finite("the estimated change of loss")] = Field(
        description="change of each row's loss, shape (n,): exact for squared error "
        "(gᵀΔf + ½‖Δf‖²), second order for cross-entropy (gᵀΔf + ½ΔfᵀWΔf), given delta_outputs"
    )
    delta_loss_first_order: Annotated[list[float], _finite("the estimated change of loss")] = Field(
        description="the paper's Eq. 9, first order: gᵀΔf at the current outputs, shape (n,)"
    )


class PredictRequest(_Body):
    x: Inputs


class PredictOut(BaseModel):
    model_version: int
    outputs: Annotated[list[list[float]], _finite("the model's output")] = Field(
        description="model outputs, shape (n, d)"
    )


class IdsOut(BaseModel):
    ids: list[str]
    total: int = Field(description="number of active training ids")


class KernelInfo(BaseModel):
    model_config = ConfigDict(extra="allow")

    shape: list[int]
    bytes: int
    devices: Any


class Precision(BaseModel):
    dtype: str = Field(description="precision α, θ and the solves are held in now")
    kernel_dtype: str = Field(
        description="precision K's entries were computed in; a promoted model holds that K upcast "
        "exactly to float64 (kernel.dtype)"
    )
    configured: str = Field(description="the dtype setting: auto, float32 or float64")
    promoted: str | None = Field(
        None, description="dtype auto: why the model was promoted to float64 (null: it was not)"
    )
    promoted_at_version: int | None = Field(None, description="the version that promoted it")


class Conditioning(BaseModel):
    kappa: float = Field(description="κ = 1 + w·μ_max/(λN), bound on system (A)'s condition number")
    lambda_max: float = Field(description="μ_max, K's top eigenvalue (power iteration at build)")
    float32_floor: float = Field(
        description="estimated float32 rounding floor of the trained model's residual"
    )
    min_lam_float32: float = Field(
        description="estimated smallest λ whose optimum float32 can certify to `tolerance`"
    )
    tolerance: float | None = Field(
        None, description="the tolerance of that estimate (float32's default for float64 models)"
    )
    warning: str | None = Field(
        None, description="set when λ is below 10× that limit: below it, or within 10× of it"
    )


class ModelInfo(BaseModel):
    model_config = ConfigDict(extra="allow", populate_by_name=True)

    version: int
    n_train: int
    n_forgotten: int
    output_dim: int
    n_params: int | None = Field(description="parameters of the network (null for infinite width)")
    loss: str
    lambda_: float = Field(alias="lambda")
    kernel: KernelInfo
    certificate: Certificate = Field(description="the served version's certificate")
    precision: Precision
    conditioning: Conditioning | None = Field(
        None, description="null for models built before it was recorded"
    )
    nonlinear: NonlinearInfo | None = Field(
        None,
        description="--nonlinear: the served model is the network f(x; θ), not its "
        "linearisation; its training, options and linearisation gap (null otherwise)",
    )


_WORKER = Field(
    description="whether a solver worker runs on this model's queue: 'alive: <name>, model "
    "version <v>, seen <s> s ago[, busy with a batch for <s> s (...)]', 'none: ...' (jobs stay "
    "queued until one runs), or 'unknown' (the queue does not answer). "
    "Informational: this process answers reads without a worker, so it does not decide readiness"
)


class Readiness(BaseModel):
    status: Literal["ready"]
    model_version: int
    worker: str = _WORKER


class NotReady(ErrorOut):
    model: Literal["loaded", "loading"] = Field(description="whether the model is loaded")
    queue: str = Field(
        description="'ok', or why the job queue is not: 'not set up yet', 'unreachable (...)'"
    )
    worker: str = _WORKER


class AttributeRequest(_Body):
    x: Inputs
    y: Targets
    # strict: "2", true, "yes" or 1 are not taken for a number or a boolean (numbers mean numbers)
    k: int = Field(
        10,
        strict=True,
        description="records per side: from 1 to the number of active training records",
    )
    exact: bool = Field(
        False,
        strict=True,
        description="cross-entropy: refine the returned records to the optimum retrained without "
        "each (Newton); squared error is exact either way",
    )
    of: Literal["loss", "output"] = Field(
        "loss",
        description="rank by the change of the loss, or of the output the label names (the labelled "
        "class, or a regression model's only output)",
    )


class AttributedRecord(BaseModel):
    id: str
    delta_loss: Annotated[float, _finite("the change of loss")] = Field(
        description="loss at this point after retraining without the record, minus the loss now"
    )
    delta_outputs: Annotated[list[float], _finite("the change of outputs")] = Field(
        description="change of the outputs, shape (d,)"
    )


class AttributionRow(BaseModel):
    helpful: list[AttributedRecord] = Field(
        description="at most k records whose removal raises the loss most (delta_loss > 0), "
        "largest first; with of='output', that lower the ranked output most"
    )
    harmful: list[AttributedRecord] = Field(
        description="at most k records whose removal lowers the loss most (delta_loss < 0), "
        "most negative first; with of='output', that raise the ranked output most"
    )


class AttributeOut(BaseModel):
    model_version: int
    exact: bool = Field(
        description="true when the changes are exact leave-one-out retraining (squared error, or "
        "exact=true), false for cross-entropy's influence step"
    )
    results: list[AttributionRow] = Field(description="one per row of x")


class SelfInfluenceRecord(BaseModel):
    id: str
    self_influence: Annotated[float, _finite("the self-influence")] = Field(
        description="the record's own loss after retraining without it, minus its loss now"
    )


class SelfInfluenceOut(BaseModel):
    model_version: int
    total: int = Field(description="number of active training records")
    exact: bool = Field(
        description="the returned values are exact leave-one-out retraining (squared error, or "
        "exact=true) rather than cross-entropy's influence step"
    )
    records: list[SelfInfluenceRecord] = Field(description="sorted by self_influence, descending")


class PublicKeyOut(BaseModel):
    algorithm: Literal["Ed25519"]
    public_key_pem: str = Field(description="SubjectPublicKeyInfo PEM")


class DeletionRecord(BaseModel):
    model_config = ConfigDict(extra="allow")

    version: int
    version_before: int | None = None
    timestamp: str
    job_ids: list[str]
    id_digests: list[str] = Field(description="HMAC-SHA256 of the forgotten ids (hex)")
    n_forgotten: int | None = None
    n_train: int | None = None
    certificate: dict[str, Any] | None = None
    checkpoint_sha256: str | None = None


class DeletionsPage(BaseModel):
    deletions: list[DeletionRecord]
    next_cursor: int | None = Field(
        description="pass as cursor for the next page; null at the end of the log"
    )


class RecordStatus(BaseModel):
    status: Literal["active", "forgotten", "unknown"]
    model_version: int = Field(description="the version served when answering")
    forgotten_in_version: int | None = None
    forgotten_at: str | None = None
    job_id: str | None = None
    pending: Literal["forget", "add"] | None = Field(
        None,
        description="a queued or running job names this id: a forget (a deletion in flight), "
        "or an addition; null when none, or when the job queue did not answer",
    )
