"""What remains of deletions: signed receipts, the deletion log, and a record's status.

Ids appear here only as the caller sends them (``/v1/records/{record_id}``); everything stored
holds their keyed digests (``app.receipts``).
"""

from __future__ import annotations

from typing import Annotated

import redis
from fastapi import APIRouter, HTTPException, Path, Query, status

from ..deps import DeletionLogDep, KeysDep, ModelDep, QueueDep, ReadAccess
from ..schemas import (
    DIGITS_ONLY,
    INVALID,
    READ_AUTH,
    DeletionsPage,
    PublicKeyOut,
    ReceiptOut,
    RecordStatus,
    errors,
)

router = APIRouter(
    prefix="/v1", tags=["receipts"], dependencies=[ReadAccess], responses=errors(READ_AUTH)
)


@router.get("/receipts/public-key")
def public_key(keys: KeysDep) -> PublicKeyOut:
    """The Ed25519 key that verifies this deployment's deletion receipts."""
    return PublicKeyOut(algorithm="Ed25519", public_key_pem=keys.public_key_pem())


@router.get(
    "/jobs/{job_id}/receipt",
    responses=errors(
        {
            404: "no such job (or its record expired)",
            409: "the job has not succeeded (queued, running or failed)",
            **INVALID,
        }
    ),
)
def receipt(job_id: str, queue: QueueDep) -> ReceiptOut:
    """The signed receipt of a succeeded forget job (verify it offline with
    `ntk-unlearn verify-receipt RECEIPT.json --public-key KEY.pem`)."""
    job = queue.get(job_id)
    if job is None:
        raise HTTPException(
            status.HTTP_404_NOT_FOUND,
            f"no job {job_id!r}: check the job_id from POST /v1/forget "
            f"(job records are kept {queue.ttl_s // 3600} h; the deletion log, GET /v1/deletions, "
            "is kept for good)",
        )
    if job.kind == "add":
        raise HTTPException(
            status.HTTP_409_CONFLICT,
            f"job {job_id} is an addition (POST /v1/records): receipts are issued for deletions "
            "only",
        )
    if job.status == "succeeded" and job.receipt is None:
        raise HTTPException(
            status.HTTP_409_CONFLICT,
            f"job {job_id} succeeded without a version of its own, so it has no receipt: its "
            "ids were already forgotten when it ran (the receipt is the job's that forgot them; "
            "GET /v1/records/{id} names its version and job), or it was applied before receipts "
            "were issued",
        )
    if job.status != "succeeded":
        raise HTTPException(
            status.HTTP_409_CONFLICT,
            f"job {job_id} is {job.status}: a receipt is issued once it has succeeded",
        )
    return ReceiptOut.model_validate(job.receipt)


@router.get("/deletions", responses=errors(INVALID))
def deletions(
    log: DeletionLogDep,
    u: ModelDep,
    cursor: Annotated[
        int,
        Query(ge=0, description="return versions after this one (next_cursor of a page)"),
        DIGITS_ONLY,
    ] = 0,
    limit: Annotated[
        int, Query(ge=1, le=1000, description="most records to return"), DIGITS_ONLY
    ] = 100,
) -> DeletionsPage:
    """The deletion log, oldest version first: one record per applied version, ids as keyed
    digests. No version newer than the one this process serves."""
    page, next_cursor = log.page(cursor, limit, through=u.version)
    return DeletionsPage.model_validate({"deletions": page, "next_cursor": next_cursor})


@router.get("/records/{record_id:path}", responses=errors(INVALID))  # an id may hold "/"
def record(
    record_id: Annotated[str, Path(min_length=1, description="a training record id")],
    u: ModelDep,
    log: DeletionLogDep,
    queue: QueueDep,
) -> RecordStatus:
    """Whether a record is `active` (in the served model), `forgotten` (by which version, job and
    when; looked up by its keyed digest) or `unknown` (never in the training set); `pending`
    says when a queued or running job names it (`forget`, or `add`), so that a deletion in
    flight shows (null when none, or when the queue does not answer)."""
    state = u.state
    try:
        pending = queue.pending_kind(record_id)
    except redis.RedisError:
        pending = None  # the status is the served model's: still answered
    if record_id in state.index:
        return RecordStatus(status="active", model_version=state.version, pending=pending)
    digest = state.digest(record_id)  # the deployment's key (keys.digest), as the model holds it
    if digest in set(state.forgotten):
        entry = log.find_digest(digest)
        return RecordStatus(
            status="forgotten",
            model_version=state.version,
            forgotten_in_version=None if entry is None else entry["version"],
            forgotten_at=None if entry is None else entry["timestamp"],
            job_id=None if entry is None else log.job_of(entry, digest),
            pending=pending,
        )
    return RecordStatus(status="unknown", model_version=state.version, pending=pending)
