"""POST /v1/attribute and GET /v1/self-influence over a real app with its worker and a real Redis."""

from __future__ import annotations

import math
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from app.main import create_app

pytestmark = pytest.mark.redis

WRITE = {"Authorization": "Bearer write-token"}
READ = {"Authorization": "Bearer read-token"}


@pytest.fixture
def probe(dataset_file: Path) -> dict:
    with np.load(dataset_file) as f:
        return {"x": f["x"][:3].tolist(), "y": f["y"][:3].tolist()}


def _all_self_influence(client: TestClient) -> dict:
    first = client.get("/v1/self-influence?limit=20", headers=READ).json()
    records = list(first["records"])
    while len(records) < first["total"]:
        page = client.get(f"/v1/self-influence?offset={len(records)}&limit=20", headers=READ)
        assert page.status_code == 200, page.text
        records += page.json()["records"]
    return {**first, "records": records}


def test_attribute_answers_for_the_current_version(client, probe):
    r = client.post("/v1/attribute", json={**probe, "k": 5}, headers=READ)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model_version"] == 0 and body["exact"] is False  # cross-entropy: the step
    assert len(body["results"]) == 3
    ids = set(client.get("/v1/ids?limit=100", headers=READ).json()["ids"])
    for row in body["results"]:
        assert 1 <= len(row["helpful"]) <= 5 and 1 <= len(row["harmful"]) <= 5
        helpful = [e["delta_loss"] for e in row["helpful"]]
        harmful = [e["delta_loss"] for e in row["harmful"]]
        assert all(v > 0 for v in helpful) and helpful == sorted(helpful, reverse=True)
        assert all(v < 0 for v in harmful) and harmful == sorted(harmful)
        assert {e["id"] for e in row["helpful"] + row["harmful"]} <= ids
        assert all(len(e["delta_outputs"]) == 3 for e in row["helpful"])
    refined = client.post("/v1/attribute", json={**probe, "k": 2, "exact": True}, headers=READ)
    assert refined.status_code == 200, refined.text
    assert refined.json()["exact"] is True
    by_output = client.post("/v1/attribute", json={**probe, "k": 2, "of": "output"}, headers=READ)
    assert by_output.status_code == 200, by_output.text


def test_self_influence_pages_sorted_descending(client):
    body = _all_self_influence(client)
    assert body["model_version"] == 0 and body["total"] == 48
    values = [r["self_influence"] for r in body["records"]]
    assert values == sorted(values, reverse=True)
    assert len({r["id"] for r in body["records"]}) == 48
    assert values[0] > 0  # a record's own loss rises without it


def test_a_forgotten_record_never_appears(client, probe, wait_for_job):
    before = _all_self_influence(client)
    top = before["records"][0]["id"]
    r = client.post("/v1/forget", json={"ids": [top, "r07"]}, headers=WRITE)
    assert r.status_code == 202, r.text
    assert wait_for_job(client, r.json()["job_id"])["status"] == "succeeded"
    after = _all_self_influence(client)
    assert after["model_version"] == 1 and after["total"] == 46
    assert not {top, "r07"} & {rec["id"] for rec in after["records"]}
    body = client.post("/v1/attribute", json={**probe, "k": 46}, headers=READ).json()
    assert body["model_version"] == 1
    seen = {e["id"] for row in body["results"] for e in row["helpful"] + row["harmful"]}
    assert seen and not {top, "r07"} & seen
    r = client.post("/v1/attribute", json={**probe, "k": 47}, headers=READ)
    assert r.status_code == 422 and "from 1 to 46" in r.json()["detail"]


@pytest.mark.parametrize("path", ["attribute", "self-influence"])
def test_a_record_forgotten_while_the_answer_is_computed_is_never_named(
    client, probe, wait_for_job, monkeypatch, path
):
    """A forget that succeeds while an attribution (or self-influence) is computed on the
    version before it: the answer, which names the forgotten record, is not sent (503, retry);
    the retry answers from the new version without it. A tester's exact attribution named a
    record 2 s after its job succeeded."""
    u = client.app.state.service.unlearner
    method = "attribute" if path == "attribute" else "self_influence"
    real, forgot = getattr(u, method), []

    def forget_meanwhile(*args, **kwargs):
        result = real(*args, **kwargs)
        if not forgot:  # the first answer's leading record: forgotten before it is sent
            top = str(result.helpful_ids[0][0] if method == "attribute" else result.ids[0])
            r = client.post("/v1/forget", json={"ids": [top]}, headers=WRITE)
            assert r.status_code == 202, r.text
            assert wait_for_job(client, r.json()["job_id"])["status"] == "succeeded"
            forgot.append(top)
        return result

    monkeypatch.setattr(u, method, forget_meanwhile)

    def ask():
        if path == "attribute":
            return client.post("/v1/attribute", json={**probe, "k": 3}, headers=READ)
        return client.get("/v1/self-influence?limit=5", headers=READ)

    r = ask()
    assert r.status_code == 503 and r.headers["Retry-After"], r.text
    assert "(version 0, now 1)" in r.text and "1 record(s) it names were forgotten" in r.text
    r = ask()
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model_version"] == 1
    if path == "attribute":
        named = {e["id"] for row in body["results"] for e in row["helpful"] + row["harmful"]}
    else:
        named = {e["id"] for e in body["records"]}
    assert named and forgot[0] not in named


def test_an_answer_computed_before_a_forget_that_names_none_of_its_records_is_sent(
    client, probe, wait_for_job, monkeypatch
):
    """The version changed while it was computed, but every record it names is still active: it
    is sent as computed, saying its version."""
    u = client.app.state.service.unlearner
    real = u.attribute

    def forget_meanwhile(*args, **kwargs):
        result = real(*args, **kwargs)
        named = {str(i) for part in (result.helpful_ids, result.harmful_ids) for i in part.ravel()}
        other = next(i for i in sorted(u.state.index) if i not in named)
        r = client.post("/v1/forget", json={"ids": [other]}, headers=WRITE)
        assert wait_for_job(client, r.json()["job_id"])["status"] == "succeeded"
        return result

    monkeypatch.setattr(u, "attribute", forget_meanwhile)
    r = client.post("/v1/attribute", json={**probe, "k": 2}, headers=READ)
    assert r.status_code == 200, r.text
    assert r.json()["model_version"] == 0
    assert client.get("/v1/model", headers=READ).json()["version"] == 1


def test_an_overflowing_attribution_is_422_not_null(client, probe, monkeypatch):
    """A change of loss that is not a number (a tester's target of 1.7e308 on a regression model,
    now refused as a target) is a 422 saying so, never ``"delta_loss": null``."""
    u = client.app.state.service.unlearner
    real = u.attribute

    def overflowing(*args, **kwargs):
        a = real(*args, **kwargs)
        huge = a.helpful._replace(delta_loss=a.helpful.delta_loss * np.inf)
        return a._replace(helpful=huge)

    monkeypatch.setattr(u, "attribute", overflowing)
    r = client.post("/v1/attribute", json={**probe, "k": 2}, headers=READ)
    assert r.status_code == 422, r.text
    assert "overflows" in r.json()["detail"] and "null" not in r.text


def test_an_attribution_of_more_than_max_attributed_records_is_413(client, probe, monkeypatch):
    """rows × k is bounded (200 rows of k = N made an 87 MB answer): 413 saying both."""
    from app.api.routes import attribution as route

    monkeypatch.setattr(route, "MAX_ATTRIBUTED", 10)
    r = client.post("/v1/attribute", json={**probe, "k": 4}, headers=READ)  # 3 rows × 4
    assert r.status_code == 413, r.text
    assert "x has 3 rows and k is 4: 12 records per side" in r.json()["detail"]
    r = client.post("/v1/attribute", json={**probe, "k": 3}, headers=READ)  # 9
    assert r.status_code == 200, r.text
    monkeypatch.setattr(route, "MAX_ATTRIBUTED", 200)
    r = client.post("/v1/attribute", json={**probe, "k": 5000}, headers=READ)  # k over N = 48
    assert r.status_code == 422 and "from 1 to 48" in r.json()["detail"], r.text


@pytest.mark.parametrize(
    "change,fragment",
    [
        ({"k": 0}, "from 1 to 48"),
        ({"k": 49}, "from 1 to 48"),
        ({"k": -3}, "from 1 to 48"),
        ({"of": "gradient"}, "of"),
        ({"y": [0, 1, 7]}, "class labels"),
        ({"y": [0, 1]}, "y has 2 entries"),
        ({"x": [[1.0, 2.0]] * 3}, "x rows have shape"),
        ({"exact": "maybe"}, "exact"),
        # numbers mean numbers, booleans booleans (these were coerced: "yes" started an exact run)
        ({"k": "2"}, "k"),
        ({"k": True}, "k"),
        ({"k": 2.0}, "k"),
        ({"exact": "yes"}, "exact"),
        ({"exact": 1}, "exact"),
    ],
)
def test_bad_attribution_requests_are_422(client, probe, change, fragment):
    r = client.post("/v1/attribute", json={**probe, **change}, headers=READ)
    assert r.status_code == 422, r.text
    assert fragment in r.json()["detail"]
    assert client.get("/v1/model", headers=READ).json()["version"] == 0


def test_exact_self_influence_refines_the_page(make_settings, unlearner):
    """exact=true on a cross-entropy model: the first offset + limit records refined to exact
    retraining (the engine's values: tests/test_attribution.py checks them against brute force),
    within max_exact_self_influence."""
    with TestClient(create_app(make_settings(max_exact_self_influence=4), unlearner)) as client:
        step = client.get("/v1/self-influence?limit=4", headers=READ).json()
        assert step["exact"] is False
        r = client.get("/v1/self-influence?limit=4&exact=true", headers=READ)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["exact"] is True and body["total"] == step["total"]
        expected = unlearner.self_influence(exact=True, top=4)
        assert [e["id"] for e in body["records"]] == list(expected.ids[:4])
        np.testing.assert_allclose(
            [e["self_influence"] for e in body["records"]], expected.self_influence[:4], rtol=1e-12
        )
        assert {e["id"] for e in body["records"]} == {e["id"] for e in step["records"]}
        r = client.get("/v1/self-influence?offset=2&limit=3&exact=true", headers=READ)
        assert r.status_code == 422 and "--max-exact-self-influence" in r.json()["detail"]
        # One exact=true request at a time per process: another gets 503 with Retry-After (the
        # influence-step ranking is still served meanwhile).
        from app.api.routes import attribution as route

        with route._EXACT_REFINING:
            busy = client.get("/v1/self-influence?limit=1&exact=true", headers=READ)
            assert busy.status_code == 503 and int(busy.headers["Retry-After"]) >= 1
            assert "with exact=true (attribution or self-influence) is running" in busy.text
            assert client.get("/v1/self-influence?limit=1", headers=READ).status_code == 200
        assert client.get("/v1/self-influence?limit=1&exact=true", headers=READ).status_code == 200
        assert client.get("/v1/model", headers=READ).json()["version"] == 0


def test_exact_attribution_is_capped_and_one_at_a_time(make_settings, unlearner, probe):
    """exact=true on a cross-entropy model refines at most max_exact_attribution records (the
    distinct leading 2k per side over every row; more: 422 before any solve, and before the
    factorisation when one row, min(4k, N), is already over it), and shares the
    one-at-a-time lock of exact self-influence (503 with Retry-After while another runs)."""
    from app.api.routes import attribution as route

    one = {"x": probe["x"][:1], "y": probe["y"][:1]}
    settings = make_settings(max_exact_attribution=3)
    with TestClient(create_app(settings, unlearner)) as client:
        # k = 1: top 2 and bottom 2 of one row, 4 distinct: refused before the factorisation
        # and the lock (a helper waited 49 s for this 422 when only one side was counted)
        with route._EXACT_REFINING:
            r = client.post("/v1/attribute", json={**one, "k": 1, "exact": True}, headers=READ)
        assert r.status_code == 422, r.text
        assert "would refine at least 4" in r.text and "at most 3" in r.text
        assert "at most 3 here (--max-exact-attribution)" in r.json()["detail"]  # the flag
        assert unlearner._loo._entry is None  # no factorisation was made for it
        r = client.post("/v1/attribute", json={**one, "k": 1, "exact": False}, headers=READ)
        assert r.status_code == 200, r.text  # the influence step refines nothing: no limit
    # k = 1: the leading 2 per side, at most 4 distinct records
    with TestClient(create_app(make_settings(max_exact_attribution=4), unlearner)) as client:
        with route._EXACT_REFINING:
            r = client.post("/v1/attribute", json={**one, "k": 1, "exact": True}, headers=READ)
            assert r.status_code == 503 and int(r.headers["Retry-After"]) >= 1, r.text
            r = client.get("/v1/self-influence?limit=1&exact=true", headers=READ)
            assert r.status_code == 503, r.text
        r = client.post("/v1/attribute", json={**one, "k": 1, "exact": True}, headers=READ)
        assert r.status_code == 200 and r.json()["exact"] is True, r.text
        # rows of k = 1, each 4 (within 4), together more: refused once they are known
        rows = {"x": probe["x"][:6], "y": probe["y"][:6]}
        r = client.post("/v1/attribute", json={**rows, "k": 1, "exact": True}, headers=READ)
        assert r.status_code == 422, r.text
        assert "would refine" in r.text and "records (the distinct leading 2" in r.text
        assert "at most 4 here (--max-exact-attribution)" in r.json()["detail"]


def _exact_request(client: TestClient, probe: dict, path: str):
    """An exact=true request that refines several records: attribution (k = 3, one row: up to 12)
    or self-influence (the first 10)."""
    if path == "attribute":
        one = {"x": probe["x"][:1], "y": probe["y"][:1], "k": 3, "exact": True}
        return client.post("/v1/attribute", json=one, headers=READ)
    return client.get("/v1/self-influence?limit=10&exact=true", headers=READ)


@pytest.mark.parametrize("path", ["attribute", "self-influence"])
def test_exact_refinements_stop_when_the_shutdown_begins(
    make_settings, unlearner, probe, monkeypatch, path
):
    """SIGTERM (the shutdown's flag) during an exact=true request's refinements: it stops after
    the record being refined and is answered 503 with Retry-After, instead of holding the
    shutdown for every refinement left (a fresh user's waited 163 s)."""
    from service_core import attribution

    solving, release, solves = threading.Event(), threading.Event(), []
    real = attribution.deletion_step

    def held(*args, **kwargs):
        solves.append(1)
        solving.set()
        assert release.wait(60)
        return real(*args, **kwargs)

    monkeypatch.setattr(attribution, "deletion_step", held)
    app = create_app(make_settings(max_exact_attribution=40), unlearner)
    with TestClient(app) as client:
        client.post("/v1/attribute", json={**probe, "k": 1}, headers=READ)  # factor first
        ask = partial(_exact_request, client, probe, path)
        with ThreadPoolExecutor(1) as pool:
            answer = pool.submit(ask)
            assert solving.wait(60)
            app.state.service.draining.begin()
            time.sleep(0.6)  # the request's watcher looks every 0.25 s
            release.set()
            r = answer.result(60)
    assert r.status_code == 503 and "shutting down" in r.text and r.headers["Retry-After"]
    assert len(solves) == 1, len(solves)  # of up to 10 (self-influence) or 12 (attribution)


@pytest.mark.parametrize("path", ["attribute", "self-influence"])
def test_a_turned_away_exact_request_is_told_how_long_the_running_one_needs(
    make_settings, unlearner, probe, monkeypatch, caplog, path
):
    """While an exact=true request refines, each refinement is logged with its count, and a
    second exact request's 503 carries a Retry-After of the first's remaining refinements at its
    pace so far (it said 2 s whatever was left; a digits request of k = 10 takes minutes)."""
    from service_core import attribution

    solving, release, calls = threading.Event(), threading.Event(), []
    real = attribution.deletion_step

    def slow(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            time.sleep(1.5)  # the first refinement takes 1.5 s
        else:
            solving.set()
            assert release.wait(60)
        return real(*args, **kwargs)

    monkeypatch.setattr(attribution, "deletion_step", slow)
    # a slow factorisation (a cold one took 70 s) before the refinements: not their pace
    real_factor, slow_factor = attribution.factor, threading.Event()

    def factor(*args, **kwargs):
        if slow_factor.is_set():
            time.sleep(3.0)
        return real_factor(*args, **kwargs)

    monkeypatch.setattr(attribution, "factor", factor)
    caplog.set_level("INFO", logger="app.api.routes.attribution")
    app = create_app(make_settings(max_exact_attribution=40), unlearner)
    with TestClient(app) as client:
        client.post("/v1/attribute", json={**probe, "k": 1}, headers=READ)  # factor first
        slow_factor.set()
        ask = partial(_exact_request, client, probe, path)
        with ThreadPoolExecutor(1) as pool:
            first = pool.submit(ask)
            assert solving.wait(60)  # one refinement done, the second running
            busy = client.get("/v1/self-influence?limit=1&exact=true", headers=READ)
            release.set()
            assert first.result(60).status_code == 200
    total = int(busy.json()["detail"].split("refined 1 of ")[1].split()[0])
    assert busy.status_code == 503 and total >= 2, busy.text
    # (total - 1) refinements left at ≥ 1.5 s each, measured: not the flat 2 s
    wait = int(busy.headers["Retry-After"])
    assert wait >= math.floor((total - 1) * 1.5), (wait, total)
    # ... and not the 3 s before them: they said ≥ 4.5 s each
    assert wait < (total - 1) * 3.0 + 2, (wait, total)
    assert f"about {wait} s left" in busy.text
    what = "exact attribution" if path == "attribute" else "exact self-influence"
    logged = [m for m in caplog.messages if m.startswith(f"{what}: refined ")]
    assert logged[0].startswith(f"{what}: refined 1 of {total} record(s)"), logged
    ranked = [m for m in caplog.messages if m.startswith(f"{what}: ranked in ")]
    assert ranked and float(ranked[-1].split("ranked in ")[1].split()[0]) >= 3.0, ranked
    assert len(logged) == total, logged


def test_attribution_limits_and_auth(make_settings, unlearner, probe):
    with TestClient(create_app(make_settings(max_rows=2), unlearner)) as client:
        r = client.post("/v1/attribute", json=probe, headers=READ)
        assert r.status_code == 413 and "max_rows" in r.json()["detail"]
        assert client.post("/v1/attribute", json=probe).status_code == 401
        assert client.get("/v1/self-influence").status_code == 401
        r = client.get("/v1/self-influence?limit=0", headers=READ)
        assert r.status_code == 422 and "limit" in r.json()["detail"]
        assert client.get("/v1/model", headers=READ).json()["version"] == 0


@pytest.fixture
def held_factorisation(monkeypatch) -> tuple[threading.Event, threading.Event]:
    """The leave-one-out factorisation waits, once begun (``started``), until ``release`` is set:
    requests pile up behind a cold factorisation for as long as a test needs."""
    from service_core import attribution

    release, started = threading.Event(), threading.Event()
    real = attribution._factor_of

    def held(state):
        started.set()
        assert release.wait(120)
        return real(state)

    monkeypatch.setattr(attribution, "_factor_of", held)
    return started, release


def test_many_requests_waiting_for_a_cold_factorisation_leave_predictions_served(
    client, probe, held_factorisation
):
    """45 attribution and self-influence requests wait on one cold leave-one-out factorisation
    (held here until released): they wait without taking the threads predictions use (40 in
    anyio's default pool, which they filled before: a prediction then waited for the whole
    factorisation), and all answer once it is done."""
    started, release = held_factorisation
    answers: list[int] = []

    def ask(i: int) -> None:
        if i % 3:
            r = client.post("/v1/attribute", json={**probe, "k": 2}, headers=READ)
        else:
            r = client.get("/v1/self-influence?limit=5", headers=READ)
        answers.append(r.status_code)

    with ThreadPoolExecutor(45) as pool:
        futures = [pool.submit(ask, i) for i in range(45)]
        try:
            assert started.wait(60)
            time.sleep(0.5)  # the others have arrived and wait
            predicted = ThreadPoolExecutor(1).submit(
                client.post, "/v1/predict", json={"x": probe["x"]}, headers=READ
            )
            r = predicted.result(timeout=60)  # before the factorisation is released
            assert r.status_code == 200, r.text
            assert not answers  # they were all still waiting
        finally:
            release.set()
        for f in futures:
            f.result(timeout=300)
    assert answers == [200] * 45


def test_a_second_exact_self_influence_is_told_503_at_once_while_threads_are_busy(
    client, probe, held_factorisation
):
    """One exact=true self-influence runs at a time; another is told 503 at once, not after
    waiting for an attribution thread (both taken here by requests held at a cold
    factorisation)."""
    started, release = held_factorisation
    with ThreadPoolExecutor(3) as pool:
        first = pool.submit(client.get, "/v1/self-influence?limit=2&exact=true", headers=READ)
        other = pool.submit(client.post, "/v1/attribute", json={**probe, "k": 2}, headers=READ)
        try:
            assert started.wait(60)
            time.sleep(0.5)  # both attribution threads are taken
            second = pool.submit(
                client.get, "/v1/self-influence?limit=2&exact=true", headers=READ
            ).result(timeout=30)  # before the factorisation is released
            assert second.status_code == 503, second.text
            assert "retry" in second.json()["detail"] and "Retry-After" in second.headers
        finally:
            release.set()
        assert first.result(timeout=300).status_code == 200
        assert other.result(timeout=300).status_code == 200
