"""The deletion log's reader against lines that are JSON but not version records.

A hand edit or a foreign tool can leave a line such as ``null``, ``5`` or ``{"version": "abc"}``
in ``deletions.log``; every reader (a follower's start, ``/v1/deletions``, ``/v1/records``, the
worker's duplicate check) must skip it rather than raise.
"""

from __future__ import annotations

import json
import logging

from app.deletion_log import DeletionLog, is_record


def _record(version: int, job: str) -> dict:
    return {
        "version": version,
        "version_before": version - 1,
        "timestamp": "2026-12-03T00:00:00.000+00:00",
        "job_ids": [job],
        "id_digests": [f"d{version}"],
        "job_digests": {job: [f"d{version}"]},
        "n_forgotten": version,
        "n_train": 100 - version,
        "certificate": {"residual": 0.0},
    }


FOREIGN = [
    "null",
    "5",
    '"text"',
    "[1, 2]",
    "{}",
    '{"version": "abc"}',
    '{"version": true, "timestamp": "t", "job_ids": [], "id_digests": []}',
    '{"version": -1, "timestamp": "t", "job_ids": [], "id_digests": []}',
    '{"version": 99, "timestamp": 5, "job_ids": [], "id_digests": []}',
    '{"version": 99, "timestamp": "t", "job_ids": 5, "id_digests": []}',
    '{"version": 99, "timestamp": "t", "job_ids": ["j"], "id_digests": [1]}',
    '{"version": 99, "timestamp": "t", "job_ids": [], "id_digests": [], "job_digests": 3}',
    '{"version": 99, "timestamp": "t", "job_ids": [], "id_digests": [], "n_train": "x"}',
    '{"version": 99, "timestamp": "t", "job_ids": [], "id_digests": [], "certificate": 1}',
    '{"version": 1180591620717411303424, "timestamp": "t", "job_ids": [], "id_digests": []}',
]
# lines json.loads itself raises on (not JSONDecodeError): nested too deep, an integer too long
UNPARSABLE = ["[" * 100_000 + "]" * 100_000, '{"version": 1' + "0" * 5000 + "}"]


def test_foreign_lines_are_skipped_by_every_reader(tmp_path, caplog):
    path = tmp_path / "deletions.log"
    lines = [json.dumps(_record(1, "j1")), *FOREIGN, *UNPARSABLE, json.dumps(_record(2, "j2"))]
    path.write_bytes(("\n".join(lines) + "\n").encode() + b"\xff\xfe not utf-8\n")
    log = DeletionLog(path)
    with caplog.at_level(logging.WARNING, logger="ntk_unlearn.deletion_log"):
        entries = log.entries()
    assert [e["version"] for e in entries] == [1, 2]
    assert f"skipped {len(FOREIGN) + len(UNPARSABLE)} line(s)" in caplog.text
    assert log.versions() == {1, 2}
    assert log.newest_version() == 2
    assert [e["version"] for e in log.page(0, 10)[0]] == [1, 2]
    assert log.page(0, 1) == ([entries[0]], 1)
    assert log.find_job("j2")["version"] == 2 and log.find_job("nope") is None
    assert log.find_digest("d1")["version"] == 1
    # a record appended after them is read (the cache follows the file's growth)
    log.append(_record(3, "j3"))
    assert log.newest_version() == 3


def test_every_record_the_service_writes_has_a_records_shape():
    assert is_record(_record(1, "j"))
    # optional fields may be absent or null (a recovered record has n_train null)
    minimal = {"version": 0, "timestamp": "t", "job_ids": [], "id_digests": []}
    assert is_record(minimal) and is_record({**minimal, "n_train": None, "certificate": None})
    assert not any(is_record(json.loads(line)) for line in FOREIGN)


def test_a_version_logged_twice_is_paged_once_as_its_last_record(tmp_path):
    """A record written but not fsync'd makes the worker drop that version and log the number
    again with the retry: the last record of a version is the published one, and a page shows
    each version once (a page boundary between two copies hid the rest before)."""
    log = DeletionLog(tmp_path / "deletions.log")
    dropped = {**_record(2, "dropped"), "id_digests": ["d-dropped"]}
    for record in (_record(1, "j1"), dropped, _record(2, "j2"), _record(3, "j3")):
        log.append(record)
    first, cursor = log.page(0, 2)
    assert [(e["version"], e["job_ids"]) for e in first] == [(1, ["j1"]), (2, ["j2"])]
    rest, end = log.page(cursor, 2)
    assert [(e["version"], e["job_ids"]) for e in rest] == [(3, ["j3"])] and end is None
    assert log.find_job("j2")["version"] == 2 and log.newest_version() == 3
    # the dropped record is not an applied version for any reader
    assert log.find_job("dropped") is None and log.find_digest("d-dropped") is None
    assert [e["job_ids"] for e in log.current()] == [["j1"], ["j2"], ["j3"]]
