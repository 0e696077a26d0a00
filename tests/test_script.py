"""The script vocabulary: every way a script or a server's arguments are rejected, and what
good scripts compile to. No sockets: every server here fails before it binds one."""

from __future__ import annotations

import array
import math
import re
from collections.abc import Callable
from typing import Any

import pytest
from _checks import run_to_close

from selectserver import (
    BREAK,
    HALF_CLOSE,
    HANGUP,
    RECEIVE,
    RESET,
    STALL,
    CommandServer,
    Delay,
    Drip,
    Expect,
    Garbage,
    ReadUntil,
    Throttle,
    _script,
    compile_script,
)
from selectserver._machine import Done, Send, StepMachine
from selectserver._records import ConnectionRecord, Outcome
from selectserver._script import TRUNCATE, ReadStep, SendStep, StartTLS

EXPECTED = "expected RECEIVE, an int > 0, str/bytes, or a step"
NOT_A_LIST = "script must be a list of steps or a str/bytes, got"


def step(kind: Callable[..., object], *args: Any, **kwargs: Any) -> Callable[[], list[object]]:
    """Build ``[kind(*args, **kwargs)]`` later; untyped, as the arguments are wrong on purpose."""
    return lambda: [kind(*args, **kwargs)]


# (builds the script, error type, message fragment). The builder runs inside pytest.raises, so
# a step constructor that rejects its arguments is caught the same way as compile_script.
BAD_SCRIPTS = [
    # not a list of steps
    pytest.param(lambda: 3, TypeError, f"{NOT_A_LIST} 3", id="int"),
    pytest.param(lambda: None, TypeError, f"{NOT_A_LIST} None", id="None"),
    pytest.param(lambda: {"a": 1}, TypeError, f"{NOT_A_LIST} {{'a': 1}}", id="dict"),
    pytest.param(lambda: {RECEIVE}, TypeError, f"{NOT_A_LIST} {{RECEIVE}}", id="set"),
    pytest.param(lambda: frozenset(), TypeError, f"{NOT_A_LIST} frozenset()", id="frozenset"),
    pytest.param(lambda: 3.5, TypeError, f"{NOT_A_LIST} 3.5", id="float-script"),
    # a step of the wrong type or value: the message names index and value
    pytest.param(lambda: [RECEIVE, 3.5], TypeError, f"script[1] = 3.5: {EXPECTED}", id="float"),
    pytest.param(lambda: [-1], ValueError, "script[0] = -1: an int step reads", id="negative"),
    pytest.param(lambda: [RECEIVE, 0], ValueError, "script[1] = 0: an int step", id="zero"),
    pytest.param(lambda: [True], TypeError, f"script[0] = True: {EXPECTED}", id="True"),
    pytest.param(lambda: [RECEIVE, False], TypeError, "script[1] = False: expected", id="False"),
    pytest.param(lambda: [b"x", None], TypeError, f"script[1] = None: {EXPECTED}", id="None-step"),
    pytest.param(lambda: [object()], TypeError, "script[0] = <object object at", id="object"),
    pytest.param(lambda: [Delay], TypeError, "script[0] = <class 'selectserver.", id="class"),
    pytest.param(lambda: [[RECEIVE]], TypeError, f"script[0] = [RECEIVE]: {EXPECTED}", id="nested"),
    pytest.param(
        lambda: ["\ud800"],
        ValueError,
        "script[0] = '\\ud800':",
        id="lone-surrogate",
    ),
    # step constructors validate their arguments
    pytest.param(step(Delay, "1"), TypeError, "Delay: seconds must be a number", id="Delay-str"),
    pytest.param(step(Delay, True), TypeError, "Delay: seconds must be", id="Delay-bool"),
    pytest.param(step(Delay, -1), ValueError, "Delay: seconds must be finite and >= 0, got -1"),
    pytest.param(step(Delay, math.inf), ValueError, "finite and >= 0, got inf", id="Delay-inf"),
    pytest.param(step(Delay, 1, jitter=math.nan), ValueError, "Delay: jitter must be finite"),
    pytest.param(step(Delay, 1, seed=1.5), TypeError, "Delay: seed must be an int, got 1.5"),
    pytest.param(step(Drip, 1), TypeError, "Drip: data must be str or bytes, got 1"),
    pytest.param(step(Drip, b"x", chunk=0), ValueError, "Drip: chunk must be >= 1, got 0"),
    pytest.param(step(Drip, b"x", chunk=1.0), TypeError, "Drip: chunk must be an int"),
    pytest.param(step(Drip, b"x", interval=-0.1), ValueError, "Drip: interval must be"),
    pytest.param(step(Drip, b"x", jitter="0"), TypeError, "Drip: jitter must be a number"),
    pytest.param(step(Drip, b"x", seed=None), TypeError, "Drip: seed must be an int"),
    pytest.param(step(ReadUntil, b""), ValueError, "ReadUntil: delimiter must not be empty"),
    pytest.param(step(ReadUntil, ""), ValueError, "ReadUntil: delimiter must not be empty"),
    pytest.param(step(ReadUntil, None), TypeError, "ReadUntil: delimiter must be str or"),
    pytest.param(step(Expect, 1), TypeError, "Expect: pattern must be str, bytes or re.Pattern"),
    pytest.param(step(Expect, "("), ValueError, "Expect: bad pattern '('"),
    pytest.param(step(Expect, b"["), ValueError, "Expect: bad pattern b'['"),
    pytest.param(step(Throttle, 0), ValueError, "Throttle: bytes_per_second must be finite"),
    pytest.param(step(Throttle, -5), ValueError, "and > 0, got -5", id="Throttle-negative"),
    pytest.param(step(Throttle, math.inf), ValueError, "and > 0, got inf", id="Throttle-inf"),
    pytest.param(step(Throttle, "fast"), TypeError, "Throttle: bytes_per_second must be a"),
    pytest.param(step(Throttle, True), TypeError, "or None, got True", id="Throttle-bool"),
    pytest.param(step(Garbage, -1), ValueError, "Garbage: n must be >= 0, got -1"),
    pytest.param(step(Garbage, 1.0), TypeError, "Garbage: n must be an int, got 1.0"),
    pytest.param(step(Garbage, 1, seed="s"), TypeError, "Garbage: seed must be an int"),
    pytest.param(step(StartTLS, fail="nope"), ValueError, "StartTLS: fail must be None"),
    # steps that could never run, or could not work, after the ones before
    pytest.param(
        lambda: [RECEIVE, HANGUP, b"late"],
        ValueError,
        "script[2] = b'late': no step can follow HANGUP",
        id="after-HANGUP",
    ),
    pytest.param(lambda: [BREAK, RECEIVE], ValueError, "script[1] = RECEIVE: no step can follow"),
    pytest.param(lambda: [RESET, Delay(1)], ValueError, "no step can follow RESET", id="RESET"),
    pytest.param(lambda: [STALL, STALL], ValueError, "script[1] = STALL: no step can follow STALL"),
    pytest.param(lambda: [TRUNCATE, HANGUP], ValueError, "no step can follow TRUNCATE"),
    pytest.param(
        lambda: [HALF_CLOSE, RECEIVE, "x" * 100],
        ValueError,
        f"script[2] = '{'x' * 56}...: cannot send after HALF_CLOSE",
        id="send-after-HALF_CLOSE-long-label",
    ),
    pytest.param(lambda: [HALF_CLOSE, Drip(b"x")], ValueError, "script[1] = Drip(data=b'x'"),
    pytest.param(lambda: [HALF_CLOSE, Garbage(0)], ValueError, "cannot send after HALF_CLOSE"),
    pytest.param(
        lambda: [HALF_CLOSE, RECEIVE, HALF_CLOSE],
        ValueError,
        "script[2] = HALF_CLOSE: the sending side is already shut",
        id="second-HALF_CLOSE",
    ),
    pytest.param(
        lambda: [StartTLS()], ValueError, "script[0] = StartTLS(fail=None): StartTLS needs"
    ),
]


def _not_none(params: list[Any]) -> list[Any]:
    """The table without the None script, which CommandServer reads as "no script given"."""
    return [param for param in params if param.id != "None"]


def _make_server(**kwargs: Any) -> None:
    """Build a CommandServer that should fail; close it if it did not, so nothing leaks."""
    CommandServer(verbose=False, **kwargs).close()


@pytest.mark.parametrize(("build", "error", "fragment"), BAD_SCRIPTS)
def test_compile_script_rejects(
    build: Callable[[], object], error: type[Exception], fragment: str
) -> None:
    with pytest.raises(error, match=re.escape(fragment)) as info:
        compile_script(build())
    assert type(info.value) is error, "plain TypeError/ValueError, not a subclass"


@pytest.mark.parametrize(("build", "error", "fragment"), _not_none(BAD_SCRIPTS))
def test_command_server_rejects_the_same_scripts(
    build: Callable[[], object], error: type[Exception], fragment: str
) -> None:
    with pytest.raises(error, match=re.escape(fragment)):
        _make_server(commands=build())


BAD_SERVER_ARGS = [
    pytest.param({}, TypeError, "give a script: commands=[...]", id="no-script"),
    pytest.param(
        {"commands": [RECEIVE], "scripts": [[RECEIVE]]},
        TypeError,
        "give commands= or scripts=, not both",
        id="both",
    ),
    pytest.param({"scripts": []}, TypeError, "scripts must be a non-empty list of scripts, got []"),
    pytest.param({"scripts": "abc"}, TypeError, "non-empty list of scripts, got 'abc'"),
    pytest.param({"scripts": 5}, TypeError, "non-empty list of scripts, got 5", id="scripts-int"),
    pytest.param({"scripts": [[RECEIVE], [3.5]]}, TypeError, f"scripts[1][0] = 3.5: {EXPECTED}"),
    pytest.param(
        {"scripts": [[RECEIVE], 5]},
        TypeError,
        "scripts[1] must be a list of steps or a str/bytes, got 5",
        id="scripts-1-int",
    ),
    pytest.param(
        {"scripts": [b"ok", [HANGUP, RECEIVE]]},
        ValueError,
        "scripts[1][1] = RECEIVE: no step can follow HANGUP",
        id="scripts-order",
    ),
    pytest.param({"commands": [], "port": -1}, ValueError, "port must be an int from 0 to 65535"),
    pytest.param({"commands": [], "port": 65536}, ValueError, "0 to 65535, got 65536"),
    pytest.param({"commands": [], "host": 1}, TypeError, "host must be a str, got 1"),
    pytest.param({"commands": [], "host": None}, TypeError, "host must be a str, got None"),
    pytest.param({"commands": [], "timeout": 0}, ValueError, "timeout must be finite and > 0"),
    pytest.param({"commands": [], "timeout": -1.0}, ValueError, "finite and > 0, got -1.0"),
    pytest.param({"commands": [], "timeout": math.nan}, ValueError, "finite and > 0, got nan"),
    pytest.param({"commands": [], "timeout": math.inf}, ValueError, "finite and > 0, got inf"),
    pytest.param({"commands": [], "timeout": "5"}, TypeError, "timeout must be a number of sec"),
    pytest.param({"commands": [], "timeout": True}, TypeError, "seconds or None, got True"),
    pytest.param({"commands": [], "max_connections": 0}, ValueError, "max_connections must be an"),
    pytest.param(
        {"commands": [], "max_connections": -3}, ValueError, "max_connections must be an int >= 1"
    ),
    pytest.param({"commands": [], "max_receive": -1}, ValueError, "max_receive must be an int >="),
    *(
        pytest.param({"commands": [], name: value}, TypeError, name, id=f"{name}={value!r}")
        for name, value in [
            ("port", "80"),
            ("port", True),
            ("max_connections", "1"),
            ("max_connections", 1.0),
            ("max_receive", 1.5),
            ("max_receive", "1"),
        ]
    ),
]


@pytest.mark.parametrize(("kwargs", "error", "fragment"), BAD_SERVER_ARGS)
def test_command_server_rejects_arguments(
    kwargs: dict[str, Any], error: type[Exception], fragment: str
) -> None:
    with pytest.raises(error, match=re.escape(fragment)):
        _make_server(**kwargs)


# ---- good scripts -----------------------------------------------------------------------------

RECEIVE_STEP = ReadStep("RECEIVE", min_bytes=1)


@pytest.mark.parametrize("payload", ["hi", b"hi", bytearray(b"hi"), memoryview(b"hi")])
def test_a_bare_payload_means_receive_then_send(payload: object) -> None:
    steps = compile_script(payload)
    assert steps == compile_script([RECEIVE, payload])
    assert len(steps) == 2
    assert steps[0] == RECEIVE_STEP
    assert isinstance(steps[1], SendStep)
    assert bytes(steps[1].data) == b"hi"


COMPILED_SHAPES: list[tuple[object, object]] = [
    (RECEIVE, RECEIVE_STEP),
    (1, ReadStep("1", min_bytes=1)),
    (4096, ReadStep("4096", min_bytes=4096)),
    (
        ReadUntil("\r\n"),
        ReadStep("ReadUntil(delimiter=b'\\r\\n')", delimiter=b"\r\n"),
    ),
    (HANGUP, HANGUP),
    (RESET, RESET),
    (HALF_CLOSE, HALF_CLOSE),
    (STALL, STALL),
    (Delay(1.5, jitter=0.5, seed=3), Delay(1.5, jitter=0.5, seed=3)),
    (Throttle(100), Throttle(100)),
    (Throttle(None), Throttle(None)),
    ("é", SendStep("'é'", "é".encode())),
    (
        Drip("abc", chunk=2, interval=0.5, jitter=0.1, seed=9),
        SendStep(
            "Drip(data=b'abc', chunk=2, interval=0.5, jitter=0.1, seed=9)",
            b"abc",
            2,
            0.5,
            0.1,
            9,
        ),
    ),
]


@pytest.mark.parametrize(
    ("value", "expected"),
    [pytest.param(value, expected, id=repr(value)) for value, expected in COMPILED_SHAPES],
)
def test_compiled_shapes(value: object, expected: object) -> None:
    assert compile_script([value]) == (expected,)


def test_break_is_hangup() -> None:
    assert BREAK is HANGUP
    assert compile_script([RECEIVE, BREAK]) == (RECEIVE_STEP, HANGUP)


def test_constructors_normalise_str_to_bytes() -> None:
    assert Drip("é").data == "é".encode()
    assert ReadUntil("\n").delimiter == b"\n"
    assert ReadUntil(bytearray(b";")).delimiter == b";"


@pytest.mark.parametrize(
    "wrap", [lambda buffer: buffer, memoryview], ids=["bytearray", "memoryview"]
)
def test_mutable_buffers_are_copied_once(wrap: Callable[[bytearray], object]) -> None:
    """Changing the caller's buffer later changes neither the script nor its records, and
    the caller can still resize it (no export is held)."""
    owner = bytearray(b"abc")
    (step,) = compile_script([wrap(owner)])
    assert isinstance(step, SendStep)
    owner[0:1] = b"X"
    owner.extend(b"more")  # would raise BufferError if a view were kept
    assert bytes(step.data) == b"abc"


@pytest.mark.parametrize(
    "data", [b"abc" * 1000, memoryview(b"abc" * 1000)], ids=["bytes", "read-only view"]
)
def test_immutable_buffers_are_sent_without_copying(data: bytes | memoryview) -> None:
    (step,) = compile_script([data])
    assert isinstance(step, SendStep)
    base = data.obj if isinstance(data, memoryview) else data
    assert memoryview(step.data).obj is base


@pytest.mark.parametrize(
    "view",
    [
        memoryview(array.array("H", [1, 2, 3])).toreadonly(),
        memoryview(b"abcdef").cast("B", (2, 3)),
    ],
    ids=["wide-items", "2-d"],
)
def test_a_contiguous_memoryview_is_sent_as_its_bytes(view: memoryview) -> None:
    (step,) = compile_script([view])
    assert isinstance(step, SendStep)
    data = memoryview(step.data)
    assert (data.format, data.ndim) == ("B", 1)
    assert data.obj is view.obj, "cast, not copied"
    assert data == view.tobytes()


@pytest.mark.parametrize(
    "view",
    [memoryview(b"abcdef")[::2], memoryview(b"abcdef").cast("B", (3, 2))[::2]],
    ids=["1-d", "2-d"],
)
def test_a_non_contiguous_memoryview_is_sent_as_a_contiguous_copy(view: memoryview) -> None:
    steps = compile_script([view])
    machine = StepMachine(steps, ConnectionRecord(0, "peer"), now=0.0)
    action = machine.next_action()
    assert isinstance(action, Send)
    machine.data_sent(len(action.data), 0.0)
    assert run_to_close(machine) == Done(Outcome.COMPLETED)
    assert machine.record.sent == view.tobytes()
    assert action.data.c_contiguous, "socket.send() needs a C-contiguous buffer"


def test_garbage_is_reproducible_by_seed() -> None:
    assert Garbage(32, seed=1).data == Garbage(32, seed=1).data
    assert Garbage(32, seed=1).data != Garbage(32, seed=2).data
    assert len(Garbage(32).data) == 32
    assert Garbage(0).data == b""
    (step,) = compile_script([Garbage(32, seed=1)])
    assert isinstance(step, SendStep)
    assert step.data == Garbage(32, seed=1).data


@pytest.mark.parametrize(
    ("pattern", "matches", "misses"),
    [
        ("a.c", b"xxabc", b"ABC"),
        (b"a.c", b"a-c", b"ac"),
        (re.compile("a.c", re.IGNORECASE), b"ABC", b"AB"),
        (re.compile(b"^GET "), b"GET /", b" GET /"),
        ("é+", "ééé".encode(), b"e"),
        (re.compile(r"\d{3}"), b"HTTP/1.1 200", b"HTTP/1.1 20"),
    ],
    ids=repr,
)
def test_expect_compiles_every_pattern_to_a_bytes_regex(
    pattern: str | bytes | re.Pattern[str] | re.Pattern[bytes], matches: bytes, misses: bytes
) -> None:
    (step,) = compile_script([Expect(pattern)])
    assert isinstance(step, ReadStep)
    assert step.must_match
    assert step.regex is not None
    assert isinstance(step.regex.pattern, bytes)
    assert step.regex.search(matches)
    assert not step.regex.search(misses)


@pytest.mark.parametrize(
    "make",
    [list, tuple, iter, lambda steps: (step for step in steps)],
    ids=["list", "tuple", "iterator", "generator"],
)
def test_any_sequence_or_iterable_of_steps(make: Callable[[list[object]], object]) -> None:
    steps: list[object] = [RECEIVE, b"hello", HANGUP]
    assert compile_script(make(steps)) == compile_script(steps)
    assert compile_script(make([])) == ()


def test_the_empty_script_is_valid() -> None:
    assert compile_script([]) == ()
    assert compile_script(()) == ()


def test_error_names_the_script() -> None:
    with pytest.raises(TypeError, match=re.escape("scripts[7][2] = 3.5: expected")):
        compile_script([RECEIVE, b"x", 3.5], name="scripts[7]")


# ---- the cache of compiled plain scripts ---------------------------------------------------------


def test_servers_with_the_same_plain_script_share_its_compiled_steps() -> None:
    script = [RECEIVE, "hello", b"there", 3, HANGUP]
    assert compile_script(script) is compile_script(list(script))
    assert compile_script(tuple(script), tls=True) is not compile_script(script)
    assert compile_script(tuple(script), tls=True)[0] == StartTLS()


def test_the_cache_tells_equal_values_of_other_types_apart() -> None:
    assert compile_script([RECEIVE, 1])[1] == compile_script([RECEIVE, 1])[1]
    with pytest.raises(TypeError, match=r"script\[1\] = True"):
        compile_script([RECEIVE, True])
    with pytest.raises(TypeError, match=r"script\[1\] = 1\.0"):
        compile_script([RECEIVE, 1.0])
    assert compile_script(["1"])[0] != compile_script([1])[0]


def test_the_cache_keeps_neither_big_payloads_nor_more_than_its_bound() -> None:
    big = b"x" * (_script.CACHED_BYTES + 1)
    assert compile_script([big]) is not compile_script([big])
    for n in range(_script.CACHED_SCRIPTS * 2):
        compile_script([RECEIVE, f"reply {n}"])
    assert len(_script._compiled) <= _script.CACHED_SCRIPTS
    mutable = bytearray(b"abc")
    steps = compile_script([mutable])
    mutable[:] = b"xyz"
    assert compile_script([mutable]) is not steps  # never cached: copied at each compile
