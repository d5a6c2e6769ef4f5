"""Checkpoints rolled back under the deletion log (a backup restored): the worker's start forgets
again what the log says is gone, before anything is served (``Worker.reapply_logged``)."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from app.core.config import Settings
from app.deletion_log import DeletionLog
from app.main import create_app
from app.service import load_model
from service_core import checkpoint

pytestmark = pytest.mark.redis

WRITE = {"Authorization": "Bearer write-token"}
READ = {"Authorization": "Bearer read-token"}


def _forget(client: TestClient, ids: list[str], wait_for_job) -> dict:
    job = client.post("/v1/forget", json={"ids": ids}, headers=WRITE).json()
    return wait_for_job(client, job["job_id"])


def test_a_rolled_back_checkpoint_does_not_bring_forgotten_records_back(
    make_settings, unlearner, wait_for_job, dataset_file: Path, tmp_path: Path, caplog
):
    settings = make_settings()
    with np.load(dataset_file) as f:
        x_probe = f["x"][:6]
    with TestClient(create_app(settings, unlearner)) as client:
        first = _forget(client, ["r01"], wait_for_job)
        assert first["model_version"] == 1
        backup = tmp_path / "backup"
        shutil.copytree(settings.checkpoint_dir / "1", backup / "1")  # the operator's backup
        second = _forget(client, ["r02", "r03"], wait_for_job)
        assert second["model_version"] == 2
        served = client.app.state.service.unlearner
        expected = np.asarray(served.predict(x_probe))
        active = sorted(served.active_ids())
    # The backup of version 1 put back in place of version 2: r02 and r03 are in it again.
    shutil.rmtree(settings.checkpoint_dir / "2")
    shutil.copytree(backup / "1", settings.checkpoint_dir / "1")
    assert checkpoint.latest_version(settings.checkpoint_dir) == 1

    with caplog.at_level(logging.INFO, logger="app"):
        u = load_model(settings)
    # the log's newest record (2) is the forget redone: the new record supersedes it
    assert u.version == 2 and sorted(u.active_ids()) == active
    assert u.is_forgotten(["r01", "r02", "r03"])
    # The same deletion from the same version: the same model (retraining-equal, squared error).
    np.testing.assert_allclose(np.asarray(u.predict(x_probe)), expected, rtol=1e-5, atol=1e-6)
    # Nothing older is left that holds them: only the new version's checkpoint.
    assert sorted(p.name for p in settings.checkpoint_dir.iterdir() if p.is_dir()) == ["2"]
    # The new record is the version's current one, under the job that asked for it.
    log_ = DeletionLog(settings.deletion_log)
    current = [e for e in log_.current() if int(e["version"]) == 2]
    assert len(current) == 1 and current[0]["job_ids"] == [second["job_id"]]
    assert len([e for e in log_.entries() if int(e["version"]) == 2]) == 2
    assert log_.find_job(second["job_id"])["version"] == 2
    said = [r for r in caplog.records if "newer than the newest checkpoint" in r.getMessage()]
    assert said and said[0].levelno == logging.CRITICAL and "version(s) 2" in said[0].getMessage()

    # A second start finds the log and the checkpoint agreeing: nothing to do.
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="app"):
        again = load_model(settings)
    assert again.version == 2
    assert not any("newer than the newest checkpoint" in m for m in caplog.messages)


def test_a_checkpoint_directory_deleted_and_built_anew_forgets_the_log_again(
    make_settings, unlearner, wait_for_job, dataset_file: Path, caplog
):
    """The mismatch message advised deleting the checkpoint directory to build anew: the new
    version 0 (trained on the data set, forgotten records included) was served, and forgets of
    them accepted again once Redis's job records were gone. The worker's start now forgets again,
    before anything is served, what the deletion log says is gone, numbered after its newest."""
    settings = make_settings()
    with np.load(dataset_file) as f:
        x, y = f["x"][:1].tolist(), f["y"][:1].tolist()
    with TestClient(create_app(settings, unlearner)) as client:
        first = _forget(client, ["r01"], wait_for_job)
        second = _forget(client, ["r02", "r03"], wait_for_job)
        job = client.post("/v1/records", json={"ids": ["new-1"], "x": x, "y": y}, headers=WRITE)
        added = wait_for_job(client, job.json()["job_id"])
        assert [j["model_version"] for j in (first, second, added)] == [1, 2, 3]
    shutil.rmtree(settings.checkpoint_dir)
    with caplog.at_level(logging.INFO, logger="app"):
        u = load_model(settings)
    # versions 1–2 redone, 3 (an addition) lost: the new version comes after every logged one
    assert u.version == 4 and u.is_forgotten(["r01", "r02", "r03"])
    assert not {"r01", "r02", "r03", "new-1"} & set(u.active_ids())
    assert sorted(p.name for p in settings.checkpoint_dir.iterdir() if p.is_dir()) == ["4"]
    versions = [int(e["version"]) for e in DeletionLog(settings.deletion_log).current()]
    assert versions == [1, 2, 3, 4]
    assert any("forgetting them again before anything is served" in m for m in caplog.messages)
    # said once: from the log, not again from Redis's record of the same job
    lost = [m for m in caplog.messages if "an addition of 1 record(s)" in m]
    assert len(lost) == 1 and "lost" in lost[0], lost
    with TestClient(create_app(settings, u)) as client:
        r = client.post("/v1/forget", json={"ids": ["r02"]}, headers=WRITE)
        assert r.status_code == 409, r.text  # already forgotten, not accepted again
        assert client.get("/v1/records/r02", headers=READ).json()["status"] == "forgotten"
        listed = client.get("/v1/deletions", headers=READ).json()
        assert [d["version"] for d in listed["deletions"]] == [1, 2, 3, 4]


def test_a_follower_does_not_reapply(make_settings, unlearner, wait_for_job, tmp_path: Path):
    """Only the worker writes versions: an API process without one restores what is there."""
    settings = make_settings()
    with TestClient(create_app(settings, unlearner)) as client:
        _forget(client, ["r04"], wait_for_job)
        shutil.copytree(settings.checkpoint_dir / "1", tmp_path / "backup" / "1")
        _forget(client, ["r05"], wait_for_job)
    shutil.rmtree(settings.checkpoint_dir / "2")
    shutil.copytree(tmp_path / "backup" / "1", settings.checkpoint_dir / "1")
    u = load_model(settings.model_copy(update={"worker": False}))
    assert u.version == 1 and not u.is_forgotten(["r05"])
    assert checkpoint.latest_version(settings.checkpoint_dir) == 1


def test_a_data_dir_rolled_back_with_its_log_forgets_again_what_redis_reports(
    make_settings, unlearner, wait_for_job, dataset_file: Path, tmp_path: Path, caplog
):
    """The whole data dir put back from a backup, deletion log included, beside a Redis that
    kept its job records (REDIS_URL): the log has nothing ahead of the checkpoint, but the
    worker reported newer versions, whose succeeded jobs' keyed digests say what is gone. The
    start forgets those records again before anything is served (``Worker.reapply_reported``);
    when Redis does not answer at the start, the worker does it once it does (``recover``)."""
    import redis

    from app.queue import JobQueue
    from app.service import queue_prefix
    from app.worker import Worker

    settings = make_settings()
    with np.load(dataset_file) as f:
        x_probe = f["x"][:6]
    backup = tmp_path / "backup"
    with TestClient(create_app(settings, unlearner)) as client:
        assert _forget(client, ["r01"], wait_for_job)["model_version"] == 1
        shutil.copytree(settings.checkpoint_dir / "1", backup / "1")  # the operator's backup,
        shutil.copy(settings.deletion_log, backup / "deletions.log")  # log included
        second = _forget(client, ["r02", "r03"], wait_for_job)
        third = _forget(client, ["r04"], wait_for_job)
        assert (second["model_version"], third["model_version"]) == (2, 3)
        served = client.app.state.service.unlearner
        expected = np.asarray(served.predict(x_probe))
        active = sorted(served.active_ids())

    def roll_back() -> None:
        shutil.rmtree(settings.checkpoint_dir)
        shutil.copytree(backup / "1", settings.checkpoint_dir / "1")
        shutil.copy(backup / "deletions.log", settings.deletion_log)
        assert DeletionLog(settings.deletion_log).newest_version() == 1

    roll_back()
    with caplog.at_level(logging.INFO, logger="app"):
        u = load_model(settings)
    assert u.version == 2 and sorted(u.active_ids()) == active
    assert u.is_forgotten(["r01", "r02", "r03", "r04"])
    np.testing.assert_allclose(np.asarray(u.predict(x_probe)), expected, rtol=1e-5, atol=1e-6)
    assert sorted(p.name for p in settings.checkpoint_dir.iterdir() if p.is_dir()) == ["2"]
    current = [e for e in DeletionLog(settings.deletion_log).current() if e["version"] == 2]
    assert sorted(current[0]["job_ids"]) == sorted([second["job_id"], third["job_id"]])
    said = [r for r in caplog.records if "Redis's succeeded jobs report" in r.getMessage()]
    assert said and said[0].levelno == logging.CRITICAL, caplog.messages
    assert "version(s) 2, 3" in said[0].getMessage()
    # recorded as the version served, so the worker's recovery does not look again
    reported = redis.Redis.from_url(settings.redis_url, decode_responses=True)
    assert JobQueue(reported, queue_prefix(settings), 600).reported_version() == 2
    reported.close()
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="app"):
        assert load_model(settings).version == 2  # nothing left to do
    assert not any("Redis's succeeded jobs report" in m for m in caplog.messages)

    # Redis not answering at the start: restored as it is; the worker's recovery does it.
    roll_back()
    down = settings.model_copy(update={"redis_url": "redis://127.0.0.1:1/0"})
    u = load_model(down)
    assert u.version == 1 and not u.is_forgotten(["r02"])
    client = redis.Redis.from_url(settings.redis_url, decode_responses=True)
    queue = JobQueue(client, queue_prefix(settings), settings.job_ttl_s)
    try:
        # and a job a worker took but never finished (killed): re-run after the catching up,
        # which must not take the number of a version lost in the roll-back first
        queue.enqueue(["r05"])
        assert len(queue.read("killed-worker", 0, 10)) == 1
        worker = Worker(u, queue, settings.checkpoint_dir, DeletionLog(settings.deletion_log))
        assert worker.recover() == 1
        assert u.version == 3 and u.is_forgotten(["r01", "r02", "r03", "r04", "r05"])
        assert sorted(u.active_ids()) == [i for i in active if i != "r05"]
        assert queue.reported_version() == 3  # what it serves now

        # A copy of the data dir (another checkpoint directory) whose queue another data dir's
        # worker holds: it catches up for itself, but leaves the queue's reported version and
        # size alone (it moved them backwards, to its own).
        roll_back()
        other_home = str(tmp_path / "elsewhere" / "checkpoints")
        client.delete(queue.worker_key, queue.worker_home_key)  # this test's own worker's
        assert queue.beat("other-host-1", 3, None, home=other_home, sticky=True) is None
        n_train = client.get(queue.n_train_key)
        u = load_model(settings)
        # (r05's job record holds digests of this test's queue, keyed otherwise: not matched)
        assert u.version == 2 and u.is_forgotten(["r01", "r02", "r03", "r04"])
        assert queue.reported_version() == 3 and client.get(queue.n_train_key) == n_train
        queue.end_beat("other-host-1")  # gone, but the queue's last holder was that directory's
        roll_back()
        assert load_model(settings).version == 2 and queue.reported_version() == 3
        assert queue.held_elsewhere(other_home, sticky=True) is False
        assert queue.held_elsewhere(str(settings.checkpoint_dir.resolve()), sticky=False) is False
    finally:
        client.delete(queue.worker_key, queue.worker_home_key)
        client.close()


def _job(job_id: str, kind: str, version: int, digests: list[str], finished: str):
    from app.queue import Job

    return Job(
        job_id, "succeeded", [], "2026-12-04T10:00:00.000+00:00", finished_at=finished,
        model_version=version, id_digests=digests, kind=kind,  # type: ignore[arg-type]
    )  # fmt: skip


@pytest.mark.parametrize("add_first", [True, False])
def test_an_addition_and_a_forget_of_one_version_number_are_both_read(
    base_checkpoint: Path, tmp_path: Path, add_first: bool, caplog
):
    """Redis may hold a lost addition and a forget under one version number (one from a history
    lost in an earlier roll-back): each is read as what it is (a start failed on a KeyError)."""
    from app.worker import Worker
    from service_core import Unlearner

    u = Unlearner.restore(base_checkpoint, id_key=b"k" * 32)
    jobs = [
        _job("added", "add", 1, ["someone-else"], "2026-12-04T11:00:00.000+00:00"),
        _job("forgot", "forget", 1, [u.digest("r01")], "2026-12-04T11:00:00.000+00:00"),
    ]
    worker = Worker(u, None, tmp_path / "checkpoints", DeletionLog(tmp_path / "log"))  # type: ignore[arg-type]
    with caplog.at_level(logging.INFO, logger="app"):
        assert worker.reapply_reported(jobs if add_first else jobs[::-1], since=0) == 1
    assert u.version == 1 and u.is_forgotten(["r01"])
    assert any("an addition of 1 record(s)" in m for m in caplog.messages)
    critical = [r.getMessage() for r in caplog.records if r.levelno == logging.CRITICAL]
    assert len(critical) == 1 and "report version(s) 1, newer" in critical[0], critical


def test_jobs_from_before_the_restored_version_are_not_redone(
    base_checkpoint: Path, tmp_path: Path
):
    """After a first roll-back, the lost jobs' records keep their version numbers, which later
    versions pass: restored again at such a later version, only jobs that finished after it
    was logged are redone (a record added again in between was forgotten again by its stale
    job)."""
    from app.worker import Worker
    from service_core import Unlearner

    u = Unlearner.restore(base_checkpoint, id_key=b"k" * 32)
    u.forget(["r09"], tmp_path / "checkpoints")
    log_ = DeletionLog(tmp_path / "log")
    log_.append(
        {"version": 1, "version_before": 0, "timestamp": "2026-12-04T12:00:00.000+00:00",
         "job_ids": ["restored"], "id_digests": [u.digest("r09")]}
    )  # fmt: skip
    stale = _job("stale", "forget", 2, [u.digest("r02")], "2026-12-04T11:59:59.000+00:00")
    lost = _job("lost", "forget", 3, [u.digest("r03")], "2026-12-04T12:00:01.000+00:00")
    worker = Worker(u, None, tmp_path / "checkpoints", log_)  # type: ignore[arg-type]
    assert worker.reapply_reported([stale, lost], since=1) == 1
    assert u.version == 2 and u.is_forgotten(["r03"]) and not u.is_forgotten(["r02"])


def test_readiness_says_while_a_rolled_back_worker_catches_up(client):
    """Its worker serves a version older than the newest reported (a data dir rolled back while
    Redis was down at the start; the worker forgets again once it answers): not ready, for reads
    too (they would serve the records to forget again), saying why; ready once caught up."""
    import time

    queue = client.app.state.service.queue
    deadline = time.monotonic() + 30
    while queue.reported_version() != 0:  # the worker's recovery, in its thread, is over
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert client.get("/readyz").status_code == 200
    queue.client.set(queue.version_key, 7)
    try:
        for scope in ("all", "reads"):
            r = client.get("/readyz", params={"scope": scope})
            assert r.status_code == 503, r.text
            assert "serves version 0 but version 7 was reported" in r.json()["detail"]
    finally:
        queue.client.set(queue.version_key, 0)
    assert client.get("/readyz").status_code == 200


def test_a_restart_given_another_tolerance_says_the_built_one_stays(
    make_settings, caplog, tmp_path
):
    """A data dir keeps the tolerance its model was built with (every version is held to it): a
    restart with another --tol said nothing while the old one kept applying (a break-it round)."""
    settings = make_settings(tol=1e-4)
    built = load_model(settings)
    assert built.train_config.tol == 1e-4
    with caplog.at_level(logging.WARNING, logger="app"):
        again = load_model(settings.model_copy(update={"tol": 1e-3}))
    assert again.train_config.tol == 1e-4
    assert any(
        "--tol 0.001 is not applied" in m and "built with 0.0001" in m for m in caplog.messages
    )
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="app"):
        load_model(settings)
    assert not any("is not applied" in m for m in caplog.messages)
    # a model built with another --accept-floor, restarted without the flag (its default, 1):
    # the built one stays, without a warning at each restart; given, it is said
    floor = make_settings(accept_floor=2.0, data_dir=tmp_path / "floor")
    assert load_model(floor).train_config.accept_floor == 2.0
    caplog.clear()
    default = Settings(**floor.model_dump(exclude={"accept_floor"}))
    assert "accept_floor" not in default.model_fields_set and default.accept_floor == 1.0
    with caplog.at_level(logging.WARNING, logger="app"):
        assert load_model(default).train_config.accept_floor == 2.0
    assert not any("is not applied" in m for m in caplog.messages)
    with caplog.at_level(logging.WARNING, logger="app"):
        load_model(floor.model_copy(update={"accept_floor": 3.0}))
    assert any("--accept-floor 3 is not applied" in m for m in caplog.messages)
    # built without --tol (the checkpoint keeps None: the dtype's default is held), restarted
    # with one: said too (helper-57: silently kept 1e-5); with the default itself, nothing
    assert floor.tol is None
    held = load_model(floor).train_config.resolved_tol()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="app"):
        again = load_model(floor.model_copy(update={"tol": held / 10}))
    assert again.train_config.resolved_tol() == held
    assert any(
        f"--tol {held / 10:g} is not applied" in m and f"built with {held:g}" in m
        for m in caplog.messages
    ), caplog.messages
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="app"):
        load_model(floor.model_copy(update={"tol": held}))
    assert not any("is not applied" in m for m in caplog.messages)
