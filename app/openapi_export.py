"""``python -m app.openapi_export PATH``: write the HTTP contract as OpenAPI JSON.

Builds the app without starting it: needs neither Redis nor a model.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from .core.config import Settings
from .main import create_app


def openapi_json() -> str:
    """The app's OpenAPI document, with sorted keys so that diffs are stable."""
    app = create_app(Settings(api_token=None, redis_url=None))
    return json.dumps(app.openapi(), indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def main(argv: list[str]) -> None:
    if len(argv) != 1:
        raise SystemExit("usage: python -m app.openapi_export PATH")
    Path(argv[0]).write_text(openapi_json(), encoding="utf-8")


if __name__ == "__main__":
    main(sys.argv[1:])
