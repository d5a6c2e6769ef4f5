"""How long a follower's checkpoint read keeps the API process's other threads waiting.

An API process without the worker (``serve --no-worker``) reads each new version's checkpoint
(orbax) on its follower thread while its event loop answers requests. This bench makes that read
both ways, alternated version by version in one run: in this process (``here``, as before
``app.reader``) and through ``app.reader.CheckpointReader`` (``child``). A monitor thread sleeps
0.5 ms in a loop and records how late it wakes: while the read runs, its longest wait is the
longest the read kept the interpreter lock (or the CPUs) from any other thread of the process, an
event loop's included. ``idle`` is the same monitor while the main thread only sleeps as long as
a read took (the machine's own noise). Also per read: wall time and the CPU time of this process
(``time.process_time``: every thread, orbax's too).

    ntk-unlearn bench follow-read [--versions 20] [--data-dir DIR]

The model is the service's default (digits), built once into ``--data-dir`` (default: a temporary
directory); a worker and a follower engine in this process forget one id per version. Writes
``bench/results/follow-read.json`` and ``follow-read.md``.
"""

from __future__ import annotations

import argparse
import gc
import json
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "bench" / "results"
MODES = ("here", "child", "idle")


class _Monitor:
    """A thread that sleeps 0.5 ms in a loop; ``window()`` is the longest it waited to run again
    between ``begin()`` and now (seconds)."""

    def __init__(self):
        self.longest = 0.0
        self.active = False
        self.stop = False
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        last = time.perf_counter()
        while not self.stop:
            time.sleep(0.0005)
            now = time.perf_counter()
            if self.active:
                self.longest = max(self.longest, now - last)
            last = now

    def begin(self):
        self.longest, self.active = 0.0, True

    def end(self) -> float:
        time.sleep(0.002)  # the wait in progress when the read ended counts
        self.active = False
        return self.longest


def _stats(values: list[float]) -> dict:
    v = np.asarray(values, float)
    return {
        "n": int(v.size),
        "median": float(np.median(v)),
        "p90": float(np.percentile(v, 90)),
        "max": float(v.max()),
    }


def run(versions: int, data_dir: Path, log=print) -> dict:
    from app import service
    from app.core.config import Settings
    from app.reader import CheckpointReader
    from service_core import Unlearner

    settings = Settings(data_dir=data_dir)
    log(f"model: {settings.dataset} in {data_dir} (built if absent)")
    worker = service.load_model(settings, "worker")
    follower = Unlearner.restore(settings.checkpoint_dir, progress=False)
    follower.after_follow(preconditioner=False)
    reader = CheckpointReader()
    reader.start()
    if not reader.ready(wait_s=120):  # the child's imports, before timing
        raise SystemExit("the checkpoint reader process did not start")
    monitor = _Monitor()
    gc.collect()
    gc.freeze()  # as ``serve`` does after its start-up
    rows = {m: {"wait_ms": [], "wall_ms": [], "cpu_ms": []} for m in MODES}
    ids = list(worker.active_ids())
    try:
        for i in range(versions):
            mode = ("here", "child")[i % 2]
            worker.forget([ids[i]], checkpoint_dir=settings.checkpoint_dir)
            time.sleep(0.2)
            monitor.begin()
            wall, cpu = time.perf_counter(), time.process_time()
            newer = follower.read_newer(
                settings.checkpoint_dir, reader if mode == "child" else None
            )
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            rows[mode]["wait_ms"].append(monitor.end() * 1e3)
            rows[mode]["wall_ms"].append(wall * 1e3)
            rows[mode]["cpu_ms"].append(cpu * 1e3)
            monitor.begin()
            time.sleep(wall)
            rows["idle"]["wait_ms"].append(monitor.end() * 1e3)
            follower.serve_prepared(follower.prepare_follow(newer))
            del newer
            follower.after_follow(preconditioner=False)
            log(
                f"version {follower.version} ({mode}): read {wall * 1e3:.1f} ms, cpu "
                f"{cpu * 1e3:.1f} ms, longest wait of another thread "
                f"{rows[mode]['wait_ms'][-1]:.1f} ms (idle {rows['idle']['wait_ms'][-1]:.1f} ms)"
            )
    finally:
        monitor.stop = True
        reader.stop()
    return {
        "versions": versions,
        "reads_in_child": reader.in_child,
        "reads_here_after_child_failure": reader.here,
        "per_version_ms": {
            m: {k: [round(x, 2) for x in v] for k, v in r.items()} for m, r in rows.items()
        },
        "modes": {m: {k: _stats(v) for k, v in r.items() if v} for m, r in rows.items()},
    }


def markdown(res: dict) -> str:
    lines = [
        "### A follower's checkpoint read: in the API process or in a child process",
        "",
        f"`{res['command']}` (commit `{res['commit']}`, {res['versions']} versions, alternated; "
        f"{res['reads_in_child']} reads in the child, "
        f"{res['reads_here_after_child_failure']} fell back here)",
        "",
        "| read | versions | longest wait of another thread, median / p90 / max ms "
        "| wall median ms | CPU of this process, median ms |",
        "|---|---:|---:|---:|---:|",
    ]
    for mode in MODES:
        r = res["modes"][mode]
        w = r["wait_ms"]
        wall = f"{r['wall_ms']['median']:.1f}" if "wall_ms" in r else "–"
        cpu = f"{r['cpu_ms']['median']:.1f}" if "cpu_ms" in r else "–"
        lines.append(
            f"| {mode} | {w['n']} | {w['median']:.1f} / {w['p90']:.1f} / {w['max']:.1f} "
            f"| {wall} | {cpu} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="ntk-unlearn bench follow-read", description=__doc__)
    ap.add_argument("--versions", type=int, default=20, help="versions followed (alternated)")
    ap.add_argument("--data-dir", type=Path, default=None, help="default: a temporary dir")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args(argv)
    if args.versions < 2:
        raise SystemExit("--versions: at least 2 (one read each way)")
    data_dir = args.data_dir or Path(tempfile.mkdtemp(prefix="follow-read-"))
    res = run(args.versions, data_dir)
    res["command"] = "ntk-unlearn bench follow-read " + " ".join(argv)
    res["commit"] = subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "follow-read.json").write_text(json.dumps(res, indent=2) + "\n")
    md = markdown(res)
    (args.out / "follow-read.md").write_text(md)
    print("\n" + md)
    return 0
