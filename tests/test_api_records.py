"""New records over HTTP (``POST /v1/records``) with a real Redis: an addition is a queued job like a
forget. The served model after adding records equals the linearised network trained from scratch
on the union, computed here independently (numpy float64: Jacobian features by ``jax.jacfwd`` and
the closed-form ridge for squared error, Newton in θ for cross-entropy); forgetting them again
returns to the model before; refused input (409, 422, 413, 507, 403) changes nothing."""

from __future__ import annotations

import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import redis
from fastapi.testclient import TestClient
from jax.flatten_util import ravel_pytree

from app.main import create_app
from app.service import make_worker
from service_core import Unlearner, sharding

pytestmark = pytest.mark.redis

WRITE = {"Authorization": "Bearer write-token"}
READ = {"Authorization": "Bearer read-token"}

NETWORK = """
import jax
import jax.numpy as jnp

def net():
    k1, k2 = jax.random.split(jax.random.PRNGKey(3))
    params = {"hidden": {"w": jax.random.normal(k1, (4, 6)) * 0.6, "b": jnp.full((6,), 0.1)},
              "head": {"w": jax.random.normal(k2, (6, 3)) * 0.5, "b": jnp.zeros(3)}}
    return (lambda p, x: jnp.tanh(jnp.tanh(x @ p["hidden"]["w"] + p["hidden"]["b"]) @ p["head"]["w"]
            + p["head"]["b"])), params
"""


def _oracle(x, y_onehot, x_test, lam, loss):
    """Test outputs of the network linearised at θ0 and trained on ``(x, y)`` from scratch:
    numpy float64. Features J_i = ∂f(x_i; θ0)/∂θ by ``jax.jacfwd`` (every leaf trainable);
    squared error: (JᵀJ/N + λI)Δ = Jᵀ(y − f0)/N; cross-entropy: Newton in θ to a 1e-13 gradient
    (docs/maths.md, (R) with θ_p = θ0)."""
    namespace: dict = {}
    exec(textwrap.dedent(NETWORK), namespace)
    apply_fn, params = namespace["net"]()
    with jax.experimental.enable_x64():
        params64 = jax.tree_util.tree_map(lambda a: jnp.asarray(np.asarray(a), jnp.float64), params)
        theta0, unravel = ravel_pytree(params64)

        def f(theta, xi):
            return apply_fn(unravel(theta), xi[None])[0]

        jac_fn, f_fn = jax.jit(jax.jacfwd(f)), jax.jit(f)

        def feats(xs):
            xs = jnp.asarray(np.asarray(xs, np.float64))
            return (
                np.stack([np.asarray(f_fn(theta0, xi)) for xi in xs]),
                np.stack([np.asarray(jac_fn(theta0, xi)) for xi in xs]),
            )

        f0, jac = feats(x)
        f0t, jact = feats(x_test)
    n, d, p = jac.shape
    jm = jac.reshape(n * d, p)
    if loss == "mse":
        delta = np.linalg.solve(jm.T @ jm / n + lam * np.eye(p), jm.T @ (y_onehot - f0).ravel() / n)
    else:
        delta = np.zeros(p)
        for _ in range(100):
            logits = f0 + jac @ delta
            prob = np.exp(logits - logits.max(1, keepdims=True))
            prob /= prob.sum(1, keepdims=True)
            grad = np.einsum("nap,na->p", jac, prob - y_onehot) / n + lam * delta
            w = np.einsum("na,ab->nab", prob, np.eye(d)) - np.einsum("na,nb->nab", prob, prob)
            hess = np.einsum("nap,nab,nbq->pq", jac, w, jac) / n + lam * np.eye(p)
            delta -= np.linalg.solve(hess, grad)
            if np.linalg.norm(grad) < 1e-13:
                break
    return f0t + jact @ delta


def _rel(a, b) -> float:
    return float(np.linalg.norm(np.asarray(a) - np.asarray(b)) / np.linalg.norm(np.asarray(b)))


def _add(client: TestClient, ids, x, y, status: int = 202) -> dict:
    r = client.post("/v1/records", json={"ids": ids, "x": x, "y": y}, headers=WRITE)
    assert r.status_code == status, r.text
    return r.json()


@pytest.mark.parametrize(
    ("loss", "n_base", "tol"),
    [("mse", 32, 1e-8), ("ce", 40, 1e-6)],
    ids=["mse-grows-capacity", "ce-in-free-rows"],
)
def test_added_records_equal_training_on_the_union(
    tmp_path, dataset_file, make_settings, wait_for_job, loss, n_base, tol
):
    with np.load(dataset_file) as f:
        x, y, ids = f["x"], f["y"], f["ids"]
    base = tmp_path / "base.npz"
    np.savez(base, x=x[:n_base], y=y[:n_base], ids=ids[:n_base])
    net = tmp_path / "net.py"
    net.write_text(textwrap.dedent(NETWORK))
    lam = 1e-2
    settings = make_settings(
        dataset=f"npz:{base}", model=f"{net}:net", loss=loss, lam=lam, dtype="float64",
        nystrom_rank=0,
    )  # fmt: skip
    x_test = (x[:6] + 0.2).tolist()
    with TestClient(create_app(settings)) as client:
        before = client.post("/v1/predict", json={"x": x_test}, headers=READ).json()
        capacity = client.get("/v1/model", headers=READ).json()["kernel"]["capacity"]
        # two jobs, one with its rows flattened as sent, labels as numbers
        half = n_base + (len(ids) - n_base) // 3
        jobs = [
            _add(client, ids[n_base:half].tolist(), x[n_base:half].tolist(), y[n_base:half].tolist()),
            _add(client, ids[half:].tolist(), x[half:].tolist(), y[half:].tolist()),
        ]  # fmt: skip
        done = [wait_for_job(client, j["job_id"]) for j in jobs]
        for job in done:
            assert job["status"] == "succeeded", job
            assert job["kind"] == "add" and job["ids"] == [] and len(job["id_digests"]) > 0
            assert job["receipt"] is None
            cert = job["solver"]["certificate"]
            assert cert["residual"] <= cert["tolerance"] * cert["accept_floor"]
        version = max(j["model_version"] for j in done)
        info = client.get("/v1/model", headers=READ).json()
        assert info["version"] == version and info["n_train"] == len(ids)
        assert (info["kernel"]["capacity"] > capacity) == (loss == "mse")
        out = client.post("/v1/predict", json={"x": x_test}, headers=READ).json()
        assert out["model_version"] == version
        assert sorted(client.get("/v1/ids", headers=READ).json()["ids"]) == sorted(ids.tolist())
        assert client.get("/v1/records/r47", headers=READ).json()["status"] == "active"
        r = client.get(f"/v1/jobs/{jobs[0]['job_id']}/receipt", headers=READ)
        assert r.status_code == 409 and "addition" in r.json()["detail"]
        # the log: one "add" record per version, no id in clear
        log = client.get("/v1/deletions", headers=READ).json()["deletions"]
        assert [e["kind"] for e in log] == ["add"] * len(log) and log[-1]["version"] == version
        assert all(e["id_digests"] == [] and len(e["added_digests"]) > 0 for e in log)
        assert "r4" not in (settings.data_dir / "deletions.log").read_text()

        # forgetting the added ids returns to the model trained on the first records alone
        gone = client.post("/v1/forget", json={"ids": ids[n_base:].tolist()}, headers=WRITE)
        assert wait_for_job(client, gone.json()["job_id"])["status"] == "succeeded"
        back = client.post("/v1/predict", json={"x": x_test}, headers=READ).json()

    y1 = np.eye(3)[y]
    union = _oracle(x, y1, np.asarray(x_test), lam, loss)
    rel = _rel(out["outputs"], union)
    print(f"{loss}: added {len(ids) - n_base} records: relative distance to the union's {rel:.2e}")
    assert rel < tol
    original = _oracle(x[:n_base], y1[:n_base], np.asarray(x_test), lam, loss)
    assert _rel(before["outputs"], original) < tol
    rel_back = _rel(back["outputs"], before["outputs"])
    print(f"{loss}: then forgotten: relative distance to the model before {rel_back:.2e}")
    assert rel_back < tol


def _nothing_queued(client: TestClient, settings) -> None:
    service = client.app.state.service
    assert service.queue.pending_ids() == frozenset()
    assert service.queue.client.xlen(service.queue.stream) == 0
    model = client.get("/v1/model", headers=READ).json()
    assert model["version"] == 0 and model["n_train"] == 48


@pytest.fixture
def idle(make_settings, unlearner):
    """The small model's app without a worker: accepted jobs stay queued."""
    settings = make_settings(worker=False, max_rows=4)
    with TestClient(create_app(settings, unlearner)) as client:
        yield client, settings


def test_refused_additions_change_nothing(idle, monkeypatch):
    client, settings = idle
    x1 = [[0.5, -0.5, 1.0, 2.0]]
    cases = [
        # ids active, or held by a queued job: 409, listed
        ({"ids": ["r03", "new-1"], "x": x1 * 2, "y": [0, 1]}, 409, ["r03"]),
        # bad ids
        ({"ids": [], "x": x1, "y": [0]}, 422, ["ids"]),
        ({"ids": [""], "x": x1, "y": [0]}, 422, ["non-empty"]),
        ({"ids": ["a", "a"], "x": x1 * 2, "y": [0, 0]}, 422, ["duplicated: a"]),
        # bad x / y
        ({"ids": ["a"], "x": [[0.5, True, 1.0, 2.0]], "y": [0]}, 422, ["booleans"]),
        ({"ids": ["a"], "x": [[0.5, 1.0, 2.0]], "y": [0]}, 422, ["x"]),
        ({"ids": ["a", "b"], "x": x1, "y": [0]}, 422, ["1 rows for 2 ids"]),
        ({"ids": ["a"], "x": x1, "y": [0, 1]}, 422, ["y has 2"]),
        ({"ids": ["a"], "x": x1, "y": [3]}, 422, ["class labels"]),
        ({"ids": ["a"], "x": x1, "y": [0.5]}, 422, ["class labels"]),
        ({"ids": ["a"], "x": x1}, 422, ["y"]),
        ({"ids": ["a"], "x": x1, "y": [0], "extra": 1}, 422, ["extra"]),
        # too many rows (max_rows 4)
        ({"ids": list("abcde"), "x": x1 * 5, "y": [0] * 5}, 413, ["max_rows"]),
    ]
    for body, code, words in cases:
        r = client.post("/v1/records", json=body, headers=WRITE)
        assert r.status_code == code, (body, r.text)
        assert all(w in r.json()["detail"] for w in words), (body, r.text)
        _nothing_queued(client, settings)
    for raw in (b"[[1e400, 1, 2, 3]]", b"[[NaN, 1, 2, 3]]"):  # not finite
        r = client.post(
            "/v1/records",
            content=b'{"ids": ["a"], "y": [0], "x": ' + raw + b"}",
            headers={**WRITE, "Content-Type": "application/json"},
        )
        assert r.status_code == 422 and "finite" in r.json()["detail"], r.text
    assert (
        client.post("/v1/records", json={"ids": ["a"], "x": x1, "y": [0]}, headers=READ).status_code
        == 403
    )
    _nothing_queued(client, settings)

    # K that would not fit: refused before anything is queued, naming the bytes
    monkeypatch.setattr(sharding, "device_memory_bytes", lambda device: 10_000)
    r = client.post("/v1/records", json={"ids": ["a"], "x": x1, "y": [0]}, headers=WRITE)
    assert r.status_code == 507, r.text
    assert "bytes" in r.json()["detail"] and "nothing was queued" in r.json()["detail"]
    _nothing_queued(client, settings)
    monkeypatch.undo()

    # queued: a second addition, or a forget, of the same ids is refused (409)
    accepted = _add(client, ["new-1", "new-2"], x1 * 2, [0, 1])
    again = client.post(
        "/v1/records", json={"ids": ["new-3", "new-2"], "x": x1 * 2, "y": [0, 1]}, headers=WRITE
    )
    assert again.status_code == 409 and "new-2" in again.json()["detail"]
    assert "new-3" not in again.json()["detail"]
    # a forget of an id only queued for addition: 409 (too early), not 404 (unknown)
    early = client.post("/v1/forget", json={"ids": ["r04", "new-2"]}, headers=WRITE)
    assert early.status_code == 409, early.text
    assert "queued for addition" in early.json()["detail"] and "r04" not in early.json()["detail"]
    mixed = client.post("/v1/forget", json={"ids": ["nope", "new-2"]}, headers=WRITE)
    assert mixed.status_code == 404 and "nope" in mixed.json()["detail"], mixed.text
    forget = client.post("/v1/forget", json={"ids": ["r05"]}, headers=WRITE)
    assert forget.status_code == 202
    clash = client.post("/v1/records", json={"ids": ["r05"], "x": x1, "y": [0]}, headers=WRITE)
    assert clash.status_code == 409 and "r05" in clash.json()["detail"]
    job = client.get(f"/v1/jobs/{accepted['job_id']}", headers=READ).json()
    assert job["status"] == "queued" and job["kind"] == "add" and job["ids"] == ["new-1", "new-2"]
    # the queued addition does not count against forgets: all 47 other ids may still go
    rest = [f"r{i:02d}" for i in range(48) if i != 5]
    assert client.post("/v1/forget", json={"ids": rest}, headers=WRITE).status_code == 422
    assert client.post("/v1/forget", json={"ids": rest[:-1]}, headers=WRITE).status_code == 202


def test_a_forgotten_id_comes_back_as_a_new_record(client, wait_for_job):
    x_new = [[3.0, -1.0, 0.5, 2.5]]
    first = client.post("/v1/forget", json={"ids": ["r05"]}, headers=WRITE).json()
    assert wait_for_job(client, first["job_id"])["model_version"] == 1
    status = client.get("/v1/records/r05", headers=READ).json()
    assert status["status"] == "forgotten" and status["forgotten_in_version"] == 1
    added = wait_for_job(client, _add(client, ["r05"], x_new, [2])["job_id"])
    assert added["status"] == "succeeded" and added["model_version"] == 2
    assert client.get("/v1/records/r05", headers=READ).json()["status"] == "active"
    model = client.get("/v1/model", headers=READ).json()
    assert model["n_train"] == 48 and model["n_forgotten"] == 0
    assert client.post("/v1/predict", json={"x": x_new}, headers=READ).json()["model_version"] == 2
    # forgotten again: the newest deletion answers
    again = client.post("/v1/forget", json={"ids": ["r05"]}, headers=WRITE).json()
    assert wait_for_job(client, again["job_id"])["model_version"] == 3
    status = client.get("/v1/records/r05", headers=READ).json()
    assert status["status"] == "forgotten" and status["forgotten_in_version"] == 3
    assert status["job_id"] == again["job_id"]
    log = client.get("/v1/deletions", headers=READ).json()["deletions"]
    assert [e.get("kind", "forget") for e in log] == ["forget", "add", "forget"]


def test_a_forgotten_id_queued_to_come_back_is_not_said_forgotten(client, wait_for_job):
    """Forgotten, then queued for addition: a forget of it is 409 "queued for addition" (too
    early, as for a new id), not "already forgotten" just before it is active again."""
    first = client.post("/v1/forget", json={"ids": ["r06"]}, headers=WRITE).json()
    assert wait_for_job(client, first["job_id"])["model_version"] == 1
    client.app.state.service.worker.stop()  # the addition stays queued
    _add(client, ["r06"], [[3.0, -1.0, 0.5, 2.5]], [2])
    r = client.post("/v1/forget", json={"ids": ["r06"]}, headers=WRITE)
    assert r.status_code == 409 and "queued for addition" in r.json()["detail"], r.text
    # forgotten and not coming back: as before
    second = client.post("/v1/forget", json={"ids": ["r07"]}, headers=WRITE)
    assert second.status_code == 202, second.text
    r = client.post("/v1/forget", json={"ids": ["r01", "r07"]}, headers=WRITE)
    assert r.status_code == 409 and "already forgotten or queued to be forgotten: r07" in r.text


def test_an_id_holding_a_slash_is_looked_up(client, wait_for_job):
    """Ids are any non-empty text: one holding "/" can be added, so it can be looked up (its
    lookup was the router's bare 404), escaped or not."""
    added = wait_for_job(client, _add(client, ["grp/1"], [[3.0, -1.0, 0.5, 2.5]], [2])["job_id"])
    assert added["status"] == "succeeded"
    for path in ("/v1/records/grp%2F1", "/v1/records/grp/1"):
        r = client.get(path, headers=READ)
        assert r.status_code == 200 and r.json()["status"] == "active", (path, r.text)
    assert client.get("/v1/records/grp/2", headers=READ).json()["status"] == "unknown"


def test_a_retried_addition_with_its_idempotency_key_is_applied_once(
    client, wait_for_job, monkeypatch
):
    """The enqueue commits but its reply is lost (a Redis timeout after the script ran): the
    client gets a 503 and no job id; its retry with the same key gets that job, and the
    records are added once. The same key with another body, or on POST /v1/forget, is a 409."""
    queue = client.app.state.service.queue
    x_new = [[0.5, -0.5, 1.0, 2.0], [1.5, 0.5, -1.0, 0.0]]
    body = {"ids": ["new-1", "new-2"], "x": x_new, "y": [0, 2], "idempotency_key": "add-1"}
    script, committed = queue._enqueue_add, []

    def commit_then_lose_the_reply(*args, **kwargs):
        committed.append(script(*args, **kwargs))
        raise redis.TimeoutError("Timeout reading from socket")

    monkeypatch.setattr(queue, "_enqueue_add", commit_then_lose_the_reply)
    r = client.post("/v1/records", json=body, headers=WRITE)
    assert r.status_code == 503 and "Retry-After" in r.headers, r.text
    monkeypatch.undo()
    assert [outcome for outcome, _ in committed] == ["queued"]
    job_id = committed[0][1]
    # the same values written otherwise (2 for 2.0) are the same request
    same = {**body, "x": [[0.5, -0.5, 1, 2], [1.5, 0.5, -1, 0]]}
    for retry in (body, same):
        r = client.post("/v1/records", json=retry, headers=WRITE)
        assert r.status_code == 202 and r.json()["job_id"] == job_id, r.text
        assert r.json()["kind"] == "add"
    refused = [
        ("/v1/records", {**body, "y": [1, 2]}, "other records"),
        ("/v1/records", {**body, "ids": ["new-1", "new-3"]}, "other records"),
        ("/v1/forget", {"ids": ["r01"], "idempotency_key": "add-1"}, "POST /v1/records"),
    ]
    for path, other, words in refused:
        r = client.post(path, json=other, headers=WRITE)
        assert r.status_code == 409, (other, r.text)
        assert "idempotency_key" in r.json()["detail"] and words in r.json()["detail"], r.text
    done = wait_for_job(client, job_id)
    assert done["status"] == "succeeded" and done["model_version"] == 1, done
    # replayed after it succeeded: the same job, not a 409 for ids now active
    late = client.post("/v1/records", json=body, headers=WRITE)
    assert late.status_code == 202, late.text
    assert late.json()["job_id"] == job_id and late.json()["status"] == "succeeded"
    forget_key = client.post(
        "/v1/forget", json={"ids": ["r01"], "idempotency_key": "f-1"}, headers=WRITE
    )
    assert forget_key.status_code == 202, forget_key.text
    r = client.post("/v1/records", json={**body, "idempotency_key": "f-1"}, headers=WRITE)
    assert r.status_code == 409 and "POST /v1/forget" in r.json()["detail"], r.text
    assert wait_for_job(client, forget_key.json()["job_id"])["model_version"] == 2
    # applied once: one addition in the log, each new id once among the served ids
    model = client.get("/v1/model", headers=READ).json()
    assert model["version"] == 2 and model["n_train"] == 48 + 2 - 1
    served = client.get("/v1/ids", params={"limit": 100}, headers=READ).json()["ids"]
    assert sorted(served) == sorted([f"r{i:02d}" for i in range(2, 48)] + ["r00", "new-1", "new-2"])
    log = client.get("/v1/deletions", headers=READ).json()["deletions"]
    assert [e.get("kind", "forget") for e in log] == ["add", "forget"]
    assert log[0]["n_added"] == 2


def test_a_follower_serves_an_addition_like_the_worker(
    make_settings, base_checkpoint, dataset_file
):
    """An API process without a worker follows the addition's checkpoint (the new K blocks
    computed, the rest kept) and serves what the worker serves."""
    settings = make_settings(worker=False, follow_wait_s=60)
    with TestClient(create_app(settings, Unlearner.restore(base_checkpoint))) as client:
        state = client.app.state.service
        model = Unlearner.restore(base_checkpoint)
        model.use_id_key(state.keys.id_secret)
        worker = make_worker(state.settings, model, state.queue, None)
        worker.recover()
        with np.load(dataset_file) as f:
            x_new = (f["x"][:20] * 0.9 + 0.3).tolist()
        forget = client.post("/v1/forget", json={"ids": ["r01", "r02"]}, headers=WRITE).json()
        new = [f"a-longer-record-id-{i:04d}" for i in range(20)]  # longer than any id before
        job = _add(client, new, x_new, [i % 3 for i in range(20)])
        worker.run_once()  # one forget, one addition (K grows): versions 1 and 2
        for j in (forget, job):
            assert (
                client.get(f"/v1/jobs/{j['job_id']}", headers=READ).json()["status"] == "succeeded"
            )
        out = client.post("/v1/predict", json={"x": x_new[:5]}, headers=READ).json()
        assert out["model_version"] == 2
        np.testing.assert_allclose(out["outputs"], model.predict(np.asarray(x_new[:5])), rtol=1e-10)
        followed = state.unlearner.state
        np.testing.assert_allclose(
            np.asarray(followed.k), np.asarray(model.state.k), rtol=1e-10, atol=1e-12
        )
        assert followed.ids.tolist() == model.state.ids.tolist()
        served = client.get("/v1/ids", headers=READ).json()["ids"]
        assert set(new) <= set(served) and len(served) == 66


def test_an_addition_that_no_longer_fits_fails_and_changes_nothing(idle, monkeypatch, x_probe_new):
    """Admitted at enqueue, refused by the worker's own memory check before any work: the job
    fails naming the bytes, the model and its checkpoints stay as they were."""
    client, settings = idle
    state = client.app.state.service
    before = client.post("/v1/predict", json={"x": x_probe_new}, headers=READ).json()
    job = _add(client, ["new-1", "new-2"], x_probe_new[:2], [0, 1])
    monkeypatch.setattr(sharding, "device_memory_bytes", lambda device: 10_000)
    make_worker(settings, state.unlearner, state.queue, None).run_once()
    monkeypatch.undo()
    done = client.get(f"/v1/jobs/{job['job_id']}", headers=READ).json()
    assert done["status"] == "failed" and "bytes" in done["error"], done
    assert done["ids"] == [] and len(done["id_digests"]) == 2
    _nothing_queued(client, settings)
    assert client.post("/v1/predict", json={"x": x_probe_new}, headers=READ).json() == before
    assert not any(p.name.isdigit() and p.name != "0" for p in settings.checkpoint_dir.glob("*"))


@pytest.fixture
def x_probe_new() -> list[list[float]]:
    return [[0.5, -0.5, 1.0, 2.0], [1.5, 0.5, -1.0, 0.0], [2.0, 2.0, 2.0, 2.0]]
