"""Campaigns over generated HTTP responses, against http.client and urllib3."""

from __future__ import annotations

from collections.abc import Callable

import urllib3
from _checks import CLIENT_ERRORS, check_round_trip, fetch, outcome
from hypothesis import given

from selectserver import CommandServer
from selectserver.strategies import HTTPResponseScript, http_responses

from ._campaign import FUZZ, Campaign

RESPONSES = http_responses(max_body_size=8 * 1024, max_delay=0.005)


def fetch_urllib3(url: str) -> tuple[int, bytes] | Exception:
    """GET ``url`` with urllib3 (no retries): the status and body, or the exception it raised."""

    def get() -> tuple[int, bytes]:
        with urllib3.PoolManager(retries=False, timeout=5.0) as pool:
            reply = pool.request("GET", url, preload_content=False)
            try:
                return reply.status, reply.read()
            finally:
                reply.close()  # urllib3 leaves the socket open if read() raises OverflowError

    return outcome(get, (*CLIENT_ERRORS, urllib3.exceptions.HTTPError))


#: The clients under test: each GETs "/" from a server, giving the status and body or an error.
CLIENTS: dict[str, Callable[[CommandServer], tuple[int, bytes] | Exception]] = {
    "http.client": lambda server: fetch(server.address),
    "urllib3": lambda server: fetch_urllib3(server.url),
}


def test_fuzz_http_clients(campaign: Campaign) -> None:
    """For any generated response, http.client and urllib3 return valid ones exactly, never hang,
    and never return more body than the server sent; the reference client agrees byte for
    byte."""

    @FUZZ
    @given(RESPONSES)
    def one(response: HTTPResponseScript) -> None:
        campaign.tick()
        check_round_trip(list(response.script), 0)
        for client, get in CLIENTS.items():
            with CommandServer(response.script, verbose=False, timeout=5.0) as server:
                result = get(server)
            server.check()
            assert not isinstance(result, TimeoutError), f"{client} hung"
            if response.kind == "valid":
                assert result == (response.status, response.body), client
            elif not isinstance(result, Exception):
                assert len(result[1]) <= len(response.data), client

    campaign.run(one)
