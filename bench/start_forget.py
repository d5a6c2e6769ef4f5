"""Start ``ntk-unlearn serve ARGS`` on an empty data dir, then time two forgets of 20 ids over HTTP.

The README's "Other model kinds" and "Your own network" figures come from it::

    .venv/bin/python bench/start_forget.py NAME PORT SERVE_ARGS...

It prints one JSON object: seconds until ``/readyz`` answers 200 (``ready_s``), each forget's
end-to-end seconds (POST to the job's end, polled every 50 ms) with its solver method, iterations
and solve seconds, K's shape, bytes and form, and the precision block of ``/v1/model``. The data
dir (``data-bench-NAME/`` in the checkout, emptied first; git ignores it) and the server's log
(``data-bench-NAME.log`` inside it) are kept. The server runs on its own private Redis (REDIS_URL is unset for it).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    name, port, args = argv[0], int(argv[1]), argv[2:]
    data = REPO / f"data-bench-{name}"
    shutil.rmtree(data, ignore_errors=True)
    data.mkdir()
    env = {**os.environ, "NTK_UNLEARN_API_TOKEN": "bench-token", "PYTHONPATH": str(REPO)}
    env.pop("REDIS_URL", None)
    command = [sys.executable, "-m", "app", "serve", "--port", str(port), "--data-dir", str(data)]
    url, auth = f"http://127.0.0.1:{port}", {"Authorization": "Bearer bench-token"}
    result: dict = {"name": name, "args": args}
    with open(data / f"data-bench-{name}.log", "w") as log:
        started = time.monotonic()
        server = subprocess.Popen(
            [*command, *args], stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=env
        )
        try:
            while True:
                if server.poll() is not None:
                    raise SystemExit(f"serve exited with {server.returncode}: see {log.name}")
                try:
                    if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                time.sleep(0.2)
            result["ready_s"] = round(time.monotonic() - started, 1)
            ids = httpx.get(url + "/v1/ids?limit=40", headers=auth).json()["ids"]
            for k, chunk in enumerate((ids[:20], ids[20:40]), start=1):
                t = time.monotonic()
                job_id = httpx.post(url + "/v1/forget", json={"ids": chunk}, headers=auth).json()[
                    "job_id"
                ]
                while (job := httpx.get(f"{url}/v1/jobs/{job_id}", headers=auth).json())[
                    "status"
                ] not in (
                    "succeeded",
                    "failed",
                ):
                    time.sleep(0.05)
                result[f"forget{k}_s"] = round(time.monotonic() - t, 2)
                solver = job.get("solver") or {}
                result[f"forget{k}"] = {
                    key: solver.get(key) for key in ("method", "iterations", "seconds")
                }
                result[f"forget{k}"]["status"] = job["status"]
            model = httpx.get(url + "/v1/model", headers=auth).json()
            result["kernel"] = {key: model["kernel"].get(key) for key in ("shape", "bytes", "form")}
            result["precision"] = model.get("precision")
        finally:
            server.terminate()
            server.wait(60)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
