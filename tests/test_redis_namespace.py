"""Each data directory's queue lives under a Redis namespace of its own (``app.service.queue_prefix``):
two models given one ``--redis-prefix`` never share a job, and a worker refuses to start while
jobs an earlier release queued under the bare prefix wait."""

from __future__ import annotations

import re
import socket
import time

import pytest
import redis
from fastapi.testclient import TestClient

from app import cli, service
from app.main import create_app
from app.receipts import DeploymentKeys
from app.service import queue_prefix
from service_core import Unlearner

WRITE = {"Authorization": "Bearer write-token"}
READ = {"Authorization": "Bearer read-token"}


def test_the_namespace_is_one_per_data_dir(tmp_path):
    a1 = DeploymentKeys.load_or_create(tmp_path / "a").namespace
    a2 = DeploymentKeys.load_or_create(tmp_path / "a").namespace  # another process of it
    b = DeploymentKeys.load_or_create(tmp_path / "b").namespace
    assert re.fullmatch(r"[0-9a-f]{16}", a1) and a1 == a2 and a1 != b


def test_two_data_dirs_on_one_prefix_each_apply_only_their_own_forgets(
    make_settings, base_checkpoint, redis_url, redis_prefix, wait_for_job
):
    """Two models (two data dirs, each with its worker) given one prefix: every forget is
    applied by the model it was asked of, and the other still holds the record. With one queue
    per prefix, the two workers took turns at the one stream, each applying about half of
    both models' jobs to its own."""
    apps = {}
    for name in ("a", "b"):
        settings = make_settings(data_dir=make_settings().data_dir.parent / name)
        unlearner = Unlearner.restore(base_checkpoint)
        apps[name] = (settings, TestClient(create_app(settings, unlearner)))
    asked = {"a": ["r01", "r02", "r03", "r04", "r05", "r06"], "b": ["r11", "r12", "r13", "r14"]}
    with apps["a"][1] as client_a, apps["b"][1] as client_b:
        clients = {"a": client_a, "b": client_b}
        for name, ids in asked.items():
            client = clients[name]
            for record in ids:
                r = client.post("/v1/forget", json={"ids": [record]}, headers=WRITE)
                assert r.status_code == 202, r.text
                assert wait_for_job(client, r.json()["job_id"])["status"] == "succeeded"
        for name, client in clients.items():
            model = client.get("/v1/model", headers=READ).json()
            assert model["version"] == len(asked[name]), (name, model)
            for other, ids in asked.items():
                for record in ids:
                    state = client.get(f"/v1/records/{record}", headers=READ).json()["status"]
                    assert state == ("forgotten" if other == name else "active"), (name, record)
    prefixes = {name: queue_prefix(settings) for name, (settings, _) in apps.items()}
    assert prefixes["a"] != prefixes["b"]
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    try:
        for name, prefix in prefixes.items():
            assert prefix.startswith(f"{redis_prefix}:")
            assert client.get(f"{prefix}:version") == str(len(asked[name]))
        # nothing of either queue directly under the bare prefix
        assert not client.exists(f"{redis_prefix}:forget", f"{redis_prefix}:version")
    finally:
        client.close()


def test_a_worker_refuses_jobs_an_earlier_release_queued_under_the_bare_prefix(
    make_settings, redis_url, redis_prefix, monkeypatch
):
    """Jobs in ``P:forget`` (one queue per prefix, before namespaces) would never be applied:
    `worker` and `serve` refuse at once in one line saying how many and what to do, before the
    model loads; `serve --no-worker` (it applies nothing) starts; with the key gone, so does the
    worker."""
    loads: list[str] = []

    def load_model(settings, role="serve"):
        loads.append(role)
        raise SystemExit("stopped at the model load")

    monkeypatch.setattr(service, "load_model", load_model)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    settings = make_settings(port=port)
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    stream = f"{redis_prefix}:forget"
    try:
        client.xadd(stream, {"job_id": "queued-before"})
        client.xadd(stream, {"job_id": "queued-before-too"})
        for run, who in ((cli.worker, "worker"), (cli.serve, "serve")):
            started = time.monotonic()
            with pytest.raises(SystemExit) as caught:
                run(settings)
            assert time.monotonic() - started < 5
            message = str(caught.value)
            assert message.startswith(f"ntk-unlearn {who}: 2 job(s) are queued under the Redis ")
            assert stream in message and "delete the key" in message and "\n" not in message
        assert loads == []
        with pytest.raises(SystemExit, match="stopped at the model load"):
            cli.serve(settings.model_copy(update={"worker": False}))
        client.delete(stream)
        with pytest.raises(SystemExit, match="stopped at the model load"):
            cli.worker(settings)
        assert loads == ["serve", "worker"]
    finally:
        client.delete(stream)
        client.close()


def test_the_refusal_with_the_private_redis_says_to_finish_them_with_that_release(
    make_settings, redis_url, redis_prefix
):
    """`serve` without REDIS_URL stops its private Redis on the way out: "delete the key" would
    need a Redis nobody runs, so the way on is to let the earlier release's serve finish them."""
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    stream = f"{redis_prefix}:forget"
    try:
        client.xadd(stream, {"job_id": "queued-before"})
        with pytest.raises(SystemExit) as caught:
            cli._refuse_unnamespaced_jobs(make_settings(), "serve", private=True)
        message = str(caught.value)
        assert "start that release's 'serve' on this data dir once" in message
        assert "delete the key" not in message
    finally:
        client.delete(stream)
        client.close()


def test_a_running_worker_says_when_an_earlier_release_queues_under_the_bare_prefix(
    make_settings, unlearner, redis_url, redis_prefix, caplog
):
    """An earlier release's API process beside this release's worker (a rolling upgrade) queues
    where no worker of this release looks: the worker says so once a minute, not never."""
    import logging

    from app.deletion_log import DeletionLog
    from app.queue import JobQueue
    from app.worker import Worker

    settings = make_settings()
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    stream = f"{redis_prefix}:forget"
    queue = JobQueue(client, queue_prefix(settings), 600)
    worker = Worker(
        unlearner, queue, settings.checkpoint_dir, DeletionLog(settings.deletion_log),
        legacy_stream=stream,
    )  # fmt: skip
    caplog.set_level(logging.WARNING, logger="app.worker")
    try:
        worker.start()
        time.sleep(0.5)
        assert not [m for m in caplog.messages if stream in m]  # nothing there: nothing said
        client.xadd(stream, {"job_id": "queued-by-an-earlier-release"})
        worker._beat_now.set()  # the next heartbeat, now rather than in 5 s
        deadline = time.monotonic() + 10
        while not [m for m in caplog.messages if stream in m]:
            assert time.monotonic() < deadline, caplog.messages
            time.sleep(0.05)
        said = [m for m in caplog.messages if stream in m]
        assert said[0].startswith("1 job(s) are queued under the Redis key"), said
    finally:
        worker.stop()
        client.delete(stream)
        client.close()


def test_a_lost_secret_is_never_replaced_silently_once_deletions_are_logged(make_settings):
    """A new id secret would move the data dir to another Redis namespace (processes started
    since would not meet the others) and turn its forgotten records 'unknown'; a new receipt
    key would not verify earlier receipts: with deletions logged, a missing one is an error
    saying how to restore it, or how to make one knowingly. Before any deletion, both are made."""
    from app.deletion_log import DeletionLog
    from app.receipts import ID_SECRET_FILE, SIGNING_KEY_FILE

    settings = make_settings()
    first = service.deployment_keys(settings)  # no deletion logged: made
    DeletionLog(settings.deletion_log).append(
        {"version": 1, "job_ids": ["j"], "timestamp": "t", "id_digests": [first.digest("r01")]}
    )
    assert service.deployment_keys(settings).namespace == first.namespace  # read, not made
    for name, command in ((ID_SECRET_FILE, "head -c 32"), (SIGNING_KEY_FILE, "openssl genpkey")):
        path = settings.data_dir / name
        kept = path.read_bytes()
        path.unlink()
        with pytest.raises(service.MissingSecretError) as caught:
            service.deployment_keys(settings)
        message = str(caught.value)
        assert (
            message.startswith(f"{path} is missing, but ") and "restore it from a backup" in message
        )
        assert command in message and "\n" not in message
        assert not path.exists()  # nothing made
        path.write_bytes(kept)
    assert service.deployment_keys(settings).namespace == first.namespace
