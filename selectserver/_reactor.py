"""The reactor: one thread, one selector, every fake server's sockets.

Each pass of the loop (asyncio's ``_run_once``, trio's ``unrolled_run``):

1. ``select`` with a timeout of 0 if work waits, else until the next timer, never longer than
   :data:`MAX_SELECT_SECONDS` (a longer wait is many short ones);
2. dispatch each ready socket to its handler (a listener or a connection), then the handlers
   that asked to come back (:meth:`Reactor.call_soon`: one that used up its turn);
3. fire the timers that are due;
4. run the commands queued before this pass (open a server, close one).

Other threads talk to the reactor only through :meth:`Reactor.submit`: a command goes into a
deque and one byte on a socketpair wakes the selector (trio's wakeup socketpair). No lock is
taken, so ``submit`` works from a signal handler that interrupted any thread and from a
finalizer the garbage collector runs on the reactor thread itself.

The loop is guarded: a handler, timer or command that raises ends only what it belongs to (a
connection, a listener, a server), and the failure reaches that server's ``check()``. A file
the selector rejects costs its handler. If the loop itself fails (a bug), the error is kept,
every server's ``check()``/``close()`` raises it, and all sockets are closed, so no caller
waits forever.

The default reactor starts with the first server and stays up while servers come and go: it
stops, closing its thread and file descriptors, once it has served no server for
:data:`IDLE_SECONDS` (a suite that makes a server per test starts one thread, not one per test),
or at once through :func:`stop_reactor`; the next server starts a new one. A reactor built by
hand (say, on ``selectors.SelectSelector`` for tests) runs from :meth:`Reactor.start` until
:meth:`Reactor.close`, or until it has been idle for its ``idle_seconds``.

A process forked while reactors run gets none of their threads: in the child, their servers'
sockets are closed (without touching the parent's connections) and the child's first server
starts a fresh default reactor.
"""

from __future__ import annotations

import logging
import os
import selectors
import socket
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Protocol

from . import _output
from ._records import Latch
from ._timers import TimerHeap

__all__ = [
    "IDLE_SECONDS",
    "MAX_SELECT_SECONDS",
    "Reactor",
    "ReactorStatistics",
    "attach",
    "statistics",
    "stop_reactor",
]

logger = logging.getLogger("selectserver")

#: bytes one recv() may take: more than a TLS record (16 KiB)
RECV_BUFFER_SIZE = 256 * 1024
#: the longest one select() waits (selectors raise OverflowError past a platform limit)
MAX_SELECT_SECONDS = 60.0
#: how long the default reactor waits, serving no server, before it stops
IDLE_SECONDS = 1.0


class Handler(Protocol):
    """What the reactor dispatches to: a listener or a connection."""

    def on_event(self) -> None: ...
    def on_timer(self, now: float, when: float) -> None: ...
    def crash(self, exc: BaseException) -> None: ...


class ServerHandle(Protocol):
    """What the reactor needs of a server (a ``Listener``)."""

    closed: Latch | None  # made by a closer before it asks for the removal

    @property
    def name(self) -> str:
        """How events and errors name the server."""

    @property
    def connections(self) -> Collection[object]:
        """The live connections, for statistics."""

    def attach(self, reactor: Reactor) -> None: ...
    def close(self, now: float) -> None: ...
    def crash(self, exc: BaseException) -> None: ...
    def abandon(self, exc: BaseException) -> None: ...
    def drop_sockets(self) -> None: ...


@dataclass(frozen=True, slots=True)
class ReactorStatistics:
    """A snapshot of what a reactor holds, for tests and benchmarks."""

    running: bool
    servers: int
    connections: int
    registered: int
    """File objects in the selector, including the reactor's wake-up socket."""
    timers: int
    """Armed timers (at most one per connection or listener)."""
    thread_name: str | None


_Command = Callable[[bool], None]  # called with whether the reactor is alive


class Reactor:
    """One background thread multiplexing every server's sockets with a selector."""

    def __init__(
        self,
        selector_factory: Callable[[], selectors.BaseSelector] = selectors.DefaultSelector,
        *,
        idle_seconds: float | None = None,
    ) -> None:
        """Make a reactor; :meth:`start` starts its thread.

        Args:
            selector_factory: builds the selector (``DefaultSelector``, ``SelectSelector``, ...).
            idle_seconds: stop once no server has been served for this long (0: as soon as the
                last one closes; None: run until :meth:`close`).
        """
        self._selector = selector_factory()
        self._timers: TimerHeap[Handler] = TimerHeap()
        self._ready: deque[Handler] = deque()  # handlers that come back in the next pass
        self._servers: set[ServerHandle] = set()
        self._closing: list[ServerHandle] = []  # closed this pass; their closers wait
        self._commands: deque[_Command] = deque()
        self._closed = False  # no more commands accepted
        self._released = False  # the selector and socketpair are closed
        self._idle_seconds = idle_seconds
        self._idle_deadline: float | None = None  # when to stop if still serving no server
        self._wake_r, self._wake_w = socket.socketpair()
        for sock in (self._wake_r, self._wake_w):
            sock.setblocking(False)
        self._selector.register(self._wake_r, selectors.EVENT_READ, None)
        self._thread = threading.Thread(target=self._run, name="selectserver-reactor", daemon=True)
        self._current: object = None  # the handler or command running now, for close() errors
        self.error: BaseException | None = None
        self._buffer: memoryview | None = None
        _reactors.add(self)

    def __repr__(self) -> str:
        return (
            f"<Reactor {type(self._selector).__name__} {self.state}, {len(self._servers)} servers>"
        )

    # ---- any thread ---------------------------------------------------------------------------

    def start(self) -> None:
        """Start the reactor's thread."""
        self._thread.start()

    @property
    def state(self) -> str:
        """``new`` (never started), ``running`` or ``stopped``."""
        if self._thread.ident is None and not self._closed:
            return "new"
        return "running" if self._thread.is_alive() and not self._closed else "stopped"

    @property
    def thread(self) -> threading.Thread:
        """The reactor's thread."""
        return self._thread

    @property
    def started(self) -> bool:
        """Whether :meth:`start` was called."""
        return self._thread.ident is not None

    @property
    def stopping(self) -> bool:
        """Whether the reactor takes no more commands (it has stopped or is stopping)."""
        return self._closed

    def doing(self) -> str:
        """What the reactor thread is busy with now, in words (for errors about waits)."""
        current = self._current
        if not self._thread.is_alive():
            return "its thread has stopped"
        if current is None:
            return "it is waiting in select()"
        describe = getattr(current, "describe_work", None)
        return f"it is busy with {describe() if describe is not None else 'a command'}"

    def submit(self, command: Callable[[], None]) -> bool:
        """Queue ``command`` to run on the reactor thread; False if the reactor has stopped.

        Takes no lock: safe from a signal handler and from the reactor thread itself.
        """
        return self._submit(lambda alive: command() if alive else None)

    def _submit(self, command: _Command) -> bool:
        if self._closed:
            return False
        commands = self._commands
        commands.append(command)
        if self._stopped_meanwhile():  # take the command back if we can
            try:
                commands.remove(command)
            except ValueError:
                pass  # the reactor took it: it runs (told whether the reactor is alive)
            else:
                return False
        try:
            self._wake_w.send(b"\0")
        except OSError:
            pass  # a byte already waits (the pipe is full), or the reactor is shutting down
        return True

    def _stopped_meanwhile(self) -> bool:
        """Read ``_closed`` again (another thread may have set it since the first look)."""
        return self._closed

    def add_server(self, server: ServerHandle) -> bool:
        """Start serving ``server`` on this reactor; False if the reactor has stopped."""
        return self._submit(lambda alive: self._add_server(server, alive))

    def remove_server(self, server: ServerHandle) -> bool:
        """Close ``server`` and all its connections on the reactor thread.

        ``server.closed``, if the caller made one, is set once its sockets are closed and the
        reactor has decided whether to stop. False if the reactor has stopped (its sockets are
        then already closed).
        """
        return self._submit(lambda alive: self._remove_server(server))

    def close(self, timeout: float | None = None) -> None:
        """Close every server and stop the thread; returns once it has stopped.

        A reactor that was never started just releases its selector and socketpair.

        Raises:
            TimeoutError: the thread did not stop within ``timeout`` seconds.
        """
        if not self.started:
            self._closed = True
            self._shut_down()
            return
        self._submit(self._stop)
        if threading.current_thread() is not self._thread:
            self._thread.join(_bounded(timeout))
            if self._thread.is_alive():
                raise TimeoutError(f"{self!r} did not stop within {timeout} s: {self.doing()}")

    def join(self, timeout: float | None = None) -> None:
        """Wait for a stopping reactor's thread to end (it has closed its sockets by then)."""
        if self._thread.ident is not None and threading.current_thread() is not self._thread:
            self._thread.join(_bounded(timeout))

    def statistics(self) -> ReactorStatistics:
        """What the reactor holds now (read from any thread; approximate while it runs)."""
        servers = list(self._servers)
        try:
            selector_map = self._selector.get_map()  # None once the selector is closed
            registered = len(selector_map) if selector_map is not None else 0
        except (RuntimeError, ValueError):
            registered = 0
        running = self._thread.is_alive()
        return ReactorStatistics(
            running=running,
            servers=len(servers),
            connections=sum(len(server.connections) for server in servers),
            registered=registered,
            timers=len(self._timers),
            thread_name=self._thread.name if running else None,
        )

    # ---- reactor thread only ------------------------------------------------------------------

    def update_interest(self, fileobj: socket.socket, handler: Handler, old: int, new: int) -> None:
        """Change what ``fileobj`` is registered for, from ``old`` to ``new`` (0: nothing).

        If the selector refuses, ``fileobj`` ends up not registered at all (a selector may drop
        a key itself when ``modify`` fails) and the error is raised for its handler.
        """
        if new == old:
            return
        selector = self._selector
        try:
            if not old:
                selector.register(fileobj, new, handler)
            elif not new:
                selector.unregister(fileobj)
            else:
                selector.modify(fileobj, new, handler)
        except BaseException:
            if new:
                self._unregister_quietly(fileobj)
            raise

    def forget_file(self, fileobj: socket.socket) -> None:
        """Make sure ``fileobj`` is not in the selector (before closing it by force)."""
        self._unregister_quietly(fileobj)

    def receive_buffer(self) -> memoryview:
        """Where this reactor's connections receive (only its thread uses it).

        Made on first use, so a reactor that never accepts never pays for it.
        """
        if self._buffer is None:
            self._buffer = memoryview(bytearray(RECV_BUFFER_SIZE))
        return self._buffer

    def call_at(self, when: float, handler: Handler) -> list[object]:
        """Call ``handler.on_timer(now, when)`` once ``time.monotonic()`` reaches ``when``.

        Returns the timer, for :meth:`cancel`.
        """
        return self._timers.push(when, handler)

    def cancel(self, timer: list[object]) -> None:
        """Drop a timer :meth:`call_at` armed (a fired one is ignored)."""
        self._timers.cancel(timer)

    def call_soon(self, handler: Handler) -> None:
        """Call ``handler.on_event()`` in the next pass, after everyone else's turn."""
        self._ready.append(handler)

    def _add_server(self, server: ServerHandle, alive: bool) -> None:
        if not alive:
            server.crash(RuntimeError("the reactor stopped before it could serve this server"))
            server.close(time.monotonic())
            return
        self._servers.add(server)
        self._idle_deadline = None
        self._current = server
        try:
            server.attach(self)
        except Exception as exc:
            server.crash(exc)

    def _remove_server(self, server: ServerHandle) -> None:
        self._servers.discard(server)
        self._closing.append(server)
        self._current = server
        try:
            server.close(time.monotonic())
        except Exception as exc:
            server.abandon(exc)

    def _stop(self, alive: bool) -> None:
        self._closed = True

    def _run(self) -> None:
        try:
            while not self._closed:
                self._run_once()
        except BaseException as exc:
            self.error = exc
            _output.log(logging.CRITICAL, "selectserver reactor failed", exc_info=exc)
        finally:
            self._shut_down()

    def _run_once(self) -> None:
        timeout = 0.0
        if not self._commands and not self._ready:
            deadline = self._timers.next_deadline()
            idle = self._idle_deadline
            if idle is not None and (deadline is None or idle < deadline):
                deadline = idle
            timeout = (
                MAX_SELECT_SECONDS
                if deadline is None
                else min(MAX_SELECT_SECONDS, max(0.0, deadline - time.monotonic()))
            )
        self._current = None
        try:
            events = self._selector.select(timeout)
        except (OSError, ValueError) as exc:
            self._drop_bad_files(exc)
            events = []
        for key, _ in events:
            handler = key.data
            if handler is None:
                self._drain_wakeups()
            else:
                self._dispatch(handler)
        for _ in range(len(self._ready)):
            self._dispatch(self._ready.popleft())
        if self._timers:
            now = time.monotonic()
            for when, handler in self._timers.pop_due(now):
                self._current = handler
                try:
                    handler.on_timer(now, when)
                except Exception as exc:
                    self._crash(handler, exc)
        if self._commands:
            self._run_commands()
        elif self._idle_deadline is not None and time.monotonic() >= self._idle_deadline:
            self._stop_if_idle()

    def _dispatch(self, handler: Handler) -> None:
        self._current = handler
        try:
            handler.on_event()
        except Exception as exc:
            self._crash(handler, exc)

    def _crash(self, handler: Handler, exc: BaseException) -> None:
        try:
            handler.crash(exc)
        except Exception as again:  # a bug in crash itself: log it, keep the loop
            _output.log(logging.ERROR, "selectserver: crash handling failed", exc_info=again)

    def _run_commands(self) -> None:
        commands = self._commands
        for _ in range(len(commands)):
            command = commands.popleft()
            self._current = command
            try:
                command(True)
            except Exception as exc:  # a bug: _add_server/_remove_server guard the servers
                _output.log(logging.ERROR, "selectserver: a reactor command failed", exc_info=exc)
        if self._closing:
            self._release_closed()

    def _release_closed(self) -> None:
        """Tell closers their servers are closed, after deciding whether to stop when idle.

        The decision comes first so that, with ``idle_seconds=0``, ``close()`` of the last
        server can wait for the stop (and so count no reactor thread or descriptor left
        behind).
        """
        if self._idle_seconds is not None and not self._servers:
            self._idle_deadline = time.monotonic() + self._idle_seconds
            if self._idle_seconds <= 0:
                self._stop_if_idle()
        closing, self._closing = self._closing, []
        for server in closing:
            _release(server)

    def _stop_if_idle(self) -> None:
        """Stop unless a command came in (it may bring a server).

        A submitter that raced with the decision either sees the stop and takes its command
        back, or its command is seen here and the reactor goes on; the next pass looks again.
        """
        if self._servers:
            self._idle_deadline = None
            return
        self._closed = True
        if self._commands:
            self._closed = False

    def _drop_bad_files(self, exc: BaseException) -> None:
        """select() failed: crash the handlers whose files are closed or invalid.

        A user may close a socket the reactor holds (or a file descriptor number may be past
        what ``SelectSelector`` takes). If no such file is found, the error is a bug: raise it.
        """
        bad = []
        for key in list(self._selector.get_map().values()):
            try:
                fd = key.fileobj.fileno() if not isinstance(key.fileobj, int) else key.fileobj
                if fd < 0:
                    raise ValueError("closed")
                os.fstat(fd)
            except (OSError, ValueError):
                bad.append(key)
        if not bad:
            raise exc
        for key in bad:
            self._unregister_quietly(key.fileobj)
            if key.data is not None:
                self._crash(key.data, exc)

    def _unregister_quietly(self, fileobj: object) -> None:
        try:
            self._selector.unregister(fileobj)  # type: ignore[arg-type]
        except (KeyError, ValueError, OSError):
            pass

    def _drain_wakeups(self) -> None:
        try:
            while self._wake_r.recv(4096):
                pass
        except OSError:
            pass

    def _shut_down(self) -> None:
        """Close everything, whatever state the loop died in, and release every waiter."""
        self._closed = True
        now = time.monotonic()
        for server in self._closing + list(self._servers):
            try:
                if self.error is not None:
                    server.crash(self.error)
                server.close(now)
            except Exception as exc:
                server.abandon(exc)
            _release(server)
        self._servers.clear()
        self._closing.clear()
        # Commands that came too late: told the reactor is gone, so each releases its server.
        while self._commands:
            try:
                self._commands.popleft()(False)
            except Exception:
                pass
        for server in self._closing:
            _release(server)
        self._closing.clear()
        self._timers.clear()
        self._ready.clear()
        self._current = None
        self._release_files()

    def _release_files(self) -> None:
        if self._released:
            return
        self._released = True
        for close in (self._selector.close, self._wake_r.close, self._wake_w.close):
            try:
                close()
            except OSError:
                pass

    def _after_fork_in_child(self) -> None:
        """This is a forked child: the thread is gone. Release what the child inherited."""
        self._closed = True
        for server in self._closing + list(self._servers):
            server.drop_sockets()
            _release(server)
        self._servers.clear()
        self._closing.clear()
        self._commands.clear()
        self._timers.clear()
        self._ready.clear()
        self._release_files()


def _bounded(timeout: float | None) -> float | None:
    """``timeout`` as a lock takes it (longer waits raise OverflowError there)."""
    return None if timeout is None else min(max(timeout, 0.0), threading.TIMEOUT_MAX)


def _release(server: ServerHandle) -> None:
    """Wake whoever waits for ``server`` to close."""
    if server.closed is not None:
        server.closed.set()


# ---- the default reactor --------------------------------------------------------------------

_default: Reactor | None = None
# Re-entrant: a signal handler that makes a server while its thread is inside attach().
_default_lock = threading.RLock()
_reactors: weakref.WeakSet[Reactor] = weakref.WeakSet()


def attach(server: ServerHandle) -> Reactor:
    """Serve ``server`` on the default reactor, starting one if none is running."""
    global _default
    with _default_lock:
        if _default is not None and _default.add_server(server):
            return _default
        reactor = Reactor(idle_seconds=IDLE_SECONDS)
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


def stop_reactor(timeout: float | None = 30.0) -> None:
    """Stop the default reactor now, and the output writer, and wait until both are gone.

    For tests that count threads and file descriptors: afterwards selectserver holds none
    (until the next server starts a new reactor). A server still open is closed, as when
    its reactor stops.

    Raises:
        TimeoutError: the reactor or the writer did not stop within ``timeout`` seconds.
    """
    global _default
    with _default_lock:
        reactor, _default = _default, None
    if reactor is not None:
        reactor.close(timeout)
    _output.stop(timeout)


def _after_fork_in_child() -> None:
    global _default, _default_lock
    _default = None
    _default_lock = threading.RLock()
    for reactor in list(_reactors):
        reactor._after_fork_in_child()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
