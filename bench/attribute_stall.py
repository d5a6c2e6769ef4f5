"""Predictions while ``/v1/attribute`` factors the leave-one-out system (one ``serve`` process).

A client sends a 1-row ``/v1/predict`` every 20 ms; after 3 s idle, one cold ``/v1/attribute``
(the first after a start: it factors the system) and then one warm one run. Recorded per phase:
predictions served, their p50, p99 and max latency. Each code tree given with ``--code`` runs
``--repeats`` times, alternating, on a fresh data dir each time (so every attribute is cold):
before/after comparisons measured side by side in one run.

    ntk-unlearn bench attribute-stall [--code LABEL=DIR ...] [--repeats 3] [--dataset digits]

``DIR`` is a checkout of this repository (its ``app`` and ``service_core`` are imported from
there with this interpreter); default: this tree. Writes ``bench/results/attribute-stall.json``
and ``attribute-stall.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "bench" / "results"
WRITE, READ = "w" * 32, "r" * 32


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stats(latencies: list[float]) -> dict:
    ms = np.asarray(latencies) * 1e3
    if ms.size == 0:
        return {"n": 0, "p50_ms": None, "p99_ms": None, "max_ms": None}
    return {
        "n": int(ms.size),
        "p50_ms": float(np.median(ms)),
        "p99_ms": float(np.percentile(ms, 99)),
        "max_ms": float(ms.max()),
    }


def run_once(code: Path, dataset: str, extra: list[str], log_dir: Path) -> dict:
    import httpx
    from sklearn.datasets import load_digits

    port = _free_port()
    data_dir = Path(tempfile.mkdtemp(prefix="attr-stall-"))
    env = dict(
        os.environ,
        PYTHONPATH=str(code),
        NTK_UNLEARN_API_TOKEN=WRITE,
        NTK_UNLEARN_READ_TOKEN=READ,
    )
    cmd = [sys.executable, "-m", "app", "serve", "--port", str(port), "--data-dir", str(data_dir)]
    log_file = open(log_dir / f"serve-{port}.log", "w")
    proc = subprocess.Popen(
        [*cmd, "--dataset", dataset, *extra],
        cwd=code,
        env=env,
        stdout=log_file,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    base = f"http://127.0.0.1:{port}"
    headers = {"Authorization": f"Bearer {READ}"}
    try:
        client = httpx.Client(timeout=600)
        deadline = time.monotonic() + 900
        while time.monotonic() < deadline:
            try:
                if client.get(base + "/readyz").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None:
                raise RuntimeError(f"serve exited {proc.returncode}: see {log_file.name}")
            time.sleep(0.5)
        x = (load_digits().data[:1] / 16.0).tolist()
        latencies: list[tuple[float, float]] = []
        stop = threading.Event()

        def predictor():
            c = httpx.Client(timeout=600)
            while not stop.is_set():
                t = time.perf_counter()
                r = c.post(base + "/v1/predict", json={"x": x}, headers=headers)
                latencies.append((t, time.perf_counter() - t))
                if r.status_code != 200:
                    raise RuntimeError(r.text)
                time.sleep(0.02)

        thread = threading.Thread(target=predictor, daemon=True)
        thread.start()
        time.sleep(3.0)
        phases = {"idle": (0.0, time.perf_counter())}
        for phase in ("cold", "warm"):
            t0 = time.perf_counter()
            r = client.post(
                base + "/v1/attribute", json={"x": x, "y": [0], "k": 5}, headers=headers
            )
            phases[phase] = (t0, time.perf_counter())
            if r.status_code != 200:
                raise RuntimeError(r.text)
        time.sleep(0.5)
        stop.set()
        thread.join(60)
        out = {}
        for phase, (t0, t1) in phases.items():
            during = [d for s, d in latencies if t0 <= s <= t1]
            out[phase] = {**_stats(during), "seconds": t1 - t0 if phase != "idle" else None}
        return out
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        log_file.close()


def _commit(code: Path) -> str:
    try:
        return subprocess.run(
            ["git", "-C", str(code), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="ntk-unlearn bench attribute-stall",
        description=(__doc__ or "").split("\n\n")[0].replace("``", ""),
    )
    parser.add_argument(
        "--code",
        action="append",
        default=[],
        help="LABEL=DIR: a checkout whose service to measure, repeatable (default: this tree)",
    )
    parser.add_argument("--repeats", type=int, default=3, help="runs per code (default 3)")
    parser.add_argument("--dataset", default="digits", help="serve's --dataset (default digits)")
    parser.add_argument("--serve-args", default="", help="extra serve flags, one string")
    parser.add_argument("--out", type=Path, default=OUT, help=f"results folder (default {OUT})")
    args = parser.parse_args(argv)
    codes = [tuple(c.split("=", 1)) for c in args.code] or [("this tree", str(REPO))]
    args.out.mkdir(parents=True, exist_ok=True)
    log_dir = Path(tempfile.mkdtemp(prefix="attr-stall-logs-"))
    runs: dict[str, list[dict]] = {label: [] for label, _ in codes}
    for repeat in range(args.repeats):
        for label, code in codes:
            result = run_once(Path(code).resolve(), args.dataset, args.serve_args.split(), log_dir)
            runs[label].append(result)
            print(f"[{repeat + 1}/{args.repeats}] {label}: {json.dumps(result)}", flush=True)
    report = {
        "command": "ntk-unlearn bench attribute-stall " + " ".join(argv or sys.argv[1:]),
        "commits": {label: _commit(Path(code)) for label, code in codes},
        "dataset": args.dataset,
        "serve_args": args.serve_args,
        "loadavg_before": os.getloadavg(),
        "runs": runs,
    }
    (args.out / "attribute-stall.json").write_text(json.dumps(report, indent=1))
    lines = [
        f"`{report['command']}` (dataset {args.dataset}; commits "
        + ", ".join(f"{k} {v}" for k, v in report["commits"].items())
        + "); medians over runs",
        "",
        "| code | phase | attribute s | predictions | p50 ms | p99 ms | max ms (runs) |",
        "|---|---|---|---|---|---|---|",
    ]
    for label, results in runs.items():
        for phase in ("idle", "cold", "warm"):
            rows = [r[phase] for r in results]

            def med(key, rows=rows):
                vals = [r[key] for r in rows if r[key] is not None]
                return f"{np.median(vals):.1f}" if vals else "—"

            maxes = ", ".join(f"{r['max_ms']:.0f}" for r in rows if r["max_ms"] is not None)
            lines.append(
                f"| {label} | {phase} | {med('seconds')} | {med('n')} | {med('p50_ms')} | "
                f"{med('p99_ms')} | {med('max_ms')} ({maxes}) |"
            )
    (args.out / "attribute-stall.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
