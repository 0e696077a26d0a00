"""The command line: ``python -m selectserver serve`` as a real subprocess, and its parsing."""

from __future__ import annotations

import http.client
import re
import select
import shutil
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from conftest import exchange

from selectserver import (
    HALF_CLOSE,
    HANGUP,
    RECEIVE,
    RESET,
    STALL,
    CommandServer,
    Delay,
    Expect,
    ReadUntil,
)
from selectserver.__main__ import main, parse_step

#: Seconds any subprocess may take to print its address or to finish.
PROCESS_TIMEOUT = 20.0


@contextmanager
def serving(*steps: str) -> Iterator[tuple[subprocess.Popen[str], tuple[str, int]]]:
    """Run ``serve --once --port 0 STEP...``; yield the process and the address it printed."""
    argv = [sys.executable, "-m", "selectserver", "serve", "--once", "--port", "0", *steps]
    with subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as proc:
        try:
            assert proc.stdout is not None
            ready, _, _ = select.select([proc.stdout], [], [], PROCESS_TIMEOUT)
            assert ready, "the server printed no address"
            line = proc.stdout.readline()
            found = re.search(r"serving on http://([\d.]+):(\d+)", line)
            assert found, line
            yield proc, (found[1], int(found[2]))
        finally:
            if proc.poll() is None:
                proc.kill()


def test_serve_once_prints_the_transcript_and_exits_0() -> None:
    with serving("RECEIVE", r"HTTP/1.0 200 OK\r\n\r\nhi") as (proc, address):
        assert exchange(address, b"GET /x HTTP/1.0\r\n\r\n") == b"HTTP/1.0 200 OK\r\n\r\nhi"
        out, err = proc.communicate(timeout=PROCESS_TIMEOUT)
    assert proc.returncode == 0, err
    assert re.search(r"^connection 0 from 127\.0\.0\.1:\d+: completed$", out, re.M), out
    assert r"<- b'GET /x HTTP/1.0\r\n\r\n'" in out
    assert r"-> b'HTTP/1.0 200 OK\r\n\r\nhi'" in out


def test_demo_script_answers_http_client() -> None:
    with serving() as (proc, address):
        conn = http.client.HTTPConnection(*address, timeout=5)
        try:
            conn.request("GET", "/anything")
            response = conn.getresponse()
            assert response.status == 200
            assert response.read() == b"hello from selectserver\n"
        finally:
            conn.close()
        out, err = proc.communicate(timeout=PROCESS_TIMEOUT)
    assert proc.returncode == 0, err
    assert "GET /anything" in out


@pytest.mark.skipif(shutil.which("selectserver") is None, reason="console script not installed")
def test_console_script_help() -> None:
    done = subprocess.run(
        ["selectserver", "--help"], capture_output=True, text=True, timeout=PROCESS_TIMEOUT
    )
    assert done.returncode == 0
    assert "serve" in done.stdout


def test_serve_help_explains_the_steps(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["serve", "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for word in ("RECEIVE", "HANGUP", "RESET", "HALF_CLOSE", "STALL", "until:", "expect:"):
        assert word in out
    assert "delay:SECONDS" in out


@pytest.mark.parametrize(
    ("word", "step"),
    [
        ("RECEIVE", RECEIVE),
        ("20", 20),
        ("HANGUP", HANGUP),
        ("BREAK", HANGUP),
        ("RESET", RESET),
        ("HALF_CLOSE", HALF_CLOSE),
        ("STALL", STALL),
        (r"until:\r\n\r\n", ReadUntil(b"\r\n\r\n")),
        ("expect:GET", Expect("GET")),
        ("delay:0.5", Delay(0.5)),
        ("text:RECEIVE", b"RECEIVE"),
        ("text:42", b"42"),
        (r"hello\r\n", b"hello\r\n"),
        ("caf\u00e9", "caf\u00e9".encode()),
    ],
)
def test_parse_step(word: str, step: object) -> None:
    assert parse_step(word) == step


@pytest.mark.parametrize(
    ("word", "data"), [(r"expect:\bGET\b", b"GET /"), (r"expect:1\.\d", b"1.1")]
)
def test_parse_step_keeps_regex_escapes(word: str, data: bytes) -> None:
    step = parse_step(word)
    assert isinstance(step, Expect)
    assert step.regex.search(data)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["serve", "delay:soon"], "could not convert string to float"),
        (["serve", "until:"], "until:"),
        (["serve", "expect:("], "expect:("),
        (["serve", "HANGUP", "RECEIVE"], "no step can follow HANGUP"),
        (["serve", "--port", "70000"], "port"),
        (["serve", "--host", "192.0.2.1"], "error"),
        (["serve", "--bogus"], "unrecognized arguments"),
        ([], "required"),
    ],
)
def test_bad_arguments_exit_2_with_a_message(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse's own errors
        code = exc.code  # type: ignore[assignment]
    assert code == 2
    assert message in capsys.readouterr().err


def test_port_in_use_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    with CommandServer([], verbose=False) as srv:
        assert main(["serve", "--port", str(srv.port)]) == 2
    assert "in use" in capsys.readouterr().err
