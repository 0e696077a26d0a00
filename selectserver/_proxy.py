"""FaultProxy: a TCP proxy on the shared reactor that passes bytes on faithfully, or with faults.

Each accepted client gets its own upstream connection, connected without blocking on the
reactor thread (``connect_ex``, then ``WRITE`` readiness and ``SO_ERROR``): no thread per proxy
or connection. Bytes go through two :class:`~selectserver._faults.Flow` objects, one per
direction, which decide what goes out when (the faults, pacing, delays, backpressure); the
:class:`ProxyConnection` here only carries out what they ask with socket calls.

On the wire the proxy is faithful: a FIN is passed on as a FIN (``shutdown(SHUT_WR)``: half-close
works both ways), an RST as an RST (a side's reset closes the other side with ``SO_LINGER`` 0),
and only then; ordinary closes never use linger 0. An RST discards what the kernel still holds
to send, so the proxy resets each side once its kernel has sent that side everything passed to
it (``SIOCOUTQNSD``, polled, for ``DRAIN_SECONDS`` at most). An unreachable upstream resets the
client right after accept (or closes it with FIN, ``on_upstream_error="close"``). TLS passes
through as ciphertext. Faults, records and recordings: see ``_faults.py`` and ``_recording.py``.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import socket
import struct
import sys
import time
from collections.abc import Callable, Collection, Iterator
from typing import Any

from . import _output
from ._acceptor import (
    AF_UNIX,
    READ,
    WOULD_BLOCK,
    WRITE,
    Acceptor,
    configure,
    describe_error,
    format_address,
)
from ._connection import CALLS_PER_TURN
from ._faults import (
    AnyFault,
    Bandwidth,
    End,
    Fault,
    FaultHandle,
    Flow,
    Hold,
    Latency,
    LimitData,
    PassEnd,
    ResetPeer,
    Send,
    Sleep,
    Slicer,
    SlowClose,
    Timeout,
)
from ._machine import DRAIN_BYTES, DRAIN_SECONDS
from ._reactor import Reactor
from ._recording import (
    DEFAULT_MAX_RECORD,
    Chunk,
    ProxyLog,
    ProxyRecord,
    load_recording,
    record_script,
    save_document,
    to_document,
)
from ._records import Outcome
from ._servers import (
    DEFAULT_TIMEOUT,
    _check_int,
    _check_path,
    _check_seconds,
    _Served,
    check_reactor,
)

__all__ = [
    "Bandwidth",
    "Chunk",
    "Fault",
    "FaultHandle",
    "FaultProxy",
    "Hold",
    "Latency",
    "LimitData",
    "ProxyRecord",
    "ResetPeer",
    "Slicer",
    "SlowClose",
    "Timeout",
    "load_recording",
]

logger = logging.getLogger("selectserver")

#: bytes one recv() takes at most (with MAX_BUFFERED, bounds what a flow holds)
READ_SIZE = 1024 * 1024

_LINGER_ZERO = struct.pack("ii", 1, 0)
if sys.platform.startswith("linux"):
    import fcntl

    _SIOCOUTQNSD = 0x894B  # linux/sockios.h: bytes queued to send, not yet sent
else:  # no way to tell: a reset goes at once
    fcntl = None  # type: ignore[assignment]
    _SIOCOUTQNSD = 0
_RESETS = (ConnectionResetError, BrokenPipeError)
#: connect_ex() results that mean "under way" for TCP (a Unix connect completes or fails at once)
_IN_PROGRESS = frozenset(
    getattr(errno, name)
    for name in ("EINPROGRESS", "EWOULDBLOCK", "EINTR", "WSAEWOULDBLOCK")
    if hasattr(errno, name)
)
#: SO_ERROR codes of a connect that completed, then was reset by the upstream
_RESET_CODES = frozenset({errno.ECONNRESET, errno.EPIPE})
_CONNECTING, _OPEN, _DRAINING, _RESETTING, _DONE = range(5)
#: How often a reset looks whether the bytes passed on have left: first, and at most.
RESET_POLL_SECONDS = 0.001
MAX_RESET_POLL_SECONDS = 0.05

Target = tuple[int, Any]  # (address family, address) to connect to


class _Side:
    """One of a proxied connection's two sockets, and what we know of it.

    The reactor dispatches each socket's readiness to its side, so a pass reads and writes
    only what the selector reported (or what has not said EWOULDBLOCK yet).
    """

    __slots__ = ("blocked", "closed", "mask", "name", "owner", "readable", "reading", "sock")

    def __init__(self, name: str, sock: socket.socket, owner: ProxyConnection) -> None:
        self.name = name  # "client" or "server"
        self.sock = sock
        self.owner = owner
        self.mask = 0  # what the selector watches
        self.reading = True  # it has not ended: there is more to read
        self.readable = True  # no recv() has found the socket empty since it was reported
        self.blocked = False  # a send() said EWOULDBLOCK since the socket was reported
        self.closed = False

    def on_event(self) -> None:
        """The selector reported this socket: read and write it again."""
        self.readable, self.blocked = True, False
        self.owner.on_event()

    def on_timer(self, now: float, when: float) -> None:  # timers are the connection's
        self.owner.on_timer(now, when)

    def crash(self, exc: BaseException) -> None:
        self.owner.crash(exc)

    def describe_work(self) -> str:
        return self.owner.describe_work()


class ProxyConnection:
    """Carries one client's bytes to its upstream connection and back, as its flows ask."""

    __slots__ = (
        "_deadline",
        "_drained",
        "_last_active",
        "_phase",
        "_reset_poll",
        "_targets",
        "_timer",
        "_timer_at",
        "client",
        "down",
        "listener",
        "record",
        "server",
        "up",
    )

    def __init__(
        self, listener: ProxyListener, sock: socket.socket, record: ProxyRecord, now: float
    ) -> None:
        self.listener = listener
        self.record = record
        self.client = _Side("client", sock, self)
        self.server: _Side | None = None
        self.up = Flow("upstream")  # client to server
        self.down = Flow("downstream")  # server to client
        self._phase = _CONNECTING
        self._targets = list(listener.targets)  # addresses not tried yet
        self._deadline: float | None = None  # of the connect, or of the drain
        self._last_active = now
        self._drained = 0
        self._reset_poll = RESET_POLL_SECONDS
        self._timer: list[object] | None = None
        self._timer_at = 0.0

    def describe_work(self) -> str:
        """Who this is (for errors about a busy reactor)."""
        return f"proxied connection {self.record.index} of proxy {self.listener.name}"

    def start(self, now: float) -> None:
        """Connect upstream."""
        self._connect(now)
        self._pump(now)

    # ---- faults -------------------------------------------------------------------------------

    def apply(self, handle: FaultHandle, now: float) -> None:
        """Draw ``handle`` for this connection; if drawn, its fault acts from the next chunk."""
        if self._phase >= _DRAINING:
            return
        record = self.record
        try:
            drawn = handle.selects(record.index, record)
        except Exception as exc:  # the user's predicate
            record.failure = f"the connections predicate of {handle.fault!r} raised: " + (
                describe_error(exc)
            )
            return
        if drawn:
            self.up.add(handle, handle.fault, now)
            self.down.add(handle, handle.fault, now)
            record.faults.append(handle.fault)

    def withdraw(self, handle: FaultHandle) -> None:
        """``handle``'s fault stops acting here."""
        self.up.remove(handle)
        self.down.remove(handle)

    # ---- handler interface --------------------------------------------------------------------

    def on_event(self) -> None:
        """A socket is ready (its side has marked it), or the loop came back to us."""
        if self._phase != _DONE:
            self._pump(time.monotonic())

    def on_timer(self, now: float, when: float) -> None:
        """A delay, a pace, a deadline or the idle timeout is due."""
        self._timer = None
        if self._phase != _DONE:
            self._pump(now)

    def crash(self, exc: BaseException) -> None:
        """Something raised while handling this connection: end it as an ERROR."""
        _output.log(
            logging.ERROR, "%s #%d failed", self.listener.name, self.record.index, exc_info=exc
        )
        self.record.failure = f"internal error: {describe_error(exc)}"
        self._finish(Outcome.ERROR, None, time.monotonic())

    def abort(self, now: float) -> None:
        """The proxy is closing (a reset under way completes at once)."""
        if self._phase == _RESETTING:
            self._finish(self._outcome(), None, now, reset=True)
        else:
            self._finish(Outcome.SERVER_CLOSED, "the proxy was closed", now)

    def drop_sockets(self) -> None:
        """In a forked child: close this process's copies of the sockets, nothing else."""
        for side in self._sides():
            side.closed = True
            try:
                side.sock.close()
            except OSError:
                pass

    # ---- the pump -----------------------------------------------------------------------------

    def _pump(self, now: float) -> None:
        """Move bytes until nothing can move, or the turn is over; then wait for what is next."""
        budget = CALLS_PER_TURN
        if self._phase == _CONNECTING:
            budget -= self._check_connected(now)
        client, server, up, down = self.client, self.server, self.up, self.down
        while self._phase == _OPEN and budget > 0:
            assert server is not None
            # A direction with nothing to read and nothing held (clear) has nothing to do.
            used = 0
            if client.readable or not up.clear:
                used += self._move(up, client, server, now)
            if self._phase == _OPEN and (server.readable or not down.clear):
                used += self._move(down, server, client, now)
            if not used:
                break
            budget -= used
        if self._phase == _OPEN and self._timed_out(now):
            timeout = self.listener.timeout
            self._hang_up(Outcome.TIMED_OUT, f"no bytes either way for {timeout} s", now)
        if self._phase == _RESETTING:
            self._reset_sent(now)
        if self._phase == _DRAINING:
            budget -= self._drain(now, budget)
        if self._phase == _DONE:
            return
        if budget <= 0:
            reactor = self.listener.reactor
            assert reactor is not None
            reactor.call_soon(self)
        self._settle(now)

    def _move(self, flow: Flow, source: _Side, destination: _Side, now: float) -> int:
        """One read from ``source`` and one action of ``flow``; returns the socket calls made."""
        calls = 0
        if source.reading and source.readable and flow.wants_data:
            calls += 1
            data = self._read(flow, source, now)
            if self._phase != _OPEN:
                return calls
            if data:
                if flow.clear and not destination.blocked and not destination.closed:
                    # Nothing acts on or waits in this direction: send at once, as a Send of
                    # the whole chunk would, without queueing it first.
                    calls += 1
                    sent = self._write(destination, data, now)
                    if sent is not None:
                        flow.passed_through(data, sent, now)
                    return calls
                flow.feed(data, now)
        action = flow.next_action(now)
        if isinstance(action, Send):
            if not destination.blocked and not destination.closed:
                calls += 1
                sent = self._write(destination, action.data, now)
                if sent is not None:
                    flow.sent(sent, now)
        elif isinstance(action, PassEnd):
            calls += 1
            self._pass_end(flow, source, destination, action.end, now)
        elif not isinstance(action, Sleep):  # Abort: a fault ends the connection
            calls += 1
            if action.reset:
                self._reset(Outcome.RESET, action.reason, now)
            else:
                self._hang_up(Outcome.HUNG_UP, action.reason, now)
        return calls

    def _read(self, flow: Flow, source: _Side, now: float) -> bytes | None:
        """Read what ``source`` sent and record it (the caller hands it to ``flow``); an end
        goes to ``flow`` here. None: nothing was read."""
        try:
            # recv, not recv_into the reactor's buffer: the bytes are kept (by the flow and the
            # record), and one copy from the kernel beats two.
            data = source.sock.recv(READ_SIZE)
        except WOULD_BLOCK:
            source.readable = False
            return None
        except OSError as exc:
            self._lost(source, exc, now)
            return None
        count = len(data)
        if count < READ_SIZE:
            source.readable = False  # it had no more: the selector says when it has
        if not count:
            source.reading = False
            self._set_end(source, "eof")
            flow.feed_end(End.EOF, now)
            self._event("#%d %s sent EOF", source.name)
            return None
        self._last_active = now
        record = self.record
        record.add(flow is self.up, data, now)
        held = self.up.buffered + self.down.buffered + count
        if held > record.peak_buffered:
            record.peak_buffered = held
        if self.listener.tracing:
            self._event("#%d %s sent %d bytes", source.name, count)
        return data

    def _write(self, destination: _Side, data: bytes | memoryview, now: float) -> int | None:
        """Send ``data`` to ``destination``: the bytes it took, or None if it failed."""
        try:
            sent = destination.sock.send(data)
        except WOULD_BLOCK:
            destination.blocked = True
            return 0
        except OSError as exc:
            self._lost(destination, exc, now)
            return None
        self._last_active = now
        destination.readable = True  # it may have answered already (the peer can preempt us)
        if sent < len(data):
            destination.blocked = True
        return sent

    def _pass_end(
        self, flow: Flow, source: _Side, destination: _Side, end: End, now: float
    ) -> None:
        flow.end_passed()
        if end is End.RESET:
            self._reset(Outcome.PEER_RESET, self._ended_in_words(), now)
            return
        try:
            destination.sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # the peer is gone already: the next recv or send says how
        self._event("#%d passed the %s's EOF on", source.name)
        if self.up.finished and self.down.finished:
            self._finish(Outcome.COMPLETED, None, now)

    def _lost(self, side: _Side, exc: OSError, now: float) -> None:
        """A socket call on ``side`` failed: it reset (or worse). Pass an RST on after what it
        sent; what waits for it is lost."""
        if side.closed:
            return
        self._set_end(side, _how_it_ended(exc))
        self._event("#%d %s: %s", side.name, describe_error(exc))
        side.reading = False
        self._close_side(side, reset=False)
        other = self.server if side is self.client else self.client
        if other is None or other.closed:  # both are gone: there is nothing left to pass on
            self._finish(Outcome.PEER_RESET, self._ended_in_words(), now)
            return
        outgoing, incoming = (self.up, self.down) if side is self.client else (self.down, self.up)
        incoming.discard()
        outgoing.feed_end(End.RESET, now)

    # ---- connecting ---------------------------------------------------------------------------

    def _connect(self, now: float) -> None:
        """Start connecting to the next upstream address."""
        error: OSError = ConnectionRefusedError(errno.ECONNREFUSED, "no address to connect to")
        while self._targets:
            family, address = self._targets.pop(0)
            try:
                sock = socket.socket(family, socket.SOCK_STREAM)
            except OSError as exc:
                error = exc
                continue
            sock.setblocking(False)
            code = sock.connect_ex(address)
            if code == 0 or (code in _IN_PROGRESS and family != AF_UNIX):
                self.server = _Side("server", sock, self)
                timeout = self.listener.timeout
                self._deadline = None if timeout is None else now + timeout
                return
            sock.close()
            error = OSError(code, os.strerror(code))
        self._unreachable(describe_error(error), now)

    def _check_connected(self, now: float) -> int:
        """Has the connect completed? Returns the socket calls made."""
        server = self.server
        if server is None:
            return 0
        code = server.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if not code:
            try:
                server.sock.getpeername()
            except OSError:  # still under way
                if self._deadline is not None and now >= self._deadline:
                    self._retry_connect(f"connect timed out after {self.listener.timeout} s", now)
                return 1
            self._connected(server, now)
            return 1
        error = OSError(code, os.strerror(code))
        if code in _RESET_CODES:  # the upstream accepted, then reset: pass that on
            self._connected(server, now)
            self._lost(server, ConnectionResetError(code, error.strerror), now)
            return 1
        self._retry_connect(describe_error(error), now)
        return 1

    def _retry_connect(self, why: str, now: float) -> None:
        assert self.server is not None
        self._close_side(self.server, reset=False)
        self.server = None
        if self._targets:
            self._connect(now)
        else:
            self._unreachable(why, now)

    def _connected(self, server: _Side, now: float) -> None:
        sock = server.sock
        if sock.family != AF_UNIX:
            try:
                # Pieces go out when the faults say: Nagle would merge a Slicer's pieces.
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass
        try:
            self.record.via = sock.getsockname()
        except OSError:
            pass
        self._phase = _OPEN
        self._deadline = None
        self._last_active = now
        self._event("#%d connected to %s", self.listener.upstream_name)

    def _unreachable(self, why: str, now: float) -> None:
        """No upstream connection: the client gets an RST (or a FIN)."""
        self.record.server_end = f"error: connect failed: {why}"
        detail = f"upstream {self.listener.upstream_name} unreachable: {why}"
        self._event("#%d %s", detail)
        if self.listener.on_upstream_error == "reset":
            self._reset(Outcome.RESET, detail, now)
        else:
            self._hang_up(Outcome.HUNG_UP, detail, now)

    # ---- ending -------------------------------------------------------------------------------

    def _hang_up(self, outcome: Outcome, detail: str, now: float) -> None:
        """Close gracefully: FIN to both sides, then read and drop what they still send for a
        while (closing with unread input would send RST)."""
        for side in self._sides():
            if not side.closed:
                self._set_end(side, "closed by proxy")
                try:
                    side.sock.shutdown(socket.SHUT_WR)
                except OSError:
                    pass
        self.up.discard()
        self.down.discard()
        self._phase = _DRAINING
        self._deadline = now + DRAIN_SECONDS
        self._event("#%d hanging up: %s", detail)
        self._update_record()
        self.record.end(outcome, detail, now)

    def _reset(self, outcome: Outcome, detail: str, now: float) -> None:
        """End with an RST to both sides: the record ends now, and the pump resets each side
        once the bytes passed to it have left the proxy (an RST discards what the kernel still
        holds to send), or after DRAIN_SECONDS at most."""
        self.up.discard()
        self.down.discard()
        self._phase = _RESETTING
        self._deadline = now + DRAIN_SECONDS
        self._reset_poll = RESET_POLL_SECONDS
        for side in self._sides():
            side.reading = False
            if not side.closed:
                self._set_end(side, "reset by proxy")
        self._event("#%d resetting: %s", detail)
        self._update_record()
        self.record.end(outcome, detail, now)

    def _reset_sent(self, now: float) -> None:
        """Reset each side whose bytes have left; end the connection once both are reset."""
        assert self._deadline is not None
        late = now >= self._deadline
        for side in self._sides():
            if not side.closed and (late or not _unsent(side.sock)):
                self._close_side(side, reset=True)
        if all(side.closed for side in self._sides()):
            self._finish(self._outcome(), None, now, reset=True)

    def _drain(self, now: float, budget: int) -> int:
        """Read and drop until both sides have closed, or for DRAIN_SECONDS at most."""
        reactor = self.listener.reactor
        assert reactor is not None
        buffer = reactor.receive_buffer()
        calls = 0
        for side in self._sides():
            while side.reading and side.readable and not side.closed and calls < budget:
                calls += 1
                try:
                    count = side.sock.recv_into(buffer)
                except WOULD_BLOCK:
                    side.readable = False
                    break
                except OSError as exc:
                    side.reading = False
                    self._set_end(side, _how_it_ended(exc))
                    break
                if not count:
                    side.reading = False
                    self._set_end(side, "eof")
                    break
                self._drained += count
        done = not any(side.reading and not side.closed for side in self._sides())
        assert self._deadline is not None
        if done or now >= self._deadline or self._drained >= DRAIN_BYTES:
            self._finish(self._outcome(), None, now)
        return calls

    def _finish(
        self, outcome: Outcome, detail: str | None, now: float, reset: bool = False
    ) -> None:
        """Close both sockets (with RST if ``reset``) and end the record."""
        if self._phase == _DONE:
            return
        self._phase = _DONE
        end = "reset by proxy" if reset else "closed by proxy"
        for side in self._sides():
            self._set_end(side, end)
            self._close_side(side, reset=reset)
        self._cancel_timer()
        self._update_record()
        self.record.end(outcome, detail, now)
        self.listener.forget(self)
        if self.listener.tracing:
            why = self.record.failure or self.record.detail
            self._event("#%d ended: %s%s", outcome.value, f" ({why})" if why else "")

    # ---- helpers ------------------------------------------------------------------------------

    def _sides(self) -> list[_Side]:
        return [self.client] if self.server is None else [self.client, self.server]

    def _outcome(self) -> Outcome:
        """How the record ended (when the proxy decided to hang up or reset)."""
        outcome = self.record.outcome
        assert outcome is not None
        return outcome

    def _ended_in_words(self) -> str:
        """How the sides that ended ended: ``the client reset``, ``the server failed (...)``."""
        record = self.record
        parts = []
        for name, how in (("client", record.client_end), ("server", record.server_end)):
            if how is not None and not how.endswith("by proxy"):
                parts.append(f"the {name} " + ("reset" if how == "reset" else f"failed ({how})"))
        return " and ".join(parts)

    def _set_end(self, side: _Side, how: str) -> None:
        """Note how ``side`` ended: its first end, unless the side reset (or failed) after its
        EOF, which is then what it did last."""
        record = self.record
        now_said = record.client_end if side is self.client else record.server_end
        if now_said is None or (now_said == "eof" and not how.endswith("by proxy")):
            if side is self.client:
                record.client_end = how
            else:
                record.server_end = how

    def _event(self, message: str, *args: object) -> None:
        self.listener.event(message, self.record.index, *args)

    def _update_record(self) -> None:
        record, up, down = self.record, self.up, self.down
        record.passed_upstream = up.passed
        record.passed_downstream = down.passed
        record.dropped = up.dropped + down.dropped + self._drained

    def _held(self, now: float) -> bool:
        """Whether a fault holds bytes back (delayed, paced, held): the connection is not idle."""
        return self.up.holding(now) or self.down.holding(now)

    def _timed_out(self, now: float) -> bool:
        """Whether no byte has moved for the listener's timeout, and no fault holds any."""
        timeout = self.listener.timeout
        return timeout is not None and now >= self._last_active + timeout and not self._held(now)

    def _settle(self, now: float) -> None:
        """Watch the sockets for what we wait for, and arm the timer for the next due time."""
        phase = self._phase
        self._update_record()
        wake = self._deadline
        if phase == _RESETTING:  # look again soon, then less and less often
            wake = _earliest(wake, now + self._reset_poll)
            self._reset_poll = min(2 * self._reset_poll, MAX_RESET_POLL_SECONDS)
        if phase == _OPEN:
            timeout = self.listener.timeout
            if timeout is not None and not self._held(now):
                wake = _earliest(wake, self._last_active + timeout)
            for flow in (self.up, self.down):
                if not flow.clear:
                    action = flow.next_action(now)
                    if isinstance(action, Sleep):
                        wake = _earliest(wake, action.until)
        for side, outgoing in ((self.client, self.up), (self.server, self.down)):
            if side is None:
                continue
            mask = 0
            if phase == _CONNECTING:
                mask = WRITE if side is self.server else 0
            elif phase == _OPEN:
                mask = (READ if side.reading and outgoing.wants_data else 0) | (
                    WRITE if side.blocked else 0
                )
            elif phase == _DRAINING and side.reading:
                mask = READ
            self._watch(side, mask)
        if wake is not None:
            self._arm_timer(wake)

    def _watch(self, side: _Side, mask: int) -> None:
        if side.closed or mask == side.mask:
            return
        reactor = self.listener.reactor
        assert reactor is not None
        old, side.mask = side.mask, 0  # registered for nothing if the selector refuses
        reactor.update_interest(side.sock, side, old, mask)
        side.mask = mask

    def _arm_timer(self, when: float) -> None:
        """One timer at a time: an earlier time replaces it, a later one waits for it."""
        reactor = self.listener.reactor
        assert reactor is not None
        if self._timer is None or when < self._timer_at:
            if self._timer is not None:
                reactor.cancel(self._timer)
            self._timer = reactor.call_at(when, self)
            self._timer_at = when

    def _cancel_timer(self) -> None:
        reactor = self.listener.reactor
        if self._timer is not None and reactor is not None:
            reactor.cancel(self._timer)
        self._timer = None

    def _close_side(self, side: _Side, *, reset: bool) -> None:
        """Unregister and close ``side`` (RST if ``reset``); never raises."""
        if side.closed:
            return
        side.closed = True
        reactor = self.listener.reactor
        if side.mask and reactor is not None:
            try:
                reactor.update_interest(side.sock, side, side.mask, 0)
            except Exception:
                pass  # already dropped by the selector
            side.mask = 0
        if reset:
            try:
                side.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_ZERO)
            except OSError:
                pass
        try:
            side.sock.close()
        except OSError:
            pass


def _unsent(sock: socket.socket) -> int:
    """Bytes the kernel still holds to send on ``sock``: TCP on Linux; 0 where it cannot tell,
    and for Unix sockets (a send puts the bytes in the peer's queue at once)."""
    if fcntl is None or sock.family == AF_UNIX:
        return 0
    try:
        result = fcntl.ioctl(sock.fileno(), _SIOCOUTQNSD, b"\0\0\0\0")
    except OSError:
        return 0
    return int(struct.unpack("i", result)[0])


def _how_it_ended(exc: OSError) -> str:
    """A side's end, from the error a socket call on it raised."""
    return "reset" if isinstance(exc, _RESETS) else f"error: {describe_error(exc)}"


def _earliest(first: float | None, second: float | None) -> float | None:
    if first is None:
        return second
    return first if second is None else min(first, second)


class ProxyListener(Acceptor):
    """One proxy on the reactor: accepts clients and starts a ProxyConnection for each."""

    KIND = "PROXY"

    __slots__ = ("faults", "on_upstream_error", "targets", "timeout", "upstream_name")

    def __init__(
        self,
        sock: socket.socket,
        log: ProxyLog,
        *,
        targets: list[Target],
        upstream_name: str,
        timeout: float | None,
        on_upstream_error: str,
        verbose: bool,
        address: object = None,
    ) -> None:
        super().__init__(
            sock,
            log,
            address=sock.getsockname() if address is None else address,
            verbose=verbose,
            max_connections=None,
        )
        self.targets = targets
        self.upstream_name = upstream_name
        self.timeout = timeout
        self.on_upstream_error = on_upstream_error
        self.faults: list[FaultHandle] = []  # replaced whole, so other threads may read it

    def attach(self, reactor: Reactor) -> None:
        super().attach(reactor)
        self.event("relaying to %s", self.upstream_name)

    # ---- control (reactor thread, through commands) -------------------------------------------

    def add_fault(self, handle: FaultHandle, now: float) -> None:
        """``handle`` acts on every live connection it draws, and on later ones."""
        self.faults = [*self.faults, handle]
        for connection in list(self.connections):
            connection.apply(handle, now)
            _kick(connection)
        self.event("fault added: %r", handle.fault)

    def remove_fault(self, handle: FaultHandle) -> None:
        if handle not in self.faults:
            return
        self.faults = [other for other in self.faults if other is not handle]
        for connection in list(self.connections):
            connection.withdraw(handle)
            _kick(connection)
        self.event("fault removed: %r", handle.fault)

    def _start(self, sock: socket.socket, peer: object) -> None:
        now = time.monotonic()
        index = self.accepted
        self.accepted += 1
        record = self.log.new_record(peer, now)
        if self.tracing:
            self.event("#%d accepted from %s", index, format_address(peer))
        try:
            configure(sock)
            connection = ProxyConnection(self, sock, record, now)
        except Exception as exc:  # it must cost this connection, never the listener
            sock.close()
            record.failure = f"starting the connection failed: {describe_error(exc)}"
            record.end(Outcome.ERROR, None, now)
            return
        self.keep(connection)
        try:
            for handle in self.faults:
                connection.apply(handle, now)
            connection.start(now)
        except Exception as exc:
            connection.crash(exc)


def _kick(connection: ProxyConnection) -> None:
    """Let ``connection`` act on a change of its faults now; a failure costs only it."""
    try:
        connection.on_event()
    except Exception as exc:
        connection.crash(exc)


def _resolve(upstream: object) -> tuple[list[Target], str]:
    """The addresses to connect to for ``upstream``, and its name (in the caller's thread)."""
    if isinstance(upstream, (str, bytes)):
        if not upstream:
            raise ValueError("upstream: a Unix socket path must not be empty")
        if AF_UNIX is None:
            raise OSError("Unix-domain sockets are not available on this platform")
        return [(AF_UNIX, upstream)], format_address(upstream)
    if not isinstance(upstream, (tuple, list)) or len(upstream) != 2:
        raise TypeError(f"upstream must be (host, port) or a Unix socket path, got {upstream!r}")
    host, port = upstream
    if not isinstance(host, str):
        raise TypeError(f"upstream: host must be a str, got {host!r}")
    _check_int("upstream port", port, 1, 65535)
    targets: list[Target] = []
    for family, _, _, _, address in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM):
        if (family, address) not in targets:
            targets.append((family, address))
    return targets, format_address((host, port))


class FaultProxy(_Served):
    """A TCP proxy in front of ``upstream``, on the shared reactor thread, that injects faults.

    Example::

        with FaultProxy(redis_address) as proxy:
            client = redis.Redis(*proxy.address)
            with proxy.fault(ResetPeer(), connections=[0]):
                ...  # the first connection is reset, the retry passes

    Args:
        upstream: where to connect: ``(host, port)`` (resolved here, in your thread) or a Unix
            socket path. Each client gets its own upstream connection.
        host, port, path: where the proxy listens (as for CommandServer).
        verbose: print a ``PROXY: ...`` line per event.
        timeout: seconds without a byte either way (bytes a fault holds back do not count
            as idle) after which a proxied connection is closed (FIN to both;
            ``TIMED_OUT``), and the longest an upstream connect may take; None: never.
        on_upstream_error: what a client gets when the upstream is unreachable: ``"reset"``
            (RST right after accept) or ``"close"`` (FIN).
        max_record: bytes each connection's record keeps: its first ones, both directions
            together (8 MiB by default, so a flood or a download costs bounded memory); the
            rest is counted in its ``unrecorded``, and such a record cannot be replayed.
        reactor: a started :class:`Reactor` instead of the shared default one.

    Raises:
        TypeError, ValueError: a bad argument, named.
        OSError: the address cannot be bound, or the upstream host cannot be resolved.
    """

    __slots__ = ("_log",)
    _listener: ProxyListener

    def __init__(
        self,
        upstream: tuple[str, int] | str | bytes,
        host: str = "127.0.0.1",
        port: int = 0,
        verbose: bool = True,
        *,
        timeout: float | None = DEFAULT_TIMEOUT,
        path: str | bytes | None = None,
        on_upstream_error: str = "reset",
        max_record: int = DEFAULT_MAX_RECORD,
        reactor: Reactor | None = None,
    ) -> None:
        check_reactor(reactor)
        if path is not None:
            _check_path(path)
        _check_seconds("timeout", timeout, allow_none=True)
        if on_upstream_error not in ("reset", "close"):
            raise ValueError(
                f"on_upstream_error must be 'reset' or 'close', got {on_upstream_error!r}"
            )
        _check_int("max_record", max_record, 0)
        targets, upstream_name = _resolve(upstream)
        self._log = ProxyLog(max_record)
        sock = self._bind_address(host, port, path)
        listener = ProxyListener(
            sock,
            self._log,
            address=self._sock_name,
            targets=targets,
            upstream_name=upstream_name,
            timeout=timeout,
            on_upstream_error=on_upstream_error,
            verbose=bool(verbose),
        )
        self._serve(listener, reactor)

    # ---- faults -------------------------------------------------------------------------------

    def add(
        self,
        fault: AnyFault,
        *,
        connections: Collection[int] | Callable[[ProxyRecord], object] | None = None,
        probability: float = 1.0,
        seed: int = 0,
    ) -> FaultHandle:
        """Inject ``fault`` from the next chunk on every connection it targets, live and later.

        Args:
            connections: None (all), the indices of the connections to target, or a predicate
                on a connection's :class:`ProxyRecord` (called on the reactor thread).
            probability: the chance that a targeted connection gets it, drawn once per
                connection from ``seed`` and the connection's index (the same every run).

        In effect on every live connection when it returns. Returns the handle for
        :meth:`remove`.
        """
        handle = FaultHandle(fault, connections, probability, seed)
        listener = self._listener
        self._run(lambda: listener.add_fault(handle, time.monotonic()))
        return handle

    def remove(self, handle: FaultHandle) -> None:
        """Stop ``handle``'s fault on every connection (held bytes flow again); idempotent."""
        if not isinstance(handle, FaultHandle):
            raise TypeError(f"remove takes what add() returned, got {handle!r}")
        if self._closing:
            return
        listener = self._listener
        self._run(lambda: listener.remove_fault(handle))

    @contextlib.contextmanager
    def fault(
        self,
        fault: AnyFault,
        *,
        connections: Collection[int] | Callable[[ProxyRecord], object] | None = None,
        probability: float = 1.0,
        seed: int = 0,
    ) -> Iterator[FaultHandle]:
        """``with proxy.fault(Latency(0.5)):`` adds the fault (as :meth:`add`), removes it on
        exit."""
        handle = self.add(fault, connections=connections, probability=probability, seed=seed)
        try:
            yield handle
        finally:
            self.remove(handle)

    def clear(self) -> None:
        """Remove every fault."""
        if self._closing:
            return
        listener = self._listener

        def clear_all() -> None:
            for handle in list(listener.faults):
                listener.remove_fault(handle)

        self._run(clear_all)

    @property
    def faults(self) -> list[FaultHandle]:
        """The faults in effect, in the order they were added."""
        return list(self._listener.faults)

    # ---- records ------------------------------------------------------------------------------

    @property
    def upstream(self) -> str:
        """Where the proxy connects, as ``host:port`` or a path."""
        return self._listener.upstream_name

    @property
    def connections(self) -> list[ProxyRecord]:
        """One live record per accepted connection, in accept order."""
        return list(self._log.records)

    def wait_for_connections(self, n: int, timeout: float | None = 5.0) -> list[ProxyRecord]:
        """Block until ``n`` proxied connections have ended; the first ``n`` in the order they
        ended. ``TimeoutError`` says what the others are doing."""
        records = self._log.wait_for_connections(n, timeout)
        _output.flush()
        return records

    def check(self) -> None:
        """Raise ``AssertionError`` listing internal errors (never a client's or server's
        reset: those are in the records); silent when all is well."""
        self._raise_reactor_error()
        self._log.check()

    def to_script(self, k: int) -> list[object]:
        """A CommandServer script that plays the server's side of connection ``k`` by position
        (see ``_recording.script_of``): ``CommandServer(proxy.to_script(0))``.

        Raises:
            ValueError: the connection was not recorded in full (``max_record``).
        """
        return record_script(self._log.records[k])

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write every connection to ``path`` as a recording (JSON, format in
        ``_recording.py``); ``load_recording(path)`` makes the scripts that replay it."""
        save_document(to_document(list(self._log.records), self.upstream), path)

    def __repr__(self) -> str:
        state = "closed" if self._closing else "serving"
        return (
            f"<FaultProxy {self.url} to {self.upstream} {state}, "
            f"{len(self._log.records)} connections, {len(self._listener.faults)} faults>"
        )
