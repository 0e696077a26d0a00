"""The public servers over real loopback sockets: lifecycle, concurrency, scale, transcripts."""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
from conftest import (
    HAS_IPV6,
    HTTP_OK,
    assert_refused,
    connect,
    exchange,
    open_fds,
    read_exactly,
    read_to_eof,
)

import selectserver
from selectserver import (
    RECEIVE,
    STALL,
    CommandServer,
    Delay,
    Drip,
    Outcome,
)

#: A script that answers once, then holds the connection open until the server closes.
HOLD: list[object] = [RECEIVE, "ok", STALL]


def _hold(sock: socket.socket) -> None:
    """Start ``HOLD`` on ``sock``: once this returns, the server has accepted it and stalls."""
    sock.sendall(b"?")
    assert read_exactly(sock, 2) == b"ok"


# ---- construction and addresses --------------------------------------------------------------


def test_listening_before_the_constructor_returns() -> None:
    with CommandServer([RECEIVE, "pong"], verbose=False) as srv:
        assert exchange(srv.address, b"ping") == b"pong"


def test_address_properties() -> None:
    with CommandServer([], verbose=False) as srv:
        assert srv.host == "127.0.0.1"
        assert isinstance(srv.port, int)
        assert 0 < srv.port < 65536
        assert srv.address == ("127.0.0.1", srv.port)
        assert srv.url == f"http://127.0.0.1:{srv.port}"


@pytest.mark.skipif(not HAS_IPV6, reason="no IPv6 loopback")
def test_ipv6() -> None:
    with CommandServer([RECEIVE, HTTP_OK], host="::1", verbose=False) as srv:
        assert srv.host == "::1"
        assert srv.url == f"http://[::1]:{srv.port}"
        assert requests.get(srv.url, timeout=5).text == "hello"
        (record,) = srv.wait_for_connections(1)
    assert isinstance(record.peer, tuple)
    assert record.peer[0] == "::1"


def test_address_in_use_raises_in_the_caller() -> None:
    with CommandServer([], verbose=False) as srv:
        with pytest.raises(OSError, match="in use"):
            CommandServer([], port=srv.port, verbose=False)
        assert exchange(srv.address, b"") == b""  # the first server is unharmed


@pytest.mark.parametrize("host", ["no-such-host.invalid", "192.0.2.1"])
def test_bad_host_raises_oserror(host: str) -> None:
    with pytest.raises(OSError, match=r"\S"):  # gaierror or EADDRNOTAVAIL, worded by the OS
        CommandServer([], host=host, verbose=False)


def test_empty_script_accepts_and_closes() -> None:
    with CommandServer([], verbose=False) as srv:
        assert exchange(srv.address, b"ignored") == b""
        (record,) = srv.wait_for_connections(1)
    assert record.outcome is Outcome.COMPLETED
    srv.check()


# ---- closing ---------------------------------------------------------------------------------


@pytest.mark.parametrize("closer", [CommandServer.close, CommandServer.stop])
def test_close_returns_after_every_socket_is_closed(
    closer: Callable[[CommandServer], None],
) -> None:
    fds = open_fds()
    srv = CommandServer(HOLD, verbose=False)
    with connect(srv.address) as client:
        _hold(client)
        closer(srv)
        assert open_fds() == fds + 1  # only the client's socket is left
        assert srv.connections[0].outcome is Outcome.SERVER_CLOSED
        client.setblocking(False)  # the FIN is already here: no waiting
        try:
            assert client.recv(1) == b""
        except ConnectionResetError:
            pass
    assert_refused(srv.address)


def test_close_is_idempotent() -> None:
    srv = CommandServer([], verbose=False)
    srv.close()
    srv.close()
    srv.stop()
    assert_refused(srv.address)


def test_close_from_many_threads_at_once() -> None:
    srv = CommandServer(HOLD, verbose=False)
    with connect(srv.address) as client:
        _hold(client)
        barrier = threading.Barrier(8)

        def close() -> None:
            barrier.wait(timeout=5)
            srv.close()

        with ThreadPoolExecutor(8) as pool:
            for future in [pool.submit(close) for _ in range(8)]:
                future.result(timeout=10)
        assert read_to_eof(client) == b""
    assert_refused(srv.address)


def test_context_manager_closes() -> None:
    with CommandServer([], verbose=False) as srv:
        assert isinstance(srv, CommandServer)
    assert_refused(srv.address)


def test_close_while_clients_are_mid_script() -> None:
    """Clients hammer a slow server from threads while it closes: no hang, no exception."""
    srv = CommandServer([RECEIVE, Drip(b"x" * 40, chunk=4, interval=0.005)], verbose=False)
    stop = threading.Event()
    answers: list[bytes] = []

    def client() -> None:
        for _ in range(200):
            if stop.is_set():
                return
            try:
                answers.append(exchange(srv.address, b"go"))
            except OSError:
                return  # refused or reset: the server is closing

    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(client) for _ in range(4)]
        srv.wait_for_connections(2)
        srv.close()
        stop.set()
        for future in futures:
            future.result(timeout=10)
    assert answers.count(b"x" * 40) >= 2
    assert all(answer == b"x" * 40 or answer.strip(b"x") == b"" for answer in answers)
    srv.check()


# ---- connections -----------------------------------------------------------------------------


def test_a_delayed_connection_does_not_hold_up_another() -> None:
    scripts: list[object] = [[RECEIVE, "held", Delay(60), "late"], [RECEIVE, "fast"]]
    with CommandServer(scripts=scripts, verbose=False) as srv, connect(srv.address) as slow:
        slow.sendall(b"a")
        assert read_exactly(slow, 4) == b"held"  # connection 0 is in its Delay now
        assert exchange(srv.address, b"b") == b"fast"
        (fast,) = srv.wait_for_connections(1)
        assert fast.index == 1
        assert not srv.connections[0].ended
        assert "waiting until" in srv.connections[0].waiting_for()
        srv.close()
    assert srv.connections[0].outcome is Outcome.SERVER_CLOSED


def test_every_connection_runs_the_whole_script() -> None:
    script: list[object] = [RECEIVE, "one ", RECEIVE, "two"]
    with CommandServer(script, verbose=False) as srv:

        def client(n: int) -> bytes:
            with connect(srv.address) as sock:
                sock.sendall(b"a%d" % n)
                first = read_exactly(sock, 4)
                sock.sendall(b"b%d" % n)
                return first + read_to_eof(sock)

        with ThreadPoolExecutor(5) as pool:
            assert list(pool.map(client, range(5), timeout=10)) == [b"one two"] * 5
        records = srv.wait_for_connections(5)
    assert [r.outcome for r in records] == [Outcome.COMPLETED] * 5
    assert all(r.step == len(script) for r in records)
    assert sorted(b"".join(r.received) for r in records) == [b"a%db%d" % (n, n) for n in range(5)]


def test_300_servers_share_one_thread() -> None:
    threads_before = threading.active_count()
    servers = [CommandServer([RECEIVE, b"%d" % n], verbose=False) for n in range(300)]
    try:
        assert threading.active_count() <= threads_before + 1
        for n, srv in enumerate(servers):
            assert exchange(srv.address, b"?") == b"%d" % n
        assert threading.active_count() <= threads_before + 1
        assert selectserver.statistics().servers >= 300
    finally:
        for srv in servers:
            srv.close()


def test_closing_500_servers_leaves_no_fd_and_no_thread() -> None:
    fds_before, threads_before = open_fds(), threading.active_count()
    servers = [CommandServer([RECEIVE, "x"], verbose=False) for _ in range(500)]
    assert exchange(servers[0].address, b"?") == b"x"
    assert exchange(servers[-1].address, b"?") == b"x"
    assert open_fds() >= fds_before + 500
    for srv in servers:
        srv.close()
    assert open_fds() == fds_before
    assert threading.active_count() <= threads_before


# ---- logging and statistics ------------------------------------------------------------------


def test_events_are_logged_at_debug_even_when_quiet(caplog: pytest.LogCaptureFixture) -> None:
    with (
        caplog.at_level(logging.DEBUG, logger="selectserver"),
        CommandServer([RECEIVE, "pong"], verbose=False) as srv,
    ):
        assert exchange(srv.address, b"ping") == b"pong"
        srv.wait_for_connections(1)
    messages = [r.getMessage() for r in caplog.records if r.name == "selectserver"]
    assert all(r.levelno == logging.DEBUG for r in caplog.records if r.name == "selectserver")
    text = "\n".join(messages)
    for event in ("listening", "accepted", "received 4 bytes", "sent 4 bytes", "ended"):
        assert event in text, text


def test_statistics_counts_servers_and_connections() -> None:
    before = selectserver.statistics()
    with CommandServer(HOLD, verbose=False) as srv, connect(srv.address) as client:
        _hold(client)
        passed = threading.Event()  # a pass of the loop after the one that sent "ok"
        srv._reactor.submit(passed.set)
        assert passed.wait(5)
        stats = selectserver.statistics()
        assert stats.running
        assert stats.thread_name == "selectserver-reactor"
        assert stats.servers == before.servers + 1
        assert stats.connections >= before.connections + 1
        assert stats.registered >= 3  # wake-up socket, listener, the stalled connection
    assert selectserver.statistics().servers == before.servers


# ---- per-server options ----------------------------------------------------------------------


def test_max_connections() -> None:
    with CommandServer([RECEIVE, "ok"], verbose=False, max_connections=2) as srv:
        assert exchange(srv.address, b"1") == b"ok"
        assert exchange(srv.address, b"2") == b"ok"
        assert len(srv.wait_for_connections(2)) == 2
        assert_refused(srv.address)


def test_scripts_per_connection_and_the_last_repeats() -> None:
    scripts: list[object] = [[RECEIVE, "first"], [RECEIVE, "second"], [RECEIVE, "rest"]]
    with CommandServer(scripts=scripts, verbose=False) as srv:
        answers = [exchange(srv.address, b"?") for _ in range(5)]
    assert answers == [b"first", b"second", b"rest", b"rest", b"rest"]


def test_wait_for_connections_returns_records_in_the_order_they_ended() -> None:
    with (
        CommandServer([RECEIVE, "ok"], verbose=False) as srv,
        connect(srv.address) as a,
        connect(srv.address) as b,
        connect(srv.address) as c,
    ):
        for n, sock in [(2, c), (1, b), (0, a)]:  # finish in reverse order
            sock.sendall(b"%d" % n)
            assert read_to_eof(sock) == b"ok"
        peers = [s.getsockname() for s in (a, b, c)]
        records = srv.wait_for_connections(3)
    assert [r.index for r in records] == [2, 1, 0]
    assert [r.received for r in records] == [[b"2"], [b"1"], [b"0"]]
    assert srv.received == [b"2", b"1", b"0"]  # completion order
    assert [r.peer for r in records] == peers[::-1]
    assert all(r.outcome is not None for r in records)


def test_wait_for_connections_timeout_says_what_each_waits_for() -> None:
    with CommandServer([RECEIVE, "ok", 10], verbose=False) as srv, connect(srv.address) as c:
        c.sendall(b"hi")
        assert read_exactly(c, 2) == b"ok"  # the connection is now at step 2
        with pytest.raises(TimeoutError) as info:
            srv.wait_for_connections(2, timeout=0.05)
    message = str(info.value)
    assert "0 of 2 connections ended" in message
    assert "step 2 (10): waiting for data" in message
    assert "1 expected connections were never accepted" in message


def test_check_is_silent_when_all_is_well() -> None:
    with CommandServer([RECEIVE, "ok"], verbose=False) as srv:
        for _ in range(3):
            assert exchange(srv.address, b"?") == b"ok"
        srv.wait_for_connections(3)
        srv.check()
    srv.check()


# ---- clean EOF after a partial read ----------------------------------------------------------


def test_unread_request_bytes_still_give_a_clean_eof() -> None:
    """``[20, 'hello']`` against a 200-byte request: the client reads EOF, never a reset."""
    with CommandServer([20, "hello"], verbose=False) as srv, connect(srv.address) as c:
        c.sendall(b"x" * 20)
        assert read_to_eof(c) == b"hello"  # the script has ended
        c.sendall(b"y" * 180)  # arrives after the end: drained, not answered with RST
        c.shutdown(socket.SHUT_WR)
        assert read_to_eof(c) == b""


def test_unread_request_bytes_still_give_a_clean_eof_with_requests() -> None:
    with CommandServer([20, HTTP_OK], verbose=False) as srv:
        for _ in range(3):
            response = requests.post(srv.url, data=b"z" * 200, timeout=5)
            assert response.text == "hello"
        assert len(srv.wait_for_connections(3)) == 3
    srv.check()
