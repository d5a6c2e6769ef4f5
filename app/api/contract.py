"""The answers that the app's middleware and handlers give on every operation of a kind, added
to the OpenAPI document (routes declare only their own).

- every operation: 422 for a query parameter it does not take (``deps.reject_unknown_query``);
- every operation with a body: 400 (not JSON at all), 413 (over ``max_body_bytes``);
- every ``/v1`` operation: 503 with ``Retry-After`` (the model not loaded yet, the queue
  unreachable, too many large bodies at once: ``app.api.gate``, or an API process without a
  worker still loading the newest version: ``app.service.ModelFollower``; a request cancelled by
  a forced shutdown: ``app.api.shutdown``).
"""

from __future__ import annotations

from typing import Any

from .schemas import ErrorOut

_ERROR = {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorOut"}}}
RETRY_AFTER = {
    "Retry-After": {
        "description": "seconds to wait before trying again",
        "required": True,
        "schema": {"type": "integer", "minimum": 1},
    }
}
_APP_WIDE_503 = (
    "the model is not loaded yet, the job queue (Redis) is unreachable, too many requests "
    "with large bodies are being served (setting max_large_bodies), or this API process (no "
    "worker) is still loading the newest model version (setting follow_wait_s), or this process "
    "is shutting down: retry after Retry-After s"
)
_UNKNOWN_QUERY = "a query parameter this endpoint does not take"
_BODY_ANSWERS = {
    "400": "the body is not JSON (or not UTF-8)",
    "413": "a request body over the setting max_body_bytes",
}


def _error(description: str) -> dict[str, Any]:
    return {"description": description, "content": _ERROR}


def complete(schema: dict[str, Any]) -> dict[str, Any]:
    """Add the app-wide answers to ``schema`` (an OpenAPI document, changed in place)."""
    schema.setdefault("components", {}).setdefault("schemas", {}).setdefault(
        "ErrorOut", ErrorOut.model_json_schema()
    )
    for path, operations in schema.get("paths", {}).items():
        for operation in operations.values():
            responses = operation.setdefault("responses", {})
            responses.setdefault("422", _error(_UNKNOWN_QUERY))
            if "requestBody" in operation:
                for code, text in _BODY_ANSWERS.items():
                    responses.setdefault(code, _error(text))
            if path.startswith("/v1/") or "503" in responses:
                answer = responses.setdefault("503", _error(_APP_WIDE_503))
                if path.startswith("/v1/") and answer["description"] != _APP_WIDE_503:
                    answer["description"] = f"{answer['description']}; or {_APP_WIDE_503}"
                answer["headers"] = RETRY_AFTER
    return schema
