"""Deletion: queue a forget job, and follow it."""

from __future__ import annotations

from fastapi import APIRouter, HTTPException, status

from service_core import AlreadyForgottenError, UnknownIdsError

from ...queue import Job, QueuedForAdditionError, StaleModelError
from ..deps import ModelDep, QueueDep, ReadAccess, StateDep, WriteAccess, follow_or_503
from ..schemas import (
    INVALID,
    READ_AUTH,
    TOO_LARGE,
    WRITE_AUTH,
    ForgetAccepted,
    ForgetRequest,
    JobOut,
    errors,
)

router = APIRouter(prefix="/v1", tags=["forget"])


def _accepted(job: Job) -> ForgetAccepted:
    return ForgetAccepted(job_id=job.job_id, status=job.status, status_url=f"/v1/jobs/{job.job_id}")


@router.post(
    "/forget",
    status_code=status.HTTP_202_ACCEPTED,
    dependencies=[WriteAccess],
    responses=errors(
        {
            **WRITE_AUTH,
            404: "ids not in the training set (listed)",
            409: "ids already forgotten or queued (listed), ids queued for addition and not "
            "yet added (listed), or an idempotency_key reused",
            422: "empty, duplicated or empty-string ids, or every remaining id (counting the "
            "queued jobs)",
            **TOO_LARGE,
            503: "the job queue (Redis) is unreachable",
        }
    ),
)
def forget(body: ForgetRequest, u: ModelDep, queue: QueueDep, state: StateDep) -> ForgetAccepted:
    """Queue the removal of `ids` from the model; the job applies them as a new version."""
    if body.idempotency_key is not None:
        earlier = queue.find_idempotent(body.idempotency_key, body.ids)
        if earlier is not None:
            return _accepted(earlier)
    # The engine checks ids against the model; enqueue re-checks atomically what concurrent
    # requests can change: ids taken by other jobs, and that all queued jobs together leave a
    # training point (two requests, each leaving some, may together leave none). Without a
    # worker here, the model may lag the worker's: enqueue also refuses a model older than the
    # newest reported version (whose ids are released from the queued set), and the request is
    # validated again once this process has followed it.
    follower = state.follower
    while True:
        st = u.state
        try:
            u.validate_forget(body.ids, pending=queue.pending_ids(), state=st)
        except UnknownIdsError as e:
            # Not in the model, but maybe on their way in: asked too early (409), not unknown.
            # Only asked on this path, so an accepted forget costs no extra Redis call.
            adding = queue.pending_add_ids()
            if unknown := [i for i in e.ids if i not in adding]:
                raise UnknownIdsError(unknown) from None
            raise QueuedForAdditionError(
                e.ids, "Forget them once that addition's job has succeeded."
            ) from None
        except AlreadyForgottenError as e:
            # Forgotten, and queued to come back as new records: not "already forgotten" (it is
            # about to be active again), too early, as for a new id.
            adding = queue.pending_add_ids()
            if back := [i for i in e.ids if i in adding]:
                raise QueuedForAdditionError(
                    back, "Forget them once that addition's job has succeeded."
                ) from None
            raise
        try:
            job = queue.enqueue(
                body.ids,
                body.idempotency_key,
                n_train=st.n,
                version=st.version if follower is not None else None,
            )
        except StaleModelError as e:
            assert follower is not None
            follow_or_503(state, lambda version=e.version: follower.catch_up(version))
            continue
        return _accepted(job)


@router.get(
    "/jobs/{job_id}",
    dependencies=[ReadAccess],
    responses=errors({**READ_AUTH, 404: "no such job (or its record expired)", **INVALID}),
)
def get_job(job_id: str, queue: QueueDep) -> JobOut:
    """A forget job's status, and once it succeeded the model version and solver result."""
    job = queue.get(job_id)
    if job is None:
        raise HTTPException(
            status.HTTP_404_NOT_FOUND,
            f"no job {job_id!r}: check the job_id from POST /v1/forget "
            f"(job records are kept {queue.ttl_s // 3600} h)",
        )
    return JobOut.model_validate(job, from_attributes=True)
