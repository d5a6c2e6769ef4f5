"""The solver worker: takes forget and addition jobs off the queue and applies them to the model.

Order of a batch, in one direction, chosen so that a crash anywhere loses no accepted job, applies
none twice and leaves no forgotten data behind once restarted (docs/design.md, The order of a
deletion): ``u.forget`` computes the new version and checkpoints it (atomic); the version is
appended to the deletion log (fsync'd); ``u.forget`` publishes it; in one Redis transaction the jobs
are marked succeeded, their entries acknowledged and deleted, their ids released; ``u.purge``
deletes the older checkpoints and the cached kernels; only then ``u.after_publish`` refreshes the
preconditioner and makes the spare K buffer. An addition (``u.add``) goes through the same steps;
consecutive jobs of one kind make one version. At start (``service.load_model``) the newest
checkpoint is restored, everything older purged and a missing log record written from the
checkpoint; entries left unacknowledged are claimed again here; a job whose ids the restored
model has forgotten already was applied before the crash, and is only marked succeeded.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import redis

from service_core import SolverError, Unlearner, UnlearnError

from .deletion_log import DeletionLog, addition_record, version_record
from .faults import crash_point
from .metrics import Metrics
from .queue import (
    WORKER_BEAT_S,
    WORKER_TTL_S,
    Entry,
    Job,
    JobQueue,
    OtherHomeError,
    OtherLineageError,
    utc_now,
)
from .receipts import DeploymentKeys, directory_sha256, receipt_payload

log = logging.getLogger(__name__)

# Most jobs coalesced into one solve; the rest wait for the next one.
MAX_BATCH_JOBS = 1000
_BLOCK_MS = 250
_RETRY_S = 2.0


def _scale_hint(x_added: np.ndarray, u: Unlearner) -> str:
    """A sentence for a failed addition whose inputs are far outside the training inputs' range
    (the solver's own advice, tolerance or λ, does not help then: a break-it round added a row of
    1e6 to digits' pixels in [0, 1]); "" otherwise."""
    try:
        held = float(np.max(np.abs(np.asarray(u.state.x)[np.asarray(u.state.active, bool)])))
        added = float(np.max(np.abs(x_added)))
    except (ValueError, TypeError, AttributeError):
        return ""
    if not (np.isfinite(added) and held > 0 and added > 100 * held):
        return ""
    return (
        f". The added inputs reach |x| = {added:.3g}, {added / held:.3g} times the largest of "
        "the training inputs: check the added records first"
    )


def _parse_time(value: Any) -> datetime | None:
    """An ISO 8601 time of a job record or a log record; ``None``: absent or unreadable."""
    try:
        parsed = datetime.fromisoformat(value) if isinstance(value, str) and value else None
    except ValueError:
        return None
    return parsed.replace(tzinfo=UTC) if parsed is not None and parsed.tzinfo is None else parsed


class QueueHeldError(Exception):
    """Another live worker holds this data dir's queue (its heartbeat): this one waits."""

    def __init__(self, holder: str):
        super().__init__(holder)
        self.holder = holder


LINEAGE_FILE = "queue-lineage"  # in the data dir: the queue lineage it holds (``JobQueue.beat``)
# in the data dir, once its worker found the queue's lineage another one: it stays superseded
# (a Redis restarted without its data forgets the lineage; the marker does not) until
# --take-over-queue
SUPERSEDED_FILE = "queue-superseded"
# why an API process of a data dir whose queue another data dir took over answers no model request
TAKEN_OVER = (
    "this data dir's queue is not this data dir's any more (another data dir's worker took it "
    "over with --take-over-queue): its model no longer receives the queue's deletions, so this "
    "process answers no model request; serve the data dir that holds the queue"
)


def read_lineage(path: Path) -> str | None:
    """The queue lineage a data dir holds (``None``: none, or unreadable)."""
    try:
        return path.read_text().strip() or None
    except OSError:
        return None


def write_lineage(path: Path, value: str) -> None:
    """Store ``value`` at ``path`` atomically and durably (owner-only, fsynced, then renamed).

    Raises:
      OSError: the file or its directory cannot be written (``path.tmp`` may be left).
    """
    tmp = path.with_name(path.name + ".tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(value + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _gone_from_this_host(worker: str) -> bool:
    """Whether ``worker`` (a consumer name ``host-pid``) names a process of this host that no
    longer exists (killed: its heartbeat lives on until it lapses)."""
    host, _, pid = worker.rpartition("-")
    if host != socket.gethostname() or not pid.isdigit() or int(pid) == os.getpid():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except OSError:  # exists, another user's
        return False
    return False


class Worker:
    """Applies forget jobs to ``unlearner``, one batch at a time.

    Arguments:
      unlearner: the model; only this worker may call its ``forget``.
      queue: the job queue.
      checkpoint_dir: where ``forget`` saves each new version.
      deletion_log: where each applied version is recorded.
      metrics: job, solve and iteration metrics are recorded here, if given (and exported from
        then on: ``Metrics.count_jobs``).
      keys: the deployment's keys: each succeeded job gets a receipt signed with them (none
        without).
      report_wait_s: before reporting a version, wait at most this long for every live follower
        (an API process without a worker) to have prepared it (``JobQueue.wait_prepared``).
      legacy_stream: the stream an earlier release queued this prefix's jobs in (one queue per
        ``--redis-prefix``): its jobs are never applied here, so while it holds any (an earlier
        release's API process still at work beside this one) the heartbeat thread says so, once
        a minute.
      sticky_home: the queue is held by one checkpoint directory (``JobQueue.beat``'s
        ``sticky``): on a Redis shared beyond the data dir (``REDIS_URL``), so that a copy of the
        data dir never takes the original's queue; ``take_over`` lets this one take it once (the
        data dir moved, or replaced the other for good: ``--take-over-queue``).
      lineage_file: where the data dir keeps its queue lineage (``LINEAGE_FILE``; ``None``: not
        kept, tests). The first worker to hold the queue sets it; ``take_over`` sets a new one,
        in Redis and then here, so that the API processes of the data dir it took the queue from
        stop answering (``ModelFollower``), and that data dir's worker applies nothing
        (``superseded``).
    """

    def __init__(
        self,
        unlearner: Unlearner,
        queue: JobQueue,
        checkpoint_dir: Path,
        deletion_log: DeletionLog,
        metrics: Metrics | None = None,
        keys: DeploymentKeys | None = None,
        report_wait_s: float = 0.0,
        legacy_stream: str | None = None,
        sticky_home: bool = False,
        take_over: bool = False,
        lineage_file: Path | None = None,
    ):
        self.unlearner = unlearner
        self.lineage_file = lineage_file
        # take_over: the lineage this worker sets (kept until it is set, then ``None``)
        self._new_lineage: str | None = uuid.uuid4().hex if take_over and lineage_file else None
        # another data dir took the queue over: why this worker applies nothing (``None``: not)
        self.superseded: str | None = None
        # set by _apply/_apply_add when a batch of several jobs failed as one version on its
        # solve: _process_run then applies them one by one
        self._split_batch = False
        self._claim_lock = threading.Lock()
        # taken over in this process: recover() catches up on every job first (those the
        # previous holder applied after this process's start-up catch-up)
        self._catch_up_every = False
        self._lineage_error_at = -math.inf  # when a lineage file write last failed (logged)
        self.sticky_home = sticky_home
        self.take_over = take_over
        self._other_home: str | None = None  # the queue's last holder's home, another one
        self.legacy_stream = legacy_stream
        self.report_wait_s = report_wait_s
        self.keys = keys
        self.queue = queue
        self.checkpoint_dir = checkpoint_dir
        self.deletion_log = deletion_log
        self.metrics = metrics
        if metrics is not None:
            metrics.count_jobs()
        self.consumer = f"{socket.gethostname()}-{os.getpid()}"
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._busy_since: float | None = None  # Unix time this batch began; None: idle
        self._beat_now = threading.Event()
        # Another live worker holding the queue's heartbeat (``JobQueue.beat``): none is applied
        # while it does. Set by every beat.
        self._held_by: str | None = None

    # Lifecycle.

    def start(self) -> None:
        """Run the worker loop in a daemon thread until ``stop()``."""
        self._thread = threading.Thread(target=self.run, name="forget-worker", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Ask the loop to stop after the current batch, and wait up to ``timeout`` seconds.

        A batch still running then is abandoned; its entries stay unacknowledged and are
        claimed again at the next start.
        """
        self.request_stop()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.warning("worker still solving after %.0f s; leaving it to recovery", timeout)

    @property
    def running(self) -> bool:
        """Whether the worker thread is alive."""
        return self._thread is not None and self._thread.is_alive()

    def request_stop(self) -> None:
        """Make ``run()`` return after the current batch (safe from a signal handler)."""
        self._stop.set()

    def run(self) -> None:
        """Recover unacknowledged jobs, then apply new ones until stopped.

        Survives Redis outages: it waits, then recovers again, since a batch may have been cut
        off between applying and acknowledging. While it runs, a thread of its own renews its
        heartbeat in Redis (``JobQueue.beat``) every ``WORKER_BEAT_S`` seconds, during a solve
        too, and deletes it on the way out. The heartbeat is the queue's one-worker claim: while
        another live worker holds it (a copy of this data dir beside it), this one applies no
        job and recovers none, and says so once a minute; it takes over once that heartbeat
        lapses (``WORKER_TTL_S`` after the other stopped), or at once when the other was this
        data dir's worker, killed on this host. With ``sticky_home``, never from a worker of
        another checkpoint directory unless ``take_over``.
        """
        done = threading.Event()
        beat = threading.Thread(
            target=self._beat, args=(done,), name="worker-heartbeat", daemon=True
        )
        beat.start()
        try:
            self._loop()
        finally:
            done.set()
            self._beat_now.set()
            beat.join(WORKER_BEAT_S)

    def _beat(self, done: threading.Event) -> None:
        warned = legacy_warned = -math.inf
        while True:
            self._beat_now.clear()
            try:
                if self.legacy_stream is not None and time.monotonic() - legacy_warned >= 60:
                    queued = self.queue.stream_length(self.legacy_stream)
                    if queued:
                        legacy_warned = time.monotonic()
                        log.warning(
                            "%d job(s) are queued under the Redis key %s by an API process of "
                            "an earlier release (one queue per --redis-prefix), which no worker "
                            "of this release applies: stop that release's processes, and let "
                            "its worker finish them or delete the key",
                            queued,
                            self.legacy_stream,
                        )
                other = self.claim_queue()
                if self._other_home is not None and time.monotonic() - warned >= 60:
                    warned = time.monotonic()
                    log.warning(
                        "this data dir's queue (Redis keys %s:*) was last held by the worker of "
                        "%s, not of this data dir (%s): this worker applies none of its jobs. "
                        "It is a copy of that data dir (a restored backup, a replica), whose "
                        "worker would apply the jobs to another model than the one the "
                        "original's API processes serve. If this data dir replaced that one for "
                        "good (moved, or restored after a loss), stop that one's worker and "
                        "start this one once with --take-over-queue",
                        self.queue.prefix,
                        self._other_home,
                        self.home,
                    )
                elif (
                    other is not None
                    and not other.startswith("nobody: ")  # logged where it is found
                    and self.superseded is None
                    and time.monotonic() - warned >= 60
                ):
                    warned = time.monotonic()
                    holder_home = self.queue.heartbeat_home()
                    if (
                        self.sticky_home
                        and holder_home not in (None, self.home)
                        and not self.take_over
                    ):
                        # not "until that heartbeat lapses": the queue stays with that data dir
                        log.warning(
                            "another worker (%s) holds this data dir's queue (Redis keys %s:*): "
                            "the worker of %s, not of this data dir (%s). This worker applies "
                            "none of its jobs, now or once that worker stops: a copy of a data "
                            "dir (a restored backup, a replica) would apply them to another "
                            "model than the one the original's API processes serve. If this "
                            "data dir replaces that one for good, stop that one's worker and "
                            "start this one once with --take-over-queue",
                            other,
                            self.queue.prefix,
                            holder_home,
                            self.home,
                        )
                    else:
                        log.warning(
                            "another worker (%s) holds this data dir's queue (its heartbeat in "
                            "Redis): this worker applies no job until that heartbeat lapses (%.0f s "
                            "after that worker stops). Two workers on one queue would apply its jobs "
                            "to different models: a copy of this data dir (a restored backup, "
                            "another host's replica) must not run beside it with the same Redis "
                            "and --redis-prefix; run one worker per data dir",
                            other,
                            WORKER_TTL_S,
                        )
            except redis.RedisError:
                pass  # the loop logs Redis's outages; the heartbeat lapses meanwhile
            except Exception:
                log.warning("could not renew the worker's heartbeat", exc_info=True)
            # every WORKER_BEAT_S, and at once when a batch begins or ends (its fields change)
            self._beat_now.wait(WORKER_BEAT_S)
            if done.is_set():
                break
        try:
            self.queue.end_beat(self.consumer)
        except redis.RedisError:
            pass  # it lapses by itself

    def claim_queue(self) -> str | None:
        """Renew this worker's heartbeat, the queue's one-worker claim (``JobQueue.beat``),
        replacing that of this data dir's previous worker when it no longer exists (killed on
        this host, with the same checkpoint directory: not a copy's). Returns the
        other live worker holding it (``self._held_by``), else ``None``. Raises
        ``redis.RedisError``."""
        with self._claim_lock:  # the heartbeat thread and the loop: one lineage written at once
            return self._claim_queue()

    def _claim_queue(self) -> str | None:
        version, busy, home = self.unlearner.version, self._busy_since, self.home
        claim = {"home": home, "sticky": self.sticky_home, "take_over": self.take_over}
        if self.lineage_file is not None:
            marker = self.lineage_file.with_name(SUPERSEDED_FILE)
            if self._new_lineage is None and marker.exists():
                self._supersede()  # found so before, maybe with a Redis that has forgotten it
                return self._held_by
            mine = read_lineage(self.lineage_file)
            if mine is None and self._new_lineage is None:
                mine = uuid.uuid4().hex  # this data dir's first worker (or before lineages)
                if not self._wrote_lineage(mine):
                    return self._held_by
            claim.update(lineage=mine or self._new_lineage, new_lineage=self._new_lineage)
        try:
            other = self.queue.beat(self.consumer, version, busy, **claim)
            if (
                other is not None
                and _gone_from_this_host(other)
                and self.queue.heartbeat_home() == home
            ):
                # this data dir's previous worker, killed (one worker per data dir: its flock);
                # a copy of the data dir elsewhere (another home) waits for it to lapse
                log.info(
                    "worker %s of this data dir no longer runs: its heartbeat is replaced", other
                )
                other = self.queue.beat(self.consumer, version, busy, replace=other, **claim)
            self._other_home = None
        except OtherHomeError as e:
            other, self._other_home = f"the worker of {e.home}", e.home
        except OtherLineageError:
            self._supersede()
            return self._held_by
        if other is None and self._new_lineage is not None:
            # set in Redis: now here (a crash between the two leaves this data dir's API
            # processes unready and its worker waiting: --take-over-queue again mends it)
            if not self._wrote_lineage(self._new_lineage):
                return self._held_by  # set in Redis: the next beat sets it again, and writes
            self.lineage_file.with_name(SUPERSEDED_FILE).unlink(missing_ok=True)  # type: ignore[union-attr]
            self._new_lineage = None
            self._catch_up_every = True
            log.warning(
                "took the queue over (--take-over-queue): the API processes of the data dir it "
                "was taken from stop answering, and that data dir's worker applies nothing"
            )
        self.superseded = None
        if other is None and self._held_by is not None:
            log.info("this worker holds the queue now (before: held by %s)", self._held_by)
        self._held_by = other
        return other

    def _wrote_lineage(self, value: str) -> bool:
        """Write this data dir's lineage file; when it cannot be written, this worker holds
        nothing (``_held_by`` says why; logged once a minute, one line) and ``False``."""
        try:
            write_lineage(self.lineage_file, value)  # type: ignore[arg-type]
        except OSError as e:
            self._held_by = f"nobody: this data dir's {LINEAGE_FILE} cannot be written ({e})"
            now = time.monotonic()
            if now - self._lineage_error_at >= 60:
                self._lineage_error_at = now
                log.error(
                    "cannot write %s (%s): this worker applies no job until it can",
                    self.lineage_file,
                    e,
                )
            return False
        return True

    def _supersede(self) -> None:
        if self.superseded is None:
            log.critical(
                "this data dir's queue (Redis keys %s:*) is not this data dir's any more: "
                "another data dir's worker took it over (--take-over-queue), or this data dir's "
                "%s file was lost. This worker applies none of its jobs, and this data dir's "
                "model no longer receives its deletions: serve the data dir that holds the queue, "
                "or, if this data dir is the one to serve, start this worker with "
                "--take-over-queue",
                self.queue.prefix,
                LINEAGE_FILE,
            )
            if self.lineage_file is not None:
                try:
                    write_lineage(self.lineage_file.with_name(SUPERSEDED_FILE), "superseded")
                except OSError as e:
                    log.error("could not record that this data dir's queue is not its own: %s", e)
        self.superseded = TAKEN_OVER
        self._held_by = "another data dir's worker, which took the queue over"

    @property
    def not_holding(self) -> str | None:
        """Why an API process beside this worker must not answer from its model (``None``: it
        may): the queue is another data dir's (``superseded``), or another worker holds it, so
        deletions may be applied to another model than this one."""
        if self.superseded is not None:
            return self.superseded
        holder = self._held_by
        if holder is None:
            return None
        return (
            f"this process's worker does not hold its data dir's queue ({holder} does): its "
            "model may lack deletions that worker applied, so this process answers no model "
            "request until its worker holds the queue"
        )

    @property
    def home(self) -> str:
        """This worker's checkpoint directory, as an absolute path of this host."""
        return os.path.realpath(self.checkpoint_dir)

    def _loop(self) -> None:
        recovered = recovered_once = False
        unreachable_since: float | None = None  # monotonic time Redis stopped answering
        said_at = -math.inf
        while not self._stop.is_set():
            try:
                if not recovered or self._held_by is not None:
                    self.queue.ensure_group()
                    if unreachable_since is not None:  # Redis answered
                        log.info(
                            "queue reachable again after %.1f s%s",
                            time.monotonic() - unreachable_since,
                            "" if self.superseded is not None else "; recovering",
                        )
                        unreachable_since = None
                    # Only the worker holding the queue recovers and applies its jobs: another
                    # would claim that worker's batch in flight, and apply it to another model.
                    holder = self.claim_queue()
                    if holder is not None:
                        raise QueueHeldError(holder)  # the heartbeat thread says so
                    self.recover()
                    if not recovered_once:
                        recovered_once = True
                        log.info(
                            "worker applying the jobs of queue %s:* to model version %d",
                            self.queue.prefix,
                            self.unlearner.version,
                        )
                    recovered = True
                self.run_once(_BLOCK_MS)
            except QueueHeldError:
                recovered = False
                self._stop.wait(_RETRY_S)
            except redis.RedisError as e:
                # said when it starts, then once a minute while it lasts, not at every retry
                now = time.monotonic()
                if unreachable_since is None:
                    unreachable_since = said_at = now
                    log.warning("queue unreachable (%s); retrying every %.0f s", e, _RETRY_S)
                elif now - said_at >= 60:
                    said_at = now
                    log.warning(
                        "queue still unreachable after %.0f s (%s); retrying every %.0f s",
                        now - unreachable_since,
                        e,
                        _RETRY_S,
                    )
                recovered = False
                self._stop.wait(_RETRY_S)
            except Exception:
                log.exception("worker loop failed; retrying in %.0f s", _RETRY_S)
                recovered = False
                self._stop.wait(_RETRY_S)

    # Work.

    def recover(self) -> int:
        """Apply (or confirm) every entry a previous worker left unacknowledged; first, when
        the reported version is newer than the model's (a data dir rolled back while Redis did
        not answer at the start), forget again what Redis's succeeded jobs say is gone
        (``reapply_reported``).

        Returns:
          The number of entries handled.
        """
        # A data dir rolled back (log included) behind what was reported while Redis did not
        # answer at the start: forget again now what its succeeded jobs say is gone. First:
        # a job re-run below would take the number of a version lost in the roll-back.
        if self._catch_up_every:
            # taken over in this process: what the previous holder applied since the start
            since = self.unlearner.version
            try:
                Worker(
                    self.unlearner, None, self.checkpoint_dir, self.deletion_log, keys=self.keys
                ).reapply_reported(
                    self.queue.succeeded_after(since, every=True), since, "recovery", every=True
                )  # type: ignore[arg-type]
            except SystemExit as e:  # logged; the records stay until someone acts
                log.critical("%s", e)
            self._catch_up_every = False
        reported = self.queue.reported_version()
        if reported is not None and reported > self.unlearner.version:
            since = self.unlearner.version
            try:
                Worker(
                    self.unlearner, None, self.checkpoint_dir, self.deletion_log, keys=self.keys
                ).reapply_reported(self.queue.succeeded_after(since), since, "recovery")  # type: ignore[arg-type]
            except SystemExit as e:  # logged; the records stay until someone acts
                log.critical("%s", e)
        entries = self.queue.claim_unacknowledged(self.consumer)
        self.queue.forget_idle_consumers(keep=self.consumer)
        if entries:
            log.info("recovering %d unacknowledged job(s)", len(entries))
            self.process(entries)
        # A crash may have left a finished job's ids in Redis's append-only file.
        self.queue.compact()
        # From here on every finished job is applied to this model, and only to it: its size is
        # what enqueueing counts the queued jobs against (a restart may bring a new model).
        self.queue.record_n_train(self.unlearner.n_train, self.unlearner.version)
        return len(entries)

    def run_once(self, block_ms: int = 0) -> int:
        """Take every job queued now (waiting up to ``block_ms`` for one) and apply them.

        Returns:
          The number of entries handled.
        """
        entries = self.queue.read(self.consumer, block_ms, MAX_BATCH_JOBS)
        if entries:
            self.process(entries)
        return len(entries)

    def process(self, entries: list[Entry]) -> None:
        """Apply the jobs of ``entries``: each run of consecutive jobs of one kind (forgets, or
        additions) as one version with one solve, in stream order."""
        self._busy_since = time.time()
        self._beat_now.set()
        try:
            self._process(entries)
        finally:
            self._busy_since = None
            self._beat_now.set()

    def _process(self, entries: list[Entry]) -> None:
        u = self.unlearner
        outcomes: list[tuple[Entry, dict[str, Any]]] = []
        todo: list[Entry] = []
        for entry in entries:
            job = entry.job
            if job is None or job.status in ("succeeded", "failed"):
                # Expired record, or finished but not acknowledged: only clean up.
                outcomes.append((entry, {}))
            elif job.kind == "add":
                logged = self.deletion_log.find_job(job.job_id)
                # applied and logged before a crash: only report it (a record of a version newer
                # than the one served was never published: drop_after removes those at start)
                if logged is not None and int(logged["version"]) <= u.version:
                    outcomes.append((entry, _succeeded(logged["version"], logged.get("solver"))))
                else:
                    todo.append(entry)
            elif u.is_forgotten(job.ids):
                outcomes.append((entry, self._applied_before(job)))
            else:
                todo.append(entry)
        self.queue.mark_running([e.job for e in todo if e.job is not None])

        runs: list[list[Entry]] = []
        for entry in todo:
            if runs and runs[-1][0].job.kind == entry.job.kind:  # type: ignore[union-attr]
                runs[-1].append(entry)
            else:
                runs.append([entry])
        for run in runs or [[]]:
            self._process_run(run, outcomes)
            outcomes = []

    def _append_record(self, entry: dict[str, Any], version_before: int) -> None:
        """Append a new version's log record (fsync'd). If that fails the version is not published
        and its checkpoint is dropped (``Unlearner.forget``): the record, if written, is removed
        again (``DeletionLog.drop_after``) so that it never reads as applied. If even that fails
        it stays in the file, read by no one as applied: ``/v1/deletions`` lists no version newer
        than the one served, a re-run job does not trust it, and the next record of that version
        number supersedes it (``DeletionLog.current``)."""
        try:
            self.deletion_log.append(entry)
        except BaseException:
            try:
                self.deletion_log.drop_after(version_before)
            except OSError as e:
                log.error(
                    "version %d: its log record could not be removed after its append failed "
                    "(%s); it stays in the file, superseded by the next record of that version",
                    entry["version"],
                    e,
                )
            raise

    def _process_run(self, run: list[Entry], outcomes: list[tuple[Entry, dict[str, Any]]]) -> None:
        """Validate and apply ``run`` (jobs of one kind) as one version, then report it with
        ``outcomes`` (entries already settled) and finish the order of a deletion."""
        u = self.unlearner
        version_before = u.version
        add = bool(run) and run[0].job is not None and run[0].job.kind == "add"
        # Validate job by job against the model and the jobs taken before it, so that a job
        # that became invalid fails alone instead of failing the whole batch.
        accepted: list[Entry] = []
        taken: set[str] = set()
        for entry in run:
            assert entry.job is not None
            try:
                if add:
                    records = entry.job.records or {}
                    u.validate_add(
                        entry.job.ids, records.get("x"), records.get("y"), frozenset(taken)
                    )
                else:
                    u.validate_forget(entry.job.ids, pending=frozenset(taken))
            except UnlearnError as e:
                outcomes.append((entry, _failed(str(e))))
                continue
            accepted.append(entry)
            taken.update(entry.job.ids)

        if accepted:
            applied = self._apply_add(accepted) if add else self._apply(accepted)
            if self._split_batch:
                # The batch failed as one version on its solve (nothing was published): each job
                # alone, each its own version, so that one job's failure is its own (a target of
                # 1e300 in one addition failed the jobs batched with it).
                self._split_batch = False
                log.warning(
                    "the %d jobs of that batch are applied one by one, each as its own version",
                    len(accepted),
                )
                for entry in accepted:
                    self._process_run([entry], [])
                accepted = []  # each was reported, purged and followed on its own
            else:
                outcomes += applied
                crash_point("published")
                self._wait_for_followers(u.version)
        # The model's size and version go with the released ids: the API admits new jobs against
        # all three, and API processes without a worker serve nothing older than that version.
        self.queue.finish(outcomes, n_train=u.n_train, version=u.version)
        crash_point("reported")
        self._beat_now.set()  # the heartbeat's version too (/readyz said the old one for 5 s)
        self._count(outcomes)
        if accepted and u.version != version_before:  # published: after the jobs are reported
            started = time.perf_counter()
            try:
                purged = u.purge(self.checkpoint_dir)
            except OSError as e:  # the next deletion's purge, or the next start, tries again
                log.error("could not delete the older checkpoints or cached kernels: %s", e)
            else:
                log.info(
                    "purged %d older checkpoint(s) and %d cached kernel(s) in %.2f s",
                    purged["checkpoints"],
                    purged["kernels"],
                    time.perf_counter() - started,
                )
            self.queue.compact()
            crash_point("purged")
            seconds = u.after_publish()
            log.info(
                "after publishing: %s", ", ".join(f"{k} {v:.2f} s" for k, v in seconds.items())
            )

    def reapply_logged(self, job_status: Callable[[str], str | None] = lambda job_id: None) -> int:
        """Forget again what the deletion log says was forgotten after the model's version: at a
        start, before anything is served, when the log records versions newer than the newest
        checkpoint and the restored model holds some of their forgotten records again (the
        checkpoints were rolled back: a backup restored, a volume snapshot). Without it those
        records would be served again, with their jobs and receipts saying they are gone.

        The log keeps only keyed digests; the restored model's active ids are digested with the
        data dir's secret and matched. The matched records of each logged job are forgotten
        again under that job's id, as one new version with its own log record (so a re-run of
        the job finds it), then every older checkpoint and cached kernel is purged and the
        preconditioner made again, as after any deletion. A logged addition newer than the
        checkpoint cannot be redone (the log keeps no records): it is logged as an error. A
        record written but never published (its fsync failed and its removal too) is redone the
        same way (its job asked for that deletion), unless ``job_status`` says its job was
        reported failed: the user was told the model is unchanged, and no record of it was
        ever served.

        Arguments:
          job_status: a job's status in the queue (``"failed"``, ...), ``None`` when unknown
            (expired, Redis not answering): unknown counts as published, the safe side.

        Returns:
          The number of records forgotten again (0: the log is not ahead, or the model holds
          none of its forgotten records).

        Raises:
          SystemExit: the deletion failed (one line saying why; nothing is served then).
        """
        u = self.unlearner
        ahead = [e for e in self.deletion_log.current() if int(e["version"]) > u.version]
        return self._forget_again(ahead, job_status, "the deletion log records", renumber=True)

    def reapply_reported(
        self, jobs: Sequence[Job], since: int, when: str = "start", every: bool = False
    ) -> int:
        """Forget again what Redis's job records say was forgotten after version ``since``: at a
        start, when the worker reported a version newer than the restored model's
        (``JobQueue.reported_version``) although the deletion log has none (the whole data
        directory was rolled back, log included: a backup restored, a volume snapshot, while
        Redis kept its records), or by a copy of the data directory that ran behind another.
        Without it the records those jobs forgot would be served again, with their jobs and
        receipts saying they are gone. Done as ``reapply_logged`` does, from the jobs' keyed
        digests (kept ``--job-ttl-s``, 7 days); a lost addition is logged as an error.

        A job counts when its version is newer than ``since`` and it finished after the
        restored version was logged: the records of jobs lost in an earlier roll-back keep their
        old version numbers, which the versions made since pass (a record added again after
        that roll-back was forgotten again by its stale job).

        Arguments:
          jobs: the succeeded jobs of versions newer than ``since``
            (``JobQueue.succeeded_after``).
          since: the version the data directory was restored at.
          when: ``start`` (before anything is served) or ``recovery`` (Redis answered only
            after the start), for the messages.
          every: jobs of any version and any finishing time count, and each record's newest
            succeeded job decides (forgotten again when it is a forget; a record added back
            after it stays): a data dir taking the queue over (``--take-over-queue``), whose jobs
            were numbered by another data dir's versions (helper-47: a job numbered 3 by the
            copy was skipped by the original at its own version 4, and its record stayed
            active).

        Returns:
          The number of records forgotten again.

        Raises:
          SystemExit: the deletion failed (one line saying why).
        """
        current = self.deletion_log.current()
        logged = [e for e in current if int(e["version"]) == since]
        restored_at = _parse_time(logged[-1].get("timestamp")) if logged else None
        # additions the deletion log lists after that version: ``reapply_logged`` (run first at
        # every start) said they are lost; said once, not again from their jobs here
        logged_added = {
            d
            for e in current
            if e.get("kind") == "add" and int(e["version"]) > since
            for d in e.get("added_digests", ())
        }
        records: dict[tuple[int, str], dict[str, Any]] = {}
        last: dict[str, str] = {}  # every: each digest's newest succeeded job (finished, kind)
        if every:
            restored_at = None  # each record's newest job decides, whichever data dir ran it
            newest: dict[str, tuple[str, str]] = {}
            for job in jobs:
                if job.status == "succeeded" and job.model_version is not None:
                    for d in job.id_digests:
                        event = (job.finished_at or "", job.kind)
                        if event > newest.get(d, ("", "")):
                            newest[d] = event
            last = {d: kind for d, (_, kind) in newest.items()}
            active = {self.unlearner.digest(i) for i in self.unlearner.active_ids()}
        for job in jobs:
            version = job.model_version
            if job.status != "succeeded" or version is None or (version <= since and not every):
                continue
            finished = _parse_time(job.finished_at)
            if restored_at is not None and (finished is None or finished <= restored_at):
                continue  # before the restored version: lost in an earlier roll-back, if at all
            if every:
                # a record added back after its forget stays; an addition this model has
                # already (its own, or added back here) is no loss
                kept = [
                    d
                    for d in job.id_digests
                    if last.get(d) == job.kind and (job.kind != "add" or d not in active)
                ]
                if not kept:
                    continue
                job = dataclasses.replace(job, id_digests=kept)
            if job.kind == "add":
                if not set(job.id_digests) - logged_added:
                    continue
                record = records.setdefault(
                    (version, "add"), {"version": version, "kind": "add", "added_digests": []}
                )
                record["added_digests"] += job.id_digests
            else:
                record = records.setdefault(
                    (version, "forget"), {"version": version, "job_digests": {}, "timestamp": ""}
                )
                record["job_digests"][job.job_id] = job.id_digests
                record["timestamp"] = max(record["timestamp"], job.finished_at or "")
        ahead = [records[k] for k in sorted(records)]
        return self._forget_again(
            ahead,
            lambda job_id: None,
            "Redis's succeeded jobs report",
            "before anything is served"
            if when == "start"
            else "now that Redis answers (it did not at the start: until now they were served)",
        )

    def _forget_again(
        self,
        ahead: list[dict[str, Any]],
        job_status: Callable[[str], str | None],
        source: str,
        when: str = "before anything is served",
        renumber: bool = False,
    ) -> int:
        """Forget again the active records of ``ahead`` (deletion-log records, or records made
        alike, of versions newer than the model's), as one new version; ``source`` names where
        they come from in the messages. ``renumber``: that version is numbered by the deletion
        log (``Unlearner.renumber``), not after the model's: the log's newest version when its
        record is a forget redone here, else the one after it; before, a data dir whose
        checkpoints were deleted redid versions 1–6 as version 1, and ``/v1/deletions`` (which
        lists nothing newer than the served version) hid versions 2–6."""
        u = self.unlearner
        if not ahead:
            return 0
        active = {u.digest(i): i for i in u.active_ids()}
        jobs: list[Job] = []
        taken: set[str] = set()
        for record in ahead:
            version = int(record["version"])
            if record.get("kind") == "add":
                log.error(
                    "%s version %d, an addition of %d record(s), after the version this model "
                    "was restored or built at: the checkpoints were rolled back or deleted and "
                    "those records are lost (their jobs say succeeded): add them again",
                    source,
                    version,
                    len(record.get("added_digests", ())),
                )
                continue
            per_job = record.get("job_digests") or {f"log-version-{version}": record["id_digests"]}
            for job_id, digests in per_job.items():
                if job_status(job_id) == "failed":
                    log.info(
                        "the deletion log's version %d record of job %s, reported failed, was "
                        "never published: not redone",
                        version,
                        job_id,
                    )
                    continue
                ids = [active[d] for d in digests if d in active and active[d] not in taken]
                taken.update(ids)
                if ids:
                    jobs.append(Job(job_id, "running", ids, str(record.get("timestamp", ""))))
        if not jobs:
            return 0
        versions = sorted({int(e["version"]) for e in ahead if e.get("kind") != "add"})
        restored = u.version
        if renumber:
            # The new version takes the number of the log's newest record when that is a forget
            # redone here (its record is superseded by the new one, under the same jobs: a
            # roll-back, or a record whose fsync failed), else the number after it (an addition
            # lost, which stays listed): no version of the log is hidden behind a lower number
            # the served model has not passed, none stands for two models
            top = max(int(e["version"]) for e in ahead)
            redone = any(int(e["version"]) == top and e.get("kind") != "add" for e in ahead)
            if top - redone > restored:
                u.renumber(top - redone)
        log.critical(
            "%s version(s) %s, newer than the newest checkpoint (version %d), and %d record(s) "
            "they forgot are in that checkpoint again (checkpoints rolled back or deleted: a "
            "backup restored? or the worker of a copy of this data dir applied them to its "
            "model): forgetting them again %s, as version %d%s",
            source,
            ", ".join(map(str, versions)),
            restored,
            len(taken),
            when,
            u.version + 1,
            f" (numbered by the log; the model it starts from is version {restored}'s)"
            if u.version != restored
            else "",
        )
        outcomes = self._apply([Entry("", job) for job in jobs])
        self._split_batch = False  # one version or none here: not split
        failed = [f["error"] for _, f in outcomes if f.get("status") != "succeeded"]
        if failed:
            raise SystemExit(
                f"ntk-unlearn: could not forget again the {len(taken)} record(s) {source} as "
                f"forgotten after version {versions[0] - 1}: {failed[0]}; "
                "restore the newer checkpoints instead"
            )
        try:
            u.purge(self.checkpoint_dir)
        except OSError as e:  # the next deletion's purge, or the next start, tries again
            log.error("could not delete the older checkpoints or cached kernels: %s", e)
        u.after_publish()
        log.warning(
            "forgot %d record(s) again as version %d; older checkpoints purged",
            len(taken),
            u.version,
        )
        return len(taken)

    def _wait_for_followers(self, version: int) -> None:
        """Before the report: the followers prepare a version as soon as its checkpoint is
        written (read, K erased: 0.2-0.3 s for digits), which the log record and the publication
        outrun; a request that comes after the report would wait for the rest. Waiting here (at
        most ``report_wait_s``) moves that wait to the job, off the requests."""
        if self.report_wait_s <= 0:
            return
        started = time.perf_counter()
        behind = self.queue.wait_prepared(version, self.report_wait_s)
        waited = time.perf_counter() - started
        if behind is None:
            log.info(
                "reporting version %d without knowing whether the followers prepared it: Redis "
                "failed while waiting (%.2f s)",
                version,
                waited,
            )
        elif behind:
            log.info(
                "reporting version %d after %.2f s although follower(s) %s have not prepared it",
                version,
                waited,
                ", ".join(behind),
            )
        elif waited >= 0.01:
            log.info("version %d: followers prepared it %.2f s after publication", version, waited)

    def _apply_add(self, accepted: list[Entry]) -> list[tuple[Entry, dict[str, Any]]]:
        """Add the records of ``accepted`` (addition jobs) as one version: checkpoint, log record
        (``addition_record``: the ids as keyed digests), publish (``Unlearner.add``)."""
        jobs: list[Job] = [e.job for e in accepted]  # type: ignore[misc]
        u = self.unlearner
        task = u.state.task
        ids = [i for job in jobs for i in job.ids]
        xs, ys = [], []
        for job in jobs:  # rows flattened and labels as a vector, so that jobs concatenate
            records, k = job.records or {}, len(job.ids)
            xs.append(np.asarray(records["x"], np.float64).reshape(k, -1))
            y = np.asarray(records["y"], np.float64)
            ys.append(y.reshape(k) if task == "classification" else y.reshape(k, -1))
        version_before = u.version
        job_ids = [job.job_id for job in jobs]
        job_digests = {job.job_id: [u.digest(i) for i in job.ids] for job in jobs}
        logged: dict[str, Any] = {}

        def log_version(result) -> None:
            # Between the checkpoint and the publication: a served version is always logged.
            crash_point("checkpointed")
            started = time.perf_counter()
            digest = directory_sha256(self.checkpoint_dir / str(result.version))
            entry = addition_record(
                result,
                version_before,
                job_ids,
                [u.digest(i) for i in ids],
                utc_now(),
                digest,
                job_digests,
            )
            self._append_record(entry, version_before)
            logged.update(entry=entry, seconds=time.perf_counter() - started)
            crash_point("logged")

        try:
            result = u.add(
                ids,
                np.concatenate(xs),
                np.concatenate(ys),
                self.checkpoint_dir,
                before_publish=log_version,
                note={
                    "kind": "add",
                    "job_ids": job_ids,
                    "version_before": version_before,
                    "job_digests": job_digests,
                },
            )
        except (UnlearnError, SolverError) as e:
            message = str(e) + _scale_hint(np.concatenate(xs), u)
            log.warning("addition of %d record(s) failed: %s", len(ids), message)
            self._split_batch = len(accepted) > 1
            return [(entry, _failed(message)) for entry in accepted]
        except Exception as e:
            log.exception("addition of %d record(s) failed", len(ids))
            message = f"the addition failed ({type(e).__name__}: {e}); the model is unchanged"
            return [(entry, _failed(message)) for entry in accepted]

        timings = dict(result.timings or {})
        timings["log"] = timings.pop("before_publish", logged["seconds"])
        solver = {**logged["entry"]["solver"], "timings": timings}
        log.info(
            "version %d: added %d record(s) of %d job(s) in %.2f s (%d Newton steps, residual "
            "%.2e%s)",
            result.version,
            len(ids),
            len(jobs),
            timings["total"],
            solver["iterations"],
            result.residual,
            ", K grew" if result.grew else "",
        )
        if self.metrics is not None:
            self.metrics.batch_jobs.observe(len(jobs))
            self.metrics.solve_seconds.observe(result.timings.get("solve", 0.0))
        # Receipts attest deletions: an addition gets none (docs/design.md, Adding records).
        return [(entry, _succeeded(result.version, solver)) for entry in accepted]

    def _apply(self, accepted: list[Entry]) -> list[tuple[Entry, dict[str, Any]]]:
        jobs: list[Job] = [e.job for e in accepted]  # type: ignore[misc]
        ids = [i for job in jobs for i in job.ids]
        u = self.unlearner
        version_before = u.version
        job_ids = [job.job_id for job in jobs]
        job_digests = {job.job_id: [u.digest(i) for i in job.ids] for job in jobs}
        logged: dict[str, Any] = {}

        def log_version(result) -> None:
            # Between the checkpoint and the publication: a served version is always logged.
            crash_point("checkpointed")
            started = time.perf_counter()
            digest = directory_sha256(self.checkpoint_dir / str(result.version))
            entry = version_record(
                result,
                version_before,
                job_ids,
                [u.digest(i) for i in ids],
                u.state,
                utc_now(),
                digest,
                job_digests,
            )
            self._append_record(entry, version_before)
            logged.update(entry=entry, seconds=time.perf_counter() - started)
            crash_point("logged")

        try:
            result = u.forget(
                ids,
                self.checkpoint_dir,
                before_publish=log_version,
                note={
                    "job_ids": job_ids,
                    "version_before": version_before,
                    "job_digests": job_digests,
                },
            )
        except (UnlearnError, SolverError) as e:
            log.warning("forget of %d id(s) failed: %s", len(ids), e)
            self._split_batch = len(accepted) > 1
            return [(entry, _failed(str(e))) for entry in accepted]
        except Exception as e:
            log.exception("forget of %d id(s) failed", len(ids))
            # an OSError is the checkpoint or the deletion log (the disk), not the solver
            what = "writing the new version" if isinstance(e, OSError) else "the solver"
            message = f"{what} failed ({type(e).__name__}: {e}); the model is unchanged"
            return [(entry, _failed(message)) for entry in accepted]

        timings = dict(result.timings or {})
        # The log record (with the checkpoint's hash) is the engine's before_publish step: part of
        # the job's time, reported as "log" so that the parts add up to the total.
        timings["log"] = timings.pop("before_publish", logged["seconds"])
        timings["total"] = result.seconds
        solver = {**logged["entry"]["solver"], "timings": timings}
        refine = logged["entry"]["refine"]
        log.info(
            "version %d: forgot %d id(s) of %d job(s) in %.2f s (%s, %d iterations, solver "
            "residual %.2e; certificate %.2e)",
            result.version,
            len(ids),
            len(jobs),
            result.seconds,
            result.solve.method,
            result.solve.iterations,
            result.solve.residual,
            result.residual,
        )
        if self.metrics is not None:
            self.metrics.batch_jobs.observe(len(jobs))
            self.metrics.solve_seconds.observe(result.solve.seconds)
            self.metrics.cg_iterations.observe(result.solve.iterations)
        return [
            (
                entry,
                _succeeded(
                    result.version, solver, refine, self._receipt(entry.job, logged["entry"])
                ),
            )
            for entry in accepted
        ]

    def _receipt(self, job: Job | None, record: dict[str, Any] | None) -> dict[str, Any] | None:
        """The signed receipt of a succeeded job, from its version's log record."""
        if self.keys is None or job is None or record is None:
            return None
        digests = [self.unlearner.digest(i) for i in job.ids]
        return self.keys.sign(receipt_payload(job.job_id, digests, job.submitted_at, record))

    def _applied_before(self, job: Job) -> dict[str, Any]:
        """The outcome of a job the restored model has applied already, before a crash."""
        logged = self.deletion_log.find_job(job.job_id)
        if logged is None:
            # Not logged (a log from before receipts, or lost): the restored version applied it.
            return _succeeded(self.unlearner.version, None, None, None)
        receipt = self._receipt(job, logged)
        return _succeeded(logged["version"], logged.get("solver"), logged.get("refine"), receipt)

    def _count(self, outcomes: list[tuple[Entry, dict[str, Any]]]) -> None:
        if self.metrics is None:
            return
        for _, fields in outcomes:
            if "status" in fields:
                self.metrics.jobs.labels(status=fields["status"]).inc()


def _succeeded(
    version: int,
    solver: dict | None,
    refine: dict | None = None,
    receipt: dict | None = None,
) -> dict[str, Any]:
    return {
        "status": "succeeded",
        "model_version": version,
        "finished_at": utc_now(),
        "solver": solver,
        "refine": refine,
        "receipt": receipt,
    }


def _failed(error: str) -> dict[str, Any]:
    return {"status": "failed", "error": error, "finished_at": utc_now()}
