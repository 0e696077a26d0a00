"""Developer sessions: ``nox -s tests``, ``lint``, ``typecheck``, ``fuzz``, ``bench``."""

from __future__ import annotations

import nox

nox.options.sessions = ["tests", "lint", "typecheck"]
nox.options.reuse_existing_virtualenvs = True

PYTHON = ["3.10", "3.11", "3.12", "3.13"]


def install(session: nox.Session, *extras: str) -> None:
    """Install selectserver (editable) with ``extras`` into the session's virtualenv."""
    target = f".[{','.join(extras)}]" if extras else "."
    session.install("-e", target)


@nox.session(python=PYTHON)
def tests(session: nox.Session) -> None:
    """Run the test suite (pass pytest arguments after --)."""
    install(session, "test")
    session.run("python", "-m", "pytest", *session.posargs)


@nox.session
def lint(session: nox.Session) -> None:
    """ruff check and ruff format --check."""
    session.install("ruff>=0.5")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


@nox.session
def typecheck(session: nox.Session) -> None:
    """mypy --strict on the package, tests, fuzz, benchmarks and this file."""
    install(session, "dev")
    session.run("mypy")


@nox.session
def bench(session: nox.Session) -> None:
    """Benchmark selectserver against threads/asyncio/rawselect (posargs: --quick, --markdown F)."""
    install(session)
    session.run("python", "-m", "benchmarks", *session.posargs)


@nox.session
def fuzz(session: nox.Session) -> None:
    """Long Hypothesis campaigns in fuzz/ (posargs: the time budget in seconds, default 600)."""
    install(session, "test")
    seconds = session.posargs[0] if session.posargs else "600"
    session.run("python", "-m", "pytest", "fuzz", "-q", env={"SELECTSERVER_FUZZ_SECONDS": seconds})
