"""Gates: steps where connections park until the test lets them go.

A script's ``Gate(name)`` parks the connection that reaches it; ``server.gate(name)`` returns the
:class:`GateControl` for that name. The reactor side of a gate (:class:`GateState`) is kept by
the server's listener: which connections are parked and whether the gate is open. Test threads
see the connections as :class:`Parked` handles, in arrival order, and act on them through
reactor commands, so nothing races with the reactor thread.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from ._records import ConnectionRecord, Latch, Signal
from ._script import compile_script

if TYPE_CHECKING:
    from ._connection import Connection
    from ._reactor import Reactor

__all__ = ["GateControl", "GateState", "Parked", "run_on_reactor"]

#: How long a control call waits for the reactor to carry it out.
CONTROL_SECONDS = 30.0


class GateState:
    """One gate of one server, as the reactor thread keeps it."""

    __slots__ = ("arrivals", "closed", "name", "opened", "parked", "signal")

    def __init__(self, name: str) -> None:
        self.name = name
        self.opened = False
        self.closed = False  # the server closed: nobody will arrive any more
        self.parked: dict[Connection, None] = {}  # reactor thread only
        self.arrivals: deque[Parked] = deque()  # not yet handed to a waiting test
        self.signal = Signal()


class Parked:
    """A connection parked at a gate, as :meth:`GateControl.wait` hands it to the test."""

    __slots__ = ("_connection", "_reactor", "_state", "record")

    def __init__(self, connection: Connection, state: GateState, reactor: Reactor) -> None:
        self._connection = connection
        self._state = state
        self._reactor = reactor
        self.record: ConnectionRecord = connection.record

    def resume(self, steps: Sequence[object] = ()) -> None:
        """Let this connection go: it runs ``steps`` (checked here), then the rest of its
        script. Nothing happens if it has gone meanwhile (the server closed)."""
        compiled = compile_script(steps, name="resume steps") if steps else ()
        connection, state = self._connection, self._state
        run_on_reactor(
            self._reactor, lambda: connection.pass_gate(state, compiled), if_running=True
        )

    def __repr__(self) -> str:
        return f"<Parked connection {self.record.index} at gate {self._state.name!r}>"


class GateControl:
    """What ``server.gate(name)`` returns: wait for arrivals, let them go, open or close."""

    __slots__ = ("_reactor", "_state")

    def __init__(self, state: GateState, reactor: Reactor) -> None:
        self._state = state
        self._reactor = reactor

    @property
    def name(self) -> str:
        return self._state.name

    def wait(self, timeout: float | None = 5.0) -> Parked:
        """The next connection to reach the gate, in arrival order.

        Raises:
            TimeoutError: none arrived within ``timeout`` seconds (naming the gate).
            RuntimeError: the server is closed, so none will.
        """
        state = self._state
        state.signal.wait(lambda: bool(state.arrivals) or state.closed, timeout)
        return self._take(timeout)

    async def wait_async(self, timeout: float | None = 5.0) -> Parked:
        """:meth:`wait` for a coroutine: the event loop runs meanwhile."""
        state = self._state
        await state.signal.wait_async(lambda: bool(state.arrivals) or state.closed, timeout)
        return self._take(timeout)

    def _take(self, timeout: float | None) -> Parked:
        try:
            return self._state.arrivals.popleft()
        except IndexError:
            pass
        if self._state.closed:
            raise RuntimeError(
                f"gate {self.name!r}: the server is closed, no connection will arrive"
            )
        raise TimeoutError(f"no connection reached gate {self.name!r} within {timeout} s")

    def open(self) -> None:
        """Let every parked connection, and every later one, pass."""
        state = self._state
        run_on_reactor(self._reactor, lambda: _open(state, True), if_running=True)

    def close(self) -> None:
        """Park later arrivals again (connections already let go go on)."""
        state = self._state
        run_on_reactor(self._reactor, lambda: _open(state, False), if_running=True)

    def __repr__(self) -> str:
        state = self._state
        return (
            f"<GateControl {state.name!r} {'open' if state.opened else 'closed'}, "
            f"{len(state.arrivals)} waiting to be taken>"
        )


def _open(state: GateState, opened: bool) -> None:
    state.opened = opened
    if opened:
        for connection in list(state.parked):
            connection.pass_gate(state, ())


def run_on_reactor(
    reactor: Reactor, command: Callable[[], None], *, if_running: bool = False
) -> None:
    """Run ``command`` on ``reactor``'s thread and wait until it has run (raising what it
    raised).

    On the reactor thread itself (a Reply calling ``server.down()``) the command is queued and
    takes effect at the end of the pass.
    """
    if threading.current_thread() is reactor.thread:
        reactor.submit(command)
        return
    done = Latch()
    failure: list[BaseException] = []

    def carry_out() -> None:
        try:
            command()
        except BaseException as exc:
            failure.append(exc)
        finally:
            done.set()

    if not reactor.submit(carry_out):
        if if_running:
            return
        raise RuntimeError("the server is closed")
    if not done.wait(CONTROL_SECONDS):
        raise TimeoutError(
            f"the reactor did not carry out the call within {CONTROL_SECONDS} s: {reactor.doing()}"
        )
    if failure:
        raise failure[0]
