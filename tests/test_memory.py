"""Guards of the memory design: what each connection and each ended record keeps.

A server keeps one record per connection for its whole life, and an idle server may hold
thousands of connections, so both are small by design (``python -m benchmarks.memory
idleconns|records selectserver 1000`` measures them). These tests are no benchmarks: they
check the design that makes them small, with bounds generous enough never to be flaky.
"""

from __future__ import annotations

import fnmatch
import gc
import os
import socket
import tracemalloc
from collections.abc import Iterator

from conftest import connect, exchange

import selectserver
from selectserver import RECEIVE, CommandServer, Outcome, compile_script
from selectserver._connection import Connection
from selectserver._control import run_on_reactor
from selectserver._machine import StepMachine, _Frame
from selectserver._records import ConnectionRecord, ServerLog
from selectserver._script import SendStep

SOURCES = os.path.join(os.path.dirname(selectserver.__file__), "*")


def _reachable(root: object) -> Iterator[object]:
    """Every object ``root`` refers to, transitively, short of servers' logs and other
    records (a record refers to its log, which holds every record and the server)."""
    seen = {id(root)}
    stack = [root]
    while stack:
        for referent in gc.get_referents(stack.pop()):
            if id(referent) in seen or isinstance(referent, (ServerLog, ConnectionRecord, type)):
                continue
            seen.add(id(referent))
            yield referent
            stack.append(referent)


def _live_machines(record: ConnectionRecord) -> list[StepMachine]:
    return [o for o in gc.get_objects() if isinstance(o, StepMachine) and o.record is record]


def test_per_connection_objects_have_slots() -> None:
    record = ConnectionRecord(0, ("127.0.0.1", 1))
    machine = StepMachine(compile_script([RECEIVE, b"hello"]), record, now=0.0)
    for obj in (record, machine, _Frame((), None), machine.next_action()):
        assert not hasattr(obj, "__dict__"), f"{type(obj).__name__} has a __dict__"
    assert "__dict__" not in dir(Connection)
    assert "__slots__" in vars(Connection)


def test_a_fresh_machine_makes_no_buffers_or_frames() -> None:
    """A connection waiting in its first receive has made nothing it may never need."""
    record = ConnectionRecord(0, "peer")
    machine = StepMachine(compile_script([RECEIVE, b"hello"]), record, now=0.0, timeout=5.0)
    made = [o for o in gc.get_referents(machine) if isinstance(o, (bytearray, list, _Frame))]
    assert made == []
    assert record._rare is ConnectionRecord(1, "other")._rare, "defaults are shared"


def test_a_whole_send_keeps_the_payload_not_a_view() -> None:
    steps = compile_script([b"hello"])
    (step,) = steps
    assert isinstance(step, SendStep)
    payload = step.data  # the script's own bytes (servers with this script share them)
    record = ConnectionRecord(0, "peer")
    machine = StepMachine(steps, record, now=0.0)
    machine.data_sent(2, 0.0)  # in part: a view of the payload, not a copy
    assert [o.obj for o in _reachable(record) if isinstance(o, memoryview)] == [payload]
    machine.data_sent(3, 0.0)
    assert not [o for o in _reachable(record) if isinstance(o, memoryview)]
    assert record.sent is payload
    assert record._sent[0].obj is payload
    assert record.bytes_sent == 5


def test_an_ended_record_lets_go_of_its_connection() -> None:
    """Once ended, a record refers to no machine, executor or socket, and the machine and
    executor are freed without the cycle collector."""
    with CommandServer([RECEIVE, b"hello"], verbose=False) as server:
        assert exchange(server.address, b"x") == b"hello"
        (record,) = server.wait_for_connections(1)
        assert record.outcome is Outcome.COMPLETED
        kinds = (StepMachine, Connection, socket.socket, memoryview, bytearray)
        kept = [type(o).__name__ for o in _reachable(record) if isinstance(o, kinds)]
        assert kept == [], f"an ended record keeps {kept}"
        assert record.waiting_for() == "ended: completed"
        assert (record.received, record.sent) == ([b"x"], b"hello")
        was_enabled = gc.isenabled()
        gc.disable()
        try:
            after_this_pass(server)  # the pass that ended the record has forgotten it
            assert not server._listener.connections
            assert not _live_machines(record), "the machine outlives its connection"
        finally:
            if was_enabled:
                gc.enable()
    server.check()


def test_a_running_record_still_says_what_it_waits_for() -> None:
    with CommandServer([RECEIVE, b"hello"], verbose=False) as server:
        with connect(server.address):
            # The listener was readable before the command's wake-up byte was sent, so the
            # pass that runs the command has accepted the connection and started its script.
            after_this_pass(server)
            (record,) = server.connections
            assert "waiting for data" in record.waiting_for()
        server.wait_for_connections(1)
    assert record.waiting_for() == "ended: peer closed"


def after_this_pass(server: CommandServer) -> None:
    """Return once the reactor has finished the pass it is in (a command runs at its end)."""
    run_on_reactor(server._reactor, lambda: None)


def _traced_here() -> int:
    """Bytes traced now in allocations with a frame in selectserver's files."""
    gc.collect()
    return sum(
        stat.size
        for stat in tracemalloc.take_snapshot().statistics("traceback")
        if any(fnmatch.fnmatch(frame.filename, SOURCES) for frame in stat.traceback)
    )


def test_an_ended_record_is_small() -> None:
    """A 1-byte request and a 5-byte reply: each ended record keeps well under 1.5 KiB (about
    0.45 KiB by design; 1.9 KiB when records kept their machines)."""
    n = 100
    with CommandServer([RECEIVE, b"hello"], verbose=False) as server:
        assert exchange(server.address, b"x") == b"hello"  # one-off costs come first
        server.wait_for_connections(1)
        tracemalloc.start(25)
        try:
            before = _traced_here()
            for _ in range(n):
                assert exchange(server.address, b"x") == b"hello"
            server.wait_for_connections(n + 1)
            after_this_pass(server)
            assert not server._listener.connections  # every connection forgotten
            per_record = (_traced_here() - before) / n
        finally:
            tracemalloc.stop()
    server.check()
    assert per_record < 1.5 * 1024, f"{per_record:.0f} bytes per ended record"
