"""The pytest plugin: a ``command_server`` fixture that starts servers and checks them after.

Registered with the ``pytest11`` entry point, so installing selectserver makes the fixture
available; without the entry point, add ``pytest_plugins = ["selectserver.plugin"]`` to a
conftest. ::

    def test_client(command_server):
        server = command_server([RECEIVE, b"HTTP/1.0 200 OK\\r\\n\\r\\nhi"])
        assert requests.get(server.url).text == "hi"

Every server the fixture made is closed right after the test function returns, then its
``check()`` runs, so a server-side failure (an unmatched ``Expect``, a timeout) fails the test
that made the server. If the test already failed, the servers' failures are added to its report
instead. The report of a failing test also gets a section per server, ``selectserver <url>``,
with the transcript of each of its connections (bytes both ways, outcome, failure; long
payloads cut short). Importing this module starts no reactor and imports no Hypothesis.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Generator, Iterator
from typing import Protocol

import pytest

from .__main__ import format_transcript
from ._servers import CommandServer

__all__ = ["CommandServerFactory", "command_server"]


class CommandServerFactory(Protocol):
    """What the ``command_server`` fixture is: call it to start a server."""

    def __call__(
        self,
        commands: object = None,
        *,
        server_class: type[CommandServer] = CommandServer,
        **kwargs: object,
    ) -> CommandServer:
        """Start ``server_class(commands, **kwargs)``; it is closed and checked after the test.

        ``server_class`` may be CommandServer (the default), OneShotServer, AsyncioCommandServer
        or a subclass; ``kwargs`` go to it unchanged (``scripts=``, ``timeout=``, ``verbose=``...).
        """


class _Servers:
    """The servers one test made, closed and checked once."""

    def __init__(self) -> None:
        self.servers: list[CommandServer] = []  # not finished yet
        self.made: list[CommandServer] = []  # all of them, for the transcripts
        self.reported = False  # whether a failed report of this test has the transcripts

    def start(
        self,
        commands: object = None,
        *,
        server_class: type[CommandServer] = CommandServer,
        **kwargs: object,
    ) -> CommandServer:
        if not (isinstance(server_class, type) and issubclass(server_class, CommandServer)):
            raise TypeError(f"server_class must be a CommandServer subclass, got {server_class!r}")
        factory: Callable[..., CommandServer] = server_class
        server = factory(commands, **kwargs)
        self.servers.append(server)
        self.made.append(server)
        return server

    def finish(self) -> list[str]:
        """Close every server not yet finished and return what their ``check()`` said."""
        servers, self.servers = self.servers, []
        problems: list[str] = []
        for server in servers:
            try:
                server.close()
                server.check()
            except (AssertionError, RuntimeError, TimeoutError) as exc:
                problems.append(f"{server!r}: {exc}")
        return problems


_KEY = pytest.StashKey[_Servers]()


def _report(problems: list[str]) -> str:
    return "selectserver: server-side failures\n" + "\n".join(problems)


#: Connections a server's section shows at most; the others are counted by outcome.
MAX_REPORTED_CONNECTIONS = 20


def _format_server(server: CommandServer) -> str:
    """The transcripts of a server's connections, for a failing test's report."""
    records = list(server.connections)
    if not records:
        return "no connections"
    parts = [format_transcript(record) for record in records[:MAX_REPORTED_CONNECTIONS]]
    rest = records[MAX_REPORTED_CONNECTIONS:]
    if rest:
        outcomes = Counter(r.outcome.value if r.outcome else "running" for r in rest)
        counts = ", ".join(f"{n} {outcome}" for outcome, n in sorted(outcomes.items()))
        parts.append(f"... and {len(rest)} more connections: {counts}")
    return "\n".join(parts)


@pytest.fixture
def command_server(request: pytest.FixtureRequest) -> Iterator[CommandServerFactory]:
    """A factory that starts a CommandServer; all are closed and checked after the test.

    ``command_server([RECEIVE, "hi"], timeout=5)`` returns a started server. Pass
    ``server_class=OneShotServer`` (or AsyncioCommandServer, with ``loop=``) for another kind.
    """
    servers = request.node.stash.setdefault(_KEY, _Servers())
    yield servers.start
    problems = servers.finish()  # servers made after the call phase, e.g. by other fixtures
    if problems:
        pytest.fail(_report(problems), pytrace=False)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Generator[None, object, object]:
    """Close and check the test's servers as soon as it returns, so failures fail the test."""
    try:
        result = yield
    except BaseException:
        servers = item.stash.get(_KEY, None)
        problems = servers.finish() if servers is not None else []
        if problems:
            item.add_report_section("call", "selectserver", _report(problems))
        raise
    servers = item.stash.get(_KEY, None)
    problems = servers.finish() if servers is not None else []
    if problems:
        pytest.fail(_report(problems), pytrace=False)
    return result


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """Give the first failed report of a test a section per server it made: its transcripts."""
    report = yield
    servers = item.stash.get(_KEY, None)
    if servers is None or not servers.made or not report.failed or servers.reported:
        return report
    servers.reported = True
    problems = servers.finish()  # after a failed setup the servers still run: end them now
    if problems:
        report.sections.append((f"Captured selectserver {call.when}", _report(problems)))
    for server in servers.made:
        title = f"Captured selectserver {server.url} {call.when}"
        report.sections.append((title, _format_server(server)))
    return report
