"""Property tests: generated scripts, played by the reference client against real servers.

Profiles: see ``_hypothesis_profiles`` (``SELECTSERVER_HYPOTHESIS_PROFILE=dev pytest ...``).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import pytest
from _checks import check_round_trip, fetch, run_to_close, serve_and_play
from _hypothesis_profiles import SETTINGS
from hypothesis import example, given, settings
from hypothesis import strategies as st
from hypothesis.errors import InvalidArgument

from selectserver import (
    HALF_CLOSE,
    HANGUP,
    RECEIVE,
    RESET,
    STALL,
    CommandServer,
    Delay,
    Drip,
    ReadUntil,
    Throttle,
    compile_script,
)
from selectserver._machine import Done, StepMachine
from selectserver._records import ConnectionRecord
from selectserver._script import ReadStep, SendStep
from selectserver.reference import _seeded, expected_outcome, needs_sync
from selectserver.strategies import (
    HTTPResponseScript,
    http_responses,
    pauses,
    receive_steps,
    scripts,
    send_steps,
)

FLAGS = (
    "allow_hangup",
    "allow_reset",
    "allow_half_close",
    "allow_stall",
    "allow_delay",
    "allow_throttle",
    "allow_drip",
)


# ---- the strategies themselves -----------------------------------------------------------------


@SETTINGS
@given(st.data(), st.fixed_dictionaries({flag: st.booleans() for flag in FLAGS}))
def test_scripts_are_valid_and_obey_their_knobs(
    data: st.DataObject, flags: dict[str, bool]
) -> None:
    script = data.draw(scripts(min_steps=2, max_steps=6, max_send_size=10, **flags))
    steps = compile_script(script)
    assert 2 <= len(steps) <= 6
    banned = {
        "allow_hangup": lambda step: step is HANGUP,
        "allow_reset": lambda step: step is RESET,
        "allow_stall": lambda step: step is STALL,
        "allow_half_close": lambda step: step is HALF_CLOSE,
        "allow_delay": lambda step: isinstance(step, Delay),
        "allow_throttle": lambda step: isinstance(step, Throttle),
        "allow_drip": lambda step: isinstance(step, Drip),
    }
    for flag, is_banned in banned.items():
        assert flags[flag] or not any(map(is_banned, script)), (flag, script)
    assert all(len(step.data) <= 10 for step in steps if isinstance(step, SendStep))


@pytest.mark.parametrize(
    ("strategy", "kwargs", "message"),
    [
        (scripts, {"min_steps": -1}, "min_steps=-1"),
        (scripts, {"min_steps": 3, "max_steps": 2}, "min_steps=3 must be <= max_steps=2"),
        (scripts, {"max_steps": 1.5}, "max_steps=1.5 must be an int"),
        (scripts, {"max_send_size": True}, "max_send_size=True"),
        (scripts, {"max_receive_size": 0}, "max_receive_size=0"),
        (scripts, {"max_delay": float("inf")}, "max_delay=inf"),
        (scripts, {"max_delay": "1"}, "max_delay='1'"),
        (scripts, {"allow_reset": 1}, "allow_reset=1"),
        (receive_steps, {"max_size": 0}, "max_size=0"),
        (send_steps, {"max_size": -1}, "max_size=-1"),
        (pauses, {"allow_delay": False, "max_delay": 0}, "needs allow_delay"),
        (http_responses, {"kinds": []}, "kinds=[]"),
        (http_responses, {"kinds": ["bogus"]}, "kinds[0]='bogus'"),
        (http_responses, {"kinds": "valid"}, "kinds='valid'"),
        (http_responses, {"versions": ["HTTP/2"]}, "versions[0]='HTTP/2'"),
        (http_responses, {"max_body_size": -1}, "max_body_size=-1"),
    ],
)
def test_strategy_arguments_are_checked_when_called(
    strategy: Callable[..., object], kwargs: dict[str, object], message: str
) -> None:
    with pytest.raises(InvalidArgument, match=re.escape(message)):
        strategy(**kwargs)


@SETTINGS
@given(receive_steps(max_size=40), st.integers(0, 2**32))
def test_seeded_bytes_complete_each_receive_step_exactly(step: object, seed: int) -> None:
    """Fed at once to the step machine, the bytes complete the step with nothing left over."""
    (compiled,) = compile_script([step])
    assert isinstance(compiled, ReadStep)
    data = _seeded(seed, 0, compiled)
    record = ConnectionRecord(0, None)
    machine = StepMachine((compiled,), record, now=0.0)
    if data:
        machine.receive_data(data, 0.0)
    assert run_to_close(machine) == Done(expected_outcome([step]))
    assert record.received == [data]


# ---- the reference client against real servers ------------------------------------------------


@SETTINGS
@example([b"\x00", RECEIVE, b"\x00", b"\x00", RESET], 0)  # found Nagle holding a send back
@given(scripts(max_steps=8), st.integers(0, 1000))
def test_reference_client_round_trip(script: list[object], seed: int) -> None:
    """Server and client agree on every step's bytes, the sends and how the connection ended."""
    check_round_trip(script, seed)


@SETTINGS
@given(scripts(max_steps=8).filter(lambda script: not needs_sync(script)), st.integers(0, 1000))
def test_round_trip_without_sync_where_the_wire_shows_each_boundary(
    script: list[object], seed: int
) -> None:
    check_round_trip(script, seed, sync=False)


@SETTINGS
@given(st.lists(scripts(max_steps=5), min_size=2, max_size=4), st.integers(1, 2))
def test_clients_on_several_servers_at_once_do_not_interfere(
    many: list[list[object]], clients: int
) -> None:
    with ThreadPoolExecutor(max_workers=len(many)) as pool:
        futures = [
            pool.submit(serve_and_play, script, seed, clients) for seed, script in enumerate(many)
        ]
        for future in futures:
            future.result(timeout=30)


# ---- HTTP responses ----------------------------------------------------------------------------


@SETTINGS
@given(http_responses(max_body_size=64))
def test_http_responses_round_trip(response: HTTPResponseScript) -> None:
    script = list(response.script)
    assert b"".join(bytes(s.data) for s in compile_script(script) if isinstance(s, SendStep)) == (
        response.data
    )
    assert (response.body is not None) is (response.kind == "valid")
    check_round_trip(script, 0)


#: Found by the test below (and fuzz/): http.client raises OverflowError on these
#: (``_checks.CLIENT_ERRORS`` allows it).
HUGE_LENGTH = b"HTTP/1.0 200 OK\r\nContent-Length: 99999999999999999999999\r\n\r\n"
HUGE_CHUNK = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nffffffffffffffffffff\r\n"


@SETTINGS
@example(
    HTTPResponseScript((ReadUntil(b"\r\n\r\n"), HUGE_LENGTH), "malformed", HUGE_LENGTH, 200, None)
)
@example(
    HTTPResponseScript((ReadUntil(b"\r\n\r\n"), HUGE_CHUNK), "malformed", HUGE_CHUNK, 200, None)
)
@given(http_responses(max_body_size=64))
def test_http_client_against_generated_responses(response: HTTPResponseScript) -> None:
    """http.client gets valid responses right and never hangs on the others."""
    with CommandServer(response.script, verbose=False, timeout=5.0) as server:
        result = fetch(server.address)
    server.check()
    assert not isinstance(result, TimeoutError), "http.client hung"
    if response.kind == "valid":
        assert result == (response.status, response.body)
    elif not isinstance(result, Exception):
        assert len(result[1]) <= len(response.data)


def test_every_kind_and_framing_is_generated() -> None:
    """The strategy reaches every kind and framing (a fixed sample, so the test is stable)."""
    seen: set[tuple[str, str]] = set()

    @settings(SETTINGS, max_examples=200, derandomize=True, database=None)
    @given(http_responses(max_body_size=8))
    def collect(response: HTTPResponseScript) -> None:
        head = response.data.split(b"\r\n\r\n", 1)[0].lower()
        framing = next(
            (name for name, mark in FRAMINGS if mark in head),
            "close",
        )
        seen.add((response.kind, framing))

    collect()
    kinds = {kind for kind, _ in seen}
    assert kinds == {"valid", "truncated", "malformed"}
    assert {framing for kind, framing in seen if kind == "valid"} == {"length", "chunked", "close"}


FRAMINGS = (("length", b"content-length"), ("chunked", b"transfer-encoding: chunked"))
