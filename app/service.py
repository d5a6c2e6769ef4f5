"""What a running service holds, and how its model is brought up."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import math
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import redis

from service_core import Unlearner, checkpoint, load_dataset
from service_core.engine import PreparedVersion
from service_core.errors import UnlearnError
from service_core.lifecycle import Identity
from service_core.nonlinear_serving import NonlinearUnlearner

from .batching import PredictBatcher
from .core.config import Settings
from .deletion_log import DeletionLog, records_from_checkpoint
from .faults import crash_point
from .locking import build_lock
from .metrics import Metrics
from .queue import JobQueue
from .reader import CheckpointReader
from .receipts import ID_SECRET_FILE, SIGNING_KEY_FILE, DeploymentKeys, directory_sha256
from .worker import LINEAGE_FILE, SUPERSEDED_FILE, TAKEN_OVER, Worker, read_lineage

log = logging.getLogger(__name__)


# Reads of one kind that compute for seconds at a time, run at once per process (2 cores here);
# more wait for a thread, without holding one.
HEAVY_READ_THREADS = 2


class Draining:
    """Whether the server has begun its graceful shutdown, and the heavy reads waiting for a
    token meanwhile (their cancel scopes). ``begin`` may be called from any thread (uvicorn's
    signal handler): it sets the flag and cancels the waits on the event loop."""

    def __init__(self) -> None:
        self.started = False
        self._waiting: set[anyio.CancelScope] = set()
        self._loop: asyncio.AbstractEventLoop | None = None

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        """The event loop the waits run on (the app's, at its start)."""
        self._loop = loop

    def begin(self) -> None:
        self.started = True
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self._cancel_waits)

    @contextlib.contextmanager
    def cancellable(self) -> Iterator[anyio.CancelScope]:
        """A cancel scope that ``begin`` cancels (enter it on the event loop, after checking
        ``started``: no await between, so no ``begin`` is missed)."""
        with anyio.CancelScope() as scope:
            self._waiting.add(scope)
            try:
                yield scope
            finally:
                self._waiting.discard(scope)

    def _cancel_waits(self) -> None:
        for scope in list(self._waiting):
            scope.cancel()


@dataclasses.dataclass
class ServiceState:
    """The state of one app instance, reached by routes through ``app.api.deps``."""

    settings: Settings
    metrics: Metrics
    unlearner: Unlearner | None = None
    queue: JobQueue | None = None
    worker: Worker | None = None
    follower: ModelFollower | None = None
    batcher: PredictBatcher | None = None
    keys: DeploymentKeys | None = None
    deletion_log: DeletionLog | None = None
    # Threads for the reads that compute for seconds (influence solves; the leave-one-out
    # factorisation and refinements of attribution and self-influence): their own few per kind,
    # so that however many arrive at once, the default pool predictions use stays free, and a
    # cold factorisation does not hold up influence estimates (``app.api.routes``).
    influence_threads: anyio.CapacityLimiter = dataclasses.field(
        default_factory=lambda: anyio.CapacityLimiter(HEAVY_READ_THREADS)
    )
    attribution_threads: anyio.CapacityLimiter = dataclasses.field(
        default_factory=lambda: anyio.CapacityLimiter(HEAVY_READ_THREADS)
    )
    # Set when the server begins its graceful shutdown: heavy reads still waiting are refused.
    draining: Draining = dataclasses.field(default_factory=lambda: Draining())


class MissingSecretError(UnlearnError):
    """A secret of the data directory is gone although its deletion log records deletions."""


def deployment_keys(settings: Settings) -> DeploymentKeys:
    """The data directory's id secret and receipt signing key, created on first start.

    Raises:
      MissingSecretError: one of them is missing while the deletion log records a deletion: a
        new one would not be the first's (the forgotten records are kept as digests under the
        id secret, and every process of the data directory finds its Redis queue by it; earlier
        receipts verify only with the first key), so it is never made silently.
    """
    for name, make in (
        (ID_SECRET_FILE, "head -c 32 /dev/urandom > {path} && chmod 600 {path}"),
        (SIGNING_KEY_FILE, "openssl genpkey -algorithm ed25519 -out {path} && chmod 600 {path}"),
    ):
        path = settings.data_dir / name
        if not path.exists() and DeletionLog(settings.deletion_log).newest_version() is not None:
            what = (
                "the forgotten records are kept as digests under it and every process of this "
                "data dir finds its Redis queue by it"
                if name == ID_SECRET_FILE
                else "its receipts are signed with it"
            )
            raise MissingSecretError(
                f"{path} is missing, but {settings.deletion_log} records deletions and {what}: "
                "restore it from a backup of the data dir (every process of the data dir must "
                "read the same one). To go on with a new one instead, knowing that "
                + (
                    "records forgotten so far will answer 'unknown' and jobs queued under the old "
                    "one stay there"
                    if name == ID_SECRET_FILE
                    else "earlier receipts will not verify with its public key"
                )
                + f", create it: {make.format(path=path)}"
            )
    return DeploymentKeys.load_or_create(settings.data_dir)


def queue_prefix(settings: Settings, keys: DeploymentKeys | None = None) -> str:
    """The prefix of every Redis key of this data directory's queue: ``--redis-prefix``, a
    colon, the data directory's namespace (``DeploymentKeys.namespace``, 16 hex digits).

    Every process of one data directory (the worker, API processes with or without one, on any
    host) meets under it, and two data directories given one ``--redis-prefix`` never share a
    key: each one's forgets are queued for, and applied by, its own worker only.

    Arguments:
      keys: the data directory's secrets when already read (read, or created, otherwise).
    """
    keys = keys if keys is not None else deployment_keys(settings)
    return f"{settings.redis_prefix}:{keys.namespace}"


def load_model(settings: Settings, role: str = "serve") -> Unlearner:
    """The newest checkpoint in the data dir; if there is none, a model built, trained, saved.

    Restoring never retrains: a restart serves exactly the version that was checkpointed. In the
    process that runs the worker (``settings.worker``) it first finishes what a crash left
    (docs/design.md, The order of a deletion): every other checkpoint, unfinished save and cached
    kernel of another training set is deleted, and a version checkpointed but not logged is
    logged from its checkpoint. Unacknowledged jobs are then run again by the worker. Of
    processes started together on a data dir without a checkpoint (a worker and API processes
    without one, in any number), one builds version 0 under the data dir's build lock; the
    others wait for it and restore that version (``app.locking.build_lock``).

    Arguments:
      role: this process's command (``serve`` or ``worker``), named to the processes that wait.
    """
    keys = deployment_keys(settings)
    u = _restore(settings, keys)
    if u is not None:
        return u

    def waiting(pid: int | None, role: str) -> None:
        log.info(
            "'ntk-unlearn %s' (pid %s) is making version 0 in %s: waiting for it",
            role or "?",
            pid,
            settings.data_dir,
        )

    with build_lock(settings.data_dir, role).acquire_waiting(waiting):
        # Whoever held the lock before may have saved version 0 meanwhile.
        u = _restore(settings, keys)
        if u is not None:
            return u
        u = _build(settings, keys)
        if settings.worker:
            _catch_up_with_the_record(settings, keys, u)
        return u


def _restore(settings: Settings, keys: DeploymentKeys) -> Unlearner | None:
    started = time.perf_counter()
    expect = Identity.of(
        settings.to_model_config(),
        settings.to_train_config(),
        settings.dataset_source(),
        settings.mode,
    )
    nonlinear = {"options": settings.nonlinear_options()} if settings.nonlinear else {}

    def restore(max_version: int | None) -> Unlearner | None:
        return (NonlinearUnlearner if settings.nonlinear else Unlearner).restore(
            settings.checkpoint_dir,
            cache_dir=settings.ntk_cache_dir,
            id_key=keys.id_secret,
            prune=settings.worker,
            expect=expect,
            max_version=max_version,
            **nonlinear,
        )

    if checkpoint.latest_version(settings.checkpoint_dir) is not None:
        # Tens of seconds for a large K, with nothing else in the log meanwhile.
        log.info(
            "restoring the model from %s (its NTK is recomputed from the checkpointed inputs, "
            "or read from the NTK cache)",
            settings.checkpoint_dir,
        )
    u = restore(None) if settings.worker else _restore_committed(settings, restore)
    if u is not None and settings.worker:
        _catch_up_with_the_record(settings, keys, u)
    if u is not None:
        _say_kept_tolerances(settings, u)
        log.info(
            "restored model version %d (n_train=%d, n_forgotten=%d) from %s in %.2f s",
            u.version,
            u.n_train,
            u.n_forgotten,
            settings.checkpoint_dir,
            time.perf_counter() - started,
        )
    return u


def _catch_up_with_the_record(settings: Settings, keys: DeploymentKeys, u: Unlearner) -> None:
    """The worker's start, before anything is served, on a model restored or just built: log a
    version checkpointed but not logged (a crash), and forget again what the deletion log, or
    Redis's succeeded jobs, say was forgotten after the model's version (checkpoints rolled
    back, or deleted and version 0 built anew: a break-it round deleted the checkpoint
    directory, as a mismatch message advised, and the rebuilt model served 22 forgotten records,
    then accepted forgets of them again once Redis's records were gone too)."""
    deletion_log = DeletionLog(settings.deletion_log)
    checkpoint_hash = directory_sha256(settings.checkpoint_dir / str(u.version))
    for record in records_from_checkpoint(u.state, deletion_log.versions(), checkpoint_hash):
        deletion_log.append(record)
        log.warning(
            "version %d was checkpointed but not logged (a crash): logged it now",
            record["version"],
        )
    # The log ahead of the checkpoints (rolled back): forget again what it says is gone.
    restored = u.version
    again = Worker(u, None, settings.checkpoint_dir, deletion_log, keys=keys)  # type: ignore[arg-type]
    again.reapply_logged(_job_status(settings, keys))
    # Redis ahead of the data dir (rolled back, log included): the same from its job records
    # (when it answers now; else the worker does it once it does: Worker.recover).
    prefix = queue_prefix(settings, keys)
    # Taking the queue over: every succeeded job since the restored version was logged,
    # whatever its version (numbered by the other data dir's versions).
    every = settings.take_over_queue
    reported = _ask_queue(
        settings, prefix, lambda queue: queue.succeeded_after(restored, every=every)
    )
    if reported:
        again.reapply_reported(reported, since=restored, every=every)
        # the version the worker serves from now on, so that its recovery does not look again;
        # not when another data dir's worker holds the queue (a copy's: it moved the queue's
        # reported version and size backwards, to its own)
        home = os.path.realpath(settings.checkpoint_dir)
        sticky, take_over = settings.redis_url is not None, settings.take_over_queue

        def report(queue: JobQueue) -> None:
            if (settings.data_dir / SUPERSEDED_FILE).exists() and not take_over:
                return  # its queue is another data dir's (Worker: superseded)
            lineage = read_lineage(settings.data_dir / LINEAGE_FILE)
            if not queue.held_elsewhere(home, sticky, take_over, lineage):
                queue.record_n_train(u.n_train, u.version)

        _ask_queue(settings, prefix, report)


def _say_kept_tolerances(settings: Settings, u: Unlearner) -> None:
    """A data dir keeps the tolerance and slack its model was built with (every version is held to
    them): a restart given others says so, once, instead of seeming to apply them (a break-it
    round reopened a model built with --tol 2 with --tol 1e-5: nothing said it stayed 2). Only
    a value given (flag, environment, file): a restart that gives none keeps the built one
    without a word (``--accept-floor``'s default of 1 warned at each restart of a model built
    with another)."""
    kept = u.train_config
    for flag, field, held in (
        # the tolerance every version is held to: a model built without --tol keeps None, the
        # dtype's default (a restart given --tol 1e-6 said nothing: helper-57)
        ("--tol", "tol", kept.resolved_tol()),
        ("--accept-floor", "accept_floor", kept.accept_floor),
    ):
        if field not in settings.model_fields_set:
            continue
        given = getattr(settings, field)
        if given is not None and held is not None and float(given) != float(held):
            log.warning(
                "%s %g is not applied: this data dir's model was built with %g, which every "
                "version keeps (build anew with another --data-dir to change it)",
                flag,
                given,
                held,
            )


def _ask_queue(settings: Settings, prefix: str, ask: Callable[[JobQueue], Any]) -> Any:
    """``ask(queue)`` on a client of its own that gives up within the API's Redis timeout;
    ``None`` without a Redis URL or when Redis does not answer (or answers nonsense)."""
    if settings.redis_url is None:
        return None
    client = redis.Redis.from_url(
        settings.redis_url,
        socket_timeout=settings.redis_timeout_s,
        socket_connect_timeout=settings.redis_timeout_s,
        decode_responses=True,
    )
    try:
        return ask(JobQueue(client, prefix, settings.job_ttl_s))
    except (redis.RedisError, ValueError, KeyError):
        return None
    finally:
        client.close()


def _job_status(settings: Settings, keys: DeploymentKeys) -> Callable[[str], str | None]:
    """A job's status in the queue (``JobQueue.get``), ``None`` when unknown: no Redis URL,
    Redis not answering (within the API's timeout), or no such job (expired)."""

    prefix = queue_prefix(settings, keys)

    def status(job_id: str) -> str | None:
        job = _ask_queue(settings, prefix, lambda queue: queue.get(job_id))
        return None if job is None else job.status

    return status


def _reported_version(settings: Settings) -> int | None:
    """The version the worker last reported in Redis (``JobQueue.reported_version``), read by a
    follower's start; ``None`` without a Redis URL, when Redis does not answer (within the API's
    timeout) or nothing was reported."""
    return _ask_queue(settings, queue_prefix(settings), lambda queue: queue.reported_version())


def _restore_committed(
    settings: Settings, restore, tries: int = 20, pause_s: float = 0.1
) -> Unlearner | None:
    """A follower's start: the newest checkpoint at most the version the worker last reported
    when Redis answers, else at most the newest logged version (version 0 when nothing is
    logged). A newer checkpoint may still be dropped by the worker and its version number
    written again with another batch (its record not yet written, or written and its fsync
    failing); a follower that started on it could never tell, and would serve it after the
    worker dropped it (docs/design.md, Followers). It follows that version once it is reported,
    as any other.

    That checkpoint may be purged while it is found or read: a newer one was logged and
    published (the log moved), or a worker starting kept only its newest and is about to log it.
    Then the log is read again and the restore tried again, ``tries`` times ``pause_s`` apart; an
    error while a checkpoint at or below the logged version is still there is raised at once.
    A data dir whose log has no record at or above any checkpoint (written before the log
    existed) serves its newest, with a warning."""
    deletion_log = DeletionLog(settings.deletion_log)
    bar = None
    for attempt in range(tries):
        if attempt:
            time.sleep(pause_s)
        newest = deletion_log.newest_version()
        logged = 0 if newest is None else newest
        # A record is in the file before its fsync returns, and that fsync may still fail
        # (the version is then dropped): when Redis answers, the reported version (published,
        # so its record was fsync'd) is the bar.
        published = _reported_version(settings)
        bar = logged if published is None else min(logged, published)
        try:
            u = restore(bar)
        except Exception as e:
            if (
                checkpoint.newest_at_most(settings.checkpoint_dir, bar) is not None
                and (deletion_log.newest_version() or 0) == logged
            ):
                raise  # the checkpoint is there and the log did not move: not a purge
            log.info("the checkpoint at or below version %d went away while read (%s)", bar, e)
            continue
        if u is not None:
            return u
        if checkpoint.latest_version(settings.checkpoint_dir) is None:
            return None  # no checkpoint at all: the caller builds version 0
    log.warning(
        "no checkpoint at or below version %s (the newest logged or, if older, the newest the "
        "worker reported in Redis) in %s: serving the newest",
        bar,
        settings.checkpoint_dir,
    )
    return restore(None)


def _build(settings: Settings, keys: DeploymentKeys) -> Unlearner:
    started = time.perf_counter()
    log.info("no checkpoint in %s: building the model", settings.checkpoint_dir)
    dataset = load_dataset(settings.dataset, seed=settings.seed, **settings.dataset_kwargs())
    log.info(
        "loaded data set %s: %d points of shape %s in %.2f s",
        settings.dataset,
        dataset.n,
        dataset.input_shape,
        time.perf_counter() - started,
    )
    nonlinear = {"options": settings.nonlinear_options()} if settings.nonlinear else {}
    u = (NonlinearUnlearner if settings.nonlinear else Unlearner).build(
        dataset,
        settings.to_model_config(),
        settings.to_train_config(),
        settings.to_solver_config(),
        cache_dir=settings.ntk_cache_dir,
        progress=True,
        id_key=keys.id_secret,
        source=settings.dataset_source(),
        **nonlinear,
    )
    built = time.perf_counter()
    log.info("built and trained the model in %.2f s", built - started)
    crash_point("built")
    u.save(settings.checkpoint_dir)
    log.info("saved version %d in %.2f s", u.version, time.perf_counter() - built)
    return u


def make_worker(
    settings: Settings, u: Unlearner, queue: JobQueue, metrics: Metrics | None
) -> Worker:
    """A worker applying jobs to ``u``, checkpointing, logging and signing receipts in the data
    dir."""
    return Worker(
        u,
        queue,
        settings.checkpoint_dir,
        DeletionLog(settings.deletion_log),
        metrics=metrics,
        keys=deployment_keys(settings),
        report_wait_s=settings.report_wait_s,
        legacy_stream=f"{settings.redis_prefix}:forget",
        # the embedded Redis lives in the data dir: a copy of the data dir has its own
        sticky_home=settings.redis_url is not None,
        take_over=settings.take_over_queue,
        lineage_file=settings.data_dir / LINEAGE_FILE,
    )


class FollowerBehindError(Exception):
    """An API process without a worker could not follow the newest reported version in time.

    Attributes:
      serving: the version it serves.
      wanted: the version it must serve at least.
    """

    def __init__(self, serving: int, wanted: int, failing: str | None = None):
        if failing is None:
            what = f"is still loading version {wanted}, the newest the worker has reported"
        else:  # retrying will not help until someone fixes that: say it
            what = (
                f"cannot load version {wanted}, the newest the worker has reported ({failing}; "
                "/readyz says since when)"
            )
        super().__init__(f"this API process serves model version {serving} and {what}")
        self.serving = serving
        self.wanted = wanted
        self.failing = failing


@dataclasses.dataclass(frozen=True)
class _Prepared:
    """A version the follower has prepared (``Unlearner.prepare_follow``) and not served yet: the
    identity of the step directory it was read from (``checkpoint.step_identity``), the seconds
    preparing took, and when it was ready (``time.perf_counter``)."""

    prepared: PreparedVersion
    identity: tuple[int, int, int] | None
    seconds: float
    ready_at: float

    @property
    def version(self) -> int:
        return self.prepared.version


class ModelFollower:
    """Keeps an API process without a worker (``serve --no-worker``) on the newest version.

    The worker of another process checkpoints every version in the shared data dir, appends its
    deletion-log record, then reports it in Redis (``JobQueue.reported_version``) in the
    transaction that marks its jobs succeeded. A thread of this process lists the checkpoint
    directory every ``interval_s`` (one ``listdir``) and, as soon as a newer step is there,
    prepares it while the older version is still served (``Unlearner.prepare_follow``: the
    checkpoint read, the forgotten rows erased from the K this process holds, never recomputed);
    it serves the prepared version (a swap) once the worker has reported it, so the hand-over a
    request may wait for is mostly done before the report. A version is never served before it
    is reported (until then the worker may still drop it); when Redis does not answer, before it
    has a deletion-log record (``committed_version``, the bar for requests too).

    A request served here first reads the reported version (``shared_required_version``: a read
    begun after the request arrived, shared by the concurrent ones) and, if this process is
    behind, waits (at most ``wait_s``: ``catch_up``) until it serves at least that version; so
    once a job is reported succeeded, no process serves a version that still holds its records.
    What follows a new version and serves no request waiting for it (the Nyström preconditioner
    of the new K, seconds; the spare K buffer: ``Unlearner.after_follow``) is done by a second
    thread, after the version is served, so neither those requests nor the preparing of the
    next version wait for it.

    Arguments:
      state: the service state (its ``unlearner`` and ``queue``).
      wait_s: the longest a request waits for the newest version before ``FollowerBehindError``.
      interval_s: seconds between two listings of the checkpoint directory when nothing asks.
      preconditioner: make each followed version's preconditioner (``False``: none after the
        first version followed; solves here then run unpreconditioned).
      reader: reads each new version's checkpoint in a child process (``app.reader``; started
        and stopped with the follower); ``None``: in this process.
    """

    # Between two polls a request asked for: the newest checkpoint may not be readable at once
    # (the worker is replacing it), and polling a directory in a tight loop helps no one.
    _RETRY_S = 0.02
    # After a failed load (not a pruned step): the next try.
    _FAILED_RETRY_S = 0.5
    # How often a follower renews its announcement to the worker (queue.FOLLOWER_TTL_S: 5 s).
    _ANNOUNCE_S = 1.0
    # The requests that waited for a version come all at once after its hand-over; the work
    # that follows it (``_finish``: the spare K buffer, a pass zeroing the forgotten points'
    # rows and columns in the previous K, 0.02 s for digits on one core) starts this much later,
    # so as not to run beside them. The next version's preparation, seconds later, uses it.
    _FINISH_DELAY_S = 0.3

    def __init__(
        self,
        state: ServiceState,
        wait_s: float = 2.0,
        interval_s: float = 0.05,
        preconditioner: bool = True,
        reader: CheckpointReader | None = None,
    ):
        self.state = state
        self.reader = reader
        self.wait_s = wait_s
        self.interval_s = interval_s
        self.preconditioner = preconditioner
        self._next_read: asyncio.Future | None = None  # shared_required_version's next read
        self._reading = False
        # The version prepared and not served yet: made by the follower thread, served (taken)
        # by it or by a request waiting for it, under ``_swap``.
        self._prepared: _Prepared | None = None
        self._swap = threading.Lock()
        self._read_task: asyncio.Future | None = None
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._polled = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="model-follower", daemon=True)
        self._followed = threading.Event()
        self.follower_id = f"{socket.gethostname()}-{os.getpid()}-{id(self):x}"
        self._announced: tuple[int, float] = (-1, 0.0)  # version, when (monotonic)
        # The step directory of the served version as read (checkpoint.step_identity), and why
        # this process no longer answers, once it found the worker dropped that version.
        self._served_identity: tuple[int, int, int] | None = None
        self.lost: str | None = None
        # The queue lineage check (``_check_lineage``): when it last ran (monotonic), and how
        # many checks in a row found the queue's lineage another than this data dir's.
        self._lineage_checked = -math.inf
        self._lineage_mismatches = 0
        # why this process does not answer: the queue's lineage is not its data dir's (another
        # data dir took it over); cleared once it is again (``_check_lineage``)
        self.taken_over: str | None = None
        # Since when (monotonic) this process has been seen serving a version older than the
        # one required (by any call of required_version), and for which; the follower thread's
        # last failure to load a checkpoint (cleared by a round that failed in nothing).
        self._behind: tuple[int, float] | None = None
        self._last_error: str | None = None
        self._logged_error_at = -math.inf
        self._finisher = threading.Thread(
            target=self._finish, name="model-follower-after", daemon=True
        )

    def start(self) -> None:
        u = self.state.unlearner
        if u is not None:
            self._served_identity = checkpoint.step_identity(
                self.state.settings.checkpoint_dir, u.version
            )
        if self.reader is not None:
            self.reader.start()
        self._thread.start()
        self._finisher.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        self._followed.set()
        if self.reader is not None:  # first: a read waiting for the child returns at once
            self.reader.stop()
        self._thread.join(10)
        self._finisher.join(10)
        try:  # the worker no longer waits for this process
            self.state.queue.withdraw_follower(self.follower_id)
        except (redis.RedisError, AttributeError):
            pass

    def _announce(self) -> None:
        """Tell the worker the newest version this process has prepared or serves
        (``JobQueue.announce_prepared``): it waits for that before reporting a version. Renewed
        every second; a Redis that does not answer only delays the worker (at most its
        ``report_wait_s``)."""
        u = self.state.unlearner
        queue = self.state.queue
        if u is None or queue is None:
            return
        prepared = self._prepared
        version = max(u.version, prepared.version if prepared is not None else -1)
        now = time.monotonic()
        if version == self._announced[0] and now - self._announced[1] < self._ANNOUNCE_S:
            return
        try:
            queue.announce_prepared(self.follower_id, version)
        except redis.RedisError:
            return
        self._announced = (version, now)

    def _check_lineage(self) -> None:
        """Once a second: whether the queue's lineage (``JobQueue.lineage``) is still this data
        dir's (its ``queue-lineage`` file; none while the queue has one is another's, as is a
        ``queue-superseded`` marker its worker left). Another one, twice in a row (a take-over
        writes Redis, then the file): another data dir's worker took the queue over
        (``--take-over-queue``), and this data dir's model no longer receives its deletions: this
        process stops answering from it (``taken_over``: every model request and ``/readyz``
        503) until the lineage is this data dir's again, twice in a row."""
        now = time.monotonic()
        if now - self._lineage_checked < self._ANNOUNCE_S:
            return
        self._lineage_checked = now
        queue = self.state.queue
        if queue is None:
            return
        data_dir = self.state.settings.data_dir
        mine = read_lineage(data_dir / LINEAGE_FILE)
        try:
            theirs = queue.lineage()
        except redis.RedisError:
            return
        other = (data_dir / SUPERSEDED_FILE).exists() or (theirs is not None and theirs != mine)
        if other == (self.taken_over is not None):
            self._lineage_mismatches = 0
            return
        self._lineage_mismatches += 1
        if self._lineage_mismatches < 2:
            return
        self._lineage_mismatches = 0
        if not other:
            log.warning("this data dir holds its queue again: answering from its model again")
            self.taken_over = None
            return
        self.taken_over = TAKEN_OVER
        log.critical("%s", self.taken_over)

    def required_version(self) -> int | None:
        """The version this process must serve at least: the newest the worker has reported,
        or, when Redis does not answer, ``committed_version()``. ``None``: nothing reported or
        saved yet."""
        try:
            wanted = self.state.queue.reported_version()
        except redis.RedisError:
            wanted = self.committed_version()
        self._note_behind(wanted)
        return wanted

    def _note_behind(self, wanted: int | None) -> None:
        """Start (or end) the clock of this process being behind ``wanted``."""
        u = self.state.unlearner
        if wanted is None or u is None or u.version >= wanted:
            self._behind = None
        elif self._behind is None:
            self._behind = (wanted, time.monotonic())

    def behind_seconds(self) -> float:
        """Seconds this process has been serving a version older than the one required
        (``required_version``, read now: a Redis read, or the deletion log's with Redis down);
        0.0 when it serves that version. The gauge ``ntk_unlearn_follower_behind_seconds``."""
        u = self.state.unlearner
        wanted = self.required_version()
        behind = self._behind
        if u is None or wanted is None or behind is None or u.version >= wanted:
            return 0.0
        return time.monotonic() - behind[1]

    def behind(self) -> str | None:
        """Why this process cannot answer now, for ``/readyz``: it serves a version older than
        the required one (``required_version``, read now) and has for longer than ``wait_s``,
        so every model request waits and gets 503. ``None``: it serves the required version,
        or became behind less than ``wait_s`` ago (a hand-over under way). Reading it also wakes
        the follower thread."""
        u = self.state.unlearner
        wanted = self.required_version()
        behind = self._behind
        if u is None or wanted is None or behind is None or u.version >= wanted:
            return None
        self._wake.set()
        seconds = time.monotonic() - behind[1]
        if seconds <= self.wait_s:
            return None
        why = f"; last failure: {self._last_error}" if self._last_error else ""
        return (
            f"this API process serves model version {u.version} and has not loaded version "
            f"{wanted}, which the worker reported, in {seconds:.1f} s (requests get 503 "
            f"meanwhile){why}"
        )

    def committed_version(self) -> int | None:
        """The newest version the worker can no longer drop: the newest with a deletion-log
        record (appended, fsync'd, after its checkpoint and before it is published and reported,
        so never older than a reported one), else the newest checkpoint (version 0, built, is
        never logged). A checkpoint without its record may still be dropped and its version
        number written again with another batch (the record failed), so it is not the bar: a
        follower that served it could never tell (docs/design.md, Followers)."""
        log = self.state.deletion_log
        logged = log.newest_version() if log is not None else None
        if logged is not None:
            return logged
        if checkpoint.latest_version(self.state.settings.checkpoint_dir) is None:
            return None
        return 0

    async def shared_required_version(self) -> int | None:
        """``required_version()`` read after this call began, one read shared by the calls that
        wait for it: a call joins the next read to start (at once when none is running, else as
        soon as the running one ends), never one that started before it, so it sees every version
        reported before it began. Under concurrent requests that is one Redis GET (and one thread
        hand-off) per round instead of one per request. Runs on the event loop."""
        future = self._next_read
        if future is None:
            future = self._next_read = asyncio.get_running_loop().create_future()
            if not self._reading:
                self._start_read()
        # shielded: a request that goes away must not cancel the read the others wait for
        return await asyncio.shield(future)

    def _start_read(self) -> None:
        self._reading = True

        async def read() -> None:
            # From here on, a new call waits for the next read: this one begins after it.
            future, self._next_read = self._next_read, None
            try:
                future.set_result(await anyio.to_thread.run_sync(self.required_version))
            except BaseException as e:  # every waiter gets it, as one request alone would
                future.set_exception(e)
            finally:
                self._reading = False
                if self._next_read is not None:
                    self._start_read()

        self._read_task = asyncio.ensure_future(read())  # held: a task is kept only weakly

    def ensure_current(self) -> None:
        """Return once this process serves at least ``required_version()``, following it if
        needed; at most ``wait_s`` seconds.

        Raises:
          FollowerBehindError: still behind after ``wait_s``.
        """
        wanted = self.required_version()
        if wanted is not None:
            self.catch_up(wanted)

    def catch_up(self, version: int) -> None:
        """Follow the newest checkpoint until this process serves at least ``version``, waiting
        at most ``wait_s`` seconds (the follower thread does the work).

        Raises:
          FollowerBehindError: still behind after ``wait_s``.
        """
        u = self.state.unlearner
        if u is None or u.version >= version:
            return
        if self._serve_prepared(u, version):  # prepared already: served here, at once
            with self._polled:
                self._polled.notify_all()
            if u.version >= version:
                return
        deadline = time.monotonic() + self.wait_s
        with self._polled:
            while u.version < version:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise FollowerBehindError(u.version, version, self._last_error)
                self._wake.set()
                self._polled.wait(remaining)

    def poll(self) -> bool:
        """One round of the follower thread: prepare the newest checkpoint if it is newer than
        what is served or prepared (``Unlearner.prepare_follow``: read it, erase K, while the
        older version is still served), then serve the prepared version once the worker has
        reported it (``required_version``) and its step is still the one read. The worker writes a
        version's checkpoint before its deletion-log record and its report, so the reading and
        the erasing mostly happen before any request can ask for it, and the hand-over itself is
        a swap. Returns whether a newer version is now served."""
        u = self.state.unlearner
        if u is None:
            return False
        directory = self.state.settings.checkpoint_dir
        self._prepare(u, directory)
        if self._prepared is None:
            return False
        wanted = self.required_version()
        return wanted is not None and self._serve_prepared(u, wanted)

    def _serve_prepared(self, u: Unlearner, reported: int) -> bool:
        """Serve the prepared version if it is not newer than ``reported`` (a version the worker
        reported, or ``committed_version`` with Redis down: the worker may still drop a newer
        one, docs/design.md) and its step is still the one read. Called by the follower thread
        (``poll``) and by a request waiting for that version (``catch_up``, with the version it
        read after it arrived), whichever comes first: the request then does not wait for the
        follower thread's next round (its wake-up, a directory listing, a Redis read). Returns
        whether it served one."""
        directory = self.state.settings.checkpoint_dir
        with self._swap:
            prepared = self._prepared
            if prepared is None or prepared.version > reported:
                return False  # not reported yet: the worker may still drop it
            self._prepared = None
            if checkpoint.step_identity(directory, prepared.version) != prepared.identity:
                return False  # dropped and written again, or pruned for a newer one: read again
            if not u.serve_prepared(prepared.prepared):
                return False
            self._served_identity = prepared.identity
            self._note_behind(reported)
        log.info(
            "following the worker: now serving version %d (prepared in %.2f s, %.2f s before "
            "it was served)",
            prepared.version,
            prepared.seconds,
            time.perf_counter() - prepared.ready_at,
        )
        self._followed.set()
        return True

    def _prepare(self, u: Unlearner, directory: Path) -> None:
        """Prepare the newest checkpoint when it is newer than the served or prepared version."""
        prepared = self._prepared
        if prepared is not None and prepared.prepared.base is not u.state:
            with self._swap:
                if self._prepared is prepared:  # served meanwhile (by a request) or stale
                    self._prepared = None
            prepared = None
        newest = checkpoint.newest_step_name(directory)
        self._check_served(u, directory, newest)
        floor = u.version if prepared is None else prepared.version
        if newest is None or newest <= floor:
            return
        t0 = time.perf_counter()
        identity = checkpoint.step_identity(directory, newest)
        newer = u.read_newer(directory, self.reader)
        if (
            newer is None
            or newer.version != newest
            or checkpoint.step_identity(directory, newest) != identity
        ):
            return  # a save or a prune is under way: the next round reads it again
        made = _Prepared(
            u.prepare_follow(newer), identity, time.perf_counter() - t0, time.perf_counter()
        )
        with self._swap:
            self._prepared = made

    def _check_served(self, u: Unlearner, directory: Path, newest: int | None) -> None:
        """Whether the worker dropped the version this process serves: the newest checkpoint is
        older than it, or its step was written again (another batch under the same number). Only
        a fault gets here (a follower that started on a version whose record's fsync then failed,
        with Redis not answering; checkpoints rolled back under a running follower): the worker
        serves another model, so this process stops answering from it (every model request and
        ``/readyz`` 503, ``lost``) and says to restart it, which restores the worker's version."""
        if self.lost is not None or newest is None:
            return
        if newest < u.version:
            why = f"the newest checkpoint is version {newest}"
        elif newest == u.version and self._served_identity is not None:
            identity = checkpoint.step_identity(directory, newest)
            # inode and modification time: a step written again is a new directory; a change of
            # its mode or owner (the change time) is not
            if identity is None or identity[:2] == self._served_identity[:2]:
                return
            why = "its checkpoint was written again with another batch"
        else:
            return
        self.lost = (
            f"this API process served model version {u.version}, which the worker dropped ({why}): "
            "it no longer answers from it; restart it"
        )
        log.critical("%s", self.lost)

    def _finish(self) -> None:
        """The second thread: after each followed version, ``Unlearner.after_follow``."""
        while True:
            self._followed.wait()
            if self._stop.wait(self._FINISH_DELAY_S):
                return
            self._followed.clear()
            u = self.state.unlearner
            try:
                seconds = u.after_follow(self.preconditioner)
            except Exception:
                log.warning("could not finish following version %d", u.version, exc_info=True)
                continue
            if seconds:
                log.info(
                    "after following version %d: %s",
                    u.version,
                    ", ".join(f"{k} {v:.2f} s" for k, v in seconds.items()),
                )

    def _run(self) -> None:
        while not self._stop.is_set():
            asked = self._wake.wait(self.interval_s)
            self._wake.clear()
            if self._stop.is_set():
                return
            try:
                followed = self.poll()
                if followed:  # the requests waiting for it go on before the announcement
                    with self._polled:
                        self._polled.notify_all()
                self._announce()
                self._check_lineage()
                if self._last_error is not None:
                    log.info("loading checkpoints again (after: %s)", self._last_error)
                    self._last_error = None
            except FileNotFoundError as e:
                # the worker pruned the step being read (after reporting a newer one): read again
                log.info("the checkpoint being read was pruned (%s); reading the newest again", e)
                followed = False
            except Exception as e:
                # The worker may prune the version being read; the next poll finds the newer one.
                # The same failure again (every round: 20 a second) is logged every 30 s.
                why = f"could not load the newest checkpoint ({type(e).__name__}: {e})"
                now = time.monotonic()
                if why != self._last_error or now - self._logged_error_at >= 30:
                    log.warning("%s; retrying", why, exc_info=True)
                    self._logged_error_at = now
                self._last_error = why
                followed = False
            with self._polled:
                self._polled.notify_all()
            if self._last_error is not None:
                # A damaged or unreadable step stays so until someone acts: try again every half
                # second, not every round nor at every request's wake-up.
                self._stop.wait(self._FAILED_RETRY_S)
            elif asked and not followed:
                self._stop.wait(self._RETRY_S)
