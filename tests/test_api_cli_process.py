"""``ntk-unlearn serve`` as a real process: tokens from files (never on its command line),
everything it writes private to its owner, and SIGTERM honoured at any time, the first build
included."""

from __future__ import annotations

import os
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from app.cli import _settings, _with_tokens, build_parser

ROOT = Path(__file__).resolve().parents[1]


def _parse(*argv: str):
    return _settings(build_parser().parse_args(list(argv)))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(log: Path, *argv: str, command: str = "serve", **env_extra: str) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("REDIS_URL", "NTK_UNLEARN"))}
    env.update(env_extra)
    with open(log, "w") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "app", command, *argv],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def _wait_for(log: Path, text: str, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while text not in log.read_text():
        assert proc.poll() is None, log.read_text()
        assert time.monotonic() < deadline, f"no {text!r} in:\n{log.read_text()}"
        time.sleep(0.05)


def _wait_ready(url: str, proc: subprocess.Popen, log: Path, timeout: float = 180) -> None:
    """Until ``/readyz`` answers 200; fails with the process's log if it exits or times out."""
    deadline = time.monotonic() + timeout
    while True:
        assert proc.poll() is None, log.read_text()
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, log.read_text()
        time.sleep(0.2)


def _stop(proc: subprocess.Popen, timeout: float = 60) -> tuple[int, float]:
    started = time.perf_counter()
    proc.send_signal(signal.SIGTERM)
    try:
        code = proc.wait(timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
    return code, time.perf_counter() - started


def test_tokens_from_files(tmp_path):
    (tmp_path / "w").write_text("write-secret\n")
    (tmp_path / "r").write_text("read-secret")
    s = _with_tokens(
        _parse(
            "serve",
            "--api-token-file",
            str(tmp_path / "w"),
            "--read-token-file",
            str(tmp_path / "r"),
        )
    )
    assert (s.api_token, s.read_token) == ("write-secret", "read-secret")
    with pytest.raises(SystemExit, match="both"):
        _with_tokens(_parse("serve", "--api-token", "x", "--api-token-file", str(tmp_path / "w")))
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(SystemExit, match="empty"):
        _with_tokens(_parse("serve", "--api-token-file", str(tmp_path / "empty")))
    with pytest.raises(SystemExit, match="cannot read"):
        _with_tokens(_parse("serve", "--api-token-file", str(tmp_path / "missing")))


def test_tokens_from_file_env(tmp_path, monkeypatch):
    (tmp_path / "w").write_text("from-a-file")
    monkeypatch.setenv("NTK_UNLEARN_API_TOKEN_FILE", str(tmp_path / "w"))
    assert _with_tokens(_parse("serve", "--data-dir", str(tmp_path))).api_token == "from-a-file"


def test_everything_written_is_private_and_no_token_on_the_command_line(
    tmp_path: Path, dataset_file: Path
):
    data = tmp_path / "data"
    data.mkdir(mode=0o755)
    data.chmod(0o755)  # an existing, world-readable data dir is made private
    token_file = tmp_path / "token"
    token_file.write_text("file-token\n")
    token_file.chmod(0o600)
    port = _free_port()
    log = tmp_path / "serve.log"
    proc = _start(
        log,
        "--dataset", f"npz:{dataset_file}", "--model", "mlp", "--width", "32", "--depth", "1",
        "--data-dir", str(data), "--port", str(port), "--api-token-file", str(token_file),
    )  # fmt: skip
    try:
        url = f"http://127.0.0.1:{port}"
        auth = {"Authorization": "Bearer file-token"}
        _wait_ready(url, proc, log)
        assert b"file-token" not in Path(f"/proc/{proc.pid}/cmdline").read_bytes()
        # A deletion writes a checkpoint and the deletion log too.
        job = httpx.post(f"{url}/v1/forget", json={"ids": ["r03"]}, headers=auth).json()
        while job["status"] not in ("succeeded", "failed"):
            time.sleep(0.1)
            job = httpx.get(f"{url}/v1/jobs/{job['job_id']}", headers=auth).json()
        assert job["status"] == "succeeded", job
        written = [data, *data.rglob("*")]
        kinds = {p.relative_to(data).parts[0] for p in written if p != data}
        assert {"checkpoints", "ntk-cache", "deletions.log", "redis"} <= kinds, kinds
        public = {}
        for p in written:
            try:
                mode = p.lstat().st_mode
            except FileNotFoundError:  # gone meanwhile (Redis's AOF rewrite's temporary file)
                continue
            if not stat.S_ISLNK(mode) and mode & 0o077:
                public[str(p.relative_to(data))] = oct(mode & 0o777)
        assert not public, public
    finally:
        code, _ = _stop(proc)
    assert code == 0, log.read_text()


def test_sigterm_during_the_first_build_stops_it_at_once(tmp_path: Path):
    """The digits MLP takes minutes to build here; before, SIGTERM waited for all of it."""
    log = tmp_path / "serve.log"
    proc = _start(
        log, "--dataset", "digits", "--data-dir", str(tmp_path / "data"),
        "--port", str(_free_port()), "--api-token", "t",
    )  # fmt: skip
    try:
        _wait_for(log, "building the model", proc)
        time.sleep(1.0)
        assert proc.poll() is None, log.read_text()
    finally:
        code, seconds = _stop(proc)
    assert code == 0, log.read_text()
    assert seconds < 10, f"exited {seconds:.1f} s after SIGTERM"
    text = log.read_text()
    assert "embedded Redis stopped" in text and "stopped by a signal" in text
    assert not list((tmp_path / "data" / "checkpoints").glob("*")), "no model was saved"


@pytest.mark.redis
def test_sigterm_during_a_lone_workers_first_build_stops_it_at_once(
    tmp_path: Path, redis_url: str, redis_prefix: str
):
    log = tmp_path / "worker.log"
    proc = _start(
        log, "--dataset", "digits", "--data-dir", str(tmp_path / "data"),
        "--redis-prefix", redis_prefix, command="worker", REDIS_URL=redis_url,
    )  # fmt: skip
    try:
        _wait_for(log, "building the model", proc)
        time.sleep(1.0)
        assert proc.poll() is None, log.read_text()
    finally:
        code, seconds = _stop(proc)
    assert code == 0, log.read_text()
    assert seconds < 10, f"exited {seconds:.1f} s after SIGTERM"
    assert "stopped by a signal" in log.read_text()


def test_a_model_that_cannot_be_trained_is_one_line_at_start(tmp_path):
    """A start-up failure of the model (here: float32, asked for explicitly, cannot solve a singular
    system at λ = 1e-8; dtype auto would finish it in float64, test_precision) is one line on stderr naming the fix, a non-zero exit and no traceback, with the embedded
    Redis stopped."""
    import numpy as np

    rng = np.random.default_rng(0)
    x = rng.normal(size=(600, 10)).astype(np.float32)  # a linear model's kernel: rank ≤ 11
    np.savez(tmp_path / "singular.npz", x=x, y=rng.integers(0, 3, size=600))
    log = tmp_path / "serve.log"
    proc = _start(
        log, "--dataset", f"npz:{tmp_path / 'singular.npz'}", "--model", "linear", "--loss", "mse",
        "--lam", "1e-8", "--dtype", "float32", "--data-dir", str(tmp_path / "data"),
        "--port", str(_free_port()),
    )  # fmt: skip
    try:
        code = proc.wait(300)
    finally:
        if proc.poll() is None:
            proc.kill()
    text = log.read_text()
    assert code != 0 and "Traceback" not in text, text
    last = text.strip().splitlines()[-1]
    assert last.startswith("ntk-unlearn serve:") and "lam" in last and "float64" in last, text
    assert not _redis_servers_in(tmp_path), text


def _redis_servers_in(directory: Path) -> list[int]:
    """Pids of redis-server processes working in ``directory`` (the embedded one changes into it)."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            cmd = (entry / "cmdline").read_bytes()
            cwd = os.readlink(entry / "cwd")
        except OSError:
            continue
        if b"redis-server" in cmd and cwd.startswith(str(directory)):
            found.append(int(entry.name))
    return found


@pytest.mark.slow
def test_bad_start_up_input_is_one_line(tmp_path):
    """Each bad input at start-up (a user network's file, NAME, outputs or params; a data dir
    whose checkpoint holds another model; an unknown data set or a missing data file) is one
    line on stderr saying what to fix, a non-zero exit, no traceback, the embedded Redis stopped."""
    import numpy as np

    from service_core import ModelConfig, TrainConfig, Unlearner, load_dataset

    rng = np.random.default_rng(0)
    np.savez(tmp_path / "d.npz", x=rng.normal(size=(20, 4)).astype(np.float32), y=np.arange(20) % 3)
    net = tmp_path / "net.py"
    net.write_text(
        "import jax.numpy as jnp\n"
        "def net():\n"
        "    return (lambda p, x: jnp.tanh(x @ p['w']) @ p['v']), "
        "{'w': jnp.ones((4, 5)) * 0.1, 'v': jnp.ones((5, OUT)) * 0.1}\n"
        "OUT = 3\n"
    )
    wrong = tmp_path / "wrong.py"
    wrong.write_text(net.read_text().replace("OUT = 3", "OUT = 2"))
    np.savez(tmp_path / "bad.npz", w=np.zeros((4, 6)))
    data = f"npz:{tmp_path / 'd.npz'}"
    # a data dir holding a checkpoint of this network with lam 1e-2
    kept = tmp_path / "kept"
    u = Unlearner.build(
        load_dataset(data),
        ModelConfig(kind="user", network=f"{net}:net"),
        TrainConfig(loss="mse", lam=1e-2),
        progress=False,
        source=data,
    )
    u.save(kept / "checkpoints")
    cases = {
        "missing-file": (["--model", f"{tmp_path}/absent.py:net"], "no such file"),
        "missing-name": (["--model", f"{net}:other"], "defines no 'other'"),
        "wrong-shape": (["--model", f"{wrong}:net"], "must return (4, 3)"),
        "params": (["--model", f"{net}:net", "--params", str(tmp_path / "bad.npz")], "missing v (5, 3)"),
        "other-settings": (["--model", f"{net}:net", "--lam", "0.5", "--data-dir", str(kept)], "lam 0.01 (checkpoint) ≠ 0.5 (now)"),
        "unknown-dataset": (["--dataset", "nope"], "unknown dataset 'nope'"),
        "missing-data": (["--dataset", f"npz:{tmp_path}/absent.npz"], "absent.npz does not exist"),
        "data-dir-a-file": (["--data-dir", str(net)], "exists and is not a directory"),
        "data-dir-impossible": (["--data-dir", "/proc/absent/d"], "cannot create or read it"),
        "data-dir-unwritable": (["--data-dir", "/proc/self"], "cannot write in it"),
    }  # fmt: skip
    procs = {}
    for name, (argv, _) in cases.items():
        base = ["--dataset", data, "--model", f"{net}:net", "--loss", "mse", "--lam", "1e-2"]
        base += ["--data-dir", str(tmp_path / name), "--port", str(_free_port())]
        procs[name] = _start(tmp_path / f"{name}.log", *base, *argv)
    for name, proc in procs.items():
        try:
            code = proc.wait(300)
        finally:
            if proc.poll() is None:
                proc.kill()
        text = (tmp_path / f"{name}.log").read_text()
        assert code != 0 and "Traceback" not in text, text
        last = text.strip().splitlines()[-1]
        assert last.startswith("ntk-unlearn serve:") and cases[name][1] in last, (name, text)
    assert not _redis_servers_in(tmp_path)


_HOLD = """
import os, time
from service_core import attribution

_real = attribution._factor_of


def _held(state):  # the leave-one-out factorisation waits for the test's file
    open(os.environ["HOLD_STARTED"], "w").close()
    while not os.path.exists(os.environ["HOLD_RELEASE"]):
        time.sleep(0.05)
    return _real(state)


attribution._factor_of = _held
"""


def _serve_holding(tmp_path: Path, dataset_file: Path) -> tuple[subprocess.Popen, str, Path]:
    """A ``serve`` process whose leave-one-out factorisation waits for ``tmp_path/"release"``
    (it writes ``tmp_path/"started"`` when it begins); returns (process, base url, log)."""
    (tmp_path / "hold.py").write_text(_HOLD)
    port, log = _free_port(), tmp_path / "serve.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("REDIS_URL", "NTK_UNLEARN"))}
    env.update(
        PYTHONPATH=os.pathsep.join([str(tmp_path), str(ROOT)]),
        HOLD_STARTED=str(tmp_path / "started"),
        HOLD_RELEASE=str(tmp_path / "release"),
        NTK_UNLEARN_API_TOKEN="t",
    )
    argv = [
        "--dataset", f"npz:{dataset_file}", "--model", "mlp", "--width", "32", "--depth", "1",
        "--data-dir", str(tmp_path / "data"), "--port", str(port),
    ]  # fmt: skip
    code = "import hold, runpy, sys; sys.argv = ['ntk-unlearn', *sys.argv[1:]]; "
    code += "runpy.run_module('app', run_name='__main__')"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-c", code, "serve", *argv],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    return proc, f"http://127.0.0.1:{port}", log


def _attribute_while_held(
    url: str, proc: subprocess.Popen, log: Path, started: Path, n: int
) -> tuple[list[threading.Thread], list[tuple[float, int, str, str | None]]]:
    """Once the server is ready, ``n`` attribution requests on threads of their own; returns
    when the (held) factorisation has begun, with the threads and the list their answers go to:
    (time, status, body, Retry-After)."""
    answers: list[tuple[float, int, str, str | None]] = []
    body = {"x": [[0.5, -0.5, 1.0, 2.0]], "y": [1], "k": 2}

    def ask() -> None:
        r = httpx.post(
            f"{url}/v1/attribute", json=body, headers={"Authorization": "Bearer t"}, timeout=120
        )
        answers.append((time.monotonic(), r.status_code, r.text, r.headers.get("retry-after")))

    _wait_ready(url, proc, log)
    threads = [threading.Thread(target=ask) for _ in range(n)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 60
    while not started.exists():
        assert time.monotonic() < deadline, log.read_text()
        time.sleep(0.05)
    return threads, answers


def test_sigterm_answers_heavy_reads_still_waiting_503_at_once(tmp_path: Path, dataset_file: Path):
    """Two attribution requests compute (a held cold factorisation), two more wait for a thread.
    SIGTERM begins uvicorn's graceful shutdown, which waits for every request in flight: the
    waiting ones are answered 503 with Retry-After at once (before: after the factorisation, for
    minutes on a large model), the computing ones finish, and the process exits 0."""
    started, release = tmp_path / "started", tmp_path / "release"
    proc, url, log = _serve_holding(tmp_path, dataset_file)
    try:
        threads, answers = _attribute_while_held(url, proc, log, started, 4)
        assert f"listening on {url} (API docs at /docs)" in log.read_text()
        time.sleep(1.0)  # the other three have arrived: one computes beside it, two wait
        assert answers == []
        proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 10
        while len(answers) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        released_at = time.monotonic()
        release.touch()
        for t in threads:
            t.join(120)
        code = proc.wait(60)
    finally:
        release.touch()
        if proc.poll() is None:
            proc.kill()
    assert code == 0, log.read_text()
    refused = [a for a in answers if a[1] == 503]
    assert len(refused) == 2 and all(a[0] < released_at for a in refused), answers
    assert all("shutting down" in a[2] and a[3] is not None for a in refused), refused
    assert sorted(a[1] for a in answers) == [200, 200, 503, 503], answers


def test_a_second_sigint_answers_the_reads_still_computing_503_not_500(
    tmp_path: Path, dataset_file: Path
):
    """A second SIGINT is uvicorn's forced exit: it stops waiting for the requests in flight and
    cancels them. Two attribution requests compute (a held factorisation) when it comes: each
    gets 503 with Retry-After saying the process is shutting down (before: uvicorn's 500 for
    the cancellation), and the process exits without waiting for the factorisation."""
    started = tmp_path / "started"
    proc, url, log = _serve_holding(tmp_path, dataset_file)
    try:
        threads, answers = _attribute_while_held(url, proc, log, started, 2)
        time.sleep(0.5)  # the second request computes beside the first (two threads)
        proc.send_signal(signal.SIGINT)
        time.sleep(1.0)
        assert answers == [] and proc.poll() is None  # the graceful shutdown waits for them
        proc.send_signal(signal.SIGINT)
        for t in threads:
            t.join(30)
        proc.wait(30)
    finally:
        (tmp_path / "release").touch()
        if proc.poll() is None:
            proc.kill()
    assert [a[1] for a in answers] == [503, 503], (answers, log.read_text())
    assert all("shutting down" in a[2] and a[3] is not None for a in answers), answers
    # One line says what the forced exit skipped; before, the cancelled lifespan task logged a
    # 40-line CancelledError traceback at ERROR.
    text = log.read_text()
    assert "Traceback" not in text and "CancelledError" not in text, text
    assert "forced exit (a second signal)" in text, text
    assert proc.returncode == 0, text
