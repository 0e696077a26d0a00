"""Regression tests written as a hostile user would: one (or a few) per defect fixed in the
reactor rebuild. Each also checks a *canary*: an unrelated server on the default reactor must
still answer a real client promptly while (or after) the hostile thing runs.

Nothing here sleeps to synchronise: tests wait on events, read to EOF, wait for records, or
run a *barrier* (a command that passes through the reactor's queue twice, so every socket
event that happened before it has been handled). Every loop is bounded in count and time.
"""

from __future__ import annotations

import errno
import functools
import gc
import math
import os
import random
import re
import select
import selectors
import socket
import threading
import time
import tracemalloc
import weakref
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar, cast

import pytest
from conftest import assert_refused, canary_answers, connect, open_fds, read_exactly, read_to_eof

import selectserver
from selectserver import (
    HALF_CLOSE,
    HANGUP,
    RECEIVE,
    STALL,
    BlackholeServer,
    CommandServer,
    ConnectionRecord,
    Delay,
    Drip,
    Expect,
    Garbage,
    OneShotServer,
    Outcome,
    Reactor,
    ReadUntil,
    RefusingServer,
    StartTLS,
    Throttle,
    compile_script,
)
from selectserver._connection import Listener
from selectserver._machine import DRAIN_SECONDS

#: How long a close() may take while something hostile runs.
PROMPT_SECONDS = 1.0
MiB = 1024 * 1024
T = TypeVar("T")


# ---- helpers ----------------------------------------------------------------------------------


def answers_on(reactor: Reactor) -> None:
    """An unrelated server on ``reactor`` answers a real round trip."""
    with CommandServer([RECEIVE, "pong"], verbose=False, reactor=reactor) as other:
        with connect(other.address) as sock:
            sock.sendall(b"ping")
            assert read_to_eof(sock) == b"pong"
        (record,) = other.wait_for_connections(1)
    assert record.outcome is Outcome.COMPLETED


def settle(reactor: Reactor, passes: int = 2, timeout: float = 5.0) -> None:
    """Return once the reactor has run ``passes`` more passes of its loop.

    A command runs at the end of a pass; the pass after the first barrier selected after
    the barrier was run, so it saw every socket event that happened before this call.
    """
    for _ in range(passes):
        done = threading.Event()
        assert reactor.submit(done.set), f"{reactor!r} has stopped"
        assert done.wait(timeout), f"{reactor!r} ran no pass within {timeout} s: {reactor.doing()}"


def timed_close(server: CommandServer) -> float:
    """Close ``server`` and return how long close() took."""
    start = time.monotonic()
    server.close()
    return time.monotonic() - start


def record_of(
    server: CommandServer, peer: object, ended: int, timeout: float = 5.0
) -> ConnectionRecord:
    """The ended record of the connection from ``peer``, once at least ``ended`` have ended.

    Under ``pytest -n`` a stranger (another worker checking that its freed port refuses) may
    connect to our port, so records are matched by address, never by count.
    """
    for extra in range(16):
        for record in server.wait_for_connections(ended + extra, timeout):
            if record.peer == peer:
                return record
    raise AssertionError(f"no ended record for {peer}: {server.connections}")


@pytest.fixture
def own_reactor() -> Iterator[Reactor]:
    """A started reactor of our own, closed (its thread joined) afterwards."""
    reactor = Reactor()
    reactor.start()
    yield reactor
    reactor.close(timeout=10)
    assert not reactor.thread.is_alive()


def tls_or_skip() -> None:
    pytest.importorskip("trustme")


# ---- 1. long waits do not kill the reactor ----------------------------------------------------

FOREVER: dict[str, Any] = {"timeout": None}  # no deadline: the long wait is the only timer
LONG_WAITS: Mapping[str, tuple[list[object], dict[str, Any], bytes, bytes]] = {
    # script, server arguments, what the client sends, what it reads before the long wait
    "delay-30-days": ([RECEIVE, "go", Delay(30 * 86400), "never"], FOREVER, b"go", b"go"),
    "delay-30-days-timeout": ([RECEIVE, "go", Delay(30 * 86400), "never"], {}, b"go", b"go"),
    "delay-1e300": ([RECEIVE, "go", Delay(1e300), "never"], FOREVER, b"go", b"go"),
    "timeout-1e8": ([RECEIVE, "go", RECEIVE], {"timeout": 1e8}, b"go", b"go"),
    "timeout-1e300": ([RECEIVE, "go", RECEIVE], {"timeout": 1e300}, b"go", b"go"),
    "timeout-none": ([RECEIVE, "go", RECEIVE], FOREVER, b"go", b"go"),
    "throttle-1e-8": ([RECEIVE, Throttle(1e-8), "ab"], FOREVER, b"go", b"a"),
    "drip-interval-1e8": ([RECEIVE, Drip(b"ab", chunk=1, interval=1e8)], FOREVER, b"go", b"a"),
}


def test_long_waits_keep_the_reactor_alive() -> None:
    """Waits of days (or 1e300 s) are many bounded selects: nothing overflows, nothing dies."""
    servers: list[CommandServer] = []
    clients: list[socket.socket] = []

    def start_client(server: CommandServer, request: bytes, first: bytes) -> None:
        client = socket.create_connection(server.address, timeout=5)
        clients.append(client)
        client.sendall(request)
        assert read_exactly(client, len(first)) == first  # now in the long wait

    try:
        for script, kwargs, request, first in LONG_WAITS.values():
            servers.append(CommandServer(script, verbose=False, **kwargs))
            start_client(servers[-1], request, first)
        reactor = servers[0]._reactor
        assert all(server._reactor is reactor for server in servers)
        # The reactor's next pass selects with nothing due for days; then it must still serve.
        settle(reactor)
        for server, (_, _, request, first) in zip(servers, LONG_WAITS.values(), strict=True):
            start_client(server, request, first)
        assert reactor.thread.is_alive()
        canary_answers(on=reactor)
        for server in servers:
            assert timed_close(server) < PROMPT_SECONDS
            assert [record.outcome for record in server.connections] == [Outcome.SERVER_CLOSED] * 2
            server.check()
        for client in clients:
            assert read_to_eof(client) == b""  # closed, not left hanging
        canary_answers()
    finally:
        for client in clients:
            client.close()
        for server in servers:
            server.close()


# ---- 6. a fast drip does not freeze other servers ---------------------------------------------


def test_a_one_byte_drip_to_a_fast_reader_does_not_freeze_the_reactor() -> None:
    payload_size = 2_000_000
    received: list[int] = []
    errors: list[BaseException] = []
    started = threading.Event()

    def reader(address: tuple[str, int]) -> None:
        try:
            with connect(address, timeout=10) as sock:
                sock.sendall(b"go")
                total = 0
                deadline = time.monotonic() + 30
                while total <= payload_size and time.monotonic() < deadline:
                    chunk = sock.recv(65536)
                    if not chunk:
                        break
                    total += len(chunk)
                    started.set()
                received.append(total)
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)
            started.set()

    drip = Drip(b"x" * payload_size, chunk=1, interval=0)
    server = CommandServer([RECEIVE, drip], verbose=False)
    thread = threading.Thread(target=reader, args=(server.address,), daemon=True)
    try:
        thread.start()
        assert started.wait(5), "the drip never started"
        canary_answers(on=server._reactor)
        canary_answers(on=server._reactor)
        assert server.connections[0].outcome is None  # the drip still runs
        assert timed_close(server) < PROMPT_SECONDS
        thread.join(10)
        assert not thread.is_alive(), "the drip's client never read EOF"
    finally:
        server.close()
    assert not errors, errors
    (total,) = received
    assert 0 < total <= payload_size
    (record,) = server.connections
    assert record.outcome in (Outcome.SERVER_CLOSED, Outcome.COMPLETED)
    assert record.sent == b"x" * record.bytes_sent
    server.check()


# ---- 7. bad arguments fail before anything is bound -------------------------------------------

BAD_ARGUMENTS: list[tuple[dict[str, Any], type[Exception], str]] = [
    ({"reactor": "r"}, TypeError, "reactor"),
    ({"reactor": 1}, TypeError, "reactor"),
    ({"reactor": object()}, TypeError, "reactor"),
    ({"timeout": "1"}, TypeError, "timeout"),
    ({"timeout": True}, TypeError, "timeout"),
    ({"timeout": -1}, ValueError, "timeout"),
    ({"timeout": 0}, ValueError, "timeout"),
    ({"timeout": math.nan}, ValueError, "timeout"),
    ({"timeout": math.inf}, ValueError, "timeout"),
    ({"max_receive": "1"}, TypeError, "max_receive"),
    ({"max_receive": 1.5}, TypeError, "max_receive"),
    ({"max_receive": True}, TypeError, "max_receive"),
    ({"max_receive": -1}, ValueError, "max_receive"),
    ({"max_connections": 0}, ValueError, "max_connections"),
    ({"max_connections": "1"}, TypeError, "max_connections"),
    ({"port": "80"}, TypeError, "port"),
    ({"port": 1.5}, TypeError, "port"),
    ({"port": True}, TypeError, "port"),
    ({"port": None}, TypeError, "port"),
    ({"port": -1}, ValueError, "port"),
    ({"port": 65536}, ValueError, "port"),
    ({"host": 1}, TypeError, "host"),
    ({"host": b"127.0.0.1"}, TypeError, "host"),
    ({"host": None}, TypeError, "host"),
    ({"path": 1}, TypeError, "path"),
    ({"path": ""}, TypeError, "path"),
    ({"path": b""}, TypeError, "path"),
    ({"path": ["a"]}, TypeError, "path"),
    ({"tls": "bogus"}, ValueError, "tls"),
    ({"tls": 3}, TypeError, "tls"),
]


def test_bad_arguments_raise_before_binding() -> None:
    """Every bad argument raises in the constructor, naming itself, and leaks no descriptor.

    The exceptions (and their tracebacks, which hold the constructor's frames) are kept alive
    while the descriptors are counted, so a socket made before the check would still be open.
    """
    caught: list[pytest.ExceptionInfo[Exception]] = []
    before = open_fds()
    for kwargs, kind, name in BAD_ARGUMENTS:
        with pytest.raises(kind) as excinfo:
            CommandServer("x", verbose=False, **kwargs)
        assert name in str(excinfo.value), (kwargs, excinfo.value)
        caught.append(excinfo)
    with pytest.raises(ValueError, match="Garbage") as garbage:
        Garbage(2**28)
    caught.append(garbage)
    for bad in (-1, "3", 2.0):
        with pytest.raises((TypeError, ValueError), match="Garbage") as excinfo:
            Garbage(bad)  # type: ignore[arg-type]
        caught.append(excinfo)
    assert open_fds() == before
    del caught
    canary_answers()


NOT_BINDING = [case for case in BAD_ARGUMENTS if not {"port", "host"} & case[0].keys()]


@pytest.mark.parametrize(
    ("kwargs", "kind", "name"),
    NOT_BINDING,
    ids=[f"{name}-{index}" for index, (_, _, name) in enumerate(NOT_BINDING)],
)
def test_bad_arguments_win_over_a_taken_port(
    kwargs: dict[str, Any], kind: type[Exception], name: str
) -> None:
    """Checked before the bind: a taken port would give OSError, a bad argument its own error."""
    with RefusingServer() as held, pytest.raises(kind, match=name):
        CommandServer("x", port=held.port, verbose=False, **kwargs)


# ---- 8. reactors that never started ------------------------------------------------------------


@pytest.mark.parametrize("factory", [selectors.DefaultSelector, selectors.SelectSelector])
def test_a_reactor_never_started_is_refused_at_once_and_leaks_nothing(
    factory: Callable[[], selectors.BaseSelector],
) -> None:
    before = open_fds()
    reactor = Reactor(factory)
    with_reactor = open_fds()
    start = time.monotonic()
    with pytest.raises(ValueError, match="never started") as excinfo:
        CommandServer("x", verbose=False, reactor=reactor)
    assert time.monotonic() - start < PROMPT_SECONDS
    assert open_fds() == with_reactor  # no port bound
    del excinfo
    reactor.close()
    assert open_fds() == before
    reactor.close()  # twice: still nothing
    assert open_fds() == before
    assert reactor.state == "stopped"
    with pytest.raises((ValueError, RuntimeError), match=r"never started|closed"):
        CommandServer("x", verbose=False, reactor=reactor)
    assert open_fds() == before
    canary_answers()


# ---- 9. a selector that fails costs one connection --------------------------------------------


def _is_tcp_connection(fileobj: object) -> bool:
    """An accepted TCP socket (not a listener, not the reactor's wake-up socketpair)."""
    if not isinstance(fileobj, socket.socket) or fileobj.family not in (
        socket.AF_INET,
        socket.AF_INET6,
    ):
        return False
    try:
        fileobj.getpeername()
    except OSError:
        return False
    return True


NO_MEMORY = os.strerror(errno.ENOMEM)


class FaultySelector(selectors.BaseSelector):
    """Delegates to a real selector; once armed, ``register``/``modify`` of an accepted TCP
    socket fails with ENOMEM. A failing ``modify`` drops the key first, as CPython's epoll
    selector does when ``epoll_ctl`` fails."""

    def __init__(self, inner: selectors.BaseSelector) -> None:
        self.inner = inner
        self.fail_register = 0
        self.fail_modify = 0
        self.failed: list[str] = []

    @staticmethod
    def _error() -> OSError:
        return OSError(errno.ENOMEM, NO_MEMORY)

    def register(self, fileobj: Any, events: int, data: Any = None) -> selectors.SelectorKey:
        if self.fail_register and _is_tcp_connection(fileobj):
            self.fail_register -= 1
            self.failed.append("register")
            raise self._error()
        return self.inner.register(fileobj, events, data)

    def unregister(self, fileobj: Any) -> selectors.SelectorKey:
        return self.inner.unregister(fileobj)

    def modify(self, fileobj: Any, events: int, data: Any = None) -> selectors.SelectorKey:
        if self.fail_modify and _is_tcp_connection(fileobj):
            self.fail_modify -= 1
            self.failed.append("modify")
            self.inner.unregister(fileobj)
            raise self._error()
        return self.inner.modify(fileobj, events, data)

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        return self.inner.select(timeout)

    def close(self) -> None:
        self.inner.close()

    def get_key(self, fileobj: Any) -> selectors.SelectorKey:
        return self.inner.get_key(fileobj)

    def get_map(self) -> Mapping[Any, selectors.SelectorKey]:
        return self.inner.get_map()


@pytest.fixture(
    params=[selectors.DefaultSelector, selectors.SelectSelector], ids=["default", "select"]
)
def faulty(request: pytest.FixtureRequest) -> Iterator[tuple[Reactor, FaultySelector]]:
    made: list[FaultySelector] = []

    def factory() -> selectors.BaseSelector:
        made.append(FaultySelector(request.param()))
        return made[-1]

    reactor = Reactor(factory)
    reactor.start()
    yield reactor, made[0]
    reactor.close(timeout=10)
    assert reactor.error is None


def test_a_failing_modify_costs_only_its_connection(
    faulty: tuple[Reactor, FaultySelector],
) -> None:
    reactor, selector = faulty
    payload = b"x" * (16 * MiB)  # more than the socket buffers hold: the send blocks
    with CommandServer(["hello", RECEIVE, payload], verbose=False, reactor=reactor) as server:
        with connect(server.address) as client:
            # The server sent hello and is registered for reading: the next change is a modify.
            assert read_exactly(client, 5) == b"hello"
            settle(reactor)  # the connection's turn is over: it waits to read, registered
            selector.fail_modify = 1
            client.sendall(b"go")
            record = record_of(server, client.getsockname(), 1)
            got = read_to_eof(client, limit=len(payload) + 1)
        assert selector.failed == ["modify"]
        assert record.outcome is Outcome.ERROR
        assert NO_MEMORY in (record.failure or "")
        assert len(got) < len(payload)
        with pytest.raises(AssertionError, match=NO_MEMORY):
            server.check()
        # The same server, another server on the same reactor, and the default reactor go on.
        with connect(server.address) as again:
            assert read_exactly(again, 5) == b"hello"
            again.sendall(b"go")
            assert read_to_eof(again, limit=len(payload) + 1) == payload
        answers_on(reactor)
        canary_answers()
        settle(reactor)
        assert reactor.statistics().connections == 0
        assert reactor.state == "running"


def test_a_failing_register_costs_only_its_connection(
    faulty: tuple[Reactor, FaultySelector],
) -> None:
    reactor, selector = faulty
    with CommandServer([RECEIVE, "pong"], verbose=False, reactor=reactor) as server:
        settle(reactor)  # the listener is registered
        selector.fail_register = 1
        with connect(server.address) as client:
            # The connection's first recv finds nothing: it registers for reading, which fails.
            assert read_to_eof(client) == b""
            record = record_of(server, client.getsockname(), 1)
        assert selector.failed == ["register"]
        assert record.outcome is Outcome.ERROR
        assert NO_MEMORY in (record.failure or "")
        with pytest.raises(AssertionError, match=NO_MEMORY):
            server.check()
        with connect(server.address) as again:
            again.sendall(b"ping")
            assert read_to_eof(again) == b"pong"
        answers_on(reactor)
        canary_answers()
        settle(reactor)
        assert reactor.statistics().connections == 0


# ---- 10. accept() errors and failing socket options ------------------------------------------


class FlakyListeningSocket:
    """Stands in for a listener's socket: ``accept()`` raises ``error`` the first ``times``
    times (without taking a connection, or, with ``consume``, after taking and closing one),
    then delegates. ``wrap`` may replace what the real accept returns."""

    def __init__(
        self,
        real: socket.socket,
        error: int,
        times: int,
        *,
        consume: bool = False,
        wrap: Callable[[socket.socket], object] | None = None,
    ) -> None:
        self.real = real
        self.error = error
        self.left = times
        self.raised = 0
        self.consume = consume
        self.wrap = wrap

    def accept(self) -> tuple[object, Any]:
        if self.left:
            if self.consume:
                lost, _ = self.real.accept()  # BlockingIOError if none waits: fine
                lost.close()
            self.left -= 1
            self.raised += 1
            raise OSError(self.error, os.strerror(self.error))
        sock, peer = self.real.accept()
        if self.wrap is not None:
            wrap, self.wrap = self.wrap, None
            return wrap(sock), peer
        return sock, peer

    def fileno(self) -> int:
        return self.real.fileno()

    def close(self) -> None:
        self.real.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)


def replace_listening_socket(server: CommandServer, make: Callable[[socket.socket], Any]) -> Any:
    """Swap the server's listening socket for ``make(real)`` on the reactor thread."""
    listener = server._listener
    reactor = server._reactor
    made: list[Any] = []
    done = threading.Event()

    def swap() -> None:
        real = listener.sock
        assert real is not None
        made.append(make(real))
        listener.sock = cast(socket.socket, made[0])
        done.set()

    assert reactor.submit(swap)
    assert done.wait(5)
    return made[0]


ACCEPT_ERRORS = ["EPROTO", "ENETDOWN", "EPERM", "ECONNABORTED", "ENOMEM", "EMFILE", "ENFILE"]
ACCEPT_ERRORS += ["ENOBUFS"]


@pytest.mark.parametrize("name", ACCEPT_ERRORS)
def test_accept_errors_do_not_stop_the_listener(name: str) -> None:
    code = getattr(errno, name)
    with CommandServer([RECEIVE, "pong"], verbose=False) as server:
        flaky: FlakyListeningSocket = replace_listening_socket(
            server, lambda real: FlakyListeningSocket(real, code, 3)
        )
        for _ in range(2):
            with connect(server.address) as client:
                client.sendall(b"ping")
                assert read_to_eof(client) == b"pong"
        canary_answers(on=server._reactor)
        assert flaky.raised == 3
        records = server.wait_for_connections(2)
        assert [record.outcome for record in records] == [Outcome.COMPLETED] * 2
        server.check()


@pytest.mark.parametrize("name", ["ECONNABORTED", "EPROTO"])
def test_a_connection_lost_in_accept_does_not_stop_the_listener(name: str) -> None:
    """A transient error that really loses the pending connection: the next one is served."""
    code = getattr(errno, name)
    with CommandServer([RECEIVE, "pong"], verbose=False) as server:
        flaky: FlakyListeningSocket = replace_listening_socket(
            server, lambda real: FlakyListeningSocket(real, code, 1, consume=True)
        )
        with connect(server.address) as lost:
            try:
                assert read_to_eof(lost) == b""
            except ConnectionResetError:
                pass  # closed before the kernel handed it over: also fine
        with connect(server.address) as client:
            client.sendall(b"ping")
            assert read_to_eof(client) == b"pong"
        assert flaky.raised == 1
        canary_answers(on=server._reactor)
        assert [record.outcome for record in server.wait_for_connections(1)] == [Outcome.COMPLETED]


class NoDelayRefused:
    """An accepted socket whose ``setsockopt(TCP_NODELAY)`` fails."""

    def __init__(self, real: socket.socket) -> None:
        self.real = real

    def setsockopt(self, level: int, option: int, value: Any) -> None:
        if (level, option) == (socket.IPPROTO_TCP, socket.TCP_NODELAY):
            raise OSError(errno.EINVAL, "TCP_NODELAY refused (injected)")
        self.real.setsockopt(level, option, value)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)


def test_a_failing_setsockopt_costs_only_its_connection() -> None:
    with CommandServer([RECEIVE, "pong"], verbose=False) as server:
        wrapped: list[NoDelayRefused] = []

        def wrap(real: socket.socket) -> object:
            wrapped.append(NoDelayRefused(real))
            return wrapped[0]

        replace_listening_socket(server, lambda real: FlakyListeningSocket(real, 0, 0, wrap=wrap))
        fds = open_fds()
        with connect(server.address) as client:
            assert read_to_eof(client) == b""
            record = record_of(server, client.getsockname(), 1)
        (accepted,) = wrapped
        assert accepted.real.fileno() == -1  # closed: no socket leaked
        assert open_fds() == fds
        assert record.outcome is Outcome.ERROR
        assert "TCP_NODELAY refused" in (record.failure or "")
        with pytest.raises(AssertionError, match="TCP_NODELAY refused"):
            server.check()
        with connect(server.address) as again:
            again.sendall(b"ping")
            assert read_to_eof(again) == b"pong"
        canary_answers(on=server._reactor)


# ---- 11. failing reactor commands, and close() with a timeout --------------------------------


def test_a_failing_attach_reaches_check(
    own_reactor: Reactor, monkeypatch: pytest.MonkeyPatch
) -> None:
    def explode(self: Listener, reactor: Reactor) -> None:
        raise RuntimeError("injected attach failure")

    monkeypatch.setattr(Listener, "attach", explode)
    server = CommandServer([RECEIVE, "x"], verbose=False, reactor=own_reactor)
    try:
        settle(own_reactor)
        monkeypatch.undo()
        with pytest.raises(AssertionError, match="injected attach failure"):
            server.check()
        answers_on(own_reactor)
        canary_answers()
    finally:
        assert timed_close(server) < PROMPT_SECONDS
    assert_refused(server.address)
    assert own_reactor.error is None


def test_a_failing_close_reaches_check(
    own_reactor: Reactor, monkeypatch: pytest.MonkeyPatch
) -> None:
    def explode(self: Listener, now: float) -> None:
        raise RuntimeError("injected close failure")

    server = CommandServer(["hi", STALL], verbose=False, reactor=own_reactor)
    with connect(server.address) as client:
        assert read_exactly(client, 2) == b"hi"
        settle(own_reactor)  # the stalling connection is registered for reading
        monkeypatch.setattr(Listener, "close", explode)
        try:
            assert timed_close(server) < PROMPT_SECONDS
        finally:
            monkeypatch.undo()
        assert read_to_eof(client) == b""  # its socket was closed all the same
    with pytest.raises(AssertionError, match="injected close failure"):
        server.check()
    assert_refused(server.address)
    settle(own_reactor)
    # Nothing of the failed server stays in the selector: a stale key would make the next
    # socket that reuses its descriptor number fail to register ("already registered").
    stale = {fd: key.data for fd, key in own_reactor._selector.get_map().items() if key.data}
    assert own_reactor.statistics().registered == 1, f"stale selector keys: {stale}"
    # Servers that come later, whose connections must register, are served.
    with CommandServer(["hello", RECEIVE, "pong"], verbose=False, reactor=own_reactor) as other:
        for _ in range(4):
            with connect(other.address) as sock:
                assert read_exactly(sock, 5) == b"hello"
                sock.sendall(b"ping")
                assert read_to_eof(sock) == b"pong"
        records = other.wait_for_connections(4)
        assert [record.outcome for record in records] == [Outcome.COMPLETED] * 4
        other.check()
    canary_answers()
    (record,) = server.connections
    assert record.outcome is not None, f"a closed server's record never ended: {record}"


def test_a_failing_submitted_command_does_not_stop_the_reactor(own_reactor: Reactor) -> None:
    def explode() -> None:
        raise ZeroDivisionError("injected command failure")

    assert own_reactor.submit(explode)
    settle(own_reactor)
    assert own_reactor.error is None
    answers_on(own_reactor)
    canary_answers()


def test_close_times_out_naming_what_blocks_the_reactor(own_reactor: Reactor) -> None:
    server = CommandServer([RECEIVE, "x"], verbose=False, reactor=own_reactor)
    settle(own_reactor)
    blocked, release = threading.Event(), threading.Event()

    def block() -> None:
        blocked.set()
        release.wait(5)

    try:
        assert own_reactor.submit(block)
        assert blocked.wait(5)
        canary_answers()  # the default reactor is another thread: unaffected
        start = time.monotonic()
        with pytest.raises(TimeoutError, match="busy with") as excinfo:
            server.close(timeout=0.2)
        assert 0.15 < time.monotonic() - start < PROMPT_SECONDS
        assert "0.2" in str(excinfo.value)
        start = time.monotonic()
        with pytest.raises(TimeoutError, match="busy with"):
            own_reactor.close(timeout=0.2)
        assert time.monotonic() - start < PROMPT_SECONDS
    finally:
        release.set()
    server.close(timeout=5)  # the second close waits for the first, now unblocked
    own_reactor.join(5)
    assert not own_reactor.thread.is_alive()
    assert own_reactor.error is None
    server.check()


# ---- 12. TLS HALF_CLOSE keeps what the peer sent ---------------------------------------------


@pytest.mark.parametrize("when", ["right-away", "after-eof"])
def test_tls_half_close_keeps_what_the_peer_sent(when: str) -> None:
    tls_or_skip()
    script = [StartTLS(), Delay(0.3), ReadUntil(b"\n"), HALF_CLOSE, RECEIVE]
    rounds, at_once = 4, 5  # 20 sessions, five at a time
    with CommandServer(script, tls=True, verbose=False, timeout=10) as server:
        context = server.client_ssl_context()

        def client(_: int) -> tuple[Any, bytes]:
            raw = socket.create_connection(server.address, timeout=10)
            with context.wrap_socket(raw, server_hostname="localhost") as tls:
                name = tls.getsockname()
                tls.sendall(b"a\n")
                if when == "right-away":
                    tls.sendall(b"more")
                eof = tls.recv(100)  # the server's close_notify, after HALF_CLOSE
                if when == "after-eof":
                    tls.sendall(b"more")
            return name, eof

        results: list[tuple[Any, bytes]] = []
        with ThreadPoolExecutor(at_once) as pool:
            for _ in range(rounds):
                results += pool.map(client, range(at_once))
                canary_answers(on=server._reactor)
        ended = server.wait_for_connections(rounds * at_once, 10)
        records = {record.peer: record for record in ended}
        for name, eof in results:
            assert eof == b""
            record = records[name]
            assert record.received == [b"a\n", b"more"], record.describe()
            assert record.outcome is Outcome.COMPLETED, record.describe()
            assert record.tls
            assert record.half_closed
        server.check()


# ---- 13. Unix socket files: only our own is removed ------------------------------------------


def test_a_relative_unix_path_survives_chdir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    here, elsewhere = tmp_path / "here", tmp_path / "elsewhere"
    here.mkdir()
    elsewhere.mkdir()
    monkeypatch.chdir(here)
    server = CommandServer([RECEIVE, "pong"], path="s.sock", verbose=False)
    try:
        with socket.socket(socket.AF_UNIX) as client:
            client.settimeout(5)
            client.connect("s.sock")
            client.sendall(b"ping")
            assert read_to_eof(client) == b"pong"
        monkeypatch.chdir(elsewhere)
        (elsewhere / "s.sock").write_text("an unrelated file")
        canary_answers(on=server._reactor)
    finally:
        server.close()
    assert not (here / "s.sock").exists()  # our socket is gone
    assert (elsewhere / "s.sock").read_text() == "an unrelated file"  # theirs is not


def test_close_leaves_a_file_that_replaced_the_socket(tmp_path: Path) -> None:
    path = str(tmp_path / "s.sock")
    server = CommandServer([RECEIVE, "pong"], path=path, verbose=False)
    try:
        os.unlink(path)
        Path(path).write_text("not a socket")
        canary_answers(on=server._reactor)
    finally:
        server.close()
    assert Path(path).read_text() == "not a socket"


def test_close_leaves_another_servers_socket_at_the_same_path(tmp_path: Path) -> None:
    path = str(tmp_path / "s.sock")
    first = CommandServer([RECEIVE, "first"], path=path, verbose=False)
    try:
        os.unlink(path)
        with CommandServer([RECEIVE, "second"], path=path, verbose=False) as second:
            first.close()
            assert os.path.exists(path)
            with socket.socket(socket.AF_UNIX) as client:
                client.settimeout(5)
                client.connect(second.path)  # type: ignore[arg-type]
                client.sendall(b"ping")
                assert read_to_eof(client) == b"second"
            canary_answers(on=second._reactor)
        assert not os.path.exists(path)
    finally:
        first.close()


# ---- 14. a record ends only once the FIN is on the wire --------------------------------------


def test_wait_for_connections_returns_after_the_fin() -> None:
    exchanges = 500
    peers: list[Any] = []
    with CommandServer([RECEIVE, "ok"], verbose=False) as server:
        for k in range(exchanges):
            with connect(server.address) as client:
                client.sendall(b"hi")
                peer = client.getsockname()
                peers.append(peer)
                record = record_of(server, peer, k + 1)
                assert record.outcome is Outcome.COMPLETED
                readable, _, _ = select.select([client], [], [], 0)
                assert readable, f"exchange {k}: the record ended before the reply was readable"
                client.setblocking(False)
                assert client.recv(100) == b"ok"
                try:
                    eof = client.recv(100)
                except BlockingIOError:
                    pytest.fail(f"exchange {k}: the record ended before the FIN arrived")
                assert eof == b"", f"exchange {k}"
        canary_answers(on=server._reactor)
        records = server.wait_for_connections(exchanges)
    ours = [record for record in records if record.peer in set(peers)]
    assert [record.peer for record in ours] == peers  # sequential clients: ended in order
    assert all(record.outcome is Outcome.COMPLETED for record in ours)
    ended = [record.ended_at for record in records]
    assert None not in ended
    assert ended == sorted(ended)  # type: ignore[type-var]
    server.check()


# ---- 15. record.step names the running step --------------------------------------------------


def test_record_step_names_the_running_step() -> None:
    with (
        CommandServer([RECEIVE, Delay(5), "x"], verbose=False) as server,
        connect(server.address) as client,
    ):
        client.sendall(b"hi")
        settle(server._reactor)
        (record,) = server.connections
        assert record.received == [b"hi"]
        assert record.outcome is None
        assert record.step == 1
        assert "running step 1" in record.describe()
        assert "step 1 (Delay" in record.waiting_for()
        canary_answers(on=server._reactor)
        server.close()
        assert read_to_eof(client) == b""
    (ended,) = server.connections  # the same record, now ended (mypy narrowed the old name)
    assert ended.outcome is Outcome.SERVER_CLOSED
    assert ended.step == 1  # where it ended


# ---- 16. unread bytes are counted in discarded -----------------------------------------------

DISCARDING: Mapping[str, tuple[list[object], bytes, bytes, Outcome]] = {
    # script (after a "hi" greeting), request (one send), bytes sent after EOF, outcome
    "end-of-script": ([ReadUntil(b"\n"), "ok"], b"line\nleft over", b"late", Outcome.COMPLETED),
    "after-last-read-until": (
        [ReadUntil(b"\n"), ReadUntil(b"\n")],
        b"a\nb\nc-left",
        b"late",
        Outcome.COMPLETED,
    ),
    "hangup": ([ReadUntil(b"\n"), HANGUP], b"a\nrest", b"late", Outcome.HUNG_UP),
    "expect": ([Expect(b"GO"), "ok"], b"xxGOyy", b"late", Outcome.COMPLETED),
    "half-close": ([ReadUntil(b"\n"), HALF_CLOSE], b"a\nrest", b"late", Outcome.COMPLETED),
    "stall": ([STALL], b"stalled bytes", b"", Outcome.PEER_CLOSED),
    "stall-after-read": ([ReadUntil(b"\n"), STALL], b"x\nbuffered", b"", Outcome.PEER_CLOSED),
}


@pytest.mark.parametrize("case", list(DISCARDING))
def test_unread_bytes_are_counted_as_discarded(case: str) -> None:
    script, request, late, outcome = DISCARDING[case]
    with CommandServer(["hi", *script], verbose=False) as server:
        with connect(server.address) as client:
            assert read_exactly(client, 2) == b"hi"  # the server waits to read: one recv
            client.sendall(request)
            if late:
                read_to_eof(client)  # the server's graceful end
                client.sendall(late)  # drained
            client.shutdown(socket.SHUT_WR)
            read_to_eof(client)
            peer = client.getsockname()
        record = record_of(server, peer, 1)
        settle(server._reactor)  # the drain has read what came after the end
        canary_answers(on=server._reactor)
    assert record.outcome is outcome
    total = len(request) + len(late)
    assert sum(map(len, record.received)) + record.discarded == total, record
    assert record.discarded > 0


# ---- 17. record.sent does not share the caller's buffer --------------------------------------


@pytest.mark.parametrize("kind", ["bytearray", "drip"])
def test_record_sent_does_not_share_the_callers_bytearray(kind: str) -> None:
    payload = bytearray(b"abcdef")
    step: object = payload if kind == "bytearray" else Drip(payload, chunk=2, interval=0)
    with CommandServer([RECEIVE, step], verbose=False) as server:
        payload.extend(b"!")  # before any connection: no BufferError
        del payload[-1]
        with connect(server.address) as client:
            client.sendall(b"go")
            assert read_to_eof(client) == b"abcdef"
        (record,) = server.wait_for_connections(1)
        payload[0:1] = b"Z"
        payload.extend(b"more")  # still serving: no BufferError
        assert record.sent == b"abcdef"
        canary_answers(on=server._reactor)
    payload.clear()
    assert record.sent == b"abcdef"


# ---- 18. plaintext before TLS is an injection ------------------------------------------------


def test_plaintext_pipelined_before_starttls_is_reported() -> None:
    tls_or_skip()
    script = [ReadUntil(b"\r\n"), "220 go\r\n", StartTLS(), RECEIVE, "ok"]
    with CommandServer(script, tls=True, verbose=False) as server:
        with connect(server.address) as raw:
            raw.sendall(b"STARTTLS\r\nRCPT TO:<injected>\r\n")
            assert read_exactly(raw, 8) == b"220 go\r\n"
            with server.client_ssl_context().wrap_socket(raw, server_hostname="localhost") as tls:
                tls.sendall(b"hello")
                assert read_to_eof(cast(socket.socket, tls)) == b"ok"
        (record,) = server.wait_for_connections(1)
        canary_answers(on=server._reactor)
    assert record.received[0] == b"STARTTLS\r\n"
    assert not any(b"injected" in data for data in record.received[1:])
    assert not any(b"injected" in data for data in server.received[1:])
    assert record.received[1:] == [b"hello"]
    assert record.tls
    with pytest.raises(AssertionError, match="CVE-2011-0411"):
        server.check()


# ---- 19, 20. big scripts and big steps -------------------------------------------------------


def test_compile_script_is_linear() -> None:
    def timed(steps: int) -> float:
        script: list[object] = [RECEIVE, "x"] * (steps // 2)
        start = time.perf_counter()
        compiled = compile_script(script)
        elapsed = time.perf_counter() - start
        assert len(compiled) == steps
        return elapsed

    # Loose on purpose (a shared machine is noisy): quadratic would be 100 times slower.
    collecting = gc.isenabled()
    gc.disable()
    try:
        small = min(timed(10_000) for _ in range(3))
        large = min(timed(100_000) for _ in range(2))
    finally:
        if collecting:
            gc.enable()
    assert large < 40 * small + 0.1, (small, large)
    with CommandServer([RECEIVE, "x"] * 50_000, verbose=False) as server:
        with connect(server.address) as client:
            client.sendall(b"a")
            assert read_exactly(client, 1) == b"x"
        canary_answers(on=server._reactor)


def peak_memory(action: Callable[[], T]) -> tuple[int, T]:
    """What ``action`` returned, and the most memory it allocated at once (tracemalloc)."""
    tracemalloc.start()
    try:
        result = action()
        return tracemalloc.get_traced_memory()[1], result
    finally:
        tracemalloc.stop()


def test_labels_of_huge_steps_are_short_and_cheap() -> None:
    """A label is built from a bounded piece of the payload, never from its whole repr."""
    big = random.Random(0).randbytes(2**26)  # random bytes: a repr four times their size
    cheap: list[object] = [big, memoryview(big), Drip(big), ReadUntil(big[: 2**20])]
    copied: list[object] = [bytearray(big), "y" * 2**26]  # compiling copies these once
    for step in cheap + copied:
        peak, (only,) = peak_memory(functools.partial(compile_script, [step]))
        label = cast(Any, only).label
        assert len(label) <= 60, (type(step), label)
        copies = any(step is other for other in copied)
        allowed = 2**26 + 2**20 if copies else 2**20
        assert peak < allowed, f"{type(step).__name__}: {peak / MiB:.0f} MiB to compile"
    canary_answers()


HOLDERS: Mapping[str, Callable[[bytes], object]] = {
    "tuple": lambda big: (big,),
    "list": lambda big: [big],
    "dict": lambda big: {"body": big},
}


@pytest.mark.parametrize("holder", list(HOLDERS))
def test_the_error_for_a_bad_step_holding_a_huge_payload_is_short_and_cheap(holder: str) -> None:
    """A bad step that holds a 64 MiB payload: its error names it in a few words, without
    building the payload's repr (about 256 MiB for random bytes) to cut 60 characters."""
    step = HOLDERS[holder](random.Random(0).randbytes(2**26))
    errors: list[str] = []

    def compile_bad() -> None:
        try:
            compile_script([b"fine", step])
        except TypeError as exc:
            errors.append(str(exc))

    peak, _ = peak_memory(compile_bad)
    (message,) = errors
    assert message.startswith("script[1] = ")
    assert len(message) < 400, message
    assert peak < 16 * MiB, f"{peak / MiB:.0f} MiB to say that script[1] is bad"
    canary_answers()


# ---- 21. a one-byte drip keeps one view ------------------------------------------------------


def test_a_one_byte_drip_keeps_one_view_of_its_payload() -> None:
    payload = bytes(range(256)) * 1200  # 307 kB
    with CommandServer([RECEIVE, Drip(payload, chunk=1, interval=0)], verbose=False) as server:
        with connect(server.address) as client:
            client.sendall(b"go")
            canary_answers(on=server._reactor)
            assert read_to_eof(client) == payload
        (record,) = server.wait_for_connections(1)
    assert len(record._sent) == 1
    assert record.sent == payload
    assert record.bytes_sent == len(payload)


# ---- 22. timers stay bounded -----------------------------------------------------------------


@pytest.mark.parametrize(
    "first", [Delay(0.001), Drip(b"ab", chunk=1, interval=0.001)], ids=["delay", "drip"]
)
def test_timers_stay_bounded_over_many_steps(own_reactor: Reactor, first: object) -> None:
    steps = 1500
    script: list[object] = [first, *(["x", Delay(0)] * steps), RECEIVE]
    expected = (b"ab" if isinstance(first, Drip) else b"") + b"x" * steps
    most = 0
    with CommandServer(script, verbose=False, reactor=own_reactor) as server:
        with connect(server.address) as client:
            got = bytearray()
            for _ in range(len(expected)):
                chunk = client.recv(len(expected) - len(got))
                assert chunk, f"EOF after {len(got)} bytes"
                got += chunk
                most = max(most, own_reactor.statistics().timers)
                if len(got) == len(expected):
                    break
            assert bytes(got) == expected
            settle(own_reactor)  # now waiting at the final RECEIVE
            (record,) = server.connections
            assert record.step == len(script) - 1
            most = max(most, own_reactor.statistics().timers)
            canary_answers()
            client.sendall(b"end")
            assert read_to_eof(client) == b""
        server.wait_for_connections(1)
    assert most < 50, most
    settle(own_reactor)
    assert own_reactor.statistics().timers == 0


# ---- 23. Expect after 80 MiB -----------------------------------------------------------------


class CountingPattern:
    """A compiled pattern that counts the bytes its searches scan."""

    def __init__(self, regex: re.Pattern[bytes]) -> None:
        self.regex = regex
        self.pattern = regex.pattern
        self.flags = regex.flags
        self.scanned = 0
        self.searches = 0

    def search(self, string: bytes | bytearray, pos: int = 0, endpos: int | None = None) -> Any:
        end = len(string) if endpos is None else min(endpos, len(string))
        self.scanned += max(0, end - pos)
        self.searches += 1
        return self.regex.search(string, pos, end)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.regex, name)


@pytest.mark.parametrize("pattern", [b"END!", rb"END[^!]*!"], ids=["bounded", "unbounded"])
def test_expect_after_80_mib(pattern: bytes) -> None:
    """The match completes, and the searches scan the bytes a bounded number of times (not
    once per read: that is quadratic, 13 GB of scanning here)."""
    filler = 80 * MiB
    piece = b"x" * MiB
    errors: list[BaseException] = []
    halfway = threading.Event()
    start = time.monotonic()
    expect = Expect(pattern)
    counting = CountingPattern(expect.regex)
    object.__setattr__(expect, "regex", counting)
    with CommandServer([expect, "ok"], verbose=False, max_receive=128 * MiB, timeout=30) as server:

        def upload(client: socket.socket) -> None:
            try:
                for index in range(filler // MiB):
                    client.sendall(piece)
                    if index == 8:
                        halfway.set()
                client.sendall(b"END!")
            except BaseException as exc:
                errors.append(exc)
            finally:
                halfway.set()

        with connect(server.address, timeout=30) as client:
            thread = threading.Thread(target=upload, args=(client,), daemon=True)
            thread.start()
            assert halfway.wait(30)
            canary_answers(on=server._reactor)
            thread.join(60)
            assert not thread.is_alive()
            assert not errors, errors
            assert read_to_eof(client) == b"ok"
        (record,) = server.wait_for_connections(1, timeout=30)
    assert time.monotonic() - start < 45
    assert record.outcome is Outcome.COMPLETED
    (data,) = record.received
    assert len(data) == filler + 4
    assert data.endswith(b"END!")
    # Linear: about once with a width bound, a few times without (doubling, pauses).
    times = 2 if counting.regex.pattern == b"END!" else 20
    assert counting.scanned < times * filler, (counting.searches, counting.scanned)
    server.check()


def test_expect_past_max_receive_fails_promptly() -> None:
    with CommandServer([Expect(rb"END[^!]*!"), "ok"], verbose=False, max_receive=4 * MiB) as srv:
        with connect(srv.address) as client:
            try:
                for _ in range(16):
                    client.sendall(b"x" * MiB)
                read_to_eof(client)
            except OSError:
                pass  # the server closed on us: that is the point
        (record,) = srv.wait_for_connections(1)
        canary_answers(on=srv._reactor)
    assert record.outcome is Outcome.ERROR
    assert "max_receive" in (record.failure or "")
    with pytest.raises(AssertionError, match="max_receive"):
        srv.check()


# ---- 24. a peer that never closes does not hold the server's socket --------------------------


def test_the_drain_ends_when_the_peer_never_closes() -> None:
    with CommandServer([RECEIVE, "bye"], verbose=False, timeout=0.5) as server:
        with connect(server.address) as client:
            client.sendall(b"hi")
            assert read_to_eof(client) == b"bye"
            eof_at = time.monotonic()
            (record,) = server.wait_for_connections(1)
            assert record.outcome is Outcome.COMPLETED
            canary_answers(on=server._reactor)
            # The client keeps its socket open. Once the server has closed its end, a byte the
            # client sends is answered with RST; until then it is drained.
            closed_after = None
            for _ in range(200):
                try:
                    client.send(b".")
                    if client.recv(1) != b"":
                        pytest.fail("the server sent more after its EOF")
                except (ConnectionResetError, BrokenPipeError):
                    closed_after = time.monotonic() - eof_at
                    break
                if time.monotonic() - eof_at > DRAIN_SECONDS + 3:
                    break
                threading.Event().wait(0.05)  # a probe every 50 ms
            assert closed_after is not None, "the server's socket stayed open"
            assert closed_after < DRAIN_SECONDS + 1.5, closed_after
        settle(server._reactor)
        assert selectserver.statistics().connections == 0
        assert record.discarded > 0  # the probes sent before the close were drained
    server.check()


# ---- weak references -------------------------------------------------------------------------


def test_servers_can_be_weakly_referenced() -> None:
    servers: list[Any] = [
        CommandServer("x", verbose=False),
        OneShotServer("x", verbose=False),
        RefusingServer(),
        BlackholeServer(),
    ]
    try:
        refs = [weakref.ref(server) for server in servers]
        assert [ref() for ref in refs] == servers
        canary_answers(on=servers[0]._reactor)
    finally:
        for server in servers:
            server.close()


@pytest.mark.parametrize("cls", [CommandServer, OneShotServer])
def test_a_closed_server_is_not_kept_alive(cls: type[CommandServer]) -> None:
    """Once closed and dropped, a server (and the records it holds) can be collected, even
    when it was the last server of the default reactor, which then stops."""
    server = cls([RECEIVE, "pong"], verbose=False)
    with connect(server.address) as client:
        client.sendall(b"ping")
        assert read_to_eof(client) == b"pong"
    server.wait_for_connections(1)
    ref = weakref.ref(server)
    server.close()
    del server
    gc.collect()
    assert ref() is None, f"{ref()!r} is still referenced by {gc.get_referrers(ref())}"
    canary_answers()
