"""FaultProxy's faults with real clients (raw sockets, requests, http.client, redis-py, TLS)
and real upstreams (CommandServer, http.server, redis-server, threaded raw servers):

- each fault in each direction, with exact byte counts for ResetPeer and LimitData;
- seeded randomness (Slicer sizes, Latency jitter, probability draws) that replays;
- record and replay (``save``, ``load_recording``, ``to_script``), from the CLI too;
- lifecycle: ``down`` and ``up``, the idle timeout, dead or hostile upstreams, no threads added;
- bad arguments, refused in the caller's thread;
- hostile peers (both sides resetting at once, floods, faults toggled from another thread),
  each also checking a canary: an unrelated CommandServer on the same reactor still answers
  promptly.

Nothing sleeps to synchronise: the tests read to EOF, wait for records, gates, events or whole
passes of the reactor (``settle``, ``settle_until``), with bounded timeouts. Only
redis-server's start-up is polled (in ``conftest``): a subprocess's readiness has no event.
"""

from __future__ import annotations

import contextlib
import errno
import http.client
import json
import random
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import pytest
import requests
from _proxying import live_clients, proxied, redis_client, settle, settle_until, tls_exchange
from conftest import (
    HAS_IPV6,
    LINGER_ZERO,
    MiB,
    WebServer,
    canary_answers,
    connect,
    read_exactly,
    read_to_eof,
    reset_close,
)

import selectserver._proxy
from selectserver import (
    HALF_CLOSE,
    HANGUP,
    RECEIVE,
    RESET,
    STALL,
    Bandwidth,
    BlackholeServer,
    CommandServer,
    ConnectionRecord,
    FaultHandle,
    FaultProxy,
    Gate,
    Hold,
    Latency,
    LimitData,
    Outcome,
    ProxyRecord,
    RefusingServer,
    ResetPeer,
    Slicer,
    SlowClose,
    Timeout,
    load_recording,
)
from selectserver._faults import MAX_BUFFERED, draw
from selectserver._proxy import READ_SIZE, ProxyConnection

# ---- helpers -----------------------------------------------------------------------------------


def ask(address: tuple[str, int], request: bytes) -> tuple[bytes, str]:
    """Connect, send ``request``, read until the end: the reply and ``"eof"``/``"reset"``
    (a reset may already reach the client's connect or send)."""
    try:
        with connect(address) as sock:
            sock.sendall(request)
            return read_until_end(sock)
    except (ConnectionResetError, BrokenPipeError):
        return b"", "reset"


def read_until_end(sock: socket.socket, limit: int = 64 * MiB) -> tuple[bytes, str]:
    """What ``sock`` receives until the peer ends, and how: ``"eof"`` or ``"reset"``."""
    data = bytearray()
    try:
        while len(data) < limit:
            chunk = sock.recv(65536)
            if not chunk:
                return bytes(data), "eof"
            data += chunk
    except ConnectionResetError:
        return bytes(data), "reset"
    raise AssertionError(f"more than {limit} bytes")


def recv_pieces(sock: socket.socket) -> list[bytes]:
    """Every recv() result until EOF (each piece as it arrived)."""
    pieces: list[bytes] = []
    while True:
        piece = sock.recv(65536)
        if not piece:
            return pieces
        pieces.append(piece)


def expected_pieces(total: int, average: int, variation: int, seed: int) -> list[int]:
    """The piece sizes ``Slicer(average, variation, seed=seed)`` cuts one ``total``-byte chunk
    into (``random.Random(seed)``, as the README says)."""
    draws = random.Random(seed)
    sizes = []
    left = total
    while left > 0:
        size = min(left, average + (draws.randint(-variation, variation) if variation else 0))
        sizes.append(size)
        left -= size
    return sizes


class RawUpstream:
    """A blocking upstream in threads: ``handler(conn)`` runs for each accepted connection."""

    def __init__(self, handler: Callable[[socket.socket], None]) -> None:
        self.handler = handler
        self.listener = socket.create_server(("127.0.0.1", 0), backlog=1024)
        self.address: tuple[str, int] = self.listener.getsockname()[:2]
        self.errors: list[BaseException] = []
        self.handled = threading.Semaphore(0)
        self.threads: list[threading.Thread] = []
        self._accepter = threading.Thread(target=self._accept, daemon=True)
        self._accepter.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return  # shut down
            thread = threading.Thread(target=self._handle, args=(conn,), daemon=True)
            self.threads.append(thread)
            thread.start()

    def _handle(self, conn: socket.socket) -> None:
        try:
            conn.settimeout(10)
            self.handler(conn)
        except BaseException as exc:  # reported by close()
            self.errors.append(exc)
        finally:
            with contextlib.suppress(OSError):
                conn.close()
            self.handled.release()

    def wait_handled(self, n: int, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        for _ in range(n):
            assert self.handled.acquire(timeout=max(0.0, deadline - time.monotonic())), (
                "the upstream's handlers did not finish"
            )

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)
        self.listener.close()
        self._accepter.join(5)
        for thread in list(self.threads):
            thread.join(10)

    def __enter__(self) -> RawUpstream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ---- ResetPeer and LimitData: exact byte counts ------------------------------------------------


@pytest.mark.parametrize("n", [1, 7, 4096, 100_000])
def test_reset_peer_downstream_passes_exactly_n_bytes_then_resets(n: int) -> None:
    reply = bytes(i % 256 for i in range(200_000))
    with proxied([RECEIVE, reply, STALL]) as (server, proxy):
        proxy.add(ResetPeer(after_bytes=n))
        with connect(proxy.address) as sock:
            sock.sendall(b"go")
            got, how = read_until_end(sock)
        (record,) = proxy.wait_for_connections(1)
        (served,) = server.wait_for_connections(1)
        proxy.check()
    assert (got, how) == (reply[:n], "reset")
    assert record.outcome is Outcome.RESET
    assert (record.client_end, record.server_end) == ("reset by proxy", "reset by proxy")
    assert record.passed_downstream == n
    assert served.outcome is Outcome.PEER_RESET  # the server got an RST too


@pytest.mark.parametrize("n", [1, 5, 100_000])
def test_reset_peer_upstream_passes_exactly_n_bytes_then_resets(n: int) -> None:
    request = bytes(i % 256 for i in range(200_000))
    with proxied([len(request), "never"]) as (server, proxy):
        proxy.add(ResetPeer(after_bytes=n, direction="upstream"))
        with connect(proxy.address) as sock:
            with contextlib.suppress(ConnectionResetError, BrokenPipeError):
                sock.sendall(request)
            got, how = read_until_end(sock)
        (served,) = server.wait_for_connections(1)
        (record,) = proxy.wait_for_connections(1)
    assert (got, how) == (b"", "reset")
    assert b"".join(served.received) == request[:n]
    assert served.outcome is Outcome.PEER_RESET
    assert record.passed_upstream == n


@pytest.mark.parametrize(
    ("fault", "how", "outcome"),
    [
        (ResetPeer(after_bytes=600_000), "reset", Outcome.RESET),
        (LimitData(600_000, then=RESET), "reset", Outcome.RESET),
        (LimitData(600_000), "eof", Outcome.HUNG_UP),
    ],
    ids=["ResetPeer", "LimitData-then-RESET", "LimitData"],
)
def test_a_cut_after_n_bytes_reaches_a_slow_reader_in_full(
    fault: ResetPeer | LimitData, how: str, outcome: Outcome
) -> None:
    """A client that reads only after the proxy has cut the connection (RST or FIN) still
    gets every one of the N bytes its record says passed, then the end."""
    n = 600_000
    reply = bytes(i % 256 for i in range(2 * MiB))
    with proxied([RECEIVE, reply, STALL]) as (_, proxy):
        proxy.add(fault)
        with connect(proxy.address) as sock:
            sock.sendall(b"go")
            (record,) = proxy.wait_for_connections(1)  # the proxy has passed N and cut
            got, ended = read_until_end(sock)
    assert record.outcome is outcome
    assert record.passed_downstream == n
    assert ended == how
    assert len(got) == n, f"the proxy said {n} bytes passed; the client got {len(got)}"
    assert got == reply[:n]


def test_reset_peer_upstream_after_a_megabyte_reaches_a_slow_server_in_full() -> None:
    """A server that reads only after the proxy has reset the connection still finds every
    one of the N bytes the record says passed upstream."""
    n = 600_000
    request = bytes(i % 256 for i in range(2 * MiB))
    received = bytearray()
    go = threading.Event()

    def slow_server(conn: socket.socket) -> None:
        assert go.wait(10)
        with contextlib.suppress(ConnectionResetError):
            while chunk := conn.recv(65536):
                received.extend(chunk)

    with (
        RawUpstream(slow_server) as upstream,
        FaultProxy(upstream.address, verbose=False) as proxy,
    ):
        proxy.add(ResetPeer(after_bytes=n, direction="upstream"))
        with connect(proxy.address) as sock:
            sender = threading.Thread(target=_send_quietly, args=(sock, request))
            sender.start()
            (record,) = proxy.wait_for_connections(1)
            go.set()
            upstream.wait_handled(1)
            sender.join(10)
    assert record.passed_upstream == n
    assert len(received) == n, f"the proxy said {n} bytes passed; the server got {len(received)}"


def _send_quietly(sock: socket.socket, data: bytes) -> None:
    with contextlib.suppress(OSError):
        sock.sendall(data)


def hang_up_after_four_bytes_upstream() -> tuple[ConnectionRecord, ProxyRecord]:
    """A client sends 8 bytes through ``LimitData(4, direction="upstream")`` to a server that
    reads and waits; it reads until the end (an EOF). Returns the server's and the proxy's
    records."""
    with proxied([RECEIVE, STALL]) as (server, proxy):
        proxy.add(LimitData(4, direction="upstream"))
        with connect(proxy.address) as sock:
            sock.sendall(b"abcdefgh")
            assert read_until_end(sock) == (b"", "eof")
        (served,) = server.wait_for_connections(1)
        (record,) = proxy.wait_for_connections(1)
    return served, record


def test_limit_data_upstream_lets_n_bytes_reach_the_server_then_closes() -> None:
    served, record = hang_up_after_four_bytes_upstream()
    assert b"".join(served.received) == b"abcd"
    assert served.outcome is Outcome.PEER_CLOSED  # a FIN, not an RST
    assert record.outcome is Outcome.HUNG_UP
    assert record.passed_upstream == 4


def test_a_fault_that_hangs_up_is_recorded_as_closed_by_proxy() -> None:
    """When a fault hangs up (a FIN to both sides), the record says both sides were "closed by
    proxy", not "eof", though the drain afterwards reads each peer's answering FIN."""
    _, record = hang_up_after_four_bytes_upstream()
    assert record.outcome is Outcome.HUNG_UP
    assert (record.client_end, record.server_end) == ("closed by proxy", "closed by proxy")


def test_limit_data_both_counts_each_direction_on_its_own() -> None:
    with proxied([3, "12345", RECEIVE, "678"]) as (server, proxy):
        proxy.add(LimitData(6, direction="both"))
        with connect(proxy.address) as sock:
            sock.sendall(b"abc")  # 3 of 6 upstream
            assert read_exactly(sock, 5) == b"12345"  # 5 of 6 downstream
            sock.sendall(b"de")  # 5 of 6 upstream: passes
            assert read_until_end(sock) == (b"6", "eof")  # downstream reaches 6
        (served,) = server.wait_for_connections(1)
    assert b"".join(served.received) == b"abcde"


# ---- Timeout ----------------------------------------------------------------------------------


def test_timeout_upstream_removal_resumes_and_dropped_bytes_stay_dropped() -> None:
    with proxied([RECEIVE, "got it"]) as (server, proxy):
        handle = proxy.add(Timeout(direction="upstream"))
        with connect(proxy.address) as sock:
            sock.sendall(b"lost")
            settle_until(proxy, lambda: proxy.connections and proxy.connections[0].dropped == 4)
            assert not server.connections or not server.connections[0].received
            proxy.remove(handle)
            sock.sendall(b"found")
            assert read_to_eof(sock) == b"got it"
        (served,) = server.wait_for_connections(1)
        (record,) = proxy.wait_for_connections(1)
    assert served.received == [b"found"]
    assert record.client_sent == b"lostfound"  # recorded as read, before the fault
    assert record.passed_upstream == 5


@pytest.mark.parametrize("direction", ["downstream", "upstream", "both"])
def test_timeout_with_seconds_closes_after_seconds(direction: str) -> None:
    with proxied([RECEIVE, "reply", STALL]) as (server, proxy):
        proxy.add(Timeout(0.3, direction=direction))  # type: ignore[arg-type]
        with connect(proxy.address) as sock:
            start = time.monotonic()
            sock.sendall(b"hi")
            got, how = read_until_end(sock)
            elapsed = time.monotonic() - start
        (record,) = proxy.wait_for_connections(1)
        (served,) = server.wait_for_connections(1)
    assert (got, how) == (b"", "eof")
    assert 0.25 <= elapsed < 2.0
    assert record.outcome is Outcome.HUNG_UP
    assert "Timeout" in (record.detail or "")
    assert served.outcome is not Outcome.PEER_RESET  # a FIN to the server too


def test_timeout_downstream_with_requests_then_removal_lets_the_next_request_through(
    web: WebServer,
) -> None:
    with FaultProxy(web.address, verbose=False) as proxy:
        handle = proxy.add(Timeout())
        with pytest.raises(requests.exceptions.ReadTimeout):
            requests.get(f"{proxy.url}/a", timeout=0.3)
        proxy.remove(handle)
        assert requests.get(f"{proxy.url}/b", timeout=5).text == "hello /b"
        proxy.check()


# ---- Hold --------------------------------------------------------------------------------------


def test_hold_a_big_reply_then_remove_releases_it_all_in_order_then_eof() -> None:
    reply = bytes(i % 253 for i in range(3 * MiB))
    with proxied([RECEIVE, reply]) as (_, proxy):
        handle = proxy.add(Hold())
        with connect(proxy.address) as sock:
            sock.sendall(b"go")
            sock.setblocking(False)
            settle(proxy)  # the proxy has accepted it
            record = proxy.connections[0]
            settle_until(proxy, lambda: record.peak_buffered >= MAX_BUFFERED)  # buffer full
            with pytest.raises(BlockingIOError):
                sock.recv(1)  # nothing passed
            assert record.passed_downstream == 0
            assert MAX_BUFFERED <= record.peak_buffered <= MAX_BUFFERED + READ_SIZE
            proxy.remove(handle)
            sock.settimeout(5)
            got, how = read_until_end(sock)
        (record,) = proxy.wait_for_connections(1)
    assert how == "eof"
    assert len(got) == len(reply)
    assert got == reply
    assert record.outcome is Outcome.COMPLETED
    assert record.peak_buffered <= MAX_BUFFERED + READ_SIZE


def test_hold_upstream_keeps_the_request_and_its_eof_until_removed() -> None:
    with proxied([Gate("open"), RECEIVE, "reply"]) as (server, proxy):
        handle = proxy.add(Hold(direction="upstream"))
        with connect(proxy.address) as sock:
            sock.sendall(b"one")
            sock.sendall(b"two")
            sock.shutdown(socket.SHUT_WR)
            server.gate("open").wait(5).resume()
            settle(proxy)
            assert proxy.connections[0].passed_upstream == 0
            assert not proxy.connections[0].ended
            proxy.remove(handle)
            assert read_to_eof(sock) == b"reply"
        (served,) = server.wait_for_connections(1)
        (record,) = proxy.wait_for_connections(1)
    assert b"".join(served.received) == b"onetwo"
    assert record.outcome is Outcome.COMPLETED


def test_hold_with_requests_then_clear_releases_the_reply(web: WebServer) -> None:
    with FaultProxy(web.address, verbose=False) as proxy:
        proxy.add(Hold())
        result: list[requests.Response] = []
        thread = threading.Thread(
            target=lambda: result.append(requests.get(f"{proxy.url}/held", timeout=5))
        )
        thread.start()
        try:
            # the reply reached the proxy (and its record)
            settle_until(proxy, lambda: proxy.connections and proxy.connections[0].downstream)
            assert not result
            proxy.clear()
        finally:
            thread.join(5)
    assert result[0].text == "hello /held"


# ---- Slicer, Latency, SlowClose, Bandwidth ----------------------------------------------------


def test_slicer_piece_sizes_follow_the_seed_and_replay() -> None:
    reply = bytes(range(200))
    with proxied([RECEIVE, reply]) as (_, proxy):
        proxy.add(Slicer(10, size_variation=6, delay=0.01, seed=4))
        runs = []
        for _ in range(2):
            with connect(proxy.address) as sock:
                sock.sendall(b"go")
                runs.append(recv_pieces(sock))
    expected = expected_pieces(200, 10, 6, 4)
    assert [len(piece) for piece in runs[0]] == expected
    assert runs[0] == runs[1]
    assert b"".join(runs[0]) == reply


def test_slicer_upstream_reaches_the_server_in_pieces() -> None:
    request = bytes(range(60))
    pieces: list[bytes] = []

    def record_pieces(conn: socket.socket) -> None:
        pieces.extend(recv_pieces(conn))
        conn.sendall(b"ok")

    with (
        RawUpstream(record_pieces) as upstream,
        FaultProxy(upstream.address, verbose=False) as proxy,
    ):
        proxy.add(Slicer(8, size_variation=3, delay=0.01, seed=9, direction="upstream"))
        with connect(proxy.address) as sock:
            sock.sendall(request)
            sock.shutdown(socket.SHUT_WR)
            assert read_to_eof(sock) == b"ok"
        upstream.wait_handled(1)
    assert b"".join(pieces) == request
    assert [len(piece) for piece in pieces] == expected_pieces(60, 8, 3, 9)


def test_latency_jitter_is_seeded_and_replays_on_every_connection() -> None:
    seconds, jitter, seed, rounds = 0.1, 0.08, 21, 6
    draws = random.Random(seed)
    expected = [max(0.0, seconds + draws.uniform(-jitter, jitter)) for _ in range(rounds)]
    script: list[object] = []
    for _ in range(rounds):
        script += [RECEIVE, "r"]
    with proxied(script) as (_, proxy):
        proxy.add(Latency(seconds, jitter=jitter, seed=seed))
        results: list[list[float]] = [[], []]

        def client(times: list[float]) -> None:
            with connect(proxy.address) as sock:
                for _ in range(rounds):
                    start = time.monotonic()
                    sock.sendall(b"q")
                    assert read_exactly(sock, 1) == b"r"
                    times.append(time.monotonic() - start)

        threads = [threading.Thread(target=client, args=(times,)) for times in results]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(10)
    for times in results:
        assert len(times) == rounds
        for got, want in zip(times, expected, strict=True):
            assert want - 0.005 <= got <= want + 0.05, (times, expected)


def test_latency_both_directions_adds_up_per_round_trip() -> None:
    with proxied([RECEIVE, "a", RECEIVE, "b"]) as (_, proxy):
        proxy.add(Latency(0.15, direction="both"))
        with connect(proxy.address) as sock:
            for expect in (b"a", b"b"):
                start = time.monotonic()
                sock.sendall(b"x")
                assert read_exactly(sock, 1) == expect
                assert 0.29 <= time.monotonic() - start < 0.6


def test_latency_keeps_the_eof_behind_the_data() -> None:
    with proxied([RECEIVE, "data"]) as (_, proxy):
        proxy.add(Latency(0.2))
        with connect(proxy.address) as sock:
            start = time.monotonic()
            sock.sendall(b"x")
            assert read_until_end(sock) == (b"data", "eof")
            assert time.monotonic() - start >= 0.2


def test_slow_close_both_directions() -> None:
    with proxied([RECEIVE, "hi", RECEIVE]) as (server, proxy):
        proxy.add(SlowClose(0.3, direction="both"))
        with connect(proxy.address) as sock:
            sock.sendall(b"x")
            assert read_exactly(sock, 2) == b"hi"
            shut = time.monotonic()
            sock.shutdown(socket.SHUT_WR)  # the server sees it 0.3 s late, then hangs up
            assert read_to_eof(sock) == b""  # and its FIN is 0.3 s late again
            elapsed = time.monotonic() - shut
        (served,) = server.wait_for_connections(1)
    assert served.ended_at is not None
    assert 0.55 <= elapsed < 2.0


def test_bandwidth_downstream_is_roughly_the_rate() -> None:
    size = 400_000
    with proxied([RECEIVE, b"z" * size]) as (_, proxy):
        proxy.add(Bandwidth(1_000_000))
        with connect(proxy.address) as sock:
            sock.sendall(b"go")
            start = time.monotonic()
            got = read_to_eof(sock)
            elapsed = time.monotonic() - start
    assert got == b"z" * size
    assert 0.35 <= elapsed < 0.8


def test_bandwidth_upstream_backpressure_then_clear_speeds_up_at_once() -> None:
    """A client flooding through Bandwidth(100 kB/s): its sends block, the proxy holds a
    bounded amount; after clear() everything flows at full speed."""
    total = 16 * MiB
    piece = memoryview(bytes(MiB))
    with proxied([total, "done"], max_receive=0, proxy={"max_record": 0}) as (_, proxy):
        proxy.add(Bandwidth(100_000, direction="upstream"))
        with connect(proxy.address, timeout=30) as sock:
            sock.setblocking(False)
            sent = 0
            refused = False
            for _ in range(64):
                try:
                    while sent < total:
                        sent += sock.send(piece[: min(MiB, total - sent)])
                except BlockingIOError:
                    pass
                settle(proxy)
                try:
                    sent += sock.send(piece[:1])
                except BlockingIOError:
                    refused = True
                    break
            assert refused, "the client's sends never blocked"
            assert sent < total
            record = proxy.connections[0]
            assert record.peak_buffered <= MAX_BUFFERED + READ_SIZE
            assert record.passed_upstream < 2 * MiB
            canary_answers()
            proxy.clear()
            start = time.monotonic()
            sock.settimeout(30)
            while sent < total:
                sent += sock.send(piece[: min(MiB, total - sent)])
            assert read_to_eof(sock) == b"done"
            assert time.monotonic() - start < 5
        (record,) = proxy.wait_for_connections(1)
    assert record.passed_upstream == total
    assert record.peak_buffered <= MAX_BUFFERED + READ_SIZE


def test_bandwidth_downstream_backpressure_blocks_the_server() -> None:
    """Bandwidth on a big reply: the proxy stops reading, so the server's own sends block."""
    total = 32 * MiB
    finished = threading.Event()

    def flood(conn: socket.socket) -> None:
        conn.recv(10)
        with contextlib.suppress(OSError):
            conn.sendall(bytes(total))
        finished.set()

    with RawUpstream(flood) as upstream, FaultProxy(upstream.address, verbose=False) as proxy:
        proxy.add(Bandwidth(200_000))
        with connect(proxy.address) as sock:
            sock.sendall(b"go")
            assert not finished.wait(1.0), "the server sent 32 MiB through 200 kB/s in 1 s"
            record = proxy.connections[0]
            assert record.peak_buffered <= MAX_BUFFERED + READ_SIZE
            assert record.passed_downstream < MiB
            canary_answers()
        proxy.wait_for_connections(1)


# ---- targeting, probability, live changes ------------------------------------------------------


def test_connections_predicate_targets_even_indices() -> None:
    with proxied([RECEIVE, "ok"]) as (_, proxy):
        fault = ResetPeer()
        proxy.add(fault, connections=lambda record: record.index % 2 == 0)
        outcomes = []
        for _ in range(6):
            with connect(proxy.address) as sock:
                sock.sendall(b"hi")
                outcomes.append(read_until_end(sock))
        records = sorted(proxy.wait_for_connections(6), key=lambda r: r.index)
    assert outcomes == [(b"", "reset"), (b"ok", "eof")] * 3
    assert [r.faults for r in records] == [[fault], []] * 3


def test_connections_list_and_a_predicate_get_the_record() -> None:
    seen: list[object] = []
    with proxied([RECEIVE, "ok"]) as (_, proxy):

        def pick(record: ProxyRecord) -> bool:
            seen.append(record)
            return False

        proxy.add(LimitData(0), connections=(1, 3))
        proxy.add(Hold(), connections=pick)
        outcomes = []
        for _ in range(4):
            with connect(proxy.address) as sock:
                sock.sendall(b"hi")
                outcomes.append(read_until_end(sock)[0])
                peer = sock.getsockname()
        proxy.wait_for_connections(4)
        proxy.check()
    assert outcomes == [b"ok", b"", b"ok", b""]
    assert all(isinstance(record, ProxyRecord) for record in seen)
    assert cast(ProxyRecord, seen[-1]).peer == peer


def test_probability_draws_are_kept_in_the_records_and_replay_across_proxies() -> None:
    def run() -> list[bool]:
        with proxied([RECEIVE, "ok"]) as (_, proxy):
            proxy.add(LimitData(0), probability=0.3, seed=123)
            got = []
            for _ in range(20):
                with connect(proxy.address) as sock:
                    sock.sendall(b"hi")
                    got.append(read_until_end(sock)[0] == b"")
            records = sorted(proxy.wait_for_connections(20), key=lambda r: r.index)
        assert [bool(r.faults) for r in records] == got
        return got

    first = run()
    assert first == [draw(0.3, 123, index) for index in range(20)]
    assert 0 < sum(first) < 20
    assert run() == first


def test_probability_for_live_connections_is_drawn_by_index() -> None:
    with (
        proxied([RECEIVE, "a", RECEIVE, "b"]) as (_, proxy),
        live_clients(proxy, 30) as socks,
    ):
        proxy.add(LimitData(0), probability=0.5, seed=5)
        cut = []
        for sock in socks:
            sock.sendall(b"2")
            cut.append(read_until_end(sock)[0] == b"")
    assert cut == [draw(0.5, 5, index) for index in range(30)]


def test_latency_added_while_100_connections_are_live_delays_each_next_reply() -> None:
    with proxied([RECEIVE, "a", RECEIVE, "b"]) as (_, proxy):
        with live_clients(proxy, 100) as socks, proxy.fault(Latency(0.3)):
            start = time.monotonic()
            for sock in socks:
                sock.sendall(b"2")
            for sock in socks:
                sock.setblocking(False)
                with pytest.raises(BlockingIOError):
                    sock.recv(1)
            canary_answers()  # the proxy's latency does not delay the reactor
            for sock in socks:
                sock.settimeout(5)
                assert read_to_eof(sock) == b"b"
            assert time.monotonic() - start >= 0.3
        records = proxy.wait_for_connections(100)
    assert all(record.faults == [Latency(0.3)] for record in records)


def test_fault_context_manager_removes_the_fault_on_an_exception() -> None:
    with proxied([RECEIVE, "ok"]) as (_, proxy):
        with pytest.raises(KeyError), proxy.fault(Hold()):
            raise KeyError("boom")
        assert proxy.faults == []
        with connect(proxy.address) as sock:
            sock.sendall(b"x")
            assert read_to_eof(sock) == b"ok"
        proxy.remove(FaultHandle(Hold()))  # never added: nothing happens


def test_an_ordinary_close_is_never_a_reset_with_idle_faults() -> None:
    """Faults that never act (probability 0, no delay, a reset after more bytes than pass)
    leave an ordinary close a FIN on both sides (unlike Toxiproxy#603's idle toxics)."""
    with proxied([RECEIVE, "ok"]) as (server, proxy):
        proxy.add(ResetPeer(), probability=0.0)
        proxy.add(Latency(0.0, direction="both"))
        proxy.add(ResetPeer(after_bytes=1000, direction="both"))
        for _ in range(5):
            with connect(proxy.address) as sock:
                sock.sendall(b"hi")
                assert read_until_end(sock) == (b"ok", "eof")
        served = server.wait_for_connections(5)
        records = proxy.wait_for_connections(5)
    assert {r.outcome for r in served} == {Outcome.COMPLETED}
    assert {r.outcome for r in records} == {Outcome.COMPLETED}
    assert {(r.client_end, r.server_end) for r in records} == {("eof", "eof")}


# ---- the idle timeout and bytes in flight ------------------------------------------------------


def test_bytes_held_by_latency_do_not_count_as_idle() -> None:
    """A reply that a Latency holds for longer than the idle ``timeout`` is in flight, not
    idle: the client gets all of it, then the EOF."""
    with proxied([RECEIVE, "late reply"], proxy={"timeout": 0.3}) as (_, proxy):
        proxy.add(Latency(0.6))
        with connect(proxy.address) as sock:
            sock.sendall(b"hi")
            got = read_until_end(sock)
        (record,) = proxy.wait_for_connections(1)
    assert got == (b"late reply", "eof"), record.describe()


# ---- faithful on the wire ----------------------------------------------------------------------


def test_half_close_with_faults_on_both_directions() -> None:
    received = bytearray()

    def echo_after_eof(conn: socket.socket) -> None:
        while chunk := conn.recv(65536):
            received.extend(chunk)
        conn.sendall(bytes(reversed(received)))

    request = bytes(i % 256 for i in range(300_000))
    with (
        RawUpstream(echo_after_eof) as upstream,
        FaultProxy(upstream.address, verbose=False) as proxy,
    ):
        proxy.add(Slicer(4096, size_variation=2000, direction="both"))
        proxy.add(Latency(0.02, direction="both"))
        with connect(proxy.address) as sock:
            sock.sendall(request)
            sock.shutdown(socket.SHUT_WR)
            got, how = read_until_end(sock)
        (record,) = proxy.wait_for_connections(1)
        upstream.wait_handled(1)
    assert bytes(received) == request
    assert (got, how) == (bytes(reversed(request)), "eof")
    assert record.outcome is Outcome.COMPLETED


def test_tls_through_a_slicer_and_latency_on_both_directions() -> None:
    pytest.importorskip("trustme")
    with proxied([RECEIVE, "secret"], tls=True) as (server, proxy):
        proxy.add(Slicer(5, size_variation=4, direction="both"))
        proxy.add(Latency(0.01, jitter=0.01, direction="both"))
        assert tls_exchange(server, proxy.address, b"request") == b"secret"
        proxy.wait_for_connections(1)
        proxy.check()
        server.check()


def test_tls_reset_mid_handshake_by_a_fault() -> None:
    pytest.importorskip("trustme")
    with proxied([RECEIVE, "secret"], tls=True) as (server, proxy):
        proxy.add(ResetPeer(after_bytes=100))
        with pytest.raises((ssl.SSLError, ConnectionResetError)):  # in the handshake
            tls_exchange(server, proxy.address, b"request")
        (record,) = proxy.wait_for_connections(1)
        proxy.check()
        canary_answers()
    assert record.outcome is Outcome.RESET


def test_a_reset_after_an_eof_is_recorded_as_a_reset() -> None:
    """A side that sends EOF, then RST: the proxy stops reading a side after its EOF, so it
    learns of the RST when it next sends there; it passes the RST on, and the record shows the
    reset as that side's end (found by fuzz/test_fuzz_proxy.py)."""
    with proxied([HALF_CLOSE, RESET]) as (server, proxy):
        with connect(proxy.address) as client:
            assert client.recv(100) == b""  # the server's EOF, passed on
            (served,) = server.wait_for_connections(1)
            assert served.outcome is Outcome.RESET  # the server has reset since
            client.sendall(b"late")  # the proxy's send to the server meets the reset
            (record,) = proxy.wait_for_connections(1)
            settle(proxy)  # the pass that ended the record has reset the client too
            # After an EOF the kernel reports an RST on the next send, not on recv.
            with pytest.raises((BrokenPipeError, ConnectionResetError)):
                client.sendall(b"again")
        proxy.check()
    assert record.outcome is Outcome.PEER_RESET
    assert (record.client_end, record.server_end) == ("reset by proxy", "reset")
    assert record.detail == "the server reset"


class _FailingIoctl:
    """Stands in for ``fcntl`` in the proxy: every ioctl fails."""

    @staticmethod
    def ioctl(*args: object) -> bytes:
        raise OSError(errno.ENOTTY, "injected")


def test_a_reset_whose_send_queue_cannot_be_read_goes_at_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """If the kernel cannot say what it still holds, the proxy resets without waiting."""
    monkeypatch.setattr(selectserver._proxy, "fcntl", _FailingIoctl)
    with proxied([RECEIVE, "pong", STALL]) as (_, proxy):
        proxy.add(ResetPeer(after_bytes=2))
        with connect(proxy.address) as sock:
            sock.sendall(b"ping")
            assert read_until_end(sock) == (b"po", "reset")
        (record,) = proxy.wait_for_connections(1)
        proxy.check()
        canary_answers()
    assert record.outcome is Outcome.RESET


def test_a_reset_waits_for_its_send_queue_at_most_drain_seconds(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A kernel that always says bytes are still queued delays the RST by DRAIN_SECONDS at
    most; the reactor serves others meanwhile."""
    monkeypatch.setattr(selectserver._proxy, "_unsent", lambda sock: 1)
    monkeypatch.setattr(selectserver._proxy, "DRAIN_SECONDS", 0.3)
    with proxied([RECEIVE, "pong", STALL]) as (_, proxy):
        proxy.add(ResetPeer(after_bytes=2))
        with connect(proxy.address) as sock:
            sock.sendall(b"ping")
            assert read_exactly(sock, 2) == b"po"
            (record,) = proxy.wait_for_connections(1)  # ended when the reset was decided
            canary_answers()  # while the proxy waits on the send queue
            started = time.monotonic()
            assert read_until_end(sock) == (b"", "reset")
            assert time.monotonic() - started < 5
        proxy.check()
    assert record.outcome is Outcome.RESET


# ---- upstreams that are dead, slow to connect, or hostile --------------------------------------


def test_a_missing_unix_upstream_resets_the_client_and_says_why(tmp_path: Path) -> None:
    with FaultProxy(str(tmp_path / "nobody.sock"), verbose=False) as proxy:
        with pytest.raises(ConnectionResetError), connect(proxy.address) as sock:
            sock.recv(10)
        (record,) = proxy.wait_for_connections(1)
        proxy.check()
    assert record.outcome is Outcome.RESET
    assert record.client_end == "reset by proxy"
    assert "FileNotFoundError" in (record.server_end or "")
    assert "unreachable" in (record.detail or "")


def test_a_second_upstream_address_is_tried_when_the_first_refuses(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with (
        RefusingServer() as dead,
        CommandServer([RECEIVE, "second"], verbose=False) as server,
    ):
        real = socket.getaddrinfo

        def two_addresses(host: str, port: int, *args: Any, **kwargs: Any) -> list[Any]:
            if host == "twice.test":
                return [
                    (socket.AF_INET, socket.SOCK_STREAM, 6, "", dead.address),
                    (socket.AF_INET, socket.SOCK_STREAM, 6, "", server.address),
                ]
            return real(host, port, *args, **kwargs)

        monkeypatch.setattr(socket, "getaddrinfo", two_addresses)
        proxy = FaultProxy(("twice.test", 1), verbose=False)
        monkeypatch.undo()
        with proxy:
            with connect(proxy.address) as sock:
                sock.sendall(b"hi")
                assert read_to_eof(sock) == b"second"
            (record,) = proxy.wait_for_connections(1)
    assert record.outcome is Outcome.COMPLETED
    assert record.via is not None


def test_an_upstream_that_never_accepts_times_out_the_connect() -> None:
    with (
        BlackholeServer() as hole,
        FaultProxy(hole.address, verbose=False, timeout=0.3) as proxy,
    ):
        start = time.monotonic()
        with pytest.raises(ConnectionResetError), connect(proxy.address) as sock:
            sock.recv(10)
        elapsed = time.monotonic() - start
        (record,) = proxy.wait_for_connections(1)
        canary_answers()
    assert 0.25 <= elapsed < 3
    assert record.outcome is Outcome.RESET
    assert "timed out" in (record.server_end or "")


def test_an_upstream_that_accepts_and_resets(capfd: pytest.CaptureFixture[str]) -> None:
    def reset_at_once(conn: socket.socket) -> None:
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_ZERO)

    count = 50
    with (
        RawUpstream(reset_at_once) as upstream,
        FaultProxy(upstream.address, verbose=False) as proxy,
    ):
        outcomes = [ask(proxy.address, b"hello")[1] for _ in range(count)]
        records = proxy.wait_for_connections(count)
        proxy.check()
        canary_answers()
        upstream.wait_handled(count)
    assert set(outcomes) == {"reset"}
    # a server reset, even when the RST came before the proxy saw its connect complete
    assert {r.outcome for r in records} == {Outcome.PEER_RESET}
    assert {r.server_end for r in records} == {"reset"}


def test_an_upstream_that_accepts_and_resets_is_not_recorded_as_unreachable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An upstream whose reset arrives before the proxy looks at its connect (forced here: the
    look waits for the reset) is recorded as a server reset (PEER_RESET, server_end "reset"),
    not as unreachable: the connect did complete."""
    reset_done = threading.Event()

    def reset_at_once(conn: socket.socket) -> None:
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_ZERO)
        conn.close()
        reset_done.set()

    real_check = ProxyConnection._check_connected

    def check_after_the_reset(self: ProxyConnection, now: float) -> int:
        reset_done.wait(5)  # the server has accepted and reset: its RST is on the way
        return real_check(self, now)

    monkeypatch.setattr(ProxyConnection, "_check_connected", check_after_the_reset)
    with (
        RawUpstream(reset_at_once) as upstream,
        FaultProxy(upstream.address, verbose=False) as proxy,
    ):
        ask(proxy.address, b"hello")
        (record,) = proxy.wait_for_connections(1)
        upstream.wait_handled(1)
    assert record.outcome is Outcome.PEER_RESET, record.describe()
    assert record.server_end == "reset"


def test_an_upstream_that_accepts_and_closes_while_the_client_floods() -> None:
    def close_at_once(conn: socket.socket) -> None:
        pass

    with (
        RawUpstream(close_at_once) as upstream,
        FaultProxy(upstream.address, verbose=False) as proxy,
    ):
        for _ in range(10):
            with connect(proxy.address) as sock:
                with contextlib.suppress(OSError):
                    for _ in range(32):
                        sock.sendall(bytes(256 * 1024))
                with contextlib.suppress(ConnectionResetError):
                    read_to_eof(sock)
        proxy.wait_for_connections(10)
        proxy.check()
        canary_answers()
        upstream.wait_handled(10)


def test_down_keeps_live_connections_and_the_port() -> None:
    with proxied([RECEIVE, "a", RECEIVE, "b"]) as (_, proxy):
        port = proxy.port
        with connect(proxy.address) as live:
            live.sendall(b"1")
            assert read_exactly(live, 1) == b"a"
            proxy.down()
            with pytest.raises(ConnectionRefusedError):
                socket.create_connection(proxy.address, timeout=5).close()
            live.sendall(b"2")
            assert read_to_eof(live) == b"b"  # live connections go on
        proxy.up()
        assert proxy.port == port
        with connect(proxy.address) as sock:
            sock.sendall(b"1")
            assert read_exactly(sock, 1) == b"a"
        records = proxy.wait_for_connections(2)
    assert records[0].outcome is Outcome.COMPLETED


def test_wait_for_connections_times_out_saying_what_runs() -> None:
    with (
        proxied([RECEIVE, STALL]) as (_, proxy),
        connect(proxy.address) as sock,
    ):
        sock.sendall(b"x")
        settle(proxy)
        start = time.monotonic()
        with pytest.raises(TimeoutError, match="0 of 1 proxied connections") as excinfo:
            proxy.wait_for_connections(1, timeout=0.2)
        assert time.monotonic() - start < 2
        assert "proxied connection 0" in str(excinfo.value)
        with pytest.raises(ValueError, match="n"):
            proxy.wait_for_connections(-1)
        with pytest.raises(TypeError, match="n"):
            proxy.wait_for_connections("1")  # type: ignore[arg-type]
        assert proxy.wait_for_connections(0) == []


def test_the_proxy_adds_no_threads() -> None:
    canary_answers()  # the shared reactor runs
    before = threading.active_count()
    with (
        CommandServer([RECEIVE, "ok", RECEIVE], verbose=False) as server,
        FaultProxy(server.address, verbose=False) as first,
        FaultProxy(server.address, verbose=False) as second,
        FaultProxy(first.address, verbose=False) as chained,
        contextlib.ExitStack() as stack,
    ):
        chained.add(Latency(0.01, direction="both"))
        for proxy in (first, second, chained):
            for _ in range(10):
                sock = stack.enter_context(connect(proxy.address))
                sock.sendall(b"x")
                assert read_exactly(sock, 2) == b"ok"
        assert threading.active_count() == before


# ---- the proxy's bad arguments, in the caller's thread -----------------------------------------


def test_bad_proxy_arguments_name_themselves_in_the_callers_thread() -> None:
    with pytest.raises(TypeError, match="port"):
        FaultProxy(("127.0.0.1", "80"))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="upstream port"):
        FaultProxy(("127.0.0.1", 70000))
    with pytest.raises(TypeError, match="upstream"):
        FaultProxy(("127.0.0.1", 80, 0))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="upstream"):
        FaultProxy("")
    with pytest.raises(ValueError, match="max_record"):
        FaultProxy(("127.0.0.1", 80), max_record=-1)
    with pytest.raises(TypeError, match="timeout"):
        FaultProxy(("127.0.0.1", 80), timeout="1")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="timeout"):
        FaultProxy(("127.0.0.1", 80), timeout=0)
    with FaultProxy(("127.0.0.1", 9), verbose=False) as proxy:
        with pytest.raises(TypeError, match="fault"):
            proxy.add(Hold)  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="connections"):
            proxy.add(Hold(), connections=3)  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="seed"):
            proxy.add(Hold(), seed=0.5)  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="fault"), proxy.fault("slow"):  # type: ignore[arg-type]
            pass
        assert proxy.faults == []
        taken = proxy.port
        with pytest.raises(OSError, match="in use"):
            FaultProxy(("127.0.0.1", 9), port=taken, verbose=False)


# ---- record and replay -------------------------------------------------------------------------


def test_the_saved_document_has_the_documented_keys(tmp_path: Path) -> None:
    with proxied([RECEIVE, "ok"]) as (server, proxy):
        proxy.add(Latency(0.0))
        with connect(proxy.address) as sock:
            sock.sendall(b"\x00\xffhi")
            assert read_to_eof(sock) == b"ok"
            peer = sock.getsockname()
        proxy.wait_for_connections(1)
        proxy.save(str(tmp_path / "r.json"))
    document = json.loads((tmp_path / "r.json").read_text())
    assert document["format"] == "selectserver-recording"
    assert document["version"] == 1
    assert document["upstream"] == f"127.0.0.1:{server.port}"
    (connection,) = document["connections"]
    assert set(connection) >= {
        "index",
        "peer",
        "client_end",
        "server_end",
        "outcome",
        "detail",
        "failure",
        "unrecorded",
        "faults",
        "upstream",
        "downstream",
    }
    assert connection["peer"] == f"{peer[0]}:{peer[1]}"
    assert connection["outcome"] == "completed"
    assert connection["faults"] == [repr(Latency(0.0))]
    assert connection["upstream"][0]["data"] == "\x00\xffhi"
    assert connection["downstream"][0]["data"] == "ok"
    assert load_recording(str(tmp_path / "r.json")) == [[4, b"ok", HANGUP]]


def test_several_connections_replay_in_accept_order(tmp_path: Path) -> None:
    def play(address: tuple[str, int], first: bytes, second: bytes, third: bytes) -> None:
        """Two connections, in turn: one request, then two."""
        with connect(address) as sock:
            sock.sendall(first)
            assert read_to_eof(sock) == b"first"
        with connect(address) as sock:
            sock.sendall(second)
            assert read_exactly(sock, 6) == b"second"
            sock.sendall(third)
            assert read_to_eof(sock) == b"third"

    served = [[RECEIVE, "first"], [RECEIVE, "second", RECEIVE, "third"]]
    with proxied(scripts=served) as (_, proxy):
        play(proxy.address, b"a", b"bb", b"ccc")
        proxy.wait_for_connections(2)
        scripts = [proxy.to_script(0), proxy.to_script(1)]
        proxy.save(tmp_path / "two.json")
    assert scripts == [[1, b"first", HANGUP], [2, b"second", 3, b"third", HANGUP]]
    assert load_recording(tmp_path / "two.json") == scripts
    with CommandServer(scripts=load_recording(tmp_path / "two.json"), verbose=False) as replay:
        play(replay.address, b"x", b"yy", b"zzz")  # the same sizes, other bytes


def test_record_requests_against_http_server_and_replay_them(
    web: WebServer, tmp_path: Path
) -> None:
    headers = {"Host": "example.test", "User-Agent": "selectserver-tests"}

    def session(url: str) -> list[bytes]:
        with requests.Session() as client:
            return [
                client.get(f"{url}/bytes/3000", headers=headers, timeout=5).content,
                client.get(f"{url}/same", headers=headers, timeout=5).content,
                client.get(f"{url}/same", headers=headers, timeout=5).content,
            ]

    with FaultProxy(web.address, verbose=False) as proxy:
        recorded = session(proxy.url)
        proxy.wait_for_connections(1)
        proxy.save(tmp_path / "web.json")
        script = proxy.to_script(0)
    assert sum(isinstance(step, int) for step in script) == 3
    with CommandServer(scripts=load_recording(tmp_path / "web.json"), verbose=False) as replay:
        replayed = session(replay.url)
        replay.wait_for_connections(1)
        replay.check()
    assert replayed == recorded
    assert recorded[1] == b"hello /same"


def test_record_a_redis_resp3_session_and_replay_it(
    redis_address: tuple[str, int], tmp_path: Path
) -> None:
    def session(client: Any) -> list[object]:
        return [
            client.set("resp3-key", "v"),
            client.get("resp3-key"),
            client.get("resp3-key"),
            client.hset("resp3-hash", mapping={"a": "1"}),
            client.hgetall("resp3-hash"),
            client.delete("resp3-key", "resp3-hash"),
        ]

    with FaultProxy(redis_address, verbose=False) as proxy:
        client = redis_client(proxy.address, protocol=3)
        recorded = session(client)
        client.close()
        proxy.wait_for_connections(1)
        proxy.save(tmp_path / "redis3.json")
        assert b"HELLO" in proxy.connections[0].client_sent
    with CommandServer(scripts=load_recording(tmp_path / "redis3.json"), verbose=False) as replay:
        client = redis_client(replay.address, protocol=3)
        replayed = session(client)
        client.close()
        replay.wait_for_connections(1)
    assert replayed == recorded
    assert recorded[1] == b"v"


def test_to_script_of_a_live_connection_and_of_a_reset_one() -> None:
    with proxied([RECEIVE, "one", RECEIVE, "two", RESET]) as (_, proxy):
        with connect(proxy.address) as sock:
            sock.sendall(b"q")
            assert read_exactly(sock, 3) == b"one"
            settle(proxy)
            assert proxy.to_script(0) == [1, b"one", HANGUP]  # so far
            sock.sendall(b"rr")
            assert read_until_end(sock) == (b"two", "reset")
        proxy.wait_for_connections(1)
        script = proxy.to_script(0)
        with pytest.raises(IndexError):
            proxy.to_script(5)
    assert script == [1, b"one", 2, b"two", RESET]
    with CommandServer(script, verbose=False) as replay, connect(replay.address) as sock:
        sock.sendall(b"q")
        assert read_exactly(sock, 3) == b"one"
        sock.sendall(b"rr")
        assert read_until_end(sock) == (b"two", "reset")


def test_redis_through_every_fault_upstream_and_downstream_records_cleanly(
    redis_address: tuple[str, int],
) -> None:
    import redis

    faults: list[tuple[Any, type[Exception] | None]] = [
        (Slicer(3, size_variation=2, direction="upstream"), None),
        (Slicer(3, size_variation=2), None),
        (Latency(0.02, jitter=0.02, direction="upstream"), None),
        (Bandwidth(20_000, direction="upstream"), None),
        (SlowClose(0.1), None),
        (ResetPeer(after_bytes=3), redis.exceptions.ConnectionError),
        (ResetPeer(after_bytes=3, direction="upstream"), redis.exceptions.ConnectionError),
        (LimitData(3, then=RESET), redis.exceptions.ConnectionError),
        (Timeout(0.1), redis.exceptions.ConnectionError),
        (Timeout(), redis.exceptions.TimeoutError),
    ]
    with FaultProxy(redis_address, verbose=False) as proxy:
        for done, (fault, error) in enumerate(faults, 1):
            with proxy.fault(fault):
                client = redis_client(proxy.address, timeout=0.5)
                try:
                    if error is None:
                        assert client.ping()
                        assert client.echo("x" * 100) == b"x" * 100
                    else:
                        with pytest.raises(error):
                            client.ping()
                finally:
                    client.close()
            proxy.wait_for_connections(done, timeout=5)  # ended before the next fault
        proxy.wait_for_connections(len(faults), timeout=10)
        proxy.check()
        assert [r.faults for r in proxy.connections] == [[f] for f, _ in faults]


# ---- the CLI ------------------------------------------------------------------------------------


def test_cli_proxy_records_a_server_that_speaks_first_and_replay_serves_it(tmp_path: Path) -> None:
    path = tmp_path / "cli.json"
    with CommandServer(["220 hi\r\n", RECEIVE, "250 ok\r\n"], verbose=False) as upstream:
        argv = [sys.executable, "-m", "selectserver", "proxy", f"127.0.0.1:{upstream.port}"]
        argv += ["--port", "0", "--bandwidth", "1e6", "--record", str(path)]
        with subprocess.Popen(
            argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        ) as proc:
            try:
                assert proc.stdout is not None
                line = proc.stdout.readline()
                assert line.startswith("selectserver: proxying 127.0.0.1:"), line
                port = int(line.split()[2].rsplit(":", 1)[1])
                with connect(("127.0.0.1", port)) as sock:
                    assert read_exactly(sock, 8) == b"220 hi\r\n"
                    sock.sendall(b"HELO\r\n")
                    assert read_to_eof(sock) == b"250 ok\r\n"
                while not (proc.stdout.readline()).startswith("  faults:"):
                    pass
                proc.send_signal(signal.SIGINT)
                out, err = proc.communicate(timeout=10)
            finally:
                if proc.poll() is None:
                    proc.kill()
    assert proc.returncode == 0, err
    assert "saved 1 connection(s)" in out
    assert load_recording(path) == [[b"220 hi\r\n", 6, b"250 ok\r\n", HANGUP]]
    argv = [sys.executable, "-m", "selectserver", "replay", str(path), "--port", "0", "--once"]
    with subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as proc:
        try:
            assert proc.stdout is not None
            line = proc.stdout.readline()
            port = int(line.split("http://", 1)[1].split()[0].rsplit(":", 1)[1])
            with connect(("127.0.0.1", port)) as sock:
                assert read_exactly(sock, 8) == b"220 hi\r\n"
                sock.sendall(b"HELO\r\n")
                assert read_to_eof(sock) == b"250 ok\r\n"
            out, err = proc.communicate(timeout=10)
        finally:
            if proc.poll() is None:
                proc.kill()
    assert proc.returncode == 0, err


def test_cli_replay_of_a_missing_file_exits_2(tmp_path: Path) -> None:
    argv = [sys.executable, "-m", "selectserver", "replay", str(tmp_path / "none.json")]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    assert done.returncode == 2
    assert "none.json" in done.stderr


# ---- hostile -----------------------------------------------------------------------------------


def test_clients_that_connect_and_reset_at_once() -> None:
    count = 200
    with proxied([RECEIVE, "never"]) as (server, proxy):
        for _ in range(count):
            reset_close(socket.create_connection(proxy.address, timeout=5))
        records = proxy.wait_for_connections(count, timeout=10)
        canary_answers()
        served = server.wait_for_connections(count, timeout=10)
        proxy.check()
        settle(proxy, passes=1)
        assert not proxy._listener.connections
    assert {r.client_end for r in records} == {"reset"}
    assert {r.outcome for r in records} == {Outcome.PEER_RESET}
    assert {r.outcome for r in served} <= {Outcome.PEER_RESET}


def test_clients_that_reset_while_a_big_reply_is_held() -> None:
    with proxied([RECEIVE, b"h" * (2 * MiB)]) as (server, proxy):
        proxy.add(Hold())
        for _ in range(20):
            sock = socket.create_connection(proxy.address, timeout=5)
            sock.sendall(b"go")
            reset_close(sock)
        records = proxy.wait_for_connections(20, timeout=10)
        server.wait_for_connections(20, timeout=10)
        canary_answers()
        proxy.check()
    assert {r.client_end for r in records} == {"reset"}
    assert all(r.peak_buffered <= MAX_BUFFERED + READ_SIZE for r in records)


def test_faults_toggled_from_another_thread_never_corrupt_the_stream() -> None:
    """Latency, Bandwidth, Slicer, SlowClose and Hold lose nothing: added and removed
    hundreds of times while 8 clients stream through, every byte arrives once, in order."""
    size = 300_000
    reply = bytes(i % 241 for i in range(size))
    clients, toggles = 8, 300
    with proxied([RECEIVE, reply]) as (_, proxy):
        done = threading.Event()
        kinds: list[Any] = [
            Latency(0.002, jitter=0.002, direction="both"),
            Bandwidth(20_000_000, direction="both"),
            Slicer(500, size_variation=400, direction="both"),
            SlowClose(0.001, direction="both"),
            Hold(direction="both"),
        ]

        def toggle() -> None:
            draws = random.Random(1)
            try:
                for _ in range(toggles):
                    handle = proxy.add(draws.choice(kinds))
                    if draws.random() < 0.5:
                        proxy.remove(handle)
                    if draws.random() < 0.3:
                        proxy.clear()
            finally:
                proxy.clear()
                done.set()

        results: list[bytes] = []

        def client() -> None:
            while True:
                finished = done.is_set()
                with connect(proxy.address, timeout=20) as sock:
                    sock.sendall(b"go")
                    results.append(read_to_eof(sock))
                if finished:
                    return

        toggler = threading.Thread(target=toggle)
        threads = [threading.Thread(target=client) for _ in range(clients)]
        for thread in [toggler, *threads]:
            thread.start()
        canary_answers()
        for thread in [toggler, *threads]:
            thread.join(20)
        assert done.is_set()
        proxy.wait_for_connections(len(results), timeout=10)
        proxy.check()
    assert len(results) >= 2 * clients
    bad = [len(result) for result in results if result != reply]
    assert not bad, f"{len(bad)} of {len(results)} streams corrupted: {bad[:5]}"


def test_many_connections_through_latency_and_slicer_at_once() -> None:
    count = 300
    with (
        proxied([RECEIVE, "pong"]) as (_, proxy),
        contextlib.ExitStack() as stack,
    ):
        proxy.add(Latency(0.05, jitter=0.05, direction="both"))
        proxy.add(Slicer(1, direction="downstream"))
        socks = [stack.enter_context(connect(proxy.address)) for _ in range(count)]
        for sock in socks:
            sock.sendall(b"ping")
        canary_answers()
        for sock in socks:
            assert read_to_eof(sock) == b"pong"
        stack.close()
        records = proxy.wait_for_connections(count, timeout=10)
        proxy.check()
    assert {r.outcome for r in records} == {Outcome.COMPLETED}


def test_both_sides_reset_at_once_under_latency() -> None:
    count = 30
    with proxied([RECEIVE, RESET]) as (server, proxy):
        proxy.add(Latency(0.05, direction="both"))
        for _ in range(count):
            sock = socket.create_connection(proxy.address, timeout=5)
            sock.sendall(b"x")
            reset_close(sock)
        server.wait_for_connections(count, timeout=10)
        try:
            records = proxy.wait_for_connections(count, timeout=3)
        finally:
            proxy.close()
        canary_answers()
    assert {r.outcome for r in records} == {Outcome.PEER_RESET}


def test_a_client_flooding_then_resetting_and_the_server_resetting_end_the_connection() -> None:
    """With no fault and the proxy's buffer for the server full, a client reset and then a
    server reset end the connection at once, as PEER_RESET."""
    unrecorded = {"max_record": 0}  # the proxy keeps none of the flood (nor does the server)
    with proxied([Gate("flooded"), RESET], max_receive=0, proxy=unrecorded) as (server, proxy):
        sock = socket.create_connection(proxy.address, timeout=5)
        sock.setblocking(False)
        parked = server.gate("flooded").wait(5)
        piece = bytes(MiB)
        with contextlib.suppress(BlockingIOError):
            for _ in range(64):
                sock.send(piece)
        settle(proxy)
        reset_close(sock)
        settle(proxy)
        parked.resume()  # the server resets now
        server.wait_for_connections(1)
        (record,) = proxy.wait_for_connections(1, timeout=3)
        canary_answers()
    assert record.outcome is Outcome.PEER_RESET


def test_both_sides_reset_while_the_proxy_holds_the_clients_bytes() -> None:
    """With the client's bytes and its RST held behind an upstream Hold, a server reset ends
    the connection at once, as PEER_RESET (long before the idle timeout)."""
    with proxied([Gate("go"), RESET]) as (server, proxy):
        proxy.add(Hold(direction="upstream"))
        sock = socket.create_connection(proxy.address, timeout=5)
        sock.sendall(b"x")
        parked = server.gate("go").wait(5)
        reset_close(sock)
        settle_until(proxy, lambda: proxy.connections[0].client_end == "reset")  # read the RST
        parked.resume()  # the server resets now
        server.wait_for_connections(1)
        try:
            (record,) = proxy.wait_for_connections(1, timeout=3)
        finally:
            proxy.close()
        canary_answers()
    assert record.outcome is Outcome.PEER_RESET


def test_http_client_sees_incomplete_read_with_limit_data(web: WebServer) -> None:
    with FaultProxy(web.address, verbose=False) as proxy:
        proxy.add(LimitData(1000))
        conn = http.client.HTTPConnection(proxy.host, proxy.port, timeout=5)
        try:
            conn.request("GET", "/bytes/100000")
            response = conn.getresponse()
            with pytest.raises(http.client.IncompleteRead):
                response.read()
        finally:
            conn.close()
        proxy.wait_for_connections(1)
        proxy.check()


def test_removing_a_latency_releases_the_chunks_it_delays() -> None:
    """Removing a Latency releases at once a reply it already delays, as removing a Hold or
    a Bandwidth does."""
    with proxied([RECEIVE, Gate("replied"), "reply", STALL]) as (server, proxy):
        handle = proxy.add(Latency(3.0))
        with connect(proxy.address) as sock:
            sock.sendall(b"q")
            server.gate("replied").wait(5).resume()
            settle_until(proxy, lambda: proxy.connections[0].downstream)  # read and delayed
            assert proxy.connections[0].passed_downstream == 0
            proxy.remove(handle)
            start = time.monotonic()
            sock.settimeout(1.0)
            try:
                got = read_exactly(sock, 5)
            except TimeoutError:
                got = b""
            elapsed = time.monotonic() - start
    assert got == b"reply", f"nothing within {elapsed:.2f} s of the removal"


def test_ipv6_on_both_sides() -> None:
    if not HAS_IPV6:
        pytest.skip("no IPv6 loopback")
    with (
        CommandServer([RECEIVE, "six"], "::1", verbose=False) as server,
        FaultProxy(("::1", server.port), host="::1", verbose=False) as proxy,
    ):
        assert proxy.url == f"http://[::1]:{proxy.port}"
        assert proxy.upstream == f"[::1]:{server.port}"
        with socket.create_connection(proxy.address, timeout=5) as sock:
            sock.sendall(b"q")
            assert read_to_eof(sock) == b"six"
        (record,) = proxy.wait_for_connections(1)
    assert record.outcome is Outcome.COMPLETED
