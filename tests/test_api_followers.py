"""API processes without a worker (``serve --no-worker``): never an answer from a version older
than the newest the worker reported, and forgets admitted against the queue's view.

In-process here (the follower's app with a ``TestClient``, the worker of "another process" as a
second model on the same data dir and Redis); ``test_api_scale_out`` runs real processes.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from app.deletion_log import DeletionLog
from app.main import create_app
from app.queue import StaleModelError
from app.receipts import DeploymentKeys
from app.service import ModelFollower, load_model, make_worker
from service_core import Unlearner, checkpoint

pytestmark = pytest.mark.redis

WRITE = {"Authorization": "Bearer write-token"}
READ = {"Authorization": "Bearer read-token"}


@pytest.fixture
def x_probe(dataset_file: Path) -> list[list[float]]:
    with np.load(dataset_file) as f:
        return f["x"][:5].tolist()


@pytest.fixture
def follower_app(make_settings, base_checkpoint: Path, monkeypatch) -> Iterator[TestClient]:
    """An API without a worker whose follower thread never polls by itself: only a request that
    finds it behind makes it follow (so a test sees what a request alone guarantees)."""
    monkeypatch.setattr(ModelFollower, "__init__", _never_polls(ModelFollower.__init__))
    # A generous wait: these tests are about what is served, not how fast (a loaded CI machine).
    settings = make_settings(worker=False, follow_wait_s=60)
    app = create_app(settings, Unlearner.restore(base_checkpoint))
    with TestClient(app) as client:
        yield client


def _never_polls(init):
    def patched(self, state, wait_s=2.0, interval_s=1.0, **kwargs):
        init(self, state, wait_s=wait_s, interval_s=3600.0, **kwargs)

    return patched


def _other_worker(client: TestClient, base_checkpoint: Path):
    """The worker of another process: its own copy of version 0, the same data dir and Redis."""
    state = client.app.state.service
    model = Unlearner.restore(base_checkpoint)
    model.use_id_key(state.keys.id_secret)  # the data dir's secret, as a real worker's
    return model, make_worker(state.settings, model, state.queue, None)


def test_reads_after_a_reported_deletion_never_come_from_an_older_version(
    follower_app, base_checkpoint, x_probe
):
    client = follower_app
    model, worker = _other_worker(client, base_checkpoint)
    worker.recover()
    job = client.post("/v1/forget", json={"ids": ["r09"]}, headers=WRITE).json()
    worker.run_once()
    assert client.get(f"/v1/jobs/{job['job_id']}", headers=READ).json()["status"] == "succeeded"
    assert client.app.state.service.unlearner.version == 0  # nothing polled meanwhile

    # The first read after the job's success is from version 1, identical to the worker's.
    out = client.post("/v1/predict", json={"x": x_probe}, headers=READ).json()
    assert out["model_version"] == 1
    np.testing.assert_allclose(out["outputs"], model.predict(np.asarray(x_probe)), rtol=1e-10)
    assert "r09" not in client.get("/v1/ids", headers=READ).json()["ids"]
    assert client.get("/v1/model", headers=READ).json()["version"] == 1


def test_a_re_forget_through_a_lagging_process_is_409(follower_app, base_checkpoint):
    client = follower_app
    _, worker = _other_worker(client, base_checkpoint)
    worker.recover()
    client.post("/v1/forget", json={"ids": ["r10"]}, headers=WRITE)
    worker.run_once()
    assert client.app.state.service.unlearner.version == 0
    # Without the version check this model (version 0, r10 active) and the queued set (r10
    # released) would both admit it.
    again = client.post("/v1/forget", json={"ids": ["r10"]}, headers=WRITE)
    assert again.status_code == 409, again.text
    assert "r10" in again.json()["detail"]


def test_enqueue_refuses_a_model_older_than_the_reported_version(follower_app, base_checkpoint):
    client = follower_app
    model, worker = _other_worker(client, base_checkpoint)
    worker.recover()
    queue = client.app.state.service.queue
    assert queue.reported_version() == 0
    client.post("/v1/forget", json={"ids": ["r11"]}, headers=WRITE)
    worker.run_once()
    assert queue.reported_version() == model.version == 1
    with pytest.raises(StaleModelError) as caught:
        queue.enqueue(["r12"], n_train=47, version=0)
    assert caught.value.version == 1
    assert "r12" not in queue.pending_ids()
    assert queue.enqueue(["r12"], n_train=47, version=1).status == "queued"


def test_a_process_that_cannot_follow_in_time_answers_503(make_settings, base_checkpoint):
    """A version reported that this process cannot load (here: never checkpointed) is waited
    for at most follow_wait_s, then 503 with Retry-After; nothing is served from version 0."""
    settings = make_settings(worker=False, follow_wait_s=0.3)
    app = create_app(settings, Unlearner.restore(base_checkpoint))
    with TestClient(app) as client:
        queue = app.state.service.queue
        queue.client.set(queue.version_key, 5)
        for method, path, body in [
            ("GET", "/v1/ids", None),
            ("POST", "/v1/forget", {"ids": ["r01"]}),
        ]:
            started = time.monotonic()
            r = client.request(method, path, json=body, headers=WRITE)
            waited = time.monotonic() - started
            assert r.status_code == 503, r.text
            assert int(r.headers["Retry-After"]) >= 1
            assert "version 0" in r.json()["detail"] and "version 5" in r.json()["detail"]
            assert 0.3 <= waited < 3, waited
        assert "r01" not in queue.pending_ids()
        queue.client.set(queue.version_key, 0)
        assert client.get("/v1/ids", headers=READ).status_code == 200


def test_readiness_says_when_a_follower_cannot_follow(
    make_settings, base_checkpoint, monkeypatch, caplog
):
    """A follower that cannot load the reported version: /readyz stays 200 for the first
    follow_wait_s (a hand-over), then 503 naming both versions and the last failure; 200 again
    once it serves the version. The same failure, met every round (20 a second), is logged
    once, not every round."""
    caplog.set_level(logging.INFO, logger="app.service")
    settings = make_settings(worker=False, follow_wait_s=0.5)
    app = create_app(settings, Unlearner.restore(base_checkpoint))
    with TestClient(app) as client:
        state = app.state.service
        model, worker = _other_worker(client, base_checkpoint)
        worker.recover()
        real_read = Unlearner.read_newer
        failing = {"on": True}
        tries: list[float] = []

        def read_newer(self, directory, reader=None):
            if failing["on"]:
                tries.append(time.monotonic())
                raise OSError(13, "Permission denied", str(directory))
            return real_read(self, directory, reader)

        monkeypatch.setattr(Unlearner, "read_newer", read_newer)
        client.post("/v1/forget", json={"ids": ["r04"]}, headers=WRITE)
        worker.run_once()
        assert state.queue.reported_version() == 1 and state.unlearner.version == 0
        first = client.get("/readyz")
        assert first.status_code == 200, first.text  # behind for less than follow_wait_s
        deadline = time.monotonic() + 30
        r = first
        while r.status_code == 200 and time.monotonic() < deadline:
            time.sleep(0.1)
            r = client.get("/readyz")
        assert r.status_code == 503, r.text
        detail = r.json()["detail"]
        assert "serves model version 0" in detail and "version 1" in detail, detail
        assert "Permission denied" in detail, detail
        assert int(r.headers["Retry-After"]) >= 1
        metrics = client.get("/metrics").text
        behind = float(metrics.split("\nntk_unlearn_follower_behind_seconds ")[1].split()[0])
        assert behind > 0.5, behind
        # a model request says why it gets 503, not only "still loading"
        r = client.get("/v1/ids", headers=READ)
        assert r.status_code == 503 and "cannot load version 1" in r.json()["detail"], r.text
        assert "Permission denied" in r.json()["detail"]
        failing["on"] = False
        # retried twice a second, not at every 50 ms round nor at every request's wake-up
        rate = (len(tries) - 1) / (tries[-1] - tries[0])
        assert len(tries) >= 2 and rate < 4, (len(tries), rate)
        deadline = time.monotonic() + 30
        while r.status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.1)
            r = client.get("/readyz")
        assert r.status_code == 200 and r.json()["model_version"] == 1, r.text
        assert "ntk_unlearn_follower_behind_seconds 0.0" in client.get("/metrics").text
    failures = [m for m in caplog.messages if m.startswith("could not load the newest checkpoint")]
    assert len(failures) == 1, failures
    assert any(m.startswith("loading checkpoints again (after: could not") for m in caplog.messages)


def _logged(version: int) -> dict:
    """A deletion-log record of ``version`` (the fields every reader relies on)."""
    return {
        "version": version,
        "version_before": version - 1,
        "timestamp": "2026-12-03T00:00:00.000+00:00",
        "job_ids": [],
        "id_digests": [],
    }


def test_without_redis_the_newest_logged_version_is_the_bar(make_settings, base_checkpoint):
    """With Redis down a follower serves the newest version with a deletion-log record (the
    worker appends it after the checkpoint, before it publishes and reports): a checkpoint without
    one may still be dropped and its version number written again with another batch."""
    settings = make_settings(worker=False, redis_url="redis://127.0.0.1:1/0", follow_wait_s=30)
    follower_model = Unlearner.restore(base_checkpoint)
    app = create_app(settings, follower_model)
    with TestClient(app) as client:
        # A worker wrote version 1 to the data dir; Redis (down) never heard of it.
        worker_model = Unlearner.restore(base_checkpoint)
        worker_model.use_id_key(app.state.service.keys.id_secret)
        worker_model.forget(["r05"], settings.checkpoint_dir)
        ids = client.get("/v1/ids", headers=READ)
        assert ids.status_code == 200, ids.text  # not logged yet: version 0 is still the bar
        assert "r05" in ids.json()["ids"] and follower_model.version == 0
        DeletionLog(settings.deletion_log).append(_logged(1))
        ids = client.get("/v1/ids", headers=READ)
        assert ids.status_code == 200, ids.text
        assert "r05" not in ids.json()["ids"] and follower_model.version == 1


def test_a_follower_starts_on_the_newest_logged_version(make_settings, base_checkpoint, caplog):
    """A follower started while the worker's newest checkpoint has no deletion-log record yet
    restores the newest logged one (version 0 when nothing is logged): the unlogged one may still
    be dropped and its version number written again with another batch. Once logged, a later
    start restores it; a log that no checkpoint at or below it matches (the logged version
    purged meanwhile) is read again."""
    settings = make_settings(worker=False)
    shutil.copytree(base_checkpoint, settings.checkpoint_dir)
    keys = DeploymentKeys.load_or_create(settings.data_dir)
    worker_model = Unlearner.restore(settings.checkpoint_dir, id_key=keys.id_secret)
    worker_model.forget(["r05"], settings.checkpoint_dir)  # checkpoint 1, not logged
    assert checkpoint.latest_version(settings.checkpoint_dir) == 1

    started = load_model(settings)
    assert started.version == 0 and "r05" in started.active_ids()

    DeletionLog(settings.deletion_log).append(_logged(1))
    started = load_model(settings)
    assert started.version == 1 and "r05" not in started.active_ids()

    # Version 2 checkpointed and logged, 1 purged: a log read as 1 finds no checkpoint <= 1 ...
    worker_model.forget(["r06"], settings.checkpoint_dir)
    checkpoint.prune(settings.checkpoint_dir, keep=2)
    log = DeletionLog(settings.deletion_log)
    reads = iter([1, 2])
    log.newest_version = lambda: next(reads, 2)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("app.service.DeletionLog", lambda path: log)
        started = load_model(settings)
    # ... and is read again (not the fallback for a log older than every checkpoint)
    assert started.version == 2 and "r06" not in started.active_ids()
    assert not any("no checkpoint at or below" in m for m in caplog.messages), caplog.messages

    # A log with no record at or above any checkpoint (written before the log): the newest.
    settings.deletion_log.unlink()
    caplog.clear()
    assert load_model(settings).version == 2
    assert any("no checkpoint at or below" in m for m in caplog.messages), caplog.messages


def test_a_follower_start_survives_its_checkpoint_purged_while_read(
    make_settings, base_checkpoint, monkeypatch
):
    """The logged version's checkpoint purged while a follower reads it (the worker logged,
    published and purged a newer one meanwhile): the read fails, the log is read again and the
    newer one restored. An error with the checkpoint still there and the log unmoved is not a
    purge: raised at once."""
    settings = make_settings(worker=False)
    shutil.copytree(base_checkpoint, settings.checkpoint_dir)
    keys = DeploymentKeys.load_or_create(settings.data_dir)
    worker_model = Unlearner.restore(settings.checkpoint_dir, id_key=keys.id_secret)
    worker_model.forget(["r05"], settings.checkpoint_dir)
    DeletionLog(settings.deletion_log).append(_logged(1))

    original = Unlearner.restore.__func__
    calls: list[int | None] = []

    def purged_while_read(cls, directory, *args, max_version=None, **kwargs):
        calls.append(max_version)
        if max_version == 1 and len(calls) == 1:
            # the worker's next deletion: checkpoint 2, its log record, version 1 purged
            worker_model.forget(["r06"], settings.checkpoint_dir)
            DeletionLog(settings.deletion_log).append(_logged(2))
            worker_model.purge(settings.checkpoint_dir)
            raise FileNotFoundError(f"{settings.checkpoint_dir / '1'}: gone while read")
        return original(cls, directory, *args, max_version=max_version, **kwargs)

    monkeypatch.setattr(Unlearner, "restore", classmethod(purged_while_read))
    started = load_model(settings)
    assert sorted(p.name for p in settings.checkpoint_dir.iterdir()) == ["2"]  # 1 was purged
    assert calls == [1, 2]
    assert started.version == 2 and "r06" not in started.active_ids()

    def broken(cls, directory, *args, max_version=None, **kwargs):
        calls.append(max_version)
        raise ValueError("a damaged checkpoint")

    monkeypatch.setattr(Unlearner, "restore", classmethod(broken))
    calls.clear()
    with pytest.raises(ValueError, match="damaged"):
        load_model(settings)
    assert calls == [2]  # not retried: checkpoint 2 is there and the log did not move


def test_the_worker_starts_on_the_newest_checkpoint(make_settings, base_checkpoint):
    """The worker itself restores its newest checkpoint and logs it if the log lacks it (the
    crash between checkpoint and log record: docs/design.md, The order of a deletion)."""
    settings = make_settings(worker=True)
    shutil.copytree(base_checkpoint, settings.checkpoint_dir)
    keys = DeploymentKeys.load_or_create(settings.data_dir)
    worker_model = Unlearner.restore(settings.checkpoint_dir, id_key=keys.id_secret)
    worker_model.forget(["r05"], settings.checkpoint_dir)
    started = load_model(settings, role="worker")
    assert started.version == 1
    assert DeletionLog(settings.deletion_log).newest_version() == 1


def test_the_worker_reports_a_version_once_the_followers_have_prepared_it(
    make_settings, base_checkpoint, caplog
):
    """A polling follower announces each version it has read and erased ahead; the worker
    waits (at most report_wait_s) for that before reporting, so when the job reads succeeded
    the follower has the version ready to swap in (no request waits for its preparation)."""
    settings = make_settings(worker=False, follow_wait_s=60, report_wait_s=30)
    app = create_app(settings, Unlearner.restore(base_checkpoint))
    with TestClient(app) as client:
        state = app.state.service
        follower = state.follower
        deadline = time.monotonic() + 30
        while follower.follower_id not in state.queue.client.zrange(
            state.queue.followers_key, 0, -1
        ):
            assert time.monotonic() < deadline, "the follower never announced itself"
            time.sleep(0.05)
        assert follower.reader.ready(wait_s=120)  # reads before it are made here
        _, worker = _other_worker(client, base_checkpoint)
        assert worker.report_wait_s == 30
        worker.recover()
        job = client.post("/v1/forget", json={"ids": ["r13"]}, headers=WRITE).json()
        worker.run_once()
        # Reported only now: the follower had prepared version 1 (or already serves it).
        prepared = follower._prepared
        assert state.unlearner.version == 1 or (prepared is not None and prepared.version == 1)
        assert state.queue.followers_behind(1) == []
        assert not any("have not prepared it" in m for m in caplog.messages), caplog.messages
        status = client.get(f"/v1/jobs/{job['job_id']}", headers=READ).json()
        assert status["status"] == "succeeded" and status["model_version"] == 1
        assert "r13" not in client.get("/v1/ids", headers=READ).json()["ids"]
        # version 1 was read by the child process (``serve``'s default), never here
        assert follower.reader.in_child >= 1 and follower.reader.here == 0
        reader_pid = follower.reader._child.pid
    # A stopped follower withdraws: no worker waits for it; its reader process is gone.
    with pytest.raises(ChildProcessError):
        os.waitpid(reader_pid, os.WNOHANG)
    assert state.queue.client.zrange(state.queue.followers_key, 0, -1) == []


def test_a_follower_that_lost_its_version_answers_nothing_from_it(follower_app, x_probe):
    """Once the follower found the worker dropped the version it serves (``ModelFollower.lost``,
    tests/test_follower_prepare.py), model requests and /readyz are 503 saying so."""
    client = follower_app
    assert client.post("/v1/predict", json={"x": x_probe}, headers=READ).status_code == 200
    assert "ntk_unlearn_follower_lost 0.0" in client.get("/metrics").text
    client.app.state.service.follower.lost = "this API process served model version 1, which ..."
    assert "ntk_unlearn_follower_lost 1.0" in client.get("/metrics").text  # an alert can fire
    for r in (
        client.post("/v1/predict", json={"x": x_probe}, headers=READ),
        client.get("/v1/ids", headers=READ),
        client.get("/v1/deletions", headers=READ),
        client.get("/readyz"),
    ):
        assert r.status_code == 503, r.text
        assert "which ..." in r.text, r.text
    assert "Retry-After" not in r.headers  # /readyz: waiting does not help


def test_without_the_reader_process_a_follower_reads_here(make_settings, base_checkpoint, x_probe):
    """``--no-follow-reader-process``: no child process; versions are still followed."""
    settings = make_settings(worker=False, follow_wait_s=60, follow_reader_process=False)
    app = create_app(settings, Unlearner.restore(base_checkpoint))
    with TestClient(app) as client:
        assert app.state.service.follower.reader is None
        model, worker = _other_worker(client, base_checkpoint)
        worker.recover()
        client.post("/v1/forget", json={"ids": ["r14"]}, headers=WRITE)
        worker.run_once()
        out = client.post("/v1/predict", json={"x": x_probe}, headers=READ).json()
        assert out["model_version"] == 1
        np.testing.assert_allclose(out["outputs"], model.predict(np.asarray(x_probe)), rtol=1e-10)
