"""The pytest plugin, tested the way a user's project uses it (pytester)."""

from __future__ import annotations

import http.cookiejar  # noqa: F401 - see below
import importlib.metadata
import re
import subprocess
import sys

import pytest

# pytester's in-process runs drop the modules they import from sys.modules, but not the attribute
# an import sets on the parent package: a later ``from http import cookiejar`` (requests.compat)
# would get the dropped module while ``from http.cookiejar import CookieJar`` gets a fresh one, and
# requests then fails ("You can only merge into CookieJar"). Imported here, it is imported once.

pytest_plugins = ["pytester"]

#: What a user's conftest says while the entry point is not installed. ``-p no:selectserver``
#: keeps an installed entry point from registering the same module a second time.
CONFTEST = 'pytest_plugins = ["selectserver.plugin"]'
NO_ENTRY_POINT = ("-p", "no:selectserver")


@pytest.fixture
def user_project(pytester: pytest.Pytester) -> pytest.Pytester:
    pytester.makeconftest(CONFTEST)
    return pytester


def test_factory_starts_servers_and_closes_them_after_the_test(
    user_project: pytest.Pytester,
) -> None:
    user_project.makepyfile(
        """
        import socket
        from selectserver import RECEIVE, OneShotServer

        made = []

        def test_uses_servers(command_server):
            server = command_server([RECEIVE, b"hi"], verbose=False, timeout=5)
            other = command_server(scripts=[[b"one"], [b"two"]], verbose=False)
            once = command_server(b"x", server_class=OneShotServer, verbose=False)
            made.extend([server, other, once])
            with socket.create_connection(server.address, timeout=5) as sock:
                sock.sendall(b"?")
                assert sock.recv(10) == b"hi"
            assert type(once) is OneShotServer

        def test_they_are_closed_now():
            assert len(made) == 3
            for server in made:  # the port itself may already serve another process
                assert "closed" in repr(server)
        """
    )
    user_project.runpytest(*NO_ENTRY_POINT).assert_outcomes(passed=2)


def test_unmet_expectations_fail_the_test_that_made_them(user_project: pytest.Pytester) -> None:
    user_project.makepyfile(
        """
        import socket
        from selectserver import Expect

        def test_client_sends_the_wrong_thing(command_server):
            server = command_server([Expect(b"GET /")], verbose=False)
            with socket.create_connection(server.address, timeout=5) as sock:
                sock.sendall(b"POST /")
            server.wait_for_connections(1)

        def test_innocent_bystander(command_server):
            command_server([], verbose=False)
        """
    )
    result = user_project.runpytest(*NO_ENTRY_POINT)
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(
        [
            "*test_client_sends_the_wrong_thing*",
            "*selectserver: server-side failures*",
            "*Expect(pattern=b'GET /')*before the pattern matched*",
        ]
    )


def test_a_failing_test_reports_its_servers_too(user_project: pytest.Pytester) -> None:
    user_project.makepyfile(
        """
        import socket
        from selectserver import Expect

        def test_fails_first(command_server):
            server = command_server([Expect(b"never")], verbose=False)
            with socket.create_connection(server.address, timeout=5) as sock:
                sock.sendall(b"something else")
            server.wait_for_connections(1)
            assert False, "the client's own failure"
        """
    )
    result = user_project.runpytest(*NO_ENTRY_POINT)
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(
        ["*the client's own failure*", "*Captured selectserver call*", "*Expect(pattern=b'never')*"]
    )


def test_a_failing_test_shows_each_servers_transcripts(user_project: pytest.Pytester) -> None:
    user_project.makepyfile(
        """
        import socket
        from selectserver import RECEIVE, RESET

        def test_client_fails(command_server):
            ok = command_server([RECEIVE, b"pong"], verbose=False, timeout=5)
            broken = command_server([RECEIVE, RESET], verbose=False, timeout=5)
            command_server([], verbose=False)  # never connected to
            print("urls", ok.url, broken.url)
            for server in (ok, broken):
                with socket.create_connection(server.address, timeout=5) as sock:
                    sock.sendall(b"ping " + b"x" * 1000)
                    try:
                        sock.recv(10)
                    except ConnectionResetError:
                        pass
                server.wait_for_connections(1)
            assert False, "the client got it wrong"
        """
    )
    result = user_project.runpytest(*NO_ENTRY_POINT)
    result.assert_outcomes(failed=1)
    out = result.stdout.str()
    found = re.search(r"urls (http://\S+) (http://\S+)", out)
    assert found, out
    ok_url, broken_url = found[1], found[2]
    result.stdout.fnmatch_lines(
        [
            f"*Captured selectserver {ok_url} call*",
            "connection 0 from 127.0.0.1:*: completed",
            "  <- b'ping xxx*'... (1005 bytes)",
            "  -> b'pong'",
            f"*Captured selectserver {broken_url} call*",
            "connection 0 from 127.0.0.1:*: reset",
            "*Captured selectserver http://127.0.0.1:* call*",
            "no connections",
        ]
    )
    assert "x" * 201 not in out  # payloads are previewed, not printed whole


def test_a_test_failing_only_server_side_shows_the_transcript(
    user_project: pytest.Pytester,
) -> None:
    user_project.makepyfile(
        """
        import socket
        from selectserver import Expect

        def test_sends_the_wrong_greeting(command_server):
            server = command_server([Expect(b"HELLO"), b"hi"], verbose=False, timeout=5)
            with socket.create_connection(server.address, timeout=5) as sock:
                sock.sendall(b"GOODBYE")
            server.wait_for_connections(1)
        """
    )
    result = user_project.runpytest(*NO_ENTRY_POINT)
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(
        [
            "*Captured selectserver http://127.0.0.1:* call*",
            "connection 0 from 127.0.0.1:*: peer closed",
            "  <- b'GOODBYE'",
            "  FAILED: step 0 (Expect(pattern=b'HELLO')): *",
        ]
    )


def test_a_failed_setup_shows_the_transcripts_of_servers_made_so_far(
    user_project: pytest.Pytester,
) -> None:
    user_project.makepyfile(
        """
        import socket
        import pytest
        from selectserver import RECEIVE

        @pytest.fixture
        def connected(command_server):
            server = command_server([RECEIVE, b"welcome"], verbose=False, timeout=5)
            with socket.create_connection(server.address, timeout=5) as sock:
                sock.sendall(b"login")
                sock.recv(10)
            raise RuntimeError("setup broke")

        def test_never_runs(connected):
            pass
        """
    )
    result = user_project.runpytest(*NO_ENTRY_POINT)
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(
        ["*setup broke*", "*Captured selectserver http://127.0.0.1:* setup*", "  <- b'login'"]
    )


def test_a_failed_teardown_shows_the_transcripts(user_project: pytest.Pytester) -> None:
    user_project.makepyfile(
        """
        import socket
        import pytest
        from selectserver import Expect

        @pytest.fixture
        def checked_on_the_way_out(command_server):
            yield
            server = command_server([Expect(b"bye")], verbose=False, timeout=5)
            with socket.create_connection(server.address, timeout=5) as sock:
                sock.sendall(b"later")
            server.wait_for_connections(1)

        def test_passes(checked_on_the_way_out):
            pass
        """
    )
    result = user_project.runpytest(*NO_ENTRY_POINT)
    result.assert_outcomes(passed=1, errors=1)
    result.stdout.fnmatch_lines(
        [
            "*ERROR at teardown of test_passes*",
            "*Captured selectserver http://127.0.0.1:* teardown*",
            "  <- b'later'",
            "  FAILED: step 0 (Expect(pattern=b'bye')): *",
        ]
    )


def test_a_passing_test_shows_no_transcript(user_project: pytest.Pytester) -> None:
    user_project.makepyfile(
        """
        import socket
        from selectserver import RECEIVE

        def test_passes(command_server):
            server = command_server([RECEIVE, b"pong"], verbose=False, timeout=5)
            with socket.create_connection(server.address, timeout=5) as sock:
                sock.sendall(b"ping")
                assert sock.recv(10) == b"pong"
            print("the test's own output")
        """
    )
    result = user_project.runpytest("-rA", *NO_ENTRY_POINT)  # -rA shows passing tests' sections
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["*Captured stdout call*", "the test's own output"])
    assert "Captured selectserver" not in result.stdout.str()
    assert "connection 0" not in result.stdout.str()


def test_servers_made_in_other_fixtures_are_checked(user_project: pytest.Pytester) -> None:
    user_project.makepyfile(
        """
        import socket
        import pytest
        from selectserver import Expect

        @pytest.fixture
        def api(command_server):
            return command_server([Expect(b"hello")], verbose=False, timeout=5)

        def test_says_goodbye(api):
            with socket.create_connection(api.address, timeout=5) as sock:
                sock.sendall(b"goodbye")
            api.wait_for_connections(1)
        """
    )
    result = user_project.runpytest(*NO_ENTRY_POINT)
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*before the pattern matched; this step got b'goodbye'*"])


def test_bad_server_class(user_project: pytest.Pytester) -> None:
    user_project.makepyfile(
        """
        import pytest

        def test_bad(command_server):
            with pytest.raises(TypeError, match="server_class must be a CommandServer"):
                command_server([], server_class=dict)
        """
    )
    user_project.runpytest(*NO_ENTRY_POINT).assert_outcomes(passed=1)


def test_fixture_works_under_xdist(user_project: pytest.Pytester) -> None:
    """Each worker has its own reactor; OS-chosen ports never collide."""
    user_project.makepyfile(
        """
        import socket
        import pytest
        from selectserver import RECEIVE

        @pytest.mark.parametrize("n", range(8))
        def test_many(command_server, n):
            servers = [command_server([RECEIVE, b"%d" % n], verbose=False) for _ in range(5)]
            for server in servers:
                with socket.create_connection(server.address, timeout=5) as sock:
                    sock.sendall(b"?")
                    assert sock.recv(10) == b"%d" % n
        """
    )
    result = user_project.runpytest_subprocess("-n", "2", *NO_ENTRY_POINT)
    result.assert_outcomes(passed=8)


#: The README's "Fuzz your client" example, as a user's test module.
FUZZ_YOUR_CLIENT = """
import requests
from hypothesis import HealthCheck, given, settings

from selectserver.strategies import http_responses


FIXTURE_IN_GIVEN = [HealthCheck.function_scoped_fixture]  # fine: a factory, not per-example state


@settings(max_examples=30, deadline=None, suppress_health_check=FIXTURE_IN_GIVEN)
@given(response=http_responses())
def test_client_never_hangs_or_corrupts(command_server, response):
    server = command_server(response.script, verbose=False, timeout=5)
    try:
        reply = requests.get(server.url, timeout=5)
    except requests.RequestException:
        assert response.kind != "valid"  # only a broken response may fail the request
    else:
        if response.kind == "valid":
            assert (reply.status_code, reply.content) == (response.status, response.body)
"""


def test_fuzz_your_client_example(user_project: pytest.Pytester) -> None:
    user_project.makepyfile(FUZZ_YOUR_CLIENT)
    user_project.runpytest(*NO_ENTRY_POINT).assert_outcomes(passed=1)


def test_importing_the_plugin_starts_nothing() -> None:
    """No reactor thread and no Hypothesis, as pytest imports the plugin in every session."""
    code = (
        "import sys, threading, selectserver.plugin, selectserver.reference\n"
        "assert 'hypothesis' not in sys.modules, 'hypothesis imported'\n"
        "assert threading.active_count() == 1, threading.enumerate()\n"
        "assert not selectserver.statistics().running\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def _entry_point() -> importlib.metadata.EntryPoint | None:
    found = importlib.metadata.entry_points(group="pytest11", name="selectserver")
    return next(iter(found), None)


@pytest.mark.skipif(_entry_point() is None, reason="the pytest11 entry point is not installed")
def test_entry_point_is_installed(pytester: pytest.Pytester) -> None:
    """Installed, the plugin needs no conftest line (reinstall after changing pyproject.toml)."""
    entry_point = _entry_point()
    assert entry_point is not None
    assert entry_point.value == "selectserver.plugin"
    pytester.makepyfile(
        """
        def test_fixture_is_there(command_server):
            assert command_server([], verbose=False).port > 0
        """
    )
    pytester.runpytest().assert_outcomes(passed=1)
