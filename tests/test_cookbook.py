"""The README cookbook: one runnable recipe per failure mode, each with a real client.

Each test body is written to be pasted into the README as it is.
"""

from __future__ import annotations

import asyncio
import http.client
import smtplib
import socket
import time

import pytest
import requests
import urllib3
from urllib3.util import Retry

from selectserver import (
    HALF_CLOSE,
    HANGUP,
    RECEIVE,
    RESET,
    STALL,
    BlackholeServer,
    CommandServer,
    Drip,
    Outcome,
    ReadUntil,
    RefusingServer,
)


def test_retry_after_reset() -> None:
    ok = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
    # The first connection is reset; the second (and any later one) gets the answer.
    with (
        CommandServer(scripts=[[RESET], [RECEIVE, ok]], verbose=False) as server,
        urllib3.PoolManager(retries=Retry(total=2, backoff_factor=0)) as pool,
    ):
        response = pool.request("GET", server.url)
    assert response.data == b"ok"
    assert [c.outcome for c in server.connections] == [Outcome.RESET, Outcome.COMPLETED]


def test_truncated_body_raises_incomplete_read() -> None:
    truncated = b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly part of it"
    with CommandServer([RECEIVE, truncated, HANGUP], verbose=False) as server:
        conn = http.client.HTTPConnection(server.host, server.port, timeout=5)
        conn.request("GET", "/")
        with pytest.raises(http.client.IncompleteRead) as excinfo:
            conn.getresponse().read()
        conn.close()
    assert excinfo.value.partial == b"only part of it"


def test_chunked_body_split_across_sends() -> None:
    head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
    body = b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"
    # 3-byte pieces cut through chunk sizes and CRLFs alike.
    script = [ReadUntil(b"\r\n\r\n"), head, Drip(body, chunk=3, interval=0.001)]
    with CommandServer(script, verbose=False) as server:
        response = requests.get(server.url, timeout=5)
    assert response.text == "hello world"


def test_read_timeout_from_a_stalled_server() -> None:
    with CommandServer([RECEIVE, STALL], verbose=False) as server:
        with pytest.raises(requests.exceptions.ReadTimeout):
            requests.get(server.url, timeout=0.2)
        (record,) = server.wait_for_connections(1)
    assert record.outcome is Outcome.PEER_CLOSED  # the client gave up and closed


def test_slow_server_drips_the_response() -> None:
    response = b"HTTP/1.0 200 OK\r\n\r\nslowly"  # 25 bytes: 7 pieces, 6 pauses
    with CommandServer([RECEIVE, Drip(response, chunk=4, interval=0.02)], verbose=False) as server:
        start = time.monotonic()
        assert requests.get(server.url, timeout=5).text == "slowly"
    assert time.monotonic() - start >= 6 * 0.02


def test_smtp_dialogue() -> None:
    line = ReadUntil(b"\r\n")
    script: list[object] = ["220 mail.example ESMTP\r\n"]
    script += [line, "250 mail.example\r\n"]  # EHLO
    script += [line, "250 sender ok\r\n"]  # MAIL FROM
    script += [line, "250 recipient ok\r\n"]  # RCPT TO
    script += [line, "354 end with <CRLF>.<CRLF>\r\n"]  # DATA
    script += [ReadUntil(b"\r\n.\r\n"), "250 queued\r\n"]  # the message
    script += [line, "221 bye\r\n"]  # QUIT
    with CommandServer(script, verbose=False) as server:
        with smtplib.SMTP(server.host, server.port, timeout=5) as smtp:
            smtp.sendmail("me@example.com", ["you@example.com"], "Subject: hi\r\n\r\nHello!")
        (record,) = server.wait_for_connections(1)
    assert record.received[4].endswith(b"Hello!\r\n.\r\n")
    server.check()


def test_asyncio_client_reads_eof_then_keeps_sending() -> None:
    async def client(server: CommandServer) -> bytes:
        reader, writer = await asyncio.open_connection(server.host, server.port)
        writer.write(b"hello")
        reply = await reader.read()  # EOF right after the reply: the server half-closed
        writer.write(b"goodbye")  # ...but still reads
        writer.close()
        await writer.wait_closed()
        return reply

    with CommandServer([RECEIVE, "hi", HALF_CLOSE, RECEIVE], verbose=False) as server:
        assert asyncio.run(client(server)) == b"hi"
        (record,) = server.wait_for_connections(1)
    assert record.received == [b"hello", b"goodbye"]


def test_connection_refused() -> None:
    with RefusingServer() as server, pytest.raises(ConnectionRefusedError):
        socket.create_connection(server.address, timeout=5)


def test_connect_timeout() -> None:
    with BlackholeServer() as server, pytest.raises(TimeoutError):
        socket.create_connection(server.address, timeout=0.2)
