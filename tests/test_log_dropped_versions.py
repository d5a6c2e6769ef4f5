"""A version whose deletion-log record failed is never read as applied.

The order of a deletion writes the log record (fsync'd) between the checkpoint and the
publication. When the fsync fails the version is not published and its checkpoint is dropped, but
the line may be in the file: without ``DeletionLog.drop_after`` it listed a version that never
existed in ``/v1/deletions`` (with the failed job) until a later job wrote that number again, a
follower took it as committed and waited for it, and after a crash an addition job re-run at start
was reported succeeded from that record without being applied.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path

import pytest
import redis

from app.deletion_log import DeletionLog
from app.queue import GROUP, JobQueue
from app.receipts import DeploymentKeys
from app.service import load_model, queue_prefix
from app.worker import Worker
from service_core import Unlearner, checkpoint

WRITE = {"Authorization": "Bearer write-token"}
READ = {"Authorization": "Bearer read-token"}


@pytest.fixture
def queue(redis_url: str, make_settings):
    """The queue of the test's data dir (``make_settings()``'s), as its processes name it."""
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    q = JobQueue(client, queue_prefix(make_settings()), ttl_s=600)
    q.ensure_group()
    yield q
    q.client.close()


def _record(version: int, job: str, digest: str | None = None) -> dict:
    digest = digest or f"d{version}"
    return {
        "version": version,
        "version_before": version - 1,
        "timestamp": "2026-12-03T00:00:00.000+00:00",
        "job_ids": [job],
        "id_digests": [digest],
        "job_digests": {job: [digest]},
    }


def test_drop_after_removes_only_newer_records(tmp_path):
    path = tmp_path / "deletions.log"
    log = DeletionLog(path)
    for record in (_record(1, "j1"), _record(2, "j2")):
        log.append(record)
    with open(path, "ab") as f:  # a foreign line and a torn one stay as they were
        f.write(b'{"note": "hand edit"}\n')
    log.append(_record(3, "j3"))
    with open(path, "ab") as f:
        f.write(b'{"version": 4, "timest')
    leftover = tmp_path / ".deletions.log.4242.tmp"  # a copy whose writer was killed
    leftover.write_text("half")
    assert log.drop_after(3) == [] and log.drop_after(5) == []  # nothing newer: not rewritten
    assert not leftover.exists()
    assert log.drop_after(2) == [3]
    text = path.read_text()
    assert '"hand edit"' in text and '{"version": 4, "timest' in text and '"j3"' not in text
    assert [e["version"] for e in log.entries()] == [1, 2]
    assert os.stat(path).st_mode & 0o777 == 0o600
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    # nothing is lost: the removed record is in the side file, private too
    assert log.dropped_path == tmp_path / "deletions.dropped.log"
    assert [json.loads(line)["job_ids"] for line in log.dropped_path.read_text().splitlines()] == [
        ["j3"]
    ]
    assert os.stat(log.dropped_path).st_mode & 0o777 == 0o600


def test_drop_after_rewrites_the_file_a_linked_log_points_to(tmp_path):
    (tmp_path / "audit").mkdir()
    real = tmp_path / "audit" / "deletions.log"
    link = tmp_path / "deletions.log"
    link.symlink_to(real)
    log = DeletionLog(link)
    for record in (_record(1, "j1"), _record(2, "j2")):
        log.append(record)
    assert log.drop_after(1) == [2]
    assert link.is_symlink() and link.resolve() == real
    assert [e["version"] for e in DeletionLog(real).entries()] == [1]
    assert (tmp_path / "audit" / "deletions.dropped.log").exists()


def test_readers_follow_a_log_replaced_by_one_of_the_same_size(tmp_path):
    """The retry logs the dropped version again with a record of the same length: a reader that
    knew the file by its size alone would keep serving the dropped record."""
    path = tmp_path / "deletions.log"
    log = DeletionLog(path)
    for record in (_record(1, "j1"), _record(2, "jA")):
        log.append(record)
    reader = DeletionLog(path)  # another process's reader, its cache filled
    assert reader.find_job("jA")["version"] == 2 and reader.newest_version() == 2
    size = path.stat().st_size
    assert log.drop_after(1) == [2]
    log.append(_record(2, "jB"))
    assert path.stat().st_size == size
    assert reader.find_job("jA") is None and reader.find_job("jB")["version"] == 2


def _failing_log_fsync(monkeypatch, calls: list[str], every: bool = False) -> None:
    """``os.fsync`` raises EIO for the deletion log's file descriptor, once (a disk that did not
    take the record: the line is written, its fsync fails); with ``every``, for every file whose
    name starts with ``deletions`` or ``.deletions``, every time (the removal fails too)."""
    real = os.fsync

    def fsync(fd):
        target = os.readlink(f"/proc/self/fd/{fd}")
        name = os.path.basename(target)
        if every and name.lstrip(".").startswith("deletions"):
            calls.append(target)
            raise OSError(errno.EIO, "Input/output error (injected)")
        if target.endswith("/deletions.log") and not calls:
            calls.append(target)
            raise OSError(errno.EIO, "Input/output error (injected)")
        return real(fd)

    monkeypatch.setattr(os, "fsync", fsync)


@pytest.mark.redis
def test_a_record_that_could_not_be_removed_is_not_listed(client, wait_for_job, monkeypatch):
    """The record's fsync fails and so does its removal (the disk refuses every write to the
    log): the record stays in the file until the next start, but no version newer than the one
    served is listed, and the job says what failed."""
    settings = client.app.state.service.settings
    calls: list[str] = []
    _failing_log_fsync(monkeypatch, calls, every=True)
    failed = client.post("/v1/forget", json={"ids": ["r01"]}, headers=WRITE).json()
    body = wait_for_job(client, failed["job_id"])
    monkeypatch.undo()
    assert len(calls) >= 2, calls  # the append's fsync, then the removal's
    assert body["status"] == "failed", body
    assert body["error"].startswith("writing the new version failed (OSError"), body
    assert [e["version"] for e in DeletionLog(settings.deletion_log).entries()] == [1]
    assert client.get("/v1/deletions", headers=READ).json()["deletions"] == []
    assert client.get("/v1/records/r01", headers=READ).json()["status"] == "active"


@pytest.mark.redis
def test_a_version_whose_log_fsync_failed_is_not_listed(client, wait_for_job, monkeypatch):
    settings = client.app.state.service.settings
    calls: list[str] = []
    _failing_log_fsync(monkeypatch, calls)
    failed = client.post("/v1/forget", json={"ids": ["r01"]}, headers=WRITE).json()
    body = wait_for_job(client, failed["job_id"])
    monkeypatch.undo()
    assert calls, "the fault was not injected"
    assert body["status"] == "failed" and "Input/output error" in body["error"], body
    assert not (settings.checkpoint_dir / "1").exists()  # dropped
    assert client.get("/v1/model", headers=READ).json()["version"] == 0
    # the record was written before its fsync failed; it is gone again
    assert DeletionLog(settings.deletion_log).entries() == []
    assert client.get("/v1/deletions", headers=READ).json()["deletions"] == []
    assert client.get("/v1/records/r01", headers=READ).json()["status"] == "active"

    retried = client.post("/v1/forget", json={"ids": ["r01"]}, headers=WRITE).json()
    assert wait_for_job(client, retried["job_id"])["model_version"] == 1
    listed = client.get("/v1/deletions", headers=READ).json()["deletions"]
    assert [(e["version"], e["job_ids"]) for e in listed] == [(1, [retried["job_id"]])]
    lines = settings.deletion_log.read_text().splitlines()
    assert len(lines) == 1 and failed["job_id"] not in lines[0]


def _worker_with_a_newer_record(make_settings, base_checkpoint, queue, job_failed: bool):
    """A data dir whose newest checkpoint is version 1 and whose log also has a record of
    version 2 (no checkpoint: never published, or rolled back), forgetting r06; its job
    reported failed in Redis or unknown there. The worker restored from it."""
    settings = make_settings(worker=True)
    shutil.copytree(base_checkpoint, settings.checkpoint_dir)
    keys = DeploymentKeys.load_or_create(settings.data_dir)
    u = Unlearner.restore(settings.checkpoint_dir, id_key=keys.id_secret)
    u.forget(["r05"], settings.checkpoint_dir)
    log = DeletionLog(settings.deletion_log)
    log.append(_record(1, "kept", u.digest("r05")))
    log.append(_record(2, "newer", u.digest("r06")))  # no checkpoint 2
    if job_failed:
        queue.client.hset(
            queue.job_key("newer"),
            mapping={"job_id": "newer", "status": "failed", "submitted_at": "2026-12-03"},
        )
    started = load_model(settings, role="worker")
    return settings, started, Worker(started, queue, settings.checkpoint_dir, log)


@pytest.mark.redis
def test_a_worker_start_keeps_the_record_of_a_job_reported_failed(
    make_settings, base_checkpoint, queue
):
    """A record newer than every checkpoint whose job was reported failed (its fsync failed,
    and so did its removal): never published; the start keeps it (the log is never rewritten at
    a start) and does not redo it; no reader takes it as applied: /v1/deletions lists no version
    newer than the one served."""
    settings, started, worker = _worker_with_a_newer_record(
        make_settings, base_checkpoint, queue, job_failed=True
    )
    assert started.version == 1 and not started.is_forgotten(["r06"])
    assert checkpoint.latest_version(settings.checkpoint_dir) == 1
    worker.recover()
    assert [e["job_ids"] for e in DeletionLog(settings.deletion_log).entries()] == [
        ["kept"],
        ["newer"],
    ]
    assert [e["version"] for e in worker.deletion_log.page(0, 10, through=1)[0]] == [1]


@pytest.mark.redis
def test_a_worker_start_redoes_a_newer_record_whose_job_is_not_known_failed(
    make_settings, base_checkpoint, queue
):
    """The same record with its job succeeded or unknown (expired, Redis down): published under
    checkpoints rolled back, or never published but asked for; either way its record is forgotten
    again before anything is served (tests/test_reapply_logged.py has the rolled-back case
    end to end)."""
    settings, started, _ = _worker_with_a_newer_record(
        make_settings, base_checkpoint, queue, job_failed=False
    )
    assert started.version == 2 and started.is_forgotten(["r05", "r06"])
    assert checkpoint.latest_version(settings.checkpoint_dir) == 2
    entries = DeletionLog(settings.deletion_log).entries()
    assert [e["job_ids"] for e in entries] == [["kept"], ["newer"], ["newer"]]


@pytest.mark.redis
def test_a_follower_starts_on_the_reported_version_not_a_newer_logged_one(
    make_settings, base_checkpoint, queue
):
    """A record is in the file before its fsync returns, and the fsync may still fail: a
    follower starting then must not take that version (the worker then drops it, and writes
    another version 1 the follower would never read: it serves version 1 already)."""
    settings = make_settings(worker=False)
    shutil.copytree(base_checkpoint, settings.checkpoint_dir)
    keys = DeploymentKeys.load_or_create(settings.data_dir)
    u = Unlearner.restore(settings.checkpoint_dir, id_key=keys.id_secret)
    u.forget(["r05"], settings.checkpoint_dir)
    DeletionLog(settings.deletion_log).append(_record(1, "fsync-pending", u.digest("r05")))
    queue.record_n_train(48, 0)  # the worker has reported version 0 only
    assert load_model(settings).version == 0
    queue.record_n_train(47, 1)  # reported: now it is the bar
    assert load_model(settings).version == 1


@pytest.mark.redis
def test_an_addition_with_a_never_published_record_is_applied_at_restart(
    queue, unlearner, tmp_path: Path
):
    """An addition job whose record was written (its fsync failed, and so did its removal) when
    the worker died: the restarted worker must apply it, not report it succeeded from that
    record."""
    x, y = [[0.5, -0.5, 1.0, 2.0]], [1]
    job = queue.enqueue_add(["new-1"], x, y)
    assert len(queue.read("dead-worker", block_ms=0, count=10)) == 1
    DeletionLog(tmp_path / "deletions.log").append(
        {**_record(1, job.job_id, unlearner.digest("new-1")), "kind": "add"}
    )
    worker = Worker(
        unlearner, queue, tmp_path / "checkpoints", DeletionLog(tmp_path / "deletions.log")
    )
    # the record is still there (its removal failed too): the re-run must not trust it
    worker.process(queue.claim_unacknowledged(worker.consumer))
    record = queue.get(job.job_id)
    assert record.status == "succeeded" and record.model_version == 1, record
    assert unlearner.version == 1 and "new-1" in unlearner.active_ids()
    assert queue.client.xpending(queue.stream, GROUP)["pending"] == 0


@pytest.mark.redis
@pytest.mark.parametrize("kind", ["add", "forget"])
def test_a_batch_that_fails_as_one_version_is_applied_job_by_job(
    queue, unlearner, tmp_path: Path, monkeypatch, kind
):
    """Jobs batched into one version whose solve fails (here: any batch holding the bad job's
    record; a tester's addition with a target of 1e300): each job is then applied alone, so the
    good one succeeds in its own version and only the bad one fails, with its own error."""
    from service_core.errors import SolverError

    if kind == "add":
        good = queue.enqueue_add(["good-1"], [[0.5, -0.5, 1.0, 2.0]], [1])
        bad = queue.enqueue_add(["bad-1"], [[0.1, 0.2, 0.3, 0.4]], [0])
        trigger, method = "bad-1", "add"
    else:
        good, bad = queue.enqueue(["r01", "r02"]), queue.enqueue(["r03"])
        trigger, method = "r03", "forget"
    real, batches = getattr(unlearner, method), []

    def failing(ids, *args, **kwargs):
        batches.append(sorted(ids))
        if trigger in ids:
            raise SolverError(f"the {method} produced non-finite values")
        return real(ids, *args, **kwargs)

    monkeypatch.setattr(unlearner, method, failing)
    published, after_publish = [], unlearner.after_publish
    monkeypatch.setattr(
        unlearner, "after_publish", lambda: published.append(unlearner.version) or after_publish()
    )
    worker = Worker(
        unlearner, queue, tmp_path / "checkpoints", DeletionLog(tmp_path / "deletions.log")
    )
    worker.process(queue.read(worker.consumer, block_ms=0, count=10))
    good_ids = ["good-1"] if kind == "add" else ["r01", "r02"]
    assert batches == [sorted(good_ids + [trigger]), good_ids, [trigger]], batches
    done, failed = queue.get(good.job_id), queue.get(bad.job_id)
    assert done.status == "succeeded" and done.model_version == 1, done
    assert failed.status == "failed" and "non-finite" in failed.error, failed
    assert unlearner.version == 1 and published == [1]  # no post-publish work for a failure
    assert (set(good_ids) <= set(unlearner.active_ids())) == (kind == "add")
    assert (trigger in unlearner.active_ids()) == (kind == "forget")
    lines = (tmp_path / "deletions.log").read_text().splitlines()
    assert len(lines) == 1 and good.job_id in lines[0] and bad.job_id not in lines[0]
    assert queue.client.xpending(queue.stream, GROUP)["pending"] == 0
