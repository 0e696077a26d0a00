"""``rawproxy``: the least a relay on selectserver's reactor thread can do, per server.

Each selectserver server gets a listening socket registered on that server's own reactor. A
client it accepts gets a non-blocking connect to the server and, once that completes, its
bytes are relayed both ways: ``recv`` and ``send`` to the other socket, an unsent tail kept as
a ``memoryview`` (the source then stops being read until the tail is gone), an EOF passed on
with ``shutdown(SHUT_WR)``, both sockets closed once both directions have ended or at the first
error. No records, no timers, no faults: the floor a ``FaultProxy`` is measured against, as
``rawselect`` is for the servers.

Every socket call runs on the reactor thread, as a ``FaultProxy``'s do, so the reactor's costs
(its select loop, its dispatch) are in the floor and the proxy's own are not.
"""

from __future__ import annotations

import errno
import selectors
import socket
import struct

from selectserver._control import run_on_reactor
from selectserver._proxy import READ_SIZE as PROXY_READ_SIZE
from selectserver._reactor import Reactor

from .common import Address, Script, listening_socket

__all__ = ["RawProxyGroup"]

READ, WRITE = selectors.EVENT_READ, selectors.EVENT_WRITE
#: bytes one recv() asks for: a FaultProxy's, so that the floor reads as it does
READ_SIZE = PROXY_READ_SIZE
#: connect_ex() results that mean the connect is under way
_IN_PROGRESS = frozenset({errno.EINPROGRESS, errno.EWOULDBLOCK, errno.EINTR})
#: SO_LINGER on, 0 s: close() sends an RST
_LINGER_ZERO = struct.pack("ii", 1, 0)


def _nodelay(sock: socket.socket) -> None:
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class _Side:
    """One socket of a relayed pair: the reactor's handler for it.

    ``out`` holds what came from the peer and still waits to be sent here; while it does,
    the peer is not read. The socket is watched for ``READ`` while it is read and for
    ``WRITE`` while ``out`` waits (or while the upstream connect is under way).
    """

    __slots__ = ("mask", "out", "pair", "peer", "reading", "shut", "sock")

    def __init__(self, pair: _Pair, sock: socket.socket) -> None:
        self.pair = pair
        self.sock = sock
        self.peer: _Side = self  # set once both sides exist
        self.mask = 0
        self.out: memoryview | None = None
        self.reading = True  # no EOF read from this socket yet
        self.shut = False  # the peer's direction has ended: this socket's write side is shut

    def on_event(self) -> None:
        pair = self.pair
        if pair.closed:
            return
        try:
            if pair.connecting:
                pair.connected()
                return
            peer = self.peer
            if self.out is not None:
                self._flush()
            if self.reading and peer.out is None:
                try:
                    data = self.sock.recv(READ_SIZE)
                except BlockingIOError:
                    pass
                else:
                    if data:
                        peer._send(data)
                    else:
                        self.reading = False
                        if peer.out is None:
                            peer._shut()
            if self.shut and peer.shut:
                pair.close()
                return
            self.watch()
            peer.watch()
        except OSError:  # a reset, a broken pipe, a shutdown of a dead socket
            pair.close(reset=True)

    def _send(self, data: bytes) -> None:
        """Send ``data`` here, keeping what does not fit (then the peer waits)."""
        try:
            sent = self.sock.send(data)
        except BlockingIOError:
            sent = 0
        if sent < len(data):
            self.out = memoryview(data)[sent:]

    def _flush(self) -> None:
        out = self.out
        assert out is not None
        try:
            sent = self.sock.send(out)
        except BlockingIOError:
            return
        if sent < len(out):
            self.out = out[sent:]
            return
        self.out = None
        if not self.peer.reading:  # the peer ended while its last bytes waited
            self._shut()

    def _shut(self) -> None:
        self.sock.shutdown(socket.SHUT_WR)
        self.shut = True

    def watch(self) -> None:
        """Register for what this side waits for now (nothing: not registered)."""
        mask = (READ if self.reading and self.peer.out is None else 0) | (
            WRITE if self.out is not None else 0
        )
        if mask != self.mask:
            self.pair.reactor.update_interest(self.sock, self, self.mask, mask)
            self.mask = mask

    def on_timer(self, now: float, when: float) -> None:
        """Never called: a relay arms no timer."""

    def crash(self, exc: BaseException) -> None:
        self.pair.crash(exc)

    def describe_work(self) -> str:
        return f"a rawproxy relay of {self.pair.listener.name}"


class _Pair:
    """A client and its upstream connection, relayed both ways."""

    __slots__ = ("client", "closed", "connecting", "listener", "reactor", "upstream")

    def __init__(self, listener: _Listener, client: socket.socket, upstream: socket.socket) -> None:
        self.listener = listener
        self.reactor = listener.reactor
        self.client = _Side(self, client)
        self.upstream = _Side(self, upstream)
        self.client.peer, self.upstream.peer = self.upstream, self.client
        self.connecting = True
        self.closed = False

    def connect(self, code: int) -> None:
        """Go on from ``connect_ex``'s ``code``: relay at once, or wait for ``WRITE``."""
        if not code:
            self.connected()
            return
        upstream = self.upstream
        self.reactor.update_interest(upstream.sock, upstream, 0, WRITE)
        upstream.mask = WRITE

    def connected(self) -> None:
        """The upstream socket is writable (or connected at once): relay, or give up."""
        if self.upstream.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
            self.close(reset=True)
            return
        self.connecting = False
        self.client.watch()
        self.upstream.watch()

    def crash(self, exc: BaseException) -> None:
        self.listener.failures.append(exc)
        self.close(reset=True)

    def close(self, reset: bool = False) -> None:
        """Unregister and close both sockets (on the reactor thread, or once it has stopped).

        ``reset`` closes them with an RST, as an error on one side (the clients' RST after
        they read EOF, most often) would reach the other side without a relay in between: the
        server then keeps no TIME_WAIT entry, as with no relay.
        """
        if self.closed:
            return
        self.closed = True
        self.listener.pairs.discard(self)
        for side in (self.client, self.upstream):
            if side.mask and self.listener.registered:
                self.reactor.forget_file(side.sock)
                side.mask = 0
            if reset:
                try:
                    side.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_ZERO)
                except OSError:
                    pass
            side.sock.close()


class _Listener:
    """A listening socket that relays each client it accepts to ``upstream``."""

    __slots__ = ("failures", "name", "pairs", "reactor", "registered", "sock", "upstream")

    def __init__(self, reactor: Reactor, upstream: Address) -> None:
        self.reactor = reactor
        self.upstream = upstream
        self.sock = listening_socket()
        host, port = self.sock.getsockname()[:2]
        self.name = f"{host}:{port}"
        self.pairs: set[_Pair] = set()
        self.failures: list[BaseException] = []
        self.registered = False  # in the reactor's selector (False again once it has stopped)

    def register(self) -> None:
        self.reactor.update_interest(self.sock, self, 0, READ)
        self.registered = True

    def on_event(self) -> None:
        while True:
            try:
                client, _ = self.sock.accept()
            except BlockingIOError:
                return
            except ConnectionAbortedError:
                continue  # reset while it waited in the backlog
            self._relay(client)

    def _relay(self, client: socket.socket) -> None:
        """Start connecting ``client``'s upstream socket, without blocking the reactor.

        A blocking connect to the loopback upstream would return at once while the server's
        backlog has room (the kernel completes the handshake without an accept), but a full
        backlog drops the SYN, and the accept that would make room waits on this very thread:
        ``connect_ex`` never waits.
        """
        try:
            upstream = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        except OSError:
            client.close()
            return
        try:
            client.setblocking(False)
            upstream.setblocking(False)
            _nodelay(client)
            _nodelay(upstream)
            code = upstream.connect_ex(self.upstream)
        except OSError:
            client.close()
            upstream.close()
            return
        if code and code not in _IN_PROGRESS:
            client.close()
            upstream.close()
            return
        pair = _Pair(self, client, upstream)
        self.pairs.add(pair)
        try:
            pair.connect(code)
        except OSError:
            pair.close(reset=True)

    def on_timer(self, now: float, when: float) -> None:
        """Never called: a listener arms no timer."""

    def crash(self, exc: BaseException) -> None:
        self.failures.append(exc)
        self.close()

    def describe_work(self) -> str:
        return f"the rawproxy listener {self.name}"

    def close(self) -> None:
        """Close the listening socket and every relay (on the reactor thread, or after it)."""
        for pair in list(self.pairs):
            pair.close(reset=True)
        if self.registered:
            self.reactor.forget_file(self.sock)
            self.registered = False
        self.sock.close()

    def abandon(self) -> None:
        """The reactor has stopped (its selector is closed): just close the sockets."""
        self.registered = False
        self.close()


class RawProxyGroup:
    """``n`` selectserver servers, each behind a minimal relay on its own reactor."""

    def __init__(self, script: Script, n: int) -> None:
        from .impls import _SelectServerGroup  # impls imports this module: import when used

        self.upstream = _SelectServerGroup(script, n)
        self.listeners: list[_Listener] = []
        try:
            for server in self.upstream.servers:
                listener = _Listener(server._reactor, server.address)
                self.listeners.append(listener)
                run_on_reactor(listener.reactor, listener.register)
        except BaseException:
            self.close()
            raise
        self.addresses: list[Address] = [
            listener.sock.getsockname()[:2] for listener in self.listeners
        ]

    def settle(self) -> None:
        self.upstream.settle()  # the listeners were registered before __init__ returned

    def close(self) -> None:
        """Close the relays on their reactor thread, then the servers; raise what crashed."""
        try:
            for listener in self.listeners:
                try:
                    run_on_reactor(listener.reactor, listener.close)
                except RuntimeError:  # the reactor has stopped: close the sockets here
                    listener.abandon()
        finally:
            self.upstream.close()
        failures = [exc for listener in self.listeners for exc in listener.failures]
        if failures:
            raise RuntimeError(f"rawproxy: {len(failures)} handlers crashed") from failures[0]
