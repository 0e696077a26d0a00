"""The command line: ``python -m selectserver serve`` as a real subprocess, and its parsing."""

from __future__ import annotations

import http.client
import json
import os
import re
import select
import shutil
import ssl
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from conftest import exchange

from selectserver import (
    HALF_CLOSE,
    HANGUP,
    RECEIVE,
    RESET,
    STALL,
    CommandServer,
    ConnectionRecord,
    Delay,
    Expect,
    Outcome,
    ReadUntil,
)
from selectserver.__main__ import format_transcript, load_script, main, parse_step

#: Seconds any subprocess may take to print its address or to finish.
PROCESS_TIMEOUT = 20.0


@contextmanager
def serving(*args: str) -> Iterator[tuple[subprocess.Popen[str], tuple[str, int]]]:
    """Run ``serve --once --port 0 ARG...``; yield the process and the address it printed."""
    argv = [sys.executable, "-m", "selectserver", "serve", "--once", "--port", "0", *args]
    with subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as proc:
        try:
            found = re.search(r"serving on https?://([\d.]+):(\d+)", read_line(proc))
            assert found
            yield proc, (found[1], int(found[2]))
        finally:
            if proc.poll() is None:
                proc.kill()


def read_line(proc: subprocess.Popen[str]) -> str:
    """The next line the process prints, waiting at most PROCESS_TIMEOUT for each byte.

    It reads the pipe's file descriptor a byte at a time, leaving nothing in ``proc.stdout``'s
    buffer, where ``select`` would not see it, and the rest for ``communicate()``.
    """
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    line = b""
    while not line.endswith(b"\n"):
        ready, _, _ = select.select([fd], [], [], PROCESS_TIMEOUT)
        assert ready, f"the server printed no whole line, only {line!r}"
        byte = os.read(fd, 1)
        assert byte, f"the server exited after printing {line!r}"
        line += byte
    return line.decode()


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


def test_serve_tls_prints_the_ca_a_client_can_trust() -> None:
    pytest.importorskip("trustme")
    with serving("--tls") as (proc, address):
        found = re.search(
            r"CA certificate: (\S+) \(e\.g\. curl --cacert (\S+) https://", read_line(proc)
        )
        assert found
        assert found[1] == found[2]
        assert Path(found[1]).read_text().startswith("-----BEGIN CERTIFICATE-----")
        context = ssl.create_default_context(cafile=found[1])  # verifies the cert and the host
        conn = http.client.HTTPSConnection(*address, timeout=5, context=context)
        try:
            conn.request("GET", "/secure")
            assert conn.getresponse().read() == b"hello from selectserver\n"
        finally:
            conn.close()
        out, err = proc.communicate(timeout=PROCESS_TIMEOUT)
    assert proc.returncode == 0, err
    assert re.search(r"^connection 0 from 127\.0\.0\.1:\d+: completed$", out, re.M), out
    assert "GET /secure" in out


def test_serve_script_file(tmp_path: Path) -> None:
    script = tmp_path / "steps.json"
    # A JSON escape (\r\n in JSON) and a STEP escape (\\r\\n in JSON) mean the same bytes.
    script.write_text(
        r'["until:\\r\\n\\r\\n", "HTTP/1.0 200 OK\r\n", "Content-Length: 2\\r\\n\\r\\n", "ok"]'
    )
    with serving("--script", str(script)) as (proc, address):
        reply = exchange(address, b"GET /f HTTP/1.0\r\n\r\n")
        out, err = proc.communicate(timeout=PROCESS_TIMEOUT)
    assert reply == b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok"
    assert proc.returncode == 0, err
    assert r"<- b'GET /f HTTP/1.0\r\n\r\n'" in out


def test_load_script_reads_step_words_and_integers(tmp_path: Path) -> None:
    path = tmp_path / "steps.json"
    words = ["RECEIVE", "until:\\r\\n", "expect:\\d+", "delay:0.5", "text:HANGUP", "hi", "HANGUP"]
    path.write_text(json.dumps([20, *words]))
    assert load_script(str(path)) == [
        20,
        RECEIVE,
        ReadUntil(b"\r\n"),
        Expect(r"\d+"),
        Delay(0.5),
        b"HANGUP",
        b"hi",
        HANGUP,
    ]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("[RECEIVE]", "Expecting value: line 1 column 2"),
        ('{"steps": []}', "expected a JSON list of steps, got dict"),
        ('["RECEIVE", 3.5]', "script[1] = 3.5: expected a STEP word (a JSON string) or an integer"),
        ('["RECEIVE", true]', "script[1] = true: expected a STEP word"),
        ('["RECEIVE", null]', "script[1] = null: expected a STEP word"),
        ('["delay:soon"]', 'script[0] = "delay:soon": could not convert string to float'),
        ('["RECEIVE", 0]', "script[1] = 0: an int step reads at least that many bytes"),
        ('["HANGUP", "RECEIVE"]', "script[1] = RECEIVE: no step can follow HANGUP"),
    ],
)
def test_bad_script_file_exits_2_naming_the_file_and_element(
    content: str, message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "steps.json"
    path.write_text(content)
    assert main(["serve", "--script", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"selectserver: error: {path}: " in err
    assert message in err


def test_missing_script_file_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "absent.json"
    assert main(["serve", "--script", str(path)]) == 2
    assert f"{path}: [Errno 2] No such file or directory" in capsys.readouterr().err


def test_script_file_and_steps_are_exclusive(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "steps.json"
    path.write_text('["RECEIVE"]')
    with pytest.raises(SystemExit) as info:
        main(["serve", "--script", str(path), "RECEIVE"])
    assert info.value.code == 2
    assert "give --script FILE or STEP arguments, not both" in capsys.readouterr().err


def test_serve_help_explains_tls_and_script_files(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    out = capsys.readouterr().out
    assert "--tls" in out
    assert "--script FILE" in out
    assert "JSON list" in out


def test_transcript_previews_long_payloads_and_bounds_steps() -> None:
    record = ConnectionRecord(index=3, peer=("127.0.0.1", 4242))
    for n in range(30):
        record.add_received(b"%02d" % n + b"x" * 998, n)
    record.add_sent(memoryview(b"y" * 5000))
    record.end(Outcome.TIMED_OUT, "step 30 (RECEIVE): timed out", 0.0, 30)
    lines = format_transcript(record).splitlines()
    assert lines[0] == "connection 3 from 127.0.0.1:4242: timed out"
    shown = [line for line in lines if line.startswith("  <- b")]
    assert [line[7:9] for line in shown] == [
        *map("%02d".__mod__, range(10)),
        *map(str, range(20, 30)),
    ]
    assert all(line.endswith("... (1000 bytes)") and len(line) < 230 for line in shown)
    assert "  <- ... 10 more steps, 10000 bytes" in lines
    assert lines[-2] == f"  -> {b'y' * 200!r}... (5000 bytes)"
    assert lines[-1] == "  FAILED: step 30 (RECEIVE): timed out"
