"""The v1 HTTP contract, over a real app with its worker and a real Redis."""

from __future__ import annotations

import gc
import json
import math
import threading
import time
import weakref
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from app.main import create_app

pytestmark = pytest.mark.redis

WRITE = {"Authorization": "Bearer write-token"}
READ = {"Authorization": "Bearer read-token"}


@pytest.fixture
def x_probe(dataset_file: Path) -> list[list[float]]:
    with np.load(dataset_file) as f:
        return f["x"][:5].tolist()


def _forget(client: TestClient, ids: list[str], **extra) -> dict:
    r = client.post("/v1/forget", json={"ids": ids, **extra}, headers=WRITE)
    assert r.status_code == 202, r.text
    return r.json()


def test_forget_applies_a_new_version(client, x_probe, wait_for_job):
    before = client.get("/v1/model", headers=READ).json()
    outputs_before = client.post("/v1/predict", json={"x": x_probe}, headers=READ).json()
    assert outputs_before["model_version"] == 0

    accepted = _forget(client, ["r03", "r07"])
    assert accepted["status"] == "queued"
    assert accepted["status_url"] == f"/v1/jobs/{accepted['job_id']}"
    job = wait_for_job(client, accepted["job_id"])

    assert job["status"] == "succeeded", job
    assert job["model_version"] == 1
    after = client.get("/v1/model", headers=READ).json()
    assert after["version"] == 1
    assert after["n_train"] == before["n_train"] - 2
    assert after["n_forgotten"] == 2
    ids = client.get("/v1/ids", headers=READ).json()
    assert "r03" not in ids["ids"] and "r07" not in ids["ids"]
    assert ids["total"] == before["n_train"] - 2
    outputs_after = client.post("/v1/predict", json={"x": x_probe}, headers=READ).json()
    assert outputs_after["model_version"] == 1
    assert not np.allclose(outputs_after["outputs"], outputs_before["outputs"])


@pytest.mark.gc_freeze
def test_the_start_up_heap_is_frozen_and_a_replaced_version_is_still_freed(
    settings, unlearner, wait_for_job
):
    """Once started, the API moves what the start-up allocated out of the cyclic collector's
    passes (``gc.freeze``: its full collections cost every in-flight request); the version it
    started with is still freed once replaced (by reference counts: the freeze keeps nothing
    alive), and stopping gives the collector its objects back."""
    with TestClient(create_app(settings, unlearner)) as c:
        assert gc.get_freeze_count() > 10_000
        version_0 = weakref.ref(unlearner.state)
        job = wait_for_job(c, _forget(c, ["r03"])["job_id"])
        assert job["status"] == "succeeded", job
        deadline = time.monotonic() + 10
        while version_0() is not None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert version_0() is None, "the replaced version 0 is still held"
    assert gc.get_freeze_count() == 0


def test_job_record_has_every_field(client, wait_for_job):
    accepted = _forget(client, ["r01"])
    job = wait_for_job(client, accepted["job_id"])
    assert job["job_id"] == accepted["job_id"]
    assert job["ids"] == []  # once ended, only the ids' keyed digests are kept
    assert len(job["id_digests"]) == 1 and len(job["id_digests"][0]) == 64
    assert job["receipt"]["payload"]["job_id"] == accepted["job_id"]
    assert job["submitted_at"] <= job["finished_at"]
    assert job["error"] is None
    solver = job["solver"]
    assert set(solver) >= {"method", "iterations", "residual", "seconds", "reason"}
    # Why the solver was chosen: the auto cost model's explanation, or "configured".
    assert isinstance(solver["reason"], str) and solver["reason"]
    assert solver["converged"] is True
    assert solver["residual"] < 1e-6
    assert job["refine"]["converged"] is True  # cross-entropy: Newton refinement ran
    # the certificate: recomputed from the published α and K, within tolerance × the slack granted
    cert = solver["certificate"]
    assert cert["residual"] <= cert["tolerance"] * cert["accept_floor"]
    assert cert["accept_floor"] == 1.0 and cert["dtype"] in ("float32", "float64")
    assert cert["tolerance_ratio"] == pytest.approx(cert["residual"] / cert["tolerance"])
    model = client.get("/v1/model", headers=READ).json()
    assert model["version"] == job["model_version"] and model["certificate"] == cert
    assert model["precision"]["configured"] == "float64" and model["dtype"] == cert["dtype"]
    cond = model["conditioning"]
    assert cond["kappa"] > 1 and cond["min_lam_float32"] > 0 and cond["lambda_max"] > 0


def test_unknown_job_is_404(client):
    r = client.get("/v1/jobs/nope", headers=READ)
    assert r.status_code == 404
    assert "nope" in r.json()["detail"]


def test_forgetting_again_is_409(client, wait_for_job):
    job = wait_for_job(client, _forget(client, ["r05"])["job_id"])
    assert job["status"] == "succeeded"
    r = client.post("/v1/forget", json={"ids": ["r06", "r05"]}, headers=WRITE)
    assert r.status_code == 409
    assert "r05" in r.json()["detail"] and "r06" not in r.json()["detail"]


def test_ids_of_a_queued_job_are_409(make_settings, unlearner):
    # No worker: the first job stays queued, holding its ids.
    with TestClient(create_app(make_settings(worker=False), unlearner)) as client:
        _forget(client, ["r10", "r11"])
        r = client.post("/v1/forget", json={"ids": ["r11"]}, headers=WRITE)
        assert r.status_code == 409
        assert "r11" in r.json()["detail"]


def test_unknown_ids_are_404_and_listed(client):
    r = client.post("/v1/forget", json={"ids": ["r01", "ghost-1", "ghost-2"]}, headers=WRITE)
    assert r.status_code == 404
    detail = r.json()["detail"]
    assert "ghost-1" in detail and "ghost-2" in detail and "r01" not in detail


@pytest.mark.parametrize("field", ["ids", "forget_ids"])
def test_empty_string_ids_are_422(client, x_probe, field):
    if field == "ids":
        r = client.post("/v1/forget", json={"ids": ["r01", ""]}, headers=WRITE)
    else:
        body = {"forget_ids": [""], "x": x_probe, "y": [0, 1, 2, 0, 1]}
        r = client.post("/v1/influence", json=body, headers=READ)
    assert r.status_code == 422, r.text
    detail = r.json()["detail"]
    assert "ids must be non-empty strings" in detail
    assert "not in the training set" not in detail


@pytest.mark.parametrize(
    "ids, words",
    [
        ([], "non-empty"),
        (["r01", "r02", "r01"], "duplicated"),
        ([f"r{i:02d}" for i in range(48)], "every remaining"),
    ],
)
def test_invalid_forget_sets_are_422(client, ids, words):
    r = client.post("/v1/forget", json={"ids": ids}, headers=WRITE)
    assert r.status_code == 422
    assert words in r.json()["detail"]


def test_forgetting_the_rest_with_queued_jobs_is_422(make_settings, unlearner):
    with TestClient(create_app(make_settings(worker=False), unlearner)) as client:
        _forget(client, [f"r{i:02d}" for i in range(40)])
        r = client.post(
            "/v1/forget", json={"ids": [f"r{i:02d}" for i in range(40, 48)]}, headers=WRITE
        )
        assert r.status_code == 422
        assert "every remaining" in r.json()["detail"]


def test_concurrent_forgets_that_together_empty_the_model_are_refused(make_settings, unlearner):
    """Each request leaves points, both together none: one is accepted, the other 422."""
    app = create_app(make_settings(worker=False), unlearner)
    halves = [[f"r{i:02d}" for i in range(24)], [f"r{i:02d}" for i in range(24, 48)]]
    with TestClient(app) as client:
        queue = app.state.service.queue
        # Both requests read the queued ids (none) before either enqueues: the worst interleaving.
        both_read = threading.Barrier(2, timeout=30)
        read_pending = queue.pending_ids

        def pending_ids_then_wait():
            pending = read_pending()
            both_read.wait()
            return pending

        queue.pending_ids = pending_ids_then_wait
        answers: list = [None, None]

        def submit(k: int) -> None:
            answers[k] = client.post("/v1/forget", json={"ids": halves[k]}, headers=WRITE)

        threads = [threading.Thread(target=submit, args=(k,)) for k in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        codes = sorted(r.status_code for r in answers)
        assert codes == [202, 422], [r.text for r in answers]
        refused = next(r for r in answers if r.status_code == 422)
        assert "every remaining" in refused.json()["detail"]
        assert queue.client.xlen(queue.stream) == 1
        assert queue.client.scard(queue.pending_key) == 24


@pytest.mark.parametrize(
    "body, words",
    [
        ('{"x": [[NaN, 1, 2, 3]]}', "NaN"),
        ('{"x": [[1, Infinity, 2, 3]]}', "infinite"),
        ('{"x": [[1, 2, 3, 1e999]]}', "infinite"),
        ('{"x": [[1, 2, 3, 4], [1, 2]]}', "rectangular"),
        ('{"x": [[1, 2, 3]]}', "shape"),
        ('{"x": [1, 2, 3, 4]}', "rows"),
        ('{"x": [[1, 2, "3", 4]]}', "numbers"),
        ('{"x": []}', "non-empty"),
        ('{"y": [[1, 2, 3, 4]]}', "x: Field required"),
        ('{"x": [[1, 2, 3, 4]], "extra": 1}', "extra"),
        ("[1, 2]", "JSON object"),
    ],
)
def test_bad_predict_inputs_are_422_with_detail(client, body, words):
    r = client.post(
        "/v1/predict", content=body, headers={**READ, "Content-Type": "application/json"}
    )
    assert r.status_code == 422, r.text
    detail = r.json()["detail"]
    assert isinstance(detail, str)
    assert words.lower() in detail.lower()


def test_predict_outputs(client, x_probe, unlearner):
    r = client.post("/v1/predict", json={"x": x_probe}, headers=READ)
    assert r.status_code == 200
    body = r.json()
    np.testing.assert_allclose(body["outputs"], unlearner.predict(np.array(x_probe)), rtol=1e-12)
    assert np.shape(body["outputs"]) == (5, 3)


@pytest.mark.parametrize("path", ["/v1/predict", "/v1/influence"])
def test_more_rows_than_max_rows_are_413(make_settings, unlearner, x_probe, path):
    with TestClient(create_app(make_settings(max_rows=4), unlearner)) as client:
        body = {"x": x_probe} if path == "/v1/predict" else {
            "forget_ids": ["r02"], "x": x_probe, "y": [0, 1, 2, 0, 1]
        }  # fmt: skip
        r = client.post(path, json=body, headers=READ)
        assert r.status_code == 413, r.text
        detail = r.json()["detail"]
        assert "5 rows" in detail and "4" in detail and "max_rows" in detail
        # At the limit is fine.
        trimmed = {**body, "x": x_probe[:4]}
        if "y" in body:
            trimmed["y"] = body["y"][:4]
        assert client.post(path, json=trimmed, headers=READ).status_code == 200


def test_a_body_over_max_body_bytes_is_413_before_it_is_read(make_settings, unlearner):
    with TestClient(create_app(make_settings(max_body_bytes=1000), unlearner)) as client:
        big = json.dumps({"x": [[0.0, 1.0, 2.0, 3.0]] * 200})
        assert len(big) > 1000
        r = client.post(
            "/v1/predict", content=big, headers={**READ, "Content-Type": "application/json"}
        )
        assert r.status_code == 413, r.text
        detail = r.json()["detail"]
        assert "1000 bytes" in detail and "max_body_bytes" in detail

        # Streamed without a Content-Length: cut off once the bytes read pass the limit.
        def chunks():
            for k in range(0, len(big), 100):
                yield big[k : k + 100].encode()

        r = client.post(
            "/v1/predict", content=chunks(), headers={**READ, "Content-Type": "application/json"}
        )
        assert r.status_code == 413, r.text
        assert "max_body_bytes" in r.json()["detail"]
        small = {"x": [[0.0, 1.0, 2.0, 3.0]]}
        assert client.post("/v1/predict", json=small, headers=READ).status_code == 200


def test_influence_estimates_without_changing_the_model(client, x_probe):
    body = {"forget_ids": ["r02", "r04"], "x": x_probe, "y": [0, 1, 2, 0, 1]}
    r = client.post("/v1/influence", json=body, headers=READ)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["model_version"] == 0
    assert np.shape(out["delta_outputs"]) == (5, 3)
    assert np.shape(out["delta_loss"]) == (5,)
    assert np.any(np.abs(out["delta_outputs"]) > 0)
    assert client.get("/v1/model", headers=READ).json()["version"] == 0


@pytest.mark.parametrize(
    "forget_ids, y, status, words",
    [
        (["ghost"], [0, 1, 2, 0, 1], 404, "ghost"),
        (["r02"], [0, 1, 2, 0, 7], 422, "class labels"),
        (["r02"], [0, 1], 422, "entries"),
        (["r02"], [0.0, 1.0, float("nan"), 0.0, 1.0], 422, "NaN"),
    ],
)
def test_bad_influence_requests(client, x_probe, forget_ids, y, status, words):
    # json.dumps writes NaN as the bare literal, as a careless client would.
    body = json.dumps({"forget_ids": forget_ids, "x": x_probe, "y": y})
    r = client.post(
        "/v1/influence", content=body, headers={**READ, "Content-Type": "application/json"}
    )
    assert r.status_code == status, r.text
    assert words in r.json()["detail"]


def test_ids_paging(client):
    first = client.get("/v1/ids?limit=10", headers=READ).json()
    second = client.get("/v1/ids?offset=10&limit=10", headers=READ).json()
    everything = client.get("/v1/ids?limit=1000", headers=READ).json()
    assert first["total"] == second["total"] == 48
    assert first["ids"] == [f"r{i:02d}" for i in range(10)]
    assert second["ids"] == [f"r{i:02d}" for i in range(10, 20)]
    assert everything["ids"] == [f"r{i:02d}" for i in range(48)]
    assert client.get("/v1/ids?offset=100", headers=READ).json() == {"ids": [], "total": 48}
    r = client.get("/v1/ids?limit=0", headers=READ)
    assert r.status_code == 422 and "limit" in r.json()["detail"]
    assert client.get("/v1/ids?offset=-1", headers=READ).status_code == 422


@pytest.mark.parametrize(
    "path",
    [
        "/v1/ids?offset={v}",
        "/v1/ids?limit={v}",
        "/v1/deletions?cursor={v}",
        "/v1/deletions?limit={v}",
    ],
)
@pytest.mark.parametrize("value", ["1_0", "10.0", "+10", "%2010", "0x10"])
def test_query_integers_are_plain_digits(client, path, value):
    """Query integers are decimal digits, as the schema's "integer" says: Python's int() would
    also read "1_0", " 10", "+10" and "10.0" (pydantic's lax mode), and the answer would not
    show that the value was read as something else."""
    r = client.get(path.format(v=value), headers=READ)
    assert r.status_code == 422, r.text
    assert "plain decimal digits" in r.json()["detail"], r.json()
    assert client.get(path.format(v="10"), headers=READ).status_code == 200


def test_model_info(client):
    info = client.get("/v1/model", headers=READ).json()
    assert info["version"] == 0
    assert info["n_train"] == 48 and info["n_forgotten"] == 0 and info["output_dim"] == 3
    assert info["loss"] == "ce" and info["lambda"] == pytest.approx(1e-2)
    assert info["n_params"] > 0
    assert set(info["kernel"]) >= {"shape", "bytes", "devices"}


@pytest.mark.parametrize(
    "method, path, body",
    [
        ("get", "/v1/model", None),
        ("get", "/v1/ids", None),
        ("get", "/v1/jobs/x", None),
        ("post", "/v1/predict", {"x": [[0, 0, 0, 0]]}),
        ("post", "/v1/forget", {"ids": ["r01"]}),
    ],
)
def test_missing_or_unknown_token_is_401(client, method, path, body):
    kwargs = {"json": body} if body is not None else {}
    r = getattr(client, method)(path, **kwargs)
    assert r.status_code == 401
    assert r.headers["WWW-Authenticate"] == "Bearer"
    assert "Authorization: Bearer" in r.json()["detail"]
    # A token that is no token of this service fails authentication (401), not authorisation.
    r = getattr(client, method)(path, headers={"Authorization": "Bearer wrong"}, **kwargs)
    assert r.status_code == 401, r.text
    assert r.headers["WWW-Authenticate"] == 'Bearer error="invalid_token"'
    assert "invalid token" in r.json()["detail"]


def test_read_token_cannot_forget(client):
    r = client.post("/v1/forget", json={"ids": ["r01"]}, headers=READ)
    assert r.status_code == 403
    assert "write" in r.json()["detail"]
    assert client.get("/v1/model", headers=WRITE).status_code == 200  # write implies read


def test_open_reads(make_settings, unlearner):
    with TestClient(create_app(make_settings(open_reads=True), unlearner)) as client:
        assert client.get("/v1/model").status_code == 200
        assert client.post("/v1/forget", json={"ids": ["r01"]}).status_code == 401


def test_idempotency_key_returns_the_same_job(client, wait_for_job):
    first = _forget(client, ["r08"], idempotency_key="k-1")
    again = _forget(client, ["r08"], idempotency_key="k-1")
    assert again["job_id"] == first["job_id"]
    wait_for_job(client, first["job_id"])
    # Replayed after the job succeeded: still the same job, not a 409 for forgotten ids.
    late = _forget(client, ["r08"], idempotency_key="k-1")
    assert late["job_id"] == first["job_id"] and late["status"] == "succeeded"
    r = client.post("/v1/forget", json={"ids": ["r09"], "idempotency_key": "k-1"}, headers=WRITE)
    assert r.status_code == 409
    assert "idempotency_key" in r.json()["detail"]
    assert client.get("/v1/model", headers=READ).json()["version"] == 1


def test_health_and_readiness(client):
    assert client.get("/healthz").json() == {"status": "ok"}
    body = client.get("/readyz").json()
    assert (body["status"], body["model_version"]) == ("ready", 0)
    # the worker of this process renews its heartbeat from its start
    deadline = time.monotonic() + 30
    while not body["worker"].startswith("alive:") and time.monotonic() < deadline:
        time.sleep(0.05)
        body = client.get("/readyz").json()
    assert body["worker"].startswith("alive: ") and "model version 0" in body["worker"], body


def test_readiness_and_metrics_say_when_no_worker_runs(make_settings, unlearner):
    """An API process alone (no worker anywhere): ready (it answers reads), but /readyz and the
    queue gauges say that forgets stay queued, and for how long the oldest has waited."""
    settings = make_settings(worker=False)
    with TestClient(create_app(settings, unlearner)) as client:
        body = client.get("/readyz").json()
        assert body["status"] == "ready" and body["worker"].startswith("none:"), body
        assert _gauge(client, "ntk_unlearn_redis_up") == 1
        assert _gauge(client, "ntk_unlearn_follower_behind_seconds") == 0
        assert _gauge(client, "ntk_unlearn_worker_up") == 0
        assert _gauge(client, "ntk_unlearn_queue_jobs") == 0
        assert _gauge(client, "ntk_unlearn_queue_oldest_job_seconds") == 0
        # no worker in this process: no job metrics (histograms that would stay empty)
        text = client.get("/metrics").text
        for name in ("forget_jobs", "forget_batch_jobs", "solve_seconds", "solver_iterations"):
            assert f"ntk_unlearn_{name}" not in text, name
        _forget(client, ["r01"])
        time.sleep(0.2)
        _forget(client, ["r02"])
        assert "2 job(s) waiting" in client.get("/readyz").json()["worker"]
        assert _gauge(client, "ntk_unlearn_queue_jobs") == 2
        assert 0.2 <= _gauge(client, "ntk_unlearn_queue_oldest_job_seconds") < 30
        # a worker appears (its heartbeat: as a worker process's would be)
        queue = client.app.state.service.queue
        queue.beat("elsewhere-7", 0, busy_since=None)
        assert _gauge(client, "ntk_unlearn_worker_up") == 1
        assert client.get("/readyz").json()["worker"].startswith("alive: elsewhere-7")


def _gauge(client: TestClient, name: str) -> float:
    """A gauge's value from this app's /metrics (the Prometheus text format, no labels)."""
    for line in client.get("/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not exported")


@pytest.mark.parametrize("path", ["/healthz", "/readyz"])
def test_probes_answer_head(client, path):
    r = client.head(path)
    assert r.status_code == 200
    assert r.content == b""


def test_head_readyz_says_503_when_not_ready(make_settings, unlearner):
    settings = make_settings(redis_url="redis://127.0.0.1:1/0")
    with TestClient(create_app(settings, unlearner)) as client:
        assert client.head("/readyz").status_code == 503


def test_unreachable_redis_is_503_not_500(make_settings, unlearner):
    # Nothing listens on port 1: every Redis call fails at once.
    settings = make_settings(redis_url="redis://127.0.0.1:1/0")
    with TestClient(create_app(settings, unlearner)) as client:
        r = client.get("/readyz")
        assert r.status_code == 503
        assert "Redis" in r.json()["detail"] and r.json()["worker"] == "unknown"
        assert math.isnan(_gauge(client, "ntk_unlearn_worker_up"))
        assert _gauge(client, "ntk_unlearn_redis_up") == 0
        # ready for reads all the same (a load balancer routing reads keeps this process)
        reads = client.get("/readyz?scope=reads")
        assert reads.status_code == 200 and reads.json()["worker"] == "unknown", reads.text
        assert client.get("/readyz?scope=everything").status_code == 422
        r = client.post("/v1/forget", json={"ids": ["r01"]}, headers=WRITE)
        assert r.status_code == 503
        assert "Redis" in r.json()["detail"]
        # Reads of the model do not need the queue.
        assert client.get("/v1/model", headers=READ).status_code == 200


def test_metrics(client, wait_for_job):
    wait_for_job(client, _forget(client, ["r12"])["job_id"])
    client.get("/v1/jobs/does-not-exist", headers=READ)
    text = client.get("/metrics").text
    assert 'ntk_unlearn_forget_jobs_total{status="succeeded"} 1.0' in text
    assert (
        'ntk_unlearn_http_requests_total{method="POST",route="/v1/forget",status="202"} 1.0' in text
    )
    # Route templates, never raw paths, label requests.
    assert 'route="/v1/jobs/{job_id}"' in text and "does-not-exist" not in text
    assert "ntk_unlearn_solve_seconds_count 1.0" in text
    assert "ntk_unlearn_solver_iterations_count 1.0" in text
    assert "ntk_unlearn_model_version 1.0" in text
    assert "ntk_unlearn_n_train 47.0" in text
    assert "ntk_unlearn_http_request_seconds_bucket" in text


def test_predictions_are_compiled_before_the_first_request(settings, unlearner):
    """Start-up compiles the prediction program (``Unlearner.warm_up``): the first request does
    not pay for it."""
    jitted = unlearner.model._jit_f_lin
    assert jitted._cache_size() == 0  # a fresh model: nothing compiled yet
    with TestClient(create_app(settings, unlearner)):
        assert jitted._cache_size() == 1


def test_a_scrape_does_not_wait_for_a_hung_redis():
    """A Redis that accepts connections and never answers (stopped, a dropped network): the
    queue gauges give up within the API client's timeout, redis_up 0, the rest NaN."""
    import socket

    from app.metrics import Metrics
    from app.queue import JobQueue
    from app.redis_client import connect_api

    with socket.socket() as silent:  # listens, never accepts nor answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        port = silent.getsockname()[1]
        queue = JobQueue(connect_api(f"redis://127.0.0.1:{port}/0", 0.3, 2.0), "hung", 60)
        metrics = Metrics(lambda: None, queue=lambda: queue)
        for _ in range(3):  # the first meets the timeout, the next the open breaker
            started = time.monotonic()
            text = metrics.render().decode()
            assert time.monotonic() - started < 1.5
            assert "ntk_unlearn_redis_up 0.0" in text and "ntk_unlearn_worker_up NaN" in text
