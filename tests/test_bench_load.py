"""The load generator's HTTP client and CPU meter (``bench.load``), against a plain asyncio
server that records what it receives."""

from __future__ import annotations

import asyncio
import json
import os
import time

from bench.load import _Connection, _cpu_seconds, _http_request


def test_a_connection_sends_the_encoded_request_and_reads_each_whole_answer():
    received: list[bytes] = []
    connections = 0

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        while True:
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except asyncio.IncompleteReadError:
                break
            length = int(
                next(ln for ln in head.split(b"\r\n") if ln.startswith(b"Content-Length"))[15:]
            )
            body = await reader.readexactly(length)
            received.append(body)
            answer = b'{"n": %d}' % len(received) * 3  # a body longer than one header line
            close = b"Connection: close\r\n" if len(received) == 2 else b""
            writer.write(
                b"HTTP/1.1 %d OK\r\nContent-Length: %d\r\n%s\r\n"
                % (200 if len(received) != 3 else 422, len(answer), close)
                + answer
            )
            await writer.drain()
            if close:
                break
        writer.close()

    async def run() -> list[int]:
        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        request = _http_request(port, "POST", "/v1/predict", "tok", {"x": [[1.5, 2]]})
        conn = _Connection(port)
        codes = [await conn.send(request) for _ in range(4)]
        conn.close()
        server.close()
        await server.wait_closed()
        return codes

    codes = asyncio.run(run())
    assert codes == [200, 200, 422, 200]
    # the body as JSON, the same each time; the connection reopened after "Connection: close"
    assert [json.loads(b) for b in received] == [{"x": [[1.5, 2]]}] * 4
    assert connections == 2


def test_cpu_seconds_of_a_process_follow_its_cpu_time():
    before, own_before = _cpu_seconds(os.getpid()), time.process_time()
    end = time.process_time() + 0.3
    while time.process_time() < end:
        pass
    spent, own = _cpu_seconds(os.getpid()) - before, time.process_time() - own_before
    assert abs(spent - own) < 0.05 + 0.1 * own
