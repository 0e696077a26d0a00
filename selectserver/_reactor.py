"""The reactor: one thread, one selector, every fake server's sockets.

Each pass of the loop (asyncio's ``_run_once``, trio's ``unrolled_run``):

1. ``select`` with a timeout of 0 if commands wait, else until the next timer (or forever);
2. dispatch each ready socket to its handler (a listener or a connection);
3. fire the timers that are due;
4. run the commands queued before this pass (open a server, close one).

Other threads talk to the reactor only through :meth:`Reactor.submit`: a command goes into a
deque under a lock, and one byte on a socketpair wakes the selector (trio's wakeup socketpair).
Every handler runs inside its own ``try``: an exception ends that one connection or listener and
is recorded for ``check()``; it never stops the loop. If the loop itself fails, the error is kept,
every server's log says so, and all sockets are closed, so no caller waits forever.

The default reactor starts with the first server and stops, closing its thread and file
descriptors, when the last server closes; the next server starts a new one. A reactor built by
hand (say, on ``selectors.SelectSelector`` for tests) runs until :meth:`Reactor.close`.
"""

from __future__ import annotations

import logging
import selectors
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Protocol

from ._timers import TimerHeap

__all__ = ["Reactor", "ReactorStatistics", "attach", "statistics"]

logger = logging.getLogger("selectserver")

#: bytes one recv() may take: more than a TLS record (16 KiB), so one recv takes a record
RECV_BUFFER_SIZE = 256 * 1024


class Handler(Protocol):
    """What the reactor dispatches to: a listener or a connection."""

    def on_event(self, mask: int) -> None: ...
    def on_timer(self, now: float, when: float) -> None: ...
    def crash(self, exc: BaseException) -> None: ...


class ServerHandle(Protocol):
    """What the reactor needs of a server (a ``Listener``)."""

    closed: threading.Event | None  # made by a closer before it asks for the removal

    @property
    def connections(self) -> Collection[object]:
        """The live connections, for statistics."""

    def attach(self, reactor: Reactor) -> None: ...
    def close(self, now: float) -> None: ...
    def crash(self, exc: BaseException) -> None: ...


@dataclass(frozen=True, slots=True)
class ReactorStatistics:
    """A snapshot of what a reactor holds, for tests and benchmarks."""

    running: bool
    servers: int
    connections: int
    registered: int
    """File objects in the selector, including the reactor's wake-up socket."""
    timers: int
    """Timer entries in the heap (some may be stale: they are dropped when due)."""
    thread_name: str | None


class Reactor:
    """One background thread multiplexing every server's sockets with a selector."""

    def __init__(
        self,
        selector_factory: Callable[[], selectors.BaseSelector] = selectors.DefaultSelector,
        *,
        stop_when_idle: bool = False,
    ) -> None:
        """Make a reactor; :meth:`start` starts its thread.

        Args:
            selector_factory: builds the selector (``DefaultSelector``, ``SelectSelector``, ...).
            stop_when_idle: stop once the last server closes (how the default reactor behaves).
        """
        self._selector = selector_factory()
        self._timers: TimerHeap[Handler] = TimerHeap()
        self._forgotten: set[Handler] = set()  # closed handlers whose timers may remain
        self._servers: set[ServerHandle] = set()
        self._closing: list[ServerHandle] = []  # closed this pass; their closers wait
        self._lock = threading.Lock()
        self._commands: deque[Callable[[], None]] = deque()
        self._closed = False  # under _lock: no more commands accepted
        self._woken = False  # under _lock: a wake-up byte is on its way
        self._stop_when_idle = stop_when_idle
        self._wake_r, self._wake_w = socket.socketpair()
        for sock in (self._wake_r, self._wake_w):
            sock.setblocking(False)
        self._selector.register(self._wake_r, selectors.EVENT_READ, None)
        self._thread = threading.Thread(target=self._run, name="selectserver-reactor", daemon=True)
        self.error: BaseException | None = None
        self._buffer: memoryview | None = None

    def __repr__(self) -> str:
        state = "stopped" if self._closed else "running" if self._thread.is_alive() else "new"
        return f"<Reactor {type(self._selector).__name__} {state}, {len(self._servers)} servers>"

    # ---- any thread ---------------------------------------------------------------------------

    def start(self) -> None:
        """Start the reactor's thread."""
        self._thread.start()

    @property
    def thread(self) -> threading.Thread:
        """The reactor's thread."""
        return self._thread

    @property
    def stopping(self) -> bool:
        """Whether the reactor takes no more commands (it has stopped or is stopping)."""
        return self._closed

    def submit(self, command: Callable[[], None]) -> bool:
        """Queue ``command`` to run on the reactor thread; False if the reactor has stopped."""
        with self._lock:
            if self._closed:
                return False
            self._commands.append(command)
            if self._woken:
                return True
            self._woken = True
        try:
            self._wake_w.send(b"\0")
        except (BlockingIOError, OSError):
            pass  # a byte is already waiting, or the reactor is shutting down
        return True

    def add_server(self, server: ServerHandle) -> bool:
        """Start serving ``server`` on this reactor; False if the reactor has stopped."""
        return self.submit(lambda: self._add_server(server))

    def remove_server(self, server: ServerHandle) -> bool:
        """Close ``server`` and all its connections on the reactor thread.

        ``server.closed``, if the caller made one, is set once its sockets are closed and the
        reactor has decided whether to stop. False if the reactor has stopped (its sockets are
        then already closed).
        """
        return self.submit(lambda: self._remove_server(server))

    def close(self) -> None:
        """Close every server and stop the thread; returns once it has stopped."""
        self.submit(self._stop)
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join()

    def join(self) -> None:
        """Wait for a stopping reactor's thread to end (it has closed its sockets by then)."""
        if self._thread.ident is not None and threading.current_thread() is not self._thread:
            self._thread.join()

    def statistics(self) -> ReactorStatistics:
        """What the reactor holds now (read from any thread; approximate while it runs)."""
        servers = list(self._servers)
        selector_map = self._selector.get_map()  # None once the selector is closed
        registered = len(selector_map) if selector_map is not None else 0
        return ReactorStatistics(
            running=self._thread.is_alive(),
            servers=len(servers),
            connections=sum(len(server.connections) for server in servers),
            registered=registered,
            timers=len(self._timers),
            thread_name=self._thread.name if self._thread.is_alive() else None,
        )

    # ---- reactor thread only ------------------------------------------------------------------

    def update_interest(self, fileobj: socket.socket, handler: Handler, old: int, new: int) -> None:
        """Change what ``fileobj`` is registered for, from ``old`` to ``new`` (0: nothing)."""
        if new == old:
            return
        if not old:
            self._selector.register(fileobj, new, handler)
        elif not new:
            self._selector.unregister(fileobj)
        else:
            self._selector.modify(fileobj, new, handler)

    def receive_buffer(self) -> memoryview:
        """Where this reactor's connections receive (only its thread uses it).

        Made on first use, so a reactor that never accepts never pays for it.
        """
        if self._buffer is None:
            self._buffer = memoryview(bytearray(RECV_BUFFER_SIZE))
        return self._buffer

    def call_at(self, when: float, handler: Handler) -> None:
        """Call ``handler.on_timer(now, when)`` once ``time.monotonic()`` reaches ``when``."""
        self._timers.push(when, handler)

    def forget_timers(self, handler: Handler) -> None:
        """``handler`` is closed: its armed timers may go (in bulk, once they are many).

        Without this a closed connection's deadline stays in the heap, holding the
        connection, until it is due: at a few thousand connections a second and a 30 s
        timeout, that is a hundred thousand dead connections kept alive.
        """
        forgotten = self._forgotten
        forgotten.add(handler)
        if len(forgotten) >= max(64, len(self._timers) // 4):
            self._timers.discard(forgotten)
            forgotten.clear()

    def _add_server(self, server: ServerHandle) -> None:
        self._servers.add(server)
        try:
            server.attach(self)
        except Exception as exc:
            server.crash(exc)

    def _remove_server(self, server: ServerHandle) -> None:
        self._servers.discard(server)
        self._closing.append(server)
        server.close(time.monotonic())

    def _stop(self) -> None:
        with self._lock:
            self._closed = True

    def _run(self) -> None:
        try:
            while not self._closed:
                self._run_once()
        except BaseException as exc:
            self.error = exc
            logger.critical("selectserver reactor failed", exc_info=exc)
        finally:
            self._shut_down()

    def _run_once(self) -> None:
        timeout: float | None = 0.0
        if not self._commands:
            deadline = self._timers.next_deadline()
            timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
        for key, mask in self._selector.select(timeout):
            handler = key.data
            if handler is None:
                self._drain_wakeups()
                continue
            try:
                handler.on_event(mask)
            except Exception as exc:
                handler.crash(exc)
        if self._timers:
            now = time.monotonic()
            for when, handler in self._timers.pop_due(now):
                try:
                    handler.on_timer(now, when)
                except Exception as exc:
                    handler.crash(exc)
        if self._commands:
            with self._lock:
                batch = list(self._commands)
                self._commands.clear()
                self._woken = False
            for command in batch:
                try:
                    command()
                except Exception:
                    logger.exception("selectserver: a reactor command failed")
            if self._closing:
                self._release_closed()

    def _release_closed(self) -> None:
        """Tell closers their servers are closed, after deciding whether to stop when idle.

        The decision comes first so that ``close()`` of the last server can wait for the
        stop (and so count no reactor thread or descriptor left behind).
        """
        if self._stop_when_idle and not self._servers:
            with self._lock:
                if not self._commands:
                    self._closed = True
        closing, self._closing = self._closing, []
        for server in closing:
            _release(server)

    def _drain_wakeups(self) -> None:
        try:
            while self._wake_r.recv(4096):
                pass
        except (BlockingIOError, InterruptedError):
            pass

    def _shut_down(self) -> None:
        """Close everything, whatever state the loop died in, and release every waiter."""
        with self._lock:
            self._closed = True
            self._commands.clear()
        now = time.monotonic()
        for server in self._closing + list(self._servers):
            try:
                if self.error is not None:
                    server.crash(self.error)
                server.close(now)
            except Exception:
                logger.exception("selectserver: closing a server failed")
            _release(server)
        self._servers.clear()
        self._closing.clear()
        self._timers.clear()
        self._forgotten.clear()
        self._selector.close()
        self._wake_r.close()
        self._wake_w.close()


def _release(server: ServerHandle) -> None:
    """Wake whoever waits for ``server`` to close."""
    if server.closed is not None:
        server.closed.set()


# ---- the default reactor --------------------------------------------------------------------

_default: Reactor | None = None
_default_lock = threading.Lock()


def attach(server: ServerHandle) -> Reactor:
    """Serve ``server`` on the default reactor, starting one if none is running."""
    global _default
    with _default_lock:
        if _default is not None and _default.add_server(server):
            return _default
        reactor = Reactor(stop_when_idle=True)
        reactor.add_server(server)
        reactor.start()
        _default = reactor
        return reactor


def statistics() -> ReactorStatistics:
    """What the default reactor holds now (all zeros when none is running)."""
    reactor = _default
    if reactor is None:
        return ReactorStatistics(False, 0, 0, 0, 0, None)
    return reactor.statistics()
