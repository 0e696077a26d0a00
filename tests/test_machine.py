"""The step machine alone: feed it bytes and times, assert on what it asks for next.

Straight-line tests in the style of h11's ``tests/test_state.py``: no socket, no thread, no
clock. ``play`` stands in for a socket that takes every byte at once and a clock that jumps to
the end of each wait.
"""

from __future__ import annotations

import itertools
import random
import re
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
from _checks import run_to_close
from _hypothesis_profiles import SETTINGS
from hypothesis import given
from hypothesis import strategies as st

from selectserver import (
    BREAK,
    CLOSE,
    HALF_CLOSE,
    HANGUP,
    RECEIVE,
    RESET,
    STALL,
    TRUNCATE,
    Delay,
    Drip,
    Expect,
    Garbage,
    Outcome,
    ReadUntil,
    StartTLS,
    Throttle,
    compile_script,
)
from selectserver._machine import (
    DRAIN_BYTES,
    DRAIN_SECONDS,
    SEARCH_EAGERLY_BELOW,
    SEARCH_PAUSE_SECONDS,
    THROTTLE_SLICE_SECONDS,
    Close,
    Done,
    Handshake,
    Receive,
    Send,
    ShutdownWrite,
    StepMachine,
    Wait,
)
from selectserver._records import DEFAULT_MAX_RECEIVE, ConnectionRecord
from selectserver._script import ReadStep


def machine(
    script: list[object],
    *,
    now: float = 0.0,
    timeout: float | None = None,
    max_receive: int = DEFAULT_MAX_RECEIVE,
) -> StepMachine:
    """A machine running ``script`` for a fresh record, started at ``now``."""
    record = ConnectionRecord(0, "peer", max_receive=max_receive)
    return StepMachine(compile_script(script), record, now=now, timeout=timeout)


@dataclass
class Played:
    """What ``play`` saw: the slices sent, the ends of the waits, and the time it got to."""

    sends: list[bytes] = field(default_factory=list)
    waits: list[float] = field(default_factory=list)
    now: float = 0.0


def play(m: StepMachine, now: float = 0.0, *, limit: int = 10_000) -> Played:
    """Take every slice whole and jump to the end of every wait, until the machine wants to
    read, to half-close, or is done."""
    played = Played(now=now)
    for _ in range(limit):
        action = m.next_action()
        if isinstance(action, Send):
            played.sends.append(action.data.tobytes())
            m.data_sent(len(action.data), played.now)
        elif isinstance(action, Wait):
            assert action.until >= played.now, "a wait never goes back in time"
            played.waits.append(action.until)
            played.now = action.until
            m.tick(played.now)
        else:
            return played
    raise AssertionError(f"no input wanted after {limit} actions: {m.describe()}")


def feed(m: StepMachine, chunks: list[bytes], now: float = 0.0) -> None:
    """Deliver ``chunks`` while the machine reads, then EOF."""
    for chunk in [*chunks, b""]:
        if isinstance(m.next_action(), Receive):
            m.receive_data(chunk, now)


# ---- receive steps ----------------------------------------------------------------------------


def test_receive_takes_all_available_bytes() -> None:
    m = machine([RECEIVE, RECEIVE])
    assert m.next_action() == Receive(None)
    m.receive_data(b"abc", 1.0)
    assert m.record.received == [b"abc"]
    assert m.step_index == 1
    assert m.next_action() == Receive(None)
    m.receive_data(b"d", 2.0)
    assert m.record.received == [b"abc", b"d"]
    assert not m.running
    assert m.next_action() == ShutdownWrite(True, 2.0 + DRAIN_SECONDS)
    assert not m.record.ended, "the record ends once the FIN is out, not before"
    assert run_to_close(m, 2.5) == Done(Outcome.COMPLETED)
    assert (m.record.outcome, m.record.failure, m.record.ended_at) == (Outcome.COMPLETED, None, 2.5)


def test_int_step_accumulates_and_takes_all_of_the_completing_read() -> None:
    m = machine([5, RECEIVE])
    m.receive_data(b"ab", 1.0)
    assert m.record.received == []
    assert m.next_action() == Receive(None)
    m.receive_data(b"c", 1.0)
    m.receive_data(b"defg", 1.0)
    assert m.record.received == [b"abcdefg"], "the read that completes the step is taken whole"
    assert m.step_index == 1
    m.receive_data(b"h", 1.0)
    assert m.record.received == [b"abcdefg", b"h"]


def test_read_until_finds_a_delimiter_split_across_chunks() -> None:
    m = machine([ReadUntil(b"END"), RECEIVE])
    for chunk in [b"xxE", b"N"]:
        m.receive_data(chunk, 0.0)
        assert m.record.received == []
    m.receive_data(b"Dyy", 0.0)
    assert m.record.received == [b"xxEND", b"yy"], "the leftover completes the next step at once"
    assert run_to_close(m) == Done(Outcome.COMPLETED)


def test_pipelined_input_is_left_for_the_next_receive_steps() -> None:
    m = machine([ReadUntil(b"\r\n"), ReadUntil(b"\r\n"), 6, RECEIVE])
    m.receive_data(b"GET / HTTP/1.1\r", 0.0)
    m.receive_data(b"\nHost: x\r\nbod", 0.0)
    assert m.record.received == [b"GET / HTTP/1.1\r\n", b"Host: x\r\n"]
    assert m.step_index == 2
    m.receive_data(b"y!", 0.0)
    m.receive_data(b"?", 0.0)
    assert m.record.received == [b"GET / HTTP/1.1\r\n", b"Host: x\r\n", b"body!?"]
    assert m.step_index == 3


def test_expect_takes_up_to_the_end_of_the_match_and_leaves_the_rest() -> None:
    m = machine([Expect(rb"\d+;"), RECEIVE])
    m.receive_data(b"ab12", 0.0)
    assert m.record.received == []
    m.receive_data(b";cd", 0.0)
    assert m.record.received == [b"ab12;", b"cd"]
    assert run_to_close(m) == Done(Outcome.COMPLETED)
    assert m.record.failure is None


def test_expect_without_a_match_fails_when_the_peer_closes() -> None:
    m = machine([RECEIVE, Expect("HTTP/1.[01] 200")])
    m.receive_data(b"req", 0.0)
    m.receive_data(b"HTTP/1.1 404", 0.0)
    m.receive_data(b"", 3.0)
    assert run_to_close(m) == Done(Outcome.PEER_CLOSED)
    assert m.record.received == [b"req", b"HTTP/1.1 404"]
    failure = m.record.failure
    assert failure is not None
    assert failure.startswith("step 1 (Expect(pattern='HTTP/1.[01] 200')): ")
    assert "the peer closed the connection before the pattern matched" in failure
    assert "b'HTTP/1.1 404'" in failure
    assert m.record.step == 1


def test_expect_without_a_match_fails_on_timeout() -> None:
    m = machine([Expect(b"zz")], timeout=5.0)
    m.receive_data(b"abc", 1.0)
    m.tick(6.0)
    assert run_to_close(m) == Done(Outcome.TIMED_OUT)
    assert m.record.failure == (
        "step 0 (Expect(pattern=b'zz')): timed out: no data arrived for 5 s "
        "before the pattern matched; this step got b'abc'"
    )


@pytest.mark.parametrize(
    ("step", "failed"),
    [(10, False), (ReadUntil(b"\n"), False), (Expect(b"\n"), True)],
    ids=repr,
)
def test_eof_mid_step_keeps_the_partial_bytes(step: object, failed: bool) -> None:
    m = machine([step, RECEIVE])
    m.receive_data(b"ab", 0.0)
    m.receive_data(b"c", 0.0)
    m.receive_data(b"", 1.0)
    assert run_to_close(m) == Done(Outcome.PEER_CLOSED)
    assert m.record.received == [b"abc"]
    assert (m.record.failure is not None) == failed
    assert m.record.step == 0


# ---- send steps -------------------------------------------------------------------------------


def test_partial_sends_continue_with_a_view_of_the_tail() -> None:
    payload = b"hello world"
    m = machine([payload])
    first = m.next_action()
    assert isinstance(first, Send)
    assert first.data.obj is payload
    m.data_sent(4, 1.0)
    rest = m.next_action()
    assert isinstance(rest, Send)
    assert rest.data.tobytes() == b"o world"
    assert rest.data.obj is payload, "the tail is a view, not a copy"
    assert (m.record.sent, m.record.bytes_sent) == (b"hell", 4)
    m.data_sent(0, 2.0)
    assert m.next_action() is rest, "sending nothing changes nothing"
    m.data_sent(7, 3.0)
    assert run_to_close(m) == Done(Outcome.COMPLETED)
    assert m.record.sent == b"hello world"


def test_a_mutable_payload_is_copied_once_at_compile_time() -> None:
    payload = bytearray(b"hello")
    m = machine([payload])
    payload[:] = b"HELLO"  # the caller changes its buffer after making the script
    first = m.next_action()
    assert isinstance(first, Send)
    assert first.data.obj is not payload
    assert first.data.tobytes() == b"hello"
    m.data_sent(2, 1.0)
    rest = m.next_action()
    assert isinstance(rest, Send)
    assert rest.data.obj is first.data.obj, "the tail is a view of the one copy"


def test_empty_sends_are_skipped() -> None:
    m = machine([b"", "", bytearray(), Garbage(0), Drip(b""), RECEIVE])
    assert m.next_action() == Receive(None)
    assert m.step_index == 5
    assert m.record.sent == b""


def test_drip_sends_chunks_an_interval_apart() -> None:
    played = play(machine([Drip(b"abcdefg", chunk=3, interval=0.25)]))
    assert played.sends == [b"abc", b"def", b"g"]
    assert played.waits == [0.25, 0.5]


def drip_gaps(seed: int) -> list[float]:
    """The pauses of a jittered drip of 8 bytes, one at a time."""
    played = play(machine([Drip(b"x" * 8, interval=0.1, jitter=0.05, seed=seed)]))
    assert played.sends == [b"x"] * 8
    times = [0.0, *played.waits]
    return [later - earlier for earlier, later in itertools.pairwise(times)]


def test_drip_jitter_is_reproducible_by_seed() -> None:
    gaps = drip_gaps(seed=7)
    assert len(gaps) == 7
    assert all(0.1 <= gap <= 0.15 + 1e-9 for gap in gaps), gaps
    assert len({round(gap, 9) for gap in gaps}) > 1, "jitter varies from gap to gap"
    assert drip_gaps(seed=7) == gaps
    assert drip_gaps(seed=8) != gaps


def test_throttle_paces_sends_at_its_rate_until_lifted() -> None:
    rate, size = 1000, 1000
    slice_size = int(rate * THROTTLE_SLICE_SECONDS)
    played = play(machine([Throttle(rate), b"x" * size, Throttle(None), b"y" * 500]))
    throttled = [sent for sent in played.sends if sent.startswith(b"x")]
    assert b"".join(throttled) == b"x" * size
    assert all(len(sent) <= slice_size for sent in throttled)
    assert played.now == pytest.approx(size / rate, abs=slice_size / rate)
    assert played.waits == sorted(played.waits)
    assert played.sends[-1] == b"y" * 500, "Throttle(None) sends the rest whole, at once"


def test_throttle_counts_time_the_socket_already_took() -> None:
    m = machine([Throttle(100), b"abc"])  # slices of 1 byte, 10 ms apart
    first = m.next_action()
    assert isinstance(first, Send)
    assert first.data.tobytes() == b"a"
    m.data_sent(1, 0.5)  # the socket was slow: the next slice is due 10 ms after this send
    assert m.next_action() == Wait(0.51)


def test_delay_waits_then_moves_on() -> None:
    m = machine([Delay(1.5), RECEIVE], now=10.0)
    assert m.next_action() == Wait(11.5)
    m.tick(11.4)
    assert m.next_action() == Wait(11.5)
    m.tick(11.5)
    assert m.next_action() == Receive(None)
    assert m.step_index == 1


def test_delay_jitter_is_drawn_from_the_seed() -> None:
    def until(seed: int) -> float:
        action = machine([Delay(1.0, jitter=0.5, seed=seed)]).next_action()
        assert isinstance(action, Wait)
        return action.until

    assert until(3) == 1.0 + random.Random(3).uniform(0.0, 0.5)
    assert until(3) == until(3) != until(4)


# ---- commands and endings ---------------------------------------------------------------------


def test_half_close_shuts_the_sending_side_then_reads_go_on() -> None:
    m = machine([b"bye", HALF_CLOSE, RECEIVE])
    assert play(m).sends == [b"bye"]
    assert m.next_action() == ShutdownWrite(True, None)
    m.receive_data(b"too early", 0.5)  # only reported while the machine reads: ignored
    m.write_shut(1.0)
    assert m.record.half_closed
    assert m.next_action() == Receive(None)
    m.receive_data(b"more", 2.0)
    assert m.record.received == [b"more"]
    assert run_to_close(m) == Done(Outcome.COMPLETED)


def test_stall_discards_until_the_peer_closes() -> None:
    m = machine([RECEIVE, STALL], timeout=5.0)
    m.receive_data(b"req", 0.0)
    assert m.next_action() == Receive(None), "a stall has no deadline"
    m.receive_data(b"ignored", 1.0)
    m.receive_data(b"!", 2.0)
    assert m.record.received == [b"req"]
    assert m.record.discarded == 8
    m.receive_data(b"", 3.0)
    assert run_to_close(m) == Done(Outcome.PEER_CLOSED)
    assert m.record.failure is None


def test_stall_never_times_out() -> None:
    m = machine([RECEIVE, STALL], timeout=5.0)  # RECEIVE's deadline timer is armed at 5.0
    m.receive_data(b"req", 1.0)
    m.tick(5.0)  # that timer fires during the stall
    assert m.next_action() == Receive(None)
    m.tick(100.0)
    assert m.next_action() == Receive(None)
    assert not m.record.ended


@pytest.mark.parametrize(
    ("script", "outcome"),
    [
        ([], Outcome.COMPLETED),
        ([b"x"], Outcome.COMPLETED),
        ([b"x", HANGUP], Outcome.HUNG_UP),
        ([BREAK], Outcome.HUNG_UP),
        ([Delay(1), RESET], Outcome.RESET),
        ([HALF_CLOSE], Outcome.COMPLETED),
    ],
    ids=repr,
)
def test_how_a_script_ends(script: list[object], outcome: Outcome) -> None:
    m = machine(script)
    played = play(m)
    assert not m.record.ended
    later = played.now + 1.0  # the FIN (or the close) goes out a second after the script ended
    assert run_to_close(m, later) == Done(outcome)
    record = m.record
    assert (record.outcome, record.failure, record.ended_at) == (outcome, None, later)


END_EARLY: dict[str, tuple[Callable[[StepMachine], None], Outcome]] = {
    "peer_reset": (lambda m: m.peer_reset(9.0), Outcome.PEER_RESET),
    "peer_gone": (lambda m: m.peer_gone(9.0), Outcome.PEER_CLOSED),
    "server_closed": (lambda m: m.server_closed(9.0), Outcome.SERVER_CLOSED),
    "fail": (lambda m: m.fail("boom", 9.0), Outcome.ERROR),
    "eof": (lambda m: m.receive_data(b"", 9.0), Outcome.PEER_CLOSED),
}


@pytest.mark.parametrize("report", END_EARLY)
def test_reports_that_end_a_connection(report: str) -> None:
    do, outcome = END_EARLY[report]
    m = machine([10, b"reply"])
    m.receive_data(b"abc", 1.0)
    do(m)
    assert not m.running
    assert m.next_action() == Close(reset=False), "an early end closes at once, without a drain"
    assert not m.record.ended, "the record ends once the socket is closed"
    assert run_to_close(m, 9.5) == Done(outcome)
    record = m.record
    assert (record.outcome, record.ended_at, record.step) == (outcome, 9.5, 0)
    assert record.received == [b"abc"], "the unfinished step's bytes are kept"
    assert record.failure == ("step 0 (10): boom" if report == "fail" else None)


@pytest.mark.parametrize("report", ["peer_reset", "server_closed"])
def test_an_unmatched_expect_is_a_failure_however_it_ends(report: str) -> None:
    m = machine([Expect(b"!")])
    END_EARLY[report][0](m)
    assert m.record.failure is not None
    assert "before the pattern matched" in m.record.failure


AFTER_DONE: dict[str, Callable[[StepMachine], None]] = {
    "data": lambda m: m.receive_data(b"more", 20.0),
    "data_sent": lambda m: m.data_sent(3, 20.0),
    "write_shut": lambda m: m.write_shut(20.0),
    "tick": lambda m: m.tick(1e9),
    **{name: do for name, (do, _) in END_EARLY.items()},
}


@pytest.mark.parametrize("report", AFTER_DONE)
@pytest.mark.parametrize("script", [[RECEIVE, b"x"], [Expect(b"!")]], ids=["completed", "failed"])
def test_after_done_reports_change_nothing(script: list[object], report: str) -> None:
    m = machine(script, timeout=5.0)
    m.receive_data(b"a", 1.0)
    play(m, 1.0)
    if isinstance(m.next_action(), Receive):
        m.receive_data(b"", 2.0)
    action, record = run_to_close(m, 3.0), m.record
    assert isinstance(action, Done)

    def snapshot() -> tuple[object, ...]:
        return (record.outcome, record.failure, record.ended_at, record.step, record.sent)

    before = (snapshot(), list(record.received), record.discarded)
    AFTER_DONE[report](m)
    assert m.next_action() == action
    assert (snapshot(), record.received, record.discarded) == before


# ---- timeouts ---------------------------------------------------------------------------------


def test_receive_timeout_counts_from_the_last_bytes() -> None:
    m = machine([10], timeout=5.0)
    assert m.next_action() == Receive(5.0)
    m.tick(4.0)
    assert m.next_action() == Receive(5.0)
    m.receive_data(b"abc", 3.0)
    m.tick(5.0)  # the deadline first handed out: bytes moved since, so the clock restarted
    assert m.next_action() == Receive(8.0)
    m.tick(7.9)
    assert m.next_action() == Receive(8.0)
    m.tick(8.0)
    assert run_to_close(m) == Done(Outcome.TIMED_OUT)
    assert m.record.failure == "step 0 (10): timed out: no data arrived for 5 s"
    assert m.record.received == [b"abc"]


def test_send_timeout_counts_from_the_last_bytes_taken() -> None:
    m = machine([b"x" * 10], timeout=5.0)
    first = m.next_action()
    assert isinstance(first, Send)
    assert first.deadline == 5.0
    m.data_sent(4, 2.0)
    rest = m.next_action()
    assert isinstance(rest, Send)
    assert rest.deadline == 7.0
    m.tick(6.9)
    assert isinstance(m.next_action(), Send)
    m.tick(7.0)
    assert run_to_close(m) == Done(Outcome.TIMED_OUT)
    assert m.record.failure is not None
    assert "the peer took none of the data for 5 s" in m.record.failure
    assert m.record.sent == b"xxxx"


def test_waits_do_not_time_out_and_each_step_starts_its_clock() -> None:
    m = machine([Delay(100.0), RECEIVE], timeout=5.0)
    m.tick(50.0)
    assert m.next_action() == Wait(100.0)
    m.tick(100.0)
    assert m.next_action() == Receive(105.0)


def test_no_timeout_when_timeout_is_none() -> None:
    m = machine([RECEIVE, b"reply"])
    assert m.next_action() == Receive(None)
    m.tick(1e9)
    assert m.next_action() == Receive(None)
    m.receive_data(b"a", 1e9)
    action = m.next_action()
    assert isinstance(action, Send)
    assert action.deadline is None
    m.tick(2e9)
    assert m.next_action() == action
    assert not m.record.ended


# ---- max_receive ------------------------------------------------------------------------------


def test_max_receive_caps_what_the_record_keeps() -> None:
    m = machine([RECEIVE, 3, RECEIVE], max_receive=5)
    m.receive_data(b"abc", 0.0)
    m.receive_data(b"de", 0.0)
    m.receive_data(b"fg", 0.0)
    assert m.record.received == [b"abc", b"de"]
    assert m.record.dropped == 2
    m.receive_data(b"h", 0.0)
    assert m.record.received == [b"abc", b"de", b""]
    assert m.record.dropped == 3
    assert run_to_close(m) == Done(Outcome.COMPLETED)


@pytest.mark.parametrize("step", [ReadUntil(b";"), Expect(b";")], ids=repr)
def test_a_search_buffering_past_max_receive_fails(step: object) -> None:
    m = machine([step], max_receive=4)
    m.receive_data(b"abcd", 0.0)
    assert m.next_action() == Receive(None)
    m.receive_data(b"e", 1.0)
    assert run_to_close(m) == Done(Outcome.ERROR)
    assert m.record.failure is not None
    assert m.record.failure.startswith("step 0 (")
    assert "no match within max_receive=4 bytes" in m.record.failure
    assert m.record.received == [b"abcd"]
    assert m.record.dropped == 1


# ---- describe ---------------------------------------------------------------------------------


def sent(count: int) -> Callable[[StepMachine], None]:
    """Report that the socket took ``count`` bytes."""
    return lambda m: m.data_sent(count, 0.0)


def received(data: bytes) -> Callable[[StepMachine], None]:
    """Report that ``data`` arrived."""
    return lambda m: m.receive_data(data, 0.0)


def write_shut(m: StepMachine) -> None:
    """Report that the FIN went out."""
    m.write_shut(0.0)


def closed(m: StepMachine) -> None:
    """Play the closing to its end."""
    run_to_close(m)


@pytest.mark.parametrize(
    ("script", "then", "text"),
    [
        ([RECEIVE], None, "step 0 (RECEIVE): waiting for data (has 0 bytes of this step)"),
        ([5], received(b"ab"), "step 0 (5): waiting for data (has 2 bytes of this step)"),
        (
            [ReadUntil(b"\n")],
            received(b"abc"),
            "step 0 (ReadUntil(delimiter=b'\\n')): waiting for data (has 3 bytes of this step)",
        ),
        ([RECEIVE, STALL], received(b"a"), "step 1 (STALL): stalling until the peer closes"),
        ([b"hello"], None, "step 0 (b'hello'): sending, 5 bytes of this slice unsent"),
        ([b"hello"], sent(2), "step 0 (b'hello'): sending, 3 bytes of this slice unsent"),
        (
            [Delay(1.5)],
            None,
            "step 0 (Delay(seconds=1.5, jitter=0.0, seed=0)): waiting until t=1.500",
        ),
        ([HALF_CLOSE], None, "step 0 (HALF_CLOSE): shutting down the sending side"),
        ([], None, "ended: shutting down the sending side"),
        ([], write_shut, "ended: draining until the peer closes"),
        ([], closed, "ended: completed"),
        ([RESET], None, "ended: closing the socket"),
        ([RESET], closed, "ended: reset"),
        ([RECEIVE], received(b""), "ended: closing the socket"),
        ([RECEIVE], lambda m: (m.receive_data(b"", 0.0), run_to_close(m)), "ended: peer closed"),
    ],
    ids=lambda value: "then" if callable(value) else repr(value),  # no addresses: xdist
)
def test_describe(
    script: list[object], then: Callable[[StepMachine], None] | None, text: str
) -> None:
    m = machine(script)
    if then is not None:
        then(m)
    assert m.describe() == text


# ---- properties -------------------------------------------------------------------------------

#: Bytes that the steps below look for, so that they match often.
ALPHABET = b"ab<>;\n"
inputs = st.lists(st.sampled_from(ALPHABET), max_size=60).map(bytes)
cut_points = st.lists(st.integers(0, 60), max_size=12)

#: Steps whose match in any prefix of the input is the match in the whole input, so where the
#: input is split cannot change what they take.
DELIMITED = [ReadUntil(b"\n"), ReadUntil(b";;"), Expect(rb"<[a-z]*>"), Expect(b"a;")]
read_steps = st.one_of(
    st.just(RECEIVE), st.integers(1, 4), st.sampled_from([ReadUntil(b"\n"), Expect(rb"<[a-z]*>")])
)


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    """``data`` cut at ``cuts`` (taken modulo its length), without empty pieces."""
    bounds = sorted({0, len(data), *(cut % (len(data) + 1) for cut in cuts)})
    return [data[start:end] for start, end in itertools.pairwise(bounds)]


def transcript(script: list[object], chunks: list[bytes]) -> tuple[object, ...]:
    """What a record says after ``script`` read ``chunks`` and EOF."""
    m = machine(script)
    feed(m, chunks)
    run_to_close(m)
    record = m.record
    return (record.received, record.outcome, record.failure, record.step)


@given(
    script=st.lists(st.sampled_from(DELIMITED), min_size=1, max_size=6),
    data=inputs,
    cuts=cut_points,
)
def test_delimited_steps_do_not_depend_on_how_the_input_is_split(
    script: list[object], data: bytes, cuts: list[int]
) -> None:
    assert transcript(script, split(data, cuts)) == transcript(script, [data])


@given(steps=st.lists(read_steps, max_size=6), data=inputs, cuts=cut_points)
def test_receive_steps_lose_and_duplicate_nothing_however_split(
    steps: list[object], data: bytes, cuts: list[int]
) -> None:
    # Each step takes at least one byte, so with more steps than bytes the script never runs
    # out before EOF, and every byte must be in the record exactly once, in order.
    script = steps + [RECEIVE] * (len(data) + 1)
    chunks = split(data, cuts)
    m = machine(script)
    feed(m, chunks)
    assert b"".join(m.record.received) == data
    assert run_to_close(m) == Done(Outcome.PEER_CLOSED)
    if not steps:
        assert m.record.received == chunks, "each RECEIVE takes exactly one read"


# ---- closing: the machine plays the end as actions ---------------------------------------------


def tls_machine(script: list[object], *, now: float = 0.0) -> StepMachine:
    """A machine for a server with TLS (``compile_script(..., tls=True)``)."""
    record = ConnectionRecord(0, "peer")
    return StepMachine(compile_script(script, tls=True), record, now=now)


#: How each outcome is reached from a fresh machine at t=1, and the action that closes it.
ENDINGS: dict[Outcome, tuple[list[object], Callable[[StepMachine], None], object]] = {
    Outcome.COMPLETED: ([RECEIVE], lambda m: m.receive_data(b"x", 1.0), ShutdownWrite),
    Outcome.HUNG_UP: ([RECEIVE, HANGUP], lambda m: m.receive_data(b"x", 1.0), ShutdownWrite),
    Outcome.TRUNCATED: ([RECEIVE, TRUNCATE], lambda m: m.receive_data(b"x", 1.0), ShutdownWrite),
    Outcome.RESET: ([RECEIVE, RESET], lambda m: m.receive_data(b"x", 1.0), Close(reset=True)),
    Outcome.CLOSED: ([RECEIVE, CLOSE], lambda m: m.receive_data(b"x", 1.0), Close(reset=False)),
    Outcome.PEER_CLOSED: ([RECEIVE], lambda m: m.receive_data(b"", 1.0), Close(reset=False)),
    Outcome.PEER_RESET: ([RECEIVE], lambda m: m.peer_reset(1.0), Close(reset=False)),
    Outcome.TIMED_OUT: ([RECEIVE], lambda m: m.tick(1.0), Close(reset=False)),
    Outcome.TLS_FAILED: ([RECEIVE], lambda m: m.tls_failed("bad", 1.0), Close(reset=False)),
    Outcome.SERVER_CLOSED: ([RECEIVE], lambda m: m.server_closed(1.0), Close(reset=False)),
    Outcome.ERROR: ([RECEIVE], lambda m: m.fail("boom", 1.0), Close(reset=False)),
}


@pytest.mark.parametrize("outcome", ENDINGS, ids=lambda outcome: outcome.name)
def test_the_closing_actions_of_each_outcome(outcome: Outcome) -> None:
    script, end, closing = ENDINGS[outcome]
    m = machine(script, timeout=1.0)
    end(m)
    assert not m.running
    record = m.record
    action = m.next_action()
    if closing is ShutdownWrite:
        # A graceful end: FIN (close_notify unless TRUNCATE), then a drain, then the close.
        assert action == ShutdownWrite(outcome is not Outcome.TRUNCATED, 1.0 + DRAIN_SECONDS)
        assert not record.ended
        m.write_shut(2.0)
        assert (record.outcome, record.ended_at, record.half_closed) == (outcome, 2.0, True)
        assert m.next_action() == Receive(2.0 + DRAIN_SECONDS)
        assert not m.running
        m.receive_data(b"", 3.0)
        assert m.next_action() == Close(reset=False)
        m.closed(4.0)
        assert record.ended_at == 2.0, "the record ended with the FIN"
    else:
        assert action == closing
        assert not record.ended
        m.closed(4.0)
        assert (record.outcome, record.ended_at, record.half_closed) == (outcome, 4.0, False)
    assert m.next_action() == Done(outcome)
    assert m.describe() == f"ended: {outcome.value}"


@pytest.mark.parametrize("outcome", ENDINGS, ids=lambda outcome: outcome.name)
def test_the_record_ends_only_once_the_wire_shows_the_end(outcome: Outcome) -> None:
    script, end, closing = ENDINGS[outcome]
    stage = ["the script"]  # what the machine was last told
    ends: list[tuple[str, float | None]] = []
    record = ConnectionRecord(0, "peer", _on_end=lambda r: ends.append((stage[0], r.ended_at)))
    m = StepMachine(compile_script(script), record, now=0.0, timeout=1.0)
    end(m)
    for now in (1.5, 1.9):
        m.tick(now)  # time alone never ends the record
        m.receive_data(b"ignored", now)
        assert not ends, f"the record ended during {m.next_action()}"
    action = m.next_action()
    if closing is ShutdownWrite:
        assert isinstance(action, ShutdownWrite)
        stage[0] = "write_shut"
        m.write_shut(5.0)
    else:
        assert isinstance(action, Close)
        stage[0] = "closed"
        m.closed(5.0)
    assert ends == [(stage[0], 5.0)]
    assert run_to_close(m, 9.0) == Done(outcome)
    assert len(ends) == 1, "a record ends once"


def test_a_fin_that_never_goes_out_closes_at_the_drain_deadline() -> None:
    m = machine([], now=1.0, timeout=0.5)
    assert m.next_action() == ShutdownWrite(True, 1.0 + DRAIN_SECONDS)
    m.tick(1.6)  # past the script's timeout: the closing has its own deadline
    assert m.next_action() == ShutdownWrite(True, 1.0 + DRAIN_SECONDS)
    m.tick(1.0 + DRAIN_SECONDS)
    assert m.next_action() == Close(reset=False)
    assert not m.record.ended
    m.closed(4.0)
    record = m.record
    assert (record.outcome, record.ended_at, record.half_closed) == (Outcome.COMPLETED, 4.0, False)
    assert record.failure is None


def test_the_drain_has_its_own_deadline_whatever_the_timeout() -> None:
    m = machine([RECEIVE], timeout=0.5)
    m.receive_data(b"req", 1.0)
    m.write_shut(1.1)
    drain = Receive(1.1 + DRAIN_SECONDS)
    assert m.next_action() == drain
    for now in (1.6, 2.0, 2.5):  # the peer never closes, and is silent past the timeout
        m.tick(now)
        assert m.next_action() == drain
    m.receive_data(b"late", 2.6)
    assert m.next_action() == drain, "bytes in the drain do not push its deadline back"
    m.tick(1.1 + DRAIN_SECONDS)
    assert m.next_action() == Close(reset=False)
    assert run_to_close(m, 3.5) == Done(Outcome.COMPLETED)
    record = m.record
    assert (record.ended_at, record.failure, record.discarded) == (1.1, None, 4)
    assert record.received == [b"req"]


def test_the_drain_stops_at_drain_bytes() -> None:
    m = machine([])
    m.write_shut(0.0)
    chunk = bytes(1024 * 1024)
    assert DRAIN_BYTES % len(chunk) == 0
    for _ in range(DRAIN_BYTES // len(chunk) - 1):
        m.receive_data(chunk, 1.0)
        assert isinstance(m.next_action(), Receive)
    m.receive_data(chunk, 1.0)
    assert m.next_action() == Close(reset=False)
    assert m.record.discarded == DRAIN_BYTES
    m.receive_data(chunk, 1.0)  # nothing is read once the machine closes
    assert m.record.discarded == DRAIN_BYTES


@pytest.mark.parametrize(
    ("ending", "outcome"),
    [([], Outcome.COMPLETED), ([HANGUP], Outcome.HUNG_UP), ([TRUNCATE], Outcome.TRUNCATED)],
    ids=repr,
)
def test_after_half_close_the_end_drains_without_a_second_fin(
    ending: list[object], outcome: Outcome
) -> None:
    m = machine([HALF_CLOSE, RECEIVE, *ending])
    assert m.next_action() == ShutdownWrite(True, None)
    m.write_shut(1.0)
    still_running = m.running
    assert still_running, "the script goes on after HALF_CLOSE"
    assert m.record.half_closed
    m.receive_data(b"last words", 2.0)
    assert not m.running
    assert m.next_action() == Receive(2.0 + DRAIN_SECONDS), "the FIN is already out: drain"
    record = m.record
    assert (record.outcome, record.ended_at) == (outcome, 2.0)
    m.receive_data(b"", 3.0)
    assert m.next_action() == Close(reset=False)
    m.closed(3.0)
    assert m.next_action() == Done(outcome)
    assert (record.received, record.ended_at) == ([b"last words"], 2.0)


def test_a_peer_that_closes_after_half_close_closes_at_once() -> None:
    m = machine([HALF_CLOSE, RECEIVE])
    m.write_shut(1.0)
    m.receive_data(b"", 2.0)
    assert m.next_action() == Close(reset=False)
    assert run_to_close(m, 3.0) == Done(Outcome.PEER_CLOSED)
    assert m.record.ended_at == 3.0


CLOSING_REPORTS: dict[str, Callable[[StepMachine], None]] = {
    "peer_reset": lambda m: m.peer_reset(5.0),
    "peer_gone": lambda m: m.peer_gone(5.0),
    "server_closed": lambda m: m.server_closed(5.0),
    "tls_failed": lambda m: m.tls_failed("bad record", 5.0),
    "timeout": lambda m: m.tick(1e9),
}


@pytest.mark.parametrize("report", CLOSING_REPORTS)
@pytest.mark.parametrize("phase", ["shutting", "draining"])
def test_reports_while_closing_only_close_and_keep_the_outcome(phase: str, report: str) -> None:
    m = machine([RECEIVE], timeout=5.0)
    m.receive_data(b"a", 1.0)
    if phase == "draining":
        m.write_shut(2.0)
    CLOSING_REPORTS[report](m)
    assert m.next_action() == Close(reset=False)
    m.closed(6.0)
    record = m.record
    ended_at = 2.0 if phase == "draining" else 6.0
    assert m.next_action() == Done(Outcome.COMPLETED)
    assert (record.outcome, record.ended_at, record.failure, record.detail) == (
        Outcome.COMPLETED,
        ended_at,
        None,
        None,
    )


# ---- record.step, leftovers and the count of every byte ------------------------------------------


def test_record_step_follows_the_running_step() -> None:
    m = machine([RECEIVE, b"hello", Delay(1.0), Drip(b"ab", interval=0.5), RECEIVE, HALF_CLOSE])
    record = m.record
    assert (m.step_index, record.step) == (0, 0)
    m.receive_data(b"x", 0.0)
    assert isinstance(m.next_action(), Send)
    assert record.step == 1, "a send step is running"
    m.data_sent(5, 0.0)
    assert m.next_action() == Wait(1.0)
    assert record.step == 2, "a delay is running"
    m.tick(1.0)
    assert isinstance(m.next_action(), Send)
    assert record.step == 3
    m.data_sent(1, 1.0)
    assert m.next_action() == Wait(1.5)
    assert record.step == 3, "a drip's pause is part of its step"
    m.tick(1.5)
    m.data_sent(1, 1.5)
    assert (m.next_action(), record.step) == (Receive(None), 4)
    m.receive_data(b"y", 2.0)
    assert (m.next_action(), record.step) == (ShutdownWrite(True, None), 5)
    m.write_shut(2.0)
    assert record.step == m.step_index == 6, "the script ran out"
    assert record.outcome is Outcome.COMPLETED


def test_bytes_after_the_last_read_until_are_discarded() -> None:
    m = machine([ReadUntil(b"\n")])
    m.receive_data(b"line\nextra", 1.0)
    assert m.record.received == [b"line\n"]
    assert m.record.discarded == 5, "left unread when the script ended"
    m.write_shut(1.0)
    m.receive_data(b"more", 1.5)
    assert m.record.discarded == 9


def test_bytes_unread_at_a_stall_are_discarded() -> None:
    m = machine([ReadUntil(b"\n"), STALL])
    m.receive_data(b"a\nbc", 1.0)
    assert m.record.received == [b"a\n"]
    assert m.record.discarded == 2
    m.receive_data(b"def", 2.0)
    assert m.record.discarded == 5
    m.receive_data(b"", 3.0)
    assert run_to_close(m, 3.0) == Done(Outcome.PEER_CLOSED)
    assert m.record.received == [b"a\n"]


def test_bytes_unread_at_the_end_of_the_script_are_discarded() -> None:
    m = machine([Expect(b";"), b"ok"])
    m.receive_data(b"a;bc", 1.0)
    assert m.record.discarded == 0, "still running: the bytes may be read yet"
    play(m, 1.0)
    assert m.record.discarded == 2
    assert m.record.received == [b"a;"]


def drive(m: StepMachine, chunks: list[bytes]) -> int:
    """Play ``m`` against a peer that sends ``chunks`` then EOF, a socket that takes every
    byte, and a clock that jumps to each wait's end; returns how many bytes the machine read."""
    pending = [*chunks, b""]
    delivered = 0
    now = 0.0
    for _ in range(10_000):
        action = m.next_action()
        if isinstance(action, Send):
            m.data_sent(len(action.data), now)
        elif isinstance(action, Wait):
            now = action.until
            m.tick(now)
        elif isinstance(action, ShutdownWrite):
            m.write_shut(now)
        elif isinstance(action, Receive):
            assert pending, "the machine read past the peer's EOF"
            chunk = pending.pop(0)
            delivered += len(chunk)
            m.receive_data(chunk, now)
        elif isinstance(action, Close):
            m.closed(now)
        else:
            assert isinstance(action, Done)
            return delivered
    raise AssertionError(f"the machine did not end: {m.describe()}")


reads = st.sampled_from(
    [RECEIVE, 1, 3, ReadUntil(b"\n"), ReadUntil(b";;"), Expect(rb"<[a-z]*>"), Expect(b"a;")]
)
others = st.sampled_from([b"ok", Delay(0.5), Drip(b"abc", chunk=2, interval=0.1)])


@st.composite
def random_scripts(draw: st.DrawFn) -> list[object]:
    """Reads, sends and pauses; maybe a HALF_CLOSE with reads after it; maybe an ending."""
    script: list[object] = draw(st.lists(st.one_of(reads, others), max_size=6))
    if draw(st.booleans()):
        script += [HALF_CLOSE, *draw(st.lists(reads, max_size=3))]
    ending = draw(st.sampled_from([None, HANGUP, TRUNCATE, RESET, STALL]))
    return script if ending is None else [*script, ending]


@SETTINGS
@given(
    script=random_scripts(),
    data=inputs,
    cuts=cut_points,
    max_receive=st.sampled_from([DEFAULT_MAX_RECEIVE, 3]),
)
def test_every_byte_read_is_received_dropped_or_discarded(
    script: list[object], data: bytes, cuts: list[int], max_receive: int
) -> None:
    m = machine(script, max_receive=max_receive)
    delivered = drive(m, split(data, cuts))
    record = m.record
    kept = b"".join(record.received)
    assert len(kept) + record.dropped + record.discarded == delivered, record
    assert data.startswith(kept) or record.dropped, "received bytes come in order"


# ---- StartTLS ---------------------------------------------------------------------------------


def test_plaintext_before_starttls_is_a_failure_and_discarded() -> None:
    m = tls_machine([ReadUntil(b"\r\n"), b"220 go ahead\r\n", StartTLS(), ReadUntil(b"\r\n")])
    m.receive_data(b"STARTTLS\r\nMAIL FROM:<evil>\r\n", 1.0)  # the injected command rides along
    assert m.record.received == [b"STARTTLS\r\n"]
    play(m, 1.0)
    assert m.next_action() == Handshake(None)
    record = m.record
    assert record.failure is not None
    assert "CVE-2011-0411" in record.failure
    assert record.failure.startswith("step 2 (StartTLS): 18 bytes arrived in plaintext")
    assert "MAIL FROM:<evil>" in record.failure
    assert record.discarded == len(b"MAIL FROM:<evil>\r\n")
    m.tls_started(1.5)
    assert record.tls
    m.receive_data(b"EHLO x\r\n", 2.0)
    assert record.received == [b"STARTTLS\r\n", b"EHLO x\r\n"], "the injected bytes are gone"


def test_starttls_with_nothing_unread_is_fine() -> None:
    m = tls_machine([ReadUntil(b"\r\n"), b"220 go ahead\r\n", StartTLS(), RECEIVE])
    m.receive_data(b"STARTTLS\r\n", 1.0)
    play(m, 1.0)
    assert m.next_action() == Handshake(None)
    m.tls_started(1.5)
    m.receive_data(b"hello", 2.0)
    assert run_to_close(m, 3.0) == Done(Outcome.COMPLETED)
    assert (m.record.failure, m.record.discarded, m.record.tls) == (None, 0, True)


def test_tls_from_the_start_handshakes_first() -> None:
    m = tls_machine([RECEIVE])
    assert m.next_action() == Handshake(None)
    m.tls_failed("unknown CA", 1.0)
    assert run_to_close(m, 2.0) == Done(Outcome.TLS_FAILED)
    assert m.record.detail == "TLS failed: unknown CA"


# ---- big payloads and long searches -----------------------------------------------------------


def test_a_one_byte_drip_keeps_one_view_of_its_payload() -> None:
    payload = random.Random(0).randbytes(300_000)
    m = machine([Drip(payload, chunk=1, interval=0.0)])
    slices = 0
    while isinstance(action := m.next_action(), Send):
        assert len(action.data) == 1
        m.data_sent(1, 0.0)
        slices += 1
    assert slices == len(payload)
    record = m.record
    assert len(record._sent) == 1, "one view per send step, extended slice by slice"
    assert record._sent[0].obj is payload, "a view of the step's payload, not a copy"
    assert record.bytes_sent == len(payload)
    assert record.sent == payload


def test_each_send_step_keeps_its_own_view() -> None:
    m = machine([b"ab", Drip(b"cde", chunk=2, interval=0.0), b"f"])
    for count in (1, 1, 1, 1, 1, 1):  # one byte at a time: partial sends of every step
        action = m.next_action()
        assert isinstance(action, Send)
        m.data_sent(count, 0.0)
    assert [view.tobytes() for view in m.record._sent] == [b"ab", b"cde", b"f"]
    assert (m.record.sent, m.record.bytes_sent) == (b"abcdef", 6)


MIB = 1024 * 1024
FILLER = b"x" * SEARCH_EAGERLY_BELOW  # 64 KiB that match nothing


def test_a_bounded_expect_finds_its_match_after_8_mib() -> None:
    (step, _) = compile_script([Expect(rb"HTTP/1\.1 \d{3}"), RECEIVE])
    assert isinstance(step, ReadStep)
    assert step.max_width == 12, "a bounded pattern: windowed search"
    m = machine([Expect(rb"HTTP/1\.1 \d{3}"), RECEIVE])
    for index in range(8 * MIB // len(FILLER)):
        m.receive_data(FILLER, index * 0.001)
        assert m.next_action() == Receive(None), "a bounded search never defers"
    m.receive_data(b"HTTP/1.1 200 OK", 1.0)
    assert m.record.received == [FILLER * 128 + b"HTTP/1.1 200", b" OK"]


def test_an_unbounded_expect_finds_its_match_after_8_mib() -> None:
    (step,) = compile_script([Expect(rb"END.*!")])
    assert isinstance(step, ReadStep)
    assert step.max_width is None, "unbounded: deferred searches"
    m = machine([Expect(rb"END.*!"), RECEIVE], timeout=5.0)
    now = 0.0
    for _ in range(8 * MIB // len(FILLER)):
        now += 0.001
        m.receive_data(FILLER, now)
        action = m.next_action()
        assert isinstance(action, Receive)
        assert action.deadline is not None
        assert action.deadline <= now + 5.0
    now += 0.001
    m.receive_data(b"END of it!tail", now)
    # 8 MiB were searched; 8 MiB and 14 bytes is not twice that: the search waits for a pause,
    # and the Receive's deadline (5 s of silence) is brought forward to that tick.
    assert m.record.received == []
    assert m.next_action() == Receive(now + SEARCH_PAUSE_SECONDS)
    m.tick(now + SEARCH_PAUSE_SECONDS)
    assert m.record.received == [FILLER * 128 + b"END of it!", b"tail"]
    assert m.step_index == 2


def test_an_unbounded_search_is_deferred_only_past_the_eager_size() -> None:
    m = machine([Expect(rb"END.*!")], timeout=5.0)
    m.receive_data(b"x" * (SEARCH_EAGERLY_BELOW - 10), 1.0)
    m.receive_data(b"END!", 1.0)
    assert m.next_action() == ShutdownWrite(True, 1.0 + DRAIN_SECONDS), "searched at once"


def test_a_deferred_search_runs_when_the_peer_pauses() -> None:
    m = machine([Expect(rb"EN+D.*!")], timeout=5.0)
    m.receive_data(FILLER, 1.0)  # searched: no match
    m.receive_data(b"xxEN", 1.001)  # the match straddles reads, in a buffer past the eager size
    m.receive_data(b"ND!", 1.002)
    assert m.next_action() == Receive(1.002 + SEARCH_PAUSE_SECONDS)
    m.tick(1.002 + SEARCH_PAUSE_SECONDS - 0.001)
    assert m.record.received == []
    m.tick(1.002 + SEARCH_PAUSE_SECONDS)
    assert m.record.received == [FILLER + b"xxENND!"]
    assert m.record.failure is None


def test_a_deferred_search_that_finds_nothing_falls_back_to_the_timeout() -> None:
    m = machine([Expect(rb"END.*!")], timeout=5.0)
    m.receive_data(FILLER, 1.0)
    m.receive_data(b"more", 1.5)
    assert m.next_action() == Receive(1.5 + SEARCH_PAUSE_SECONDS)
    m.tick(1.5 + SEARCH_PAUSE_SECONDS)
    assert m.next_action() == Receive(6.5)
    m.tick(6.5)
    assert run_to_close(m, 7.0) == Done(Outcome.TIMED_OUT)


def test_a_deferred_search_never_leaves_a_deadline_in_the_past() -> None:
    # Without a timeout, a tick at the deadline a deferred search asked for must leave an
    # action with no deadline, or a later one: a deadline in the past would make a reactor
    # that arms a timer for it tick again at once, forever, until more bytes arrive.
    m = machine([Expect(rb"END.*!")])
    m.receive_data(FILLER, 0.0)
    m.receive_data(b"more", 0.0)
    assert m.next_action() == Receive(SEARCH_PAUSE_SECONDS)
    m.tick(SEARCH_PAUSE_SECONDS)  # the search runs: still no match
    assert m.next_action() == Receive(None)


def test_an_eager_search_after_a_deferral_drops_the_deferred_deadline() -> None:
    m = machine([Expect(rb"END.*!")])
    m.receive_data(FILLER, 0.0)
    m.receive_data(b"more", 0.0)
    assert m.next_action() == Receive(SEARCH_PAUSE_SECONDS)
    m.receive_data(FILLER, 1.0)  # the buffer doubled: searched at once, no match, nothing due
    action = m.next_action()
    assert isinstance(action, Receive)
    m.tick(5.0)
    assert m.next_action() == Receive(None), f"a stale deadline: {action}"


@pytest.mark.parametrize("pattern", [rb"END.*!", rb"END!"], ids=["unbounded", "bounded"])
def test_a_match_that_arrived_just_before_the_peer_closed_is_found(pattern: bytes) -> None:
    # The peer sends the end of its request and closes at once: the EOF comes before the
    # tick of a deferred search, which must still find the match.
    m = machine([Expect(pattern)], timeout=5.0)
    m.receive_data(FILLER, 1.0)
    m.receive_data(b"xEND!", 1.001)
    if isinstance(m.next_action(), Receive):
        m.receive_data(b"", 1.002)
    assert run_to_close(m, 2.0) == Done(Outcome.COMPLETED)
    assert m.record.failure is None
    assert m.record.received == [FILLER + b"xEND!"]


#: Fixed-width patterns, some anchored or looking around their match: the match the machine
#: finds in any prefix of the input is the match in the whole input.
BOUNDED = [
    rb"HTTP/1\.1 \d{3}",
    rb"^a;",
    rb"(?m)^a;",
    rb"(?<=;)ab",
    rb"\Bb<",
    rb"<a>",
    rb"\Aab",
]
tokens = st.sampled_from([b"a", b"b", b";", b"\n", b"<", b">", b"HTTP/1.1 ", b"200", b"x"])
token_inputs = st.lists(tokens, max_size=40).map(b"".join)


@SETTINGS
@given(
    pattern=st.sampled_from(BOUNDED),
    first_line=st.booleans(),
    filler=st.sampled_from([0, 100, SEARCH_EAGERLY_BELOW]),
    data=token_inputs,
    cuts=st.lists(st.integers(0, 400), max_size=12),
)
def test_a_bounded_search_finds_the_match_however_split(
    pattern: bytes, first_line: bool, filler: int, data: bytes, cuts: list[int]
) -> None:
    step = compile_script([Expect(pattern)])[0]
    assert isinstance(step, ReadStep)
    assert step.max_width is not None
    data = b"x" * filler + data
    script: list[object] = [ReadUntil(b"\n"), Expect(pattern)] if first_line else [Expect(pattern)]
    m = machine(script)
    drive(m, split(data, cuts))
    record = m.record
    rest = data
    expected: list[bytes] = []
    if first_line:
        line_end = data.find(b"\n")
        if line_end < 0:
            assert record.received == ([data] if data else [])
            assert record.outcome is Outcome.PEER_CLOSED
            return
        expected.append(data[: line_end + 1])
        rest = data[line_end + 1 :]
    match = re.compile(pattern).search(rest)  # `^` is the start of the step's bytes
    if match is None:
        assert record.received == ([*expected, rest] if rest else expected)
        assert record.outcome is Outcome.PEER_CLOSED
        assert record.failure is not None
    else:
        assert record.received == [*expected, rest[: match.end()]]
        assert record.outcome is Outcome.COMPLETED
        assert record.failure is None


def test_a_match_straddling_64_kib_reads() -> None:
    data = b"x" * (8 * MIB - 5) + b"HTTP/1.1 200 OK"
    m = machine([Expect(rb"HTTP/1\.1 \d{3}")])
    m.receive_data(b"HTTP/1.1 2", 0.0)  # a near miss first, searched and left behind
    for start in range(0, len(data), len(FILLER)):
        m.receive_data(data[start : start + len(FILLER)], 0.0)
    assert m.record.received == [b"HTTP/1.1 2" + data[:-3]]


def test_an_anchored_bounded_pattern_matches_only_at_the_start() -> None:
    m = machine([Expect(rb"^HTTP/1\.1 \d{3}")])
    for chunk in [b"xHTTP/1.1 ", b"200 ", b"HTTP/1.1 200"]:
        m.receive_data(chunk, 0.0)
    assert m.running
    assert m.record.received == []
    m = machine([Expect(rb"^HTTP/1\.1 \d{3}")])
    for chunk in [b"HT", b"TP/1.1 2", b"00 OK"]:
        m.receive_data(chunk, 0.0)
    assert m.record.received == [b"HTTP/1.1 200"]
    m = machine([Expect(rb"(?m)^HTTP/1\.1 \d{3}")])
    for chunk in [b"x" * 100 + b"\n", b"HTTP/1.1 ", b"204"]:
        m.receive_data(chunk, 0.0)
    assert m.record.received == [b"x" * 100 + b"\nHTTP/1.1 204"]


# ---- compiling big scripts --------------------------------------------------------------------


def test_compile_script_of_100k_steps() -> None:
    script: list[object] = [RECEIVE, b"x"] * 50_000 + [HALF_CLOSE, RECEIVE]
    steps = compile_script(script)
    assert len(steps) == 100_002
    assert steps[-2] is HALF_CLOSE
    with pytest.raises(ValueError, match=r"script\[100002\] = b'y': cannot send after HALF_CLOSE"):
        compile_script([*script, b"y"])
