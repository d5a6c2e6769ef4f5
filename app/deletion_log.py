"""The durable deletion log: one JSON line per applied model version.

It is what remains of a deletion once the records themselves are gone: which jobs removed which
ids (as keyed digests, ``receipts.DeploymentKeys.digest``: no id in clear), when, producing which
version from which, with what certificate, solver result and checkpoint hash. It outlives Redis's
job records. A version's record is written (fsync'd) after its checkpoint and before it is
published; a crash between the two is repaired at the next start from the checkpoint
(``record_from_checkpoint``).
"""

from __future__ import annotations

import json
import logging
import os
import threading
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from service_core import ModelState

log = logging.getLogger("ntk_unlearn.deletion_log")

_OPTIONAL_INT = ("version_before", "n_forgotten", "n_train", "n_added")


def _is_str_list(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def is_record(entry: Any) -> bool:
    """Whether a parsed line has a record's shape: an object with an integer ``version`` in
    [0, 2⁶³) (not a boolean), a string ``timestamp``, ``job_ids`` and ``id_digests`` lists of strings,
    and, when present, ``job_digests`` a map of string lists, the counts integers or null and
    ``certificate`` an object or null. What every reader of the log relies on."""
    if not isinstance(entry, dict):
        return False
    version = entry.get("version")
    if not isinstance(version, int) or isinstance(version, bool) or not 0 <= version < 2**63:
        return False
    if not isinstance(entry.get("timestamp"), str):
        return False
    if not (_is_str_list(entry.get("job_ids")) and _is_str_list(entry.get("id_digests"))):
        return False
    job_digests = entry.get("job_digests", {})
    if not isinstance(job_digests, dict) or not all(_is_str_list(v) for v in job_digests.values()):
        return False
    for key in _OPTIONAL_INT:
        value = entry.get(key)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool)):
            return False
    return entry.get("certificate") is None or isinstance(entry.get("certificate"), dict)


class DeletionLog:
    """JSON-lines file at ``path``: appended to, one fsync'd record per version; replaced whole
    only to remove the records of versions that were never published (``drop_after``)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._lock = threading.Lock()
        # keyed by the file's (inode, size, mtime): it grows by appends and is replaced whole by
        # ``drop_after``, whose file may later grow back to the old size
        self._cache: tuple[tuple[int, int, int] | None, list[dict[str, Any]]] = (None, [])
        self._newest: tuple[tuple[int, int, int] | None, int | None] = (None, None)

    def append(self, entry: dict[str, Any]) -> None:
        """Append one entry and fsync it, so a logged version survives a crash."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        line = (json.dumps(entry, sort_keys=True) + "\n").encode()
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o600)
        with os.fdopen(fd, "a+b") as f:
            # A crash mid-write leaves a torn last line: end it, so only that line is lost.
            if f.seek(0, os.SEEK_END) > 0:
                f.seek(-1, os.SEEK_END)
                if f.read(1) != b"\n":
                    line = b"\n" + line
            f.write(line)
            f.flush()
            os.fsync(f.fileno())

    @property
    def dropped_path(self) -> Path:
        """Where ``drop_after`` keeps the records it removes: ``deletions.dropped.log`` beside the
        log (the log's real file when it is a link)."""
        target = self.path.resolve()
        return target.with_name(target.stem + ".dropped" + target.suffix)

    def drop_after(self, version: int) -> list[int]:
        """Remove the records of every version newer than ``version`` from the log: versions that
        were never published (their record was written, then its fsync failed and their
        checkpoint was dropped; or the process died before it could remove it), whose record would
        otherwise read as applied: ``/v1/deletions`` listing a failed job's version, a follower
        waiting for a version that does not exist, a re-run addition "already logged". Only the
        worker calls it (it alone writes the log), after a failed append. (Not at a start: a
        record newer than every checkpoint may be a published version's under checkpoints
        rolled back, the evidence of a deletion.)

        Nothing is lost: the removed lines are first appended to ``dropped_path`` (fsync'd); then
        the log is replaced atomically by a copy without them (written beside the log's real
        file, fsync'd, renamed over it, the directory fsync'd). A copy left by a process killed
        meanwhile is deleted by the next call. Nothing is written when there is nothing to remove.

        Returns:
          The versions removed (one per removed record, in file order).

        Raises:
          OSError: the side file or the copy could not be written, or the rename failed (the log
            is then unchanged); or the directory's fsync failed (the log is replaced, the rename
            may not survive a power loss).
        """
        target = self.path.resolve()
        for stale in target.parent.glob(f".{target.name}.*.tmp"):
            stale.unlink(missing_ok=True)
        try:
            raw = target.read_bytes()
        except FileNotFoundError:
            return []
        kept, removed, versions = [], [], []
        for line in raw.splitlines(keepends=True):
            try:
                entry = json.loads(line)
            except (ValueError, RecursionError):
                entry = None
            line = line if line.endswith(b"\n") else line + b"\n"
            if is_record(entry) and int(entry["version"]) > version:
                removed.append(line)
                versions.append(int(entry["version"]))
            else:  # every other line as it was, torn or foreign ones too
                kept.append(line)
        if not removed:
            return []
        fd = os.open(self.dropped_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        with os.fdopen(fd, "ab") as f:
            f.write(b"".join(removed))
            f.flush()
            os.fsync(f.fileno())
        tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(b"".join(kept))
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, target)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        dir_fd = os.open(target.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
        return versions

    def entries(self) -> list[dict[str, Any]]:
        """Every complete entry, oldest first (re-read only when the file has changed). A line
        that is not JSON (torn by a crash during its write) or not a record's shape
        (``is_record``: a hand edit, a foreign line) is skipped, with a warning for the latter."""
        try:
            st = self.path.stat()
        except FileNotFoundError:
            return []
        key = (st.st_ino, st.st_size, st.st_mtime_ns)
        with self._lock:
            if key != self._cache[0]:
                found, foreign = [], []
                with open(self.path, encoding="utf-8", errors="replace") as f:
                    for number, line in enumerate(f, start=1):
                        try:
                            entry = json.loads(line)
                        except json.JSONDecodeError:
                            continue  # a line torn by a crash during its write
                        except (ValueError, RecursionError):  # nested too deep, huge numbers
                            foreign.append(number)
                            continue
                        if is_record(entry):
                            found.append(entry)
                        else:
                            foreign.append(number)
                if foreign:
                    log.warning(
                        "deletion log %s: skipped %d line(s) that are not version records "
                        "(lines %s)",
                        self.path,
                        len(foreign),
                        ", ".join(map(str, foreign[:10])) + (", …" if len(foreign) > 10 else ""),
                    )
                self._cache = (key, found)
            return self._cache[1]

    def current(self) -> list[dict[str, Any]]:
        """``entries`` with each version's last record only, oldest first: a version whose record
        was written but not fsync'd was dropped, and its number logged again with the retry's
        record, which supersedes it. What every reader of applied versions uses."""
        entries = self.entries()
        last = {int(e["version"]): i for i, e in enumerate(entries)}
        return [e for i, e in enumerate(entries) if last[int(e["version"])] == i]

    def find_job(self, job_id: str) -> dict[str, Any] | None:
        """The entry of the version that applied ``job_id``, if one was logged."""
        found = None
        for entry in self.current():
            if job_id in entry.get("job_ids", ()):
                found = entry
        return found

    def find_digest(self, digest: str) -> dict[str, Any] | None:
        """The entry of the newest version that forgot the record with this keyed digest, if any
        (a forgotten id added again, then forgotten again, was forgotten twice)."""
        found = None
        for entry in self.current():
            if digest in entry.get("id_digests", ()):
                found = entry
        return found

    def job_of(self, entry: dict[str, Any], digest: str) -> str | None:
        """The job of ``entry`` that forgot ``digest`` (the first job when not recorded)."""
        for job_id, digests in entry.get("job_digests", {}).items():
            if digest in digests:
                return job_id
        jobs = entry.get("job_ids") or [None]
        return jobs[0]

    def versions(self) -> set[int]:
        return {int(e["version"]) for e in self.entries()}

    def newest_version(self) -> int | None:
        """The newest logged version (``None``: none), recomputed only when the file has grown:
        a follower reads it for every round of requests while Redis does not answer."""
        self.entries()  # re-read if grown
        with self._lock:
            key, entries = self._cache  # one consistent pair
            if self._newest[0] != key:
                found = [int(e["version"]) for e in entries]
                self._newest = (key, max(found, default=None))
            return self._newest[1]

    def page(
        self, cursor: int, limit: int, through: int | None = None
    ) -> tuple[list[dict[str, Any]], int | None]:
        """Entries with version > ``cursor`` (and ≤ ``through`` when given: the version the
        reader serves), oldest first, at most ``limit``; and the cursor of the next page (the last
        version returned), ``None`` at the end. One entry per version: the last logged (a version
        whose record was written but whose fsync failed was dropped, and its number written again
        with the retry's record)."""
        top = through if through is not None else 2**63
        after = sorted(
            (e for e in self.current() if cursor < int(e["version"]) <= top),
            key=lambda e: int(e["version"]),
        )
        page = after[:limit]
        return page, (int(page[-1]["version"]) if len(after) > limit else None)


def version_record(
    result: Any,
    version_before: int,
    job_ids: list[str],
    id_digests: list[str],
    state: ModelState,
    timestamp: str,
    checkpoint_sha256: str | None,
    job_digests: dict[str, list[str]] | None = None,
) -> dict[str, Any]:
    """The log entry of a deletion computed from ``state`` (``ForgetResult`` ``result``), before it
    is published: the new version's counts are ``state``'s with ``id_digests`` gone.
    ``job_digests``: each job's own digests (a batch has several jobs)."""
    return {
        "version": result.version,
        "version_before": version_before,
        "timestamp": timestamp,
        "job_ids": job_ids,
        "id_digests": id_digests,
        "job_digests": job_digests or {},
        "n_forgotten": len(state.forgotten) + len(id_digests),
        "n_train": state.n - len(id_digests),
        "certificate": {
            "residual": float(result.residual),
            "tolerance": state.train_config.resolved_tol(),
            **(result.certificate or {}),  # the engine's (tolerance held to, slack, dtype)
            "method": result.solve.method,
        },
        "checkpoint_sha256": checkpoint_sha256,
        "solver": {
            **result.solve.to_dict(),
            "reason": result.reason,
            "certificate": result.certificate,
        },
        "refine": result.refine.to_dict() if result.refine is not None else None,
        "seconds": result.seconds,
    }


def addition_record(
    result: Any,
    version_before: int,
    job_ids: list[str],
    added_digests: list[str],
    timestamp: str,
    checkpoint_sha256: str | None,
    job_digests: dict[str, list[str]] | None = None,
) -> dict[str, Any]:
    """The log entry of an addition (``addition.AddResult`` ``result``), before it is published:
    ``kind`` ``add``, the added ids as keyed digests in ``added_digests`` (``id_digests``, the
    forgotten ones, is empty: an addition forgets nothing), counts of the new version, its
    certificate and Newton solve, the checkpoint's hash."""
    solve = {**result.solve.to_dict(), "newton_steps": result.newton_steps}
    certificate = dict(result.certificate or {})
    return {
        "kind": "add",
        "version": result.version,
        "version_before": version_before,
        "timestamp": timestamp,
        "job_ids": job_ids,
        "id_digests": [],
        "added_digests": added_digests,
        "job_digests": job_digests or {},
        "n_added": result.n_added,
        "n_forgotten": result.n_forgotten,
        "n_train": result.n_train,
        "certificate": {**certificate, "method": "newton"},
        "checkpoint_sha256": checkpoint_sha256,
        "solver": {
            **solve,
            "method": "newton",
            "iterations": int(solve.get("newton_steps", solve.get("iterations", 0))),
            "reason": f"added {result.n_added} records: Newton on the dual risk from the current α",
            "certificate": certificate,
        },
        "refine": None,
        "seconds": result.timings.get("total"),
    }


def records_from_checkpoint(
    state: ModelState, logged: set[int], checkpoint_sha256: str | None
) -> list[dict[str, Any]]:
    """Log entries for the versions of ``state``'s history that ``logged`` lacks (a crash between
    a checkpoint and its log record), from the history records and the forgotten digests the
    checkpoint holds. Only the newest version has its checkpoint hash and training size."""
    out = []
    start = 0
    for record in state.history:
        version, n = int(record["version"]), int(record.get("n_forgotten", 0))
        if version == 0:
            continue
        note = record.get("note") or {}
        if note.get("job_digests") and note.get("kind") != "add":
            # the service's note: exact even when a forgotten id was added again since
            digests = [
                d for job in note.get("job_ids", []) for d in note["job_digests"].get(job, [])
            ]
        else:
            digests = list(state.forgotten[start : start + n])
        start += n
        if version in logged:
            continue
        newest = version == state.version
        if note.get("kind") == "add":
            out.append(_addition_from_history(record, note, state, checkpoint_sha256, newest))
            continue
        out.append(
            {
                "version": version,
                "version_before": note.get("version_before", version - 1),
                "timestamp": datetime.fromtimestamp(record["time"], UTC).isoformat(
                    timespec="milliseconds"
                ),
                "job_ids": list(note.get("job_ids", [])),
                "id_digests": digests,
                "job_digests": dict(note.get("job_digests", {})),
                "n_forgotten": start,
                "n_train": state.n if newest else None,
                "certificate": {
                    "residual": float(record["residual"]),
                    "tolerance": float(
                        record.get("tolerance") or state.train_config.resolved_tol()
                    ),
                    "accept_floor": float(record.get("accept_floor", 1.0)),
                    "method": record["solve"].get("method"),
                    # a nonlinear deletion's own certificate (met, enforced), as logged live
                    **(
                        {"nonlinear": record["certificate"]}
                        if isinstance(record.get("certificate"), dict)
                        else {}
                    ),
                },
                "checkpoint_sha256": checkpoint_sha256 if newest else None,
                "solver": {**record["solve"], "reason": record.get("reason", "")},
                "refine": record.get("refine"),
                "seconds": None,
                "recovered": "written at start-up from the checkpoint",
            }
        )
    return out


def _addition_from_history(
    record: dict[str, Any],
    note: dict[str, Any],
    state: ModelState,
    checkpoint_sha256: str | None,
    newest: bool,
) -> dict[str, Any]:
    """The log entry of an addition's version from its history record and note (see
    ``records_from_checkpoint``)."""
    version = int(record["version"])
    added = [d for job in note.get("job_ids", []) for d in note.get("job_digests", {}).get(job, [])]
    return {
        "kind": "add",
        "version": version,
        "version_before": note.get("version_before", version - 1),
        "timestamp": datetime.fromtimestamp(record["time"], UTC).isoformat(timespec="milliseconds"),
        "job_ids": list(note.get("job_ids", [])),
        "id_digests": [],
        "added_digests": added,
        "job_digests": dict(note.get("job_digests", {})),
        "n_added": len(added),
        "n_forgotten": len(state.forgotten) if newest else None,
        "n_train": state.n if newest else None,
        "certificate": {
            "residual": float(record["residual"]),
            "tolerance": float(record.get("tolerance") or state.train_config.resolved_tol()),
            "method": "newton",
        },
        "checkpoint_sha256": checkpoint_sha256 if newest else None,
        "solver": {**record["solve"], "reason": record.get("reason", "")},
        "refine": record.get("refine"),
        "seconds": None,
        "recovered": "written at start-up from the checkpoint",
    }
