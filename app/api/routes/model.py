"""Reads of the served model: predictions, influence estimates, active ids, description."""

from __future__ import annotations

import json
from functools import partial
from typing import Annotated

import anyio.to_thread
import numpy as np
from fastapi import APIRouter, HTTPException, Query, Request, Response, status

from service_core.errors import InvalidForgetSetError
from service_core.nonlinear_serving import NonlinearUnlearner

from ...core.config import Settings
from .. import heavy
from ..deps import ModelDep, ReadAccess, SettingsDep, StateDep
from ..schemas import (
    DIGITS_ONLY,
    INVALID,
    READ_AUTH,
    TOO_LARGE,
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

_BAD_INPUT = {
    422: "inputs or targets of the wrong shape, or not finite",
    413: f"more x rows than the setting max_rows allows, or {TOO_LARGE[413]}",
}


def _check_rows(x: np.ndarray, settings: Settings) -> None:
    """Refuse more rows than ``max_rows``: a request's cost grows with its rows, and one huge
    request would hold the model (and every other client) up for as long as it takes.

    Raises:
      HTTPException: 413, saying the limit and the setting that raises it.
    """
    if len(x) > settings.max_rows:
        raise HTTPException(
            status.HTTP_413_CONTENT_TOO_LARGE,
            f"x has {len(x)} rows; one request may have at most {settings.max_rows}, the limit "
            "of setting max_rows (flag --max-rows, env NTK_UNLEARN_MAX_ROWS): split the request",
        )


@router.post("/predict", response_model=PredictOut, responses=errors(_BAD_INPUT))
async def predict(
    body: PredictRequest, u: ModelDep, settings: SettingsDep, state: StateDep
) -> Response:
    """Outputs of the current model at `x` (at most `max_rows` rows)."""
    _check_rows(body.x, settings)
    batcher = state.batcher
    if batcher is None or len(body.x) > batcher.max_rows:
        version, outputs = await anyio.to_thread.run_sync(u.predict_with_version, body.x)
    else:
        # Concurrent requests are computed together (``app.batching``), each as if alone.
        version, outputs = await batcher.predict(u, u.prepare_inputs(body.x))
        outputs = u.checked_outputs(outputs)
    # Serialised here: the outputs are finite (``checked_outputs``), which is all ``PredictOut``
    # would check, and FastAPI's validation and serialisation of a returned model cost a tenth
    # of the event loop's time per 1-row prediction. Floats as Python writes them: the same
    # numbers, to the last bit, as ``PredictOut`` would send.
    content = json.dumps({"model_version": version, "outputs": outputs.tolist()}, allow_nan=False)
    return Response(content, media_type="application/json")


@router.post(
    "/influence",
    responses=errors(
        {
            **_BAD_INPUT,
            404: "forget_ids not in the training set (listed)",
            409: "forget_ids already forgotten (listed), or a nonlinear model (--nonlinear), "
            "whose estimate would be linearised",
            500: "the influence solve did not converge",
        }
    ),
)
async def influence(
    body: InfluenceRequest, u: ModelDep, settings: SettingsDep, state: StateDep, request: Request
) -> InfluenceOut:
    """Estimated change of outputs and loss at `(x, y)` if `forget_ids` were removed.

    An estimate only: the model does not change. At most `max_rows` rows of `x`.
    """
    _check_rows(body.x, settings)
    try:
        result = await heavy.compute(
            request,
            state.influence_threads,
            partial(u.influence, body.forget_ids, body.x, body.y),
            now=isinstance(u, NonlinearUnlearner),  # refused (409) at once
            draining=state.draining,
        )
    except InvalidForgetSetError as e:  # the engine's words are a forget's: name this field
        message = str(e)
        if message.startswith("ids "):
            raise InvalidForgetSetError("forget_ids " + message[4:]) from None
        raise
    if isinstance(result, Response):
        return result  # the client left while it waited
    return InfluenceOut(
        model_version=result.version,
        delta_outputs=result.delta_outputs.tolist(),
        delta_loss=result.delta_loss.tolist(),
        delta_loss_first_order=result.delta_loss_first_order.tolist(),
    )


@router.get("/ids", responses=errors(INVALID))
def ids(
    u: ModelDep,
    offset: Annotated[int, Query(ge=0, description="ids to skip"), DIGITS_ONLY] = 0,
    limit: Annotated[
        int, Query(ge=1, le=10_000, description="most ids to return"), DIGITS_ONLY
    ] = 1000,
) -> IdsOut:
    """Active training ids, in data set order."""
    active = u.active_ids()
    return IdsOut(ids=active[offset : offset + limit], total=len(active))


def _user_network(meta: dict) -> dict:
    """A user's network: its leaves fine-tuning moves and those frozen at θ0, its framework and
    params fingerprint (nothing for the built-in networks)."""
    if "params_digest" not in meta:
        return {}
    keys = ("trainable_leaves", "frozen_leaves", "framework", "params_digest")
    return {"user_network": {k: meta.get(k) for k in keys}}


@router.get("/model")
def model(u: ModelDep) -> ModelInfo:
    """Version, sizes, loss, λ and kernel layout of the served model."""
    st = u.state  # one version throughout
    train = st.train_config
    return ModelInfo.model_validate(
        {
            "version": st.version,
            "n_train": st.n,
            "n_forgotten": len(st.forgotten),
            "output_dim": st.layout.d,
            "n_params": u.model.n_params,
            "loss": train.loss,
            "lambda": train.lam,
            "kernel": st.kernel_summary(),
            "model": st.model_config.shaping(),
            "dataset": st.meta["dataset"],
            "dtype": st.dtype,
            "residual": st.residual,
            "certificate": {
                **st.certificate(),
                # --nonlinear: the network's own certificate (nonlinear_serving)
                **(
                    {"nonlinear": st.history[-1].get("certificate")}
                    if "nonlinear" in st.meta
                    else {}
                ),
            },
            "precision": {
                "kernel_dtype": st.dtype,
                **st.meta.get("precision", {}),
                "dtype": st.dtype,
                "configured": train.dtype,
            },
            "conditioning": st.meta.get("conditioning"),
            "ntk": {
                "implementation": st.meta.get("ntk", {}).get(
                    "implementation", getattr(u.model, "ntk_implementation", "analytic")
                ),
                "seconds": st.meta.get("ntk", {}).get("seconds"),
            },
            **_user_network(st.meta),
            **({"nonlinear": st.meta["nonlinear"]} if "nonlinear" in st.meta else {}),
        }
    )
