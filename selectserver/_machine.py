"""The step machine: one connection's script as pure logic, with no socket, thread or clock.

Theory of operation
-------------------
A :class:`StepMachine` runs a compiled script (see ``_script``) for one connection. Like h11's
``Connection`` it never touches a socket: :meth:`~StepMachine.next_action` says what the
connection wants next, and a few methods report what happened (``receive_data``, ``data_sent``,
``write_shut``, ``tick``, ``peer_reset``, ``server_closed``). Every method that can move the
machine takes ``now``, so timeouts, delays and drips are tested without sleeping.

The actions form a small closed set:

* :class:`Receive` -- read whatever arrives and pass it to ``receive_data`` (``b""`` is EOF);
* :class:`Send` -- send as much of ``data`` as the socket takes and report it to ``data_sent``;
* :class:`Wait` -- do nothing until ``until``, then call ``tick``;
* :data:`SHUTDOWN_WRITE` -- shut the sending side (FIN) and call ``write_shut``;
* :class:`Handshake` -- run the TLS handshake, then call ``tls_started`` (or ``tls_failed``);
* :class:`Done` -- the connection is over; ``outcome`` says how to close the socket.

``Receive``, ``Send`` and ``Handshake`` carry a ``deadline``: call ``tick`` then (or later) and
the machine decides whether the peer has been silent for longer than the timeout.

How steps complete:

* A receive step (``RECEIVE``, an int, ``ReadUntil``, ``Expect``) reads into one buffer. Bytes
  that arrived before the step are already there, and a step that takes only a prefix (a
  delimiter, a match) leaves the rest for the next receive step. ``RECEIVE``/int steps take every
  byte they have read once they have at least ``min_bytes``. A completed step hands its bytes to
  the record (``record.add_received``).
* A send step hands out one slice at a time: the whole payload, a ``Drip`` chunk, or what a
  ``Throttle`` allows. Partial sends continue with a ``memoryview`` of the unsent tail; nothing
  is copied. Between slices the machine waits (drip interval, throttle pacing).
* ``Delay`` waits; ``Throttle`` sets the pacing of later sends; ``HALF_CLOSE`` asks for a
  shutdown of the sending side; ``STALL`` reads and discards until the peer closes;
  ``StartTLS`` asks for a handshake (a failing one was compiled into plain steps).

How a connection ends, always exactly once, with one :class:`~selectserver.Outcome`:
the script runs out (``COMPLETED``) or says ``HANGUP`` (``HUNG_UP``), ``TRUNCATE`` or ``RESET``;
the TLS handshake fails (``TLS_FAILED``); the peer closes
(``PEER_CLOSED``) or resets (``PEER_RESET``); the peer is silent for ``timeout`` seconds during a
receive or send step (``TIMED_OUT``); or the server is closed (``SERVER_CLOSED``). An ``Expect``
that did not match before the end, and a timeout, are failures: the record keeps a sentence
saying which step failed and why, which ``check()`` reports. After ``Done`` the machine takes no
more steps and ignores further reports.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Union

from ._records import ConnectionRecord, Outcome
from ._script import Command, Delay, ReadStep, SendStep, StartTLS, Step, Throttle

__all__ = [
    "SHUTDOWN_WRITE",
    "Action",
    "Done",
    "Handshake",
    "Receive",
    "Send",
    "ShutdownWrite",
    "StepMachine",
    "Wait",
]


@dataclass(frozen=True, slots=True)
class Receive:
    """Read whatever arrives; call ``tick`` at ``deadline`` (None: no time limit)."""

    deadline: float | None


@dataclass(frozen=True, slots=True)
class Send:
    """Send as much of ``data`` as the socket takes; call ``tick`` at ``deadline``."""

    data: memoryview
    deadline: float | None


@dataclass(frozen=True, slots=True)
class Wait:
    """Do nothing until ``until``, then call ``tick``."""

    until: float


@dataclass(frozen=True, slots=True)
class ShutdownWrite:
    """Shut down the sending side of the socket, then call ``write_shut``."""


@dataclass(frozen=True, slots=True)
class Handshake:
    """Run the TLS handshake; call ``tick`` at ``deadline``."""

    deadline: float | None


@dataclass(frozen=True, slots=True)
class Done:
    """The connection is over."""

    outcome: Outcome


SHUTDOWN_WRITE = ShutdownWrite()
Action = Union[Receive, Send, Wait, ShutdownWrite, Handshake, Done]

#: A throttled send hands out slices worth this many seconds of its rate.
THROTTLE_SLICE_SECONDS = 0.01


class StepMachine:
    """Runs one connection's script; see the module docstring for the rules."""

    __slots__ = (
        "_action",
        "_buffer",
        "_index",
        "_next_send",
        "_progress",
        "_rate",
        "_rest",
        "_rng",
        "_searched",
        "_step",
        "_step_bytes",
        "_steps",
        "_taken",
        "_timeout",
        "_until",
        "_view",
        "record",
    )

    def __init__(
        self,
        steps: tuple[Step, ...],
        record: ConnectionRecord,
        *,
        now: float,
        timeout: float | None = None,
    ) -> None:
        """Start running ``steps`` at time ``now``.

        Args:
            steps: a compiled script (``compile_script``).
            record: where the transcript goes; ``record.max_receive`` caps what it keeps.
            now: the current time, in the same clock as every later call.
            timeout: seconds of peer silence after which a receive or send step fails
                (None: wait forever).
        """
        self.record = record
        self._steps = steps
        self._timeout = timeout
        self._index = -1
        self._step: Step | None = None
        self._buffer = bytearray()  # read, not yet taken by a receive step
        self._searched = 0  # how much of _buffer the current ReadUntil has searched
        self._taken = 0  # bytes the current count step has read
        self._step_bytes = bytearray()  # what the current count step keeps
        self._progress = now  # when the peer last moved bytes, or the step began
        self._rate: float | None = None  # Throttle's bytes per second
        self._next_send = now  # a throttled send may not start before this
        self._view: memoryview | None = None  # unsent part of the current slice
        self._rest: memoryview | None = None  # the current send step after this slice
        self._until = 0.0  # end of the current wait
        self._rng: random.Random | None = None  # jitter of the current Delay/Drip
        self._action: Action = Done(Outcome.COMPLETED)
        self._next_step(now)

    # ---- what the connection wants ------------------------------------------------------------

    def next_action(self) -> Action:
        """What the connection should do next."""
        return self._action

    @property
    def step_index(self) -> int:
        """The index of the step now running (``len(script)`` once the script has run out)."""
        return self._index

    def describe(self) -> str:
        """What the connection is waiting for, in words (for timeouts and transcripts)."""
        action = self._action
        if isinstance(action, Done):
            return f"ended: {action.outcome.value}"
        where = f"step {self._index} ({self._label()})"
        if isinstance(action, Receive):
            got = len(self._buffer) + self._taken
            if self._step is Command.STALL:
                return f"{where}: stalling until the peer closes"
            return f"{where}: waiting for data (has {got} bytes of this step)"
        if isinstance(action, Send):
            return f"{where}: sending, {len(action.data)} bytes of this slice unsent"
        if isinstance(action, Wait):
            return f"{where}: waiting until t={action.until:.3f}"
        if isinstance(action, Handshake):
            return f"{where}: in the TLS handshake"
        return f"{where}: shutting down the sending side"

    # ---- what happened ------------------------------------------------------------------------

    def receive_data(self, data: bytes, now: float) -> None:
        """Bytes arrived from the peer; ``b""`` means the peer closed its sending side."""
        if not isinstance(self._action, Receive):
            return
        step = self._step
        if not data:
            self._end_early(Outcome.PEER_CLOSED, "the peer closed the connection", now)
            return
        self._progress = now
        if step is Command.STALL:
            self.record.discarded += len(data)
            return
        assert isinstance(step, ReadStep)
        if step.min_bytes:
            done = self._take_count(step, data)
        else:
            self._buffer += data
            done = self._try_read(step, now)
        if done:
            self._next_step(now)

    def data_sent(self, count: int, now: float) -> None:
        """The socket took the first ``count`` bytes of the ``Send`` action's data."""
        action = self._action
        if not isinstance(action, Send) or count <= 0:
            return
        self._progress = now
        view = action.data
        self.record.add_sent(view[:count])
        if count < len(view):
            self._view = view[count:]
            self._action = Send(self._view, self._deadline())
            return
        self._view = None
        self._after_slice(len(view), now)

    def write_shut(self, now: float) -> None:
        """The sending side is shut down (after :data:`SHUTDOWN_WRITE`)."""
        if self._action is SHUTDOWN_WRITE:
            self.record.half_closed = True
            self._next_step(now)

    def tick(self, now: float) -> None:
        """Time has passed: end a wait whose time has come, or time out a silent peer."""
        action = self._action
        if isinstance(action, Wait):
            if now < action.until:
                return
            if self._view is not None or self._rest is not None:
                self._send_slice(now)
            else:
                self._next_step(now)
        elif (
            isinstance(action, (Receive, Send, Handshake))
            and self._timeout is not None
            and self._step is not Command.STALL  # a stall waits for the peer, however long
        ):
            if now < self._progress + self._timeout:
                deadline = self._deadline()
                if isinstance(action, Send):
                    self._action = Send(action.data, deadline)
                else:
                    self._action = type(action)(deadline)
                return
            if isinstance(action, Receive):
                silent = "no data arrived"
            elif isinstance(action, Send):
                silent = "the peer took none of the data"
            else:
                silent = "the TLS handshake did not finish"
            self._end_early(
                Outcome.TIMED_OUT, f"timed out: {silent} for {self._timeout:g} s", now, failed=True
            )

    def tls_started(self, now: float) -> None:
        """The TLS handshake (after :class:`Handshake`) finished."""
        if isinstance(self._action, Handshake):
            self.record.tls = True
            self._next_step(now)

    def tls_failed(self, reason: str, now: float) -> None:
        """The TLS layer failed: a handshake the peer refused, or a bad record."""
        self._end_early(Outcome.TLS_FAILED, f"TLS failed: {reason}", now)

    def peer_reset(self, now: float) -> None:
        """The peer reset the connection (ECONNRESET)."""
        self._end_early(Outcome.PEER_RESET, "the peer reset the connection", now)

    def peer_gone(self, now: float) -> None:
        """The peer stopped reading for good (EPIPE on send)."""
        self._end_early(Outcome.PEER_CLOSED, "the peer closed the connection", now)

    def server_closed(self, now: float) -> None:
        """The server is closing while this connection is still running."""
        self._end_early(Outcome.SERVER_CLOSED, "the server was closed", now)

    def fail(self, message: str, now: float) -> None:
        """End with ``ERROR``: something outside the script went wrong (a socket error, a bug)."""
        self._end_early(Outcome.ERROR, message, now, failed=True)

    # ---- stepping -----------------------------------------------------------------------------

    def _label(self) -> str:
        step = self._step
        if isinstance(step, (ReadStep, SendStep)):
            return step.label
        return repr(step)

    def _deadline(self) -> float | None:
        timeout = self._timeout
        return None if timeout is None else self._progress + timeout

    def _next_step(self, now: float) -> None:
        """Start the following steps until one waits for the peer or the clock."""
        steps = self._steps
        while True:
            self._index += 1
            if self._index >= len(steps):
                self._step = None
                self._finish(Outcome.COMPLETED, None, now)
                return
            step = self._step = steps[self._index]
            self._progress = now
            if isinstance(step, ReadStep):
                self._searched = self._taken = 0
                if self._try_read(step, now):
                    continue
                self._action = Receive(self._deadline())
                return
            if isinstance(step, SendStep):
                if not step.data:
                    continue
                self._rest = memoryview(step.data)  # slices of it are sent: no copies
                self._rng = random.Random(step.seed) if step.jitter else None
                self._send_slice(now)
                return
            if isinstance(step, Delay):
                seconds = step.seconds
                if step.jitter:
                    seconds += random.Random(step.seed).uniform(0.0, step.jitter)
                self._until = now + seconds
                self._action = Wait(self._until)
                return
            if isinstance(step, Throttle):
                self._rate = step.bytes_per_second
                self._next_send = now
                continue
            if isinstance(step, StartTLS):
                self._action = Handshake(self._deadline())
                return
            if step is Command.HALF_CLOSE:
                self._action = SHUTDOWN_WRITE
                return
            if step is Command.STALL:
                self._action = Receive(None)
                return
            if step is Command.HANGUP:
                self._finish(Outcome.HUNG_UP, None, now)
                return
            if step is Command.TRUNCATE:
                self._finish(Outcome.TRUNCATED, None, now)
                return
            assert step is Command.RESET, step
            self._finish(Outcome.RESET, None, now)
            return

    def _try_read(self, step: ReadStep, now: float) -> bool:
        """Complete ``step`` from the buffer if its condition holds; True if it did."""
        buffer = self._buffer
        record = self.record
        if step.min_bytes:
            if not buffer:
                return False
            data = bytes(buffer)
            buffer.clear()
            return self._take_count(step, data)
        if step.delimiter is not None:
            start = max(0, self._searched - len(step.delimiter) + 1)
            found = buffer.find(step.delimiter, start)
            end = -1 if found < 0 else found + len(step.delimiter)
            self._searched = len(buffer)
        else:
            assert step.regex is not None
            match = step.regex.search(buffer)
            end = -1 if match is None else match.end()
        if end < 0:
            if len(buffer) > record.max_receive:
                self._end_early(
                    Outcome.ERROR,
                    f"no match within max_receive={record.max_receive} bytes",
                    now,
                    failed=True,
                )
            return False
        data = bytes(buffer[:end])
        del buffer[:end]
        record.add_received(record.keep(data), self._index)
        return True

    def _take_count(self, step: ReadStep, data: bytes) -> bool:
        """Add ``data`` to a count step (RECEIVE, int); True once it has ``min_bytes``."""
        record = self.record
        self._taken += len(data)
        kept = record.keep(data)
        if self._taken < step.min_bytes:
            self._step_bytes += kept
            return False
        if self._step_bytes:
            self._step_bytes += kept
            kept = bytes(self._step_bytes)
            self._step_bytes.clear()
        self._taken = 0
        record.add_received(kept, self._index)
        return True

    def _send_slice(self, now: float) -> None:
        """Hand out the next slice of the current send step, or wait until it may go."""
        step = self._step
        assert isinstance(step, SendStep)
        if self._view is None:
            rest = self._rest
            assert rest
            if self._rate is not None and now < self._next_send:
                self._action = Wait(self._next_send)
                return
            size = len(rest)
            if step.chunk is not None:
                size = min(size, step.chunk)
            if self._rate is not None:
                size = min(size, max(1, int(self._rate * THROTTLE_SLICE_SECONDS)))
            self._view = rest[:size]
            self._rest = rest[size:]
        self._action = Send(self._view, self._deadline())

    def _after_slice(self, size: int, now: float) -> None:
        """A whole slice went out: pace the next one, or move on."""
        step = self._step
        assert isinstance(step, SendStep)
        assert self._rest is not None
        resume = now
        if self._rate is not None:
            self._next_send = max(self._next_send, now) + size / self._rate
        if step.chunk is not None and self._rest:
            interval = step.interval
            if self._rng is not None:
                interval += self._rng.uniform(0.0, step.jitter)
            resume = now + interval
        if self._rest and self._rate is not None:
            resume = max(resume, self._next_send)
        if resume > now:
            self._until = resume
            self._action = Wait(resume)
            return
        if self._rest:
            self._send_slice(now)
        else:
            self._rest = None
            self._next_step(now)

    def _end_early(self, outcome: Outcome, why: str, now: float, *, failed: bool = False) -> None:
        """End before the script ran out, keeping the bytes of an unfinished receive step."""
        if isinstance(self._action, Done):
            return
        step = self._step
        failure = None
        if isinstance(step, ReadStep):
            partial = bytes(self._step_bytes) + self.record.keep(bytes(self._buffer))
            self._step_bytes.clear()
            self._buffer.clear()
            if partial:
                self.record.add_received(partial, self._index)
            if step.must_match:
                failed = True
                why = f"{why} before the pattern matched; this step got {partial[-200:]!r}"
        if failed:
            failure = f"step {self._index} ({self._label()}): {why}"
        self.record.detail = why
        self._finish(outcome, failure, now)

    def _finish(self, outcome: Outcome, failure: str | None, now: float) -> None:
        self._action = Done(outcome)
        self._view = self._rest = None
        self.record.end(outcome, failure, now, self._index)
