"""The command line: flags, their environment twins, and the write token file."""

from __future__ import annotations

import stat
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from app.cli import (
    _WORKER_ONLY,
    RepeatFilter,
    _check_redis,
    _settings,
    _with_tokens,
    build_parser,
)
from app.core.config import Settings


def parse(*argv: str):
    return _settings(build_parser().parse_args(list(argv)))


def test_flags_override_env_which_overrides_defaults(monkeypatch):
    monkeypatch.setenv("NTK_UNLEARN_WIDTH", "32")
    monkeypatch.setenv("NTK_UNLEARN_LAM", "0.5")
    monkeypatch.setenv("REDIS_URL", "redis://example:6379/0")
    s = parse("serve", "--lam", "0.25", "--w-std", "1.5", "--no-refine", "--model", "linear")
    assert s.width == 32 and s.lam == 0.25 and s.w_std == 1.5
    assert s.refine is False and s.model == "linear"
    assert s.redis_url == "redis://example:6379/0"
    assert s.loss == "ce" and s.dataset == "digits"
    # Unset depth means the model kind's default (a148377): 2 hidden layers for linear/mlp.
    assert s.depth is None and s.to_model_config().depth == 2


def test_every_setting_is_a_flag(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--help"])
    text = capsys.readouterr().out
    for name in Settings.model_fields:
        if name not in _WORKER_ONLY:
            assert "--" + name.replace("_", "-") in text
    assert "--no-refine" in text and "--no-worker" in text
    assert "--metrics-port" not in text  # serve's metrics are on its API port
    with pytest.raises(SystemExit):
        build_parser().parse_args(["worker", "--help"])
    text = capsys.readouterr().out
    assert "--metrics-port" in text and "--metrics-host" in text and "--api-token" not in text


def test_invalid_settings_exit_with_a_message():
    with pytest.raises(SystemExit, match="lam"):
        parse("serve", "--lam", "-1")
    # not a built-in kind nor FILE.py:NAME / package.module:NAME
    with pytest.raises(SystemExit, match="resnet.*FILE.py:NAME"):
        parse("serve", "--model", "resnet")
    with pytest.raises(SystemExit, match="--params and --trainable apply to your own network"):
        parse("serve", "--model", "mlp", "--trainable", "head")


def test_a_redis_url_that_is_no_redis_url_fails_at_once(monkeypatch):
    """Caught with the settings (one line), not after the model has loaded."""
    monkeypatch.setenv("REDIS_URL", "localhost:6379")
    with pytest.raises(SystemExit, match="or REDIS_URL.*'localhost:6379' must start with redis://"):
        parse("worker")
    monkeypatch.setenv("REDIS_URL", "unix:///run/redis.sock")
    assert parse("worker").redis_url == "unix:///run/redis.sock"
    monkeypatch.setenv("REDIS_URL", "REDIS://127.0.0.1:6379/0")  # redis-py takes it
    assert parse("worker").redis_url == "REDIS://127.0.0.1:6379/0"
    # a port that is no number: the Redis client's ValueError, one line, not a traceback
    monkeypatch.setenv("REDIS_URL", "redis://:pw@127.0.0.1:abc/0")
    with pytest.raises(SystemExit, match="REDIS_URL is not a valid Redis URL") as caught:
        _check_redis(parse("worker"), "worker")
    assert "pw" not in str(caught.value)


def test_a_repeated_log_line_passes_once_per_period():
    import logging

    now = [0.0]
    repeat = RepeatFilter(30.0, clock=lambda: now[0])

    def record(message: str) -> logging.LogRecord:
        return logging.LogRecord("absl", logging.WARNING, __file__, 1, message, None, None)

    assert repeat.filter(record("Metadata file does not exist: /c/4"))
    assert not repeat.filter(record("Metadata file does not exist: /c/4"))
    assert repeat.filter(record("Metadata file does not exist: /c/5"))  # another line
    now[0] = 29.9
    assert not repeat.filter(record("Metadata file does not exist: /c/4"))
    now[0] = 30.0
    assert repeat.filter(record("Metadata file does not exist: /c/4"))


def test_write_token_is_generated_once_with_mode_0600(tmp_path, monkeypatch):
    monkeypatch.delenv("NTK_UNLEARN_API_TOKEN", raising=False)
    s = parse("serve", "--data-dir", str(tmp_path))
    first = _with_tokens(s)
    path = tmp_path / "api_token"
    assert first.api_token and path.read_text().strip() == first.api_token
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert _with_tokens(s).api_token == first.api_token  # reused, not regenerated


def test_given_token_wins_over_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv("NTK_UNLEARN_API_TOKEN", "from-env")
    assert _with_tokens(parse("serve", "--data-dir", str(tmp_path))).api_token == "from-env"
    s = parse("serve", "--data-dir", str(tmp_path), "--api-token", "from-flag")
    assert _with_tokens(s).api_token == "from-flag"
    assert not (tmp_path / "api_token").exists()


def test_bench_hand_off_keeps_the_exit_status():
    from app.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["bench", "no-such-benchmark"])
    assert exc.value.code == 2


def test_huge_pages_env_adds_the_glibc_tunable_only_where_it_changes_something():
    from app.cli import huge_pages_env

    madvise = "always [madvise] never\n"
    env = huge_pages_env({"PATH": "/bin"}, madvise, "glibc 2.36")
    assert env == {"PATH": "/bin", "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}
    kept = huge_pages_env({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, madvise, "glibc 2.35")
    assert kept["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"
    assert (
        huge_pages_env({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, madvise, "glibc 2.36") is None
    )  # the user's choice
    assert (
        huge_pages_env({"GLIBC_TUNABLES": "GLIBC.MALLOC.HUGETLB=0"}, madvise, "glibc 2.36") is None
    )
    other = huge_pages_env(
        {"GLIBC_TUNABLES": "glibc.malloc.hugetlbx=1"}, madvise, "glibc 2.36"
    )  # another name
    assert other["GLIBC_TUNABLES"] == "glibc.malloc.hugetlbx=1:glibc.malloc.hugetlb=1"
    for off in ("0", "false", "OFF"):
        assert huge_pages_env({"NTK_UNLEARN_HUGE_PAGES": off}, madvise, "glibc 2.36") is None
    assert (
        huge_pages_env({}, "[always] madvise never", "glibc 2.36") is None
    )  # given without asking
    assert huge_pages_env({}, "always madvise [never]", "glibc 2.36") is None
    assert huge_pages_env({}, "", "glibc 2.36") is None  # no THP (not Linux)
    assert huge_pages_env({}, madvise, "glibc 2.34") is None  # the tunable came in 2.35
    assert huge_pages_env({}, madvise, "") is None  # musl and others


def test_command_line_entry_re_executes_itself_with_huge_pages():
    """What ``ntk-unlearn`` does before parsing: the process replaces itself, once, with the tunable set."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from app.cli import huge_pages_env

    try:
        mode = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
        glibc = os.confstr("CS_GNU_LIBC_VERSION") or ""
    except (OSError, ValueError, AttributeError):
        pytest.skip("no transparent huge pages here")
    env = {
        k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "NTK_UNLEARN_HUGE_PAGES")
    }
    expected = huge_pages_env(env, mode, glibc)
    code = "from app import cli; import os; print('run', os.getpid()); cli._reexec_with_huge_pages(); print(os.environ.get('GLIBC_TUNABLES'))"
    out = subprocess.run(
        [sys.executable, "-c", code],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout.split("\n")
    if expected is None:
        assert out[:2] == [out[0], "None"]
    else:
        assert out[0] == out[1] and out[0].startswith(
            "run"
        )  # ran twice in one process (exec keeps the pid)
        assert out[2] == "glibc.malloc.hugetlb=1"
    off = subprocess.run(
        [sys.executable, "-c", code],
        env={**env, "NTK_UNLEARN_HUGE_PAGES": "0"},
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout.split("\n")
    assert off[1] == "None"
    # stdout closed (a daemon's launcher): sys.stdout is None, and the exec must not trip over it
    quiet = "import sys; from app import cli; cli._reexec_with_huge_pages(); sys.stderr.write('ok')"
    closed = subprocess.run(
        ["sh", "-c", f'exec "{sys.executable}" -c "{quiet}" >&-'],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert closed.returncode == 0 and closed.stderr.endswith("ok"), closed.stderr
    # a program read from stdin cannot be run twice: no exec
    piped = subprocess.run(
        [sys.executable, "-"],
        input=code,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    assert piped.stdout.split("\n")[1] == "None"


def test_connections_to_the_bound_socket_send_without_nagle_delay():
    """Accepted connections must have TCP_NODELAY: with Nagle on, a response written in two parts
    waited for the client's delayed ACK, 40 ms per request (21 requests/s on one connection)."""
    import asyncio
    import socket

    from app.cli import bind_http_socket

    async def accepted_nodelay() -> int:
        seen: list[int] = []
        sock = bind_http_socket("127.0.0.1", 0)

        async def handle(reader, writer):
            seen.append(
                writer.get_extra_info("socket").getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
            )
            writer.close()

        server = await asyncio.start_server(handle, sock=sock)
        async with server:
            _, writer = await asyncio.open_connection(*sock.getsockname()[:2])
            while not seen:
                await asyncio.sleep(0.01)
            writer.close()
        return seen[0]

    assert asyncio.run(accepted_nodelay()) != 0


_AUTOGROUP_PROBE = (
    "import logging, pathlib; logging.basicConfig(level=logging.INFO)\n"
    "from app.cli import nice_autogroup\n"
    "print(nice_autogroup(), pathlib.Path('/proc/self/autogroup').read_text().strip())\n"
)


@pytest.mark.skipif(
    not Path("/proc/self/autogroup").exists(), reason="no Linux autogroup on this kernel"
)
@pytest.mark.parametrize("own_session", [True, False])
def test_a_niced_process_leading_its_session_gives_the_session_its_nice(own_session):
    """``nice -n 7`` and a session of its own (as the load bench and process managers start a
    worker): the session's autogroup gets nice 7, so the niceness counts against the other
    sessions' processes; sharing its session (a shell's), the autogroup is left alone."""
    out = subprocess.run(
        ["nice", "-n", "7", sys.executable, "-c", _AUTOGROUP_PROBE],
        capture_output=True,
        text=True,
        timeout=120,
        start_new_session=own_session,
        check=True,
    )
    # The file is empty for a process in the root task group (e.g. a container's first session,
    # as on CI), so the probe's second field may be missing.
    returned, _, autogroup = out.stdout.strip().partition(" ")
    ours = Path("/proc/self/autogroup").read_text().strip()
    if own_session:
        assert returned == "7" and autogroup.endswith("nice 7"), out
        assert autogroup != ours  # its own group, not this test's
    else:
        assert returned == "None" and autogroup == ours, out


def test_the_listening_line_gives_a_url_a_client_can_use():
    """IPv6 addresses go in brackets (``http://::1:8000`` is no URL a client takes)."""
    from app.cli import http_url

    assert http_url("127.0.0.1", 8000) == "http://127.0.0.1:8000"
    assert http_url("::1", 18121) == "http://[::1]:18121"
    assert httpx.URL(http_url("::1", 18121)).host == "::1"


def test_version_and_every_bench_command_are_in_the_help(capsys):
    """``--version`` answers (it was a usage error), and ``bench --help`` lists the subcommands
    dispatched before its parser (precision, lambda, follow-read, attribute-stall) too."""
    from bench.cli import build_parser as bench_parser

    with pytest.raises(SystemExit) as caught:
        build_parser().parse_args(["--version"])
    assert caught.value.code == 0 and capsys.readouterr().out.startswith("ntk-unlearn ")
    text = bench_parser().format_help()
    for command in ("figure1", "precision", "lambda", "follow-read", "attribute-stall"):
        assert f"* {command}" in text and f"{command}," in text.replace("}", ",")
    assert "``" not in text  # the docstring's reST markup is not printed


def test_invalid_settings_are_named_by_their_flag_and_value(monkeypatch):
    """Errors in the words of the command line: the flag and the value given, not pydantic's
    field names and "Value error," prefixes; a setting from the environment names its variable."""
    with pytest.raises(SystemExit) as caught:
        parse("serve", "--lam", "nan")
    assert str(caught.value) == (
        "ntk-unlearn: invalid settings: --lam nan: Input should be a finite number"
    ), caught.value
    with pytest.raises(SystemExit, match=r"invalid settings: --max-rows 0: Input should be"):
        parse("serve", "--max-rows", "0")
    with pytest.raises(SystemExit) as caught:
        parse("serve", "--redis-url", "http://x")
    assert "Value error" not in str(caught.value) and "settings:" not in str(caught.value)[27:]
    assert "'http://x' must start with redis://" in str(caught.value)
    for flag in ("--lam", "--tol", "--redis-timeout-s"):  # infinity means nothing here
        with pytest.raises(
            SystemExit, match=rf"invalid settings: {flag} inf: Input should be a finite"
        ):
            parse("serve", flag, "inf")
    # a relative residual of 1 is met by α = 0: --tol 2 published an untrained model as certified
    for flag in ("--tol", "--cg-tol", "--nonlinear-tol"):
        with pytest.raises(SystemExit, match=rf"{flag} 2.0: Input should be less than 1"):
            parse("serve", flag, "2")
    with pytest.raises(SystemExit, match=r"--tol × --accept-floor is 1: .* untrained model"):
        parse("serve", "--tol", "1e-3", "--accept-floor", "1000")
    # Path("") is ".": an empty --data-dir made the working directory the data dir
    with pytest.raises(SystemExit, match=r"--data-dir : it is empty: name a directory"):
        parse("serve", "--data-dir", "")
    assert parse("serve", "--data-dir", "d").data_dir == Path("d")
    monkeypatch.setenv("NTK_UNLEARN_MAX_ROWS", "-1")
    with pytest.raises(
        SystemExit, match=r"setting max_rows \(env NTK_UNLEARN_MAX_ROWS '-1'\): Inp"
    ):
        parse("serve")
