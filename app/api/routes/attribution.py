"""Which training records drive a prediction: leave-one-out attribution and self-influence.

Reads only: the model does not change. Both come from one leave-one-out factorisation per model
version (``service_core.attribution``), computed on the first request after a version is published.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from functools import partial
from typing import Annotated

import numpy as np
from fastapi import APIRouter, HTTPException, Query, Request, Response, status

from service_core.attribution import RankedRecords
from service_core.errors import InvalidInputError, RefinementLimitError
from service_core.nonlinear_serving import NonlinearUnlearner

from .. import heavy, schemas
from ..deps import RETRY_LATER, ModelDep, ReadAccess, SettingsDep, StateDep, none_forgotten_since
from ..schemas import DIGITS_ONLY, INVALID, READ_AUTH, errors
from .model import _BAD_INPUT, _check_rows

router = APIRouter(
    prefix="/v1", tags=["attribution"], dependencies=[ReadAccess], responses=errors(READ_AUTH)
)

# ``exact=true`` requests that refine records (attribution, self-influence): one at a time per
# process. Each refined record is a Newton retraining (seconds to minutes of both cores), so a
# read token cannot queue up minutes of solves; the others are told at once, not after waiting
# for a thread.
_EXACT_REFINING = threading.Lock()
# rows × k of one attribution request: each returned record carries d outputs, and 200 rows of
# k = 1,442 (the digits model's every record) made an 87 MB answer and 2.6 GB of memory
MAX_ATTRIBUTED = 100_000
log = logging.getLogger(__name__)


class _ExactProgress:
    """How far the exact request holding ``_EXACT_REFINING`` is: logged after each refinement
    (a request of k = 10 takes minutes on digits), and the Retry-After of the requests it turns
    away (its remaining refinements at its own pace so far). Written by its thread, read by the
    event loop: single attribute writes."""

    def __init__(self, what: str):
        self.what = what
        self.started = time.monotonic()
        self.done = 0
        self.total: int | None = None  # known once the factorisation has ranked the candidates
        # when the refinements began (``__call__`` with 0 done): the pace is theirs alone, not
        # the factorisation's before them (a cold one took 70 s, and the estimate said 75 s
        # left after the first of two refinements, which took 4 s)
        self.refining_since: float | None = None

    def __call__(self, done: int, total: int) -> None:
        now = time.monotonic()
        self.done, self.total = done, total
        if done == 0:
            self.refining_since = now
            log.info(
                "%s: ranked in %.1f s (the factorisation included); refining %d record(s)",
                self.what,
                now - self.started,
                total,
            )
            return
        log.info(
            "%s: refined %d of %d record(s) in %.1f s (about %.0f s left)",
            self.what,
            done,
            total,
            now - self.started,
            self.left_s() or 0.0,
        )

    def left_s(self) -> float | None:
        """Seconds its remaining refinements should take at their pace so far (``None``: none
        done yet, or they are all done and it is answering)."""
        if not self.done or self.total is None or self.done >= self.total:
            return None
        since = self.refining_since if self.refining_since is not None else self.started
        return (self.total - self.done) * (time.monotonic() - since) / self.done


_RUNNING: _ExactProgress | None = None


def _refine_one_at_a_time(what: str) -> _ExactProgress:
    """Take ``_EXACT_REFINING`` (the caller releases it, with ``_done_refining``) and return the
    progress callback of this request; or 503 with a Retry-After of the running request's
    estimated remaining seconds (2 before its first refinement)."""
    global _RUNNING
    if not _EXACT_REFINING.acquire(blocking=False):
        running = _RUNNING
        left = running.left_s() if running is not None else None
        if left is None:
            headers, how = RETRY_LATER, ""
        else:
            wait = min(3600, max(2, math.ceil(left)))
            headers = {"Retry-After": str(wait)}
            how = (
                f" (it has refined {running.done} of {running.total} records; about {wait} s left)"
            )
        raise HTTPException(
            status.HTTP_503_SERVICE_UNAVAILABLE,
            "another request with exact=true (attribution or self-influence) is running in this "
            f"process{how}: retry when it has finished",
            headers=headers,
        )
    _RUNNING = _ExactProgress(what)
    log.info("%s: started (ranks the candidates, then refines them one by one)", what)
    return _RUNNING


def _done_refining() -> None:
    global _RUNNING
    _RUNNING = None
    _EXACT_REFINING.release()


def _records(ids: np.ndarray, ranked: RankedRecords, t: int, sign: float, of: str) -> list:
    """The ranked records of test row ``t``; for ``of="loss"`` only those whose Δℓ has ``sign``."""
    out = []
    for j, rid in enumerate(ids[t]):
        dl = float(ranked.delta_loss[t, j])
        if of == "loss" and not dl * sign > 0:
            continue
        out.append(
            schemas.AttributedRecord(
                id=str(rid), delta_loss=dl, delta_outputs=ranked.delta_outputs[t, j].tolist()
            )
        )
    return out


@router.post(
    "/attribute",
    responses=errors(
        {
            **_BAD_INPUT,
            413: f"more x rows than the setting max_rows allows, rows × k over {MAX_ATTRIBUTED}, "
            "or a request body over the setting max_body_bytes",
            409: "not available for a nonlinear model (--nonlinear)",
            422: "inputs or targets of the wrong shape or not finite, k outside 1 … the number of "
            "active records, of='output' for a regression model with several outputs, or "
            "exact=true refining more records than --max-exact-attribution",
            503: "another request with exact=true is running in this process, or a record the "
            "answer names was forgotten while it was computed (Retry-After)",
            500: "the leave-one-out factorisation or a refinement failed",
        }
    ),
)
async def attribute(
    body: schemas.AttributeRequest,
    u: ModelDep,
    settings: SettingsDep,
    state: StateDep,
    request: Request,
) -> schemas.AttributeOut:
    """For each row of `x`: the `k` training records whose removal alone would raise its loss most
    (`helpful`) and lower it most (`harmful`).

    `delta_loss` is the loss after retraining without that one record (risk normalised by 1/(N − 1),
    as a forget) minus the loss now. Exact for squared error; for cross-entropy the influence step,
    or with `exact: true` the returned records refined to the retrained optimum (the distinct
    leading 2k per side over every row, at most `--max-exact-attribution`, each a Newton
    retraining; one such request at a time per process, another gets 503; stopped between two
    refinements when the client leaves or the server shuts down). At most `max_rows` rows. The
    first request after a new version factors the leave-one-out system (cached).
    """
    _check_rows(body.x, settings)
    # k over N is the engine's 422 (k's range), not this limit's 413
    returned = len(body.x) * min(body.k, u.n_train)
    if returned > MAX_ATTRIBUTED:
        raise HTTPException(
            status.HTTP_413_CONTENT_TOO_LARGE,
            f"x has {len(body.x)} rows and k is {body.k}: {returned} records per side to "
            f"return, at most {MAX_ATTRIBUTED} per request: lower k or split the request",
        )
    refining = body.exact and u.train_config.loss != "mse" and not isinstance(u, NonlinearUnlearner)
    cancel = threading.Event()
    work = partial(
        u.attribute,
        body.x,
        body.y,
        k=body.k,
        exact=body.exact,
        of=body.of,
        max_refinements=settings.max_exact_attribution,
        cancelled=cancel.is_set,
    )
    if refining:
        # One row alone has min(4k, N) distinct candidates (2k per side, disjoint: ``rank``):
        # over the limit is known now, without waiting for the factorisation (the exact count,
        # over every row, is checked after it).
        least = min(4 * body.k, u.n_train)
        if least > settings.max_exact_attribution:
            raise InvalidInputError(
                f"exact=true would refine at least {least} records (the leading 2k of each "
                f"side of one row, min(4k, N)); at most {settings.max_exact_attribution} here "
                "(--max-exact-attribution): lower k, or leave exact false"
            )
        work = partial(work, progress=_refine_one_at_a_time("exact attribution"))
    try:
        # On the heavy reads' own threads (``app.api.heavy``): however many wait for a cold
        # factorisation, the threads predictions use stay free.
        a = await heavy.compute(
            request,
            state.attribution_threads,
            work,
            now=isinstance(u, NonlinearUnlearner),  # refused (409) at once
            draining=state.draining,
            cancel=cancel,
        )
    except RefinementLimitError as e:  # the exact count, known after the factorisation
        message = str(e)
        named = message.replace(" here:", " here (--max-exact-attribution):", 1)
        raise InvalidInputError(
            named if named != message else f"{message} (--max-exact-attribution)"
        ) from e
    finally:
        if refining:
            _done_refining()
    if isinstance(a, Response):
        return a  # the client left while it waited
    results = [
        schemas.AttributionRow(
            helpful=_records(a.helpful_ids, a.helpful, t, 1.0, a.of),
            harmful=_records(a.harmful_ids, a.harmful, t, -1.0, a.of),
        )
        for t in range(a.helpful_ids.shape[0])
    ]
    named = {r.id for row in results for r in (*row.helpful, *row.harmful)}
    await none_forgotten_since(state, a.version, named)
    return schemas.AttributeOut(model_version=a.version, exact=a.exact, results=results)


@router.get(
    "/self-influence",
    responses=errors(
        {
            **INVALID,
            409: "not available for a nonlinear model (--nonlinear)",
            422: "exact=true would refine more records than --max-exact-self-influence",
            503: "another request with exact=true is running in this process, or a record the "
            "answer names was forgotten while it was computed (Retry-After)",
            500: "the leave-one-out factorisation or a refinement failed",
        }
    ),
)
async def self_influence(
    u: ModelDep,
    settings: SettingsDep,
    state: StateDep,
    request: Request,
    offset: Annotated[int, Query(ge=0, description="records to skip"), DIGITS_ONLY] = 0,
    limit: Annotated[
        int, Query(ge=1, le=10_000, description="most records to return"), DIGITS_ONLY
    ] = 100,
    exact: Annotated[
        bool,
        Query(
            description="cross-entropy: refine the first offset + limit records (as the influence "
            "step ranks them) to exact retraining and sort them by the exact values; squared error "
            "is exact either way"
        ),
    ] = False,
) -> schemas.SelfInfluenceOut:
    """Every active record's own loss after retraining without it minus its loss now, descending:
    the usual signal of mislabelled or anomalous records.

    Exact for squared error, the influence step for cross-entropy (computed once per version). With
    `exact=true` a cross-entropy model retrains without each of the first `offset + limit` records
    (at most `--max-exact-self-influence`; each a Newton solve, kept for the version, so a later
    request refines only records no earlier one did; one such request at a time per process,
    another gets 503) and returns them in the order of their exact values.
    """
    top = offset + limit
    cancel = threading.Event()
    work = partial(u.self_influence, cancelled=cancel.is_set)
    refining = exact and u.train_config.loss != "mse" and not isinstance(u, NonlinearUnlearner)
    if refining:
        if top > settings.max_exact_self_influence:
            raise InvalidInputError(
                f"exact=true refines offset + limit = {top} records; at most "
                f"{settings.max_exact_self_influence} (--max-exact-self-influence): lower offset "
                "or limit"
            )
        progress = _refine_one_at_a_time("exact self-influence")
        work = partial(
            u.self_influence, exact=True, top=top, cancelled=cancel.is_set, progress=progress
        )
    try:
        si = await heavy.compute(
            request,
            state.attribution_threads,
            work,
            now=isinstance(u, NonlinearUnlearner),
            draining=state.draining,
            cancel=cancel,
        )
    finally:
        if refining:
            _done_refining()
    if isinstance(si, Response):
        return si  # the client left while it waited
    page = slice(offset, offset + limit)
    await none_forgotten_since(state, si.version, (str(i) for i in si.ids[page]))
    records = [
        schemas.SelfInfluenceRecord(id=str(i), self_influence=float(v))
        for i, v in zip(si.ids[page], si.self_influence[page], strict=True)
    ]
    return schemas.SelfInfluenceOut(
        model_version=si.version,
        total=len(si.ids),
        exact=si.exact or si.exact_top >= min(top, len(si.ids)),
        records=records,
    )
