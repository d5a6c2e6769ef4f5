"""Queue semantics on a real Redis: reservation, coalescing, failures, crash recovery."""

from __future__ import annotations

import json
import logging
import threading
import time
from pathlib import Path

import pytest
import redis
from fastapi.testclient import TestClient

from app.deletion_log import DeletionLog
from app.main import create_app
from app.queue import GROUP, JobQueue
from app.service import make_worker
from app.worker import Worker
from service_core import AlreadyForgottenError, InvalidForgetSetError, Unlearner

pytestmark = pytest.mark.redis

WRITE = {"Authorization": "Bearer write-token"}
READ = {"Authorization": "Bearer read-token"}


@pytest.fixture
def worker_for(queue: JobQueue, tmp_path: Path):
    def make(u: Unlearner) -> Worker:
        return Worker(u, queue, tmp_path / "checkpoints", DeletionLog(tmp_path / "deletions.log"))

    return make


def _redis_is_clean(queue: JobQueue) -> None:
    """Nothing of a finished job is left but its record: no entry, no pending delivery, no ids."""
    assert queue.client.xlen(queue.stream) == 0
    assert queue.client.xpending(queue.stream, GROUP)["pending"] == 0
    assert queue.client.scard(queue.pending_key) == 0


def test_queued_jobs_are_coalesced_into_one_solve(make_settings, unlearner):
    settings = make_settings(worker=False)
    app = create_app(settings, unlearner)
    with TestClient(app) as client:
        job_ids = [
            client.post("/v1/forget", json={"ids": ids}, headers=WRITE).json()["job_id"]
            for ids in (["r01"], ["r02", "r03"], ["r04"])
        ]
        state = app.state.service
        worker = make_worker(settings, state.unlearner, state.queue, state.metrics)
        assert worker.run_once() == 3

        jobs = [client.get(f"/v1/jobs/{j}", headers=READ).json() for j in job_ids]
        assert [j["status"] for j in jobs] == ["succeeded"] * 3
        assert {j["model_version"] for j in jobs} == {1}
        assert jobs[0]["solver"] == jobs[1]["solver"] == jobs[2]["solver"]
        assert unlearner.version == 1 and unlearner.n_forgotten == 4
        text = client.get("/metrics").text
        assert "ntk_unlearn_forget_batch_jobs_count 1.0" in text
        assert "ntk_unlearn_forget_batch_jobs_sum 3.0" in text
        assert 'ntk_unlearn_forget_jobs_total{status="succeeded"} 3.0' in text
        # The failure series exists before any failure, so an alert on its increase sees it.
        assert 'ntk_unlearn_forget_jobs_total{status="failed"} 0.0' in text
    _redis_is_clean(state.queue)


def test_a_job_invalid_at_apply_time_fails_alone(queue, worker_for, unlearner):
    # Enqueued without the API's validation, as if the model changed after it.
    good = queue.enqueue(["r01"])
    bad = queue.enqueue(["r02", "ghost"])
    also_good = queue.enqueue(["r03", "r04"])
    worker_for(unlearner).run_once()

    assert queue.get(good.job_id).status == "succeeded"
    assert queue.get(also_good.job_id).status == "succeeded"
    failed = queue.get(bad.job_id)
    assert failed.status == "failed"
    assert "ghost" in failed.error and failed.model_version is None
    assert unlearner.version == 1
    assert unlearner.is_forgotten(["r01", "r03", "r04"]) and unlearner.n_forgotten == 3
    _redis_is_clean(queue)


def test_a_batch_that_would_empty_the_model_keeps_the_jobs_that_fit(queue, worker_for, unlearner):
    first = queue.enqueue([f"r{i:02d}" for i in range(30)])
    second = queue.enqueue([f"r{i:02d}" for i in range(30, 48)])
    worker_for(unlearner).run_once()
    assert queue.get(first.job_id).status == "succeeded"
    assert "every remaining" in queue.get(second.job_id).error
    assert unlearner.n_train == 18


def test_enqueue_reserves_ids_atomically(queue):
    outcomes: list[str] = []
    start = threading.Barrier(8)

    def submit(i: int) -> None:
        start.wait()
        try:
            queue.enqueue(["r01", f"r{10 + i}"])
            outcomes.append("queued")
        except AlreadyForgottenError as e:
            assert e.ids == ["r01"]
            outcomes.append("conflict")

    threads = [threading.Thread(target=submit, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(outcomes) == ["conflict"] * 7 + ["queued"]
    assert queue.client.xlen(queue.stream) == 1
    assert len(queue.client.smembers(queue.pending_key)) == 2


def test_enqueue_refuses_jobs_that_together_leave_no_point(queue):
    # 8 racing requests of 6 ids each: every one alone leaves points, all 48 together none.
    outcomes: list[str] = []
    start = threading.Barrier(8)

    def submit(i: int) -> None:
        start.wait()
        try:
            queue.enqueue([f"r{6 * i + k:02d}" for k in range(6)], n_train=48)
            outcomes.append("queued")
        except InvalidForgetSetError as e:
            assert "every remaining" in str(e)
            outcomes.append("refused")

    threads = [threading.Thread(target=submit, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(outcomes) == ["queued"] * 7 + ["refused"]
    assert queue.client.xlen(queue.stream) == 7
    assert queue.client.scard(queue.pending_key) == 42


def test_enqueue_counts_against_the_workers_size_not_a_newer_model(
    queue, worker_for, unlearner, tmp_path
):
    """Between publishing a version and releasing its jobs' ids, the API's model has already
    shrunk while the ids are still queued: counting both would refuse valid requests."""
    worker = worker_for(unlearner)
    worker.recover()  # records the model's size, as a starting worker does
    assert queue.client.get(queue.n_train_key) == "48"
    big = queue.enqueue([f"r{i:02d}" for i in range(40)], n_train=48)
    # The worker applies (checkpoints and publishes) the job but has not finished it yet.
    unlearner.forget([f"r{i:02d}" for i in range(40)], tmp_path / "checkpoints")
    assert unlearner.n_train == 8 and queue.client.scard(queue.pending_key) == 40

    # The API passes its (newer) size, 8; 40 queued + 1 must not count as emptying it.
    queue.enqueue(["r40"], n_train=unlearner.n_train)
    with pytest.raises(InvalidForgetSetError, match="every remaining"):
        queue.enqueue([f"r{i:02d}" for i in range(41, 48)], n_train=unlearner.n_train)

    # The worker finishes the batch: the size and the queued ids change together.
    worker.run_once()
    assert queue.get(big.job_id).status == "succeeded"
    assert queue.client.get(queue.n_train_key) == str(unlearner.n_train)
    with pytest.raises(InvalidForgetSetError, match="every remaining"):
        queue.enqueue([f"r{i:02d}" for i in range(41, 48)], n_train=unlearner.n_train)
    queue.enqueue([f"r{i:02d}" for i in range(41, 47)], n_train=unlearner.n_train)


def test_finished_jobs_leave_only_their_record(queue, worker_for, unlearner):
    job = queue.enqueue(["r05"])
    assert unlearner._spare.buffer is not None
    worker_for(unlearner).run_once()
    _redis_is_clean(queue)
    assert 0 < queue.client.ttl(queue.job_key(job.job_id)) <= 600
    # the job was reported first; then the next deletion's spare K buffer was made again
    spare = unlearner._spare.buffer
    assert spare is not None and not spare.is_deleted() and spare.shape == unlearner.state.k.shape


def test_deletion_log_records_each_version(queue, worker_for, unlearner, tmp_path):
    first = queue.enqueue(["r01", "r02"])
    worker = worker_for(unlearner)
    worker.run_once()
    second = queue.enqueue(["r03"])
    worker.run_once()
    lines = [json.loads(line) for line in (tmp_path / "deletions.log").read_text().splitlines()]
    assert [entry["version"] for entry in lines] == [1, 2]
    assert lines[0]["job_ids"] == [first.job_id] and "ids" not in lines[0]
    assert lines[0]["id_digests"] == [unlearner.digest("r01"), unlearner.digest("r02")]
    assert [e["version_before"] for e in lines] == [0, 1]
    assert "r01" not in (tmp_path / "deletions.log").read_text()  # keyed digests, no id in clear
    assert lines[1]["job_ids"] == [second.job_id] and lines[1]["n_forgotten"] == 3
    assert lines[1]["solver"]["converged"] is True


def test_jobs_a_crashed_worker_took_are_run_by_the_next(queue, worker_for, unlearner):
    job = queue.enqueue(["r06"])
    # A worker takes the job and dies before applying it: the entry stays unacknowledged.
    assert len(queue.read("dead-worker", block_ms=0, count=10)) == 1
    assert queue.client.xpending(queue.stream, GROUP)["pending"] == 1

    worker = worker_for(unlearner)
    assert worker.recover() == 1
    record = queue.get(job.job_id)
    assert record.status == "succeeded" and record.model_version == 1
    assert unlearner.is_forgotten(["r06"]) and unlearner.n_forgotten == 1
    _redis_is_clean(queue)
    consumers = queue.client.xinfo_consumers(queue.stream, GROUP)
    assert [c["name"] for c in consumers] == [worker.consumer]  # the dead one is gone


@pytest.mark.parametrize("logged", [True, False], ids=["logged", "checkpointed-only"])
def test_a_job_applied_before_a_crash_is_not_applied_twice(
    queue, worker_for, unlearner, tmp_path, logged
):
    job = queue.enqueue(["r07", "r08"])
    queue.read("dead-worker", block_ms=0, count=10)
    # The dead worker got as far as the checkpoint (and maybe the deletion log), not the ack.
    result = unlearner.forget(["r07", "r08"], tmp_path / "checkpoints")
    if logged:
        DeletionLog(tmp_path / "deletions.log").append(
            {
                "version": result.version,
                "timestamp": "t",
                "job_ids": [job.job_id],
                "id_digests": [],
                "solver": result.solve.to_dict(),
            }
        )

    restarted = Unlearner.restore(tmp_path / "checkpoints")
    assert restarted.version == 1
    worker_for(restarted).recover()

    record = queue.get(job.job_id)
    assert record.status == "succeeded" and record.model_version == 1
    assert (record.solver is not None) == logged
    assert restarted.version == 1 and restarted.n_forgotten == 2
    _redis_is_clean(queue)


def test_an_entry_whose_record_expired_is_dropped(queue, worker_for, unlearner):
    queue.client.xadd(queue.stream, {"job_id": "expired"})
    assert worker_for(unlearner).run_once() == 1
    assert unlearner.version == 0
    _redis_is_clean(queue)


def test_worker_thread_keeps_running_through_a_redis_outage(unlearner, tmp_path):
    queue = JobQueue(redis.Redis.from_url("redis://127.0.0.1:1/0"), "down", ttl_s=60)
    worker = Worker(unlearner, queue, tmp_path / "ck", DeletionLog(tmp_path / "log"))
    worker.start()
    try:
        time.sleep(0.5)
        assert worker.running
    finally:
        worker.stop()
    assert not worker.running


def test_a_redis_outage_is_said_once_and_its_end_too(
    queue: JobQueue, worker_for, unlearner: Unlearner, monkeypatch, caplog
):
    """Not a warning at every retry: one when Redis stops answering, one line when it answers
    again; then the worker recovers and applies what was queued."""
    from app import worker as worker_module

    monkeypatch.setattr(worker_module, "_RETRY_S", 0.05)
    worker = worker_for(unlearner)
    real_ensure_group = queue.ensure_group
    failures = {"left": 20}

    def ensure_group() -> None:
        if failures["left"] > 0:
            failures["left"] -= 1
            raise redis.ConnectionError("Connection refused (a test's outage)")
        real_ensure_group()

    monkeypatch.setattr(queue, "ensure_group", ensure_group)
    job = queue.enqueue(["r06"])
    caplog.set_level(logging.INFO, logger="app.worker")
    worker.start()
    try:
        deadline = time.monotonic() + 60
        while queue.get(job.job_id).status != "succeeded":
            assert time.monotonic() < deadline, "the job was not applied after the outage"
            time.sleep(0.05)
    finally:
        worker.stop()
    assert failures["left"] == 0
    down = [m for m in caplog.messages if "queue unreachable" in m]
    up = [m for m in caplog.messages if m.startswith("queue reachable again after")]
    assert len(down) == 1 and "a test's outage" in down[0], caplog.messages
    assert len(up) == 1, caplog.messages
    assert caplog.messages.index(down[0]) < caplog.messages.index(up[0])


def test_deletion_log_survives_a_torn_line(tmp_path):
    log = DeletionLog(tmp_path / "deletions.log")
    log.append({"version": 1, "job_ids": ["a"], "timestamp": "t", "id_digests": []})
    with open(log.path, "a") as f:
        f.write('{"version": 2, "job_ids": ["b"')  # a crash in the middle of a write
    log.append({"version": 3, "job_ids": ["c"], "timestamp": "t", "id_digests": []})
    assert log.find_job("a")["version"] == 1
    assert log.find_job("b") is None
    assert log.find_job("c")["version"] == 3


def test_an_api_without_worker_follows_a_separate_worker(make_settings, base_checkpoint):
    settings = make_settings(worker=False)
    app = create_app(settings, Unlearner.restore(base_checkpoint))
    with TestClient(app) as client:
        client.post("/v1/forget", json={"ids": ["r09"]}, headers=WRITE)
        # The worker of another process: its own model, the same data dir and Redis.
        worker_model = Unlearner.restore(base_checkpoint)
        make_worker(settings, worker_model, app.state.service.queue, None).run_once()
        assert worker_model.version == 1
        deadline = time.monotonic() + 30
        while client.get("/v1/model", headers=READ).json()["version"] != 1:
            assert time.monotonic() < deadline, "the API never loaded the worker's version"
            time.sleep(0.1)
        assert "r09" not in client.get("/v1/ids", headers=READ).json()["ids"]


def test_post_publish_work_runs_after_the_job_is_reported(queue, worker_for, unlearner):
    """One direction: compute, checkpoint, publish, log, report (succeeded + XACK), and only then
    the post-publish work (preconditioner, cache purge, spare buffer). The job record carries the
    parts that ran before it was reported, and their total."""
    job = queue.enqueue(["r07"])
    seen: list[str] = []
    original = unlearner.after_publish

    def after_publish():
        seen.append(queue.get(job.job_id).status)
        assert queue.client.xpending(queue.stream, GROUP)["pending"] == 0  # acknowledged already
        return original()

    unlearner.after_publish = after_publish
    worker_for(unlearner).run_once()
    assert seen == ["succeeded"]
    timings = queue.get(job.job_id).solver["timings"]
    parts = {"validate", "compact", "solve", "residual", "checkpoint", "publish", "log"}
    assert parts <= set(timings)
    assert timings["total"] == pytest.approx(
        sum(v for k, v in timings.items() if k != "total"), rel=0.05
    )


def test_followers_announce_what_they_prepared_and_lapse(queue: JobQueue):
    """``announce_prepared`` / ``followers_behind`` / ``wait_prepared``: the worker waits for
    the live followers behind a version, never for one that withdrew or stopped announcing."""
    assert queue.followers_behind(3) == []
    queue.announce_prepared("a", 2)
    queue.announce_prepared("b", 3)
    assert queue.followers_behind(3) == ["a"]
    started = time.monotonic()
    assert queue.wait_prepared(3, timeout_s=0.2) == ["a"]
    assert 0.2 <= time.monotonic() - started < 2.0

    def later():
        time.sleep(0.15)
        queue.announce_prepared("a", 3)

    t = threading.Thread(target=later)
    t.start()
    started = time.monotonic()
    assert queue.wait_prepared(3, timeout_s=5.0) == []
    assert time.monotonic() - started < 2.0  # ended when "a" announced, not at the timeout
    t.join()

    queue.withdraw_follower("b")
    assert queue.followers_behind(4) == ["a"]
    queue.announce_prepared("a", 3, ttl_s=0.05)  # then it stops announcing
    time.sleep(0.1)
    assert queue.followers_behind(4) == []
    assert queue.client.hgetall(queue.followers_prepared_key) == {}


def test_a_lapsed_follower_is_dropped_by_the_others_announcements(queue: JobQueue):
    """With no worker waiting (``--report-wait-s 0``) nothing calls ``followers_behind``: the
    live followers' own announcements drop a stopped one's entries."""
    queue.announce_prepared("gone", 1, ttl_s=0.05)
    time.sleep(0.1)
    queue.announce_prepared("live", 2)
    assert queue.client.zrange(queue.followers_key, 0, -1) == ["live"]
    assert queue.client.hgetall(queue.followers_prepared_key) == {"live": "2"}


def test_a_redis_error_while_waiting_for_followers_is_not_called_prepared(
    unlearner, tmp_path, caplog
):
    """``wait_prepared`` answers ``None`` (unknown), not ``[]`` (all prepared), when Redis fails;
    the worker's log says so."""
    down = JobQueue(
        redis.Redis.from_url("redis://127.0.0.1:1/0", socket_timeout=0.2), "down", ttl_s=60
    )
    started = time.monotonic()
    assert down.wait_prepared(1, timeout_s=0.5) is None
    assert time.monotonic() - started < 0.5
    worker = Worker(
        unlearner, down, tmp_path / "ck", DeletionLog(tmp_path / "log"), report_wait_s=0.5
    )
    with caplog.at_level(logging.INFO, logger="app.worker"):
        worker._wait_for_followers(1)
    assert "without knowing whether the followers prepared it" in caplog.text
    assert "after publication" not in caplog.text  # the "prepared it" line


def test_a_follower_renewing_while_lapsed_entries_are_dropped_keeps_its_entry(
    queue: JobQueue, monkeypatch
):
    """Lapsed entries are listed and deleted in one step: a follower that renews while they are
    dropped keeps its fresh entry (they were listed, then deleted by name, and a renewal in
    between was deleted with them: the worker stopped waiting for it). Also many at once (the
    deletion goes by chunks)."""
    queue.announce_prepared("A", 4, ttl_s=0.05)
    for i in range(2500):
        queue.client.zadd(queue.followers_key, {f"old-{i}": 1})
        queue.client.hset(queue.followers_prepared_key, f"old-{i}", 1)
    time.sleep(0.1)

    def renew() -> None:
        queue.client.hset(queue.followers_prepared_key, "A", 5)
        queue.client.zadd(queue.followers_key, {"A": 10**15})

    # A renews as soon as the dropping begins: after a listing of lapsed entries, or (one
    # script, nothing in between) just before it
    real_list = queue.client.zrangebyscore

    def listing(key, low, high, *args, **kwargs):
        listed = real_list(key, low, high, *args, **kwargs)
        if low == "-inf":
            renew()
        return listed

    monkeypatch.setattr(queue.client, "zrangebyscore", listing)
    script = getattr(queue, "_drop_lapsed_script", None)
    if script is not None:
        monkeypatch.setattr(queue, "_drop_lapsed_script", lambda **kw: (renew(), script(**kw)))
    behind = queue.followers_behind(6)
    monkeypatch.undo()
    assert behind == ["A"]
    assert queue.client.zcard(queue.followers_key) == 1
    assert queue.client.hgetall(queue.followers_prepared_key) == {"A": "5"}


def test_status_counts_the_unfinished_jobs_and_the_oldest_ones_age(queue: JobQueue):
    empty = queue.status()
    assert (empty.jobs, empty.oldest_s, empty.worker) == (0, 0.0, None)
    first = queue.enqueue(["r01"])
    time.sleep(0.3)
    queue.enqueue(["r02"])
    status = queue.status()
    assert status.jobs == 2
    # the first entry's id carries its time (Redis's clock): at least the 0.3 s slept since
    assert 0.3 <= status.oldest_s < 30, status
    assert "none:" in status.describe_worker() and "2 job(s) waiting" in status.describe_worker()
    # a delivered but unfinished job still counts; a finished one does not
    entries = queue.read("c", 0, 1)
    assert status.jobs == queue.status().jobs == 2
    queue.finish([(entries[0], {"status": "succeeded"})])
    after = queue.status()
    assert after.jobs == 1 and after.oldest_s < status.oldest_s
    assert entries[0].job is not None and entries[0].job.job_id == first.job_id


def test_the_worker_heartbeat_lapses_and_ends_with_its_worker(queue: JobQueue):
    queue.beat("w-1", 3, busy_since=None, ttl_s=0.5)
    status = queue.status()
    assert (status.worker, status.worker_version, status.worker_busy_s) == ("w-1", 3, None)
    assert 0 <= status.worker_seen_s < 0.5
    assert status.describe_worker().startswith("alive: w-1, model version 3")
    time.sleep(0.7)
    assert queue.status().worker is None  # not renewed: lapsed
    # busy since 2 s ago by this host's clock: about 2 s by Redis's (same host here)
    queue.beat("w-1", 4, busy_since=time.time() - 2.0)
    busy = queue.status()
    assert busy.worker_version == 4 and 1.9 <= busy.worker_busy_s < 3, busy
    assert "busy with a batch for" in busy.describe_worker()
    assert "purge and preconditioner after it is reported" in busy.describe_worker()
    queue.end_beat("someone-else")  # another worker's end leaves this one's heartbeat
    assert queue.status().worker == "w-1"
    queue.end_beat("w-1")
    assert queue.status().worker is None


def test_a_running_worker_beats_while_it_runs_and_not_after(
    queue: JobQueue, worker_for, unlearner: Unlearner, monkeypatch
):
    worker = worker_for(unlearner)
    queue.enqueue(["r05"])
    solving = threading.Event()
    release = threading.Event()
    forget = unlearner.forget

    def slow_forget(*args, **kwargs):
        solving.set()
        release.wait(30)
        return forget(*args, **kwargs)

    monkeypatch.setattr(unlearner, "forget", slow_forget)
    after_publish, post_publish = unlearner.after_publish, threading.Event()

    def slow_after_publish(*args, **kwargs):
        post_publish.wait(30)
        return after_publish(*args, **kwargs)

    monkeypatch.setattr(unlearner, "after_publish", slow_after_publish)
    worker.start()  # renewals every 5 s, and at once when a batch begins or ends
    try:
        assert solving.wait(60)
        deadline = time.monotonic() + 2
        status = queue.status()
        while status.worker_busy_s is None and time.monotonic() < deadline:
            time.sleep(0.05)
            status = queue.status()
        # during the solve: alive, busy, the job still counted
        assert status.worker == worker.consumer and status.worker_version == 0
        assert status.worker_busy_s is not None and status.jobs == 1
        release.set()
        deadline = time.monotonic() + 60
        while queue.status().jobs and time.monotonic() < deadline:
            time.sleep(0.05)
        # reported, its post-publish work still running: the heartbeat names the new version at
        # once (it said the old one until its next renewal, 5 s)
        deadline = time.monotonic() + 1
        status = queue.status()
        while status.worker_version != 1 and time.monotonic() < deadline:
            time.sleep(0.05)
            status = queue.status()
        assert status.worker_version == 1 and status.worker_busy_s is not None
        post_publish.set()
        deadline = time.monotonic() + 2
        status = queue.status()
        while status.worker_busy_s is not None and time.monotonic() < deadline:
            time.sleep(0.05)
            status = queue.status()
        assert status.jobs == 0 and status.worker_version == 1 and status.worker_busy_s is None
    finally:
        release.set()
        post_publish.set()
        worker.stop()
    assert queue.status().worker is None  # stopped: its heartbeat deleted, not left to lapse
    assert (
        queue.status().describe_worker().startswith("none: no worker holds the queue (one stopped")
    )


def test_a_heartbeat_written_by_someone_else_is_no_error(queue: JobQueue):
    """Another writer of the key (another version of this code, a foreign app): /readyz and
    /metrics must still answer."""
    queue.client.hset(queue.worker_key, mapping={"worker": "w-x", "version": "4.0"})
    status = queue.status()
    assert status.worker == "w-x (unreadable heartbeat)" and status.worker_version is None
    assert status.describe_worker() == "alive: w-x (unreadable heartbeat)"
    queue.client.delete(queue.worker_key)
    queue.client.set(queue.worker_key, "not a hash")
    assert queue.status().worker is None


def test_a_second_worker_on_the_prefix_is_told_and_does_not_take_the_heartbeat(queue: JobQueue):
    assert queue.beat("w-1", 0, None) is None
    assert queue.beat("w-1", 1, None) is None  # itself: no one else
    assert queue.beat("w-2", 0, None) == "w-1"
    assert queue.status().worker == "w-1"  # the claim stays the first worker's
    # a holder known to be gone may be replaced; then the first worker is the one told
    assert queue.beat("w-2", 0, None, replace="w-1") is None
    assert queue.status().worker == "w-2"
    assert queue.beat("w-1", 1, None) == "w-2"
    queue.end_beat("w-2")
    assert queue.beat("w-1", 1, None) is None  # ended: free at once


def test_one_worker_holds_the_queue_a_copy_waits_then_takes_over(
    queue: JobQueue, tmp_path: Path, base_checkpoint: Path, caplog
):
    """A copy of a data dir run beside the original on one queue (a restored backup): before,
    both workers took its jobs, each applying them to its own model, and a job could say
    succeeded while the model serving its records never forgot them. Now the worker holding the
    queue's heartbeat applies them all; the copy's worker applies none and says why, and takes
    over once the holder stops."""
    models = [Unlearner.restore(base_checkpoint) for _ in range(2)]
    workers = [
        Worker(u, queue, tmp_path / name / "checkpoints", DeletionLog(tmp_path / name / "log"))
        for u, name in zip(models, ("original", "copy"), strict=True)
    ]
    workers[0].consumer, workers[1].consumer = "host-a-1", "host-b-1"  # other hosts: never "gone"
    caplog.set_level(logging.INFO, logger="app.worker")

    def applying(prefix: str) -> list[str]:  # the log lines of workers saying they apply jobs
        return [
            r.getMessage()
            for r in caplog.records
            if r.getMessage().startswith(f"worker applying the jobs of queue {prefix}:*")
        ]

    def applied(u: Unlearner, n: int) -> None:
        deadline = time.monotonic() + 60
        while u.n_forgotten < n and time.monotonic() < deadline:
            time.sleep(0.05)
        assert u.n_forgotten == n, (u.n_forgotten, n)

    workers[0].start()
    try:
        deadline = time.monotonic() + 10
        while queue.status().worker != "host-a-1" and time.monotonic() < deadline:
            time.sleep(0.05)
        workers[1].start()
        for i in range(1, 5):
            queue.enqueue([f"r{i:02d}"])
            time.sleep(0.3)
        applied(models[0], 4)
        time.sleep(1.0)
        assert models[1].n_forgotten == 0 and models[1].version == 0
        assert "another worker (host-a-1) holds this data dir's queue" in caplog.text
        # only the holder says it applies the queue's jobs (the copy's said so before, too)
        assert applying(queue.prefix) == [
            f"worker applying the jobs of queue {queue.prefix}:* to model version 0"
        ]
        workers[0].stop()  # its heartbeat deleted: the copy's worker takes the queue
        queue.enqueue(["r05"])
        applied(models[1], 1)
        assert len(applying(queue.prefix)) == 2
        assert models[0].n_forgotten == 4 and queue.status().worker == "host-b-1"
    finally:
        for w in workers:
            w.stop()


def test_succeeded_after_reads_only_what_a_roll_back_lacks(queue: JobQueue):
    """The succeeded jobs of versions newer than the one given, read only when a newer version
    was reported; a hash that is no job record of this release is skipped, not fatal (the
    worker's recovery would fail on it at every retry)."""
    good = {"job_id": "good", "status": "succeeded", "submitted_at": "t", "model_version": "3"}
    queue.client.hset(queue.job_key("good"), mapping=good)
    queue.client.hset(queue.job_key("old"), mapping={**good, "job_id": "old", "model_version": "1"})
    queue.client.hset(
        queue.job_key("failed"), mapping={**good, "job_id": "failed", "status": "failed"}
    )
    queue.client.hset(queue.job_key("odd"), mapping={"status": "succeeded"})  # no job_id
    queue.client.hset(
        queue.job_key("odder"), mapping={**good, "job_id": "odder", "model_version": "x"}
    )
    assert queue.succeeded_after(1) == []  # nothing reported: no scan
    queue.record_n_train(40, 3)
    assert [j.job_id for j in queue.succeeded_after(1)] == ["good"]
    assert queue.succeeded_after(3) == []  # not behind the reported version


def test_a_killed_workers_heartbeat_is_replaced_at_once(
    queue: JobQueue, worker_for, unlearner: Unlearner
):
    """This data dir's worker killed on this host (SIGKILL: its heartbeat lives on for up to
    15 s) does not hold the queue from the worker started after it; a live one, one of another
    host, or a killed worker of a copy of the data dir (another checkpoint directory) does."""
    import socket
    import subprocess
    import sys

    from app.worker import _gone_from_this_host

    host = socket.gethostname()
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        assert not _gone_from_this_host(f"{host}-{child.pid}")  # alive
    finally:
        child.kill()
        child.wait()
    assert _gone_from_this_host(f"{host}-{child.pid}")
    assert not _gone_from_this_host(f"another-host-{child.pid}")
    worker = worker_for(unlearner)
    # a killed worker of a copy of the data dir (another checkpoint directory) is waited for:
    # else a copy already running took the queue before the original's worker restarted
    queue.beat(f"{host}-{child.pid}", 0, None, home=str(worker.home) + "-copy")
    assert worker.claim_queue() == f"{host}-{child.pid}"
    # this data dir's own killed worker (same checkpoint directory): replaced at once
    queue.client.delete(queue.worker_key)
    queue.beat(f"{host}-{child.pid}", 0, None, home=worker.home)
    assert worker.claim_queue() is None and queue.status().worker == worker.consumer


def test_a_shared_redis_keeps_the_queue_with_its_data_dir_until_taken_over(queue: JobQueue):
    """With ``sticky`` (REDIS_URL), the queue remembers its last holder's checkpoint directory:
    another one's worker does not take it even once the heartbeat is gone, unless told to."""
    from app.queue import OtherHomeError

    assert queue.beat("w-1", 0, None, home="/a/checkpoints", sticky=True) is None
    # kept without expiry: with the job TTL's, a copy took the queue once it lapsed (helper-46)
    assert queue.client.ttl(queue.worker_home_key) == -1
    queue.end_beat("w-1")  # stopped cleanly: no heartbeat left
    with pytest.raises(OtherHomeError) as refused:
        queue.beat("w-2", 0, None, home="/copy/checkpoints", sticky=True)
    assert refused.value.home == "/a/checkpoints" and queue.status().worker is None
    # the original's worker restarted: its own home
    assert queue.beat("w-3", 0, None, home="/a/checkpoints", sticky=True) is None
    queue.end_beat("w-3")
    # the operator moved the data dir: --take-over-queue, once
    assert queue.beat("w-2", 0, None, home="/b/checkpoints", sticky=True, take_over=True) is None
    queue.end_beat("w-2")
    assert queue.beat("w-4", 0, None, home="/b/checkpoints", sticky=True) is None
    queue.end_beat("w-4")
    with pytest.raises(OtherHomeError):
        queue.beat("w-1", 0, None, home="/a/checkpoints", sticky=True)
    # without sticky (the data dir's private Redis) the home is not consulted
    assert queue.beat("w-1", 0, None, home="/a/checkpoints") is None


def test_a_copys_worker_never_takes_a_shared_queue_unless_told(
    queue: JobQueue, tmp_path: Path, base_checkpoint: Path, caplog
):
    """helper-45: a copy's worker took the queue once the original's heartbeat was gone and
    applied the next jobs to the copy's model (they said succeeded; the original served the
    records). On a shared Redis it now waits, saying why, until started with take_over."""
    models = [Unlearner.restore(base_checkpoint) for _ in range(3)]

    def worker(u: Unlearner, name: str, **kw) -> Worker:
        return Worker(
            u, queue, tmp_path / name / "checkpoints", DeletionLog(tmp_path / name / "log"),
            sticky_home=True, **kw,
        )  # fmt: skip

    original, copy = worker(models[0], "original"), worker(models[1], "copy")
    caplog.set_level(logging.WARNING, logger="app.worker")
    original.start()
    try:
        deadline = time.monotonic() + 10
        while queue.status().worker != original.consumer and time.monotonic() < deadline:
            time.sleep(0.05)
        early = worker(models[1], "copy")  # beside the live original: told it never takes it
        early.consumer = "host-b-1"  # another host's process (in-process workers share a name)
        early.start()
        deadline = time.monotonic() + 10
        while "now or once that worker stops" not in caplog.text and time.monotonic() < deadline:
            time.sleep(0.05)
        early.stop()
        assert "now or once that worker stops" in caplog.text, caplog.text
        assert "until that heartbeat lapses" not in caplog.text
        original.stop()  # a clean stop: no heartbeat left at all
        copy.start()
        queue.enqueue(["r01"])
        time.sleep(3.0)
        assert models[1].n_forgotten == 0 and queue.status().jobs == 1
        assert "was last held by the worker of" in caplog.text, caplog.text
        copy.stop()
        moved = worker(models[2], "copy", take_over=True)  # the operator's --take-over-queue
        moved.start()
        deadline = time.monotonic() + 60
        while models[2].n_forgotten < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert models[2].n_forgotten == 1 and models[0].n_forgotten == 0
    finally:
        for w in (original, copy):
            w.stop()
        if "moved" in locals():
            moved.stop()
