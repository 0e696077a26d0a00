"""What tests assert on: one record per connection, and a server's log of them.

The reactor thread writes these records while tests read them from their own threads. Each
record is appended to or replaced whole (list appends, attribute stores), which is safe under the
GIL. A thread waiting for connections to end parks on a lock of its own that the reactor
releases: the reactor never waits for a lock that a test thread (or a signal handler
interrupting one) may hold.
"""

from __future__ import annotations

import _thread
import asyncio
import enum
import threading
import time
from collections.abc import Callable
from typing import Protocol, Union

__all__ = ["DEFAULT_MAX_RECEIVE", "ConnectionRecord", "Latch", "Outcome", "ServerLog", "Signal"]

# Makes each ServerLog's Signal once (waiters only). Re-entrant: a signal handler that waits
# may interrupt its own thread while it holds the lock.
_WAITERS_LOCK = threading.RLock()

#: What one connection's record keeps of the bytes it received, unless told otherwise.
DEFAULT_MAX_RECEIVE = 64 * 1024 * 1024


class Latch:
    """A one-shot event whose :meth:`set` never blocks (``threading.Event.set`` takes a lock
    that a waiter, interrupted by a signal handler, may hold)."""

    __slots__ = ("_lock", "_set")

    def __init__(self) -> None:
        self._set = False
        self._lock = _thread.allocate_lock()
        self._lock.acquire()

    def is_set(self) -> bool:
        return self._set

    def set(self) -> None:
        if not self._set:
            self._set = True
            try:
                self._lock.release()
            except RuntimeError:
                pass  # released by another set() just now

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until set (True) or ``timeout`` seconds pass (False)."""
        if self._set:
            return True
        limit = threading.TIMEOUT_MAX if timeout is None else min(timeout, threading.TIMEOUT_MAX)
        if self._lock.acquire(timeout=max(limit, 0.0)):
            self._lock.release()  # pass it on to the next waiter
        return self._set


class Signal:
    """Wakes threads and asyncio tasks waiting for a condition that the reactor makes true.

    :meth:`notify` never blocks: each waiting thread parks on a lock of its own that notify
    releases, and each waiting task on a future that notify completes with the loop's
    ``call_soon_threadsafe``. Waiters test their condition again after registering, so no
    wake-up is lost.
    """

    __slots__ = ("_futures", "_locks")

    def __init__(self) -> None:
        self._locks: list[_thread.LockType] = []
        self._futures: list[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]] = []

    def notify(self) -> None:
        locks, futures = self._locks, self._futures
        while locks:
            try:
                locks.pop().release()
            except IndexError:
                break  # another notify took the last one
        while futures:
            try:
                loop, future = futures.pop()
            except IndexError:
                break
            try:
                loop.call_soon_threadsafe(_resolve, future)
            except RuntimeError:
                pass  # the loop is closed: nobody waits any more

    def wait(self, done: Callable[[], bool], timeout: float | None) -> bool:
        """Wait until ``done()`` holds (True) or ``timeout`` seconds pass (False)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not done():
            lock = _thread.allocate_lock()
            lock.acquire()
            self._locks.append(lock)
            if done():
                break
            left = threading.TIMEOUT_MAX if deadline is None else deadline - time.monotonic()
            if left <= 0 or not lock.acquire(timeout=min(left, threading.TIMEOUT_MAX)):
                try:
                    self._locks.remove(lock)
                except ValueError:
                    pass  # a notify took it just now
                return done()
        return True

    async def wait_async(self, done: Callable[[], bool], timeout: float | None) -> bool:
        """:meth:`wait` for a coroutine, on the running loop."""
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        while not done():
            future: asyncio.Future[None] = loop.create_future()
            entry = (loop, future)
            self._futures.append(entry)
            if done():
                break
            left = None if deadline is None else deadline - loop.time()
            try:
                if left is not None and left <= 0:
                    raise asyncio.TimeoutError
                await asyncio.wait_for(future, left)
            except asyncio.TimeoutError:
                try:
                    self._futures.remove(entry)
                except ValueError:
                    pass
                return done()
        return True


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


def _check_wait(name: str, n: object, timeout: object) -> None:
    if isinstance(n, bool) or not isinstance(n, int):
        raise TypeError(f"{name}: n must be an int >= 0, got {n!r}")
    if n < 0:
        raise ValueError(f"{name}: n must be an int >= 0, got {n!r}")
    if timeout is not None and (
        isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout >= 0
    ):
        raise ValueError(f"{name}: timeout must be a number >= 0 or None, got {timeout!r}")


class Outcome(enum.Enum):
    """How a connection ended."""

    COMPLETED = "completed"
    """The script ran to its end; the server closed gracefully."""
    HUNG_UP = "hung up"
    """The script said HANGUP; the server closed gracefully."""
    RESET = "reset"
    """The script said RESET; the server aborted the connection."""
    TRUNCATED = "truncated"
    """The script said TRUNCATE; the server closed without TLS close_notify."""
    CLOSED = "closed"
    """The script said CLOSE; the server closed at once, without draining."""
    PEER_CLOSED = "peer closed"
    """The peer closed before the script ended."""
    PEER_RESET = "peer reset"
    """The peer reset the connection before the script ended."""
    TIMED_OUT = "timed out"
    """The peer was silent for longer than the server's ``timeout``."""
    TLS_FAILED = "TLS failed"
    """The TLS handshake or a TLS record failed (e.g. the client rejected the certificate)."""
    SERVER_CLOSED = "server closed"
    """``close()`` ended the connection before the script did."""
    ERROR = "error"
    """Something else went wrong (see ``failure``)."""

    def __repr__(self) -> str:
        return f"Outcome.{self.name}"


class _Sink(Protocol):
    """Who hears of a record's received bytes and of its end: its :class:`ServerLog`."""

    def _received(self, data: bytes) -> None: ...

    def _end(self, record: ConnectionRecord) -> None: ...


class _Describes(Protocol):
    """What says what a running connection waits for: its step machine."""

    def describe(self) -> str: ...


class _EndHook:
    """A :class:`_Sink` that calls ``on_end`` (``ConnectionRecord(_on_end=)``, for tests)."""

    __slots__ = ("_on_end",)

    def __init__(self, on_end: Callable[[ConnectionRecord], None]) -> None:
        self._on_end = on_end

    def _received(self, data: bytes) -> None:
        pass

    def _end(self, record: ConnectionRecord) -> None:
        self._on_end(record)


class _Rare:
    """The attributes of a record that most connections leave at their defaults.

    Every record starts with the one shared :data:`_DEFAULTS` (never written), and gets a
    :class:`_Rare` of its own the first time one of them changes.
    """

    __slots__ = ("discarded", "dropped", "peer_certificate", "tls")

    def __init__(self) -> None:
        self.tls = False
        self.peer_certificate: dict[str, object] | None = None
        self.discarded = 0
        self.dropped = 0


_DEFAULTS = _Rare()

#: A piece of what a connection sent: a send step's whole payload (bytes), or a view of it.
_Piece = Union[bytes, memoryview]


def _piece(view: memoryview) -> _Piece:
    """``view`` as it is kept: the payload itself when the view covers all of a bytes object
    (a view costs 184 bytes, the script already holds the payload), else the view."""
    obj = view.obj
    if type(obj) is bytes and view.nbytes == len(obj):
        return obj
    return view


class ConnectionRecord:
    """The transcript of one accepted connection, updated live by the reactor.

    Attributes:
        index: the connection's number on its server, from 0, in accept order.
        peer: the client's address, as ``socket.accept()`` gave it.
        accepted_at: ``time.monotonic()`` when the server accepted it.
        received: the bytes of each receive step, in order; the last may be the partial bytes
            of a step that the end of the connection cut short.
        outcome: how it ended, or None while it is still running.
        failure: why the connection failed (an unmatched ``Expect``, a timeout, an error),
            or None. ``check()`` reports every failure.
        detail: why the connection ended before its script did, in words (the peer closed,
            the TLS error...), or None.
        ended_at: ``time.monotonic()`` when it ended, or None.
        step: the index of the script step running now, or the one where it ended.
        half_closed: whether the script shut down the sending side (``HALF_CLOSE``).
        tls: whether a TLS session was established.
        peer_certificate: the client's certificate (``getpeercert()``), if it sent one that
            the server's context verified; None otherwise.
        discarded: bytes read and thrown away (during ``STALL`` and the drain after the end).
        dropped: bytes received but not kept because of ``max_receive``.
        max_receive: how many received bytes this record keeps at most.

    A server keeps one record per connection for as long as it lives, so a record is small:
    slots only; ``tls``, ``peer_certificate``, ``discarded`` and ``dropped`` share one object
    of defaults until one of them changes; what was sent is kept as the send
    steps' own payloads (a view only for a step sent in part); and once the connection has
    ended the record no longer refers to its step machine, socket or executor.
    """

    __slots__ = (
        "_describer",
        "_rare",
        "_sends",
        "_sink",
        "accepted_at",
        "bytes_sent",
        "detail",
        "ended_at",
        "failure",
        "half_closed",
        "index",
        "kept",
        "max_receive",
        "outcome",
        "peer",
        "received",
        "step",
    )

    __match_args__ = (
        "index",
        "peer",
        "accepted_at",
        "received",
        "outcome",
        "failure",
        "detail",
        "ended_at",
        "step",
        "half_closed",
        "tls",
        "peer_certificate",
        "discarded",
        "dropped",
        "max_receive",
    )

    def __init__(
        self,
        index: int,
        peer: object,
        accepted_at: float | None = None,
        received: list[bytes] | None = None,
        outcome: Outcome | None = None,
        failure: str | None = None,
        detail: str | None = None,
        ended_at: float | None = None,
        step: int = 0,
        half_closed: bool = False,
        tls: bool = False,
        peer_certificate: dict[str, object] | None = None,
        discarded: int = 0,
        dropped: int = 0,
        max_receive: int = DEFAULT_MAX_RECEIVE,
        kept: int = 0,
        bytes_sent: int = 0,
        _on_end: Callable[[ConnectionRecord], None] | None = None,
        *,
        _sink: _Sink | None = None,
    ) -> None:
        self.index = index
        self.peer = peer
        self.accepted_at = time.monotonic() if accepted_at is None else accepted_at
        self.received: list[bytes] = [] if received is None else received
        self.outcome = outcome
        self.failure = failure
        self.detail = detail
        self.ended_at = ended_at
        self.step = step
        self.half_closed = half_closed
        self._rare = _DEFAULTS
        self.tls = tls
        self.peer_certificate = peer_certificate
        self.discarded = discarded
        self.dropped = dropped
        self.max_receive = max_receive
        self.kept = kept
        self.bytes_sent = bytes_sent
        # None, one piece, or a list of them: one per send step (most send one or two).
        self._sends: _Piece | list[_Piece] | None = None
        self._sink = _EndHook(_on_end) if _sink is None and _on_end is not None else _sink
        # What the running connection waits for (its step machine); None once it has ended.
        self._describer: _Describes | None = None

    def __repr__(self) -> str:
        fields = ", ".join(f"{name}={getattr(self, name)!r}" for name in self.__match_args__)
        return f"{type(self).__qualname__}({fields})"

    # ---- the rare attributes ------------------------------------------------------------------

    def _own_rare(self) -> _Rare:
        rare = self._rare
        if rare is _DEFAULTS:
            rare = self._rare = _Rare()
        return rare

    @property
    def tls(self) -> bool:
        """Whether a TLS session was established."""
        return self._rare.tls

    @tls.setter
    def tls(self, value: bool) -> None:
        if value or self._rare is not _DEFAULTS:
            self._own_rare().tls = value

    @property
    def peer_certificate(self) -> dict[str, object] | None:
        """The client's verified certificate (``getpeercert()``), or None."""
        return self._rare.peer_certificate

    @peer_certificate.setter
    def peer_certificate(self, value: dict[str, object] | None) -> None:
        if value is not None or self._rare is not _DEFAULTS:
            self._own_rare().peer_certificate = value

    @property
    def discarded(self) -> int:
        """Bytes read and thrown away (during ``STALL`` and the drain after the end)."""
        return self._rare.discarded

    @discarded.setter
    def discarded(self, value: int) -> None:
        if value or self._rare is not _DEFAULTS:
            self._own_rare().discarded = value

    @property
    def dropped(self) -> int:
        """Bytes received but not kept because of ``max_receive``."""
        return self._rare.dropped

    @dropped.setter
    def dropped(self, value: int) -> None:
        if value or self._rare is not _DEFAULTS:
            self._own_rare().dropped = value

    # ---- what was sent ------------------------------------------------------------------------

    def _pieces(self) -> list[_Piece]:
        sends = self._sends
        if sends is None:
            return []
        if isinstance(sends, list):
            return list(sends)  # a copy: the reactor may append meanwhile
        return [sends]

    def _add_piece(self, piece: _Piece) -> None:
        sends = self._sends
        if sends is None:
            self._sends = piece
        elif isinstance(sends, list):
            sends.append(piece)
        else:
            self._sends = [sends, piece]

    @property
    def _sent(self) -> list[memoryview]:
        """One view per send step, of the step's payload (never a copy)."""
        return [
            piece if isinstance(piece, memoryview) else memoryview(piece)
            for piece in self._pieces()
        ]

    @property
    def sent(self) -> bytes:
        """Every byte the server sent on this connection."""
        return b"".join(self._pieces())

    @property
    def ended(self) -> bool:
        """Whether the connection has ended."""
        return self.outcome is not None

    def waiting_for(self) -> str:
        """What the connection is waiting for now, in words."""
        describer = self._describer  # read first: it is dropped only after outcome is set
        if self.outcome is not None:
            return f"ended: {self.outcome.value}"
        return describer.describe() if describer is not None else "starting"

    def keep(self, data: bytes) -> bytes:
        """What of ``data`` fits under ``max_receive``; the rest is counted in ``dropped``."""
        room = self.max_receive - self.kept
        if len(data) > room:
            self.dropped += len(data) - max(room, 0)
            data = data[: max(room, 0)]
        self.kept += len(data)
        return data

    def add_received(self, data: bytes, step: int) -> None:
        """A receive step got ``data``."""
        self.step = step
        self.received.append(data)
        if self._sink is not None:
            self._sink._received(data)

    def add_sent(self, data: memoryview, *, extend: bool = False) -> None:
        """The peer's socket took ``data``: a view of a send step's payload, never copied.

        With ``extend``, ``data`` is the same step's sent part so far, replacing the last view:
        a step sent in many slices keeps one view (or, once all of it is sent, its payload).
        """
        sends = self._sends
        if extend and sends is not None:
            if isinstance(sends, list):
                self.bytes_sent += len(data) - len(sends[-1])
                sends[-1] = _piece(data)
            else:
                self.bytes_sent += len(data) - len(sends)
                self._sends = _piece(data)
        else:
            self._add_piece(_piece(data))
            self.bytes_sent += len(data)

    def end(self, outcome: Outcome, failure: str | None, now: float, step: int) -> None:
        """The connection ended (a ``failure`` noted earlier is kept)."""
        if self.outcome is not None:
            return
        self.step = step
        if failure is not None:
            self.failure = failure
        self.ended_at = now
        self.outcome = outcome
        self._describer = None  # the record outlives the machine: let it go
        if self._sink is not None:
            self._sink._end(self)

    def describe(self) -> str:
        """One line: who, how it ended, what moved."""
        state = self.outcome.value if self.outcome else f"running step {self.step}"
        text = (
            f"connection {self.index} from {_format_peer(self.peer)}: {state}; "
            f"received {sum(map(len, self.received))} bytes in {len(self.received)} steps, "
            f"sent {self.bytes_sent} bytes"
        )
        return text + (f"; FAILED: {self.failure}" if self.failure else "")


def _format_peer(peer: object) -> str:
    if isinstance(peer, tuple) and len(peer) >= 2:
        host, port = peer[0], peer[1]
        return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
    return str(peer) or "(unnamed)"


class ServerLog:
    """Everything one server saw: its connections, received bytes and failures."""

    __slots__ = (
        "_ended",
        "_extra_on_end",
        "_extra_on_received",
        "_host",
        "_signal",
        "connections",
        "failures",
        "max_receive",
        "received",
    )

    def __init__(
        self,
        max_receive: int = DEFAULT_MAX_RECEIVE,
        on_received: Callable[[bytes], None] | None = None,
        on_end: Callable[[ConnectionRecord], None] | None = None,
    ) -> None:
        self.max_receive = max_receive
        self.received: list[bytes] = []
        # A shared empty tuple until the first connection (many servers never get one).
        self.connections: list[ConnectionRecord] | tuple[()] = ()
        # Made by the reactor thread when first needed (most servers never fail, many are
        # closed without waiting): a test thread only reads them.
        self.failures: list[str] | None = None
        self._ended: list[ConnectionRecord] | None = None  # in the order they ended
        # Made by the first waiter: most servers are never waited on.
        self._signal: Signal | None = None
        self._extra_on_received = on_received
        self._extra_on_end = on_end
        self._host: str | None = None  # the latest peer's host, shared by equal ones

    def new_connection(self, peer: object, now: float) -> ConnectionRecord:
        """Start the record of a connection accepted at ``now``.

        The peer's host string is the previous record's when they are equal (a test's
        clients all come from one address): each record keeps its port, not another copy.
        """
        if type(peer) is tuple and peer and type(peer[0]) is str:
            host = self._host
            if peer[0] == host:
                peer = (host, *peer[1:])
            else:
                self._host = peer[0]
        record = ConnectionRecord(
            len(self.connections),
            peer,
            accepted_at=now,
            max_receive=self.max_receive,
            _sink=self,
        )
        connections = self.connections
        if isinstance(connections, list):
            connections.append(record)
        else:
            self.connections = [record]
        return record

    def add_failure(self, message: str) -> None:
        """Something went wrong outside any one connection (or killed one: see ``check``)."""
        if self.failures is None:
            self.failures = []
        self.failures.append(message)
        self._wake()

    def _wake(self) -> None:
        """Wake the waiters, if any. Callers change state first."""
        signal = self._signal
        if signal is not None:
            signal.notify()

    def _waitable(self) -> Signal:
        if self._signal is None:
            with _WAITERS_LOCK:
                if self._signal is None:
                    self._signal = Signal()
        return self._signal

    def _received(self, data: bytes) -> None:
        self.received.append(data)
        if self._extra_on_received is not None:
            self._extra_on_received(data)

    def _end(self, record: ConnectionRecord) -> None:
        if self._ended is None:
            self._ended = []
        self._ended.append(record)
        self._wake()
        if self._extra_on_end is not None:
            self._extra_on_end(record)

    def wait_for_connections(self, n: int, timeout: float | None) -> list[ConnectionRecord]:
        """Block until ``n`` connections have ended; return the first ``n`` to end.

        They are returned in the order they ended, each with its ``outcome`` set. Raises
        ``TimeoutError`` saying what each unfinished connection still waits for, or how many
        connections never arrived.
        """
        _check_wait("wait_for_connections", n, timeout)
        if not self._waitable().wait(lambda: self.ended_count >= n, timeout):
            raise TimeoutError(self._describe_wait(n, timeout))
        return (self._ended or [])[:n]

    async def wait_for_connections_async(
        self, n: int, timeout: float | None
    ) -> list[ConnectionRecord]:
        """:meth:`wait_for_connections` for a coroutine: the event loop runs meanwhile."""
        _check_wait("wait_for_connections_async", n, timeout)
        if not await self._waitable().wait_async(lambda: self.ended_count >= n, timeout):
            raise TimeoutError(self._describe_wait(n, timeout))
        return (self._ended or [])[:n]

    @property
    def ended_count(self) -> int:
        """How many connections have ended."""
        ended = self._ended
        return 0 if ended is None else len(ended)

    def _describe_wait(self, n: int, timeout: float | None) -> str:
        lines = [
            f"{self.ended_count} of {n} connections ended within {timeout} s "
            f"({len(self.connections)} accepted)"
        ]
        lines += [
            f"  {record.describe()}; {waiting}" for record, waiting in self.running_connections()
        ]
        if len(self.connections) < n:
            lines.append(f"  {n - len(self.connections)} expected connections were never accepted")
        return "\n".join(lines)

    def running_connections(self) -> list[tuple[ConnectionRecord, str]]:
        """Live records, each with what it is waiting for."""
        return [
            (record, record.waiting_for()) for record in list(self.connections) if not record.ended
        ]

    def check(self) -> None:
        """Raise ``AssertionError`` listing every failure; silent when all is well."""
        problems = list(self.failures or ())
        problems += [
            f"connection {record.index} from {_format_peer(record.peer)}: {record.failure}"
            for record in list(self.connections)
            if record.failure
        ]
        if problems:
            raise AssertionError(
                f"{len(problems)} server-side failure(s):\n"
                + "\n".join(f"  - {problem}" for problem in problems)
            )
