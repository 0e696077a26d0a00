"""Every misbehaviour step against real clients, and the transcripts it leaves behind."""

from __future__ import annotations

import asyncio
import http.client
import smtplib
import socket
import time
from collections.abc import Callable

import pytest
import requests
import urllib3
from conftest import assert_refused, connect, exchange, read_exactly, read_to_eof

from selectserver import (
    BREAK,
    HALF_CLOSE,
    HANGUP,
    RECEIVE,
    RESET,
    STALL,
    BlackholeServer,
    Command,
    CommandServer,
    ConnectionRecord,
    Delay,
    Drip,
    Expect,
    Garbage,
    Outcome,
    ReadUntil,
    RefusingServer,
    Throttle,
)

REQUEST = b"GET / HTTP/1.0\r\nHost: example\r\n\r\n"
TRUNCATED = b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly 17 bytes now"

Client = Callable[[CommandServer], bytes]


# ---- clients: each fetches srv.url once and returns the body ---------------------------------


def raw_client(srv: CommandServer) -> bytes:
    with connect(srv.address) as sock:
        sock.sendall(REQUEST)
        return read_to_eof(sock)


def http_client(srv: CommandServer) -> bytes:
    conn = http.client.HTTPConnection(srv.host, srv.port, timeout=5)
    try:
        conn.request("GET", "/")
        return conn.getresponse().read()
    finally:
        conn.close()


def requests_client(srv: CommandServer) -> bytes:
    return requests.get(srv.url, timeout=5).content


def urllib3_client(srv: CommandServer) -> bytes:
    with urllib3.PoolManager(retries=False, timeout=5) as pool:
        return pool.request("GET", srv.url).data


def asyncio_client(srv: CommandServer) -> bytes:
    async def fetch() -> bytes:
        reader, writer = await asyncio.open_connection(srv.host, srv.port)
        try:
            writer.write(REQUEST)
            return await asyncio.wait_for(reader.read(), 5)
        finally:
            writer.close()
            try:
                await writer.wait_closed()
            except ConnectionError:
                pass  # already reset by the server

    return asyncio.run(fetch())


# ---- connection records ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("script", "reply", "outcome"),
    [
        ([RECEIVE, "ok"], b"ok", Outcome.COMPLETED),
        ([RECEIVE, "ok", HANGUP], b"ok", Outcome.HUNG_UP),
        ([RECEIVE, BREAK], b"", Outcome.HUNG_UP),
        ([RECEIVE, "ok", HALF_CLOSE, RECEIVE], b"ok", Outcome.PEER_CLOSED),
        ([RECEIVE, STALL], b"", Outcome.PEER_CLOSED),
        ([RECEIVE, RECEIVE], b"", Outcome.PEER_CLOSED),
        ([RECEIVE, Delay(0.01), "ok"], b"ok", Outcome.COMPLETED),
    ],
)
def test_connection_record(script: list[object], reply: bytes, outcome: Outcome) -> None:
    """Peer, received, sent, outcome and timestamps for a client that sends, then closes."""
    with CommandServer(script, verbose=False) as srv, connect(srv.address) as client:
        client.sendall(b"hi")
        client.shutdown(socket.SHUT_WR)
        assert read_to_eof(client) == reply
        (record,) = srv.wait_for_connections(1)
        assert record.peer == client.getsockname()
    assert record.received == [b"hi"]
    assert record.sent == reply
    assert record.outcome is outcome
    assert record.failure is None
    assert record.ended_at is not None
    assert record.accepted_at <= record.ended_at
    srv.check()


# ---- HANGUP, RESET, HALF_CLOSE, STALL --------------------------------------------------------


def _failing_fetch(
    script: list[object], client: Client, error: type[Exception] | tuple[type[Exception], ...]
) -> tuple[ConnectionRecord, Exception]:
    """Run ``client`` once against ``script``; it must raise ``error``. Returns the record."""
    with CommandServer(script, verbose=False) as srv:
        with pytest.raises(error) as info:
            client(srv)
        (record,) = srv.wait_for_connections(1)
    return record, info.value


@pytest.mark.parametrize("step", [HANGUP, BREAK])
@pytest.mark.parametrize(
    ("client", "error"),
    [
        (http_client, http.client.IncompleteRead),
        (requests_client, requests.exceptions.ChunkedEncodingError),
        (urllib3_client, urllib3.exceptions.ProtocolError),
    ],
)
def test_hangup_mid_body(client: Client, error: type[Exception], step: Command) -> None:
    record, _ = _failing_fetch([RECEIVE, TRUNCATED, step], client, error)
    assert record.outcome is Outcome.HUNG_UP
    assert record.sent == TRUNCATED


@pytest.mark.parametrize(
    ("client", "error"),
    [
        (raw_client, ConnectionResetError),
        (http_client, ConnectionResetError),
        (requests_client, requests.ConnectionError),
        (urllib3_client, urllib3.exceptions.ProtocolError),
        (asyncio_client, ConnectionResetError),
    ],
)
def test_reset(client: Client, error: type[Exception]) -> None:
    record, exc = _failing_fetch([RECEIVE, RESET], client, error)
    assert "reset" in repr(exc).lower()
    assert record.outcome is Outcome.RESET
    assert record.received[0].startswith(b"GET / HTTP/1.")


def test_reset_mid_body_with_requests() -> None:
    # Headers may or may not be read before the RST arrives: both are errors.
    errors = (requests.exceptions.ChunkedEncodingError, requests.ConnectionError)
    record, _ = _failing_fetch([RECEIVE, TRUNCATED, RESET], requests_client, errors)
    assert record.outcome is Outcome.RESET
    assert record.sent == TRUNCATED


def test_half_close_gives_eof_and_keeps_reading() -> None:
    script: list[object] = [RECEIVE, "bye", HALF_CLOSE, RECEIVE]
    with CommandServer(script, verbose=False) as srv, connect(srv.address) as client:
        client.sendall(b"hi")
        assert read_to_eof(client) == b"bye"
        client.sendall(b"still talking")  # the client can send after EOF
        (record,) = srv.wait_for_connections(1)
        assert read_to_eof(client) == b""
    assert record.received == [b"hi", b"still talking"]
    assert record.half_closed
    assert record.sent == b"bye"
    assert record.outcome is Outcome.COMPLETED


def test_stall_until_the_client_times_out() -> None:
    with CommandServer([RECEIVE, STALL], verbose=False) as srv:
        with connect(srv.address, timeout=0.1) as client:
            client.sendall(b"hi")
            with pytest.raises(TimeoutError):
                client.recv(1)
            client.sendall(b"ignored")
        (record,) = srv.wait_for_connections(1)
    assert record.outcome is Outcome.PEER_CLOSED
    assert record.received == [b"hi"]
    assert record.sent == b""
    srv.check()


# ---- no connection slows another -------------------------------------------------------------


@pytest.mark.parametrize(
    "blocker",
    [
        Delay(60),
        STALL,
        Drip(b"slow", interval=60),
        Throttle(1),
        b"x" * (32 << 20),  # the client never reads it: the send blocks
    ],
    ids=["delay", "stall", "drip", "throttle", "backpressure"],
)
def test_a_blocked_server_does_not_slow_another(blocker: object) -> None:
    script: list[object] = [RECEIVE, "held", blocker]
    if isinstance(blocker, Throttle):
        script.append(b"x" * 1000)
    with (
        CommandServer(script, verbose=False) as slow,
        CommandServer([RECEIVE, "fast"], verbose=False) as fast,
        connect(slow.address) as client,
    ):
        client.sendall(b"?")
        assert read_exactly(client, 4) == b"held"  # the slow server is in `blocker` now
        for _ in range(3):
            assert exchange(fast.address, b"?") == b"fast"
        assert len(fast.wait_for_connections(3)) == 3
        assert not slow.connections[0].ended
        slow.close()
        assert slow.connections[0].outcome is Outcome.SERVER_CLOSED


# ---- sending: Drip, Throttle, Garbage --------------------------------------------------------


def test_drip_arrives_in_several_reads() -> None:
    data = b"0123456789" * 4
    with CommandServer([RECEIVE, Drip(data, chunk=10, interval=0.05)], verbose=False) as srv:
        with connect(srv.address) as client:
            client.sendall(b"?")
            reads = list(iter(lambda: client.recv(4096), b""))
        (record,) = srv.wait_for_connections(1)
    assert b"".join(reads) == data
    assert len(reads) >= 2
    assert record.ended_at is not None
    assert record.ended_at - record.accepted_at >= 3 * 0.05


def test_throttle_slows_a_bulk_send() -> None:
    rate, size = 100_000, 20_000
    script: list[object] = [RECEIVE, Throttle(rate), b"t" * size]
    with CommandServer(script, verbose=False) as srv, connect(srv.address) as client:
        client.sendall(b"?")
        started = time.monotonic()
        assert read_to_eof(client) == b"t" * size
        elapsed = time.monotonic() - started
    assert elapsed >= 0.5 * size / rate


def test_garbage_reaches_the_client_byte_exact() -> None:
    step = Garbage(10_000, seed=1234)
    with CommandServer([RECEIVE, step], verbose=False) as srv:
        got = exchange(srv.address, b"?")
        (record,) = srv.wait_for_connections(1)
    assert got == step.data == Garbage(10_000, seed=1234).data
    assert got != Garbage(10_000, seed=4321).data
    assert record.sent == got


# ---- reading: ReadUntil, Expect, timeouts ----------------------------------------------------


def test_read_until_leaves_the_rest_for_the_next_step() -> None:
    script: list[object] = [ReadUntil(b"\r\n"), "1", ReadUntil(b"\r\n"), "2", RECEIVE]
    with CommandServer(script, verbose=False) as srv:
        assert exchange(srv.address, b"one\r\ntwo\r\nthree") == b"12"
        (record,) = srv.wait_for_connections(1)
    assert record.received == [b"one\r\n", b"two\r\n", b"three"]


def _smtp_script(greeting: str, *replies: str) -> list[object]:
    """An SMTP server: ``greeting``, then one command line read before each reply."""
    script: list[object] = [greeting]
    for reply in replies:
        script += [ReadUntil(b"\r\n"), reply]
    return script


def test_smtp_server_rejecting_a_recipient() -> None:
    script = _smtp_script(
        "220 mx ESMTP\r\n",
        "250 mx\r\n",
        "250 sender ok\r\n",
        "550 no such user\r\n",
        "250 reset\r\n",
        "221 bye\r\n",
    )
    with CommandServer(script, verbose=False) as srv:
        with (
            smtplib.SMTP(srv.host, srv.port, timeout=5) as smtp,
            pytest.raises(smtplib.SMTPRecipientsRefused) as info,
        ):
            smtp.sendmail("a@example.com", ["nobody@example.com"], "Subject: hi\r\n\r\nhi")
        (record,) = srv.wait_for_connections(1)
    assert info.value.recipients == {"nobody@example.com": (550, b"no such user")}
    verbs = [line.split()[0] for line in record.received]
    assert verbs == [b"ehlo", b"mail", b"rcpt", b"rset", b"QUIT"]
    assert record.outcome is Outcome.COMPLETED


def test_smtp_server_hanging_up_during_data() -> None:
    script = _smtp_script(
        "220 mx ESMTP\r\n", "250 mx\r\n", "250 ok\r\n", "250 ok\r\n", "354 go ahead\r\n"
    )
    with CommandServer([*script, ReadUntil(b"\r\n.\r\n"), HANGUP], verbose=False) as srv:
        with (
            smtplib.SMTP(srv.host, srv.port, timeout=5) as smtp,
            pytest.raises(smtplib.SMTPServerDisconnected),
        ):
            smtp.sendmail("a@example.com", ["b@example.com"], "Subject: hi\r\n\r\nbody")
        (record,) = srv.wait_for_connections(1)
    assert record.outcome is Outcome.HUNG_UP
    assert record.received[-1].endswith(b"body\r\n.\r\n")


@pytest.mark.parametrize("pattern", [rb"Host: (\w+)\r\n", r"Host: (\w+)\r\n"])
def test_expect_takes_bytes_up_to_the_match(pattern: bytes | str) -> None:
    with CommandServer([Expect(pattern), "ok", RECEIVE], verbose=False) as srv:
        assert exchange(srv.address, REQUEST) == b"ok"
        (record,) = srv.wait_for_connections(1)
    assert record.received == [b"GET / HTTP/1.0\r\nHost: example\r\n", b"\r\n"]
    srv.check()


@pytest.mark.parametrize("client_closes", [True, False], ids=["peer-closed", "timed-out"])
def test_expect_mismatch_is_reported_by_check(client_closes: bool) -> None:
    with CommandServer([Expect(b"POST"), "ok"], verbose=False, timeout=0.2) as srv:
        with connect(srv.address) as client:
            client.sendall(REQUEST)
            if client_closes:
                client.shutdown(socket.SHUT_WR)
            assert read_to_eof(client) == b""
        (record,) = srv.wait_for_connections(1)
    assert record.outcome is (Outcome.PEER_CLOSED if client_closes else Outcome.TIMED_OUT)
    with pytest.raises(AssertionError) as info:
        srv.check()
    message = str(info.value)
    assert f"connection 0 from 127.0.0.1:{record.peer[1]}" in message  # type: ignore[index]
    assert "step 0 (Expect(pattern=b'POST'))" in message
    assert "before the pattern matched" in message
    assert "Host: example" in message


def test_check_lists_every_failed_connection() -> None:
    with CommandServer([Expect(b"POST")], verbose=False) as srv:
        for _ in range(2):
            assert exchange(srv.address, b"GET") == b""
        srv.wait_for_connections(2)
        with pytest.raises(AssertionError, match=r"2 server-side failure\(s\)") as info:
            srv.check()
    assert "connection 0 from" in str(info.value)
    assert "connection 1 from" in str(info.value)


def test_server_timeout_ends_a_silent_connection() -> None:
    with CommandServer([RECEIVE, "never sent"], verbose=False, timeout=0.1) as srv:
        with connect(srv.address) as client:
            assert read_to_eof(client) == b""
        (record,) = srv.wait_for_connections(1)
    assert record.outcome is Outcome.TIMED_OUT
    assert record.sent == b""
    with pytest.raises(AssertionError, match=r"connection 0 .*step 0 \(RECEIVE\): timed out"):
        srv.check()


# ---- retries and connection-establishment faults ---------------------------------------------


def test_requests_retry_succeeds_on_the_second_connection() -> None:
    ok = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
    retry = urllib3.util.Retry(total=3, backoff_factor=0)
    with (
        CommandServer(scripts=[[RESET], [RECEIVE, ok]], verbose=False) as srv,
        requests.Session() as session,
    ):
        session.mount("http://", requests.adapters.HTTPAdapter(max_retries=retry))
        assert session.get(srv.url, timeout=5).text == "ok"
        first, second = srv.wait_for_connections(2)
    assert (first.outcome, second.outcome) == (Outcome.RESET, Outcome.COMPLETED)


def test_refusing_server_refuses_requests() -> None:
    with RefusingServer() as srv, pytest.raises(requests.ConnectionError, match="refused"):
        requests.get(srv.url, timeout=5)


def test_refusing_server_holds_its_port() -> None:
    with RefusingServer() as srv:
        with pytest.raises(OSError, match="in use"):
            CommandServer([], port=srv.port, verbose=False).close()
        assert_refused(srv.address)


def test_blackhole_server_makes_requests_time_out_connecting() -> None:
    with BlackholeServer() as srv, pytest.raises(requests.exceptions.ConnectTimeout):
        requests.get(srv.url, timeout=0.2)
