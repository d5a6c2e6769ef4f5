"""The API against its own OpenAPI document: schemathesis generates requests for every
operation, valid and invalid, and runs all its checks on the answers (no server errors,
statuses and headers the document declares, bodies of the declared schemas, invalid data
refused, valid data accepted).

A real server (uvicorn on a socket) serves the small test model with the write token. Some ids
of the generated requests are replaced by real ones (training ids for forgets and influence,
job ids of earlier forgets; new ids and the model's rows for additions), so that the 2xx answers
are reached too, not only the 404s.

Bounded: a few dozen examples per operation, about a minute on two cores.
"""

from __future__ import annotations

import random
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import schemathesis
import uvicorn
from hypothesis import HealthCheck, settings
from schemathesis.config import SchemathesisConfig
from schemathesis.generation import GenerationMode

from app.core.config import Settings
from app.main import create_app

pytestmark = pytest.mark.redis

WRITE = {"Authorization": "Bearer write-token"}
EXAMPLES = 25

# Besides schemathesis' defaults for valid data (2xx, 401, 403, 404, 409), 422: what a static
# document cannot say is valid for the served model (rows of its input shape, labels below its
# output_dim, a forget set that leaves a training point) is refused with 422 and a message.
# Everything else is schemathesis' defaults.
CONFIG = SchemathesisConfig.from_dict(
    {
        "checks": {
            "positive_data_acceptance": {
                "expected-statuses": ["2xx", "401", "403", "404", "409", "422"]
            }
        },
        "generation": {"max-examples": EXAMPLES},
        # The write token, as the document's security scheme: cases without it (or with a
        # wrong one) are generated too, and must be refused.
        "auth": {"openapi": {"HTTPBearer": {"bearer": "write-token"}}},
    }
)
schema = schemathesis.openapi.from_dict(
    create_app(Settings(api_token=None, redis_url=None)).openapi(), config=CONFIG
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Served:
    def __init__(self, url: str, ids: list[str]):
        self.url = url
        self.ids = ids
        self.job_ids: list[str] = []
        self.receipt_job_ids: list[str] = []
        self.answers: dict[str, set[int]] = {}


@pytest.fixture(scope="module")
def served(
    tmp_path_factory: pytest.TempPathFactory, base_checkpoint, redis_url: str
) -> Iterator[Served]:
    from service_core import Unlearner

    unlearner = Unlearner.restore(base_checkpoint)
    prefix = f"schemathesis-{random.getrandbits(48):012x}"
    app_settings = Settings(
        data_dir=tmp_path_factory.mktemp("schemathesis"),
        api_token="write-token",
        read_token="read-token",
        redis_url=redis_url,
        redis_prefix=prefix,
        worker=False,
        # exact self-influence retrains once per record (a Newton solve each): keep what the
        # fuzzer's ?exact=true may ask within its 10 s read timeout (more: a documented 422)
        max_exact_self_influence=2,
    )
    port = _free_port()
    server = uvicorn.Server(
        uvicorn.Config(create_app(app_settings, unlearner), port=port, log_level="warning")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "server did not start"
        time.sleep(0.05)
    ids = httpx.get(f"{url}/v1/ids", headers=WRITE, params={"limit": 10_000}).json()["ids"]
    served = Served(url, ids[:-1])
    served.receipt_job_ids.append(_succeeded_job(url, ids[-1], app_settings, base_checkpoint))
    try:
        yield served
    finally:
        server.should_exit = True
        thread.join(30)


def _succeeded_job(url: str, record_id: str, app_settings: Settings, base_checkpoint) -> str:
    """A forget job that succeeded (so that it has a receipt): queued through the API, applied by
    a worker on a copy of the model that checkpoints elsewhere, so the served model (which
    follows only its own data dir's checkpoints) stays at version 0."""
    import redis

    from app.deletion_log import DeletionLog
    from app.queue import JobQueue
    from app.receipts import DeploymentKeys
    from app.service import queue_prefix
    from app.worker import Worker
    from service_core import Unlearner

    keys = DeploymentKeys.load_or_create(app_settings.data_dir)
    job_id = httpx.post(f"{url}/v1/forget", json={"ids": [record_id]}, headers=WRITE).json()[
        "job_id"
    ]
    client = redis.Redis.from_url(app_settings.redis_url, decode_responses=True)
    queue = JobQueue(client, queue_prefix(app_settings, keys), app_settings.job_ttl_s, keys.digest)
    applier = Unlearner.restore(base_checkpoint, id_key=keys.id_secret)
    checkpoints = app_settings.data_dir.parent / "applier-checkpoints"
    Worker(
        applier, queue, checkpoints, DeletionLog(app_settings.deletion_log), keys=keys
    ).run_once()
    # The applier reported its version (P:version, for followers); the served model is meant to
    # stay at version 0 (its own data dir), so that report is withdrawn: else the served process,
    # a follower, rightly answers 503 until it has loaded a version it can never see.
    client.delete(queue.version_key)
    client.close()
    assert httpx.get(f"{url}/v1/jobs/{job_id}/receipt", headers=WRITE).status_code == 200
    return job_id


def _reachable(case: Any, served: Served, rng: random.Random) -> None:
    """Make half of the valid cases valid for the served model too: real ids (training ids
    for forgets and influence, job ids of earlier forgets), rows of its 4 inputs, labels
    among its 3 classes, k within the training set. An invalid case stays as it was generated: what it changed may be
    what makes it invalid."""
    if case.meta is None or case.meta.generation.mode != GenerationMode.POSITIVE:
        return
    if rng.random() < 0.5:
        return
    body = case.body if isinstance(case.body, dict) else {}
    path = case.operation.path
    if path == "/v1/forget" and isinstance(body.get("ids"), list):
        body["ids"] = rng.sample(served.ids, k=min(len(body["ids"]) or 1, 2))
    elif path == "/v1/jobs/{job_id}" and served.job_ids:
        case.path_parameters = {"job_id": rng.choice(served.job_ids)}
    elif path == "/v1/jobs/{job_id}/receipt":
        case.path_parameters = {"job_id": rng.choice(served.receipt_job_ids)}
    if path in ("/v1/predict", "/v1/influence", "/v1/attribute", "/v1/records") and isinstance(
        body.get("x"), list
    ):
        n = min(len(body["x"]), 8)
        body["x"] = [[rng.uniform(-3, 3) for _ in range(4)] for _ in range(n)]
        if path != "/v1/predict":
            body["y"] = [rng.randrange(3) for _ in range(n)]
        if path == "/v1/records":  # new ids, one per row
            body["ids"] = [f"new-{rng.getrandbits(48):012x}" for _ in range(n)]
        if path == "/v1/influence":
            body["forget_ids"] = rng.sample(served.ids, k=1)
        if path == "/v1/attribute":
            body["k"] = rng.randint(1, 5)


@schema.parametrize()
@settings(deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
def test_api_conforms_to_its_schema(case, served: Served) -> None:
    rng = random.Random(repr(case) + case.operation.path)
    _reachable(case, served, rng)
    response = case.call_and_validate(base_url=served.url)
    key = f"{case.operation.method.upper()} {case.operation.path}"
    served.answers.setdefault(key, set()).add(response.status_code)
    if case.operation.path in ("/v1/forget", "/v1/records") and response.status_code == 202:
        served.job_ids.append(response.json()["job_id"])


def test_the_runs_above_reached_the_successful_answers(served: Served) -> None:
    """Not only 404s for made-up ids: each operation answered 2xx to some request above."""
    missing = [k for k, v in served.answers.items() if not any(200 <= s < 300 for s in v)]
    assert len(served.answers) == sum(1 for _ in schema.get_all_operations())
    assert not missing, served.answers
