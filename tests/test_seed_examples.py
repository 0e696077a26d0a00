"""The seed library's README examples, in their modern working form, with real clients.

The seed's scripts answered HTTP clients with bare text (``'hello world'``), which no modern
HTTP client accepts as a response; here they send a real HTTP response instead.
"""

from __future__ import annotations

import asyncio

import pytest
import requests
from conftest import HTTP_OK, assert_refused, exchange

from selectserver import RECEIVE, AsyncioCommandServer, CommandServer, OneShotServer, Outcome

HELLO_WORLD = "HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\nhello world"


def test_usage_receive_then_send() -> None:
    """``CommandServer([RECEIVE, 'hello world'])`` answers ``requests.get`` on ``srvr.port``."""
    srvr = CommandServer([RECEIVE, HELLO_WORLD], verbose=False)
    r = requests.get(f"http://localhost:{srvr.port}/hello", timeout=5)
    assert "hello world" in r.text
    srvr.close()


def test_received_keeps_what_arrived() -> None:
    """``[20, 'hello world']``: the request's bytes are in ``.received``."""
    srvr = CommandServer([20, HELLO_WORLD], verbose=False)
    r = requests.get(f"http://localhost:{srvr.port}/hello", timeout=5)
    srvr.close()
    allReceived = b"".join(srvr.received)
    assert b"GET /hello" in allReceived
    assert r.text == "hello world"


@pytest.mark.parametrize("script", [HTTP_OK, HTTP_OK.decode()])
def test_bare_string_means_receive_then_send(script: str | bytes) -> None:
    """A bare str or bytes script ``S`` is ``[RECEIVE, S]``."""
    with CommandServer(script, verbose=False) as srv:
        assert exchange(srv.address, b"ping") == HTTP_OK
        (record,) = srv.wait_for_connections(1)
    assert record.received == [b"ping"]
    assert record.outcome is Outcome.COMPLETED


def test_verbose_prints_server_lines(capsys: pytest.CaptureFixture[str]) -> None:
    """The seed's default ``verbose=True`` prints a ``SERVER: ...`` line per event."""
    with CommandServer([RECEIVE, "pong"]) as srv:
        assert exchange(srv.address, b"ping") == b"pong"
        srv.wait_for_connections(1)
    lines = capsys.readouterr().out.splitlines()
    assert lines, "verbose=True printed nothing"
    assert all(line.startswith("SERVER: ") for line in lines), lines
    text = "\n".join(lines)
    for event in ("accepted", "received 4 bytes", "sent 4 bytes", "ended"):
        assert event in text


def test_verbose_false_is_quiet(capsys: pytest.CaptureFixture[str]) -> None:
    """``verbose=False`` quiets it."""
    with CommandServer([RECEIVE, "pong"], verbose=False) as srv:
        assert exchange(srv.address, b"ping") == b"pong"
    assert capsys.readouterr().out == ""


def test_asyncio_server_with_explicit_loop() -> None:
    """The seed's example: ``reader=`` and ``loop=`` given, the loop not running yet."""
    loop = asyncio.new_event_loop()
    try:
        reader = asyncio.StreamReader(loop=loop)
        srvr = AsyncioCommandServer([20, HTTP_OK], reader=reader, loop=loop, verbose=False)
        r = requests.get(f"http://localhost:{srvr.port}/hello", timeout=5)
        srvr.wait_for_connections(1)
        dataReceivedByServer = loop.run_until_complete(reader.read())
        srvr.close()
    finally:
        loop.close()
    assert r.text == "hello"
    assert b"GET /hello" in dataReceivedByServer
    assert srvr.reader is reader


def test_asyncio_server_inside_a_coroutine() -> None:
    """Built inside a coroutine, it uses the running loop and makes its own reader."""

    async def main() -> bytes:
        with AsyncioCommandServer([RECEIVE, "pong", RECEIVE], verbose=False) as srv:
            reader, writer = await asyncio.open_connection(*srv.address)
            writer.write(b"ping")
            assert await reader.readexactly(4) == b"pong"
            writer.write(b"again")
            writer.write_eof()
            data = await asyncio.wait_for(srv.reader.read(), 5)
            writer.close()
            await writer.wait_closed()
            return data

    assert asyncio.run(main()) == b"pingagain"


def test_asyncio_server_feeds_eof_when_the_peer_closes() -> None:
    """EOF is fed when the connection ends, even if the script had more to read."""

    async def main() -> bytes:
        with AsyncioCommandServer([RECEIVE, RECEIVE], verbose=False) as srv:
            _, writer = await asyncio.open_connection(*srv.address)
            writer.write(b"only this")
            await writer.drain()
            writer.close()
            await writer.wait_closed()
            return await asyncio.wait_for(srv.reader.read(), 5)

    assert asyncio.run(main()) == b"only this"


def test_asyncio_server_needs_a_loop_outside_a_coroutine() -> None:
    """Outside a running loop, leaving out ``loop=`` is a clear error."""
    with pytest.raises(TypeError, match="loop="):
        AsyncioCommandServer([RECEIVE, "x"], verbose=False)


def test_one_shot_server_refuses_a_second_connect() -> None:
    """OneShotServer serves one connection, then stops listening."""
    with OneShotServer([RECEIVE, HTTP_OK], verbose=False) as srv:
        assert requests.get(srv.url, timeout=5).text == "hello"
        srv.wait_for_connections(1)
        assert_refused(srv.address)
    assert len(srv.connections) == 1
