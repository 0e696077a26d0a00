"""Hypothesis profiles for selectserver's property and stateful tests.

Pick one with the environment variable ``SELECTSERVER_HYPOTHESIS_PROFILE``:

* ``ci`` (the default): 50 examples, derandomized (the same examples every run), no database;
* ``dev``: 200 random examples, failures saved in ``.hypothesis/`` and replayed first;
* ``thorough``: 1000 random examples, for a longer look before a release.

The profile is applied to these tests only (``@SETTINGS``), never loaded globally, so other
Hypothesis tests in the same run keep their own settings. ``fuzz/`` has its own "fuzz" profile.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

__all__ = ["PROFILE", "SETTINGS"]

_BASE = settings(
    deadline=None,  # real sockets on shared machines: timing varies, correctness does not
    suppress_health_check=[HealthCheck.too_slow],
    print_blob=True,
)
settings.register_profile("ci", _BASE, max_examples=50, derandomize=True, database=None)
settings.register_profile("dev", _BASE, max_examples=200)
settings.register_profile("thorough", _BASE, max_examples=1000)

PROFILE = os.environ.get("SELECTSERVER_HYPOTHESIS_PROFILE", "ci")
#: The chosen profile, as a decorator: ``@SETTINGS`` above ``@given``.
SETTINGS = settings.get_profile(PROFILE)
