"""The reactor itself: both selectors, lifecycle, and failures that must never be lost."""

from __future__ import annotations

import selectors
import socket
import threading
from collections.abc import Callable, Iterator

import pytest
from conftest import connect, open_fds, read_to_eof

import selectserver
from selectserver import (
    HALF_CLOSE,
    RECEIVE,
    RESET,
    CommandServer,
    Delay,
    Drip,
    OneShotServer,
    Outcome,
    Reactor,
    ReactorStatistics,
    Reply,
    _machine,
    _reactor,
)

SELECTORS: list[Callable[[], selectors.BaseSelector]] = [
    selectors.DefaultSelector,
    selectors.SelectSelector,
]


@pytest.fixture(params=SELECTORS, ids=lambda factory: factory.__name__)
def reactor(request: pytest.FixtureRequest) -> Iterator[Reactor]:
    """A reactor of our own on each selector, closed (and its thread joined) afterwards."""
    own = Reactor(request.param)
    own.start()
    yield own
    own.close()
    assert not own.thread.is_alive()


def exchange(address: object, payload: bytes = b"ping") -> bytes:
    """Send ``payload``, then read to EOF."""
    with socket.create_connection(address, timeout=10) as client:  # type: ignore[arg-type]
        client.sendall(payload)
        chunks = []
        while chunk := client.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


@pytest.mark.parametrize(
    ("script", "expected", "outcome"),
    [
        ([RECEIVE, "pong"], b"pong", Outcome.COMPLETED),
        ([4, Delay(0.01), "late"], b"late", Outcome.COMPLETED),
        ([RECEIVE, Drip(b"drip", chunk=2, interval=0.001)], b"drip", Outcome.COMPLETED),
        ([RECEIVE, b"x" * 3_000_000], b"x" * 3_000_000, Outcome.COMPLETED),
        (["half", HALF_CLOSE, RECEIVE], b"half", Outcome.COMPLETED),
    ],
    ids=["pong", "delay", "drip", "bulk", "half-close"],
)
def test_scripts_run_on_every_selector(
    reactor: Reactor, script: list[object], expected: bytes, outcome: Outcome
) -> None:
    with CommandServer(script, verbose=False, reactor=reactor) as server:
        assert exchange(server.address) == expected
        (record,) = server.wait_for_connections(1)
    assert record.outcome is outcome
    assert b"".join(record.received) == b"ping"
    assert record.sent == expected


def test_reset_on_every_selector(reactor: Reactor) -> None:
    with CommandServer([RECEIVE, RESET], verbose=False, reactor=reactor) as server:
        with pytest.raises(ConnectionResetError):
            exchange(server.address)
        assert server.wait_for_connections(1)[0].outcome is Outcome.RESET


def test_servers_share_their_reactor(reactor: Reactor) -> None:
    servers = [CommandServer("hi", verbose=False, reactor=reactor) for _ in range(20)]
    try:
        assert all(exchange(server.address) == b"hi" for server in servers)
        stats = reactor.statistics()
        assert (stats.running, stats.servers) == (True, 20)
    finally:
        for server in servers:
            server.close()
    assert reactor.statistics().servers == 0


def test_a_closed_reactor_refuses_new_servers() -> None:
    own = Reactor()
    own.start()
    own.close()
    with pytest.raises(RuntimeError, match="closed"):
        CommandServer("hi", verbose=False, reactor=own)


def test_closing_the_reactor_closes_its_servers() -> None:
    own = Reactor()
    own.start()
    server = CommandServer(["hello", RECEIVE], verbose=False, reactor=own)
    client = socket.create_connection(server.address, timeout=10)
    try:
        assert client.recv(5) == b"hello"  # accepted (one still in the backlog would get RST)
        own.close()
        assert client.recv(100) == b""  # the server's socket is gone, not hanging
    finally:
        client.close()
    server.close()  # no hang, no error: the reactor closed it already
    assert server.connections[0].outcome is Outcome.SERVER_CLOSED


class _FailingSelector(selectors.DefaultSelector):
    """A selector whose select() fails once armed: a bug in the loop itself."""

    armed = threading.Event()

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        if self.armed.is_set():
            raise RuntimeError("selector exploded")
        return super().select(timeout)


def test_a_failed_loop_is_reported_never_lost() -> None:
    _FailingSelector.armed.clear()
    own = Reactor(_FailingSelector)
    own.start()
    server = CommandServer([RECEIVE, "hi"], verbose=False, reactor=own)
    _FailingSelector.armed.set()
    own.submit(lambda: None)  # wakes the loop, whose next select() fails
    own.join()
    assert isinstance(own.error, RuntimeError)
    with pytest.raises(RuntimeError, match="reactor thread failed") as caught:
        server.check()
    assert isinstance(caught.value.__cause__, RuntimeError)
    with pytest.raises(RuntimeError, match="reactor thread failed"):
        server.close()


def test_a_crashing_connection_ends_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    real = _machine.StepMachine.receive_data

    def explode(self: _machine.StepMachine, data: bytes, now: float) -> None:
        if data == b"boom":
            raise ZeroDivisionError("a bug")
        real(self, data, now)

    monkeypatch.setattr(_machine.StepMachine, "receive_data", explode)
    with CommandServer([RECEIVE, "fine"], verbose=False) as server:
        assert exchange(server.address, b"boom") == b""
        assert exchange(server.address, b"calm") == b"fine"  # the server goes on
        first, second = server.wait_for_connections(2)
        assert first.outcome is Outcome.ERROR
        assert "ZeroDivisionError: a bug" in (first.failure or "")
        assert second.outcome is Outcome.COMPLETED
        with pytest.raises(AssertionError, match=r"connection 0 .*internal error"):
            server.check()


def reactor_threads() -> list[threading.Thread]:
    return [thread for thread in threading.enumerate() if thread.name == "selectserver-reactor"]


def test_the_default_reactor_outlives_its_servers_and_stop_reactor_leaves_nothing() -> None:
    """One reactor serves a suite's successive servers; stop_reactor() leaves no thread or fd."""
    selectserver.stop_reactor()
    threads_before, fds_before = threading.active_count(), open_fds()
    with CommandServer("one", verbose=True) as first:
        assert exchange(first.address) == b"one"
        (thread,) = reactor_threads()
    with CommandServer("two", verbose=False) as second:
        assert exchange(second.address) == b"two"
        assert reactor_threads() == [thread]  # the same thread served both
    assert selectserver.statistics().running  # idle, within its grace period
    selectserver.stop_reactor()
    assert not thread.is_alive()
    assert not selectserver.statistics().running
    assert (threading.active_count(), open_fds()) == (threads_before, fds_before)
    with CommandServer("three", verbose=False) as third:  # a fresh reactor
        assert exchange(third.address) == b"three"
        assert reactor_threads() != [thread]
    selectserver.stop_reactor()
    assert (threading.active_count(), open_fds()) == (threads_before, fds_before)


def test_the_default_reactor_stops_after_its_idle_grace_period(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    selectserver.stop_reactor()
    monkeypatch.setattr(_reactor, "IDLE_SECONDS", 0.05)
    threads_before, fds_before = threading.active_count(), open_fds()
    with CommandServer("one", verbose=False) as server:
        assert exchange(server.address) == b"one"
        (thread,) = reactor_threads()
    thread.join(10)  # it stops by itself
    assert not thread.is_alive()
    assert (threading.active_count(), open_fds()) == (threads_before, fds_before)


def test_stop_reactor_closes_a_server_still_open() -> None:
    server = CommandServer([RECEIVE, "late"], verbose=False)
    with connect(server.address) as client:
        selectserver.stop_reactor()
        try:
            assert read_to_eof(client) == b""  # the script was cut short by the stop
        except ConnectionResetError:
            pass  # closed while still in the listening socket's backlog
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(server.address, timeout=5).close()
    server.close()  # idempotent after the stop
    selectserver.stop_reactor()  # and so is stopping


def test_servers_racing_an_idle_reactor_that_stops_at_once_all_get_served(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With no grace period, every close of a last server races the next constructor."""
    selectserver.stop_reactor()
    monkeypatch.setattr(_reactor, "IDLE_SECONDS", 0.0)
    failures: list[BaseException] = []

    def churn(name: str) -> None:
        try:
            for i in range(50):
                with CommandServer(f"{name}{i}", verbose=False) as server:
                    assert exchange(server.address) == f"{name}{i}".encode()
        except BaseException as exc:
            failures.append(exc)

    workers = [threading.Thread(target=churn, args=(name,)) for name in "abcd"]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(60)
    assert not any(worker.is_alive() for worker in workers)
    assert failures == []
    selectserver.stop_reactor()
    assert reactor_threads() == []


def statistics_on_the_reactor_thread(reactor: Reactor) -> ReactorStatistics:
    """The reactor's statistics, read between two passes of its loop (so consistent)."""
    result: list[ReactorStatistics] = []
    done = threading.Event()

    def read() -> None:
        result.append(reactor.statistics())
        done.set()

    reactor.submit(read)
    assert done.wait(10)
    return result[0]


def test_a_listener_that_stops_leaves_the_selector(reactor: Reactor) -> None:
    """Regression: stop_listening() once closed the socket without unregistering it."""
    with OneShotServer("hi", verbose=False, reactor=reactor) as server:
        assert exchange(server.address) == b"hi"
        server.wait_for_connections(1)
        stats = statistics_on_the_reactor_thread(reactor)
        assert stats.registered == 1 + stats.connections  # the wake-up socket and live ones


def test_stop_reactor_on_a_busy_reactor_times_out_and_says_why() -> None:
    """A Reply holding the reactor thread: stop_reactor(timeout) raises TimeoutError naming
    what it is busy with; once the Reply returns, the stop completes and a new server serves."""
    selectserver.stop_reactor()
    release, entered = threading.Event(), threading.Event()

    def slow(context: object) -> bytes:
        entered.set()
        release.wait(10)
        return b"late"

    server = CommandServer([RECEIVE, Reply(slow)], verbose=False)
    with connect(server.address) as client:
        client.sendall(b"go")
        assert entered.wait(10)
        (thread,) = reactor_threads()
        try:
            with pytest.raises(TimeoutError, match=r"did not stop within 0\.2 s: it is busy with"):
                selectserver.stop_reactor(timeout=0.2)
        finally:
            release.set()
        thread.join(10)
        assert not thread.is_alive()  # the stop went ahead once the Reply returned
    server.close()
    with CommandServer("fresh", verbose=False) as fresh:
        assert exchange(fresh.address) == b"fresh"
    selectserver.stop_reactor()
