"""Abuse that can crash or hang a whole process: fork, signals, finalizers, blocked output,
descriptor limits, interpreter exit, a huge payload.

Each test runs a small program in a fresh interpreter (``sys.executable -c``) and asserts on its
exit code and on the facts it reports: a line ``RESULT {json}`` on stdout (or in a file, where
stdout is a pipe nobody reads). Every program starts with :data:`PRELUDE`, which makes a
*canary*: an unrelated ``CommandServer`` on the same default reactor that must answer a real
client round trip promptly while and after the hostile thing happens.

The programs may pace themselves with bounded loops; the tests themselves never sleep. A
program that hangs dumps every thread's stack to stderr after 30 s and exits (faulthandler).
Not covered: a user callback on the reactor thread (the library has no such hook yet).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.skipif(
    sys.platform != "linux", reason="fork, setitimer, /proc/self/fd, ru_maxrss in KiB: Linux"
)

#: seconds a program may run before the test fails (each test's programs end well within it)
PROGRAM_TIMEOUT = 60.0
#: seconds after which a program that should exit "promptly" is too slow
PROMPT_EXIT = 10.0
ROOT = Path(__file__).resolve().parent.parent

PRELUDE = r"""
import faulthandler, json, os, socket, sys, threading, time
faulthandler.dump_traceback_later(30, exit=True)  # a hung program shows where, and ends
from selectserver import RECEIVE, STALL, CommandServer, Drip, Outcome, statistics

def round_trip(address, send=b"ping", timeout=5.0):
    # one client conversation: send, then read until the server's FIN
    with socket.create_connection(address, timeout=timeout) as sock:
        sock.sendall(send)
        chunks = []
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                return b"".join(chunks)
            chunks.append(chunk)

CANARY = CommandServer([RECEIVE, "canary"], verbose=False)

def canary(limit=2.0):
    # the unrelated server on the same reactor answers a real client within `limit` seconds
    started = time.monotonic()
    reply = round_trip(CANARY.address, timeout=limit)
    elapsed = time.monotonic() - started
    assert reply == b"canary", reply
    assert elapsed < limit, f"the canary took {elapsed:.3f} s"
    return elapsed

def wait_until(predicate, what, timeout=10.0):
    # a bounded poll, for programs only
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.001)

def report(stream=None, **facts):
    line = "RESULT " + json.dumps(facts)
    if stream is None:
        print(line, flush=True)
    else:
        stream.write(line + "\n")
        stream.flush()
"""


def _result(text: str) -> dict[str, Any]:
    lines = [line for line in text.splitlines() if line.startswith("RESULT ")]
    assert len(lines) == 1, f"expected one RESULT line, got {lines!r}"
    facts: dict[str, Any] = json.loads(lines[0][len("RESULT ") :])
    return facts


def run_program(
    code: str, *args: str, timeout: float = PROGRAM_TIMEOUT
) -> tuple[dict[str, Any], subprocess.CompletedProcess[str], float]:
    """Run PRELUDE + ``code``; assert it exited 0; return its RESULT, the process, its run time."""
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-c", PRELUDE + code, *args],
        timeout=timeout,
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=False,
    )
    elapsed = time.monotonic() - started
    assert proc.returncode == 0, (
        f"exit code {proc.returncode} after {elapsed:.1f} s\n"
        f"--- stdout (tail) ---\n{proc.stdout[-3000:]}\n"
        f"--- stderr (tail) ---\n{proc.stderr[-5000:]}"
    )
    return _result(proc.stdout), proc, elapsed


# ---- 1. fork ----------------------------------------------------------------------------------

FORK = r"""
import select, warnings
warnings.simplefilter("ignore", DeprecationWarning)  # 3.12+: fork() of a threaded process

held = CommandServer([RECEIVE, "after-fork"], verbose=False)      # a connection mid-script
port_server = CommandServer([RECEIVE, "port"], verbose=False)     # the port the child must free
canary()
client = socket.create_connection(held.address, timeout=5)
wait_until(lambda: len(held.connections) == 1, "the parent's reactor to accept the client")
to_parent_r, to_parent_w = os.pipe()
to_child_r, to_child_w = os.pipe()

pid = os.fork()
if pid == 0:
    code = 1
    try:
        os.close(to_parent_r)
        os.close(to_child_w)
        facts = {}
        fresh = CommandServer([RECEIVE, "child"], verbose=False)
        facts["fresh_reply"] = round_trip(fresh.address).decode()
        started = time.monotonic()
        fresh.close(timeout=5)
        facts["fresh_close"] = time.monotonic() - started
        started = time.monotonic()
        for inherited in (held, port_server, CANARY):
            inherited.close(timeout=5)
        facts["inherited_close"] = time.monotonic() - started
        with CommandServer([RECEIVE, "again"], verbose=False) as again:
            facts["again_reply"] = round_trip(again.address).decode()
        facts["servers_left"] = statistics().servers
        os.write(to_parent_w, (json.dumps(facts) + "\n").encode())
        os.read(to_child_r, 1)  # live on until the parent has checked the port
        code = 0
    except BaseException:
        import traceback
        traceback.print_exc()
    finally:
        os._exit(code)

os.close(to_parent_w)
os.close(to_child_r)
readable, _, _ = select.select([to_parent_r], [], [], 10)
assert readable, "the child said nothing within 10 s"
line = b""
while not line.endswith(b"\n"):
    chunk = os.read(to_parent_r, 4096)
    if not chunk:
        break
    line += chunk
assert line, f"the child died: {os.waitpid(pid, 0)}"
child = json.loads(line)

# While the child lives, after it closed its copies of the parent's servers:
canary()
client.setblocking(False)
try:
    early = client.recv(1)  # b"" would be a FIN from the child
except BlockingIOError:
    early = None
assert early is None, f"the held connection got {early!r} from the child's close"
client.settimeout(5)
port = port_server.port
port_server.close(timeout=5)
try:
    socket.create_connection(("127.0.0.1", port), timeout=5).close()
    refused = False
except ConnectionRefusedError:
    refused = True

os.write(to_child_w, b"x")
_, status = os.waitpid(pid, 0)  # bounded by the faulthandler guard above

# After the child exited: the parent's connection, mid-script, goes on.
client.sendall(b"hello")
reply = b""
while True:
    chunk = client.recv(65536)
    if not chunk:
        break
    reply += chunk
client.close()
fresh_reply = round_trip(held.address, b"again")  # and a new client of the same server
records = held.wait_for_connections(2, timeout=5)
held.check()
held.close()
canary()
report(child=child, child_exit=os.waitstatus_to_exitcode(status), refused=refused,
       reply=reply.decode(), fresh_reply=fresh_reply.decode(),
       outcomes=[record.outcome.name for record in records],
       received=[data.decode() for data in held.received])
"""


def test_fork_child_serves_alone_and_leaves_parent_connections_alone() -> None:
    """In a forked child a new server works and the inherited ones close at once, without a
    FIN on the parent's live connection and without keeping the parent's port."""
    facts, _, _ = run_program(FORK)
    child = facts["child"]
    assert child["fresh_reply"] == "child"
    assert child["again_reply"] == "again"
    assert child["fresh_close"] < 2.0, child
    assert child["inherited_close"] < 2.0, child
    assert child["servers_left"] == 0, child
    assert facts["child_exit"] == 0
    assert facts["refused"], "the child kept the parent's closed listening port open"
    assert facts["reply"] == "after-fork"
    assert facts["fresh_reply"] == "after-fork"
    assert facts["outcomes"] == ["COMPLETED", "COMPLETED"]
    assert facts["received"] == ["hello", "again"]


# ---- 2. signal handlers -----------------------------------------------------------------------

SIGNAL = r"""
import signal
MODE = sys.argv[1]
pool = [CommandServer([RECEIVE, "pool"], verbose=False) for _ in range(100)]
current = [CANARY]  # the server the main loop is using now
waited = list(pool) if MODE == "wait-check" else []  # servers nobody has waited on yet
calls = worked = made = depth = deepest = 0
last_end = 0.0

def handler(signum, frame):
    # Every SIGALRM interrupts whatever runs (EINTR everywhere). Each handler that works
    # waits for the reactor (close() returns once closed), which under load can take longer
    # than 0.5 ms: unguarded, handlers would nest without bound (RecursionError in any
    # program). So a handler may interrupt a working handler once (depth 2), and the main
    # thread gets 0.5 ms between outermost workers.
    global calls, worked, depth, deepest, last_end
    calls += 1
    if depth >= 2 or (depth == 0 and time.monotonic() - last_end < 0.0005):
        return
    depth += 1
    deepest = max(deepest, depth)
    worked += 1
    try:
        work()
    finally:
        depth -= 1
        if depth == 0:
            last_end = time.monotonic()

def work():
    global made
    if MODE == "close":
        if pool:
            pool.pop().close(timeout=5)
        else:
            CommandServer([RECEIVE, "signal"], verbose=False).close(timeout=5)
            made += 1
    else:  # each pre-made server's first wait, then the loop's current server
        server = waited.pop() if waited else current[0]
        server.wait_for_connections(0)
        server.check()

signal.signal(signal.SIGALRM, handler)
signal.setitimer(signal.ITIMER_REAL, 0.0005, 0.0005)
started = time.monotonic()
worst = 0.0
for i in range(300):
    with CommandServer([RECEIVE, "main"], verbose=False) as server:
        current[0] = server
        assert round_trip(server.address) == b"main"
        server.wait_for_connections(1)
        server.check()
    current[0] = CANARY
    if i % 30 == 0:
        worst = max(worst, canary())
signal.setitimer(signal.ITIMER_REAL, 0, 0)
signal.signal(signal.SIGALRM, signal.SIG_DFL)
seconds = time.monotonic() - started
worst = max(worst, canary())
for server in pool:
    server.close()
CANARY.close()
report(calls=calls, worked=worked, made=made, deepest=deepest, seconds=seconds, worst=worst,
       servers=statistics().servers)
"""


@pytest.mark.parametrize("run", range(3))
@pytest.mark.parametrize("mode", ["close", "wait-check"])
def test_signal_handler_storm(mode: str, run: int) -> None:
    """SIGALRM every 0.5 ms, its handler closing servers (pre-made ones, then new ones) or
    waiting on and checking servers (pre-made ones never waited on, then the one the
    interrupted loop uses), while the main thread makes, uses, waits on and closes 300."""
    facts, _, _ = run_program(SIGNAL, mode)
    assert facts["worked"] > 0, facts
    assert facts["calls"] >= facts["worked"], facts
    assert facts["servers"] == 0, facts
    if mode == "close":
        assert facts["worked"] == min(facts["worked"], 100) + facts["made"], facts


# ---- 3. finalizers run by the garbage collector, on any thread --------------------------------

GC = r"""
import gc, weakref
threads = []   # the thread each finalizer ran on
errors = []

class Closer:
    def __init__(self, server):
        self.server = server
        self.cycle = self  # only the cycle collector frees it
    def __del__(self):
        threads.append(threading.current_thread().name)
        try:
            self.server.close(timeout=5)
        except BaseException as exc:
            errors.append(repr(exc))

class Cycle:
    def __init__(self):
        self.cycle = self

def finalize(server):
    threads.append(threading.current_thread().name)
    try:
        server.close(timeout=5)
    except BaseException as exc:
        errors.append(repr(exc))

gc.set_threshold(1, 1, 1)
started = time.monotonic()
for i in range(500):
    server = CommandServer([RECEIVE, "gc"], verbose=False)
    assert round_trip(server.address) == b"gc"
    if i % 2:
        Closer(server)
    else:
        weakref.finalize(Cycle(), finalize, server)
    del server
    if i % 50 == 0:
        canary()
gc.collect()
wait_until(lambda: len(threads) == 500, "every finalizer to run")
gc.set_threshold(700, 10, 10)
# A close() on the reactor thread cannot wait: it completes right after.
wait_until(lambda: statistics().servers == 1, "the finalizers' closes to complete")
canary()
by_thread = {name: threads.count(name) for name in set(threads)}
CANARY.close()
report(errors=errors, by_thread=by_thread, seconds=time.monotonic() - started,
       servers=statistics().servers)
"""


def test_gc_finalizers_close_servers_on_any_thread() -> None:
    """``gc.set_threshold(1)``: cyclic garbage whose finalizers close servers is collected all
    the time, on the main thread and on the reactor thread; 500 round trips still finish."""
    facts, _, _ = run_program(GC)
    assert facts["errors"] == []
    assert sum(facts["by_thread"].values()) == 500, facts
    assert facts["by_thread"].get("selectserver-reactor", 0) > 0, "none ran on the reactor thread"
    assert facts["servers"] == 0, facts


# ---- 4. output nobody reads -------------------------------------------------------------------

STUCK_STDOUT = r"""
results = open(sys.argv[1], "w")
started = time.monotonic()
worst = 0.0
for i in range(2000):
    with CommandServer([RECEIVE, "verbose"], verbose=True) as server:
        assert round_trip(server.address) == b"verbose"
    if i % 200 == 0:
        worst = max(worst, canary())
worst = max(worst, canary())
CANARY.close()
report(results, seconds=time.monotonic() - started, worst=worst, servers=statistics().servers)
"""


def test_verbose_output_to_a_pipe_nobody_drains(tmp_path: Path) -> None:
    """verbose=True servers print to a stdout pipe that is never read: the SERVER: lines fill
    it after a few hundred conversations, yet 2000 finish and the process exits cleanly."""
    results = tmp_path / "result"
    errors = tmp_path / "stderr"
    with errors.open("w") as stderr:
        child = subprocess.Popen(
            [sys.executable, "-c", PRELUDE + STUCK_STDOUT, str(results)],
            stdout=subprocess.PIPE,
            stderr=stderr,
            cwd=ROOT,
        )
        try:
            code = child.wait(PROGRAM_TIMEOUT)
        finally:
            child.kill()
            assert child.stdout is not None
            printed = child.stdout.read()  # drained only now that it has ended
            child.stdout.close()
            child.wait()
    assert code == 0, f"exit code {code}\n{errors.read_text()[-5000:]}"
    facts = _result(results.read_text())
    assert facts["servers"] == 0, facts
    assert len(printed) >= 32 * 1024, "the pipe never filled: the test proves nothing"
    assert printed.startswith(b"SERVER: "), printed[:200]


STUCK_LOGGING = r"""
import logging
never = threading.Event()
entered = threading.Event()

class Stuck(logging.Handler):
    def emit(self, record):
        entered.set()
        never.wait()

selectserver_logger = logging.getLogger("selectserver")
selectserver_logger.setLevel(logging.DEBUG)
selectserver_logger.addHandler(Stuck())
started = time.monotonic()
worst = 0.0
for i in range(500):
    with CommandServer([RECEIVE, "logged"], verbose=False) as server:
        assert round_trip(server.address) == b"logged"
    if i % 100 == 0:
        worst = max(worst, canary())
worst = max(worst, canary())
CANARY.close()
report(entered=entered.is_set(), seconds=time.monotonic() - started, worst=worst,
       servers=statistics().servers)
# logging.shutdown() at exit would acquire the Stuck handler's lock, which the output thread
# holds forever inside emit(): that is logging's wait, not selectserver's. Leave without it.
os._exit(0)
"""


def test_logging_handler_that_blocks_forever() -> None:
    """A handler on the ``selectserver`` logger at DEBUG that never returns from ``emit``:
    servers still serve 500 conversations (one
    event would freeze a reactor that logged itself) and the canary answers."""
    facts, _, _ = run_program(STUCK_LOGGING)
    assert facts["entered"], "the handler was never called: the test proves nothing"
    assert facts["servers"] == 0, facts


# ---- 5. descriptor limits ---------------------------------------------------------------------

DESCRIPTORS = r"""
import errno, logging, resource

messages = []
class Collect(logging.Handler):
    def emit(self, record):
        messages.append(record.getMessage())
selectserver_logger = logging.getLogger("selectserver")
selectserver_logger.setLevel(logging.DEBUG)
selectserver_logger.addHandler(Collect())

server = CommandServer([RECEIVE, "fd"], verbose=False)
canary()
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (len(os.listdir("/proc/self/fd")) + 16, hard))
hog = [os.open(os.devnull, os.O_RDONLY) for _ in range(4)]  # freed one by one below
clients, failed = [], 0
for _ in range(50):
    try:
        clients.append(socket.create_connection(server.address, timeout=5))
    except OSError as exc:
        assert exc.errno in (errno.EMFILE, errno.ENFILE), exc
        failed += 1
# Make sure a connection waits in the backlog while no descriptor is free: fill the table,
# free one, and connect with it.
while True:
    try:
        hog.append(os.open(os.devnull, os.O_RDONLY))
    except OSError as exc:
        assert exc.errno == errno.EMFILE, exc
        break
last = None
while hog and last is None:
    os.close(hog.pop())
    try:
        last = socket.create_connection(server.address, timeout=5)
    except OSError as exc:  # the paused listener's retry took the descriptor for the backlog
        assert exc.errno == errno.EMFILE, exc
assert last is not None, "no descriptor left for the last client"
clients.append(last)
wait_until(lambda: any("accept failed" in m for m in messages), "accept() to fail")
running = statistics().running
for sock in clients:
    sock.close()
for fd in hog:
    os.close(fd)
# The paused listener resumes and accepts the backlog (its clients have gone: EOF).
records = server.wait_for_connections(len(clients), timeout=10)
assert round_trip(server.address) == b"fd"
worst = canary()
server.check()
server.close()
CANARY.close()
report(connected=len(clients), failed=failed, running=running, worst=worst,
       pauses=sum("accept failed" in m for m in messages),
       outcomes=sorted({r.outcome.name for r in records}), servers=statistics().servers)
"""


def test_descriptor_limit_pauses_and_resumes_the_listener() -> None:
    """RLIMIT_NOFILE a few above what is open, 50 clients: accept() fails with EMFILE, the
    listener pauses instead of dying, and once the clients close it serves again."""
    facts, _, _ = run_program(DESCRIPTORS)
    assert facts["failed"] > 0, "the limit was never reached: the test proves nothing"
    assert facts["pauses"] >= 1, facts
    assert facts["running"], facts
    assert facts["servers"] == 0, facts


# ---- 6. exit without closing --------------------------------------------------------------------

EXIT = r"""
MODE = sys.argv[1]

def busy_servers():
    # servers with live connections in every kind of state, never closed
    servers = [
        CommandServer([STALL], verbose=True),
        CommandServer([RECEIVE, Drip(b"x" * 10000, interval=0.01)], verbose=True),
        CommandServer([RECEIVE, b"\0" * (64 << 20)], verbose=False),  # a reader who never reads
        CommandServer([RECEIVE, "never sent"], verbose=False),
    ]
    clients = []
    for server in servers:
        client = socket.create_connection(server.address, timeout=5)
        client.sendall(b"go" if server is not servers[0] else b"")
        clients.append(client)
    for server in servers:
        wait_until(lambda: server.connections, "the connections to be accepted")
    canary()
    print("RESULT " + json.dumps({"mode": MODE, "servers": statistics().servers}), flush=True)
    return servers, clients

if MODE == "main":
    kept = busy_servers()
    sys.exit(0)

def worker():
    global kept
    kept = busy_servers()
    raise SystemExit(0)  # ends only this thread

thread = threading.Thread(target=worker)
thread.start()
if MODE == "thread-joined":
    thread.join()
# MODE == "thread-at-shutdown": the interpreter's shutdown waits for the worker
"""


@pytest.mark.parametrize("mode", ["main", "thread-joined", "thread-at-shutdown"])
def test_exit_with_live_connections(mode: str) -> None:
    """A program that leaves servers with live connections (stalled, dripping, blocked on a
    full send buffer) and exits (sys.exit from main, SystemExit in a thread) exits at once, 0."""
    facts, _, elapsed = run_program(EXIT, mode)
    assert facts == {"mode": mode, "servers": 5}
    assert elapsed < PROMPT_EXIT, f"exit took {elapsed:.1f} s"


# ---- 7. a huge payload ------------------------------------------------------------------------

HUGE = r"""
import resource
SIZE = 256 << 20
payload = bytes(range(256)) * (SIZE // 256)
server = CommandServer([RECEIVE, payload], verbose=False, timeout=30)
seen = {}

def slow_reader():
    view = memoryview(payload)
    got, same = 0, True
    with socket.create_connection(server.address, timeout=30) as sock:
        sock.sendall(b"go")
        while True:
            chunk = sock.recv(64 * 1024)
            if not chunk:
                break
            same = same and chunk == view[got : got + len(chunk)]
            got += len(chunk)
            time.sleep(0.0005)
    seen.update(got=got, same=same)

reader = threading.Thread(target=slow_reader)
started = time.monotonic()
reader.start()
worst, rounds = 0.0, 0
while reader.is_alive():
    worst = max(worst, canary(limit=1.0))
    rounds += 1
    time.sleep(0.01)
reader.join()
seconds = time.monotonic() - started
(record,) = server.wait_for_connections(1, timeout=10)
server.check()
server.close()
worst = max(worst, canary(limit=1.0))
CANARY.close()
report(seconds=seconds, rounds=rounds, worst=worst, outcome=record.outcome.name,
       maxrss_kib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, **seen)
"""


def test_huge_payload_to_a_slow_reader() -> None:
    """256 MiB to a client reading 64 KiB at a time: the canary answers within 1 s all along
    and the process never holds much more than the payload itself."""
    facts, _, _ = run_program(HUGE)
    assert facts["got"] == 256 << 20
    assert facts["same"]
    assert facts["outcome"] == "COMPLETED"
    assert facts["rounds"] > 0
    assert facts["worst"] < 1.0
    assert facts["maxrss_kib"] < 1536 * 1024, f"peak RSS {facts['maxrss_kib']} KiB"


# ---- the reactor idling through its grace period at exit -------------------------------------

IDLE_AT_EXIT = r"""
CANARY.close()
with CommandServer([RECEIVE, "last"], verbose=True) as server:
    assert round_trip(server.address) == b"last"
report(running=statistics().running, servers=statistics().servers)
# exit now, while the reactor idles in its grace period and the writer may still be up
"""


def test_a_process_exits_at_once_while_the_reactor_idles() -> None:
    facts, proc, elapsed = run_program(IDLE_AT_EXIT)
    assert facts == {"running": True, "servers": 0}
    assert elapsed < PROMPT_EXIT
    assert "SERVER:" in proc.stdout  # the last server's lines were written before exit
    assert "Traceback" not in proc.stderr, proc.stderr
