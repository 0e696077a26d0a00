"""``python -m benchmarks``: run the scenarios, interleaved, and print the table.

Every repetition runs each chosen scenario once per implementation, in an order rotated from one
repetition to the next, so a noisy neighbour slows every implementation alike. A scenario with
fewer repetitions runs in the last ones, and ``churn`` (which leaves TIME_WAIT entries behind)
runs last of all. The ratios in the table compare medians from the same run; read those, not
the absolute figures.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import time
from collections.abc import Sequence
from dataclasses import replace

from . import report
from .clients import ClientProcess
from .impls import BASELINES, PROXIED, RAW_PROXY, by_name
from .scenarios import FULL, QUICK, SCENARIOS, Context, Scenario, Sizes
from .system import raise_fd_limit

IMPL_NAMES = ("selectserver", *BASELINES, "plain", PROXIED, RAW_PROXY)


def _pick(names: str | None, known: Sequence[str], what: str) -> list[str]:
    """``names`` (comma-separated; a prefix such as ``spinup`` picks ``spinup1`` ...) in order."""
    if not names:
        return list(known)
    chosen: list[str] = []
    for name in names.split(","):
        matches = [key for key in known if key == name] or [
            key for key in known if key.removeprefix(name).isdigit()
        ]
        if not matches:
            raise SystemExit(f"unknown {what} {name!r}; choose from {', '.join(known)}")
        chosen += [key for key in matches if key not in chosen]
    return chosen


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks", description=__doc__.split("\n\n")[0] if __doc__ else None
    )
    parser.add_argument("--quick", action="store_true", help="a short smoke run (under a minute)")
    parser.add_argument(
        "--scenarios",
        help=f"comma-separated, from: {', '.join(SCENARIOS)} (spinup = all three)",
    )
    parser.add_argument(
        "--impls", help=f"comma-separated, from: {', '.join(IMPL_NAMES)} (default: all)"
    )
    parser.add_argument("--reps", type=int, help="repetitions of every scenario")
    parser.add_argument("--markdown", metavar="PATH", help="also write the table as markdown")
    parser.add_argument(
        "--cpu",
        type=int,
        help="pin the whole run to this CPU (default: the first allowed one)",
    )
    parser.add_argument(
        "--no-pin", action="store_true", help="let the scheduler spread the run over all CPUs"
    )
    return parser.parse_args(argv)


def pin(cpu: int | None) -> str:
    """Pin this process (and so every thread and child it starts) to one CPU; say which.

    On one CPU the client and the server take turns, so a figure is the CPU cost of both,
    which is what the ratios compare. Spread over several CPUs, each round trip also pays
    for waking an idle CPU, which on a virtual machine costs tens of microseconds, varies
    from run to run, and hides the servers' own cost.
    """
    allowed = sorted(os.sched_getaffinity(0))
    chosen = allowed[0] if cpu is None else cpu
    os.sched_setaffinity(0, {chosen})
    return f"pinned to CPU {chosen} of {len(allowed)}"


def _header(sizes: Sizes, started: datetime.datetime, placement: str) -> str:
    return (
        f"{started:%Y-%m-%d %H:%M} UTC, Python {platform.python_version()} on "
        f"{platform.system()} {platform.machine()}, {os.cpu_count()} cores ({placement}); "
        f"{sizes.reps} repetitions ({sizes.heavy_reps} for manyconns, idle, idleconns, records, "
        "spinup N=1000; churn once)"
    )


def run(scenarios: Sequence[Scenario], impls: Sequence[str], sizes: Sizes) -> report.Results:
    """Run every scenario for every implementation, interleaved round-robin."""
    results = report.Results()
    started = time.monotonic()
    ordered = sorted(scenarios, key=lambda scenario: scenario.last)
    total = max(scenario.reps(sizes) for scenario in ordered)
    with ClientProcess() as clients:
        context = Context(clients, sizes)
        for rep in range(total):
            for scenario in ordered:
                if rep < total - scenario.reps(sizes):
                    continue
                order = [impl for impl in scenario.impls if impl in impls]
                shift = rep % len(order) if order else 0
                for impl in order[shift:] + order[:shift]:
                    results.add(scenario, impl, scenario.run(by_name(impl), context))
                print(
                    f"[{time.monotonic() - started:6.1f} s] rep {rep + 1}: {scenario.label}",
                    file=sys.stderr,
                    flush=True,
                )
    return results


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; print the table and targets; 0 unless something broke."""
    args = parse_args(argv)
    sizes = QUICK if args.quick else FULL
    if args.reps is not None:
        sizes = replace(sizes, reps=args.reps, heavy_reps=min(args.reps, sizes.heavy_reps))
    scenarios = [SCENARIOS[key] for key in _pick(args.scenarios, list(SCENARIOS), "scenario")]
    impls = _pick(args.impls, IMPL_NAMES, "implementation")
    limit = raise_fd_limit()
    needed = sizes.many_servers * (1 + sizes.many_clients_each) + 1000
    if limit < needed:
        print(f"warning: RLIMIT_NOFILE is {limit}; manyconns needs ~{needed}", file=sys.stderr)
    placement = "not pinned" if args.no_pin else pin(args.cpu)
    started = datetime.datetime.now(datetime.timezone.utc)
    results = run(scenarios, impls, sizes)
    table = report.rows(scenarios, results, impls)
    header = _header(sizes, started, placement)
    targets = report.target_lines(table)
    print(f"\n{header}\n\n{report.text(table)}\n\nTargets:\n" + "\n".join(targets))
    if args.markdown:
        with open(args.markdown, "w", encoding="utf-8") as out:
            out.write(f"{header}\n\n{report.markdown(table)}\n\nTargets:\n\n")
            out.write("".join(f"- {line}\n" for line in targets))
    return 0


if __name__ == "__main__":
    sys.exit(main())
