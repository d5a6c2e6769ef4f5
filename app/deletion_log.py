"""The durable deletion log: one JSON line per applied model version.

It is what remains of a deletion once the records themselves are gone: which jobs removed which
ids, when, producing which version, with what solver result. It outlives Redis's job records.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


class DeletionLog:
    """Append-only JSON-lines file at ``path``."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def append(self, entry: dict[str, Any]) -> None:
        """Append one entry and fsync it, so a logged version survives a crash."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        line = (json.dumps(entry, sort_keys=True) + "\n").encode()
        with open(self.path, "a+b") as f:
            # A crash mid-write leaves a torn last line: end it, so only that line is lost.
            if f.seek(0, os.SEEK_END) > 0:
                f.seek(-1, os.SEEK_END)
                if f.read(1) != b"\n":
                    line = b"\n" + line
            f.write(line)
            f.flush()
            os.fsync(f.fileno())

    def find_job(self, job_id: str) -> dict[str, Any] | None:
        """The entry of the version that applied ``job_id``, if one was logged.

        Reads the whole file: only crash recovery calls it.
        """
        if not self.path.exists():
            return None
        found = None
        with open(self.path, encoding="utf-8") as f:
            for line in f:
                try:
                    entry = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line torn by a crash during its write
                if job_id in entry.get("job_ids", ()):
                    found = entry
        return found
