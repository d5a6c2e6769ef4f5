"""Authentication before the body: a request without the right token is refused from its
headers, whatever body follows, in milliseconds and without the server's memory growing; and
large bodies are admitted a few at a time.

The server is a real ``ntk-unlearn serve`` process (its own embedded Redis), so the latency and
the resident memory measured are those of uvicorn reading (or not reading) a real socket.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from app.main import create_app

ROOT = Path(__file__).resolve().parents[1]
WRITE = {"Authorization": "Bearer write-token"}
READ = {"Authorization": "Bearer read-token"}
BIG = 60_000_000  # bytes: the body of the reported attack


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


class Server:
    """``ntk-unlearn serve`` on the small test data set, in a subprocess."""

    def __init__(self, tmp: Path, dataset: Path, *extra: str):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {k: v for k, v in os.environ.items() if k != "REDIS_URL"}
        self.log = tmp / "serve.log"
        with open(self.log, "w") as out:
            self.proc = subprocess.Popen(
                [
                    sys.executable, "-m", "app", "serve",
                    "--dataset", f"npz:{dataset}", "--model", "linear", "--loss", "mse",
                    "--data-dir", str(tmp / "data"), "--port", str(self.port),
                    "--api-token", "write-token", "--read-token", "read-token",
                    *extra,
                ],
                cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
            )  # fmt: skip
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.log.read_text()
            try:
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        raise AssertionError(f"not ready:\n{self.log.read_text()}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(60)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, dataset_file: Path) -> Iterator[Server]:
    s = Server(
        tmp_path_factory.mktemp("auth"),
        dataset_file,
        "--large-body-bytes", "100000", "--max-large-bodies", "1",
    )  # fmt: skip
    try:
        yield s
    finally:
        s.stop()


def _open(server: Server, path: str, length: int, token: str | None) -> socket.socket:
    """A POST whose headers are sent, and none of its ``length`` bytes of body yet."""
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    auth = f"Authorization: Bearer {token}\r\n" if token else ""
    sock.sendall(
        f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n{auth}"
        f"Content-Length: {length}\r\n\r\n".encode()
    )
    return sock


def _status(sock: socket.socket) -> tuple[int, bytes]:
    """The status code of the answer, and the answer's bytes read so far."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    return int(data.split(b" ", 2)[1]), data


def _send_body(sock: socket.socket, length: int) -> None:
    """Send ``length`` bytes of a JSON-looking body, until done or the server hangs up."""
    block = b"[" + b"0," * (2**20 // 2)
    try:
        sent = 0
        while sent < length:
            sent += sock.send(block[: length - sent])
    except OSError:
        pass  # the server answered and closed: exactly what it should do


@pytest.mark.parametrize(
    "path, token, status",
    [
        ("/v1/predict", None, 401),
        ("/v1/predict", "wrong", 401),
        ("/v1/forget", None, 401),
        ("/v1/forget", "read-token", 403),
    ],
)
def test_a_60mb_body_without_the_right_token_is_refused_before_it_is_read(
    server, path, token, status
):
    # The median of a few: one slow answer on a busy machine says nothing about the server.
    elapsed = []
    for _ in range(5):
        sock = _open(server, path, BIG, token)
        started = time.perf_counter()
        sender = threading.Thread(target=_send_body, args=(sock, BIG))
        sender.start()
        try:
            code, answer = _status(sock)
            elapsed.append(time.perf_counter() - started)
        finally:
            sock.close()
            sender.join(30)
        assert code == status, answer
        if status == 401:
            assert b"www-authenticate: bearer" in answer.lower()
        # Closed after the answer: the rest of the body is never read.
        assert b"connection: close" in answer.lower()
    median = sorted(elapsed)[len(elapsed) // 2]
    assert median < 0.05, f"{status} after {median * 1000:.1f} ms (median of {elapsed})"


def test_unauthenticated_large_bodies_cost_no_memory_and_stall_nothing(server):
    """Eight 60 MB bodies at once, as in the report (RSS 454 MB → 1.7 GB, /healthz 34 s)."""
    before = _rss_bytes(server.proc.pid)
    socks = [_open(server, "/v1/predict", BIG, None) for _ in range(8)]
    senders = [threading.Thread(target=_send_body, args=(s, BIG)) for s in socks]
    for t in senders:
        t.start()
    started = time.perf_counter()
    probe = httpx.get(f"{server.url}/healthz", timeout=10)
    probe_s = time.perf_counter() - started
    codes = [_status(s)[0] for s in socks]
    for s in socks:
        s.close()
    for t in senders:
        t.join(30)
    grown = _rss_bytes(server.proc.pid) - before
    assert codes == [401] * 8
    assert probe.status_code == 200 and probe_s < 1.0, probe_s  # was 34 s
    # The bodies total 480 MB; a server that buffered or parsed any of them grows by hundreds.
    assert grown < 16 * 2**20, f"RSS grew by {grown / 2**20:.1f} MiB"


def test_large_bodies_beyond_the_limit_wait_their_turn(server):
    """With ``--max-large-bodies 1``: while one large body is being received, another is
    answered 503 with Retry-After at once; once the first is done, the next is served."""
    holder = _open(server, "/v1/predict", 2_000_000, "read-token")
    try:
        time.sleep(0.2)  # let the server take the slot
        started = time.perf_counter()
        r = httpx.post(
            f"{server.url}/v1/predict",
            content=b'{"x": [' + b"[0, 0, 0, 0]," * 20000 + b"[0, 0, 0, 0]]}",
            headers={**READ, "Content-Type": "application/json"},
            timeout=10,
        )
        elapsed = time.perf_counter() - started
        assert r.status_code == 503, r.text
        assert int(r.headers["Retry-After"]) > 0
        assert "max_large_bodies" in r.json()["detail"]
        assert elapsed < 0.5
        # Small bodies do not queue behind large ones.
        small = httpx.post(
            f"{server.url}/v1/predict", json={"x": [[0, 0, 0, 0]]}, headers=READ, timeout=10
        )
        assert small.status_code == 200, small.text
    finally:
        holder.close()
    deadline = time.monotonic() + 10
    while True:
        r = httpx.post(
            f"{server.url}/v1/predict",
            json={"x": [[0, 0, 0, 0]] * 10000},
            headers=READ,
            timeout=30,
        )
        if r.status_code != 503 or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert r.status_code == 200, r.text


@pytest.mark.redis
def test_authentication_comes_before_parsing(settings, unlearner):
    """A body that is not even JSON: without a token 401, with the read token on the write
    route 403; only a request with the right token gets to the parser's 400."""
    junk = {"content": b"\xff{not json", "headers": {"Content-Type": "application/json"}}
    with TestClient(create_app(settings, unlearner)) as client:
        r = client.post("/v1/predict", **junk)
        assert r.status_code == 401 and r.headers["WWW-Authenticate"] == "Bearer", r.text
        r = client.post("/v1/forget", content=junk["content"], headers={**junk["headers"], **READ})
        assert r.status_code == 403, r.text
        r = client.post("/v1/records", content=junk["content"], headers={**junk["headers"], **READ})
        assert r.status_code == 403 and "adding records need the write token" in r.text, r.text
        r = client.post("/v1/forget", content=junk["content"], headers={**junk["headers"], **WRITE})
        assert r.status_code == 400, r.text
        # No route, or a method the route lacks: 404 / 405 as before, with or without a token.
        assert client.post("/v1/nothing", **junk).status_code == 404
        assert client.put("/v1/predict", **junk).status_code == 405
        # Open probes need no token.
        assert client.get("/healthz").status_code == 200


def test_another_authorization_scheme_is_named_in_the_401(settings, unlearner):
    """Basic credentials were told "missing bearer token" although a header was sent; the answer
    names the scheme (never the credentials) and says what to send."""
    with TestClient(create_app(settings, unlearner)) as client:
        r = client.get("/v1/model", headers={"Authorization": "Basic dXNlcjpzZWNyZXQ="})
        assert r.status_code == 401 and r.headers["WWW-Authenticate"].startswith("Bearer")
        detail = r.json()["detail"]
        assert "holds the Basic scheme" in detail and "Bearer <token>" in detail, detail
        assert "dXNlcjpzZWNyZXQ" not in detail
        # a token sent without its scheme is the whole header: not a byte of it comes back
        for header in ("6iYqpTKlEKmVpUZgjS9H-secret", "mysecret password", "Bearer\t", "Négo x"):
            r = client.get("/v1/model", headers={"Authorization": header.encode()})
            assert r.status_code == 401, r.text
            assert "holds no bearer token" in r.json()["detail"] or "missing bearer" in r.text
            assert not any(part in r.text for part in ("6iYq", "mysecret", "password", "Nég")), (
                r.text
            )
        # a bearer token after a tab is still a bearer token
        r = client.get("/v1/model", headers={"Authorization": "Bearer\tread-token"})
        assert r.status_code == 200, r.text
        r = client.get("/v1/model")
        assert r.status_code == 401 and r.json()["detail"].startswith("missing bearer token")
