"""Unix-domain and IPv6 fake servers: the same scripts and records as IPv4, on one reactor thread.

Most tests run once per transport (``where``: IPv4, IPv6 on ``::1``, a Unix socket file), so
"the same as TCP" is checked by the same assertions passing everywhere. Tests of what only one
transport has (a socket file, an abstract name, brackets in a URL) follow.
"""

from __future__ import annotations

import asyncio
import http.client
import os
import socket
import stat
import sys
import threading
import urllib.parse
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypedDict

import pytest
import requests
from conftest import CLIENT_TIMEOUT, HAS_IPV6, HTTP_OK, connect, read_to_eof

import selectserver
from selectserver import (
    HALF_CLOSE,
    HANGUP,
    RECEIVE,
    RESET,
    CommandServer,
    ConnectionRecord,
    Drip,
    Expect,
    Outcome,
    ReadUntil,
)

HAS_UNIX = hasattr(socket, "AF_UNIX")
needs_ipv6 = pytest.mark.skipif(not HAS_IPV6, reason="no IPv6 loopback")
needs_unix = pytest.mark.skipif(not HAS_UNIX, reason="no Unix-domain sockets")
needs_linux = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="abstract Unix sockets are Linux-only"
)


@pytest.fixture
def sock_path(tmp_path: Path) -> str:
    """A fresh Unix socket path, short enough for ``sun_path`` (104 bytes on macOS)."""
    path = str(tmp_path / "s.sock")
    assert len(os.fsencode(path)) < 104, path
    return path


def abstract_name() -> str:
    """A Linux abstract socket name no other test (or xdist worker) uses."""
    return f"\0selectserver-test-{uuid.uuid4().hex}"


class Place(TypedDict, total=False):
    """Where a server listens: CommandServer's ``host`` or ``path`` keyword."""

    host: str
    path: str


@pytest.fixture(
    params=[
        "ipv4",
        pytest.param("ipv6", marks=needs_ipv6),
        pytest.param("unix", marks=needs_unix),
    ]
)
def where(request: pytest.FixtureRequest, sock_path: str) -> Place:
    """Server keyword arguments placing it on one transport."""
    places: dict[str, Place] = {"ipv4": {}, "ipv6": {"host": "::1"}, "unix": {"path": sock_path}}
    return places[request.param]


@contextmanager
def client(srv: CommandServer) -> Iterator[socket.socket]:
    """A raw client of ``srv`` over its transport (TCP or Unix), closed on exit."""
    address = srv.address
    if isinstance(address, tuple):
        with connect(address) as sock:
            yield sock
        return
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(CLIENT_TIMEOUT)
        sock.connect(address)
        yield sock
    finally:
        sock.close()


def exchange(srv: CommandServer, request: bytes) -> bytes:
    """Send ``request``, half-close, and return the whole reply."""
    with client(srv) as sock:
        sock.sendall(request)
        sock.shutdown(socket.SHUT_WR)
        return read_to_eof(sock)


def only_record(srv: CommandServer) -> ConnectionRecord:
    """The server's one connection, once it has ended."""
    (record,) = srv.wait_for_connections(1)
    assert len(srv.connections) == 1
    return record


# ---- the same scripts and records on every transport ---------------------------------------------

TRANSCRIPTS = [
    pytest.param([RECEIVE, "pong"], b"ping", b"pong", [b"ping"], Outcome.COMPLETED, id="echo"),
    pytest.param(
        [ReadUntil(b"\n"), "a", ReadUntil(b"\n"), "b"],
        b"1\n2\n",
        b"ab",
        [b"1\n", b"2\n"],
        Outcome.COMPLETED,
        id="pipelined",
    ),
    pytest.param(
        [Expect(rb"id=\d+;"), Drip(b"abc", interval=0.001)],
        b"id=42;",
        b"abc",
        [b"id=42;"],
        Outcome.COMPLETED,
        id="expect-drip",
    ),
    pytest.param(["hi", HALF_CLOSE, 3], b"abc", b"hi", [b"abc"], Outcome.COMPLETED, id="half"),
    pytest.param([4, HANGUP], b"abcd", b"", [b"abcd"], Outcome.HUNG_UP, id="hangup"),
    pytest.param([RECEIVE, "x", RECEIVE], b"q", b"x", [b"q"], Outcome.PEER_CLOSED, id="peer"),
]


@pytest.mark.parametrize(("script", "request_", "reply", "received", "outcome"), TRANSCRIPTS)
def test_same_transcript(
    where: Place,
    script: list[object],
    request_: bytes,
    reply: bytes,
    received: list[bytes],
    outcome: Outcome,
) -> None:
    with CommandServer(script, verbose=False, **where) as srv:
        assert exchange(srv, request_) == reply
        record = only_record(srv)
    assert record.received == received
    assert record.outcome is outcome
    assert record.failure is None


def test_half_close_reads_after_eof(where: Place) -> None:
    with CommandServer(["hi", HALF_CLOSE, 3], verbose=False, **where) as srv, client(srv) as sock:
        assert read_to_eof(sock) == b"hi"  # EOF, while the server still reads
        sock.sendall(b"abc")
        record = only_record(srv)
    assert record.half_closed
    assert record.received == [b"abc"]
    assert record.outcome is Outcome.COMPLETED


def test_reset(where: Place) -> None:
    with CommandServer([RECEIVE, RESET], verbose=False, **where) as srv, client(srv) as sock:
        sock.sendall(b"x")
        record = only_record(srv)
        if srv.path is None:
            with pytest.raises(ConnectionResetError):
                sock.recv(1)
        else:
            # AF_UNIX has no RST and ignores SO_LINGER: the client sees the close as EOF.
            assert sock.recv(1) == b""
    assert record.outcome is Outcome.RESET
    assert record.received == [b"x"]


async def _asyncio_exchange(srv: CommandServer, request: bytes) -> bytes:
    address = srv.address
    if isinstance(address, tuple):
        reader, writer = await asyncio.open_connection(*address)
    else:
        reader, writer = await asyncio.open_unix_connection(address)
    try:
        writer.write(request)
        return await asyncio.wait_for(reader.read(), CLIENT_TIMEOUT)
    finally:
        writer.close()
        await writer.wait_closed()


def test_asyncio_client(where: Place) -> None:
    with CommandServer([ReadUntil(b"\n"), "pong\n"], verbose=False, **where) as srv:
        assert asyncio.run(_asyncio_exchange(srv, b"ping\n")) == b"pong\n"
        assert only_record(srv).received == [b"ping\n"]


def test_tls(where: Place) -> None:
    """The certificate covers localhost and ::1, and TLS runs over a Unix socket as well."""
    with CommandServer([RECEIVE, "secret"], tls=True, verbose=False, **where) as srv:
        with (
            client(srv) as raw,
            srv.client_ssl_context().wrap_socket(raw, server_hostname="localhost") as sock,
        ):
            sock.sendall(b"x")
            assert read_to_eof(sock) == b"secret"
        record = only_record(srv)
    assert record.tls
    assert record.received == [b"x"]


def test_every_transport_shares_the_reactor_thread(tmp_path: Path) -> None:
    before = threading.active_count()
    places: list[Place] = [{}]
    if HAS_IPV6:
        places.append({"host": "::1"})
    if HAS_UNIX:
        places.append({"path": str(tmp_path / "s.sock")})
    if sys.platform.startswith("linux"):
        places.append({"path": abstract_name()})
    servers = [CommandServer([RECEIVE, str(i)], verbose=False, **kw) for i, kw in enumerate(places)]
    try:
        for i, srv in enumerate(servers):
            assert exchange(srv, b"x") == str(i).encode()
        assert threading.active_count() <= before + 1
        # every server has served a connection, so the reactor has taken each one on
        stats = selectserver.statistics()
        assert stats.running
        assert stats.servers >= len(servers)
    finally:
        for srv in servers:
            srv.close()


# ---- Unix-domain sockets only -------------------------------------------------------------------


@needs_unix
def test_socket_file_lives_as_long_as_the_server(sock_path: str) -> None:
    with CommandServer([RECEIVE, "unix"], verbose=False, path=sock_path) as srv:
        assert stat.S_ISSOCK(os.stat(sock_path).st_mode)
        assert srv.path == sock_path
        assert srv.address == sock_path
        assert srv.url == "http+unix://" + urllib.parse.quote(sock_path, safe="")
        assert exchange(srv, b"x") == b"unix"
    assert not os.path.exists(sock_path)
    srv.close()  # idempotent, with the file already gone


@needs_unix
@pytest.mark.parametrize("attribute", ["host", "port"])
def test_unix_server_has_no_host_or_port(sock_path: str, attribute: str) -> None:
    with (
        CommandServer([], verbose=False, path=sock_path) as srv,
        pytest.raises(AttributeError, match="Unix-domain server has no host or port"),
    ):
        getattr(srv, attribute)


@needs_unix
def test_taken_path_raises_and_keeps_the_other_server(sock_path: str) -> None:
    with CommandServer([RECEIVE, "first"], verbose=False, path=sock_path) as first:
        with pytest.raises(OSError, match="in use"):
            CommandServer([], verbose=False, path=sock_path)
        assert os.path.exists(sock_path)  # the failed server did not remove the other's file
        assert exchange(first, b"x") == b"first"
    assert not os.path.exists(sock_path)


@needs_unix
def test_bytes_path(sock_path: str) -> None:
    with CommandServer([RECEIVE, "bytes"], verbose=False, path=os.fsencode(sock_path)) as srv:
        assert exchange(srv, b"x") == b"bytes"
    assert not os.path.exists(sock_path)


@needs_unix
@pytest.mark.parametrize("path", ["", b"", 5, ["/tmp/s.sock"]])
def test_bad_path(path: object) -> None:
    with pytest.raises(TypeError, match="path must be a non-empty str or bytes"):
        CommandServer([], verbose=False, path=path)  # type: ignore[arg-type]


@needs_linux
def test_abstract_name() -> None:
    name = abstract_name()
    with CommandServer([RECEIVE, "abstract"], verbose=False, path=name) as srv:
        assert srv.url == "http+unix://" + urllib.parse.quote(name, safe="")
        assert srv.url in repr(srv)
        assert not os.path.exists(name[1:])  # no file: the name lives in the kernel only
        assert exchange(srv, b"x") == b"abstract"
        assert asyncio.run(_asyncio_exchange(srv, b"y")) == b"abstract"
        records = srv.wait_for_connections(2)
    assert [r.received for r in records] == [[b"x"], [b"y"]]
    assert [r.outcome for r in records] == [Outcome.COMPLETED] * 2
    with pytest.raises((ConnectionRefusedError, FileNotFoundError)), client(srv):
        pass  # the name is free again: nobody listens on it


@needs_unix
@pytest.mark.parametrize(
    "kind",
    [
        pytest.param("abstract", marks=needs_linux),
        "bytes",
    ],
)
def test_path_is_returned_as_given(kind: str, sock_path: str) -> None:
    path: str | bytes = abstract_name() if kind == "abstract" else os.fsencode(sock_path)
    with CommandServer([], verbose=False, path=path) as srv:
        assert srv.path == path
        assert srv.address == path


# ---- IPv6 only ----------------------------------------------------------------------------------


@needs_ipv6
def test_ipv6_address_and_url() -> None:
    with CommandServer([ReadUntil(b"\r\n\r\n"), HTTP_OK], host="::1", verbose=False) as srv:
        assert srv.host == "::1"
        assert srv.address == ("::1", srv.port)
        assert srv.url == f"http://[::1]:{srv.port}"
        assert srv.path is None
        assert f"[::1]:{srv.port}" in repr(srv)


@needs_ipv6
def test_ipv6_http_clients() -> None:
    with CommandServer([ReadUntil(b"\r\n\r\n"), HTTP_OK], host="::1", verbose=False) as srv:
        assert requests.get(srv.url, timeout=CLIENT_TIMEOUT).text == "hello"
        conn = http.client.HTTPConnection("::1", srv.port, timeout=CLIENT_TIMEOUT)
        try:
            conn.request("GET", "/v6")
            assert conn.getresponse().read() == b"hello"
        finally:
            conn.close()
        records = srv.wait_for_connections(2)
    assert all(isinstance(r.peer, tuple) and r.peer[0] == "::1" for r in records)
    assert records[1].received[0].startswith(b"GET /v6 HTTP/1.1\r\nHost: [::1]:")


@needs_ipv6
def test_ipv6_https_with_verification() -> None:
    with CommandServer(
        [ReadUntil(b"\r\n\r\n"), HTTP_OK], host="::1", tls=True, verbose=False
    ) as srv:
        assert srv.url == f"https://[::1]:{srv.port}"
        response = requests.get(srv.url, verify=srv.ca_path, timeout=CLIENT_TIMEOUT)
        assert response.text == "hello"
        assert only_record(srv).tls
