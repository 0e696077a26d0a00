"""The scripted server's socket glue: a listener that runs a script on each connection.

A :class:`Listener` is the reactor's side of one fake server: an ``Acceptor`` (see
``_acceptor``) with its scripts and gates. A :class:`Connection` is a plain executor: it
carries out what its step machine asks for on one accepted socket, moving ciphertext through a
:class:`~selectserver._tlslayer.TLSLayer` once TLS is on, and reports what the socket did. All
policy (what to read, when to give up, how to close) lives in the machine.

Both run only on the reactor thread, and both are handlers: the reactor calls ``on_event()``
when the selector reports their socket, ``on_timer(now, when)`` when a timer they armed is
due, and ``crash(exc)`` if either raised, which ends only that one object. A failing socket or
selector call costs only its own connection (or pauses its listener): never the reactor.

No connection monopolises the loop: one pass does at most :data:`CALLS_PER_TURN` socket calls
for a connection (and ``ACCEPT_BATCH`` accepts for a listener), then yields to the others.
"""

from __future__ import annotations

import logging
import socket
import ssl
import struct
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from . import _output
from ._acceptor import (
    READ,
    WOULD_BLOCK,
    WRITE,
    Acceptor,
    configure,
    describe_error,
    format_address,
)
from ._control import GateState, Parked
from ._machine import (
    Close,
    Done,
    Handshake,
    Park,
    Receive,
    Send,
    ShutdownWrite,
    StepMachine,
    Wait,
)
from ._records import ConnectionRecord, Outcome, ServerLog
from ._script import Step
from ._tlslayer import TLSLayer

if TYPE_CHECKING:
    pass

__all__ = ["Connection", "Listener", "format_address"]

#: socket calls (and machine actions) one connection makes per pass of the loop
CALLS_PER_TURN = 32
#: a Reply function slower than this is logged as a warning
SLOW_CALL_SECONDS = 0.1
#: the most one TLS write encrypts (a TLS write is all or nothing)
TLS_SEND_SIZE = 64 * 1024
_LINGER_ZERO = struct.pack("ii", 1, 0)


class Listener(Acceptor):
    """One fake server on the reactor: accepts connections and runs a script on each."""

    __slots__ = ("gates", "owner", "script_base", "scripts", "timeout", "tls_context")

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
        address: object = None,
    ) -> None:
        super().__init__(
            sock,
            log,
            address=sock.getsockname() if address is None else address,
            verbose=verbose,
            max_connections=max_connections,
        )
        self.tls_context = tls_context
        self.scripts = scripts
        self.timeout = timeout
        self.script_base = 0  # connection index from which ``scripts`` counts (set_scripts)
        self.gates: dict[str, GateState] | None = None  # made by the first gate
        self.owner: Callable[[], object] = _nobody  # the public server, weakly

    def close(self, now: float) -> None:
        """Close the listening socket and every connection; no one will reach a gate now."""
        for gate in list(self.gates.values()) if self.gates is not None else ():
            gate.closed = True
            gate.signal.notify()
        super().close(now)

    def gate_state(self, name: str) -> GateState:
        """Gate ``name``'s state, made on first use (reactor thread only)."""
        gates = self.gates
        if gates is None:
            gates = self.gates = {}
        gate = gates.get(name)
        if gate is None:
            gate = gates[name] = GateState(name)
        return gate

    def set_scripts(self, scripts: tuple[tuple[Step, ...], ...]) -> None:
        """Later connections run ``scripts``, counting from 0 again."""
        self.scripts = scripts
        self.script_base = self.accepted

    def park(self, connection: Connection, name: str, now: float) -> bool:
        """``connection`` reached gate ``name``: True if the gate is open (it passes)."""
        gate = self.gate_state(name)
        if gate.opened:
            connection.machine.resume((), now)
            return True
        gate.parked[connection] = None
        assert self.reactor is not None
        gate.arrivals.append(Parked(connection, gate, self.reactor))
        gate.signal.notify()
        self.event("#%d parked at gate %r", connection.record.index, name)
        return False

    def _start(self, sock: socket.socket, peer: object) -> None:
        now = time.monotonic()
        index = self.accepted
        self.accepted += 1
        record = self.log.new_connection(peer, now)
        script = self.scripts[min(index - self.script_base, len(self.scripts) - 1)]
        if self.tracing:
            self.event("#%d accepted from %s", index, format_address(peer))
        try:
            configure(sock)
            connection = Connection(self, sock, record, script, now)
        except Exception as exc:  # it must cost this connection, never the listener
            sock.close()
            record.failure = f"starting the connection failed: {describe_error(exc)}"
            record.end(Outcome.ERROR, None, now, 0)
            self.event("#%d failed to start: %s", index, exc)
            return
        self.keep(connection)
        try:
            connection.start(now)
        except Exception as exc:
            connection.crash(exc)


class Connection:
    """Carries out one step machine's actions on one accepted, non-blocking socket."""

    __slots__ = (
        "_closed",
        "_mask",
        "_out",
        "_out_plain",
        "_timer",
        "_timer_at",
        "_tls",
        "listener",
        "machine",
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
        # The connection is its machine's caller (``__call__``), and the machine describes the
        # record while it runs: no bound method is made per connection.
        self.machine = StepMachine(
            script,
            record,
            now=now,
            timeout=listener.timeout,
            server=listener.owner,
            call=self,
        )
        record._describer = self.machine  # dropped by the record when it ends
        self._mask = 0
        self._timer: list[object] | None = None  # the one armed timer's heap entry
        self._timer_at = 0.0
        self._tls: TLSLayer | None = None
        self._out: memoryview | None = None  # ciphertext not yet sent
        self._out_plain = 0  # plaintext bytes _out carries, reported to the machine once sent
        self._closed = False

    @property
    def record(self) -> ConnectionRecord:
        """The connection's record (its machine's)."""
        return self.machine.record

    def start(self, now: float) -> None:
        """Run the script's first steps."""
        self._pump(now)

    def describe_work(self) -> str:
        """Who this is and what it waits for (for errors about a busy reactor)."""
        return (
            f"connection {self.record.index} of server {self.listener.name}: "
            f"{self.machine.describe()}"
        )

    # ---- handler interface --------------------------------------------------------------------

    def on_event(self) -> None:
        """The socket is ready (or the loop came back to us): carry on with the script."""
        if not self._closed:
            self._pump(time.monotonic())

    def on_timer(self, now: float, when: float) -> None:
        """A wait ended or a deadline passed."""
        self._timer = None
        if self._closed:
            return
        self.machine.tick(now)
        self._pump(now)

    def crash(self, exc: BaseException) -> None:
        """Something raised while handling this connection: end it as an ERROR."""
        _output.log(
            logging.ERROR, "%s #%d failed", self.listener.name, self.record.index, exc_info=exc
        )
        now = time.monotonic()
        try:
            self.machine.fail(f"internal error: {describe_error(exc)}", now)
        except Exception:
            pass  # the record is ended below
        finally:
            self._close_socket(reset=False)
            self.machine.closed(now)
            if not self.record.ended:  # the machine itself is broken: end the record here
                self.record.end(Outcome.ERROR, f"internal error: {describe_error(exc)}", now, 0)
            self.listener.forget(self)

    def abort(self, now: float) -> None:
        """The server is closing: end the script here and close the socket."""
        self.machine.server_closed(now)
        self._pump(now)

    def drop_sockets(self) -> None:
        """In a forked child: close this process's copy of the socket, and nothing else."""
        self._closed = True
        try:
            self.sock.close()
        except OSError:
            pass

    def pass_gate(self, gate: GateState, steps: tuple[Step, ...]) -> None:
        """Let this connection through ``gate`` (if it is still parked there)."""
        if gate.parked.pop(self, False) is None and not self._closed:
            now = time.monotonic()
            self.machine.resume(steps, now)
            self._pump(now)

    def __call__(self, fn: Callable[[Any], object], context: Any, label: str) -> object:
        """Run a Reply's function, warning when it holds the reactor thread too long (the
        machine's ``call``)."""
        started = time.perf_counter()
        try:
            return fn(context)
        finally:
            took = time.perf_counter() - started
            if took > SLOW_CALL_SECONDS:
                _output.log(
                    logging.WARNING,
                    "%s #%d: step %d (%s) took %.3f s on the shared reactor thread",
                    self.listener.name,
                    self.record.index,
                    self.machine.step_index,
                    label,
                    took,
                )

    # ---- the machine's actions ----------------------------------------------------------------

    def _pump(self, now: float) -> None:
        """Do what the machine asks until it waits for the socket or the clock, or the turn
        is over."""
        machine = self.machine
        for _ in range(CALLS_PER_TURN):
            action = machine.next_action()
            kind = type(action)
            if self._out is not None and kind is not Close:
                if not self._flush(action, now):
                    return
                continue  # the machine may have moved on
            if not _PERFORM[kind](self, action, now):
                return
        reactor = self.listener.reactor
        assert reactor is not None
        reactor.call_soon(self)

    def _receive(self, action: Receive, now: float) -> bool:
        """Read what arrived and hand it to the machine; False if nothing has."""
        tls = self._tls
        if tls is not None:
            try:
                plain = tls.read()
            except ssl.SSLError as exc:
                self._queue_output()
                self.machine.tls_failed(_reason(exc), now)
                return True
            self._queue_output()
            if plain is not None:
                self.machine.receive_data(plain, now)
                return True
        data = self._recv(action.deadline, now)
        if data is None:
            return False
        if tls is not None:
            tls.receive(data)
        else:
            self.machine.receive_data(data, now)
        return True

    def _recv(self, deadline: float | None, now: float) -> bytes | None:
        """One recv(); None if nothing is there yet (then we wait for READ)."""
        reactor = self.listener.reactor
        assert reactor is not None
        # recv_into a reused buffer: recv(256 KiB) mallocs above glibc's mmap threshold,
        # which can cost an mmap/munmap pair per call (most of a loopback round trip).
        buffer = reactor.receive_buffer()
        try:
            count = self.sock.recv_into(buffer)
        except WOULD_BLOCK:
            self._want(READ, deadline)
            return None
        except OSError as exc:
            self._lost(exc, "recv", now)
            return b""  # the machine is closing: EOF changes nothing
        if count and self.listener.tracing:
            self.listener.event("#%d received %d bytes", self.record.index, count)
        return buffer[:count].tobytes()

    def _send(self, action: Send, now: float) -> bool:
        """Send what the socket takes of ``action.data``; False if we must wait to send more."""
        tls = self._tls
        if tls is not None and not action.raw:
            # Encrypt a bounded piece; it counts as sent once its ciphertext is on the wire.
            self._out_plain = tls.write(action.data[:TLS_SEND_SIZE])
            self._queue_output()
            return True
        try:
            sent = self.sock.send(action.data)
        except WOULD_BLOCK:
            self._want(WRITE, action.deadline)
            return False
        except OSError as exc:
            self._lost(exc, "send", now)
            return True
        if self.listener.tracing:
            self.listener.event("#%d sent %d bytes", self.record.index, sent)
        self.machine.data_sent(sent, now)
        if sent < len(action.data):
            self._want(WRITE, action.deadline)
            return False
        return True

    def _wait(self, action: Wait, now: float) -> bool:
        self._want(0, action.until)
        return False

    def _park(self, action: Park, now: float) -> bool:
        """Park at the gate: no interest, no timer, until the test lets us go."""
        self._want(0, None)
        reactor = self.listener.reactor
        if self._timer is not None and reactor is not None:
            reactor.cancel(self._timer)
            self._timer = None
        return self.listener.park(self, action.gate, now)

    def _shutdown_write(self, action: ShutdownWrite, now: float) -> bool:
        """Queue close_notify if asked (flushed first by _pump), then send FIN."""
        tls = self._tls
        if tls is not None and action.close_notify and not tls.shut:
            tls.shutdown()
            self._queue_output()
            return True
        try:
            self.sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # the peer is already gone; the next recv or send says how
        self.listener.event("#%d shut down its sending side", self.record.index)
        self.machine.write_shut(now)
        return True

    def _handshake(self, action: Handshake, now: float) -> bool:
        """Advance the TLS handshake; False if it waits for the socket."""
        tls = self._tls
        if tls is None:
            context = self.listener.tls_context
            assert context is not None, "StartTLS on a server without tls="
            tls = self._tls = TLSLayer(context)
        try:
            done = tls.handshake()
        except ssl.SSLError as exc:
            self._queue_output()  # the alert, if any, goes out before the close
            self.machine.tls_failed(_reason(exc), now)
            return True
        self._queue_output()
        if done:
            self.listener.event("#%d TLS started (%s)", self.record.index, tls.version)
            self.record.peer_certificate = tls.peer_certificate()
            self.machine.tls_started(now)
            return True
        if self._out is not None:
            return True  # send our handshake messages first
        data = self._recv(action.deadline, now)
        if data is None:
            return False
        tls.receive(data)
        return True

    def _close(self, action: Close, now: float) -> bool:
        if self._out is not None:
            try:
                self.sock.send(self._out)  # a last alert or close_notify, if the socket takes it
            except OSError:
                pass
        self._close_socket(reset=action.reset)
        self.machine.closed(now)
        return True

    def _done(self, action: Done, now: float) -> bool:
        record = self.record
        if self.listener.tracing:
            why = record.failure or record.detail
            self.listener.event(
                "#%d ended: %s%s", record.index, action.outcome.value, f" ({why})" if why else ""
            )
        self.listener.forget(self)
        return False

    # ---- helpers ------------------------------------------------------------------------------

    def _queue_output(self) -> None:
        """Take the TLS layer's ciphertext into the send queue."""
        tls = self._tls
        assert tls is not None
        data = tls.outgoing()
        if data:
            queued = self._out
            self._out = memoryview(data if queued is None else bytes(queued) + data)

    def _flush(self, action: object, now: float) -> bool:
        """Send queued ciphertext; True once all of it is on the wire."""
        out = self._out
        assert out is not None
        try:
            sent = self.sock.send(out)
        except WOULD_BLOCK:
            self._want(WRITE, _wake_time(action))
            return False
        except OSError as exc:
            self._out = None
            self._out_plain = 0
            self._lost(exc, "send", now)
            return True
        if sent < len(out):
            self._out = out[sent:]
            self._want(WRITE, _wake_time(action))
            return False
        self._out = None
        plain, self._out_plain = self._out_plain, 0
        if plain:
            if self.listener.tracing:
                self.listener.event("#%d sent %d bytes", self.record.index, plain)
            self.machine.data_sent(plain, now)
        return True

    def _lost(self, exc: OSError, doing: str, now: float) -> None:
        """Tell the machine how a socket call failed: the peer left, or worse."""
        machine = self.machine
        if isinstance(exc, BrokenPipeError):
            machine.peer_gone(now)
        elif isinstance(exc, ConnectionResetError):
            machine.peer_reset(now)
        else:
            machine.fail(f"{doing} failed: {describe_error(exc)}", now)

    def _want(self, mask: int, wake_at: float | None) -> None:
        """Register for ``mask`` (only when it changes) and arm a timer for ``wake_at``.

        One timer at a time: a later one than the armed timer waits for it to fire (the
        machine hands out its deadline again), an earlier one replaces it.
        """
        reactor = self.listener.reactor
        assert reactor is not None
        if mask != self._mask:
            old, self._mask = self._mask, 0  # registered for nothing if the selector refuses
            reactor.update_interest(self.sock, self, old, mask)
            self._mask = mask
        if wake_at is not None and (self._timer is None or wake_at < self._timer_at):
            if self._timer is not None:
                reactor.cancel(self._timer)
            self._timer = reactor.call_at(wake_at, self)
            self._timer_at = wake_at

    def _close_socket(self, *, reset: bool) -> None:
        """Unregister and close the socket (RST if ``reset``); never raises."""
        if self._closed:
            return
        self._closed = True
        self._out = None
        reactor = self.listener.reactor
        if reactor is not None:
            if self._mask:
                try:
                    reactor.update_interest(self.sock, self, self._mask, 0)
                except Exception:
                    pass  # already dropped by the selector
                self._mask = 0
            if self._timer is not None:
                reactor.cancel(self._timer)
                self._timer = None
        if reset:
            try:
                self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_ZERO)
            except OSError:
                pass  # already reset by the peer: closing is all that is left
        try:
            self.sock.close()
        except OSError:
            pass


_PERFORM: dict[type, Callable[[Connection, object, float], bool]] = {
    Receive: Connection._receive,  # type: ignore[dict-item]
    Send: Connection._send,  # type: ignore[dict-item]
    Wait: Connection._wait,  # type: ignore[dict-item]
    Park: Connection._park,  # type: ignore[dict-item]
    ShutdownWrite: Connection._shutdown_write,  # type: ignore[dict-item]
    Handshake: Connection._handshake,  # type: ignore[dict-item]
    Close: Connection._close,  # type: ignore[dict-item]
    Done: Connection._done,  # type: ignore[dict-item]
}


def _nobody() -> object:
    return None


def _wake_time(action: object) -> float | None:
    """When the machine wants ``tick`` during ``action``."""
    if isinstance(action, Wait):
        return action.until
    return getattr(action, "deadline", None)


def _reason(exc: BaseException) -> str:
    """An SSLError in a few words."""
    if isinstance(exc, ssl.SSLError) and exc.reason:
        return f"{exc.reason} ({exc.library or 'SSL'})"
    return str(exc) or type(exc).__name__
