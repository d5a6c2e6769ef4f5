"""The queue's lineage (``P:lineage``, the data dir's ``queue-lineage``): once another data dir's
worker took the queue over (``--take-over-queue``), the data dir it was taken from answers no
model request (its API processes, followers or not) and its worker applies nothing, even after
the taker stops, until it takes the queue back. helper-47: after a take-over, the original's
follower kept answering ready, served a record whose job had succeeded on the taker's model, and
accepted a re-forget of it (202)."""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from app.deletion_log import DeletionLog
from app.main import create_app
from app.queue import JobQueue, OtherLineageError
from app.worker import LINEAGE_FILE, SUPERSEDED_FILE, Worker, read_lineage
from service_core import Unlearner

pytestmark = pytest.mark.redis

READ = {"Authorization": "Bearer read-token"}
WRITE = {"Authorization": "Bearer write-token"}


def _until(condition: Callable[[], bool], timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def test_a_take_over_moves_the_lineage_and_the_original_applies_nothing_after(
    queue: JobQueue, tmp_path: Path, base_checkpoint: Path, caplog
):
    def worker(name: str, **kw) -> tuple[Worker, Unlearner]:
        data = tmp_path / name
        # the data dir's newest version (a restart), else the base model (a first start)
        u = Unlearner.restore(data / "checkpoints") or Unlearner.restore(base_checkpoint)
        w = Worker(
            u, queue, data / "checkpoints", DeletionLog(data / "log"), sticky_home=True,
            lineage_file=data / LINEAGE_FILE, **kw,
        )  # fmt: skip
        return w, u

    caplog.set_level(logging.INFO, logger="app.worker")
    original, original_model = worker("original")
    original.start()
    (tmp_path / "original").mkdir(exist_ok=True)
    try:
        assert _until(lambda: queue.status().worker == original.consumer)
        first = read_lineage(tmp_path / "original" / LINEAGE_FILE)
        assert first is not None and queue.lineage() == first  # set by the first holder
        queue.enqueue(["r01"])
        assert _until(lambda: original_model.n_forgotten == 1)
        original.stop()
        # the operator's copy (cp -a: the lineage file too), started with --take-over-queue
        (tmp_path / "copy").mkdir()
        shutil.copy(tmp_path / "original" / LINEAGE_FILE, tmp_path / "copy" / LINEAGE_FILE)
        taker, taker_model = worker("copy", take_over=True)
        taker.start()
        # Redis first, then the file (the claim script, then the taker's write)
        assert _until(lambda: read_lineage(tmp_path / "copy" / LINEAGE_FILE) != first)
        moved = read_lineage(tmp_path / "copy" / LINEAGE_FILE)
        assert moved not in (None, first) and queue.lineage() == moved
        assert read_lineage(tmp_path / "original" / LINEAGE_FILE) == first
        queue.enqueue(["r02"])
        assert _until(lambda: taker_model.n_forgotten == 1)
        taker.stop()  # gone: no heartbeat, and yet the original's worker must not take it
        again, again_model = worker("original")
        again.start()
        queue.enqueue(["r03"])
        time.sleep(2.0)
        assert again_model.n_forgotten == 1 and queue.status().jobs == 1  # r01 only
        assert again.superseded is not None and "took it over" in again.superseded
        assert "another data dir's worker took it over" in caplog.text
        assert queue.lineage() == moved and queue.status().worker is None  # wrote nothing
        with pytest.raises(OtherLineageError):
            queue.beat("w", 0, None, home="/x", lineage=first)
        again.stop()
        # A Redis restarted without its data forgets the lineage; the data dir remembers it was
        # superseded (helper-49: the original took the queue back and served forgotten records)
        assert (tmp_path / "original" / SUPERSEDED_FILE).exists()
        queue.client.delete(queue.lineage_key)
        plain, plain_model = worker("original")
        plain.start()
        time.sleep(2.0)
        assert plain.superseded is not None and plain_model.n_forgotten == 1
        assert queue.lineage() is None and queue.status().jobs == 1
        plain.stop()
        queue.client.set(queue.lineage_key, moved)
        # taken back, on purpose: a new lineage, and the queue's jobs are applied here again
        back, back_model = worker("original", take_over=True)
        back.start()
        assert _until(lambda: back_model.n_forgotten == 2)  # r01 and r03 (r02: the copy's)
        assert read_lineage(tmp_path / "original" / LINEAGE_FILE) == queue.lineage()
        assert queue.lineage() not in (first, moved)
        assert not (tmp_path / "original" / SUPERSEDED_FILE).exists()
        back.stop()
    finally:
        for name in ("original", "taker", "again", "plain", "back"):
            if name in locals():
                locals()[name].stop()


def test_an_api_process_whose_data_dir_lost_the_queue_answers_no_model_request(
    make_settings, unlearner, redis_url
):
    """Followers (``serve --no-worker``) and a ``serve`` with its worker alike: once the
    queue's lineage is another data dir's, every model request and ``/readyz`` is 503 saying
    why, and a forget is refused (it would be queued for another model)."""
    body = {"x": [[0.0, 0.0, 0.0, 0.0]]}
    for worker in (False, True):
        settings = make_settings(worker=worker)
        with TestClient(create_app(settings, unlearner)) as client:
            state = client.app.state.service
            if not worker:
                # the data dir's worker runs elsewhere: its lineage file and P:lineage
                (settings.data_dir / LINEAGE_FILE).write_text("ours\n")
                state.queue.client.set(state.queue.lineage_key, "ours")
            else:
                assert _until(lambda q=state.queue: q.lineage() is not None)  # set by its worker
                assert state.queue.lineage() == read_lineage(settings.data_dir / LINEAGE_FILE)
            assert client.get("/readyz").status_code == 200
            assert client.post("/v1/predict", json=body, headers=READ).status_code == 200
            # another data dir's worker took the queue over
            state.queue.client.set(state.queue.lineage_key, "theirs")
            if worker:
                state.worker._beat_now.set()
            assert _until(lambda: client.get("/readyz").status_code == 503, timeout=10)
            readyz = client.get("/readyz").json()
            assert "took it over" in readyz["detail"], readyz
            assert "rolled back" not in readyz["detail"], readyz
            for method, path, json_body in (
                ("POST", "/v1/predict", body),
                ("GET", "/v1/ids", None),
                ("POST", "/v1/forget", {"ids": ["r01"]}),
            ):
                r = client.request(method, path, json=json_body, headers=WRITE)
                assert r.status_code == 503 and "took it over" in r.json()["detail"], (path, r.text)
            if not worker:
                # the data dir takes the queue back: it answers again (it stayed 503, helper-49)
                state.queue.client.set(state.queue.lineage_key, "ours")
                assert _until(lambda c=client: c.get("/readyz").status_code == 200, timeout=10)
                # a data dir without its lineage file while the queue has one: not its queue
                (settings.data_dir / LINEAGE_FILE).unlink()
                assert _until(lambda c=client: c.get("/readyz").status_code == 503, timeout=10)
            state.queue.client.delete(state.queue.lineage_key)
        if settings.data_dir.exists():
            shutil.rmtree(settings.data_dir)


def test_a_data_dir_taking_the_queue_back_forgets_what_the_other_forgot_whatever_its_versions(
    make_settings, unlearner, wait_for_job, tmp_path: Path
):
    """helper-47: a copy took the queue over and numbered its versions from its own (v2 caught
    up on the original's v2 and v3; a new job said version 3); the original, taking it back at its
    own version 3, skipped that job (not newer than 3) and served its record as active, with the
    job and its receipt saying it was gone."""
    from app.service import load_model

    def forget(client: TestClient, ids: list[str]) -> dict:
        r = client.post("/v1/forget", json={"ids": ids}, headers=WRITE)
        assert r.status_code == 202, r.text
        return wait_for_job(client, r.json()["job_id"])

    a = make_settings(data_dir=tmp_path / "a")
    with TestClient(create_app(a, unlearner)) as client:
        assert forget(client, ["r01"])["model_version"] == 1
        shutil.copytree(a.data_dir, tmp_path / "b")  # the copy, at version 1
        assert forget(client, ["r02"])["model_version"] == 2
        assert forget(client, ["r03"])["model_version"] == 3
    b = make_settings(data_dir=tmp_path / "b", take_over_queue=True)
    copy = load_model(b)  # catches up on r02 and r03 as one version
    assert copy.version == 2 and copy.is_forgotten(["r01", "r02", "r03"])
    with TestClient(create_app(b, copy)) as client:
        assert forget(client, ["r04"])["model_version"] == 3  # the copy's number
    original = load_model(make_settings(data_dir=tmp_path / "a", take_over_queue=True))
    assert original.is_forgotten(["r01", "r02", "r03", "r04"]), original.version
    assert original.version == 4


def test_a_serve_whose_worker_waits_for_the_queue_answers_no_model_request(
    make_settings, unlearner, wait_for_job, tmp_path: Path, monkeypatch
):
    """helper-49: a copy's ``serve`` (with its worker) beside the live original waited for the
    queue, and meanwhile served a record the original's worker had forgotten, and took forgets.
    And a take-over started while the holder still runs catches up, once it holds the queue, on
    the jobs that holder applied meanwhile (they were missed: only the start caught up)."""
    from app.service import load_model

    body = {"x": [[0.0, 0.0, 0.0, 0.0]]}
    a = make_settings(data_dir=tmp_path / "a")
    original = TestClient(create_app(a, unlearner))
    original.__enter__()
    try:
        r = original.post("/v1/forget", json={"ids": ["r01"]}, headers=WRITE)
        assert wait_for_job(original, r.json()["job_id"])["model_version"] == 1
        shutil.copytree(a.data_dir, tmp_path / "b")
        b = make_settings(data_dir=tmp_path / "b", take_over_queue=True)
        copy_app = create_app(b, load_model(b))
        with monkeypatch.context() as m:  # its worker: another host's (in-process: one name)
            m.setattr("app.worker.socket.gethostname", lambda: "host-b")
            copy = TestClient(copy_app).__enter__()
        try:
            assert _until(lambda: copy.get("/readyz").status_code == 503, timeout=15)
            assert "does not hold its data dir's queue" in copy.get("/readyz").json()["detail"]
            r = copy.post("/v1/predict", json=body, headers=READ)
            assert r.status_code == 503 and "does not hold" in r.json()["detail"], r.text
            assert copy.post("/v1/forget", json={"ids": ["r03"]}, headers=WRITE).status_code == 503
            r = original.post("/v1/forget", json={"ids": ["r02"]}, headers=WRITE)
            assert wait_for_job(original, r.json()["job_id"])["model_version"] == 2
            original.__exit__(None, None, None)  # its worker stops: the copy takes the queue
            original = None
            assert _until(lambda: copy.get("/readyz").status_code == 200, timeout=30)
            status = copy.get("/v1/records/r02", headers=READ).json()
            assert status["status"] == "forgotten", status
            assert copy.app.state.service.unlearner.is_forgotten(["r01", "r02"])
        finally:
            copy.__exit__(None, None, None)
    finally:
        if original is not None:
            original.__exit__(None, None, None)


def test_a_lineage_file_that_cannot_be_written_holds_nothing_and_says_so_once(
    queue: JobQueue, tmp_path: Path, base_checkpoint: Path, caplog
):
    """helper-49: a directory where the lineage file goes made the worker log a traceback at
    every retry. It now applies nothing, says why in one line (once a minute), and takes the
    queue once the file can be written."""
    data = tmp_path / "d"
    (data / LINEAGE_FILE).mkdir(parents=True)
    u = Unlearner.restore(base_checkpoint)
    w = Worker(
        u, queue, data / "checkpoints", DeletionLog(data / "log"), lineage_file=data / LINEAGE_FILE
    )
    caplog.set_level(logging.INFO, logger="app.worker")
    w.start()
    try:
        queue.enqueue(["r01"])
        time.sleep(2.5)
        assert u.n_forgotten == 0 and queue.lineage() is None
        said = [r for r in caplog.records if "cannot write" in r.getMessage()]
        assert len(said) == 1 and said[0].exc_info is None, caplog.text
        assert "Traceback" not in caplog.text and "could not renew" not in caplog.text
        (data / LINEAGE_FILE).rmdir()
        assert _until(lambda: u.n_forgotten == 1)
        assert queue.lineage() == read_lineage(data / LINEAGE_FILE)
    finally:
        w.stop()
