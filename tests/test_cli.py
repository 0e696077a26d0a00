"""The command line: ``python -m selectserver serve``, ``proxy`` and ``replay`` as real
subprocesses, and their parsing."""

from __future__ import annotations

import http.client
import json
import os
import re
import select
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from conftest import HAS_IPV6, connect, exchange, read_exactly

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
from selectserver.__main__ import (
    format_proxy_transcript,
    format_transcript,
    load_script,
    main,
    parse_step,
    parse_upstream,
)
from selectserver._faults import Bandwidth, Latency, ResetPeer
from selectserver._recording import ProxyRecord, load_recording

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


# ---- proxy and replay ------------------------------------------------------------------------


@contextmanager
def running(
    argv: list[str], pattern: str
) -> Iterator[tuple[subprocess.Popen[str], tuple[str, int]]]:
    """Run ``selectserver ARGV...``; yield it and the address its first line gives (``pattern``
    matches the host and port in it). It is killed on exit if it still runs."""
    argv = [sys.executable, "-m", "selectserver", *argv]
    env = {**os.environ, "PYTHONFAULTHANDLER": "1"}  # SIGABRT prints every thread's stack
    with subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    ) as proc:
        try:
            line = read_line(proc)
            found = re.search(pattern, line)
            assert found, line
            yield proc, (found[1].strip("[]"), int(found[2]))
        finally:
            if proc.poll() is None:
                proc.kill()


_PROXYING = r"^selectserver: proxying (\S+):(\d+) -> "
_SERVING = r"^selectserver: serving on http://([\d.]+):(\d+) "


@contextmanager
def proxying(upstream: str, *args: str) -> Iterator[tuple[subprocess.Popen[str], tuple[str, int]]]:
    """Run ``proxy UPSTREAM ARG...``; yield the process and the address it listens on."""
    with running(["proxy", upstream, "--port", "0", *args], _PROXYING) as started:
        yield started


def stop(proc: subprocess.Popen[str], signum: int = signal.SIGINT) -> tuple[str, str]:
    """Send ``signum``; what the process prints to stdout and stderr until it exits."""
    proc.send_signal(signum)
    try:
        return proc.communicate(timeout=PROCESS_TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGABRT)
        out, err = proc.communicate(timeout=PROCESS_TIMEOUT)
        raise AssertionError(
            f"still running {PROCESS_TIMEOUT} s after {signum}:\n{out}{err}"
        ) from None


def read_until(proc: subprocess.Popen[str], prefix: str) -> list[str]:
    """The lines the process prints up to and with the first that starts with ``prefix``."""
    lines = [read_line(proc)]
    while not lines[-1].startswith(prefix):
        lines.append(read_line(proc))
    return lines


@pytest.fixture
def pong() -> Iterator[CommandServer]:
    """The upstream of the proxy tests: reads what arrives, answers ``pong``, hangs up."""
    with CommandServer([RECEIVE, "pong"], verbose=False) as server:
        yield server


def test_proxy_relays_to_its_upstream_and_prints_transcripts(pong: CommandServer) -> None:
    upstream = f"127.0.0.1:{pong.port}"
    with proxying(upstream) as (proc, address):
        assert exchange(address, b"ping") == b"pong"
        transcript = read_until(proc, "  server -> client")  # the connection has ended
        out, err = stop(proc)
    assert proc.returncode == 0, err
    assert re.match(r"connection 0 from 127\.0\.0\.1:\d+: completed$", transcript[0])
    assert transcript[1:] == [
        "  client -> server: 4 bytes, then eof: b'ping'\n",
        "  server -> client: 4 bytes, then eof: b'pong'\n",
    ]
    assert out.endswith("selectserver: stopped\n")
    assert pong.received == [b"ping"]


@pytest.mark.parametrize("family", ["ipv6", "unix"])
def test_proxy_upstream_ipv6_and_unix_socket(family: str, tmp_path: Path) -> None:
    if family == "ipv6":
        if not HAS_IPV6:
            pytest.skip("no IPv6 loopback")
        server = CommandServer([RECEIVE, "pong"], "::1", verbose=False)
        upstream = f"[::1]:{server.port}"
    else:
        if not hasattr(socket, "AF_UNIX"):
            pytest.skip("no Unix-domain sockets")
        server = CommandServer([RECEIVE, "pong"], verbose=False, path=str(tmp_path / "up.sock"))
        upstream = str(tmp_path / "up.sock")
    with server, proxying(upstream) as (proc, address):
        assert exchange(address, b"ping") == b"pong"
        _, err = stop(proc)
        assert server.received == [b"ping"]
    assert proc.returncode == 0, err


def test_proxy_prints_its_ipv6_address_in_brackets(pong: CommandServer) -> None:
    if not HAS_IPV6:
        pytest.skip("no IPv6 loopback")
    with proxying(f"127.0.0.1:{pong.port}", "--host", "::1") as (proc, address):
        assert address[0] == "::1"
        assert exchange(address, b"ping") == b"pong"
        stop(proc)
    assert proc.returncode == 0


def test_proxy_latency_delays_the_reply(pong: CommandServer) -> None:
    with proxying(f"127.0.0.1:{pong.port}", "--latency", "0.2") as (proc, address):
        started = time.monotonic()
        assert exchange(address, b"ping") == b"pong"
        assert time.monotonic() - started >= 0.2
        out, err = stop(proc)
    assert proc.returncode == 0, err
    assert f"  faults: {Latency(0.2)!r}\n" in out


def test_proxy_reset_after_0_resets_the_client(pong: CommandServer) -> None:
    with proxying(f"127.0.0.1:{pong.port}", "--reset-after", "0") as (proc, address):
        with connect(address) as sock:
            sock.sendall(b"ping")
            try:
                assert sock.recv(100) == b""  # a reset can reach the client as an EOF
            except ConnectionResetError:
                pass
        transcript = read_until(proc, "  faults: ")
        _, err = stop(proc)
    assert proc.returncode == 0, err
    assert re.match(r"connection 0 from 127\.0\.0\.1:\d+: reset$", transcript[0]), transcript
    assert "  server -> client: 4 bytes (0 passed on), then reset by proxy: b'pong'\n" in transcript
    assert transcript[-1] == f"  faults: {ResetPeer(0)!r}\n"


def test_proxy_fault_options_compose_in_the_direction_given(pong: CommandServer) -> None:
    args = ["--latency", "0", "--jitter", "0.01", "--bandwidth", "1e6", "--direction", "both"]
    with proxying(f"127.0.0.1:{pong.port}", *args) as (proc, address):
        assert exchange(address, b"ping") == b"pong"
        transcript = read_until(proc, "  faults: ")
        stop(proc)
    assert proc.returncode == 0
    faults = [Latency(0.0, jitter=0.01, direction="both"), Bandwidth(1e6, direction="both")]
    assert transcript[-1] == f"  faults: {', '.join(map(repr, faults))}\n"


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_proxy_record_saves_on_stop_and_replay_serves_it(
    signum: int, pong: CommandServer, tmp_path: Path
) -> None:
    path = tmp_path / "rec.json"
    with proxying(f"127.0.0.1:{pong.port}", "--record", str(path)) as (proc, address):
        assert exchange(address, b"ping") == b"pong"
        read_until(proc, "  server -> client")
        assert not path.exists()
        out, err = stop(proc, signum)
    assert proc.returncode == 0, err
    assert f"selectserver: saved 1 connection(s) to {path}\n" in out
    assert load_recording(path) == [[4, b"pong", HANGUP]]
    with running(["replay", str(path), "--port", "0", "--once"], _SERVING) as (proc, address):
        assert read_line(proc) == (
            f"selectserver: replaying the 1 connection(s) recorded in {path} "
            "(later connections replay the last)\n"
        )
        assert exchange(address, b"ping") == b"pong"
        out, err = proc.communicate(timeout=PROCESS_TIMEOUT)
    assert proc.returncode == 0, err
    assert re.search(r"^connection 0 from 127\.0\.0\.1:\d+: hung up$", out, re.M), out
    assert "  <- b'ping'\n  -> b'pong'\n" in out


def test_proxy_record_saves_live_connections_closed(tmp_path: Path) -> None:
    path = tmp_path / "rec.json"
    with (
        CommandServer([RECEIVE, "pong", RECEIVE], verbose=False) as upstream,
        proxying(f"127.0.0.1:{upstream.port}", "--record", str(path)) as (proc, address),
        connect(address) as sock,
    ):
        sock.sendall(b"pi")
        assert read_exactly(sock, 4) == b"pong"  # both ways passed; both sides still open
        out, err = stop(proc)
    assert proc.returncode == 0, err
    assert "  server -> client: 4 bytes, then closed by proxy: b'pong'\n" in out
    assert "  ended: the proxy was closed\n" in out
    assert load_recording(path) == [[2, b"pong", HANGUP]]


def test_proxy_max_record_warns_of_a_connection_replay_refuses(
    pong: CommandServer, tmp_path: Path
) -> None:
    path = tmp_path / "rec.json"
    args = ["--record", str(path), "--max-record", "6"]
    with proxying(f"127.0.0.1:{pong.port}", *args) as (proc, address):
        assert exchange(address, b"ping") == b"pong"
        read_until(proc, "  server -> client")
        out, err = stop(proc)
    assert proc.returncode == 0, err
    assert f"selectserver: saved 1 connection(s) to {path}\n" in out
    assert "connection 0 was not recorded in full (2 bytes past --max-record 6)" in err
    with pytest.raises(ValueError, match="not recorded in full"):
        load_recording(path)


def test_replay_serves_the_recorded_connections_in_turn(tmp_path: Path) -> None:
    path = tmp_path / "rec.json"
    connections = [
        {"index": k, "server_end": "eof", "unrecorded": 0, "upstream": up, "downstream": down}
        for k, (up, down) in enumerate(
            [
                ([{"at": 0.1, "data": "one"}], [{"at": 0.2, "data": "1"}]),
                ([{"at": 0.1, "data": "two"}], [{"at": 0.2, "data": "2"}]),
            ]
        )
    ]
    document = {"format": "selectserver-recording", "version": 1, "connections": connections}
    path.write_text(json.dumps(document))
    with running(["replay", str(path), "--port", "0"], _SERVING) as (proc, address):
        assert [exchange(address, m) for m in (b"one", b"two", b"two")] == [b"1", b"2", b"2"]
        out, err = stop(proc)
    assert proc.returncode == 0, err
    assert out.endswith("selectserver: stopped\n")


@pytest.mark.parametrize(
    ("text", "upstream"),
    [
        ("127.0.0.1:6379", ("127.0.0.1", 6379)),
        ("localhost:1", ("localhost", 1)),
        ("[::1]:6379", ("::1", 6379)),
        ("[fe80::1%eth0]:65535", ("fe80::1%eth0", 65535)),
        ("/run/redis.sock", "/run/redis.sock"),
        ("./a:1", "./a:1"),
    ],
)
def test_parse_upstream(text: str, upstream: object) -> None:
    assert parse_upstream(text) == upstream


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["proxy"], "the following arguments are required: UPSTREAM"),
        (["proxy", "localhost"], "'localhost': expected HOST:PORT, [IPv6]:PORT or a Unix socket"),
        (["proxy", ":80"], "expected HOST:PORT"),
        (["proxy", "[::1]"], "expected HOST:PORT"),
        (["proxy", "::1:6379"], "write an IPv6 address in brackets, e.g. [::1]:6379"),
        (["proxy", "h:0"], "the port must be 1 to 65535, got '0'"),
        (["proxy", "h:http"], "the port must be 1 to 65535"),
        (["proxy", "h:1", "--latency", "-1"], "argument --latency: expected a finite number >= 0"),
        (["proxy", "h:1", "--latency", "nan"], "argument --latency: expected a finite number"),
        (["proxy", "h:1", "--latency", "soon"], "argument --latency: expected a number"),
        (["proxy", "h:1", "--jitter", "0.1"], "--jitter needs --latency"),
        (
            ["proxy", "h:1", "--bandwidth", "0"],
            "argument --bandwidth: expected a finite number > 0",
        ),
        (["proxy", "h:1", "--reset-after", "-1"], "argument --reset-after: expected an integer"),
        (["proxy", "h:1", "--direction", "sideways"], "argument --direction: invalid choice"),
        (["proxy", "127.0.0.1:1", "--timeout", "0"], "timeout must be finite and > 0"),
        (["proxy", "127.0.0.1:1", "--port", "70000"], "port"),
        (["replay"], "the following arguments are required: FILE"),
    ],
)
def test_bad_proxy_and_replay_arguments_exit_2_with_a_message(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse's errors, with the subcommand's usage
        code, start = exc.code, f"usage: selectserver {argv[0]} "  # type: ignore[assignment]
    else:  # the proxy's own checks
        start = "selectserver: error: "
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith(start)
    assert message in err


@pytest.mark.parametrize("where", ["no/such/dir/rec.json", "."])
def test_proxy_record_to_an_unwritable_place_exits_2_at_once(
    where: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / where
    assert main(["proxy", "127.0.0.1:1", "--record", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"selectserver: error: --record {path}: ")


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "[Errno 2] No such file or directory"),
        ("{not json", "not JSON: "),
        (b"\xff\xfe", "codec can't decode"),
        ('["RECEIVE"]', "not a selectserver-recording file"),
        ('{"format": "selectserver-recording", "version": 2}', "version 2 is not supported"),
        ('{"format": "selectserver-recording", "version": 1, "connections": []}', "no connections"),
        (
            '{"format": "selectserver-recording", "version": 1, "connections": [{"upstream": 1}]}',
            "connections[0].upstream: expected a list of chunks",
        ),
    ],
)
def test_bad_replay_file_exits_2_naming_it(
    content: str | bytes | None, message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "rec.json"
    if isinstance(content, str):
        path.write_text(content)
    elif content is not None:
        path.write_bytes(content)
    assert main(["replay", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"selectserver: error: {path}: ")
    assert message in err


def test_proxy_and_replay_help(capsys: pytest.CaptureFixture[str]) -> None:
    for command in ("proxy", "replay"):
        with pytest.raises(SystemExit) as info:
            main([command, "--help"])
        assert info.value.code == 0
    out = capsys.readouterr().out
    for option in ("UPSTREAM", "[IPv6]:PORT", "--latency S", "--jitter S", "--bandwidth BPS"):
        assert option in out
    for option in ("--reset-after N", "--direction", "--record FILE", "replay FILE"):
        assert option in out


def test_proxy_transcript_shows_both_ways_the_ends_and_the_faults() -> None:
    record = ProxyRecord(index=2, peer=("::1", 4242, 0, 0))
    record.add(True, b"x" * 300, record.accepted_at + 0.1)
    record.add(False, b"pong", record.accepted_at + 0.2)
    record.passed_upstream, record.passed_downstream = 300, 0
    record.client_end, record.server_end = "reset by proxy", "eof"
    record.faults += [Latency(0.5), ResetPeer(0)]
    record.dropped, record.unrecorded = 4, 7
    record.end(Outcome.RESET, "ResetPeer(after_bytes=0) reached", record.accepted_at + 0.3)
    assert format_proxy_transcript(record, limit=10).splitlines() == [
        "connection 2 from [::1]:4242: reset",
        f"  client -> server: 300 bytes, then reset by proxy: {b'x' * 10!r}...",
        "  server -> client: 4 bytes (0 passed on), then eof: b'pong'",
        f"  faults: {Latency(0.5)!r}, {ResetPeer(0)!r}",
        "  (4 bytes dropped, 7 bytes not recorded)",
        "  ended: ResetPeer(after_bytes=0) reached",
    ]
    live = ProxyRecord(index=0, peer="/run/app.sock")
    assert format_proxy_transcript(live).splitlines() == [
        "connection 0 from /run/app.sock: running",
        "  client -> server: 0 bytes, then still open",
        "  server -> client: 0 bytes, then still open",
    ]


def test_serve_stops_on_sigterm_as_on_ctrl_c() -> None:
    with running(["serve", "--port", "0"], _SERVING) as (proc, _):
        out, err = stop(proc, signal.SIGTERM)
    assert proc.returncode == 0, err
    assert out == "selectserver: stopped\n"
