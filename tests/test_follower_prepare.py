"""``ModelFollower.poll``: an API process without a worker prepares a new version as soon as its
checkpoint is in the data dir, serves it only once the worker has reported it, and never serves a
version whose checkpoint was dropped and written again meanwhile.

No Redis: the reported version is a plain attribute here (``FixedQueue``); the worker is a second
model on the same checkpoint directory (``test_engine``'s pair)."""

from __future__ import annotations

import dataclasses
import types

import numpy as np
import pytest
import redis

from app.deletion_log import DeletionLog
from app.service import FollowerBehindError, ModelFollower
from service_core import ModelConfig, SolverConfig, TrainConfig, Unlearner, checkpoint


class FixedQueue:
    """The queue's view a follower reads: the version the worker reported (``None``: nothing
    yet), or a Redis that does not answer."""

    def __init__(self, version: int | None):
        self.version = version
        self.down = False

    def reported_version(self) -> int | None:
        if self.down:
            raise redis.ConnectionError("refused")
        return self.version


def _setup(tmp_path, digits):
    ds = digits.subset(slice(0, 60))
    cfg = (ModelConfig(kind="mlp", width=16), TrainConfig(loss="mse", dtype="float64"))
    worker = Unlearner.build(ds, *cfg, SolverConfig(), progress=False)
    worker.save(tmp_path / "ck")
    served = Unlearner.restore(tmp_path / "ck", progress=False)
    queue = FixedQueue(0)
    state = types.SimpleNamespace(
        queue=queue,
        unlearner=served,
        settings=types.SimpleNamespace(checkpoint_dir=tmp_path / "ck"),
        deletion_log=None,
    )
    return ds, worker, served, queue, ModelFollower(state)


def test_a_checkpointed_version_is_prepared_at_once_and_served_only_once_reported(tmp_path, digits):
    ds, worker, served, queue, follower = _setup(tmp_path, digits)
    before = served.predict(ds.x_test[:4])
    gone = worker.active_ids()[:3]
    worker.forget(gone, checkpoint_dir=tmp_path / "ck")  # checkpointed, not reported yet

    assert not follower.poll()
    assert served.version == 0 and follower._prepared is not None
    assert follower._prepared.version == 1
    np.testing.assert_array_equal(served.predict(ds.x_test[:4]), before)  # the old one serves
    assert set(gone) <= set(served.active_ids())

    # Reported: the next round is a swap, without reading the checkpoint again.
    def no_read(*args, **kwargs):
        raise AssertionError("a prepared version is not read again")

    reads = served.read_newer
    served.read_newer = no_read
    queue.version = 1
    assert follower.poll()
    served.read_newer = reads
    assert served.version == 1 and follower._prepared is None
    assert not set(gone) & set(served.active_ids())
    np.testing.assert_allclose(
        served.predict(ds.x_test[:4]), worker.predict(ds.x_test[:4]), rtol=1e-12, atol=1e-12
    )
    np.testing.assert_array_equal(np.asarray(served.state.k), np.asarray(worker.state.k))
    assert not follower.poll()  # nothing newer


def test_a_version_dropped_and_written_again_is_read_again(tmp_path, digits):
    """The worker drops a checkpointed version when its deletion-log record fails
    (``Unlearner.forget``: the checkpoint is pruned), and its retry writes the same version number
    with more records forgotten: the follower must serve the second one, not what it prepared
    from the first."""
    ds, worker, served, queue, follower = _setup(tmp_path, digits)
    ck = tmp_path / "ck"
    first_try = Unlearner.restore(ck, progress=False)  # the worker's first attempt
    first_try.use_id_key(worker.state.id_key)
    first_try.forget(worker.active_ids()[:2], checkpoint_dir=ck)
    assert not follower.poll() and follower._prepared.version == 1  # prepared, not reported
    checkpoint.prune(ck, keep=0)  # dropped: its log record failed
    retried = worker.active_ids()[:5]
    worker.forget(retried, checkpoint_dir=ck)  # version 1 again, with the retry's batch
    queue.version = 1

    assert not follower.poll()  # another step 1 than the one prepared: dropped, not served
    assert served.version == 0 and follower._prepared is None
    assert follower.poll()  # read again, and served
    assert served.version == 1 and not set(retried) & set(served.active_ids())
    np.testing.assert_allclose(
        served.predict(ds.x_test[:4]), worker.predict(ds.x_test[:4]), rtol=1e-12, atol=1e-12
    )


def test_without_redis_only_a_logged_version_is_served(tmp_path, digits):
    """Redis down: the bar is the newest version with a deletion-log record, never a checkpoint
    the worker may still drop (found by a break-it run: a follower served such a version, the
    worker dropped it and wrote version 1 again with another batch, and the follower kept the
    first one for good)."""
    ds, worker, served, queue, follower = _setup(tmp_path, digits)
    follower.state.deletion_log = DeletionLog(tmp_path / "deletions.log")
    queue.down = True
    worker.forget(worker.active_ids()[:1], checkpoint_dir=tmp_path / "ck")
    assert not follower.poll() and served.version == 0  # prepared, not committed
    assert follower.required_version() == 0
    follower.state.deletion_log.append(
        {"version": 1, "version_before": 0, "timestamp": "t", "job_ids": [], "id_digests": []}
    )
    assert follower.required_version() == 1 == follower.state.deletion_log.newest_version()
    assert follower.poll() and served.version == 1


def test_a_step_pruned_while_orbax_lists_the_directory_is_listed_again(tmp_path, monkeypatch):
    """The worker prunes the older step after reporting a newer one; orbax's listing then fails
    on the vanished directory (FileNotFoundError): ``latest_version`` lists again, at most five
    times in all."""
    calls = []
    real = checkpoint._latest_step

    def flaky(directory):
        calls.append(directory)
        if len(calls) < 3:
            raise FileNotFoundError(2, "No such file or directory", str(directory / "0"))
        return real(directory)

    (tmp_path / "ck").mkdir()
    monkeypatch.setattr(checkpoint, "_latest_step", flaky)
    assert checkpoint.latest_version(tmp_path / "ck") is None and len(calls) == 3

    def vanishing(directory):
        calls.append(directory)
        raise FileNotFoundError("gone")

    calls.clear()
    monkeypatch.setattr(checkpoint, "_latest_step", vanishing)
    with pytest.raises(FileNotFoundError):
        checkpoint.latest_version(tmp_path / "ck")
    assert len(calls) == 5


def test_reading_a_checkpoint_logs_no_topology_warning(tmp_path, digits, caplog):
    """orbax warns at each restore without a target tree (unsafe unless the topology is the
    saved one); the arrays are read to the host here, so the warning is filtered: a follower
    logged it once per version. Other absl warnings still pass."""
    import logging

    _, worker, served, _, _ = _setup(tmp_path, digits)
    worker.forget(worker.active_ids()[:2], checkpoint_dir=tmp_path / "ck")
    with caplog.at_level(logging.WARNING):
        assert served.read_newer(tmp_path / "ck") is not None
        logging.getLogger("absl").warning("another absl warning")
    assert not any("target tree" in m for m in caplog.messages), caplog.messages
    assert "another absl warning" in caplog.messages


def _serving_a_version_the_worker_then_drops(tmp_path, digits):
    """A follower that started on version 1 (its record's fsync pending, Redis not answering),
    and the worker that then drops version 1 (the fsync failed)."""
    ds, worker, served, queue, follower = _setup(tmp_path, digits)
    ck = tmp_path / "ck"
    first_try = Unlearner.restore(ck, progress=False)  # the worker's first attempt
    first_try.use_id_key(worker.state.id_key)
    first_try.forget(worker.active_ids()[:2], checkpoint_dir=ck)
    started_on = Unlearner.restore(ck, progress=False)
    assert started_on.version == 1
    follower.state.unlearner = started_on
    follower._served_identity = checkpoint.step_identity(ck, 1)  # as start() does
    assert not follower.poll() and follower.lost is None  # nothing wrong yet
    checkpoint.prune(ck, keep=0)  # dropped: its log record failed
    return ds, worker, started_on, follower


def test_a_follower_serving_a_version_the_worker_dropped_stops_answering(tmp_path, digits):
    """The newest checkpoint is older than the version served (dropped, or checkpoints rolled
    back under a running follower): the worker serves another model, so the follower stops
    answering from its own (``lost``: every model request and /readyz 503)."""
    ds, worker, served, follower = _serving_a_version_the_worker_then_drops(tmp_path, digits)
    assert not follower.poll()
    assert follower.lost is not None and "newest checkpoint is version 0" in follower.lost


def test_a_follower_whose_served_step_was_written_again_stops_answering(tmp_path, digits):
    """The worker dropped version 1 and wrote version 1 again with another batch before the
    follower looked: the step's directory is another one."""
    ds, worker, served, follower = _serving_a_version_the_worker_then_drops(tmp_path, digits)
    worker.forget(worker.active_ids()[:5], checkpoint_dir=tmp_path / "ck")  # version 1 again
    assert not follower.poll()
    assert follower.lost is not None and "written again" in follower.lost


def test_a_change_of_the_served_steps_mode_is_not_a_drop(tmp_path, digits):
    ds, worker, served, queue, follower = _setup(tmp_path, digits)
    follower._served_identity = checkpoint.step_identity(tmp_path / "ck", 0)
    (tmp_path / "ck" / "0").chmod(0o700)  # its change time moves, not its inode or mtime
    assert not follower.poll() and follower.lost is None


def test_a_request_waiting_for_a_reported_version_serves_the_prepared_one_itself(tmp_path, digits):
    """A request that read the reported version (``catch_up``) serves the prepared version
    itself, without waiting for the follower thread's next round (no thread runs here: before,
    it waited ``wait_s`` and got FollowerBehindError); never a version newer than the one it
    read, and never a step written again since it was read."""
    ds, worker, served, queue, follower = _setup(tmp_path, digits)
    follower.wait_s = 0.2
    worker.forget(worker.active_ids()[:2], checkpoint_dir=tmp_path / "ck")
    assert not follower.poll()  # prepared, not reported
    assert follower._prepared is not None and follower._prepared.version == 1
    assert not follower._serve_prepared(served, 0)  # the worker reported only version 0
    assert served.version == 0 and follower._prepared is not None

    queue.version = 1
    follower.catch_up(1)  # returns at once: served by this call
    assert served.version == 1 and follower._prepared is None
    np.testing.assert_array_equal(np.asarray(served.state.k), np.asarray(worker.state.k))
    np.testing.assert_allclose(
        served.predict(ds.x_test[:4]), worker.predict(ds.x_test[:4]), rtol=1e-12, atol=1e-12
    )

    # Prepared from a step that was then dropped and written again: not served from here.
    worker.forget(worker.active_ids()[:1], checkpoint_dir=tmp_path / "ck")
    assert not follower.poll()
    follower._prepared = dataclasses.replace(follower._prepared, identity=(0, 0, 0))
    queue.version = 2
    with pytest.raises(FollowerBehindError):
        follower.catch_up(2)
    assert served.version == 1


def test_the_work_after_a_hand_over_waits_for_the_requests_that_waited_for_it(
    tmp_path, digits, monkeypatch
):
    """The requests that waited for a version come all at once after its hand-over; the spare K
    buffer's pass over the previous K (``after_follow``) ran beside them, and the slowest
    predictions of a load run were those (bench load, 2026-12-05: 6.4 of the ten slowest at a
    hand-over, 1.4 with it delayed). It starts ``_FINISH_DELAY_S`` after the swap, once for
    versions followed meanwhile, and a stop during the delay skips it."""
    import threading
    import time

    _, _, served, _, follower = _setup(tmp_path, digits)
    calls: list[float] = []
    done = threading.Event()

    def after_follow(preconditioner: bool = True) -> dict[str, float]:
        calls.append(time.perf_counter())
        done.set()
        return {}

    monkeypatch.setattr(served, "after_follow", after_follow)
    monkeypatch.setattr(follower, "_FINISH_DELAY_S", 0.3)
    follower._finisher.start()
    swapped = time.perf_counter()
    follower._followed.set()
    time.sleep(0.1)
    follower._followed.set()  # a second version followed within the delay
    assert done.wait(5)
    assert calls[0] - swapped >= 0.3
    time.sleep(0.5)
    assert len(calls) == 1  # both versions finished by one pass, on the model served now
    follower._followed.set()
    follower._stop.set()  # stopped during the delay: nothing more runs
    follower._finisher.join(5)
    assert not follower._finisher.is_alive() and len(calls) == 1
