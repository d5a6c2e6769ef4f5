"""Reads of the served model: predictions, influence estimates, active ids, description."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from ..deps import ModelDep, ReadAccess
from ..schemas import (
    INVALID,
    READ_AUTH,
    IdsOut,
    InfluenceOut,
    InfluenceRequest,
    ModelInfo,
    PredictOut,
    PredictRequest,
    errors,
)

router = APIRouter(
    prefix="/v1", tags=["model"], dependencies=[ReadAccess], responses=errors(READ_AUTH)
)

_BAD_INPUT = {422: "inputs or targets of the wrong shape, or not finite"}


@router.post("/predict", responses=errors(_BAD_INPUT))
def predict(body: PredictRequest, u: ModelDep) -> PredictOut:
    """Outputs of the current model at `x`."""
    version, outputs = u.predict_with_version(body.x)
    return PredictOut(model_version=version, outputs=outputs.tolist())


@router.post(
    "/influence",
    responses=errors(
        {
            **_BAD_INPUT,
            404: "forget_ids not in the training set (listed)",
            409: "forget_ids already forgotten (listed)",
            500: "the influence solve did not converge",
        }
    ),
)
def influence(body: InfluenceRequest, u: ModelDep) -> InfluenceOut:
    """Estimated change of outputs and loss at `(x, y)` if `forget_ids` were removed.

    An estimate only: the model does not change.
    """
    result = u.influence(body.forget_ids, body.x, body.y)
    return InfluenceOut(
        model_version=result.version,
        delta_outputs=result.delta_outputs.tolist(),
        delta_loss=result.delta_loss.tolist(),
    )


@router.get("/ids", responses=errors(INVALID))
def ids(
    u: ModelDep,
    offset: Annotated[int, Query(ge=0, description="ids to skip")] = 0,
    limit: Annotated[int, Query(ge=1, le=10_000, description="most ids to return")] = 1000,
) -> IdsOut:
    """Active training ids, in data set order."""
    active = u.active_ids()
    return IdsOut(ids=active[offset : offset + limit], total=len(active))


@router.get("/model")
def model(u: ModelDep) -> ModelInfo:
    """Version, sizes, loss, λ and kernel layout of the served model."""
    return ModelInfo.model_validate(u.info())
