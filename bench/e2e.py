"""End-to-end deletion time over HTTP against the engine's own time (``ntk-unlearn bench e2e``).

For each workload: start ``ntk-unlearn serve`` as a child process on 127.0.0.1 (a free port, a fresh
temporary data dir, its private Redis, its own API token), wait for ``/readyz``, run one warm-up
forget (compilation), then ``--forgets`` forgets of ``--percent`` % of the initial ids each (drawn
once with ``--seed``, disjoint). Each forget is timed from the 202 of ``POST /v1/forget`` until
``GET /v1/jobs/{id}`` (polled every ``--poll-ms``) reads ``succeeded``; the job record's
``solver.timings`` holds the engine's parts (validate, compact, rhs, solve, delta, refine, residual,
checkpoint, publish), the deletion-log write (``log``) and their ``total``: every part that runs
before the job is reported. The first poll that reads ``running`` splits end to end into the wait
in the queue and the run. Before the next forget the bench waits until the server's log reports the
worker's post-publish work (``after publishing: ...``: Nyström refresh, cache purge, spare K buffer;
off the job's latency by design, but the worker is busy with it) and then ``--pause`` seconds, so
each job finds the worker idle; those post-publish seconds are reported too. The server is stopped at
the end (SIGTERM to its process group, SIGKILL after 30 s) and its data dir deleted.

Reported per workload: the median end-to-end time, the median ``timings.total``, their ratio (goal
≤ 1.5) and the median of every part; every forget's numbers are in the JSON.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np

POST_PUBLISH = re.compile(r"after publishing: (.*)$")
PARTS = (
    "validate",
    "compact",
    "rhs",
    "solve",
    "delta",
    "refine",
    "residual",
    "checkpoint",
    "publish",
    "log",
)


def serve_args(workload: str, args) -> list[str]:
    """``ntk-unlearn serve`` options of a workload."""
    if workload == "digits":  # the service's default model on its default data set
        return ["--dataset", "digits"]
    if workload == "mnist":  # the figure1 MNIST workload's model (bench.figure1.make_workload)
        return [
            "--dataset",
            f"mnist:{args.mnist_dir}",
            "--n-train",
            str(10 * args.mnist_per_class),
            "--model",
            "mlp",
            "--width",
            str(args.mnist_width),
            "--depth",
            "3",
            "--loss",
            "ce",
            "--lam",
            "0.01",
        ]
    raise ValueError(f"unknown workload {workload!r}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Client:
    """Minimal JSON client with a bearer token (standard library only)."""

    def __init__(self, base: str, token: str, timeout: float = 30.0):
        self.base, self.token, self.timeout = base, token, timeout

    def request(self, method: str, path: str, body=None) -> tuple[int, dict]:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.base + path, data=data, method=method)
        req.add_header("Authorization", f"Bearer {self.token}")
        if data is not None:
            req.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                return resp.status, json.loads(resp.read() or b"{}")
        except urllib.error.HTTPError as e:
            try:
                payload = json.loads(e.read() or b"{}")
            except ValueError:
                payload = {}
            return e.code, payload


class Server:
    """``ntk-unlearn serve`` in a child process group; a context manager that always stops it."""

    def __init__(self, options: list[str], log_path: Path, data_dir: Path):
        self.port = _free_port()
        self.token = secrets.token_urlsafe(24)
        self.data_dir = data_dir
        self.log_path = log_path
        exe = Path(sys.executable).parent / "ntk-unlearn"
        cmd = [str(exe) if exe.exists() else "ntk-unlearn", "serve", *options]
        cmd += ["--host", "127.0.0.1", "--port", str(self.port), "--data-dir", str(data_dir)]
        self.command = cmd
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> Server:
        env = {k: v for k, v in os.environ.items() if not k.startswith("NTK_UNLEARN_")}
        env.pop("REDIS_URL", None)  # its own private Redis
        env["NTK_UNLEARN_API_TOKEN"] = self.token  # not on the command line
        self._log = open(self.log_path, "w")  # closed by stop()
        self.proc = subprocess.Popen(
            self.command,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,  # its own process group: stopped whole (Redis included)
        )
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def client(self) -> Client:
        return Client(f"http://127.0.0.1:{self.port}", self.token)

    def wait_ready(self, timeout: float) -> float:
        """Seconds until ``/readyz`` answers 200. Raises RuntimeError on exit or timeout."""
        t0 = time.perf_counter()
        client = self.client
        while time.perf_counter() - t0 < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"serve exited with {self.proc.returncode}; see {self.log_path}")
            try:
                status, _ = client.request("GET", "/readyz")
                if status == 200:
                    return time.perf_counter() - t0
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                pass
            time.sleep(0.5)
        raise RuntimeError(f"serve not ready after {timeout:.0f} s; see {self.log_path}")

    def wait_post_publish(self, count: int, timeout: float) -> dict[str, float]:
        """Wait until the server's log holds ``count`` ``after publishing`` lines (the worker is idle
        again); the seconds per part of the last one."""
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < timeout:
            text = self.log_path.read_text(errors="replace").splitlines()
            lines = [m.group(1) for m in map(POST_PUBLISH.search, text) if m]
            if len(lines) >= count:
                parts = {}
                for item in lines[count - 1].split(", "):
                    name, _, value = item.rpartition(" ")
                    name, _, num = name.rpartition(" ")
                    try:
                        parts[name or item] = float(num)
                    except ValueError:
                        pass
                return parts
            time.sleep(0.05)
        raise RuntimeError(f"no post-publish log line after {timeout:.0f} s; see {self.log_path}")

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            self._close_log()
            return
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
        except ProcessLookupError:
            pass
        self._close_log()

    def _close_log(self) -> None:
        log = getattr(self, "_log", None)
        if log is not None and not log.closed:
            log.close()


def all_ids(client: Client) -> list[str]:
    ids: list[str] = []
    while True:
        status, page = client.request("GET", f"/v1/ids?offset={len(ids)}&limit=10000")
        if status != 200:
            raise RuntimeError(f"GET /v1/ids: {status} {page}")
        ids += page["ids"]
        if len(ids) >= page["total"] or not page["ids"]:
            return ids


def timed_forget(client: Client, ids: list[str], poll_s: float, timeout: float) -> dict:
    """One forget, 202 → succeeded, with the job record's ``solver``."""
    status, acc = client.request("POST", "/v1/forget", {"ids": ids})
    t0 = time.perf_counter()
    if status != 202:
        raise RuntimeError(f"POST /v1/forget: {status} {acc}")
    path = f"/v1/jobs/{acc['job_id']}"
    polls, queued = 0, None
    while True:
        status, job = client.request("GET", path)
        polls += 1
        if status == 200 and queued is None and job["status"] != "queued":
            queued = time.perf_counter() - t0  # first poll that reads running (or done)
        if status == 200 and job["status"] in ("succeeded", "failed"):
            e2e = time.perf_counter() - t0
            break
        if time.perf_counter() - t0 > timeout:
            raise RuntimeError(f"job {acc['job_id']} not finished after {timeout:.0f} s: {job}")
        time.sleep(poll_s)
    if job["status"] != "succeeded":
        raise RuntimeError(f"job {acc['job_id']} failed: {job.get('error')}")
    solver = job.get("solver") or {}
    timings = solver.get("timings") or {}
    return {
        "n_ids": len(ids),
        "e2e_s": e2e,
        "queued_s": queued,
        "polls": polls,
        "model_version": job.get("model_version"),
        "method": solver.get("method"),
        "iterations": solver.get("iterations"),
        "refine_steps": (job.get("refine") or {}).get("iterations"),
        "timings": timings,
        "engine_total_s": timings.get("total"),
    }


def run_workload(workload: str, args, log=print) -> dict:
    options = serve_args(workload, args)
    data_dir = Path(tempfile.mkdtemp(prefix=f"ntk-e2e-{workload}-"))
    log_path = Path(tempfile.gettempdir()) / f"ntk-e2e-{workload}-{os.getpid()}-serve.log"
    res: dict = {
        "workload": workload,
        "serve_options": options,
        "serve_log": str(log_path),
        "forgets": [],
    }
    t_start = time.perf_counter()
    try:
        with Server(options, log_path, data_dir) as server:
            log(
                f"\n== e2e / {workload}: ntk-unlearn serve {' '.join(options)} (port {server.port})"
            )
            res["ready_s"] = server.wait_ready(args.ready_timeout)
            log(f"   ready after {res['ready_s']:.1f} s")
            client = server.client
            status, info = client.request("GET", "/v1/model")
            res["model"] = info if status == 200 else {"status": status}
            ids = all_ids(client)
            n0 = len(ids)
            k = max(1, round(args.percent / 100 * n0))
            order = np.random.default_rng(args.seed).permutation(n0)
            chunks = [[ids[i] for i in order[j * k : (j + 1) * k]] for j in range(args.forgets + 1)]
            res.update(n_train=n0, ids_per_forget=k, pause_s=args.pause)
            for j, chunk in enumerate(chunks):
                r = timed_forget(client, chunk, args.poll_ms / 1000, args.job_timeout)
                r["warmup"] = j == 0
                r["post_publish"] = server.wait_post_publish(j + 1, args.job_timeout)
                res["forgets"].append(r)
                t = r["timings"]
                log(
                    f"   {'warm-up' if j == 0 else f'forget {j}'}: {r['n_ids']} ids, end to end {r['e2e_s']:.3f} s "
                    f"(queued {r['queued_s']:.3f} s), "
                    f"engine total {r['engine_total_s']:.3f} s ({r['method']}, {r['iterations']} it, "
                    f"refine {r['refine_steps']}); "
                    + ", ".join(f"{p} {t[p]:.3f}" for p in PARTS if p in t)
                    + f"; then after publishing {r['post_publish']}"
                )
                time.sleep(args.pause)
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)
    warm = [r for r in res["forgets"] if not r["warmup"]]
    e2e = statistics.median(r["e2e_s"] for r in warm)
    total = statistics.median(r["engine_total_s"] for r in warm)
    res["summary"] = {
        "n": len(warm),
        "e2e_median_s": e2e,
        "engine_total_median_s": total,
        "ratio": e2e / total,
        "goal": 1.5,
        "ratios": [r["e2e_s"] / r["engine_total_s"] for r in warm],
        "queued_median_s": statistics.median(r["queued_s"] for r in warm),
        "post_publish_median_s": {
            p: statistics.median(r["post_publish"].get(p, 0.0) for r in warm)
            for p in ("preconditioner", "purge", "spare")
        },
        "parts_median_s": {
            p: statistics.median(r["timings"].get(p, 0.0) for r in warm) for p in PARTS
        },
    }
    res["seconds_total"] = time.perf_counter() - t_start
    s = res["summary"]
    log(
        f"   {workload}: median end to end {e2e:.3f} s, median engine total {total:.3f} s, "
        f"ratio {s['ratio']:.2f} (goal ≤ 1.5)"
    )
    return res


def markdown(res: dict) -> str:
    """A section for one or more workloads of an ``e2e`` run."""
    m = res["machine"]
    lines = [
        "## End-to-end deletion time over HTTP against the engine's time (`bench/e2e.py`)",
        "",
        f"Command: `{res['command']}` ({m['date_utc']}; commit {res.get('commit', '?')}); "
        f"{m['cpu_model']}, {m['usable_cores']} cores, load average at start "
        f"{', '.join(f'{x:.1f}' for x in (m['loadavg_1_5_15'] or []))}.",
        "",
        f"Protocol: `ntk-unlearn serve` in a child process (fresh data dir, private Redis), one warm-up forget, then "
        f"{res['settings']['forgets']} forgets of {res['settings']['percent']:g} % of the initial ids each; end to end = "
        f"202 of `POST /v1/forget` → `GET /v1/jobs/{{id}}` reads `succeeded` (polled every {res['settings']['poll_ms']} ms); "
        f"engine = the job record's `solver.timings.total` (compute, checkpoint, publish, deletion log). "
        "Before each next forget the bench waits until the server logs the worker's post-publish work (Nyström "
        "refresh, cache purge, spare K: after the job is reported, but the worker is busy meanwhile), then "
        f"{res['settings']['pause']:g} s: each job finds the worker idle, as deletions that do not arrive back to back.",
        "",
        "| workload | serve options | N | ids per forget | median end to end s | of which queued s | median engine total s | ratio (goal ≤ 1.5) | per-forget ratios | post-publish s (preconditioner, purge, spare) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for w in res["workloads"].values():
        if "summary" not in w:
            lines.append(f"| {w['workload']} | {w.get('error', 'no result')} | | | | | | | | |")
            continue
        s = w["summary"]
        lines.append(
            f"| {w['workload']} | `{' '.join(w['serve_options'])}` | {w['n_train']} | {w['ids_per_forget']} | "
            f"{s['e2e_median_s']:.3f} | {s['queued_median_s']:.3f} | {s['engine_total_median_s']:.3f} | "
            f"**{s['ratio']:.2f}** | {', '.join(f'{x:.2f}' for x in s['ratios'])} | "
            + ", ".join(f"{v:.2f}" for v in s["post_publish_median_s"].values())
            + " |"
        )
    lines += ["", "Median seconds per part of `solver.timings` (warm forgets):", ""]
    lines += [
        "| workload | " + " | ".join(PARTS) + " | total |",
        "|---|" + "---|" * (len(PARTS) + 1),
    ]
    for w in res["workloads"].values():
        if "summary" in w:
            p = w["summary"]["parts_median_s"]
            lines.append(
                f"| {w['workload']} | "
                + " | ".join(f"{p[k]:.3f}" for k in PARTS)
                + f" | {w['summary']['engine_total_median_s']:.3f} |"
            )
    lines.append("")
    return "\n".join(lines)


def main(args, argv, machine, log=print) -> int:
    """The ``e2e`` subcommand (options from ``bench.cli``)."""
    res = {
        "command": "ntk-unlearn bench " + " ".join(argv),
        "machine": machine,
        "settings": {
            "forgets": args.forgets,
            "percent": args.percent,
            "poll_ms": args.poll_ms,
            "pause": args.pause,
            "seed": args.seed,
        },
        "workloads": {},
    }
    try:
        res["commit"] = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            cwd=Path(__file__).resolve().parent,
            timeout=10,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            cwd=Path(__file__).resolve().parent,
            timeout=10,
        ).stdout.strip()
        if dirty:
            res["commit"] += " + uncommitted changes"
    except (OSError, subprocess.SubprocessError):
        pass
    rc = 0
    workloads = ["digits", "mnist"] if args.workload == "all" else [args.workload]
    if "cifar" in workloads:
        log("e2e: workloads digits and mnist only")
        return 2
    for wl in workloads:
        if wl == "mnist" and not any(Path(args.mnist_dir).glob("t10k-images-idx3-ubyte*")):
            log(f"e2e / mnist skipped: no MNIST IDX files in {args.mnist_dir}")
            continue
        try:
            res["workloads"][wl] = run_workload(wl, args, log)
        except RuntimeError as e:
            log(f"e2e / {wl}: {e}")
            res["workloads"][wl] = {"workload": wl, "error": str(e)}
            rc = 1
    (args.out / "e2e.json").write_text(json.dumps(res, indent=1))
    md = markdown(res)
    (args.out / "e2e.md").write_text(md)
    log("\n" + md)
    return rc
