"""``app.reader.CheckpointReader``: a follower's checkpoint reads made in a child process give
exactly what a read in this process gives, and every failure of the child (death mid-read, no
answer, garbage, no start) ends in the same answer read here, never in a lost or wrong version."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from app.reader import CheckpointReader, quiet_closed_loop_errors
from service_core import ModelConfig, SolverConfig, TrainConfig, Unlearner, checkpoint

REPO = Path(__file__).resolve().parent.parent

ROOT = Path(__file__).resolve().parents[1]


def _assert_same_read(a, b) -> None:
    assert a is not None and b is not None
    (meta_a, arrays_a), (meta_b, arrays_b) = a, b
    assert meta_a == meta_b
    assert sorted(arrays_a) == sorted(arrays_b)
    for name in arrays_a:
        assert arrays_a[name].dtype == arrays_b[name].dtype, name
        np.testing.assert_array_equal(arrays_a[name], arrays_b[name], err_msg=name)


@pytest.fixture(scope="module")
def float64_checkpoints(tmp_path_factory, digits) -> Path:
    """Versions 0 and 1 (two ids forgotten) of a small float64 model: a float64 checkpoint must
    come back float64 from a child that never enabled JAX's float64."""
    directory = tmp_path_factory.mktemp("reader") / "ck"
    u = Unlearner.build(
        digits.subset(slice(0, 60)),
        ModelConfig(kind="mlp", width=16),
        TrainConfig(loss="ce", dtype="float64"),
        SolverConfig(),
        progress=False,
    )
    u.save(directory)
    u.forget(u.active_ids()[:2], checkpoint_dir=directory)
    return directory


def test_a_read_in_the_child_equals_a_read_here(float64_checkpoints):
    reader = CheckpointReader()
    try:
        assert reader.ready(wait_s=120)  # its imports done: the reads below go to the child
        child = reader(float64_checkpoints, 0)
        here = checkpoint.read_newer(float64_checkpoints, 0)
        assert (reader.in_child, reader.here) == (1, 0)
        _assert_same_read(child, here)
        assert child[0]["version"] == 1 and child[1]["alpha"].dtype == np.float64
        assert reader(float64_checkpoints, 1) is None  # nothing newer than version 1
        assert (reader.in_child, reader.here) == (2, 0)
        # and the version a follower makes of it is the one read here, array for array
        follower = Unlearner.restore(float64_checkpoints, max_version=0, progress=False)
        assert follower.version == 0
        via_child = follower.read_newer(float64_checkpoints, reader)
        via_here = follower.read_newer(float64_checkpoints)
        assert via_child.version == via_here.version == 1
        assert list(via_child.ids) == list(via_here.ids)
        assert via_child.forgotten == via_here.forgotten
        for name in ("x", "y", "f0", "alpha", "theta", "f_star"):
            a, b = getattr(via_child, name), getattr(via_here, name)
            assert a.dtype == b.dtype
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=name)
        pid = reader._child.pid
    finally:
        reader.stop()
    assert reader._child is None
    with pytest.raises(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)  # reaped: the child is gone


# What a child sends first (``app.reader.READY``), for the misbehaving ones below
_SAY_READY = (
    "import pickle, sys; m = pickle.dumps((True, 'ready')); "
    "sys.stdout.buffer.write(len(m).to_bytes(8, 'big') + m); sys.stdout.flush(); "
)


@pytest.mark.parametrize(
    "program, timeout_s",
    [
        (_SAY_READY + "sys.stdin.buffer.read(8)", 30.0),  # dies mid-read
        (_SAY_READY + "import time; time.sleep(60)", 0.5),  # never answers
        (
            _SAY_READY + "sys.stdin.buffer.read(8); "
            "sys.stdout.buffer.write((5).to_bytes(8, 'big') + b'xxxxx'); sys.stdout.flush(); "
            "import time; time.sleep(60)",
            30.0,
        ),  # garbage
        ("import time; time.sleep(1); print('not a reader', flush=True); time.sleep(60)", 30.0),
    ],
    ids=["dies", "hangs", "garbage", "not-a-reader"],
)
def test_a_failing_child_costs_a_read_here_and_is_replaced_at_once(
    float64_checkpoints, program, timeout_s, caplog
):
    reader = CheckpointReader(timeout_s=timeout_s, command=[sys.executable, "-c", program])
    try:
        reader.start()
        first = reader._child
        time.sleep(1.5)  # it has said what it says first
        started = time.monotonic()
        got = reader(float64_checkpoints, 0)
        assert time.monotonic() - started < timeout_s + 10
        _assert_same_read(got, checkpoint.read_newer(float64_checkpoints, 0))
        assert (reader.in_child, reader.here) == (0, 1)
        assert first.poll() is not None  # killed, not left behind
        assert any("reading here" in m for m in caplog.messages)
        # another child was started at once (not at the next read, which would wait for it)
        assert reader._child is not None and reader._child is not first
        assert reader._child.poll() is None
        _assert_same_read(reader(float64_checkpoints, 0), got)
        assert reader.here == 2
    finally:
        reader.stop()


def test_reads_are_made_here_until_the_child_is_ready(float64_checkpoints):
    """A child still importing (it has not said READY) is not waited for: the read is made here
    at once, and the child is kept."""
    program = "import time; time.sleep(60)"
    reader = CheckpointReader(command=[sys.executable, "-c", program])
    try:
        reader.start()
        child = reader._child
        started = time.monotonic()
        _assert_same_read(
            reader(float64_checkpoints, 0), checkpoint.read_newer(float64_checkpoints, 0)
        )
        assert time.monotonic() - started < 10
        assert (reader.in_child, reader.here) == (0, 1)
        assert reader._child is child and child.poll() is None
        assert not reader.ready()
    finally:
        reader.stop()
    assert child.poll() is not None


def test_a_child_killed_between_reads_is_logged_and_replaced(float64_checkpoints, caplog):
    """A child that died while idle (OOM killer, an operator's kill -9): the next read says so in
    the log, is made here (the new child is still importing) and a new child is started."""
    reader = CheckpointReader()
    try:
        assert reader.ready(wait_s=120)
        first = reader._child
        first.kill()
        first.wait(10)
        _assert_same_read(
            reader(float64_checkpoints, 0), checkpoint.read_newer(float64_checkpoints, 0)
        )
        assert (reader.in_child, reader.here) == (0, 1)
        assert any("reader process ended (exit status -9)" in m for m in caplog.messages)
        assert reader._child is not first and reader.ready(wait_s=120)
        assert reader(float64_checkpoints, 0) is not None and reader.in_child == 1
    finally:
        reader.stop()


def test_the_child_outlives_the_thread_that_asked_for_it(float64_checkpoints, caplog):
    """The kernel's death signal for the child (PR_SET_PDEATHSIG) follows the *thread* that
    started it: the API's start-up runs on a worker thread of anyio's pool, which ends after 10 s
    idle, and its child was SIGKILLed then, mid-run (the load bench, 2026-12-05). A child asked
    for by a thread that then ends lives on and answers."""
    import threading

    reader = CheckpointReader()
    try:
        ready = []
        # the thread lives until the child has set its death signal (it says READY after)
        starter = threading.Thread(target=lambda: ready.append(reader.ready(wait_s=120)))
        starter.start()
        starter.join()
        assert ready == [True]
        pid = reader._child.pid
        time.sleep(0.5)  # the signal comes at the thread's exit; give it time to be delivered
        assert reader._child.poll() is None, f"the child died: {reader._child.returncode}"
        with caplog.at_level("WARNING", logger="app.reader"):
            assert reader(float64_checkpoints, 0)[0]["version"] == 1
        assert (reader.in_child, reader.here) == (1, 0)
        assert reader._child.pid == pid
        assert "ended" not in caplog.text
    finally:
        reader.stop()


def test_the_timeout_follows_the_child_s_own_pace():
    """Five times the slowest read so far, within [min, max]; ``max`` before the first read."""
    reader = CheckpointReader(min_timeout_s=2.0, max_timeout_s=10.0, command=["true"])
    assert reader.timeout() == 10.0
    reader._slowest = 0.08
    assert reader.timeout() == 2.0
    reader._slowest = 1.0
    assert reader.timeout() == 5.0
    reader._slowest = 7.0
    assert reader.timeout() == 10.0
    assert CheckpointReader(timeout_s=0.5, command=["true"]).timeout() == 0.5


def test_stop_ends_a_read_waiting_for_a_stuck_child(float64_checkpoints):
    """``stop`` during a read the child never answers: the read returns ``None`` at once (nothing
    to serve while stopping), instead of holding the shutdown for the timeout."""
    program = _SAY_READY + "import time; time.sleep(60)"
    reader = CheckpointReader(timeout_s=60, command=[sys.executable, "-c", program])
    reader.start()
    assert reader.ready(wait_s=30)
    with ThreadPoolExecutor(1) as pool:
        read = pool.submit(reader, float64_checkpoints, 0)
        time.sleep(0.5)
        started = time.monotonic()
        reader.stop()
        assert read.result(10) is None
    assert time.monotonic() - started < 5
    assert reader.here == 0


def test_the_child_ignores_a_process_group_sigterm(float64_checkpoints):
    """systemd stops a service by SIGTERM to its whole group: the child must not die before its
    parent asks (it would cost a read made here during the shutdown)."""
    reader = CheckpointReader()
    try:
        assert reader.ready(wait_s=120)
        reader._child.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        assert reader._child.poll() is None
        assert reader(float64_checkpoints, 0) is not None
        assert (reader.in_child, reader.here) == (1, 0)
    finally:
        reader.stop()


def test_an_error_of_the_read_reaches_the_caller_as_here(tmp_path, float64_checkpoints):
    """A checkpoint that cannot be read raises in the caller what a read here raises."""
    import shutil

    broken = tmp_path / "ck"
    shutil.copytree(float64_checkpoints, broken)
    for path in (broken / "1").rglob("*"):
        if path.is_file() and "arrays" in path.parts:
            path.write_bytes(b"not what orbax wrote")
    with pytest.raises(Exception) as here:
        checkpoint.read_newer(broken, 0)
    reader = CheckpointReader()
    try:
        assert reader.ready(wait_s=120)
        with pytest.raises(type(here.value)):
            reader(broken, 0)
        assert (reader.in_child, reader.here) == (1, 0)  # the child answered: the error
    finally:
        reader.stop()


def test_a_step_pruned_while_the_child_reads_it_is_raised_not_a_failure(
    float64_checkpoints, monkeypatch, caplog
):
    """FileNotFoundError (the worker pruned the step being read) from the child reaches the
    caller as it would from a read here; the child is kept (it did not fail)."""
    program = _SAY_READY + (
        "sys.stdin.buffer.read(8); m = pickle.dumps((False, FileNotFoundError(2, 'pruned'))); "
        "sys.stdout.buffer.write(len(m).to_bytes(8, 'big') + m); sys.stdout.flush(); "
        "import time; time.sleep(60)"
    )
    reader = CheckpointReader(command=[sys.executable, "-c", program])
    try:
        assert reader.ready(wait_s=30)
        child = reader._child
        with pytest.raises(FileNotFoundError):
            reader(float64_checkpoints, 0)
        assert reader._child is child and child.poll() is None
        assert (reader.in_child, reader.here) == (1, 0)
        assert not any("failed" in m for m in caplog.messages)
    finally:
        reader.stop()


def test_a_child_that_cannot_start_leaves_reads_here(float64_checkpoints, caplog):
    reader = CheckpointReader(command=["/nonexistent/python"])
    try:
        reader.start()
        _assert_same_read(
            reader(float64_checkpoints, 0), checkpoint.read_newer(float64_checkpoints, 0)
        )
        assert (reader.in_child, reader.here) == (0, 1)
        assert any("no child process" in m for m in caplog.messages)
    finally:
        reader.stop()


@pytest.mark.parametrize("stopped", [False, True], ids=["running", "stopped"])
def test_the_child_ends_with_its_parent_even_killed(stopped):
    """SIGKILL of the API process: the child ends (its standard input closes; and the kernel
    kills it, ``PR_SET_PDEATHSIG``, even while it is stopped by SIGSTOP)."""
    parent = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import time; from app.reader import CheckpointReader; r = CheckpointReader(); "
            "r.start(); r.ready(wait_s=120); print(r._child.pid, flush=True); time.sleep(120)",
        ],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        child = int(parent.stdout.readline())
        if stopped:
            os.kill(child, signal.SIGSTOP)
        parent.send_signal(signal.SIGKILL)
        parent.wait(10)
        deadline = time.monotonic() + 30
        while _alive(child):
            assert time.monotonic() < deadline, "the reader process outlived its parent"
            time.sleep(0.1)
    finally:
        parent.kill()
        parent.wait()


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state not in ("Z", "X")


_DAMAGED_READS = """
import shutil, sys
from pathlib import Path
from service_core import Unlearner, checkpoint
if sys.argv[3] == "1":
    from app.reader import quiet_closed_loop_errors
    quiet_closed_loop_errors()
directory = Path(sys.argv[2])
for _ in range(10):
    try:
        checkpoint.read_newer(directory, 0)
    except Exception as e:
        print("failed:", type(e).__name__, flush=True)
"""


def test_a_damaged_checkpoint_read_fails_without_tracebacks_on_stderr(
    base_checkpoint: Path, tmp_path: Path
):
    """orbax's failed read leaves tensorstore callbacks that meet a closed event loop, each a
    traceback on stderr through sys.unraisablehook: a follower retrying printed several a second.
    The hook the service installs keeps them off stderr; the read still raises."""
    directory = tmp_path / "checkpoints"
    shutil.copytree(base_checkpoint / "0", directory / "1")
    arrays = sorted(p for p in (directory / "1" / "arrays").rglob("*") if p.is_file())
    victim = max(arrays, key=lambda p: p.stat().st_size)
    with open(victim, "r+b") as f:
        f.truncate(victim.stat().st_size // 2)

    def run(quiet: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-c", _DAMAGED_READS, "x", str(directory), quiet],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=300,
        )

    quiet = run("1")
    assert quiet.stdout.count("failed:") == 10, quiet.stdout + quiet.stderr
    assert "Event loop is closed" not in quiet.stderr, quiet.stderr
    loud = run("0")
    assert loud.stdout.count("failed:") == 10
    if "Event loop is closed" not in loud.stderr:
        pytest.skip("this orbax/tensorstore no longer prints the late callbacks' error")


def test_the_quiet_hook_passes_every_other_unraisable_on(monkeypatch):
    seen: list[BaseException] = []
    monkeypatch.setattr(sys, "unraisablehook", lambda u: seen.append(u.exc_value))
    quiet_closed_loop_errors()
    quiet_closed_loop_errors()  # idempotent: one hook, not two in a chain

    class Unraisable:
        def __init__(self, exc):
            self.exc_value = exc

    sys.unraisablehook(Unraisable(RuntimeError("Event loop is closed")))
    other = RuntimeError("something else")
    sys.unraisablehook(Unraisable(other))
    assert seen == [other]
