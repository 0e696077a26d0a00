"""FaultProxy: the pure fault policy on an injected clock, then real clients through real proxies
to real upstreams (http.server, CommandServer plain and TLS, redis-server when installed).

Nothing sleeps to synchronise: tests read to EOF, wait for records, gates or an upstream's own
events, and read the proxy's state only after an operation that guarantees it (``settle``: the
reactor ran a whole pass after what the proxy had to read). Only redis-server's start-up is
polled (bounded): a subprocess's readiness has no event. Hostile tests also check a canary: an
unrelated server on the same reactor still answers within a second.
"""

from __future__ import annotations

import contextlib
import errno
import http.client
import json
import resource
import selectors
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, cast

import pytest
import requests
from _proxying import live_clients, proxied, redis_client, settle, tls_exchange
from conftest import (
    MiB,
    WebServer,
    canary_answers,
    connect,
    pattern,
    read_exactly,
    read_to_eof,
    reset_close,
)

from selectserver import (
    HALF_CLOSE,
    HANGUP,
    RECEIVE,
    RESET,
    STALL,
    CommandServer,
    Gate,
    Outcome,
    RefusingServer,
)
from selectserver._faults import (
    MAX_BUFFERED,
    Abort,
    End,
    Flow,
    PassEnd,
    Send,
    Sleep,
    draw,
)
from selectserver._proxy import (
    READ_SIZE,
    Bandwidth,
    Chunk,
    FaultHandle,
    FaultProxy,
    Hold,
    Latency,
    LimitData,
    ProxyConnection,
    ProxyRecord,
    ResetPeer,
    Slicer,
    SlowClose,
    Timeout,
    load_recording,
)
from selectserver._recording import DEFAULT_MAX_RECORD, script_of

# ---- helpers -----------------------------------------------------------------------------------


def simulate(flow: Flow, start: float = 0.0, steps: int = 10_000) -> tuple[list[Any], Any]:
    """Run ``flow`` on a fake clock (its socket takes everything): ``[(time, bytes or End)]``
    and the action it stopped at (``Sleep(None)`` or ``Abort``)."""
    now: float = start
    out: list[tuple[float, bytes | End]] = []
    for _ in range(steps):
        action = flow.next_action(now)
        if isinstance(action, Send):
            out.append((round(now, 6), bytes(action.data)))
            flow.sent(len(action.data), now)
        elif isinstance(action, PassEnd):
            out.append((round(now, 6), action.end))
            flow.end_passed()
        elif isinstance(action, Sleep) and action.until is not None:
            now = action.until
        else:
            return out, action
    raise AssertionError("the flow never settled")


# ---- the faults' arguments ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("make", "error", "named"),
    [
        (lambda: Latency(-1), ValueError, "seconds"),
        (lambda: Latency("1"), TypeError, "seconds"),  # type: ignore[arg-type]
        (lambda: Latency(1, jitter=math_inf()), ValueError, "jitter"),
        (lambda: Latency(1, seed=1.5), TypeError, "seed"),  # type: ignore[arg-type]
        (lambda: Bandwidth(0), ValueError, "bytes_per_second"),
        (lambda: Slicer(0), ValueError, "average_size"),
        (lambda: Slicer(4, 4), ValueError, "size_variation"),
        (lambda: Slicer(4, delay=-1), ValueError, "delay"),
        (lambda: SlowClose(None), TypeError, "seconds"),  # type: ignore[arg-type]
        (lambda: Timeout(-1), ValueError, "seconds"),
        (lambda: ResetPeer(-1), ValueError, "after_bytes"),
        (lambda: LimitData(True), TypeError, "n"),
        (lambda: LimitData(1, then=STALL), ValueError, "then"),
        (lambda: Hold(direction="sideways"), ValueError, "direction"),  # type: ignore[arg-type]
        (lambda: FaultHandle("fault"), TypeError, "fault"),  # type: ignore[arg-type]
        (lambda: FaultHandle(Hold(), connections=["0"]), TypeError, "connections"),  # type: ignore[list-item]
        (lambda: FaultHandle(Hold(), connections=5), TypeError, "connections"),  # type: ignore[arg-type]
        (lambda: FaultHandle(Hold(), probability=1.5), ValueError, "probability"),
        (lambda: FaultHandle(Hold(), seed="x"), TypeError, "seed"),  # type: ignore[arg-type]
        (lambda: Latency(float("nan")), ValueError, "seconds"),
        (lambda: Latency(True), TypeError, "seconds"),
        (lambda: Latency(0.1, jitter=-0.1), ValueError, "jitter"),
        (lambda: Bandwidth(float("inf")), ValueError, "bytes_per_second"),
        (lambda: Bandwidth(-5), ValueError, "bytes_per_second"),
        (lambda: Slicer(1.5), TypeError, "average_size"),  # type: ignore[arg-type]
        (lambda: Slicer(4, -1), ValueError, "size_variation"),
        (lambda: Slicer(4, seed=None), TypeError, "seed"),  # type: ignore[arg-type]
        (lambda: SlowClose(-0.5), ValueError, "seconds"),
        (lambda: Timeout(float("nan")), ValueError, "seconds"),
        (lambda: Timeout("1"), TypeError, "seconds"),  # type: ignore[arg-type]
        (lambda: ResetPeer(1.5), TypeError, "after_bytes"),  # type: ignore[arg-type]
        (lambda: LimitData(-1), ValueError, "n"),
        (lambda: LimitData(1, then="RESET"), ValueError, "then"),  # type: ignore[arg-type]
        (lambda: Latency(1, direction="down"), ValueError, "direction"),  # type: ignore[arg-type]
        (lambda: FaultHandle(Hold(), probability=float("nan")), ValueError, "probability"),
        (lambda: FaultHandle(Hold(), probability=True), TypeError, "probability"),
        (lambda: FaultHandle(Hold(), connections=[-1]), TypeError, "connections"),
        (lambda: FaultHandle(Hold(), connections="01"), TypeError, "connections"),  # type: ignore[arg-type]
        (lambda: FaultHandle(Hold, connections=None), TypeError, "fault"),  # type: ignore[arg-type]
    ],
)
def test_bad_arguments_name_themselves(
    make: Callable[[], object], error: type[Exception], named: str
) -> None:
    with pytest.raises(error, match=named):
        make()


def math_inf() -> float:
    return float("inf")


def test_bad_proxy_arguments_fail_before_binding() -> None:
    with pytest.raises(TypeError, match="upstream"):
        FaultProxy(123)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="upstream port"):
        FaultProxy(("127.0.0.1", 0))
    with pytest.raises(ValueError, match="timeout"):
        FaultProxy(("127.0.0.1", 9), timeout=-1)
    with pytest.raises(ValueError, match="on_upstream_error"):
        FaultProxy(("127.0.0.1", 9), on_upstream_error="explode")
    with FaultProxy(("127.0.0.1", 9), verbose=False) as proxy:
        with pytest.raises(TypeError, match="fault"):
            proxy.add("slow")  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="probability"):
            proxy.add(Hold(), probability=-0.1)
        with pytest.raises(TypeError, match="remove"):
            proxy.remove(Hold())  # type: ignore[arg-type]
        assert proxy.faults == []


# ---- the pure policy, on a fake clock ----------------------------------------------------------


def test_latency_counts_from_each_read_and_keeps_order() -> None:
    flow = Flow("downstream")
    assert flow.add("k", Latency(0.1), 0.0)
    flow.feed(b"a", 0.0)
    flow.feed(b"b", 0.05)
    out, last = simulate(flow)
    assert out == [(0.1, b"a"), (0.15, b"b")]  # 0.1 after each read: the delays do not add up
    assert last == Sleep(None)


def test_a_fault_on_the_other_direction_does_nothing() -> None:
    flow = Flow("downstream")
    assert not flow.add("k", Latency(5, direction="upstream"), 0.0)
    assert flow.add("k", Latency(0.5, direction="both"), 0.0)
    flow.feed(b"x", 0.0)
    assert simulate(flow)[0] == [(0.5, b"x")]


def test_latency_jitter_keeps_order_and_replays() -> None:
    def run() -> list[Any]:
        flow = Flow("upstream")
        flow.add("k", Latency(0.1, jitter=0.09, seed=5, direction="upstream"), 0.0)
        for i in range(30):
            flow.feed(bytes([i]), i * 0.01)
        return simulate(flow)[0]

    first = run()
    assert [data for _, data in first] == [bytes([i]) for i in range(30)]
    times = [at for at, _ in first]
    assert times == sorted(times)
    for i, at in enumerate(times):
        read_at = i * 0.01
        assert at >= read_at + 0.01 - 1e-9  # never earlier than seconds - jitter
        assert at <= read_at + 0.19 + 1e-9 or at == times[i - 1]  # later only to keep order
    assert len({round(at - i * 0.01, 6) for i, at in enumerate(times)}) > 3  # jittered
    assert run() == first


def test_bandwidth_paces_and_its_removal_takes_effect_at_once() -> None:
    flow = Flow("downstream")
    flow.add("bw", Bandwidth(1000), 0.0)
    flow.feed(b"x" * 100, 0.0)
    action = flow.next_action(0.0)
    assert isinstance(action, Send)
    assert len(action.data) == 10
    flow.sent(10, 0.0)
    assert flow.next_action(0.0) == Sleep(0.01)
    out, _ = simulate(flow, start=0.01)
    assert [len(data) for _, data in out] == [10] * 9
    assert out[-1][0] == pytest.approx(0.09)
    flow.feed(b"y" * 100, 1.0)
    flow.sent(len(cast(Send, flow.next_action(1.0)).data), 1.0)
    flow.remove("bw")
    assert simulate(flow, start=1.0)[0] == [(1.0, b"y" * 90)]


def test_slicer_cuts_each_chunk_with_a_delay_after_each_piece() -> None:
    flow = Flow("downstream")
    flow.add("s", Slicer(4, delay=0.05), 0.0)
    flow.feed(b"abcdefghij", 0.0)
    flow.feed(b"kl", 0.0)
    out, _ = simulate(flow)
    assert out == [(0.0, b"abcd"), (0.05, b"efgh"), (0.1, b"ij"), (0.15, b"kl")]


def test_a_new_slicer_sizes_the_next_piece() -> None:
    flow = Flow("downstream")
    flow.add("big", Slicer(6), 0.0)
    flow.feed(b"abcdefghij", 0.0)
    action = flow.next_action(0.0)
    assert isinstance(action, Send)
    flow.sent(2, 0.0)  # 2 bytes of a 6-byte piece went
    flow.add("small", Slicer(3), 0.0)
    assert [data for _, data in simulate(flow)[0]] == [b"cde", b"fgh", b"ij"]


def test_slicer_sizes_vary_within_bounds_and_replay() -> None:
    def sizes() -> list[int]:
        flow = Flow("downstream")
        flow.add("s", Slicer(10, size_variation=5, seed=3), 0.0)
        flow.feed(bytes(1000), 0.0)
        return [len(data) for _, data in simulate(flow)[0]]

    first = sizes()
    assert sum(first) == 1000
    assert all(5 <= size <= 15 for size in first[:-1])
    assert len(set(first)) > 3
    assert sizes() == first


def test_hold_keeps_everything_until_removed() -> None:
    flow = Flow("downstream")
    flow.add("h", Hold(), 0.0)
    flow.feed(b"one", 0.0)
    flow.feed_end(End.EOF, 0.1)
    assert simulate(flow) == ([], Sleep(None))
    assert flow.buffered == 3
    flow.remove("h")
    assert simulate(flow, start=2.0)[0] == [(2.0, b"one"), (2.0, End.EOF)]
    assert flow.finished


def test_timeout_drops_then_closes() -> None:
    flow = Flow("downstream")
    flow.add("t", Timeout(1.0), 0.0)
    flow.feed(b"lost", 0.5)
    assert flow.dropped == 4
    assert flow.next_action(0.5) == Sleep(1.0)
    action = flow.next_action(1.0)
    assert isinstance(action, Abort)
    assert not action.reset


def test_timeout_holds_ends_and_its_removal_resumes_the_flow() -> None:
    flow = Flow("upstream")
    flow.add("t", Timeout(direction="upstream"), 0.0)
    flow.feed(b"lost", 0.0)
    flow.feed_end(End.EOF, 0.0)
    assert simulate(flow) == ([], Sleep(None))
    flow.remove("t")
    assert simulate(flow)[0] == [(0.0, End.EOF)]
    assert flow.dropped == 4


def test_limit_data_cuts_the_chunk_that_reaches_the_limit() -> None:
    flow = Flow("downstream")
    flow.add("l", LimitData(5), 0.0)
    flow.feed(b"abcdefgh", 0.0)
    out, last = simulate(flow)
    assert out == [(0.0, b"abcde")]
    assert isinstance(last, Abort)
    assert not last.reset


def test_limit_zero_and_reset_peer_trigger_on_the_first_chunk() -> None:
    flow = Flow("downstream")
    flow.add("r", ResetPeer(), 0.0)
    assert flow.next_action(0.0) == Sleep(None)  # nothing to pass, nothing to reset yet
    flow.feed(b"reply", 0.0)
    out, last = simulate(flow)
    assert out == []
    assert isinstance(last, Abort)
    assert last.reset


def test_counts_start_when_the_fault_arrives() -> None:
    flow = Flow("downstream")
    flow.feed(b"before", 0.0)
    simulate(flow)
    flow.add("r", ResetPeer(after_bytes=3), 1.0)
    flow.feed(b"after", 1.0)
    out, last = simulate(flow, start=1.0)
    assert out == [(1.0, b"aft")]
    assert isinstance(last, Abort)
    assert last.reset


def test_slow_close_passes_the_eof_late() -> None:
    flow = Flow("downstream")
    flow.add("c", SlowClose(0.5), 0.0)
    flow.feed(b"x", 0.0)
    flow.feed_end(End.EOF, 0.1)
    assert simulate(flow)[0] == [(0.0, b"x"), (0.6, End.EOF)]


def test_a_reset_passes_after_what_was_sent_before_it() -> None:
    flow = Flow("upstream")
    flow.add("l", Latency(0.2, direction="upstream"), 0.0)
    flow.feed(b"x", 0.0)
    flow.feed_end(End.RESET, 0.0)
    assert simulate(flow)[0] == [(0.2, b"x"), (0.2, End.RESET)]


def test_backpressure_bounds_what_a_flow_holds() -> None:
    flow = Flow("downstream")
    flow.add("h", Hold(), 0.0)
    while flow.wants_data:
        flow.feed(bytes(READ_SIZE), 0.0)
    assert MAX_BUFFERED <= flow.buffered < MAX_BUFFERED + READ_SIZE
    flow.remove("h")
    flow.sent(len(cast(Send, flow.next_action(0.0)).data), 0.0)
    assert flow.wants_data


def test_draws_depend_on_seed_and_index_only() -> None:
    first = [draw(0.5, 7, index) for index in range(200)]
    assert first == [draw(0.5, 7, index) for index in range(200)]
    assert [draw(0.5, 7, index) for index in reversed(range(200))] == first[::-1]
    assert 60 < sum(first) < 140
    assert first != [draw(0.5, 8, index) for index in range(200)]
    assert all(draw(1.0, 7, index) for index in range(10))
    assert not any(draw(0.0, 7, index) for index in range(10))


def test_handles_target_indices_or_a_predicate() -> None:
    record = ProxyRecord(3, ("127.0.0.1", 1))
    assert FaultHandle(Hold(), connections=[0, 3]).selects(3, record)
    assert not FaultHandle(Hold(), connections=(0, 1)).selects(3, record)
    assert FaultHandle(Hold(), connections=lambda r: r.index == 3).selects(3, record)
    assert FaultHandle(Hold()).selects(99, record)


# ---- scripts from recordings -------------------------------------------------------------------


def chunks(*pairs: tuple[float, bytes]) -> list[Chunk]:
    return [Chunk(at, data) for at, data in pairs]


def test_script_replays_a_server_that_speaks_first() -> None:
    up = chunks((0.1, b"EHLO x\r\n"), (0.3, b"QUIT\r\n"))
    down = chunks((0.0, b"220 hi\r\n"), (0.2, b"250 ok\r\n"), (0.4, b"221 bye\r\n"))
    assert script_of(up, down, "eof") == [
        b"220 hi\r\n",
        8,
        b"250 ok\r\n",
        6,
        b"221 bye\r\n",
        HANGUP,
    ]


def test_script_counts_bytes_by_position_and_joins_reply_runs() -> None:
    up = chunks((0.0, b"GET"), (0.01, b"\r\n"), (0.3, b"GET\r\n"), (0.6, b"bye"))
    down = chunks((0.1, b"one"), (0.2, b"+1"), (0.4, b"two"))
    assert script_of(up, down, "reset") == [5, b"one+1", 5, b"two", 3, RESET]
    assert script_of([], [], None) == [HANGUP]


# ---- a proxy in front of the module's http.server ----------------------------------------------


@pytest.fixture
def web_proxy(web: WebServer) -> Iterator[FaultProxy]:
    with FaultProxy(web.address, verbose=False) as proxy:
        yield proxy
        proxy.check()


# ---- passing bytes on faithfully ---------------------------------------------------------------


def test_passes_bytes_both_ways_and_records_them() -> None:
    with proxied([RECEIVE, "hello", RECEIVE, "again"]) as (server, proxy):
        assert proxy.upstream == f"{server.host}:{server.port}"
        assert proxy.url == f"http://127.0.0.1:{proxy.port}"
        with connect(proxy.address) as sock:
            sock.sendall(b"one")
            assert read_exactly(sock, 5) == b"hello"
            sock.sendall(b"two")
            assert read_to_eof(sock) == b"again"
            peer = sock.getsockname()
        (record,) = proxy.wait_for_connections(1)
        (served,) = server.wait_for_connections(1)
        proxy.check()
    assert record.peer == peer
    assert record.outcome is Outcome.COMPLETED
    assert (record.client_end, record.server_end) == ("eof", "eof")
    assert [c.data for c in record.upstream] == [b"one", b"two"]
    assert [c.data for c in record.downstream] == [b"hello", b"again"]
    ats = sorted([c.at for c in record.upstream] + [c.at for c in record.downstream])
    assert next(c.at for c in record.upstream) < record.downstream[0].at < record.upstream[1].at
    assert len(set(ats)) == 4
    at, data = record.upstream[0]  # a pair too
    assert (at, data) == (record.upstream[0].at, b"one")
    assert record.client_sent == b"onetwo"
    assert record.server_sent == b"helloagain"
    assert (record.passed_upstream, record.passed_downstream) == (6, 10)
    assert served.outcome is Outcome.COMPLETED  # a FIN, never an RST
    assert served.peer == record.via
    assert proxy.to_script(0) == [3, b"hello", 3, b"again", HANGUP]


def test_requests_through_the_proxy(web: WebServer, web_proxy: FaultProxy) -> None:
    with requests.Session() as session:
        for _ in range(3):
            response = session.get(f"{web_proxy.url}/bytes/100000", timeout=5)
            assert response.content == pattern(100000)
    record = web_proxy.connections[0]
    assert len(web_proxy.connections) == 1  # keep-alive: one proxied connection
    assert record.client_sent.count(b"GET /bytes/100000") == 3


def test_half_close_from_the_client_reaches_the_server_and_the_reply_comes_back() -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    result: list[bytes] = []

    def serve() -> None:
        conn, _ = listener.accept()
        with conn:
            conn.settimeout(5)
            data = read_to_eof(conn)  # ends only at the client's FIN
            result.append(data)
            conn.sendall(b"got %d bytes" % len(data))

    thread = threading.Thread(target=serve)
    thread.start()
    try:
        with FaultProxy(listener.getsockname(), verbose=False) as proxy:
            with connect(proxy.address) as sock:
                sock.sendall(b"abc")
                sock.shutdown(socket.SHUT_WR)
                assert read_to_eof(sock) == b"got 3 bytes"
            (record,) = proxy.wait_for_connections(1)
    finally:
        thread.join(5)
        listener.close()
    assert result == [b"abc"]
    assert record.outcome is Outcome.COMPLETED


def test_half_close_from_the_server_reaches_the_client_which_still_sends() -> None:
    with proxied([RECEIVE, "hello", HALF_CLOSE, RECEIVE]) as (server, proxy):
        with connect(proxy.address) as sock:
            sock.sendall(b"first")
            assert read_to_eof(sock) == b"hello"
            sock.sendall(b"more")
            (served,) = server.wait_for_connections(1)
        (record,) = proxy.wait_for_connections(1)
    assert served.received == [b"first", b"more"]
    assert served.half_closed
    assert record.server_end == "eof"
    assert record.outcome is Outcome.COMPLETED


def test_a_server_reset_reaches_the_client_as_a_reset() -> None:
    with proxied([RECEIVE, "partial", RESET]) as (_, proxy):
        with connect(proxy.address) as sock:
            sock.sendall(b"hi")
            with pytest.raises(ConnectionResetError):
                read_to_eof(sock)
        (record,) = proxy.wait_for_connections(1)
    assert record.server_end == "reset"
    assert record.client_end == "reset by proxy"
    assert record.outcome is Outcome.PEER_RESET
    assert proxy.to_script(0) == [2, b"partial", RESET]


def test_a_client_reset_reaches_the_server_as_a_reset() -> None:
    with proxied([RECEIVE, "a", RECEIVE]) as (server, proxy):
        sock = socket.create_connection(proxy.address, timeout=5)
        sock.sendall(b"x")
        assert read_exactly(sock, 1) == b"a"
        reset_close(sock)
        (served,) = server.wait_for_connections(1)
        (record,) = proxy.wait_for_connections(1)
    assert served.outcome is Outcome.PEER_RESET
    assert (record.client_end, record.server_end) == ("reset", "reset by proxy")


def test_tls_passes_through_as_ciphertext() -> None:
    pytest.importorskip("trustme")
    with proxied([RECEIVE, "secret reply"], tls=True) as (server, proxy):
        assert tls_exchange(server, proxy.address, b"secret request") == b"secret reply"
        (record,) = proxy.wait_for_connections(1)
        server.check()
    assert record.client_sent[:1] == b"\x16"  # a TLS handshake record
    assert b"secret request" not in record.client_sent
    assert b"secret reply" not in record.server_sent


def test_unix_sockets_on_either_side(tmp_path: Path) -> None:
    upstream, listening = str(tmp_path / "upstream.sock"), str(tmp_path / "proxy.sock")
    with (
        CommandServer([RECEIVE, "over unix"], path=upstream, verbose=False) as server,
        FaultProxy(server.address, verbose=False) as tcp_proxy,
        FaultProxy(upstream, path=listening, verbose=False) as unix_proxy,
    ):
        with connect(tcp_proxy.address) as sock:
            sock.sendall(b"hi")
            assert read_to_eof(sock) == b"over unix"
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(5)
            sock.connect(unix_proxy.address)
            sock.sendall(b"hi")
            assert read_to_eof(sock) == b"over unix"
        unix_proxy.down()
        with socket.socket(socket.AF_UNIX) as sock, pytest.raises(ConnectionRefusedError):
            sock.connect(listening)
        unix_proxy.up()
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(5)
            sock.connect(listening)
            sock.sendall(b"hi")
            assert read_to_eof(sock) == b"over unix"
        records = tcp_proxy.wait_for_connections(1) + unix_proxy.wait_for_connections(2)
    assert {record.outcome for record in records} == {Outcome.COMPLETED}
    assert not Path(listening).exists()  # removed on close


@pytest.mark.parametrize("mode", ["reset", "close"])
def test_an_unreachable_upstream(mode: str) -> None:
    with (
        RefusingServer() as dead,
        FaultProxy(dead.address, verbose=False, on_upstream_error=mode) as proxy,
    ):
        start = time.monotonic()
        if mode == "reset":
            # The RST may come before connect() returns: the client's connect or recv says so.
            with pytest.raises(ConnectionResetError), connect(proxy.address) as sock:
                sock.recv(10)
        else:
            with connect(proxy.address) as sock:
                assert sock.recv(10) == b""
        assert time.monotonic() - start < 1.0
        (record,) = proxy.wait_for_connections(1)
        proxy.check()  # not a failure of the proxy: the record says why
    assert record.outcome is (Outcome.RESET if mode == "reset" else Outcome.HUNG_UP)
    assert record.server_end is not None
    assert record.server_end.startswith("error: connect failed: ConnectionRefusedError")
    assert record.detail is not None
    assert "unreachable" in record.detail


def test_down_refuses_and_keeps_the_port_then_up_serves_again() -> None:
    with proxied([RECEIVE, "ok"]) as (_, proxy):
        proxy.down()
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(proxy.address, timeout=5).close()
        with pytest.raises(OSError, match="in use"):
            socket.create_server(proxy.address).close()
        proxy.up()
        with connect(proxy.address) as sock:
            sock.sendall(b"hi")
            assert read_to_eof(sock) == b"ok"


def test_an_idle_connection_times_out() -> None:
    with proxied([RECEIVE, STALL], proxy={"timeout": 0.3}) as (_, proxy):
        with connect(proxy.address) as sock:
            sock.sendall(b"hi")
            start = time.monotonic()
            assert read_to_eof(sock) == b""
            assert 0.25 < time.monotonic() - start < 3
        (record,) = proxy.wait_for_connections(1)
    assert record.outcome is Outcome.TIMED_OUT


def test_close_ends_live_connections() -> None:
    with CommandServer([RECEIVE, Gate("received"), STALL], verbose=False) as server:
        proxy = FaultProxy(server.address, verbose=False)
        with connect(proxy.address) as sock:
            sock.sendall(b"hi")
            server.gate("received").wait().resume()  # the proxy passed "hi" on: it is live
            # Same reactor: the proxy's pass that sent "hi" updated its record before the
            # server's read.
            assert proxy.connections[0].passed_upstream == 2
            proxy.close()
            assert read_to_eof(sock) == b""
        proxy.close()  # idempotent
    assert proxy.connections[0].outcome is Outcome.SERVER_CLOSED
    with pytest.raises(RuntimeError):
        proxy.add(Hold())


def test_check_reports_internal_errors() -> None:
    with proxied([RECEIVE, "ok"]) as (_, proxy):
        proxy.add(Hold(), connections=lambda record: 1 // 0)
        with connect(proxy.address) as sock:
            sock.sendall(b"hi")
            assert read_to_eof(sock) == b"ok"  # the fault did not apply; the bytes flowed
        proxy.wait_for_connections(1)
        with pytest.raises(AssertionError, match="ZeroDivisionError"):
            proxy.check()


def test_a_failure_while_a_side_is_served_costs_only_its_connection(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Each socket's readiness reaches its side; a raise there ends that connection as an
    ERROR (both sockets closed), and the proxy, later connections and a canary go on."""
    real_read = ProxyConnection._read
    failures = iter([RuntimeError("injected")])

    def read_once_failing(self: ProxyConnection, *args: Any) -> bytes | None:
        failure = next(failures, None)
        if failure is not None and self.record.index == 0:
            raise failure
        return real_read(self, *args)

    monkeypatch.setattr(ProxyConnection, "_read", read_once_failing)
    with proxied([RECEIVE, "ok"]) as (_, proxy):
        with connect(proxy.address) as sock:
            sock.sendall(b"hi")
            try:
                assert read_to_eof(sock) == b""
            except ConnectionResetError:
                pass  # closed with the client's bytes unread: RST
        canary_answers()
        with connect(proxy.address) as sock:
            sock.sendall(b"hi")
            assert read_to_eof(sock) == b"ok"
        first, second = proxy.wait_for_connections(2)
        assert first.outcome is Outcome.ERROR
        assert "RuntimeError: injected" in (first.failure or "")
        assert second.outcome is Outcome.COMPLETED
        with pytest.raises(AssertionError, match="injected"):
            proxy.check()


# ---- faults against http.server, with requests and http.client ---------------------------------


@pytest.mark.parametrize("direction", ["downstream", "upstream"])
def test_latency_with_requests(web_proxy: FaultProxy, direction: str) -> None:
    with web_proxy.fault(Latency(0.3, direction=direction)):  # type: ignore[arg-type]
        start = time.monotonic()
        response = requests.get(f"{web_proxy.url}/bytes/1000", timeout=5)
        elapsed = time.monotonic() - start
    assert response.content == pattern(1000)
    assert 0.3 <= elapsed < 0.6 + 0.5  # the chunks' delays ran side by side


def test_bandwidth_with_requests(web_proxy: FaultProxy) -> None:
    with web_proxy.fault(Bandwidth(100_000)):
        start = time.monotonic()
        response = requests.get(f"{web_proxy.url}/bytes/50000", timeout=5)
        elapsed = time.monotonic() - start
    assert response.content == pattern(50000)
    assert 0.4 < elapsed < 3


def test_bandwidth_upstream() -> None:
    with proxied([20_000, "ok"]) as (_, proxy):
        proxy.add(Bandwidth(50_000, direction="upstream"))
        start = time.monotonic()
        with connect(proxy.address) as sock:
            sock.sendall(bytes(20_000))
            assert read_to_eof(sock) == b"ok"
        assert 0.3 < time.monotonic() - start < 3


def test_slicer_with_requests_and_raw_reads(web_proxy: FaultProxy) -> None:
    with web_proxy.fault(Slicer(7, size_variation=3, delay=0.001, direction="both")):
        response = requests.get(f"{web_proxy.url}/bytes/300", timeout=5)
        assert response.content == pattern(300)
    with proxied([RECEIVE, b"y" * 100]) as (_, proxy):
        proxy.add(Slicer(10, delay=0.02))
        with connect(proxy.address) as sock:
            sock.sendall(b"go")
            start = time.monotonic()
            reads = [sock.recv(4096) for _ in range(20)]
            assert time.monotonic() - start >= 0.15
    assert b"".join(reads) == b"y" * 100
    assert len([piece for piece in reads if piece]) >= 3


def test_timeout_downstream_is_a_read_timeout(web: WebServer, web_proxy: FaultProxy) -> None:
    hits = len(web.hits)
    web_proxy.add(Timeout())
    with pytest.raises(requests.exceptions.ReadTimeout):
        requests.get(f"{web_proxy.url}/timeout-downstream", timeout=0.5)
    web.wait_answered("/timeout-downstream")
    settle(web_proxy)  # the proxy has read the answer
    assert len(web.hits) == hits + 1  # the server answered; the answer was dropped
    record = web_proxy.connections[0]
    assert record.dropped > 0
    assert record.passed_downstream == 0
    assert not record.ended  # the server's EOF waits for the Timeout's removal too


def test_timeout_upstream_never_reaches_the_server(web: WebServer, web_proxy: FaultProxy) -> None:
    hits = len(web.hits)
    web_proxy.add(Timeout(direction="upstream"))
    with pytest.raises(requests.exceptions.ReadTimeout):
        requests.get(f"{web_proxy.url}/", timeout=0.5)
    assert len(web.hits) == hits


def test_timeout_with_seconds_closes_the_connection(web_proxy: FaultProxy) -> None:
    web_proxy.add(Timeout(0.2))
    start = time.monotonic()
    with pytest.raises(requests.exceptions.ConnectionError):
        requests.get(f"{web_proxy.url}/", timeout=5)
    assert 0.15 < time.monotonic() - start < 2
    (record,) = web_proxy.wait_for_connections(1)
    assert record.outcome is Outcome.HUNG_UP


def test_removing_a_timeout_resumes_the_flow() -> None:
    with proxied([RECEIVE, "lost", Gate("sent"), RECEIVE, "found"]) as (server, proxy):
        handle = proxy.add(Timeout())
        with connect(proxy.address) as sock:
            sock.sendall(b"1")
            server.gate("sent").wait().resume()  # the server sent "lost"
            settle(proxy)  # the proxy has read it
            assert proxy.connections[0].dropped == 4  # the reply was dropped
            proxy.remove(handle)
            sock.sendall(b"2")
            assert read_to_eof(sock) == b"found"


def test_limit_data_truncates_the_body(web_proxy: FaultProxy) -> None:
    web_proxy.add(LimitData(300))
    conn = http.client.HTTPConnection(web_proxy.host, web_proxy.port, timeout=5)
    try:
        conn.request("GET", "/bytes/1000")
        response = conn.getresponse()
        with pytest.raises(http.client.IncompleteRead) as excinfo:
            response.read()
    finally:
        conn.close()
    header_size = 300 - len(excinfo.value.partial)
    assert 50 < header_size < 300
    (record,) = web_proxy.wait_for_connections(1)
    assert record.passed_downstream == 300
    assert record.outcome is Outcome.HUNG_UP


def test_limit_data_then_reset(web_proxy: FaultProxy) -> None:
    web_proxy.add(LimitData(300, then=RESET))
    conn = http.client.HTTPConnection(web_proxy.host, web_proxy.port, timeout=5)
    try:
        conn.request("GET", "/bytes/1000")
        with pytest.raises(ConnectionResetError):
            conn.getresponse().read()
    finally:
        conn.close()
    (record,) = web_proxy.wait_for_connections(1)
    assert record.outcome is Outcome.RESET


def test_reset_peer_downstream_after_the_server_acted(
    web: WebServer, web_proxy: FaultProxy
) -> None:
    hits = len(web.hits)
    web_proxy.add(ResetPeer())
    with pytest.raises(requests.exceptions.ConnectionError):
        requests.get(f"{web_proxy.url}/", timeout=5)
    assert len(web.hits) == hits + 1  # the request was served: its answer was lost
    (record,) = web_proxy.wait_for_connections(1)
    assert (record.client_end, record.server_end) == ("reset by proxy", "reset by proxy")


def test_reset_peer_upstream_before_the_server_saw_anything(
    web: WebServer, web_proxy: FaultProxy
) -> None:
    hits = len(web.hits)
    web_proxy.add(ResetPeer(direction="upstream"))
    with pytest.raises(requests.exceptions.ConnectionError):
        requests.get(f"{web_proxy.url}/", timeout=5)
    web_proxy.wait_for_connections(1)
    assert len(web.hits) == hits


def test_hold_then_release(web: WebServer, web_proxy: FaultProxy) -> None:
    handle = web_proxy.add(Hold())
    result: list[requests.Response] = []
    thread = threading.Thread(
        target=lambda: result.append(requests.get(f"{web_proxy.url}/hold", timeout=5))
    )
    thread.start()
    try:
        web.wait_answered("/hold")
        settle(web_proxy)  # the proxy has read the answer
        record = web_proxy.connections[0]
        assert record.downstream  # held, not passed
        assert record.passed_downstream == 0
        assert not result
        web_proxy.remove(handle)
    finally:
        thread.join(5)
    assert result[0].text == "hello /hold"
    assert record.passed_downstream > 0


def test_slow_close_downstream_and_upstream() -> None:
    with (
        proxied([RECEIVE, "hi"]) as (server, proxy),
        proxy.fault(SlowClose(0.3)),
        connect(proxy.address) as sock,
    ):
        sock.sendall(b"x")
        assert read_exactly(sock, 2) == b"hi"
        start = time.monotonic()
        assert read_to_eof(sock) == b""
        assert time.monotonic() - start >= 0.25
    with proxied([RECEIVE, "hi", RECEIVE]) as (server, proxy):
        proxy.add(SlowClose(0.3, direction="upstream"))
        with connect(proxy.address) as sock:
            sock.sendall(b"x")
            assert read_exactly(sock, 2) == b"hi"
            sock.shutdown(socket.SHUT_WR)
            shut_at = time.monotonic()
            (served,) = server.wait_for_connections(1)
    assert served.ended_at is not None
    assert served.ended_at - shut_at >= 0.25


# ---- faults against redis-server ---------------------------------------------------------------


def _redis_errors() -> tuple[type[Exception], type[Exception]]:
    import redis

    return redis.exceptions.ConnectionError, redis.exceptions.TimeoutError


@pytest.mark.parametrize(
    ("fault", "expect"),
    [
        (Timeout(), "timeout"),
        (Timeout(direction="upstream"), "timeout"),
        (Hold(), "timeout"),
        (Hold(direction="upstream"), "timeout"),
        (ResetPeer(), "connection"),
        (ResetPeer(direction="upstream"), "connection"),
        (LimitData(2), "connection"),
        (LimitData(2, direction="upstream"), "connection"),
        (Timeout(0.1, direction="both"), "connection"),
        (Latency(0.05, jitter=0.04, direction="both"), None),
        (Bandwidth(5000, direction="both"), None),
        (Slicer(2, size_variation=1, delay=0.001, direction="both"), None),
        (SlowClose(0.5, direction="both"), None),
    ],
    ids=repr,
)
def test_redis_faults(redis_address: tuple[str, int], fault: Any, expect: str | None) -> None:
    connection_error, timeout_error = _redis_errors()
    with FaultProxy(redis_address, verbose=False) as proxy:
        proxy.add(fault)
        client = redis_client(proxy.address, timeout=0.5)
        try:
            if expect is None:
                assert client.set("fault-key", "value")
                assert client.get("fault-key") == b"value"
                assert client.ping()
            else:
                error = timeout_error if expect == "timeout" else connection_error
                with pytest.raises(error):
                    client.ping()
        finally:
            client.close()
        proxy.check()
        assert proxy.connections[0].faults == [fault]


def test_redis_first_attempt_fails_and_the_retry_passes(redis_address: tuple[str, int]) -> None:
    connection_error, _ = _redis_errors()
    with FaultProxy(redis_address, verbose=False) as proxy:
        proxy.add(ResetPeer(), connections=[0])
        client = redis_client(proxy.address)
        try:
            with pytest.raises(connection_error):
                client.ping()
            assert client.ping()
        finally:
            client.close()
        first, second = proxy.connections[:2]
    assert first.faults == [ResetPeer()]
    assert second.faults == []


def test_probability_with_a_seed_makes_the_same_choices_twice() -> None:
    def run() -> tuple[set[int], set[int]]:
        with proxied([RECEIVE, "ok"]) as (_, proxy):
            proxy.add(ResetPeer(), probability=0.5, seed=11)
            failed = set()
            for index in range(16):
                with connect(proxy.address) as sock:
                    sock.sendall(b"hi")
                    try:
                        assert read_to_eof(sock) == b"ok"
                    except ConnectionResetError:
                        failed.add(index)
            drawn = {record.index for record in proxy.connections if record.faults}
        return failed, drawn

    failed, drawn = run()
    assert failed == drawn == {index for index in range(16) if draw(0.5, 11, index)}
    assert 0 < len(failed) < 16
    assert run() == (failed, drawn)


def test_a_fault_added_while_100_connections_are_live() -> None:
    with (
        proxied([RECEIVE, "a", RECEIVE, "b"]) as (_, proxy),
        live_clients(proxy, 100) as socks,
    ):
        fault = LimitData(0)
        proxy.add(fault)  # in effect on every live connection when it returns
        for sock in socks:
            sock.sendall(b"2")
        for sock in socks:
            assert read_to_eof(sock) == b""  # the "b" did not pass
        records = proxy.wait_for_connections(100)
        canary_answers()
    assert all(record.faults == [fault] for record in records)
    assert all(record.outcome is Outcome.HUNG_UP for record in records)


def test_clear_and_the_context_manager_remove_faults() -> None:
    with proxied([RECEIVE, "ok"]) as (_, proxy):
        with proxy.fault(Hold()) as handle:
            assert proxy.faults == [handle]
            proxy.add(Timeout())
            proxy.clear()
            assert proxy.faults == []
        assert proxy.faults == []
        with connect(proxy.address) as sock:
            sock.sendall(b"hi")
            assert read_to_eof(sock) == b"ok"


# ---- record and replay -------------------------------------------------------------------------


def redis_session(client: Any) -> list[object]:
    return [
        client.delete("replay-counter"),
        client.set("replay-key", "v1"),
        client.get("replay-key"),
        client.get("replay-key"),  # an identical request
        client.ping(),
        client.incr("replay-counter"),
    ]


def test_record_a_redis_session_and_replay_it(
    redis_address: tuple[str, int], tmp_path: Path
) -> None:
    path = tmp_path / "redis.json"
    with FaultProxy(redis_address, verbose=False) as proxy:
        client = redis_client(proxy.address)
        recorded = redis_session(client)
        client.close()
        proxy.wait_for_connections(1)
        proxy.save(path)
    document = json.loads(path.read_text())
    assert (document["format"], document["version"]) == ("selectserver-recording", 1)
    assert "PING" in "".join(chunk["data"] for chunk in document["connections"][0]["upstream"])
    with CommandServer(scripts=load_recording(path), verbose=False) as replay:
        client = redis_client(replay.address)
        replayed = redis_session(client)
        client.close()
        replay.wait_for_connections(1)
        replay.check()
    assert replayed == recorded
    assert recorded[2:] == [b"v1", b"v1", True, 1]


def test_record_a_server_that_speaks_first_and_replay_it(tmp_path: Path) -> None:
    script = ["220 hello\r\n", RECEIVE, "250 ok\r\n", RECEIVE, "221 bye\r\n"]
    path = tmp_path / "smtp.json"
    with proxied(script) as (_, proxy):
        assert smtp_like(proxy.address) == b"220 hello\r\n250 ok\r\n221 bye\r\n"
        proxy.wait_for_connections(1)
        proxy.save(path)
        assert proxy.to_script(0) == [
            b"220 hello\r\n",
            6,
            b"250 ok\r\n",
            6,
            b"221 bye\r\n",
            HANGUP,
        ]
    with CommandServer(scripts=load_recording(path), verbose=False) as replay:
        assert smtp_like(replay.address) == b"220 hello\r\n250 ok\r\n221 bye\r\n"


def smtp_like(address: tuple[str, int]) -> bytes:
    with connect(address) as sock:
        replies = read_exactly(sock, 11)
        sock.sendall(b"HELO\r\n")
        replies += read_exactly(sock, 8)
        sock.sendall(b"QUIT\r\n")
        return replies + read_to_eof(sock)


def test_binary_bytes_survive_the_recording_file(tmp_path: Path) -> None:
    everything = bytes(range(256))
    with proxied([256, everything]) as (_, proxy):
        with connect(proxy.address) as sock:
            sock.sendall(everything[::-1])
            assert read_to_eof(sock) == everything
        proxy.wait_for_connections(1)
        proxy.save(tmp_path / "binary.json")
    assert (tmp_path / "binary.json").read_text().isascii()
    assert load_recording(tmp_path / "binary.json") == [[256, everything, HANGUP]]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("not json", "not JSON"),
        ('{"format": "other"}', "not a selectserver-recording"),
        ('{"format": "selectserver-recording", "version": 2}', "version 2"),
        ('{"format": "selectserver-recording", "version": 1, "connections": []}', "no conn"),
        (
            '{"format": "selectserver-recording", "version": 1, "connections": '
            '[{"upstream": [{"at": 0, "data": "\\u0100"}], "downstream": []}]}',
            "U\\+00FF",
        ),
        (
            '{"format": "selectserver-recording", "version": 1, "connections": '
            '[{"upstream": [{"data": "x"}], "downstream": []}]}',
            r"upstream\[0\]",
        ),
    ],
)
def test_bad_recordings_are_rejected(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=message):
        load_recording(path)


def test_an_incomplete_record_keeps_the_first_bytes_and_cannot_become_a_script() -> None:
    with proxied([RECEIVE, "x" * 100, RECEIVE, "y"], proxy={"max_record": 10}) as (_, proxy):
        with connect(proxy.address) as sock:
            sock.sendall(b"hi")
            assert read_exactly(sock, 100) == b"x" * 100
            sock.sendall(b"!")  # after the record filled: counted, not kept
            assert read_to_eof(sock) == b"y"
        (record,) = proxy.wait_for_connections(1)
        assert (record.client_sent, record.server_sent) == (b"hi", b"x" * 8)
        assert record.unrecorded == 92 + 1 + 1
        assert (record.passed_upstream, record.passed_downstream) == (3, 101)
        with pytest.raises(ValueError, match="not recorded in full"):
            proxy.to_script(0)


def test_the_record_keeps_the_first_8_mib_by_default() -> None:
    """So a flood or a download through the proxy costs bounded memory."""
    reply = pattern(20 * MiB)
    with proxied([RECEIVE, reply]) as (_, proxy):
        with connect(proxy.address) as sock:
            sock.sendall(b"go")
            assert read_to_eof(sock, 32 * MiB) == reply
        (record,) = proxy.wait_for_connections(1)
    assert 8 * MiB == DEFAULT_MAX_RECORD
    assert record.client_sent + record.server_sent == b"go" + reply[: DEFAULT_MAX_RECORD - 2]
    assert record.unrecorded == len(reply) - (DEFAULT_MAX_RECORD - 2)
    assert record.passed_downstream == len(reply)


# ---- hostile -----------------------------------------------------------------------------------


def send_until_refused(
    sock: socket.socket, proxy: FaultProxy, piece: memoryview, total: int
) -> int:
    """Send ``piece`` after ``piece`` on ``sock`` (made non-blocking) until a whole pass of
    ``proxy``'s reactor makes no room for one more byte: the proxy has stopped reading. Returns
    the bytes sent. Each round sends something, and the buffers in between hold less than
    ``total``: the loop ends."""
    sock.setblocking(False)
    sent = 0
    for _ in range(total):
        with contextlib.suppress(BlockingIOError):
            while sent < total:
                sent += sock.send(piece[: total - sent])
        assert sent < total, "everything fit in the buffers: flood with more"
        settle(proxy)  # the proxy had a whole pass to read what the client sent
        try:
            sent += sock.send(piece[: total - sent])
        except BlockingIOError:
            return sent
    raise AssertionError("the client never stopped sending")


def test_a_client_flooding_a_slow_server_keeps_memory_bounded() -> None:
    total = 50 * MiB
    piece = memoryview(bytes(MiB))
    unrecorded = {"max_record": 0}  # the proxy keeps none of the flood (nor does the server)
    with proxied([Gate("go"), total, "done"], max_receive=0, proxy=unrecorded) as (server, proxy):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
        with connect(proxy.address, timeout=30) as sock:
            parked = server.gate("go").wait(5)  # the server reads nothing until resumed
            sent = send_until_refused(sock, proxy, piece, total)
            # The proxy read nothing in a whole pass: it stopped reading, its buffer is full.
            assert proxy.connections[0].peak_buffered >= MAX_BUFFERED
            canary_answers()
            parked.resume()
            sock.settimeout(30)
            while sent < total:
                sent += sock.send(piece[: total - sent])
            result = read_to_eof(sock)
        grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
        (record,) = proxy.wait_for_connections(1, timeout=10)
        proxy.check()
    assert result == b"done"
    assert record.passed_upstream == total
    assert record.peak_buffered <= MAX_BUFFERED + READ_SIZE <= 2 * MiB
    assert grown_mib < 40, f"the process grew by {grown_mib:.0f} MiB"


def test_a_thousand_proxied_connections_at_once() -> None:
    count = 1000
    with (
        proxied([RECEIVE, "ok"]) as (_, proxy),
        selectors.DefaultSelector() as selector,
    ):
        replies: dict[socket.socket, bytes] = {}
        try:
            for _ in range(count):
                sock = socket.socket()
                sock.setblocking(False)
                assert sock.connect_ex(proxy.address) in (0, errno.EINPROGRESS)
                selector.register(sock, selectors.EVENT_WRITE)
                replies[sock] = b""
            deadline = time.monotonic() + 30
            waiting = count
            canary_checked = False
            while waiting and time.monotonic() < deadline:
                for key, _ in selector.select(1.0):
                    sock = cast(socket.socket, key.fileobj)
                    if key.events == selectors.EVENT_WRITE:
                        sock.send(b"hi")
                        selector.modify(sock, selectors.EVENT_READ)
                        continue
                    data = sock.recv(100)
                    replies[sock] += data
                    if not data:
                        selector.unregister(sock)
                        waiting -= 1
                if not canary_checked and len(proxy.connections) == count:
                    canary_answers()
                    canary_checked = True
            assert waiting == 0, f"{waiting} clients still wait"
            assert set(replies.values()) == {b"ok"}
        finally:
            for sock in replies:
                sock.close()
        records = proxy.wait_for_connections(count, timeout=30)
        proxy.check()
    assert canary_checked
    assert {record.outcome for record in records} == {Outcome.COMPLETED}


def test_both_sides_resetting_at_once() -> None:
    count = 50
    with proxied([RECEIVE, RESET]) as (server, proxy):
        for _ in range(count):
            sock = socket.create_connection(proxy.address, timeout=5)
            sock.sendall(b"x")
            reset_close(sock)
        records = proxy.wait_for_connections(count, timeout=10)
        server.wait_for_connections(count, timeout=10)
        proxy.check()
        canary_answers()
        settle(proxy, passes=1)  # the passes that ended the records forgot their connections
        assert not proxy._listener.connections  # every connection forgotten
    assert {record.outcome for record in records} <= {Outcome.PEER_RESET}
    assert all("reset" in f"{r.client_end} {r.server_end}" for r in records)


def test_a_tls_client_that_resets_mid_handshake() -> None:
    pytest.importorskip("trustme")
    with proxied([RECEIVE, "x"], tls=True) as (_, proxy):
        context = ssl.create_default_context()  # does not trust the server: the handshake fails
        for _ in range(5):
            with connect(proxy.address) as raw, pytest.raises(ssl.SSLError):
                context.wrap_socket(raw, server_hostname="localhost")
        proxy.wait_for_connections(5)
        proxy.check()
        canary_answers()
