"""Fuzz campaigns: the property tests' invariants, run for a time budget on bigger inputs.

Run with ``nox -s fuzz -- <seconds>`` or ``SELECTSERVER_FUZZ_SECONDS=<seconds> pytest fuzz``.
The budget is shared equally by the collected targets. Each target runs Hypothesis again and
again (batches of the "fuzz" profile's ``max_examples``, each from a fresh random seed) until its
share is spent, then the session ends with a table of examples run per target. A failure is
shrunk, saved in ``.hypothesis/`` and replayed first by the next campaign.
"""

from __future__ import annotations

import pytest

from ._campaign import BUDGET, Campaign

_campaigns: list[Campaign] = []
_targets = 1


def pytest_collection_finish(session: pytest.Session) -> None:
    """Share the budget among the selected targets; time each out at its share plus a margin."""
    global _targets
    _targets = max(1, len(session.items))
    for item in session.items:
        item.add_marker(pytest.mark.timeout(BUDGET / _targets + 300))


@pytest.fixture
def campaign(request: pytest.FixtureRequest) -> Campaign:
    """This target's campaign: its share of ``SELECTSERVER_FUZZ_SECONDS``."""
    found = Campaign(request.node.name, BUDGET / _targets)
    _campaigns.append(found)
    return found


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not _campaigns:
        return
    terminalreporter.section("fuzz campaigns")
    for found in _campaigns:
        terminalreporter.write_line(
            f"{found.name}: {found.examples} examples in {found.batches} batches, "
            f"{found.elapsed:.0f} s"
        )
    total = sum(found.examples for found in _campaigns)
    terminalreporter.write_line(f"total: {total} examples in {BUDGET:.0f} s of budget")
