"""The scenarios: each runs one implementation once and returns its measurements.

A scenario function takes the implementation and a :class:`Context` (the client process and the
sizes of this run) and returns ``{metric: value}``. Scenarios check every reply, so a broken
server fails the run instead of posting a fast time.

Most scenarios judge selectserver against the baselines. The ``proxy*`` ones run the same client
against selectserver direct, through a FaultProxy (the ``proxied`` implementation) and through
a minimal relay on the same reactor (``rawproxy``, the floor, shown but not judged), and judge
the proxied figure against the direct one from the same run.
"""

from __future__ import annotations

import json
import operator
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from contextlib import closing
from dataclasses import dataclass, field
from typing import Literal

from .clients import ClientProcess, exchange
from .common import HELLO
from .impls import BASELINES, DIRECT, PROXIED, RAW_PROXY, Impl, Script, opened, warm_up
from .system import (
    PeakSampler,
    open_fds,
    os_threads,
    release_memory,
    rss,
    settled_threads,
    time_wait,
)

__all__ = ["SCENARIOS", "Context", "Metric", "Scenario", "Sizes", "Target"]

MB = 1_000_000
MiB = 1024 * 1024


@dataclass(frozen=True)
class Sizes:
    """How big one run is; ``QUICK`` is the smoke run."""

    reps: int = 5
    heavy_reps: int = 3  # manyconns, the memory scenarios, spinup N=1000
    spinup_counts: tuple[int, ...] = (1, 500, 1000)
    spinup_cycles_for_one: int = 20  # N=1 repeats this many times per sample (median counts)
    idleclose_cycles: int = 50  # servers opened and closed per sample (median counts)
    connrate_sequential: int = 1000
    connrate_concurrent: int = 2000
    connrate_concurrency: int = 50
    pingpong_steps: int = 1000
    pingpong_rounds: int = 3  # connections per sample (the median counts), each a full script
    bulk_bytes: int = 64 * MiB
    many_servers: int = 1000
    many_clients_each: int = 5
    idle_servers: int = 1000
    idle_connections: int = 1000  # idleconns: idle clients of one server
    records_connections: int = 1000  # records: finished connections of one server
    proxy_clients: int = 1000  # proxymany: clients at once through one proxy
    churn_servers: int = 1000  # churn: servers one after another ...
    churn_connections: int = 100  # ... each serving this many sequential clients


FULL = Sizes()
QUICK = Sizes(
    reps=1,
    heavy_reps=1,
    spinup_cycles_for_one=5,
    idleclose_cycles=10,
    connrate_sequential=200,
    connrate_concurrent=400,
    bulk_bytes=16 * MiB,
    many_servers=200,
    churn_servers=200,
)


@dataclass
class Context:
    """What every scenario run gets."""

    clients: ClientProcess
    sizes: Sizes
    _payloads: dict[int, bytes] = field(default_factory=dict)

    def payload(self, size: int) -> bytes:
        """``size`` bytes, made once per run and shared by every implementation."""
        return self._payloads.setdefault(size, b"\xa5" * size)


@dataclass(frozen=True)
class Metric:
    """One measured quantity of a scenario."""

    name: str
    unit: str
    higher_is_better: bool


Op = Literal["<=", ">=", "=="]
_OPS: dict[Op, Callable[[float, float], bool]] = {
    "<=": operator.le,
    ">=": operator.ge,
    "==": operator.eq,
}


@dataclass(frozen=True)
class Target:
    """A pass/fail check on the subject's median (selectserver's, or ``proxied``'s for the proxy
    scenarios): ``median op limit``, or with a ``baseline`` ``median / baseline op limit``.
    """

    metric: str
    op: Op
    limit: float
    baseline: str | None = None

    def describe(self) -> str:
        """The target in words, e.g. ``>= 0.8x rawselect`` or ``<= 1``."""
        if self.baseline is None:
            return f"{self.op} {self.limit:g}"
        return f"{self.op} {self.limit:g}x {self.baseline}"

    def passes(self, value: float, baselines: dict[str, float]) -> bool | None:
        """Whether ``value`` meets the target (None if the baseline was not measured)."""
        if self.baseline is not None:
            base = baselines.get(self.baseline)
            if not base:
                return None
            value /= base
        return _OPS[self.op](value, self.limit)


@dataclass(frozen=True)
class Scenario:
    """A named measurement, run once per implementation per repetition."""

    key: str
    run: Callable[[Impl, Context], dict[str, float]]
    metrics: tuple[Metric, ...]
    reps: Callable[[Sizes], int]
    impls: tuple[str, ...] = ("selectserver", *BASELINES)
    targets: tuple[Target, ...] = ()
    title: str = ""
    #: the implementation whose figures the targets judge
    subject: str = "selectserver"
    #: what the table divides every implementation's median by, one ratio column each
    baselines: tuple[str, ...] = BASELINES
    #: run after every other scenario of its repetition (it leaves the host changed)
    last: bool = False

    @property
    def label(self) -> str:
        """How the table names the scenario."""
        return self.title or self.key


# ---- spinup ---------------------------------------------------------------------------------


def _spinup(n: int) -> Callable[[Impl, Context], dict[str, float]]:
    def run(impl: Impl, context: Context) -> dict[str, float]:
        cycles = context.sizes.spinup_cycles_for_one if n == 1 else 1
        warm_up(impl)  # what it keeps between groups (an idle reactor) is not "added"
        threads0, fds0 = settled_threads(), open_fds()
        threads_added = fds_added = 0
        times = []
        for cycle in range(cycles):
            start = time.perf_counter()
            with opened(impl, HELLO, n) as group:
                for address in group.addresses:
                    exchange(address, b"x", b"hello")
                if cycle == 0:
                    threads_added, fds_added = os_threads() - threads0, open_fds() - fds0
            times.append(time.perf_counter() - start)
        return {
            "time": statistics.median(times) / n * 1e6,
            "threads": threads_added,
            "fds": fds_added,
            "fds left": open_fds() - fds0,
        }

    return run


def _spinup_scenario(n: int) -> Scenario:
    targets = [Target("time", "<=", 1.5 if n >= 1000 else 1.2, "rawselect")]
    if n >= 1000:
        targets.append(Target("threads", "<=", 1))
    return Scenario(
        f"spinup{n}",
        _spinup(n),
        (
            Metric("time", "µs/server", False),
            Metric("threads", "threads added", False),
            Metric("fds", "fds added", False),
            Metric("fds left", "fds left after close", False),
        ),
        _heavy if n >= 1000 else _normal,
        targets=tuple(targets),
        title=f"spinup N={n}",
    )


def _idleclose(impl: Impl, context: Context) -> dict[str, float]:
    """Open one server, settle, and time its ``close()`` alone; the median of many."""
    times = []
    for _ in range(context.sizes.idleclose_cycles):
        group = impl.open(HELLO, 1)
        try:
            group.settle()
        finally:
            start = time.perf_counter()
            group.close()
        times.append(time.perf_counter() - start)
    return {"close": statistics.median(times) * 1e6}


# ---- connrate, pingpong, bulk ---------------------------------------------------------------


def _connrate(impl: Impl, context: Context) -> dict[str, float]:
    sizes = context.sizes
    with opened(impl, HELLO, 1) as group:
        group.settle()
        address = group.addresses[0]
        sequential = context.clients.run(
            "sequential",
            address=address,
            count=sizes.connrate_sequential,
            request=b"x",
            expect=b"hello",
        ).require(sizes.connrate_sequential)
        concurrent = context.clients.run(
            "concurrent",
            targets=[address] * sizes.connrate_concurrent,
            concurrency=sizes.connrate_concurrency,
            request=b"x",
            expect=b"hello",
        ).require(sizes.connrate_concurrent)
    return {
        "sequential": sizes.connrate_sequential / sequential.elapsed,
        "concurrent": sizes.connrate_concurrent / concurrent.elapsed,
    }


def _pingpong(impl: Impl, context: Context) -> dict[str, float]:
    steps, rounds = context.sizes.pingpong_steps, context.sizes.pingpong_rounds
    times = []
    with opened(impl, (1, b"y") * steps, 1) as group:
        group.settle()
        for _ in range(rounds):
            result = context.clients.run("pingpong", address=group.addresses[0], steps=steps)
            times.append(result.require(steps).elapsed)
    return {"round trip": statistics.median(times) / steps * 1e6}


def _bulk(impl: Impl, context: Context) -> dict[str, float]:
    size = context.sizes.bulk_bytes
    with opened(impl, (1, context.payload(size)), 1) as group:
        group.settle()
        result = context.clients.run("bulk_read", address=group.addresses[0], size=size)
    return {"throughput": size / result.require(1).elapsed / MB}


def _bulk_in(impl: Impl, context: Context) -> dict[str, float]:
    size = context.sizes.bulk_bytes
    with opened(impl, (size, b"ok"), 1) as group:
        group.settle()
        result = context.clients.run(
            "bulk_write", address=group.addresses[0], size=size, expect=b"ok"
        )
    return {"throughput": size / result.require(1).elapsed / MB}


# ---- manyconns, proxymany, idle memory ------------------------------------------------------


def _crowd(
    impl: Impl, context: Context, script: Script, servers: int, clients_each: int
) -> dict[str, float]:
    """Open ``servers``, connect ``clients_each`` clients to each all at once, check, close."""
    reply = script[-1]
    assert isinstance(reply, bytes)
    warm_up(impl)
    release_memory()
    threads0, rss0 = settled_threads(), rss()
    with PeakSampler() as peak:
        start = time.perf_counter()
        with opened(impl, script, servers) as group:
            targets = group.addresses * clients_each
            context.clients.run(
                "concurrent",
                targets=targets,
                concurrency=len(targets),
                request=b"x",
                expect=reply,
            ).require(len(targets))
        elapsed = time.perf_counter() - start
    return {
        "wall": elapsed,
        "threads": peak.peak_threads - threads0,
        "rss": (peak.peak_rss - rss0) / MiB,
    }


def _manyconns(impl: Impl, context: Context) -> dict[str, float]:
    sizes = context.sizes
    return _crowd(impl, context, HELLO, sizes.many_servers, sizes.many_clients_each)


def _proxymany(impl: Impl, context: Context) -> dict[str, float]:
    return _crowd(impl, context, (1, b"ok"), 1, context.sizes.proxy_clients)


def _memory(
    kind: str, count: Callable[[Sizes], int]
) -> Callable[[Impl, Context], dict[str, float]]:
    """Run ``python -m benchmarks.memory KIND IMPL N`` (a fresh process); its JSON figures."""

    def run(impl: Impl, context: Context) -> dict[str, float]:
        command = [
            sys.executable,
            "-m",
            "benchmarks.memory",
            kind,
            impl.name,
            str(count(context.sizes)),
        ]
        done = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
        if done.returncode:
            raise RuntimeError(f"{' '.join(command)} failed:\n{done.stderr}")
        values: dict[str, float] = json.loads(done.stdout)
        return values

    return run


# ---- churn ----------------------------------------------------------------------------------

#: churn stops early once this many OSErrors have been counted
CHURN_MAX_ERRORS = 100


def _churn(impl: Impl, context: Context) -> dict[str, float]:
    """Servers one after another, each serving sequential clients that close normally.

    The server closes each connection first, so TIME_WAIT entries pile up on its ports, as in
    a test suite; later constructors may slow down searching for a free port.
    """
    sizes = context.sizes
    times: list[float] = []
    errors = 0
    time_wait0 = time_wait()
    for _ in range(sizes.churn_servers):
        if errors >= CHURN_MAX_ERRORS:
            break
        try:
            start = time.perf_counter()
            group = impl.open(HELLO, 1)
            times.append(time.perf_counter() - start)
            with closing(group):
                result = context.clients.run(
                    "sequential",
                    address=group.addresses[0],
                    count=sizes.churn_connections,
                    request=b"x",
                    expect=b"hello",
                    linger_zero=False,
                )
        except OSError:
            errors += 1
            continue
        if result.failed > result.errors:  # a wrong reply or a timeout, not an OSError
            raise RuntimeError(f"churn: {result.failed - result.errors} clients failed: {result}")
        errors += result.errors
    if not times:
        raise RuntimeError(f"churn: no server started ({errors} OSErrors)")
    tenth = max(1, len(times) // 10)
    first, last = statistics.median(times[:tenth]), statistics.median(times[-tenth:])
    return {
        "start": first * 1e6,
        "end": last * 1e6,
        "slowdown": last / first,
        "errors": errors,
        "time-wait before": time_wait0,
        "time-wait after": time_wait(),
    }


def _heavy(sizes: Sizes) -> int:
    return sizes.heavy_reps


def _normal(sizes: Sizes) -> int:
    return sizes.reps


def _once(sizes: Sizes) -> int:
    """One repetition: churn's TIME_WAIT entries outlive it by a minute, and would slow the next."""
    return 1


def _proxy_scenario(
    key: str,
    run: Callable[[Impl, Context], dict[str, float]],
    metrics: tuple[Metric, ...],
    *targets: Target,
) -> Scenario:
    """A scenario run direct, through a FaultProxy and through the minimal relay (its floor),
    judged proxied against direct; the relay's row and the ratios to it are only shown.
    """
    return Scenario(
        key,
        run,
        metrics,
        _normal,
        impls=(DIRECT, PROXIED, RAW_PROXY),
        targets=targets,
        subject=PROXIED,
        baselines=(DIRECT, RAW_PROXY),
    )


_THROUGHPUT = (Metric("throughput", "MB/s", True),)
_CROWD = (
    Metric("wall", "s wall", False),
    Metric("threads", "peak threads added", False),
    Metric("rss", "MiB peak RSS added", False),
)

SCENARIOS: dict[str, Scenario] = {
    scenario.key: scenario
    for scenario in (
        *(_spinup_scenario(n) for n in FULL.spinup_counts),
        Scenario(
            "connrate",
            _connrate,
            (
                Metric("sequential", "conn/s sequential", True),
                Metric("concurrent", "conn/s concurrent", True),
            ),
            _normal,
            targets=(
                Target("sequential", ">=", 0.83, "rawselect"),
                Target("concurrent", ">=", 1.0, "rawselect"),
            ),
        ),
        Scenario(
            "pingpong",
            _pingpong,
            (Metric("round trip", "µs/round trip", False),),
            _normal,
            targets=(Target("round trip", "<=", 0.9, "rawselect"),),
        ),
        Scenario(
            "bulk",
            _bulk,
            _THROUGHPUT,
            _normal,
            impls=("selectserver", *BASELINES, "plain"),
            targets=(Target("throughput", ">=", 0.8, "rawselect"),),
        ),
        Scenario(
            "bulk-in",
            _bulk_in,
            _THROUGHPUT,
            _normal,
            impls=("selectserver", *BASELINES, "plain"),
        ),
        Scenario(
            "idleclose",
            _idleclose,
            (Metric("close", "µs/server", False),),
            _normal,
            # threads: shutdown() waits out serve_forever's 0.1 s poll, 5 s a sample
            impls=("selectserver", "asyncio", "rawselect"),
            targets=(Target("close", "<=", 1.1, "rawselect"),),
            title="idle close (the usual teardown)",
        ),
        Scenario("manyconns", _manyconns, _CROWD, _heavy, targets=(Target("threads", "<=", 1),)),
        Scenario(
            "idle",
            _memory("idle", lambda sizes: sizes.idle_servers),
            (
                Metric("rss", "KiB RSS/server", False),
                Metric("traced", "KiB traced/server", False),
            ),
            _heavy,
            targets=(Target("rss", "<=", 1.0), Target("traced", "<=", 1.0)),
        ),
        Scenario(
            "idleconns",
            _memory("idleconns", lambda sizes: sizes.idle_connections),
            (Metric("traced", "KiB traced/idle connection", False),),
            _heavy,
            impls=("selectserver", "asyncio", "rawselect"),  # those that count connections
            targets=(Target("traced", "<=", 1.2),),
        ),
        Scenario(
            "records",
            _memory("records", lambda sizes: sizes.records_connections),
            (Metric("retained", "KiB retained/ended connection", False),),
            _heavy,
            impls=("selectserver",),  # the baselines keep no records
            targets=(Target("retained", "<=", 0.5),),
        ),
        _proxy_scenario("proxybulk", _bulk, _THROUGHPUT, Target("throughput", ">=", 0.5, DIRECT)),
        _proxy_scenario(
            "proxypingpong",
            _pingpong,
            (Metric("round trip", "µs/round trip", False),),
            Target("round trip", "<=", 2.0, DIRECT),
        ),
        _proxy_scenario("proxymany", _proxymany, _CROWD, Target("threads", "<=", 1)),
        Scenario(
            "churn",
            _churn,
            (
                Metric("start", "µs/constructor, first 10%", False),
                Metric("end", "µs/constructor, last 10%", False),
                Metric("slowdown", "x slowdown (end/start)", False),
                Metric("errors", "OSErrors", False),
                Metric("time-wait before", "host TIME_WAIT entries at start", False),
                Metric("time-wait after", "host TIME_WAIT entries at end", False),
            ),
            _once,
            impls=("selectserver",),
            targets=(Target("slowdown", "<=", 2.0), Target("errors", "==", 0)),
            last=True,
        ),
    )
}
