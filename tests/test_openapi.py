"""The committed OpenAPI document is the one the code generates."""

from __future__ import annotations

import json
from pathlib import Path

from app.openapi_export import openapi_json

COMMITTED = Path(__file__).resolve().parents[1] / "openapi" / "openapi.json"


def test_committed_openapi_matches_the_code():
    generated = openapi_json()
    assert generated == COMMITTED.read_text(encoding="utf-8"), (
        "openapi/openapi.json is stale: run 'python -m app.openapi_export openapi/openapi.json' "
        "and commit the result"
    )


def test_openapi_has_the_v1_contract():
    spec = json.loads(COMMITTED.read_text(encoding="utf-8"))
    assert set(spec["paths"]) == {
        "/v1/forget",
        "/v1/jobs/{job_id}",
        "/v1/influence",
        "/v1/predict",
        "/v1/ids",
        "/v1/model",
        "/v1/attribute",
        "/v1/self-influence",
        "/v1/jobs/{job_id}/receipt",
        "/v1/receipts/public-key",
        "/v1/deletions",
        "/v1/records/{record_id}",
        "/v1/records",
        "/healthz",
        "/readyz",
        "/metrics",
    }
    assert "202" in spec["paths"]["/v1/forget"]["post"]["responses"]
    additions = spec["paths"]["/v1/records"]["post"]
    assert {"202", "403", "409", "413", "422", "507"} <= set(additions["responses"])
    assert additions["security"] == spec["paths"]["/v1/forget"]["post"]["security"]
    # Error bodies are {"detail": str} everywhere, FastAPI's validation errors included.
    assert "HTTPValidationError" not in spec["components"]["schemas"]
