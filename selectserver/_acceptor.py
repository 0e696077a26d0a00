"""The listening side of every server on the reactor: accept, pause, go down and up again.

An :class:`Acceptor` owns one listening socket and the live connections it started. It is a
reactor handler (``on_event``, ``on_timer``, ``crash``) and a reactor server (``attach``,
``close``, ``abandon``, ``drop_sockets``). Subclasses say what a connection is:
``Listener`` (``_connection.py``) runs a script on each, ``ProxyListener`` (``_proxy.py``)
relays each to an upstream.

Accepting is fair and robust: at most :data:`ACCEPT_BATCH` accepts per pass; an ``accept()``
error that concerns only the connection being accepted skips it; running out of descriptors
(or anything stranger) pauses the acceptor for :data:`ACCEPT_RETRY_SECONDS`, leaving the
pending connections in the kernel's backlog.
"""

from __future__ import annotations

import abc
import errno
import functools
import logging
import os
import socket
import stat
import time
import traceback
from typing import TYPE_CHECKING, Any

from . import _output

if TYPE_CHECKING:
    from ._reactor import Reactor
    from ._records import Latch

__all__ = [
    "ACCEPT_BATCH",
    "ACCEPT_RETRY_SECONDS",
    "READ",
    "WRITE",
    "Acceptor",
    "describe_error",
    "format_address",
]

logger = logging.getLogger("selectserver")

READ = 1  # selectors.EVENT_READ
WRITE = 2  # selectors.EVENT_WRITE

#: accepts per readiness event, so one busy listener cannot starve the others
ACCEPT_BATCH = 64
#: how long a listener pauses after accept() ran out of resources or failed unexpectedly
ACCEPT_RETRY_SECONDS = 0.05
#: accept() errors that concern only the connection being accepted (trio's list, accept(2)):
#: the acceptor goes on accepting
ACCEPT_TRANSIENT = frozenset(
    getattr(errno, name)
    for name in (
        "ECONNABORTED",
        "EPERM",
        "EPROTO",
        "ENETDOWN",
        "ENOPROTOOPT",
        "EHOSTDOWN",
        "ENONET",
        "EHOSTUNREACH",
        "EOPNOTSUPP",
        "ENETUNREACH",
        "ETIMEDOUT",
        "ECONNRESET",
    )
    if hasattr(errno, name)
)
AF_UNIX = getattr(socket, "AF_UNIX", None)
WOULD_BLOCK = (BlockingIOError, InterruptedError)
#: whether DEBUG records would go anywhere (a C-level call: cheap on the hot path)
debugging = functools.partial(logger.isEnabledFor, logging.DEBUG)


def format_address(address: object) -> str:
    """``host:port``, ``[v6]:port``, or a Unix socket's path."""
    if isinstance(address, tuple) and len(address) >= 2:
        host, port = address[0], address[1]
        return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
    if isinstance(address, bytes):
        address = address.decode("utf-8", "backslashreplace")
    return str(address) or "(unnamed)"


def describe_error(exc: BaseException) -> str:
    """An exception in one line: ``ValueError: bad thing``."""
    return "".join(traceback.format_exception_only(type(exc), exc)).strip()


def configure(sock: socket.socket) -> None:
    """Make an accepted socket non-blocking, and send each write at once (no Nagle)."""
    sock.setblocking(False)
    if sock.family != AF_UNIX:
        # Each step's bytes go out when the script says: Nagle would hold a small send back
        # (merging Drip's pieces, or losing the bytes before a RESET).
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class Acceptor(abc.ABC):
    """A listening socket on the reactor and the connections it started."""

    #: how its event lines start: ``SERVER: 127.0.0.1:4242 ...``
    KIND = "SERVER"

    __slots__ = (
        "__weakref__",
        "_address",
        "_held",
        "_mask",
        "_retry",
        "accepted",
        "closed",
        "connections",
        "log",
        "max_connections",
        "reactor",
        "sock",
        "verbose",
    )

    def __init__(
        self,
        sock: socket.socket,
        log: Any,
        *,
        address: object,
        verbose: bool,
        max_connections: int | None,
    ) -> None:
        self.sock: socket.socket | None = sock
        self._address: Any = address  # where sock is bound (the server's, shared: less memory)
        self.log = log  # has add_failure(message)
        self.verbose = verbose
        self.max_connections = max_connections
        # A dict as a set (a quarter of the memory), made by the first connection: until then
        # a shared empty tuple. Changed only on the reactor thread; others only read it.
        self.connections: dict[Any, None] | tuple[()] = ()
        self.accepted = 0
        # Made by the thread that closes the server, set by the reactor once it is closed.
        self.closed: Latch | None = None
        self.reactor: Reactor | None = None
        self._mask = 0
        self._retry: list[object] | None = None  # the armed accept-again timer
        self._held: socket.socket | None = None  # the port, bound but not listening (down())

    @abc.abstractmethod
    def _start(self, sock: socket.socket, peer: object) -> None:
        """Start a connection on the accepted ``sock``; a failure must cost only it."""

    @property
    def name(self) -> str:
        """``host:port`` or the socket's path."""
        return format_address(self._address)

    @property
    def tracing(self) -> bool:
        """Whether events go anywhere: hot paths check this before building one."""
        return self.verbose or debugging()

    def describe_work(self) -> str:
        """Who this is (for errors about a busy reactor)."""
        return f"{self.KIND.lower()} {self.name}"

    def event(self, message: str, *args: object) -> None:
        """Report an event: a ``SERVER:`` line when verbose, and a DEBUG log record always.

        Both are written by another thread (``_output``): the reactor never blocks on them.
        """
        if self.verbose:
            _output.line(f"{self.KIND}: {self.name} " + (message % args if args else message))
        if debugging():
            _output.log(logging.DEBUG, "%s " + message, self.name, *args)

    # ---- called by the reactor ----------------------------------------------------------------

    def attach(self, reactor: Reactor) -> None:
        """Start accepting on ``reactor``."""
        self.reactor = reactor
        if self.sock is not None:
            self._listen(True)
            self.event("listening")

    def on_event(self) -> None:
        """The listening socket is readable: accept what is waiting, a bounded batch at a time."""
        if self._accept(ACCEPT_BATCH):
            assert self.reactor is not None
            self.reactor.call_soon(self)  # more may wait: after the others have had their turn

    def _accept(self, most: int) -> bool:
        """Accept up to ``most`` connections; True if there may be more waiting."""
        for _ in range(most):
            sock = self.sock
            if sock is None:
                return False
            try:
                conn, peer = sock.accept()
            except WOULD_BLOCK:
                return False
            except OSError as exc:
                if exc.errno in ACCEPT_TRANSIENT:
                    continue  # that connection failed; the next one may not
                # Out of descriptors or memory, or stranger: pause instead of spinning. The
                # pending connections wait in the backlog.
                self.event("accept failed (%s); pausing %.2f s", exc, ACCEPT_RETRY_SECONDS)
                self._pause()
                return False
            self._start(conn, peer)
            if self.max_connections is not None and self.accepted >= self.max_connections:
                self.stop_listening()
                return False
        return True

    def on_timer(self, now: float, when: float) -> None:
        """Accept again after a pause."""
        self._retry = None
        if self.sock is not None:
            self._listen(True)
            self.on_event()

    def crash(self, exc: BaseException) -> None:
        """Something failed unexpectedly: record it, and pause accepting; connections go on."""
        _output.log(logging.ERROR, "%s: listener failed", self.name, exc_info=exc)
        self.log.add_failure(f"{self.describe_work()}: listener failed: {describe_error(exc)}")
        try:
            self._pause()
        except Exception:
            self.stop_listening()

    def close(self, now: float) -> None:
        """Close the listening socket and every connection (the server is closing)."""
        self.stop_listening()
        for connection in list(self.connections):
            try:
                connection.abort(now)
            except Exception as exc:
                connection.crash(exc)

    def abandon(self, exc: BaseException) -> None:
        """Closing failed with ``exc``: record it, and close what is left by force."""
        self.log.add_failure(f"{self.describe_work()}: closing failed: {describe_error(exc)}")
        sock, self.sock = self.sock, None
        if sock is not None:
            if self.reactor is not None:
                self.reactor.forget_file(sock)
            sock.close()
        self._mask = 0
        self._cancel_retry()
        self._drop_held()
        for connection in list(self.connections):
            connection.crash(exc)

    def drop_sockets(self) -> None:
        """In a forked child: close this process's copies of the sockets, and nothing else.

        No shutdown, no RST, no selector call: the parent's sockets share the connections
        and the parent's epoll instance shares the registrations.
        """
        for connection in list(self.connections):
            connection.drop_sockets()
        self.connections = ()
        for sock in (self.sock, self._held):
            if sock is not None:
                try:
                    sock.close()
                except OSError:
                    pass
        self.sock = self._held = None

    def keep(self, connection: object) -> None:
        """``connection`` is live: close it with the server."""
        connections = self.connections
        if isinstance(connections, dict):
            connections[connection] = None
        else:
            self.connections = {connection: None}

    def forget(self, connection: object) -> None:
        """``connection`` has closed its socket."""
        connections = self.connections
        if isinstance(connections, dict):
            connections.pop(connection, None)

    # ---- control (reactor thread) -------------------------------------------------------------

    def stop_listening(self) -> None:
        """Close the listening socket: later connects are refused."""
        sock = self.sock
        if sock is None:
            self._drop_held()
            return
        try:
            self._listen(False)  # unregister while the socket is still open
        except Exception:
            pass  # the reactor has dropped it (see update_interest)
        self.sock = None
        self._cancel_retry()
        sock.close()
        self._drop_held()
        self.event("stopped listening after %d connections", self.accepted)

    def down(self) -> None:
        """Refuse new connections, keeping the port (bound, not listening) so nobody takes it.

        The connections the kernel has already completed are accepted first: their
        ``connect()`` succeeded, so they are served, not reset.
        """
        sock = self.sock
        if sock is None:
            return
        self._accept(socket.SOMAXCONN)
        if self.sock is None:
            return  # max_connections reached meanwhile: it stopped listening for good
        self.stop_listening()
        if sock.family != AF_UNIX:
            held = socket.socket(sock.family, socket.SOCK_STREAM)
            try:
                # Bound past our own TIME_WAIT entries; then no SO_REUSEADDR, so that no other
                # socket may bind the port while it is not listening.
                held.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                held.bind(self._address)
                held.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 0)
            except BaseException:
                held.close()
                raise
            self._held = held
        self.event("down: refusing connections")

    def up(self, backlog: int = socket.SOMAXCONN) -> None:
        """Listen again on the same port (after :meth:`down`)."""
        if self.sock is not None:
            return
        held, self._held = self._held, None
        if held is None and isinstance(self._address, tuple):
            return  # not down but stopped for good (max_connections, close)
        if held is None:  # a Unix socket: bind its path again
            held = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                _unlink_socket(self._address)
                held.bind(self._address)
            except BaseException:
                held.close()
                raise
        else:
            held.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        held.listen(backlog)
        held.setblocking(False)
        self.sock = held
        self._listen(True)
        self.event("up: listening again")

    # ---- internals ----------------------------------------------------------------------------

    def _listen(self, on: bool) -> None:
        mask = READ if on else 0
        if self.sock is not None and self.reactor is not None and mask != self._mask:
            old, self._mask = self._mask, 0  # registered for nothing if the selector refuses
            self.reactor.update_interest(self.sock, self, old, mask)
            self._mask = mask

    def _pause(self) -> None:
        self._listen(False)
        if self._retry is None:
            assert self.reactor is not None
            self._retry = self.reactor.call_at(time.monotonic() + ACCEPT_RETRY_SECONDS, self)

    def _cancel_retry(self) -> None:
        if self._retry is not None and self.reactor is not None:
            self.reactor.cancel(self._retry)
        self._retry = None

    def _drop_held(self) -> None:
        held, self._held = self._held, None
        if held is not None:
            held.close()


def _unlink_socket(path: object) -> None:
    """Remove a Unix socket's file before binding its path again (only a socket file)."""
    if isinstance(path, (str, bytes)) and path and path[:1] not in ("\0", b"\0"):
        try:
            if stat.S_ISSOCK(os.stat(path).st_mode):
                os.unlink(path)
        except OSError:
            pass
