"""The step machine: one connection's script as pure logic, with no socket, thread or clock.

Theory of operation
-------------------
A :class:`StepMachine` runs a compiled script (see ``_script``) for one connection, from the
accept to the close of its socket. Like h11's ``Connection`` it never touches a socket:
:meth:`~StepMachine.next_action` says what the connection wants next, and a few methods report
what happened (``receive_data``, ``data_sent``, ``write_shut``, ``tls_started``, ``closed``,
``tick``, ``peer_reset``, ``server_closed``, ...). Every method that can move the machine takes
``now``, so timeouts, delays, drips, drains and lingering closes are tested without sleeping.

The actions form a small closed set:

* :class:`Receive` -- read whatever arrives and pass it to ``receive_data`` (``b""`` is EOF);
* :class:`Send` -- send as much of ``data`` as the socket takes and report it to ``data_sent``;
* :class:`Wait` -- do nothing until ``until``, then call ``tick``;
* :class:`ShutdownWrite` -- send TLS's close_notify if asked and TLS is on, then FIN; call
  ``write_shut`` once both are on the wire;
* :class:`Handshake` -- run the TLS handshake, then call ``tls_started`` (or ``tls_failed``);
* :class:`Close` -- close the socket (with RST if ``reset``), then call ``closed``;
* :class:`Done` -- the socket is closed; ``outcome`` says how the connection ended.

Every action but ``Done`` carries a time (``deadline`` or ``until``): call ``tick`` then (or
later) and the machine decides whether the peer has been silent for too long.

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
  ``StartTLS`` asks for a handshake (a failing one was compiled into plain steps). Bytes still
  unread when a handshake starts came in plaintext before TLS: a failure (STARTTLS command
  injection, CVE-2011-0411), and they are discarded.

How a connection ends, always exactly once, with one :class:`~selectserver.Outcome`:
the script runs out (``COMPLETED``) or says ``HANGUP`` (``HUNG_UP``), ``TRUNCATE`` or ``RESET``;
the TLS handshake fails (``TLS_FAILED``); the peer closes (``PEER_CLOSED``) or resets
(``PEER_RESET``); the peer is silent for ``timeout`` seconds during a receive or send step
(``TIMED_OUT``); or the server is closed (``SERVER_CLOSED``). An ``Expect`` that did not match
before the end, and a timeout, are failures: the record keeps a sentence saying which step
failed and why, which ``check()`` reports. Every byte read is in the record: in ``received``, or
counted in ``discarded`` (a stall, the drain, bytes left unread when the script ended).

How the socket closes, so the peer sees what the script means (the record ends only once the
wire shows the end: after the FIN, or after the close):

* a graceful end (``COMPLETED``, ``HUNG_UP``; ``TRUNCATED`` without close_notify) shuts the
  sending side, ends the record, then *drains*: reads and discards what the peer still sends
  until it closes, for at most :data:`DRAIN_SECONDS` and :data:`DRAIN_BYTES`, then closes.
  Closing with unread input would send RST, so a client whose request the script read only in
  part still sees a clean EOF;
* ``RESET`` closes with RST;
* anything else closes at once.
"""

from __future__ import annotations

import random
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Union

from ._records import ConnectionRecord, Outcome
from ._script import (
    Command,
    Delay,
    Gate,
    ReadStep,
    Repeat,
    Reply,
    ReplyContext,
    SendStep,
    StartTLS,
    Step,
    Throttle,
    compile_script,
)

__all__ = [
    "DRAIN_BYTES",
    "DRAIN_SECONDS",
    "Action",
    "Close",
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
    """Send as much of ``data`` as the socket takes; call ``tick`` at ``deadline``.

    ``raw``: write on the socket itself, beneath TLS (``SendRaw``).
    """

    data: memoryview
    deadline: float | None
    raw: bool = False


@dataclass(frozen=True, slots=True)
class Wait:
    """Do nothing until ``until``, then call ``tick``."""

    until: float


@dataclass(frozen=True, slots=True)
class ShutdownWrite:
    """Send close_notify (if ``close_notify`` and TLS is on), then FIN; then ``write_shut``."""

    close_notify: bool
    deadline: float | None


@dataclass(frozen=True, slots=True)
class Handshake:
    """Run the TLS handshake; call ``tick`` at ``deadline``."""

    deadline: float | None


@dataclass(frozen=True, slots=True)
class Park:
    """Wait, neither reading nor timing out, until the test lets the connection pass the
    gate ``name``; then call ``resume``."""

    gate: str


@dataclass(frozen=True, slots=True)
class Close:
    """Close the socket now, with RST if ``reset``; then call ``closed``."""

    reset: bool


@dataclass(frozen=True, slots=True)
class Done:
    """The connection is over and its socket closed."""

    outcome: Outcome


Action = Union[Receive, Send, Wait, ShutdownWrite, Handshake, Park, Close, Done]
# Actions are immutable: those that carry no time are made once and shared.
_DONE_ACTIONS = {outcome: Done(outcome) for outcome in Outcome}
_CLOSE_ACTIONS = {reset: Close(reset) for reset in (False, True)}
_RECEIVE_FOREVER = Receive(None)
#: Runs a Reply's function, or the check of the steps it returned: ``call(fn, argument,
#: label)`` (the executor times it).
Caller = Callable[[Callable[[Any], Any], Any, str], Any]


def _no_server() -> object:
    return None


def _call_directly(fn: Callable[[Any], Any], context: Any, label: str) -> Any:
    return fn(context)


#: A throttled send hands out slices worth this many seconds of its rate.
THROTTLE_SLICE_SECONDS = 0.01
#: After a graceful end, how long and how much to read while waiting for the peer to close.
DRAIN_SECONDS = 2.0
DRAIN_BYTES = 64 * 1024 * 1024
#: An ``Expect`` whose match has no width bound searches a buffer past this size again only
#: when it has doubled, or when the peer has paused for ``SEARCH_PAUSE_SECONDS``: close to
#: linear however much arrives before the match.
SEARCH_EAGERLY_BELOW = 64 * 1024
SEARCH_PAUSE_SECONDS = 0.01
#: Steps one call may start without waiting, before the machine pauses until the next turn.
STEPS_PER_TURN = 1000

_GRACEFUL = frozenset({Outcome.COMPLETED, Outcome.HUNG_UP, Outcome.TRUNCATED})
_SCRIPT_ENDS = {
    Command.HANGUP: Outcome.HUNG_UP,
    Command.TRUNCATE: Outcome.TRUNCATED,
    Command.RESET: Outcome.RESET,
    Command.CLOSE: Outcome.CLOSED,
}
# What the phases after the script are waiting for, for describe().
_RUNNING, _SHUTTING, _DRAINING, _CLOSING, _DONE = range(5)


class StepMachine:
    """Runs one connection's script; see the module docstring for the rules."""

    __slots__ = (
        "_action",
        "_buffer",
        "_call",
        "_drained",
        "_frames",
        "_fresh",
        "_index",
        "_last",
        "_next_send",
        "_outcome",
        "_phase",
        "_progress",
        "_rate",
        "_rest",
        "_rng",
        "_search_due",
        "_searched",
        "_sent_root",
        "_server",
        "_state",
        "_step",
        "_step_bytes",
        "_steps",
        "_taken",
        "_timeout",
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
        server: Callable[[], object] = _no_server,
        call: Caller = _call_directly,
    ) -> None:
        """Start running ``steps`` at time ``now``.

        Args:
            steps: a compiled script (``compile_script``).
            record: where the transcript goes; ``record.max_receive`` caps what it keeps.
            now: the current time, in the same clock as every later call.
            timeout: seconds of peer silence after which a receive or send step fails
                (None: wait forever).
            server: returns the server a Reply's context names (None once it is gone).
            call: runs a Reply's function (the executor times it).
        """
        self.record = record
        self._steps = steps
        self._timeout = timeout
        self._server = server
        self._call = call
        # The script's own position is _index; _frames holds only the nested sequences
        # (Repeats, a Reply's steps, a gate's resume steps), made when the first one starts.
        self._frames: list[_Frame] | None = None
        self._fresh = False  # an endless Repeat's iteration has had no byte yet
        self._last = b""  # the latest completed receive step's bytes
        self._state: dict[str, Any] | None = None  # Reply's per-connection dict
        self._index = -1
        self._step: Step | None = None
        self._phase = _RUNNING
        self._outcome = Outcome.COMPLETED  # how the script ended, once it has
        self._buffer: bytearray | None = None  # read, not yet taken by a receive step
        self._searched = 0  # how much of _buffer the current ReadUntil/Expect has searched
        self._search_due: float | None = None  # when a deferred Expect search runs
        self._taken = 0  # bytes the current count step has read
        self._step_bytes: list[bytes] | None = None  # the chunks the current count step keeps
        self._progress = now  # when the peer last moved bytes, or the step began
        self._rate: float | None = None  # Throttle's bytes per second
        self._next_send = now  # a throttled send may not start before this
        self._view: memoryview | None = None  # unsent part of the current slice
        self._rest: memoryview | None = None  # the current send step after this slice
        self._sent_root: memoryview | None = None  # the current send step's whole payload
        self._rng: random.Random | None = None  # jitter of the current Delay/Drip
        self._drained = 0
        self._action: Action = _DONE_ACTIONS[Outcome.COMPLETED]
        self._next_step(now)

    # ---- what the connection wants ------------------------------------------------------------

    def next_action(self) -> Action:
        """What the connection should do next."""
        return self._action

    @property
    def step_index(self) -> int:
        """The index of the step now running (``len(script)`` once the script has run out)."""
        return self._index

    @property
    def running(self) -> bool:
        """Whether the script is still running (it has not ended, nor begun to close)."""
        return self._phase == _RUNNING

    def describe(self) -> str:
        """What the connection is waiting for, in words (for timeouts and transcripts)."""
        action = self._action
        if isinstance(action, Done):
            return f"ended: {action.outcome.value}"
        if self._phase != _RUNNING:
            return _CLOSING_WORDS[self._phase]
        where = f"step {self._index} ({self._label()})"
        if isinstance(action, Receive):
            got = len(self._buffer or b"") + self._taken
            if self._step is Command.STALL:
                return f"{where}: stalling until the peer closes"
            return f"{where}: waiting for data (has {got} bytes of this step)"
        if isinstance(action, Send):
            return f"{where}: sending, {len(action.data)} bytes of this slice unsent"
        if isinstance(action, Wait):
            return f"{where}: waiting until t={action.until:.3f}"
        if isinstance(action, Handshake):
            return f"{where}: in the TLS handshake"
        if isinstance(action, Park):
            return f"{where}: parked at gate {action.gate!r}"
        return f"{where}: shutting down the sending side"

    # ---- what happened ------------------------------------------------------------------------

    def receive_data(self, data: bytes, now: float) -> None:
        """Bytes arrived from the peer; ``b""`` means the peer closed its sending side."""
        if not isinstance(self._action, Receive):
            return
        if self._phase == _DRAINING:
            self._drained += len(data)
            self.record.discarded += len(data)
            if not data or self._drained >= DRAIN_BYTES:
                self._close(reset=False)
            return
        step = self._step
        if not data and self._search_due is not None:
            assert isinstance(step, ReadStep)
            self._search_due = None  # the search it deferred runs now, before the EOF
            if self._try_read(step, now, deferred=True):
                self._next_step(now)
                self.receive_data(data, now)
                return
        if not data:
            if self._fresh and not self._buffer and self._in_endless_repeat():
                self._end_script(Outcome.COMPLETED, now)  # a keep-alive connection's end
            else:
                self._end_early(Outcome.PEER_CLOSED, "the peer closed the connection", now)
            return
        self._fresh = False
        self._progress = now
        if step is Command.STALL:
            self.record.discarded += len(data)
            return
        assert isinstance(step, ReadStep)
        if step.min_bytes:
            done = self._take_count(step, data)
        else:
            buffer = self._buffer
            if buffer is None:
                self._buffer = bytearray(data)
            else:
                buffer += data
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
        root, rest = self._sent_root, self._rest
        assert root is not None
        assert rest is not None
        # What the socket has taken of the step: all but the rest and this slice's unsent part.
        sent = len(root) - len(rest) - len(view) + count
        self.record.add_sent(root[:sent], extend=sent > count)
        if count < len(view):
            self._view = view[count:]
            self._action = Send(self._view, self._deadline(), action.raw)
            return
        self._view = None
        self._after_slice(len(view), now)

    def write_shut(self, now: float) -> None:
        """The sending side is shut down (after :class:`ShutdownWrite`)."""
        if not isinstance(self._action, ShutdownWrite):
            return
        self.record.half_closed = True
        if self._phase == _SHUTTING:
            self._drain(now)
        else:
            self._next_step(now)

    def closed(self, now: float) -> None:
        """The socket is closed (after :class:`Close`)."""
        if isinstance(self._action, Close):
            self._end_record(now)
            self._phase = _DONE
            self._action = _DONE_ACTIONS[self._outcome]
            # No Reply runs now: let go of the caller (the executor, which holds this machine:
            # both are freed as soon as it is dropped), the server and the Reply state.
            self._call = _call_directly
            self._server = _no_server
            self._state = None

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
            return
        if self._phase == _DRAINING:
            # The drain's Receive carries when it gives up.
            deadline = action.deadline if isinstance(action, Receive) else None
            if deadline is not None and now >= deadline:
                self._close(reset=False)
            return
        if self._phase == _SHUTTING:
            deadline = action.deadline if isinstance(action, ShutdownWrite) else None
            if deadline is not None and now >= deadline:
                self._close(reset=False)  # the peer reads nothing: give up on a clean end
            return
        if self._search_due is not None and now >= self._search_due:
            step = self._step
            assert isinstance(step, ReadStep)
            self._search_due = None
            if self._try_read(step, now, deferred=True):
                self._next_step(now)
                return
            if self._phase != _RUNNING:
                return
            self._rearm()  # no deferred search's deadline left behind
            action = self._action
        if (
            isinstance(action, (Receive, Send, Handshake, ShutdownWrite))
            and self._timeout is not None
            and self._step is not Command.STALL  # a stall waits for the peer, however long
        ):
            if now < self._progress + self._timeout:
                self._rearm()
                return
            if self._fresh and not self._buffer and self._in_endless_repeat():
                # An idle keep-alive connection between requests: closing it is no failure.
                self.record.detail = f"idle for {self._timeout:g} s between iterations"
                self._end_script(Outcome.COMPLETED, now)
                return
            self._end_early(
                Outcome.TIMED_OUT,
                f"timed out: {_SILENCE[type(action)]} for {self._timeout:g} s",
                now,
                failed=True,
            )

    def resume(self, steps: tuple[Step, ...], now: float) -> None:
        """The test let the connection pass its gate (after :class:`Park`): run ``steps``
        (compiled), then the rest of the script."""
        if isinstance(self._action, Park):
            if steps:
                self._push(_Frame(steps, None))
            self._next_step(now)

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
        return _step_label(self._step)

    def _in_endless_repeat(self) -> bool:
        return any(
            frame.repeat is not None and frame.repeat.times is None for frame in self._frames or ()
        )

    def _push(self, frame: _Frame) -> None:
        """Run ``frame``'s steps next, then carry on where the machine is now."""
        if self._frames is None:
            self._frames = [frame]
        else:
            self._frames.append(frame)

    def _deadline(self) -> float | None:
        timeout = self._timeout
        return None if timeout is None else self._progress + timeout

    def _wake(self) -> float | None:
        """The deadline to hand out: the timeout's, or a deferred search's if sooner."""
        deadline = self._deadline()
        due = self._search_due
        if due is not None and (deadline is None or due < deadline):
            return due
        return deadline

    def _rearm(self) -> None:
        """Hand out the current action again with its deadline brought up to date."""
        action = self._action
        if isinstance(action, Send):
            self._action = Send(action.data, self._deadline(), action.raw)
        elif isinstance(action, ShutdownWrite):
            self._action = ShutdownWrite(action.close_notify, self._deadline())
        elif isinstance(action, Receive):
            self._action = Receive(self._wake())
        elif isinstance(action, Handshake):
            self._action = Handshake(self._deadline())

    def _advance(self) -> Step | None:
        """The next step to run (entering and looping Repeats), or None at the script's end."""
        frames = self._frames
        while frames:
            frame = frames[-1]
            frame.index += 1
            if frame.index < len(frame.steps):
                return frame.steps[frame.index]
            repeat = frame.repeat
            if repeat is not None:
                frame.done += 1
                if repeat.times is None or frame.done < repeat.times:
                    frame.index = -1
                    self._fresh = True
                    continue
            frames.pop()
        steps = self._steps
        index = self._index + 1
        if index < len(steps):
            self._index = self.record.step = index
            return steps[index]
        self._index = len(steps)
        return None

    def _next_step(self, now: float) -> None:
        """Start the following steps until one waits for the peer or the clock.

        A script that runs many steps without waiting (a Repeat of non-I/O steps, a Reply
        returning thousands) pauses every STEPS_PER_TURN steps, so the loop stays fair.
        """
        for _ in range(STEPS_PER_TURN):
            step = self._step = self._advance()
            self._progress = now
            if step is None:
                self._end_script(Outcome.COMPLETED, now)
                return
            if isinstance(step, ReadStep):
                self._searched = self._taken = 0
                self._search_due = None
                if self._try_read(step, now):
                    continue
                if self._phase == _RUNNING:
                    self._action = Receive(self._wake())
                return
            if isinstance(step, SendStep):
                if self.record.half_closed and step.data:
                    self.fail("cannot send after HALF_CLOSE shut the sending side", now)
                    return
                if not step.data:
                    continue
                self._start_send(step, now)
                return
            if isinstance(step, Delay):
                seconds = step.seconds
                if step.jitter:
                    seconds += random.Random(step.seed).uniform(0.0, step.jitter)
                self._action = Wait(now + seconds)
                return
            if isinstance(step, Throttle):
                self._rate = step.bytes_per_second
                self._next_send = now
                continue
            if isinstance(step, Repeat):
                self._push(_Frame(step.steps, step))
                self._fresh = True
                continue
            if isinstance(step, Reply):
                if not self._reply(step, now):
                    return
                continue
            if isinstance(step, Gate):
                self._action = Park(step.name)
                return
            if isinstance(step, StartTLS):
                self._refuse_plaintext()
                self._action = Handshake(self._deadline())
                return
            if step is Command.HALF_CLOSE:
                if self.record.half_closed:
                    continue
                self._action = ShutdownWrite(True, self._deadline())
                return
            if step is Command.STALL:
                self._discard_buffer()
                self._action = _RECEIVE_FOREVER
                return
            assert step in _SCRIPT_ENDS, step
            self._end_script(_SCRIPT_ENDS[step], now)
            return
        self._action = Wait(now)  # come back on the next turn

    def _start_send(self, step: SendStep, now: float) -> None:
        # Slices of the caller's buffer are sent: no copies.
        self._rest = self._sent_root = memoryview(step.data)
        self._rng = random.Random(step.seed) if step.jitter else None
        self._send_slice(now)

    def _reply(self, step: Reply, now: float) -> bool:
        """Run a Reply's function; True if the script goes on with the next step.

        Bytes it returns become the current step (False: they are being sent); steps it
        returns run in its place.
        """
        record = self.record
        if self._state is None:
            self._state = {}
        context = ReplyContext(
            received=record.received,
            last=self._last,
            record=record,
            server=self._server(),
            index=record.index,
            state=self._state,
        )
        try:
            result = self._call(step.fn, context, _step_label(step))
        except BaseException as exc:  # the user's code: it costs this connection only
            self.fail(f"the function raised:\n{_traceback(exc)}", now)
            return False
        if isinstance(result, (str, bytes, bytearray, memoryview)):
            try:
                (send,) = compile_script([result], name="Reply result")
            except (TypeError, ValueError) as exc:
                self.fail(f"it returned a bad payload: {exc}", now)
                return False
            assert isinstance(send, SendStep)
            if not send.data:
                return True
            if record.half_closed:
                self.fail("cannot send after HALF_CLOSE shut the sending side", now)
                return False
            self._step = send
            self._start_send(send, now)
            return False
        if isinstance(result, (list, tuple)):
            try:
                # Checked on the reactor thread too: timed like the function (it may be long).
                steps = self._call(_compile_result, result, f"{_step_label(step)}'s steps")
            except (TypeError, ValueError) as exc:
                self.fail(f"it returned bad steps: {exc}", now)
                return False
            self._push(_Frame(steps, None))
            return True
        self.fail(f"it must return str, bytes or a list of steps, got {_short(result)}", now)
        return False

    def _try_read(self, step: ReadStep, now: float, *, deferred: bool = False) -> bool:
        """Complete ``step`` from the buffer if its condition holds; True if it did."""
        record = self.record
        if step.min_bytes:
            if not self._buffer:
                return False
            data = bytes(self._buffer)
            self._buffer = None
            return self._take_count(step, data)
        # Nothing buffered: a delimiter or a pattern is looked for in no bytes, without making
        # a buffer; a frame function is handed an empty buffer of its own.
        buffer: bytearray | bytes
        if self._buffer is not None:
            buffer = self._buffer
        elif step.frame is not None:
            buffer = self._buffer = bytearray()
        else:
            buffer = b""
        if step.delimiter is not None:
            start = max(0, self._searched - len(step.delimiter) + 1)
            found = buffer.find(step.delimiter, start)
            end = -1 if found < 0 else found + len(step.delimiter)
            self._searched = len(buffer)
        elif step.frame is not None:
            assert isinstance(buffer, bytearray)
            try:
                end = step.frame(buffer)
            except ValueError as exc:
                self._end_early(Outcome.ERROR, str(exc), now, failed=True)
                return False
        else:
            end = self._search(step, buffer, now, deferred)
        if end < 0:
            if len(buffer) > record.max_receive:
                self._end_early(
                    Outcome.ERROR,
                    f"no match within max_receive={record.max_receive} bytes",
                    now,
                    failed=True,
                )
            elif isinstance(self._action, Receive) and self._phase == _RUNNING:
                self._action = Receive(self._wake())  # with a deferred search's deadline, or not
            return False
        data = bytes(buffer[:end])
        if end:
            assert isinstance(buffer, bytearray)  # not the empty stand-in
            del buffer[:end]
        if not buffer:
            self._buffer = None  # an idle connection keeps no empty buffer
        self._last = record.keep(data)
        record.add_received(self._last, self._index)
        return True

    def _search(self, step: ReadStep, buffer: bytearray | bytes, now: float, deferred: bool) -> int:
        """Where ``step``'s regex match in ``buffer`` ends, or -1 (see SEARCH_EAGERLY_BELOW)."""
        assert step.regex is not None
        width = step.max_width
        if width is not None:
            # A match the last search did not find must end in the new bytes.
            match = step.regex.search(buffer, max(0, self._searched - width))
        elif (
            deferred
            or len(buffer) < SEARCH_EAGERLY_BELOW
            or len(buffer) >= 2 * self._searched
            or self._searched == 0
        ):
            match = step.regex.search(buffer)
        else:
            self._search_due = now + SEARCH_PAUSE_SECONDS
            return -1
        self._search_due = None
        self._searched = len(buffer)
        return -1 if match is None else match.end()

    def _take_count(self, step: ReadStep, data: bytes) -> bool:
        """Add ``data`` to a count step (RECEIVE, int); True once it has ``min_bytes``."""
        record = self.record
        self._taken += len(data)
        kept = record.keep(data)
        pending = self._step_bytes
        if self._taken < step.min_bytes:
            if pending is None:
                self._step_bytes = [kept]
            else:
                pending.append(kept)  # joined once, at the end: no copy per chunk
            return False
        if pending is not None:
            pending.append(kept)
            kept = b"".join(pending)
            self._step_bytes = None
        self._taken = 0
        self._last = kept
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
        self._action = Send(self._view, self._deadline(), step.raw)

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
            self._action = Wait(resume)
            return
        if self._rest:
            self._send_slice(now)
        else:
            self._rest = self._sent_root = None
            self._next_step(now)

    def _refuse_plaintext(self) -> None:
        """Bytes unread at a handshake came in plaintext before TLS: flag and discard them."""
        buffer = self._buffer
        if buffer:
            self.record.failure = self.record.failure or (
                f"step {self._index} (StartTLS): {len(buffer)} bytes arrived in plaintext "
                f"before the TLS handshake (STARTTLS command injection, CVE-2011-0411): "
                f"{bytes(buffer[:200])!r}; they were discarded"
            )
            self._discard_buffer()

    def _discard_buffer(self) -> None:
        buffer = self._buffer
        if buffer is not None:
            self.record.discarded += len(buffer)
            self._buffer = None

    # ---- the end ------------------------------------------------------------------------------

    def _end_early(self, outcome: Outcome, why: str, now: float, *, failed: bool = False) -> None:
        """End before the script ran out, keeping the bytes of an unfinished receive step.

        After the script has ended (while closing), a report like this only closes at once.
        """
        if self._phase != _RUNNING:
            if failed and not self.record.ended and self.record.failure is None:
                self.record.failure = f"while closing: {why}"  # an internal error, say
            if self._phase in (_SHUTTING, _DRAINING):
                self._close(reset=False)
            return
        step = self._step
        if isinstance(step, ReadStep):
            pending, buffer = self._step_bytes, self._buffer
            partial = (b"".join(pending) if pending else b"") + self.record.keep(
                bytes(buffer) if buffer else b""
            )
            self._step_bytes = self._buffer = None
            if partial:
                self.record.add_received(partial, self._index)
            if step.must_match:
                failed = True
                why = f"{why} before the pattern matched; this step got {partial[-200:]!r}"
        if failed and self.record.failure is None:
            self.record.failure = f"step {self._index} ({self._label()}): {why}"
        self.record.detail = why
        self._end_script(outcome, now)

    def _end_script(self, outcome: Outcome, now: float) -> None:
        """The script is over: close the way ``outcome`` asks (see the module docstring)."""
        self._outcome = outcome
        self._view = self._rest = self._sent_root = None
        self._search_due = None
        self._discard_buffer()
        if outcome not in _GRACEFUL:
            self._close(reset=outcome is Outcome.RESET)
        elif self.record.half_closed:
            self._drain(now)
        else:
            self._phase = _SHUTTING
            self._action = ShutdownWrite(outcome is not Outcome.TRUNCATED, now + DRAIN_SECONDS)

    def _drain(self, now: float) -> None:
        """The FIN is out: the record ends, and the peer's last bytes are read and dropped."""
        self._end_record(now)
        self._phase = _DRAINING
        self._action = Receive(now + DRAIN_SECONDS)

    def _close(self, *, reset: bool) -> None:
        self._phase = _CLOSING
        self._action = _CLOSE_ACTIONS[reset]

    def _end_record(self, now: float) -> None:
        self.record.end(self._outcome, None, now, self._index)


class _Frame:
    """Where the machine is in one sequence of steps: the script, a Repeat's body, or the
    steps a Reply returned or a gate's resume added."""

    __slots__ = ("done", "index", "repeat", "steps")

    def __init__(self, steps: tuple[Step, ...], repeat: Repeat | None) -> None:
        self.steps = steps
        self.index = -1
        self.repeat = repeat
        self.done = 0  # iterations of the Repeat completed


def _step_label(step: object) -> str:
    if isinstance(step, (ReadStep, SendStep)):
        return step.label
    if isinstance(step, Reply):
        return f"Reply({getattr(step.fn, '__qualname__', type(step.fn).__name__)})"
    if isinstance(step, Repeat):
        return f"Repeat({len(step.steps)} steps, times={step.times})"
    return repr(step)


def _compile_result(result: object) -> tuple[Step, ...]:
    return compile_script(result, name="Reply result")


def _short(value: object) -> str:
    try:
        text = repr(value)
    except Exception:
        text = f"<{type(value).__name__}>"
    return text if len(text) <= 60 else text[:57] + "..."


def _traceback(exc: BaseException) -> str:
    return "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)).rstrip()


_SILENCE = {
    Receive: "no data arrived",
    Send: "the peer took none of the data",
    Handshake: "the TLS handshake did not finish",
    ShutdownWrite: "the peer took none of the data",
}
_CLOSING_WORDS = {
    _SHUTTING: "ended: shutting down the sending side",
    _DRAINING: "ended: draining until the peer closes",
    _CLOSING: "ended: closing the socket",
}
