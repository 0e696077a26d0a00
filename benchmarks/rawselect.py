"""``rawselect``: the least a selectors loop can do to serve the step list, in one thread.

No records, no step machine, no timers: one selector, a wake-up socketpair and a command deque,
listeners that accept in batches, and connections that read into one shared buffer and send
with ``memoryview`` tails, registering for writes only while bytes wait. It is the pure-Python
limit selectserver's overhead is measured against.
"""

from __future__ import annotations

import selectors
import socket
import threading
from collections import deque
from collections.abc import Callable

from .common import RECV_SIZE, WAIT_SECONDS, Script, bounded_join, listening_socket

__all__ = ["RawGroup"]


class _RawConnection:
    """One accepted socket playing the step list: the least a script can cost."""

    __slots__ = ("index", "loop", "mask", "out", "owner", "script", "sock", "want")

    def __init__(self, loop: _RawLoop, owner: set[_RawConnection], sock: socket.socket) -> None:
        self.loop = loop
        self.owner = owner
        self.sock = sock
        self.script: Script = ()
        self.index = 0
        self.want = 0  # bytes still to read in this step
        self.out: memoryview | None = None  # unsent tail of this step
        self.mask = 0

    def on_event(self, mask: int) -> None:
        if self.out is not None:
            try:
                sent = self.sock.send(self.out)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                self.close()
                return
            if sent < len(self.out):
                self.out = self.out[sent:]
                return
            self.out = None
        else:
            try:
                count = self.sock.recv_into(self.loop.buffer)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                count = 0
            if not count:
                self.close()
                return
            self.want -= count
            if self.want > 0:
                return
        self.index += 1
        self.advance()

    def advance(self) -> None:
        script = self.script
        while self.index < len(script):
            step = script[self.index]
            if isinstance(step, int):
                self.want = step
                self._interest(selectors.EVENT_READ)
                return
            try:
                sent = self.sock.send(step)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError:
                self.close()
                return
            if sent < len(step):
                self.out = memoryview(step)[sent:]
                self._interest(selectors.EVENT_WRITE)
                return
            self.index += 1
        self.close()

    def _interest(self, mask: int) -> None:
        if mask != self.mask:
            if self.mask:
                self.loop.selector.modify(self.sock, mask, self)
            else:
                self.loop.selector.register(self.sock, mask, self)
            self.mask = mask

    def close(self) -> None:
        if self.mask:
            self.loop.selector.unregister(self.sock)
            self.mask = 0
        self.sock.close()
        self.owner.discard(self)


class _RawListener:
    __slots__ = ("connections", "loop", "script", "sock")

    def __init__(self, loop: _RawLoop, sock: socket.socket, script: Script) -> None:
        self.loop = loop
        self.sock = sock
        self.script = script
        self.connections: set[_RawConnection] = set()

    def on_event(self, mask: int) -> None:
        for _ in range(64):
            try:
                conn, _ = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            conn.setblocking(False)
            connection = _RawConnection(self.loop, self.connections, conn)
            connection.script = self.script
            self.connections.add(connection)
            connection.advance()

    def close(self) -> None:
        self.loop.selector.unregister(self.sock)
        self.sock.close()
        for connection in list(self.connections):
            connection.close()


class _RawLoop:
    """One thread, one selector, a wake-up socketpair and a command deque."""

    def __init__(self) -> None:
        self.selector = selectors.DefaultSelector()
        self.buffer = bytearray(RECV_SIZE)
        self.commands: deque[Callable[[], None]] = deque()
        self.running = True
        self.wake_r, self.wake_w = socket.socketpair()
        self.wake_r.setblocking(False)
        self.wake_w.setblocking(False)
        self.selector.register(self.wake_r, selectors.EVENT_READ, None)
        self.thread = threading.Thread(target=self.run, name="rawselect", daemon=True)
        self.thread.start()

    def submit(self, command: Callable[[], None]) -> None:
        self.commands.append(command)
        try:
            self.wake_w.send(b"\0")
        except BlockingIOError:
            pass

    def call(self, command: Callable[[], None]) -> None:
        """Run ``command`` on the loop thread and wait for it."""
        done = threading.Event()

        def run() -> None:
            command()
            done.set()

        self.submit(run)
        if not done.wait(WAIT_SECONDS):
            raise RuntimeError("the rawselect loop did not answer in time")

    def run(self) -> None:
        selector = self.selector
        while self.running:
            for key, mask in selector.select():
                handler = key.data
                if handler is None:
                    try:
                        while self.wake_r.recv(4096):
                            pass
                    except BlockingIOError:
                        pass
                    while self.commands:
                        self.commands.popleft()()
                else:
                    handler.on_event(mask)

    def stop(self) -> None:
        def halt() -> None:
            self.running = False

        self.submit(halt)
        bounded_join(self.thread)
        self.selector.close()
        self.wake_r.close()
        self.wake_w.close()


class RawGroup:
    def __init__(self, script: Script, n: int) -> None:
        self.loop = _RawLoop()
        self.listeners: list[_RawListener] = []
        for _ in range(n):
            listener = _RawListener(self.loop, listening_socket(), script)
            self.listeners.append(listener)
            self.loop.submit(self._register(listener))
        self.addresses = [listener.sock.getsockname()[:2] for listener in self.listeners]

    def _register(self, listener: _RawListener) -> Callable[[], None]:
        def register() -> None:
            self.loop.selector.register(listener.sock, selectors.EVENT_READ, listener)

        return register

    def settle(self) -> None:
        self.loop.call(lambda: None)  # commands run in order: every listener is registered

    def connections(self) -> int:
        return sum(len(listener.connections) for listener in self.listeners)

    def close(self) -> None:
        for listener in self.listeners:
            self.loop.call(listener.close)
        self.loop.stop()
