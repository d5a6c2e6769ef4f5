"""The forget-job queue on Redis: a stream with one consumer group, job records, reserved ids.

Keys, all under the prefix ``P`` given to ``JobQueue``: the service passes its data directory's
own (``app.service.queue_prefix``: ``--redis-prefix``, then a namespace derived from the data
directory's id secret), so two models sharing a Redis and a ``--redis-prefix`` never share a key.

- ``P:forget``: the stream; each entry holds only a ``job_id`` (never record ids).
- ``P:job:<job_id>``: the job record (a hash, with a TTL): status, ids, times, solver info. Once
  the job has ended its ids are replaced by their keyed digests (``id_digests``), in the same
  transaction; a succeeded job also holds its signed receipt.
- ``P:pending-ids``: the ids of every queued or running job. Enqueueing checks and extends it in
  one Lua script, so two concurrent requests can never both queue the same id, nor together
  queue every remaining training point (each alone leaving some).
- ``P:pending-add-ids``: the ids of queued or running additions (``POST /v1/records``), also in
  ``P:pending-ids``: they count against no forget's "would leave no training point" check.
- ``P:n-train``: the active training points of the model once every *finished* job is applied,
  written by the worker in the same transaction that releases a batch's ids (and at its start).
  With ``P:pending-ids`` it tells, atomically, how many points the queued jobs leave.
- ``P:idempotency:<key>``: the job created for an idempotency key (same TTL as the job); one
  namespace for forgets and additions, and a key is matched only by a request of its job's kind
  with the same body (``find_idempotent``).
- ``P:version``: the newest model version the worker has published, written in the same
  transaction that reports a batch's jobs (and at its start). An API process without a worker
  serves nothing older and admits forgets only against a model at least this new, so no
  process serves a record a job has been reported as forgetting.

- ``P:lineage``: which data dir's model the queue's jobs are applied to, a random token also kept
  in that data dir (``queue-lineage``), set by its first worker and anew by a worker started with
  ``--take-over-queue``; no expiry. An API process whose data dir holds another token stops
  answering (its model no longer receives the queue's deletions); a worker whose data dir holds
  another one applies nothing.
- ``P:followers`` (sorted set: follower id → the time its announcement lapses, in ms) and
  ``P:followers-prepared`` (hash: follower id → the newest version it has prepared): API
  processes without a worker announce each version they have read and erased ahead
  (``announce_prepared``); before reporting a version the worker waits, briefly, until every
  live follower has prepared it (``wait_prepared``), so a request after the report finds the
  follower ready to swap instead of waiting for its preparation. A follower that stops
  announcing lapses after ``FOLLOWER_TTL_S`` and is no longer waited for.

A job is a forget (``kind`` absent or ``forget``) or an addition (``kind`` ``add``), whose job
record also holds the new records (``records``: JSON ``{"x", "y"}``) until it has ended; both go
through the one stream, in order.

A job is finished (record updated, entry acknowledged and deleted, ids released, ``P:n-train``
updated) in one MULTI/EXEC transaction, so after a crash either all of that happened or none of
it did.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from datetime import UTC, datetime
from typing import Any, Literal

import redis

from service_core import AlreadyForgottenError, InvalidForgetSetError
from service_core.addition import QueuedIdsError

# A follower's announcement lapses this long after its last one (it renews it every second).
FOLLOWER_TTL_S = 5.0
# The worker renews its heartbeat this often; it lapses after three missed renewals.
WORKER_BEAT_S = 5.0
WORKER_TTL_S = 15.0

JobStatus = Literal["queued", "running", "succeeded", "failed"]
JobKind = Literal["forget", "add"]
GROUP = "solvers"

# KEYS: pending-ids set, stream, job hash, idempotency key (the job hash again when unused),
#   n-train, version, pending-add-ids set.
# ARGV: job_id, ttl, submitted_at, ids as JSON, '1' when an idempotency key is given, the
#   caller's n_train ('' for none), the caller's model version ('' for none), ids...
#
# The checks, in the order the engine's validation makes them: a replayed idempotency key; a
# caller whose model is older than the newest version reported (it validated the ids against a
# model that may not know of ids forgotten since, and released from pending-ids); ids
# another queued or running job holds (409); a forget set that, with every queued job, would
# leave no training point (422). The last count uses n-train when the worker has written it: it
# is consistent with pending-ids by construction (both change in the worker's finishing
# transaction), while the caller's model may be a moment ahead of them (a batch published, its
# ids not yet released) or behind (an API process following a separate worker).
# KEYS: followers (zset, score = lapse time), followers-prepared (hash); ARGV[1]: now (ms). Members
# listed and deleted in one script, by chunks (Lua's unpack has a stack limit).
_DROP_LAPSED = """
local lapsed = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1])
for i = 1, #lapsed, 1000 do
  local chunk = {unpack(lapsed, i, math.min(i + 999, #lapsed))}
  redis.call('ZREM', KEYS[1], unpack(chunk))
  redis.call('HDEL', KEYS[2], unpack(chunk))
end
return #lapsed
"""

# KEYS: worker hash, worker home, lineage. ARGV: this worker's name, a lapsed holder it may
# replace ('' for none), the heartbeat's TTL in ms, this worker's home ('' for none), '1' to claim
# the queue only from a worker of the same home unless ARGV[6] is '1' (take over), this data dir's
# lineage ('' for none), a new lineage to set ('' for none: a take-over), then field, value pairs.
# The home and the lineage are kept without expiry (one that expired let a copy take the queue).
# Writes the heartbeat unless the queue's lineage is another one and no new one is set (returns
# {'lineage', it}: another data dir took the queue over), another worker holds it (returns
# {'worker', its name}) or, with ARGV[5], the queue's last holder had another home (returns
# {'home', that home}); false once written. A key that is no hash is replaced.
_BEAT = """
local lineage = redis.call('GET', KEYS[3])
if ARGV[7] ~= '' and ARGV[8] == '' and lineage and lineage ~= ARGV[7] then
  return {'lineage', lineage}
end
local holder = false
if redis.call('TYPE', KEYS[1])['ok'] == 'hash' then holder = redis.call('HGET', KEYS[1], 'worker') end
if holder and holder ~= ARGV[1] and holder ~= ARGV[2] then return {'worker', holder} end
if ARGV[5] == '1' and ARGV[4] ~= '' then
  local last = redis.call('GET', KEYS[2])
  if last and last ~= ARGV[4] and ARGV[6] ~= '1' then return {'home', last} end
  redis.call('SET', KEYS[2], ARGV[4])
end
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], unpack(ARGV, 9))
redis.call('PEXPIRE', KEYS[1], ARGV[3])
if ARGV[8] ~= '' then
  redis.call('SET', KEYS[3], ARGV[8])
elseif ARGV[7] ~= '' and not lineage then
  redis.call('SET', KEYS[3], ARGV[7])
end
return false
"""


class OtherLineageError(Exception):
    """The queue was taken over by another data dir's worker (``--take-over-queue``): its
    lineage (``P:lineage``) is no longer this data dir's, which receives none of its jobs."""

    def __init__(self, lineage: str):
        super().__init__(lineage)
        self.lineage = lineage


class OtherHomeError(Exception):
    """The queue was last held by the worker of another checkpoint directory (``home``): this
    data dir is a copy of that one, or it moved (``JobQueue.beat`` with ``sticky``)."""

    def __init__(self, home: str):
        super().__init__(home)
        self.home = home


# KEYS: stream, worker hash. Returns the jobs queued or running (the stream holds only those:
# a finished job's entry is deleted), the id of the oldest entry (false: none), Redis's clock
# (seconds, microseconds) and the worker's heartbeat fields (flat; empty: no live worker).
_STATUS = """
local oldest = redis.call('XRANGE', KEYS[1], '-', '+', 'COUNT', 1)
local first = false
if #oldest > 0 then first = oldest[1][1] end
local now = redis.call('TIME')
local worker = {}
if redis.call('TYPE', KEYS[2])['ok'] == 'hash' then worker = redis.call('HGETALL', KEYS[2]) end
return {redis.call('XLEN', KEYS[1]), first, now[1], now[2], worker}
"""

_ENQUEUE = """
if ARGV[5] == '1' then
  local existing = redis.call('GET', KEYS[4])
  if existing then return {'duplicate', existing} end
end
local first = 8
if ARGV[7] ~= '' then
  local reported = tonumber(redis.call('GET', KEYS[6]) or '-1')
  if reported > tonumber(ARGV[7]) then return {'stale', tostring(reported)} end
end
local conflicts = {}
for i = first, #ARGV do
  if redis.call('SISMEMBER', KEYS[1], ARGV[i]) == 1 then conflicts[#conflicts + 1] = ARGV[i] end
end
if #conflicts > 0 then return {'conflict', cjson.encode(conflicts)} end
local n_train = tonumber(redis.call('GET', KEYS[5]) or ARGV[6])
if n_train then
  local queued = redis.call('SCARD', KEYS[1]) - redis.call('SCARD', KEYS[7])
  if n_train - queued - (#ARGV - first + 1) < 1 then
    return {'empties', cjson.encode({n_train, queued})}
  end
end
for i = first, #ARGV do redis.call('SADD', KEYS[1], ARGV[i]) end
redis.call('HSET', KEYS[3], 'job_id', ARGV[1], 'status', 'queued', 'ids', ARGV[4],
           'submitted_at', ARGV[3])
redis.call('EXPIRE', KEYS[3], ARGV[2])
redis.call('XADD', KEYS[2], '*', 'job_id', ARGV[1])
if ARGV[5] == '1' then redis.call('SET', KEYS[4], ARGV[1], 'EX', ARGV[2]) end
return {'queued', ARGV[1]}
"""

# An addition: KEYS: pending-ids, pending-add-ids, stream, job hash, version, idempotency key
#   (the job hash again when unused).
# ARGV: job_id, ttl, submitted_at, ids as JSON, records as JSON, the caller's model version
#   ('' for none), '1' when an idempotency key is given, the request's digest, ids...
# The checks: a replayed idempotency key; a caller whose model is older than the newest reported
# version (an id it found free may have been added since); ids another queued or running job
# holds (409).
_ENQUEUE_ADD = """
if ARGV[7] == '1' then
  local existing = redis.call('GET', KEYS[6])
  if existing then return {'duplicate', existing} end
end
local first = 9
if ARGV[6] ~= '' then
  local reported = tonumber(redis.call('GET', KEYS[5]) or '-1')
  if reported > tonumber(ARGV[6]) then return {'stale', tostring(reported)} end
end
local conflicts = {}
for i = first, #ARGV do
  if redis.call('SISMEMBER', KEYS[1], ARGV[i]) == 1 then conflicts[#conflicts + 1] = ARGV[i] end
end
if #conflicts > 0 then return {'conflict', cjson.encode(conflicts)} end
for i = first, #ARGV do
  redis.call('SADD', KEYS[1], ARGV[i])
  redis.call('SADD', KEYS[2], ARGV[i])
end
redis.call('HSET', KEYS[4], 'job_id', ARGV[1], 'status', 'queued', 'kind', 'add', 'ids', ARGV[4],
           'records', ARGV[5], 'submitted_at', ARGV[3], 'request_digest', ARGV[8])
redis.call('EXPIRE', KEYS[4], ARGV[2])
redis.call('XADD', KEYS[3], '*', 'job_id', ARGV[1])
if ARGV[7] == '1' then redis.call('SET', KEYS[6], ARGV[1], 'EX', ARGV[2]) end
return {'queued', ARGV[1]}
"""


class IdempotencyKeyReusedError(Exception):
    """An idempotency key that was first used for another request: other ids (a forget), other
    records (an addition), or the other kind of job."""


class QueuedForAdditionError(AlreadyForgottenError):
    """Ids a forget request names that are not in the model yet: a queued or running addition
    holds them (409: asked too early, not an unknown id)."""

    _what = "id(s) are queued for addition, not in the model yet"


class StaleModelError(Exception):
    """The caller validated a forget request against a model older than the newest version
    the worker has reported; follow that version, then try again.

    Attributes:
      version: the newest reported version.
    """

    def __init__(self, version: int):
        super().__init__(f"the model is older than version {version}, the newest reported")
        self.version = version


def _redis_ms(client: redis.Redis) -> int:
    """Redis's clock in milliseconds: one clock for every process's announcements."""
    seconds, micros = client.time()
    return int(seconds) * 1000 + int(micros) // 1000


@dataclasses.dataclass(frozen=True)
class QueueStatus:
    """What the queue holds and whether a worker serves it (``JobQueue.status``).

    Attributes:
      jobs: jobs queued or running (not finished).
      oldest_s: seconds since the oldest of them was queued (0.0 when none), Redis's clock.
      worker: the live worker's consumer name, ``None`` when no worker renewed its heartbeat in
        the last ``WORKER_TTL_S`` seconds.
      worker_version: the model version that worker serves.
      worker_seen_s: seconds since its last heartbeat.
      worker_busy_s: seconds it has been applying its current batch (``None``: idle).
    """

    jobs: int
    oldest_s: float
    worker: str | None = None
    worker_version: int | None = None
    worker_seen_s: float | None = None
    worker_busy_s: float | None = None

    def describe_worker(self) -> str:
        """One line for people: whether a worker runs, and what it does."""
        if self.worker is None:
            waiting = f" ({self.jobs} job(s) waiting)" if self.jobs else ""
            return (
                "none: no worker holds the queue (one stopped, or none renewed its heartbeat "
                f"in the last {WORKER_TTL_S:.0f} s); "
                f"jobs stay queued until one runs{waiting}"
            )
        busy = (
            f", busy with a batch for {self.worker_busy_s:.1f} s (its solve, or the purge and "
            "preconditioner after it is reported)"
            if self.worker_busy_s is not None
            else ""
        )
        if self.worker_version is None or self.worker_seen_s is None:
            return f"alive: {self.worker}"
        return (
            f"alive: {self.worker}, model version {self.worker_version}, "
            f"seen {self.worker_seen_s:.1f} s ago{busy}"
        )


def utc_now() -> str:
    """The current time, ISO 8601 in UTC with milliseconds."""
    return datetime.now(UTC).isoformat(timespec="milliseconds")


@dataclasses.dataclass(frozen=True)
class Job:
    """One forget or addition request as recorded in Redis."""

    job_id: str
    status: JobStatus
    ids: list[str]
    submitted_at: str
    finished_at: str | None = None
    model_version: int | None = None
    solver: dict[str, Any] | None = None
    refine: dict[str, Any] | None = None
    error: str | None = None
    id_digests: list[str] = dataclasses.field(default_factory=list)
    receipt: dict[str, Any] | None = None
    kind: JobKind = "forget"
    records: dict[str, Any] | None = None  # an addition's {"x", "y"}, until it has ended
    request_digest: str | None = None  # an addition's request (``JobQueue.add_request_digest``)

    @classmethod
    def from_hash(cls, h: dict[str, str]) -> Job:
        version = h.get("model_version")
        return cls(
            job_id=h["job_id"],
            status=h["status"],  # type: ignore[arg-type]
            ids=json.loads(h.get("ids") or "[]"),
            id_digests=json.loads(h.get("id_digests") or "[]"),
            receipt=json.loads(h["receipt"]) if h.get("receipt") else None,
            submitted_at=h["submitted_at"],
            finished_at=h.get("finished_at"),
            model_version=int(version) if version is not None else None,
            solver=json.loads(h["solver"]) if h.get("solver") else None,
            refine=json.loads(h["refine"]) if h.get("refine") else None,
            error=h.get("error"),
            kind=h.get("kind", "forget"),  # type: ignore[arg-type]
            records=json.loads(h["records"]) if h.get("records") else None,
            request_digest=h.get("request_digest"),
        )


@dataclasses.dataclass(frozen=True)
class Entry:
    """A stream entry delivered to a worker, with its job record (``None`` if it expired)."""

    entry_id: str
    job: Job | None


class JobQueue:
    """Client of the forget queue, used by the API (enqueue, read) and the worker (the rest).

    Arguments:
      client: a Redis client created with ``decode_responses=True``.
      prefix: the key prefix of this model.
      ttl_s: how long job records and idempotency keys are kept, in seconds.
      digest: keyed digest of a record id (``receipts.DeploymentKeys.digest``): a finished job
        keeps these instead of its ids. ``None``: finished jobs keep their ids.
    """

    def __init__(
        self,
        client: redis.Redis,
        prefix: str,
        ttl_s: int,
        digest: Callable[[str], str] | None = None,
    ):
        self.client = client
        self.digest = digest
        self.ttl_s = ttl_s
        self.prefix = prefix
        self.stream = f"{prefix}:forget"
        self.pending_key = f"{prefix}:pending-ids"
        self.pending_add_key = f"{prefix}:pending-add-ids"
        self.n_train_key = f"{prefix}:n-train"
        self.version_key = f"{prefix}:version"
        self.followers_key = f"{prefix}:followers"
        self.followers_prepared_key = f"{prefix}:followers-prepared"
        self.worker_key = f"{prefix}:worker"
        self.worker_home_key = f"{prefix}:worker-home"
        self.lineage_key = f"{prefix}:lineage"
        self._job_prefix = f"{prefix}:job:"
        self._idem_prefix = f"{prefix}:idempotency:"
        self._enqueue = client.register_script(_ENQUEUE)
        self._enqueue_add = client.register_script(_ENQUEUE_ADD)
        self._drop_lapsed_script = client.register_script(_DROP_LAPSED)
        self._status_script = client.register_script(_STATUS)
        self._beat_script = client.register_script(_BEAT)

    def job_key(self, job_id: str) -> str:
        """The Redis key of a job record."""
        return self._job_prefix + job_id

    # API side.

    def ping(self) -> None:
        """Raises ``redis.RedisError`` when Redis cannot be reached."""
        self.client.ping()

    def ensure_group(self) -> None:
        """Create the stream and its consumer group if they do not exist yet."""
        try:
            self.client.xgroup_create(self.stream, GROUP, id="0", mkstream=True)
        except redis.ResponseError as e:
            if "BUSYGROUP" not in str(e):
                raise

    def reported_version(self) -> int | None:
        """The newest model version the worker has reported (``P:version``), or ``None`` if no
        worker has run on this prefix (within the job TTL)."""
        value = self.client.get(self.version_key)
        return None if value is None else int(value)

    def status(self) -> QueueStatus:
        """The jobs not finished, the age of the oldest, and the worker's heartbeat: one script,
        one round trip (no pipeline: the API's guarded client passes only single commands
        through its circuit breaker). Raises ``redis.RedisError``."""
        count, first, now_s, now_us, fields = self._status_script(
            keys=[self.stream, self.worker_key]
        )
        now = int(now_s) + int(now_us) / 1e6
        oldest_s = 0.0
        if first:
            oldest_s = max(0.0, now - int(str(first).split("-")[0]) / 1000)
        h = dict(zip(fields[::2], fields[1::2], strict=True))
        if "worker" not in h:
            return QueueStatus(int(count), oldest_s)
        try:
            busy = h.get("busy_since")
            return QueueStatus(
                int(count),
                oldest_s,
                worker=h["worker"],
                worker_version=int(h["version"]),
                worker_seen_s=max(0.0, now - float(h["seen"])),
                worker_busy_s=max(0.0, now - float(busy)) if busy else None,
            )
        except (KeyError, ValueError):  # not this code's heartbeat: another writer of the key
            return QueueStatus(int(count), oldest_s, worker=f"{h['worker']} (unreadable heartbeat)")

    def announce_prepared(self, follower: str, version: int, ttl_s: float = FOLLOWER_TTL_S) -> None:
        """Follower ``follower`` has prepared (or serves) ``version``; live for ``ttl_s`` seconds
        from now (Redis's clock). Drops lapsed followers' entries as it goes (whether or not a
        worker waits for followers). Raises ``redis.RedisError``."""
        now = _redis_ms(self.client)
        pipe = self.client.pipeline(transaction=True)
        pipe.hset(self.followers_prepared_key, follower, int(version))
        pipe.zadd(self.followers_key, {follower: now + int(ttl_s * 1000)})
        pipe.execute()
        self._drop_lapsed(now)

    def withdraw_follower(self, follower: str) -> None:
        """Follower ``follower`` stops (no one waits for it any more). Raises ``redis.RedisError``."""
        pipe = self.client.pipeline(transaction=True)
        pipe.zrem(self.followers_key, follower)
        pipe.hdel(self.followers_prepared_key, follower)
        pipe.execute()

    def _drop_lapsed(self, now_ms: int) -> None:
        """Delete the entries of followers whose announcement lapsed by ``now_ms`` (Redis's
        clock), in one script: a follower that renews between the listing and the deletion
        would otherwise lose its fresh entry. Raises ``redis.RedisError``."""
        self._drop_lapsed_script(
            keys=[self.followers_key, self.followers_prepared_key], args=[now_ms]
        )

    def followers_behind(self, version: int) -> list[str]:
        """The live followers that have not prepared ``version`` yet (lapsed ones are dropped).
        Raises ``redis.RedisError``."""
        now = _redis_ms(self.client)
        self._drop_lapsed(now)
        live = self.client.zrangebyscore(self.followers_key, f"({now}", "+inf")
        if not live:
            return []
        prepared = self.client.hmget(self.followers_prepared_key, live)
        return [f for f, v in zip(live, prepared, strict=True) if v is None or int(v) < version]

    def wait_prepared(
        self, version: int, timeout_s: float, poll_s: float = 0.01
    ) -> list[str] | None:
        """Wait (at most ``timeout_s``, plus one Redis call's socket timeout when Redis hangs)
        until every live follower has prepared ``version``.

        Returns:
          the followers still behind then (``[]``: none), or ``None`` when a Redis error ended
          the wait (whether they prepared it is unknown; the report that follows meets the error
          too).
        """
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                behind = self.followers_behind(version)
            except redis.RedisError:
                return None
            if not behind or time.monotonic() >= deadline:
                return behind
            time.sleep(min(poll_s, max(0.0, deadline - time.monotonic())))

    def succeeded_after(self, version: int, every: bool = False) -> list[Job]:
        """The jobs that succeeded with a model version newer than ``version``, when the worker
        has reported a version newer than it (``reported_version``; else none, without a scan):
        what a data directory restored at ``version`` lacks (``Worker.reapply_reported``).
        ``every``: every succeeded job, whatever its version (a data dir taking the queue over
        from another, whose version numbers are not this one's). Their records are scanned (all
        of this queue's, kept ``ttl_s``). Raises ``redis.RedisError``."""
        reported = self.reported_version()
        if not every and (reported is None or reported <= version):
            return []
        jobs = []
        for key in self.client.scan_iter(match=self._job_prefix + "*", count=1000):
            h = self.client.hgetall(key)
            if not h or h.get("status") != "succeeded":
                continue
            try:
                job = Job.from_hash(h)
            except (KeyError, ValueError, TypeError):  # not a job record this release wrote
                continue
            if job.model_version is not None and (every or job.model_version > version):
                jobs.append(job)
        return jobs

    def stream_length(self, key: str) -> int:
        """The entries of the stream ``key`` (0: no such key, or not a stream). Raises
        ``redis.RedisError``."""
        return int(self.client.xlen(key)) if self.client.type(key) in ("stream", b"stream") else 0

    def pending_ids(self) -> frozenset[str]:
        """Ids of every queued or running job."""
        return frozenset(self.client.smembers(self.pending_key))

    def get(self, job_id: str) -> Job | None:
        """The job record, or ``None`` if there is none (never existed, or expired)."""
        h = self.client.hgetall(self.job_key(job_id))
        return Job.from_hash(h) if h else None

    def add_request_digest(self, ids: Sequence[str], x: Any, y: Any) -> str:
        """What identifies an addition's request for its idempotency key: SHA-256 of the canonical
        JSON of ``{"ids", "x", "y"}`` (sorted keys, no whitespace), keyed by ``digest`` when set
        (records in the model are no one's to test against a stored hash), hex.

        Arguments:
          ids: the record ids in the request's order; x, y: JSON-able nested lists of numbers.
        """
        body = json.dumps({"ids": list(ids), "x": x, "y": y}, sort_keys=True, separators=(",", ":"))
        hashed = hashlib.sha256(body.encode()).hexdigest()
        return self.digest(hashed) if self.digest is not None else hashed

    def find_idempotent(
        self,
        key: str,
        ids: Sequence[str],
        kind: JobKind = "forget",
        request_digest: str | None = None,
    ) -> Job | None:
        """The job an earlier request with this idempotency key created, if any.

        Arguments:
          key: the idempotency key; ids: the request's ids.
          kind: the request's kind: a key is never matched by a request of the other kind.
          request_digest: an addition's ``add_request_digest`` (its ids, x and y must match).

        Raises:
          IdempotencyKeyReusedError: that job is of the other kind, or has other ids (a forget)
            or another request digest (an addition).
        """
        job_id = self.client.get(self._idem_prefix + key)
        job = self.get(job_id) if job_id else None
        if job is None:
            return None
        if job.kind != kind:
            what = {"forget": "POST /v1/forget", "add": "POST /v1/records"}[job.kind]
            raise IdempotencyKeyReusedError(
                f"idempotency_key {key!r} was used for {what} (job {job.job_id}): use a new key "
                "for a new request"
            )
        if kind == "add":
            same = job.request_digest == request_digest
        elif not job.ids and self.digest is not None:
            same = sorted(job.id_digests) == sorted(map(self.digest, ids))
        else:
            same = sorted(job.ids) == sorted(ids)
        if not same:
            other = "other records (ids, x or y)" if kind == "add" else "other ids"
            raise IdempotencyKeyReusedError(
                f"idempotency_key {key!r} was used for job {job.job_id} with {other}: "
                "use a new key for a new request"
            )
        return job

    def enqueue(
        self,
        ids: Sequence[str],
        idempotency_key: str | None = None,
        n_train: int | None = None,
        version: int | None = None,
    ) -> Job:
        """Reserve ``ids`` and queue a job to forget them, atomically.

        Call after validating ``ids`` against the model and ``pending_ids()``; this repeats the
        checks that can race with other requests: that no other queued or running job holds one
        of the ids, and that the ids with those of every queued or running job leave at least
        one training point.

        Arguments:
          ids: the record ids to forget.
          idempotency_key: a retried request with this key gets the first request's job.
          n_train: active training points of the model the caller validated against; counts
            only until a worker has recorded the count (``record_n_train``). ``None``: skip the
            count when no worker has recorded it either (the worker validates again anyway).
          version: the version of the model the caller validated against; refused if older than
            the newest reported (``reported_version``). ``None``: not checked (the process that
            runs the worker, whose model is published before its version is reported).

        Returns:
          The new job, or the existing one when ``idempotency_key`` was used already.

        Raises:
          AlreadyForgottenError: some ids are held by another queued or running job.
          InvalidForgetSetError: with the queued jobs, no training point would remain.
          IdempotencyKeyReusedError: see ``find_idempotent``.
          StaleModelError: ``version`` is older than the newest reported one.
        """
        job_id = uuid.uuid4().hex
        use_key = idempotency_key is not None
        keys = [
            self.pending_key,
            self.stream,
            self.job_key(job_id),
            self._idem_prefix + idempotency_key if use_key else self.job_key(job_id),
            self.n_train_key,
            self.version_key,
            self.pending_add_key,
        ]
        submitted_at = utc_now()
        args = [
            job_id,
            self.ttl_s,
            submitted_at,
            json.dumps(list(ids)),
            "1" if use_key else "0",
            "" if n_train is None else int(n_train),
            "" if version is None else int(version),
        ]
        outcome, value = self._enqueue(keys=keys, args=[*args, *ids])
        if outcome == "stale":
            raise StaleModelError(int(value))
        if outcome == "conflict":
            raise AlreadyForgottenError(json.loads(value), "Wait for the queued job to finish.")
        if outcome == "empties":
            remaining, queued = json.loads(value)
            raise InvalidForgetSetError(
                f"forgetting these {len(ids)} ids (with {queued} queued) would remove every "
                f"remaining training point ({remaining} before the queued jobs); at least one "
                "must remain"
            )
        if outcome == "duplicate":
            job = self.find_idempotent(idempotency_key, ids)  # type: ignore[arg-type]
            if job is not None:
                return job
            # The earlier job expired between the two calls: the key is free again.
            self.client.delete(self._idem_prefix + idempotency_key)  # type: ignore[operator]
            return self.enqueue(ids, idempotency_key, n_train, version)
        # Not read back: the worker may have taken it already, but it was queued when accepted.
        return Job(job_id=job_id, status="queued", ids=list(ids), submitted_at=submitted_at)

    def pending_kind(self, record_id: str) -> str | None:
        """``"forget"`` or ``"add"`` when a queued or running job names ``record_id``, else
        ``None`` (two set lookups, one round trip).

        Raises:
          redis.RedisError: Redis did not answer (the caller decides what that means).
        """
        with self.client.pipeline(transaction=False) as pipe:
            pipe.sismember(self.pending_key, record_id)
            pipe.sismember(self.pending_add_key, record_id)
            named, added = pipe.execute()
        return ("add" if added else "forget") if named else None

    def pending_add_ids(self) -> frozenset[str]:
        """Ids of every queued or running addition."""
        return frozenset(self.client.smembers(self.pending_add_key))

    def enqueue_add(
        self,
        ids: Sequence[str],
        x: Any,
        y: Any,
        version: int | None = None,
        idempotency_key: str | None = None,
    ) -> Job:
        """Reserve ``ids`` and queue a job adding the records ``(ids, x, y)``, atomically.

        Call after validating the records against the model and ``pending_ids()``; this repeats
        the check that can race with other requests: that no queued or running job holds one of
        the ids. The records (``x``, ``y``: JSON-able nested lists of numbers) stay in the job
        record until the job has ended.

        Arguments:
          version: as for ``enqueue``: the version the caller validated against, refused if older
            than the newest reported; ``None`` for the process that runs the worker.
          idempotency_key: a retried request with this key (and the same ids, x and y) gets the
            first request's job.

        Returns:
          The new job, or the existing one when ``idempotency_key`` was used already.

        Raises:
          QueuedIdsError: some ids are held by another queued or running job.
          IdempotencyKeyReusedError: see ``find_idempotent``.
          StaleModelError: ``version`` is older than the newest reported one.
        """
        job_id = uuid.uuid4().hex
        use_key = idempotency_key is not None
        keys = [
            self.pending_key,
            self.pending_add_key,
            self.stream,
            self.job_key(job_id),
            self.version_key,
            self._idem_prefix + idempotency_key if use_key else self.job_key(job_id),
        ]
        submitted_at = utc_now()
        request_digest = self.add_request_digest(ids, x, y)
        args = [
            job_id,
            self.ttl_s,
            submitted_at,
            json.dumps(list(ids)),
            json.dumps({"x": x, "y": y}),
            "" if version is None else int(version),
            "1" if use_key else "0",
            request_digest,
        ]
        outcome, value = self._enqueue_add(keys=keys, args=[*args, *ids])
        if outcome == "duplicate":
            assert idempotency_key is not None
            job = self.find_idempotent(idempotency_key, ids, "add", request_digest)
            if job is not None:
                return job
            # The earlier job expired between the two calls: the key is free again.
            self.client.delete(self._idem_prefix + idempotency_key)
            return self.enqueue_add(ids, x, y, version, idempotency_key)
        if outcome == "stale":
            raise StaleModelError(int(value))
        if outcome == "conflict":
            raise QueuedIdsError(json.loads(value), "Wait for that job to finish.")
        return Job(
            job_id=job_id,
            status="queued",
            ids=list(ids),
            submitted_at=submitted_at,
            kind="add",
            request_digest=request_digest,
        )

    # Worker side.

    def _entries(self, raw: Iterable[tuple[str, dict[str, str] | None]]) -> list[Entry]:
        raw = list(raw)
        pipe = self.client.pipeline(transaction=False)
        for _, fields in raw:
            # Redis 6.2 hands back entries deleted since delivery with no fields.
            pipe.hgetall(self.job_key((fields or {}).get("job_id", "")))
        records = pipe.execute()
        return [
            Entry(entry_id, Job.from_hash(h) if h else None)
            for (entry_id, _), h in zip(raw, records, strict=True)
        ]

    def read(self, consumer: str, block_ms: int, count: int) -> list[Entry]:
        """Deliver up to ``count`` new entries to ``consumer``, waiting up to ``block_ms``.

        Every entry available when the call returns is delivered, so jobs that queued up while
        the worker was busy arrive together.
        """
        reply = self.client.xreadgroup(
            GROUP, consumer, {self.stream: ">"}, count=count, block=block_ms
        )
        return self._entries(reply[0][1]) if reply else []

    def claim_unacknowledged(self, consumer: str) -> list[Entry]:
        """Take over every entry delivered to any consumer but never acknowledged.

        Only one worker may serve a model, so anything unacknowledged belonged to a worker that
        is gone (this one, before a restart, included).
        """
        entries: list[Entry] = []
        cursor = "0-0"
        while True:
            reply = self.client.xautoclaim(
                self.stream, GROUP, consumer, min_idle_time=0, start_id=cursor, count=100
            )
            cursor, claimed = reply[0], reply[1]
            entries += self._entries(claimed)
            if cursor == "0-0":
                return entries

    def forget_idle_consumers(self, keep: str) -> None:
        """Drop the group's record of consumers with nothing pending (workers since restarted)."""
        for consumer in self.client.xinfo_consumers(self.stream, GROUP):
            if consumer["name"] != keep and consumer["pending"] == 0:
                self.client.xgroup_delconsumer(self.stream, GROUP, consumer["name"])

    def mark_running(self, jobs: Sequence[Job]) -> None:
        pipe = self.client.pipeline(transaction=False)
        for job in jobs:
            pipe.hset(self.job_key(job.job_id), "status", "running")
        pipe.execute()

    def compact(self) -> None:
        """Ask Redis to rewrite its append-only file (BGREWRITEAOF), so that the commands that once
        wrote a finished job's ids in clear leave the disk too. Refused rewrites (one already
        running, a managed Redis that forbids it) are ignored: the next one catches up."""
        try:
            self.client.bgrewriteaof()
        except redis.ResponseError:
            pass

    def beat(
        self,
        worker: str,
        version: int,
        busy_since: float | None,
        ttl_s: float = WORKER_TTL_S,
        replace: str | None = None,
        home: str | None = None,
        sticky: bool = False,
        take_over: bool = False,
        lineage: str | None = None,
        new_lineage: str | None = None,
    ) -> str | None:
        """The worker ``worker`` is alive and serves ``version``; applying a batch since
        ``busy_since`` (Unix seconds; ``None``: idle). Lapses ``ttl_s`` seconds from now.
        ``home``: the worker's checkpoint directory (its host's absolute path), kept in the
        heartbeat (``heartbeat_home``). With ``sticky`` (a Redis shared beyond the data dir),
        the home of the queue's last holder is kept too (``P:worker-home``, without expiry: a
        copy took the queue once an expiring one had lapsed), and a worker of another home does
        not take the queue (raises ``OtherHomeError``) unless ``take_over`` (the operator's ``--take-over-queue``): a copy
        of the data dir beside the original would apply its jobs to the copy's model.

        The heartbeat is also the queue's one-worker claim: written only when no other worker's
        heartbeat is live (or it is that of ``replace``, a worker known to be gone), atomically.
        Returns the name of the other worker holding it (nothing written), else ``None``: two
        workers on one data dir's queue (copies of one data directory) would apply its jobs to
        different models, so the caller applies none while another holds it (``Worker``).

        ``lineage``: the data dir's queue lineage (``P:lineage``, set by the first worker that
        holds the queue): when the queue's is another one, another data dir took the queue over,
        and this worker writes nothing (raises ``OtherLineageError``) unless it sets
        ``new_lineage`` (a take-over of its own), which the API processes of every other data
        dir then see (they stop answering: ``ModelFollower``).
        Times are Redis's clock where it matters: ``seen`` is taken from it, ``busy_since`` is
        moved onto it (this host's clock minus Redis's, measured now). Raises
        ``redis.RedisError``, ``OtherHomeError``, ``OtherLineageError``."""
        now_s, now_us = self.client.time()
        now = int(now_s) + int(now_us) / 1e6
        fields = {"worker": worker, "version": int(version), "seen": f"{now:.3f}"}
        if busy_since is not None:
            fields["busy_since"] = f"{now - (time.time() - busy_since):.3f}"
        if home is not None:  # where its checkpoints are: tells a restart from a copy
            fields["home"] = home
        pairs = [str(v) for kv in fields.items() for v in kv]
        args = [worker, replace or "", int(ttl_s * 1000), home or "", "1" if sticky else "0"]
        args += ["1" if take_over else "0", lineage or "", new_lineage or "", *pairs]
        keys = [self.worker_key, self.worker_home_key, self.lineage_key]
        answer = self._beat_script(keys=keys, args=args)
        if not answer:
            return None
        kind, value = answer
        if kind == "home":
            raise OtherHomeError(value)
        if kind == "lineage":
            raise OtherLineageError(value)
        return value

    def lineage(self) -> str | None:
        """The queue's lineage (``P:lineage``; ``None``: none yet). Raises ``redis.RedisError``."""
        return self.client.get(self.lineage_key)

    def heartbeat_home(self) -> str | None:
        """The ``home`` of the live heartbeat (``None``: none, or none recorded). Raises
        ``redis.RedisError``."""
        if self.client.type(self.worker_key) != "hash":
            return None
        return self.client.hget(self.worker_key, "home")

    def held_elsewhere(
        self, home: str, sticky: bool, take_over: bool = False, lineage: str | None = None
    ) -> bool:
        """Whether the worker of the checkpoint directory ``home`` must leave this queue's keys
        alone: another directory's worker holds it (a live heartbeat of another home), the
        queue's lineage is not the data dir's ``lineage`` (taken over) unless ``take_over``, or,
        with ``sticky`` and not ``take_over``, its last holder was another directory's
        (``beat``). Raises ``redis.RedisError``."""
        current = self.lineage()
        if lineage is not None and current not in (None, lineage) and not take_over:
            return True
        if self.client.type(self.worker_key) == "hash":
            return self.heartbeat_home() != home
        if not sticky or take_over:
            return False
        return self.client.get(self.worker_home_key) not in (None, home)

    def end_beat(self, worker: str) -> None:
        """The worker ``worker`` stops: its heartbeat goes at once (only its own: a worker that
        started since keeps its). Raises ``redis.RedisError``."""
        if self.client.hget(self.worker_key, "worker") == worker:
            self.client.delete(self.worker_key)

    def record_n_train(self, n_train: int, version: int | None = None) -> None:
        """Record the active training points of the worker's model, with every finished job
        applied (see ``P:n-train`` above), and its version (``P:version``). Called by the worker
        at start, once recovered."""
        pipe = self.client.pipeline(transaction=True)
        pipe.set(self.n_train_key, int(n_train), ex=self.ttl_s)
        if version is not None:
            pipe.set(self.version_key, int(version), ex=self.ttl_s)
        pipe.execute()

    def finish(
        self,
        outcomes: Sequence[tuple[Entry, dict[str, Any]]],
        n_train: int | None = None,
        version: int | None = None,
    ) -> None:
        """Record each job's outcome, acknowledge and delete its entry, and release its ids.

        Arguments:
          outcomes: ``(entry, fields)`` pairs; ``fields`` is what to record in the job (status,
            finished_at, ...; dicts are stored as JSON), empty for an entry without a job.
          n_train: active training points of the model with these jobs applied; recorded in
            the same transaction that releases their ids, so the two always agree.
          version: that model's version, reported (``P:version``) in the same transaction
            that marks the jobs succeeded: no one learns of a job's success before every API
            process is held to serve at least its version.
        """
        if not outcomes:
            return
        pipe = self.client.pipeline(transaction=True)
        for entry, fields in outcomes:
            if entry.job is not None:
                key = self.job_key(entry.job.job_id)
                stored = {
                    k: json.dumps(v) if isinstance(v, dict | list) else v
                    for k, v in fields.items()
                    if v is not None
                }
                ended = fields.get("status") in ("succeeded", "failed")
                if ended and self.digest is not None and entry.job.ids:
                    # No id in clear once the job has ended: only their keyed digests.
                    stored["id_digests"] = json.dumps([self.digest(i) for i in entry.job.ids])
                    pipe.hdel(key, "ids")
                if ended:  # an addition's records: in the model now, or refused
                    pipe.hdel(key, "records")
                if stored:
                    pipe.hset(key, mapping=stored)
                pipe.expire(key, self.ttl_s)
                if entry.job.ids:
                    pipe.srem(self.pending_key, *entry.job.ids)
                    if entry.job.kind == "add":
                        pipe.srem(self.pending_add_key, *entry.job.ids)
            pipe.xack(self.stream, GROUP, entry.entry_id)
            # Acknowledged entries serve no purpose; delete them rather than let the stream grow.
            pipe.xdel(self.stream, entry.entry_id)
        if n_train is not None:
            pipe.set(self.n_train_key, int(n_train), ex=self.ttl_s)
        if version is not None:
            pipe.set(self.version_key, int(version), ex=self.ttl_s)
        pipe.execute()
