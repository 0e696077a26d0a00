"""Socket glue: the only accept/recv/send/shutdown calls in selectserver.

A :class:`Listener` is the reactor's side of one fake server: its listening socket, its scripts
and its live connections. A :class:`Connection` carries out what its step machine asks for on one
accepted socket. Both run only on the reactor thread, and both are handlers: the reactor calls
``on_event(mask)`` when the selector reports their socket, ``on_timer(now, when)`` when a timer
they armed is due, and ``crash(exc)`` if either raised, which ends only that one object.

Sockets are closed so the peer sees what the script means:

* a graceful end (``COMPLETED``, ``HUNG_UP``) sends TLS's close_notify if TLS is on, and FIN
  (``TRUNCATED`` sends FIN alone), then *drains*: it reads and discards
  what the peer still sends until the peer closes, for at most ``DRAIN_SECONDS`` and
  ``DRAIN_BYTES``. Closing a socket with unread input would send RST instead, so a client whose
  request the script read only in part still sees a clean EOF;
* ``RESET`` closes with ``SO_LINGER`` 0, which sends RST;
* anything else closes at once.
"""

from __future__ import annotations

import errno
import functools
import logging
import selectors
import socket
import ssl
import struct
import threading
import time
import traceback
from typing import TYPE_CHECKING

from ._machine import Done, Handshake, Receive, Send, ShutdownWrite, StepMachine, Wait
from ._records import ConnectionRecord, Outcome, ServerLog
from ._script import Step

if TYPE_CHECKING:
    from ._reactor import Reactor

__all__ = ["Connection", "Listener"]

logger = logging.getLogger("selectserver")

READ = selectors.EVENT_READ
WRITE = selectors.EVENT_WRITE

#: accepts per readiness event, so one busy listener cannot starve the others
ACCEPT_BATCH = 64
#: how long a listener out of file descriptors pauses before accepting again
ACCEPT_RETRY_SECONDS = 0.05
#: after a graceful end, how long and how much to read while waiting for the peer to close
DRAIN_SECONDS = 2.0
DRAIN_BYTES = 64 * 1024 * 1024
#: errors of accept() that mean "out of resources", not "this connection failed"
_OUT_OF_RESOURCES = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}
#: the most one TLS send takes of a payload (a TLS write is all or nothing)
TLS_SEND_SIZE = 64 * 1024
_LINGER_ZERO = struct.pack("ii", 1, 0)
_AF_UNIX = getattr(socket, "AF_UNIX", None)
#: whether DEBUG records would go anywhere (a C-level call: cheap on the hot path)
_debugging = functools.partial(logger.isEnabledFor, logging.DEBUG)
_WOULD_BLOCK_READ = (BlockingIOError, InterruptedError, ssl.SSLWantReadError)
_WOULD_BLOCK_WRITE = (BlockingIOError, InterruptedError, ssl.SSLWantWriteError)
#: outcomes that close with FIN and drain (TRUNCATED skips TLS's close_notify)
_GRACEFUL = frozenset({Outcome.COMPLETED, Outcome.HUNG_UP, Outcome.TRUNCATED})


def format_address(address: object) -> str:
    """``host:port``, ``[v6]:port``, or a Unix socket's path."""
    if isinstance(address, tuple) and len(address) >= 2:
        host, port = address[0], address[1]
        return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
    if isinstance(address, bytes):
        address = address.decode("utf-8", "backslashreplace")
    return str(address) or "(unnamed)"


class Listener:
    """One fake server on the reactor: accepts connections and runs a script on each."""

    __slots__ = (
        "_mask",
        "accepted",
        "closed",
        "connections",
        "log",
        "max_connections",
        "name",
        "reactor",
        "scripts",
        "sock",
        "timeout",
        "tls_context",
        "verbose",
    )

    def __init__(
        self,
        sock: socket.socket,
        scripts: tuple[tuple[Step, ...], ...],
        log: ServerLog,
        *,
        verbose: bool,
        timeout: float | None,
        max_connections: int | None,
        tls_context: ssl.SSLContext | None = None,
    ) -> None:
        self.sock: socket.socket | None = sock
        self.tls_context = tls_context
        self.name = format_address(sock.getsockname())
        self.scripts = scripts
        self.log = log
        self.verbose = verbose
        self.timeout = timeout
        self.max_connections = max_connections
        self.connections: dict[Connection, None] = {}  # a set, in a quarter of the memory
        self.accepted = 0
        # Made by the thread that closes the server, set by the reactor once it is closed.
        self.closed: threading.Event | None = None
        self.reactor: Reactor | None = None
        self._mask = 0

    @property
    def tracing(self) -> bool:
        """Whether events go anywhere: hot paths check this before building one."""
        return self.verbose or _debugging()

    def event(self, message: str, *args: object) -> None:
        """Report an event: a ``SERVER:`` line when verbose, and a DEBUG log record always."""
        if self.verbose:
            try:
                print(f"SERVER: {self.name} " + (message % args if args else message), flush=True)
            except (OSError, ValueError):
                pass  # stdout is closed or gone (a finished test's capture): the log still has it
        logger.debug("%s " + message, self.name, *args)

    # ---- called by the reactor ----------------------------------------------------------------

    def attach(self, reactor: Reactor) -> None:
        """Start accepting on ``reactor``."""
        self.reactor = reactor
        if self.sock is not None:
            self._listen(True)
            self.event("listening")

    def on_event(self, mask: int) -> None:
        """The listening socket is readable: accept what is waiting, a bounded batch at a time."""
        for _ in range(ACCEPT_BATCH):
            if self.sock is None:
                return
            try:
                conn, peer = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in _OUT_OF_RESOURCES:
                    # Pausing instead of spinning: the pending connection stays in the backlog.
                    self.event("accept failed (%s); pausing %.2f s", exc, ACCEPT_RETRY_SECONDS)
                    self._listen(False)
                    assert self.reactor is not None
                    self.reactor.call_at(time.monotonic() + ACCEPT_RETRY_SECONDS, self)
                    return
                if exc.errno == errno.ECONNABORTED:
                    continue
                raise
            self._start(conn, peer)
            if self.max_connections is not None and self.accepted >= self.max_connections:
                self.stop_listening()
                return

    def on_timer(self, now: float, when: float) -> None:
        """Accept again after running out of file descriptors."""
        if self.sock is not None:
            self._listen(True)
            self.on_event(READ)

    def crash(self, exc: BaseException) -> None:
        """accept() failed unexpectedly: record it and stop listening; connections go on."""
        logger.error("%s: listener failed", self.name, exc_info=exc)
        self.log.add_failure(f"server {self.name}: listener failed: {exc!r}")
        self.stop_listening()

    def stop_listening(self) -> None:
        """Close the listening socket: later connects are refused."""
        sock = self.sock
        if sock is not None:
            self._listen(False)  # unregister while the socket is still open
            self.sock = None
            sock.close()
            self.event("stopped listening after %d connections", self.accepted)

    def close(self, now: float) -> None:
        """Close the listening socket and every connection (the server is closing)."""
        self.stop_listening()
        for connection in list(self.connections):
            connection.abort(now)

    def forget(self, connection: Connection) -> None:
        """``connection`` has closed its socket."""
        self.connections.pop(connection, None)

    # ---- internals ----------------------------------------------------------------------------

    def _listen(self, on: bool) -> None:
        mask = READ if on else 0
        if self.sock is not None and self.reactor is not None and mask != self._mask:
            self.reactor.update_interest(self.sock, self, self._mask, mask)
            self._mask = mask

    def _start(self, sock: socket.socket, peer: object) -> None:
        sock.setblocking(False)
        if sock.family != _AF_UNIX:
            # Each step's bytes go out when the script says: Nagle would hold a small send back
            # (merging Drip's pieces, or losing the bytes before a RESET).
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        now = time.monotonic()
        index = self.accepted
        self.accepted += 1
        record = self.log.new_connection(peer, now)
        script = self.scripts[min(index, len(self.scripts) - 1)]
        if self.tracing:
            self.event("#%d accepted from %s", index, format_address(peer))
        try:
            connection = Connection(self, sock, record, script, now)
        except Exception as exc:  # a bug: it must cost this connection, never the listener
            sock.close()
            record.end(Outcome.ERROR, f"internal error starting the connection: {exc!r}", now, 0)
            logger.error("%s #%d failed to start", self.name, index, exc_info=exc)
            return
        self.connections[connection] = None
        try:
            connection.start(now)
        except Exception as exc:
            connection.crash(exc)


class Connection:
    """Carries out one step machine's actions on one accepted, non-blocking socket."""

    __slots__ = (
        "_buffer",
        "_closed",
        "_drain_until",
        "_drained",
        "_mask",
        "_timer_at",
        "_tls",
        "listener",
        "machine",
        "record",
        "sock",
    )

    def __init__(
        self,
        listener: Listener,
        sock: socket.socket,
        record: ConnectionRecord,
        script: tuple[Step, ...],
        now: float,
    ) -> None:
        self.listener = listener
        self.sock = sock
        self.record = record
        self.machine = StepMachine(script, record, now=now, timeout=listener.timeout)
        record._describe = self.machine.describe
        self._mask = 0
        self._timer_at: float | None = None
        self._drain_until: float | None = None  # set while draining after a graceful end
        self._drained = 0
        self._tls = False  # whether sock is an SSLSocket
        self._closed = False
        reactor = listener.reactor
        assert reactor is not None
        self._buffer = reactor.receive_buffer()

    def start(self, now: float) -> None:
        """Run the script's first steps."""
        self._pump(now)

    # ---- handler interface --------------------------------------------------------------------

    def on_event(self, mask: int) -> None:
        """The socket is ready for what we registered: read, or carry on with the script."""
        now = time.monotonic()
        if self._drain_until is not None:
            self._drain()
        elif type(self.machine.next_action()) is Receive:
            self._receive(now)
        else:
            self._pump(now)

    def on_timer(self, now: float, when: float) -> None:
        """A wait ended or a deadline passed."""
        if when == self._timer_at:
            self._timer_at = None
        if self._closed:
            return
        if self._drain_until is not None:
            if now >= self._drain_until:
                self._close()
            return
        self.machine.tick(now)
        self._pump(now)

    def crash(self, exc: BaseException) -> None:
        """Something raised while handling this connection: end it as an ERROR."""
        logger.error("%s #%d failed", self.listener.name, self.record.index, exc_info=exc)
        detail = "".join(traceback.format_exception_only(type(exc), exc)).strip()
        self.machine.fail(f"internal error: {detail}", time.monotonic())
        self._close()

    def abort(self, now: float) -> None:
        """The server is closing: end the script here and close the socket."""
        self.machine.server_closed(now)
        self._close()

    # ---- the machine's actions ----------------------------------------------------------------

    def _pump(self, now: float) -> None:
        """Do what the machine asks until it waits for the socket or the clock."""
        machine = self.machine
        while True:
            action = machine.next_action()
            kind = type(action)
            if kind is Receive:
                assert isinstance(action, Receive)
                self._want(READ, action.deadline)
                return
            if kind is Send:
                assert isinstance(action, Send)
                if not self._send(action, now):
                    return
            elif kind is Wait:
                assert isinstance(action, Wait)
                self._want(0, action.until)
                return
            elif kind is ShutdownWrite:
                self._shutdown_write(close_notify=True)
                self.listener.event("#%d half-closed", self.record.index)
                machine.write_shut(now)
            elif kind is Handshake:
                assert isinstance(action, Handshake)
                if not self._handshake(action, now):
                    return
            else:
                assert isinstance(action, Done)
                self._end(action.outcome, now)
                return

    def _send(self, action: Send, now: float) -> bool:
        """Send what the socket takes of ``action.data``; False if we must wait to send more."""
        machine = self.machine
        # A TLS write goes out whole or not at all, so bound it to keep the loop fair.
        data = action.data[:TLS_SEND_SIZE] if self._tls else action.data
        try:
            sent = self.sock.send(data)
        except _WOULD_BLOCK_WRITE:
            self._want(WRITE, action.deadline)
            return False
        except ssl.SSLWantReadError:
            self._want(READ, action.deadline)
            return False
        except OSError as exc:
            self._lost(exc, "send", now)
        else:
            if self.listener.tracing:
                self.listener.event("#%d sent %d bytes", self.record.index, sent)
            machine.data_sent(sent, now)
            if sent < len(data):
                self._want(WRITE, action.deadline)
                return False
        return True

    def _receive(self, now: float) -> None:
        # Under TLS one recv() into the 256 KiB buffer takes a whole record (at most 16 KiB),
        # and OpenSSL does not read ahead, so no decrypted bytes hide from the selector.
        # recv_into a reused buffer: recv(256 KiB) mallocs above glibc's mmap threshold,
        # which can cost an mmap/munmap pair per call (most of a loopback round trip).
        buffer = self._buffer
        try:
            count = self.sock.recv_into(buffer)
        except _WOULD_BLOCK_READ:
            return
        except ssl.SSLWantWriteError:
            self._want(WRITE, None)  # TLS needs to write before it can read more
            return
        except OSError as exc:
            self._lost(exc, "recv", now)
        else:
            if count and self.listener.tracing:
                self.listener.event("#%d received %d bytes", self.record.index, count)
            self.machine.receive_data(buffer[:count].tobytes(), now)
        self._pump(now)

    def _handshake(self, action: Handshake, now: float) -> bool:
        """Advance the TLS handshake; False if it waits for the socket."""
        context = self.listener.tls_context
        assert context is not None, "StartTLS on a server without tls="
        if not self._tls:
            self._want(0, None)  # the selector knows the plain socket, which wrapping detaches
            self.sock = context.wrap_socket(
                self.sock, server_side=True, do_handshake_on_connect=False
            )
            self._tls = True
        sock = self.sock
        assert isinstance(sock, ssl.SSLSocket)
        try:
            sock.do_handshake()
        except ssl.SSLWantReadError:
            self._want(READ, action.deadline)
            return False
        except ssl.SSLWantWriteError:
            self._want(WRITE, action.deadline)
            return False
        except OSError as exc:
            self._lost(exc, "TLS handshake", now)
            return True
        self.listener.event("#%d TLS started (%s)", self.record.index, sock.version())
        self.machine.tls_started(now)
        return True

    def _lost(self, exc: OSError, doing: str, now: float) -> None:
        """Tell the machine how a socket call failed: the peer left, TLS broke, or worse."""
        machine = self.machine
        if isinstance(exc, BrokenPipeError):
            machine.peer_gone(now)
        elif isinstance(exc, ConnectionResetError):
            machine.peer_reset(now)
        elif isinstance(exc, ssl.SSLError):
            machine.tls_failed(_reason(exc), now)
        else:
            machine.fail(f"{doing} failed: {exc}", now)

    def _want(self, mask: int, wake_at: float | None) -> None:
        """Register for ``mask`` (only when it changes) and arm a timer for ``wake_at``."""
        if mask != self._mask:
            reactor = self.listener.reactor
            assert reactor is not None
            reactor.update_interest(self.sock, self, self._mask, mask)
            self._mask = mask
        if wake_at is not None and (self._timer_at is None or wake_at < self._timer_at):
            self._timer_at = wake_at
            reactor = self.listener.reactor
            assert reactor is not None
            reactor.call_at(wake_at, self)

    def _shutdown_write(self, *, close_notify: bool) -> None:
        """Send FIN, after TLS's close_notify if asked; reads go on (through TLS, if any)."""
        sock = self.sock
        if close_notify and isinstance(sock, ssl.SSLSocket):
            try:
                sock.unwrap()  # sends close_notify; raises while the peer's has not come
            except (ssl.SSLError, OSError, ValueError):
                pass  # sent, or the peer is gone: the next recv says which
        try:
            # socket.socket's own shutdown: SSLSocket.shutdown would also drop the TLS layer.
            socket.socket.shutdown(sock, socket.SHUT_WR)
        except OSError:
            pass  # the peer is already gone; the next recv or send says how

    # ---- the end ------------------------------------------------------------------------------

    def _end(self, outcome: Outcome, now: float) -> None:
        record = self.record
        if self.listener.tracing:
            why = record.failure or record.detail
            self.listener.event(
                "#%d ended: %s%s", record.index, outcome.value, f" ({why})" if why else ""
            )
        if outcome in _GRACEFUL:
            if not record.half_closed:
                self._shutdown_write(close_notify=outcome is not Outcome.TRUNCATED)
            self._drain_until = now + DRAIN_SECONDS
            self._want(READ, self._drain_until)
            self._drain()
            return
        if outcome is Outcome.RESET:
            try:
                self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_ZERO)
            except OSError:
                pass  # already reset by the peer: closing is all that is left
        self._close()

    def _drain(self) -> None:
        """Read and discard until the peer closes, so closing sends FIN rather than RST."""
        for _ in range(4):  # bounded per event; the selector brings us back
            try:
                count = self.sock.recv_into(self._buffer)
            except _WOULD_BLOCK_READ:
                return
            except OSError:
                count = 0
            if count == 0:
                break
            self._drained += count
            self.record.discarded += count
            if self._drained >= DRAIN_BYTES:
                break
        else:
            return
        self._close()

    def _close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._mask:
            reactor = self.listener.reactor
            assert reactor is not None
            reactor.update_interest(self.sock, self, self._mask, 0)
            self._mask = 0
        self.sock.close()
        reactor = self.listener.reactor
        if reactor is not None:
            reactor.forget_timers(self)
        self.listener.forget(self)


def _reason(exc: BaseException) -> str:
    """An OSError or SSLError in a few words."""
    if isinstance(exc, ssl.SSLError) and exc.reason:
        return f"{exc.reason} ({exc.library or 'SSL'})"
    return str(exc) or type(exc).__name__
