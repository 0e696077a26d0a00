"""``python -m benchmarks.profile SCENARIO``: cProfile selectserver's reactor thread in a scenario.

It wraps ``Reactor._run`` (at run time, in this process only) so every reactor thread the
scenario starts runs under one ``cProfile.Profile``, runs the scenario's selectserver side
(its subject: ``proxied`` for the ``proxy*`` scenarios) ``--runs`` times, and prints the top
functions. ``--caller`` also profiles the calling thread
(where ``CommandServer()`` and ``close()`` spend their time: the bulk of ``spinup``).
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
from collections.abc import Callable, Sequence

from selectserver import _reactor

from .clients import ClientProcess
from .impls import by_name
from .scenarios import FULL, SCENARIOS, Context
from .system import raise_fd_limit

__all__ = ["main"]


def profile_reactor(profiler: cProfile.Profile) -> Callable[[], None]:
    """Run every new reactor thread under ``profiler``; returns a function that undoes it."""
    original = _reactor.Reactor._run

    def profiled(self: _reactor.Reactor) -> None:
        profiler.enable()
        try:
            original(self)
        finally:
            profiler.disable()

    _reactor.Reactor._run = profiled  # type: ignore[method-assign]

    def undo() -> None:
        _reactor.Reactor._run = original  # type: ignore[method-assign]

    return undo


def main(argv: Sequence[str] | None = None) -> int:
    """Profile one scenario and print the stats."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.profile", description=__doc__)
    parser.add_argument("scenario", choices=sorted(SCENARIOS))
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--sort", default="tottime", help="pstats sort key (default tottime)")
    parser.add_argument("--lines", type=int, default=30)
    parser.add_argument("--caller", action="store_true", help="also profile the calling thread")
    parser.add_argument("--dump", metavar="PATH", help="save the reactor's stats (pstats file)")
    args = parser.parse_args(argv)
    raise_fd_limit()
    scenario = SCENARIOS[args.scenario]
    reactor_profile = cProfile.Profile()
    caller_profile = cProfile.Profile()
    undo = profile_reactor(reactor_profile)
    try:
        with ClientProcess() as clients:
            context = Context(clients, FULL)
            for _ in range(args.runs):
                if args.caller:
                    caller_profile.enable()
                values = scenario.run(by_name(scenario.subject), context)
                caller_profile.disable()
                print(f"{scenario.label}: {values}", file=sys.stderr)
    finally:
        undo()
    if args.dump:
        reactor_profile.dump_stats(args.dump)
    print(f"=== reactor thread, {scenario.label}, {args.runs} runs ===")
    pstats.Stats(reactor_profile).sort_stats(args.sort).print_stats(args.lines)
    if args.caller:
        print(f"=== calling thread, {scenario.label} ===")
        pstats.Stats(caller_profile).sort_stats(args.sort).print_stats(args.lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
