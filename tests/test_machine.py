"""The step machine alone: feed it bytes and times, assert on what it asks for next.

Straight-line tests in the style of h11's ``tests/test_state.py``: no socket, no thread, no
clock. ``play`` stands in for a socket that takes every byte at once and a clock that jumps to
the end of each wait.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
from hypothesis import given
from hypothesis import strategies as st

from selectserver import (
    BREAK,
    HALF_CLOSE,
    HANGUP,
    RECEIVE,
    RESET,
    STALL,
    Delay,
    Drip,
    Expect,
    Garbage,
    Outcome,
    ReadUntil,
    Throttle,
    compile_script,
)
from selectserver._machine import (
    SHUTDOWN_WRITE,
    THROTTLE_SLICE_SECONDS,
    Done,
    Receive,
    Send,
    StepMachine,
    Wait,
)
from selectserver._records import DEFAULT_MAX_RECEIVE, ConnectionRecord


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
    assert m.next_action() == Done(Outcome.COMPLETED)
    assert (m.record.outcome, m.record.failure, m.record.ended_at) == (Outcome.COMPLETED, None, 2.0)


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
    assert m.next_action() == Done(Outcome.COMPLETED)


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
    assert m.next_action() == Done(Outcome.COMPLETED)
    assert m.record.failure is None


def test_expect_without_a_match_fails_when_the_peer_closes() -> None:
    m = machine([RECEIVE, Expect("HTTP/1.[01] 200")])
    m.receive_data(b"req", 0.0)
    m.receive_data(b"HTTP/1.1 404", 0.0)
    m.receive_data(b"", 3.0)
    assert m.next_action() == Done(Outcome.PEER_CLOSED)
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
    assert m.next_action() == Done(Outcome.TIMED_OUT)
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
    assert m.next_action() == Done(Outcome.PEER_CLOSED)
    assert m.record.received == [b"abc"]
    assert (m.record.failure is not None) == failed
    assert m.record.step == 0


# ---- send steps -------------------------------------------------------------------------------


def test_partial_sends_continue_with_a_view_of_the_tail() -> None:
    payload = bytearray(b"hello world")
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
    assert m.next_action() == Done(Outcome.COMPLETED)
    assert m.record.sent == b"hello world"


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
    assert m.next_action() is SHUTDOWN_WRITE
    m.receive_data(b"too early", 0.5)  # only reported while the machine reads: ignored
    m.write_shut(1.0)
    assert m.record.half_closed
    assert m.next_action() == Receive(None)
    m.receive_data(b"more", 2.0)
    assert m.record.received == [b"more"]
    assert m.next_action() == Done(Outcome.COMPLETED)


def test_stall_discards_until_the_peer_closes() -> None:
    m = machine([RECEIVE, STALL], timeout=5.0)
    m.receive_data(b"req", 0.0)
    assert m.next_action() == Receive(None), "a stall has no deadline"
    m.receive_data(b"ignored", 1.0)
    m.receive_data(b"!", 2.0)
    assert m.record.received == [b"req"]
    assert m.record.discarded == 8
    m.receive_data(b"", 3.0)
    assert m.next_action() == Done(Outcome.PEER_CLOSED)
    assert m.record.failure is None


def test_stall_never_times_out() -> None:
    m = machine([RECEIVE, STALL], timeout=5.0)  # RECEIVE's deadline timer is armed at 5.0
    m.receive_data(b"req", 1.0)
    m.tick(5.0)  # that timer fires during the stall
    assert m.next_action() == Receive(None)
    m.tick(100.0)
    assert m.next_action() == Receive(None)
    assert m.record.outcome is None


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
    if m.next_action() is SHUTDOWN_WRITE:
        m.write_shut(played.now)
    assert m.next_action() == Done(outcome)
    record = m.record
    assert (record.outcome, record.failure, record.ended_at) == (outcome, None, played.now)


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
    assert m.next_action() == Done(outcome)
    record = m.record
    assert (record.outcome, record.ended_at, record.step) == (outcome, 9.0, 0)
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
    action, record = m.next_action(), m.record
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
    assert m.next_action() == Done(Outcome.TIMED_OUT)
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
    assert m.next_action() == Done(Outcome.TIMED_OUT)
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
    assert m.record.outcome is None


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
    assert m.next_action() == Done(Outcome.COMPLETED)


@pytest.mark.parametrize("step", [ReadUntil(b";"), Expect(b";")], ids=repr)
def test_a_search_buffering_past_max_receive_fails(step: object) -> None:
    m = machine([step], max_receive=4)
    m.receive_data(b"abcd", 0.0)
    assert m.next_action() == Receive(None)
    m.receive_data(b"e", 1.0)
    assert m.next_action() == Done(Outcome.ERROR)
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
        ([], None, "ended: completed"),
        ([RESET], None, "ended: reset"),
        ([RECEIVE], received(b""), "ended: peer closed"),
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
    assert m.next_action() == Done(Outcome.PEER_CLOSED)
    if not steps:
        assert m.record.received == chunks, "each RECEIVE takes exactly one read"
