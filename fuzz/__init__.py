"""Long fuzz campaigns (``nox -s fuzz -- <seconds>``); see conftest.py."""
