"""New records: queue an addition (a job like a forget, through the same queue)."""

from __future__ import annotations

from fastapi import APIRouter, HTTPException, status

from service_core import ResourceError

from ...queue import Job, StaleModelError
from ..deps import ModelDep, QueueDep, SettingsDep, StateDep, WriteAccess, follow_or_503
from ..schemas import TOO_LARGE, WRITE_AUTH, AddAccepted, AddRecordsRequest, errors
from .model import _check_rows

router = APIRouter(prefix="/v1", tags=["records"])


def _accepted(job: Job) -> AddAccepted:
    return AddAccepted(job_id=job.job_id, status=job.status, status_url=f"/v1/jobs/{job.job_id}")


@router.post(
    "/records",
    status_code=status.HTTP_202_ACCEPTED,
    dependencies=[WriteAccess],
    responses=errors(
        {
            **WRITE_AUTH,
            409: "ids already in the training set, or held by a queued or running job (listed), "
            "or an idempotency_key used for another request",
            422: "empty, duplicated or empty-string ids; x or y of the wrong shape or length, "
            "not finite, or not numbers",
            413: f"more x rows than the setting max_rows allows, or {TOO_LARGE[413]}",
            503: "the job queue (Redis) is unreachable",
            507: "K with these records (and the queued additions) would not fit the devices' "
            "memory: nothing was queued",
        }
    ),
)
def add_records(
    body: AddRecordsRequest, u: ModelDep, queue: QueueDep, state: StateDep, settings: SettingsDep
) -> AddAccepted:
    """Queue the addition of the records `(ids, x, y)`; the job applies them as a new version
    (trained on the current records and these), like a forget (GET /v1/jobs/{job_id}).

    At most `max_rows` rows. An id forgotten before may be added again: it is a new record.
    A retry with the same `idempotency_key` and the same ids, x and y gets the first request's
    job, whatever its status."""
    _check_rows(body.x, settings)
    x, y = body.x.tolist(), body.y.tolist()
    if body.idempotency_key is not None:
        digest = queue.add_request_digest(body.ids, x, y)
        earlier = queue.find_idempotent(body.idempotency_key, body.ids, "add", digest)
        if earlier is not None:
            return _accepted(earlier)
    follower = state.follower
    while True:  # as POST /v1/forget: a follower validates against the newest reported version
        st = u.state
        n = u.validate_add(body.ids, body.x, body.y, pending=queue.pending_ids(), state=st)
        try:  # before any work: K with these rows and every queued addition's
            u.check_add_fits(n + len(queue.pending_add_ids()), state=st)
        except ResourceError as e:
            raise HTTPException(
                status.HTTP_507_INSUFFICIENT_STORAGE, f"{e}; nothing was queued"
            ) from None
        try:
            job = queue.enqueue_add(
                body.ids,
                x,
                y,
                version=st.version if follower is not None else None,
                idempotency_key=body.idempotency_key,
            )
        except StaleModelError as e:
            assert follower is not None
            follow_or_503(state, lambda version=e.version: follower.catch_up(version))
            continue
        return _accepted(job)
