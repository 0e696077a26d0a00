"""What the fuzz targets share: the "fuzz" profile, the budget, and the Campaign runner."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from hypothesis import HealthCheck, settings

__all__ = ["BUDGET", "FUZZ", "Campaign"]

# The campaigns reuse tests/: its checks (_checks.py) and the reactor state machine.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

settings.register_profile(
    "fuzz",
    max_examples=100,  # one batch; a campaign runs as many batches as its budget allows
    deadline=None,
    suppress_health_check=list(HealthCheck),
    print_blob=True,
)
#: The fuzz profile, as a decorator for the targets' ``@given`` functions.
FUZZ = settings.get_profile("fuzz")

#: The whole campaign's budget in seconds (shared by the targets); 60 unless told.
BUDGET = float(os.environ.get("SELECTSERVER_FUZZ_SECONDS", "60"))


@dataclass
class Campaign:
    """One target's share of the budget, and what it ran."""

    name: str
    seconds: float
    examples: int = 0
    batches: int = 0
    elapsed: float = 0.0

    def tick(self) -> None:
        """Count one example (call it first thing in the ``@given`` function)."""
        self.examples += 1

    def run(self, batch: Callable[[], None]) -> None:
        """Run ``batch`` (a Hypothesis test) until this campaign's time is spent (once at least)."""
        started = time.monotonic()
        while self.batches == 0 or time.monotonic() - started < self.seconds:
            batch()
            self.batches += 1
            self.elapsed = time.monotonic() - started
