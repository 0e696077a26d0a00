"""Campaigns over generated TLS scripts: StartTLS anywhere, broken handshakes and TRUNCATE."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from test_fuzz_tls import check_tls_round_trip

from selectserver.strategies import scripts

from ._campaign import FUZZ, Campaign

#: Big TLS scripts: long, with sends and count steps up to 64 KiB (several TLS records).
BIG_TLS = scripts(
    max_steps=24,
    max_send_size=64 * 1024,
    max_receive_size=64 * 1024,
    max_delay=0.005,
    tls=True,
    truncate=True,
)


def test_fuzz_tls_round_trip(campaign: Campaign) -> None:
    """For any valid TLS script, server and reference client agree on every step's plaintext,
    every sent byte, whether TLS started and how the connection ended."""

    @FUZZ
    @given(BIG_TLS, st.integers(0, 2**32))
    def one(script: list[object], seed: int) -> None:
        campaign.tick()
        check_tls_round_trip(script, seed)

    campaign.run(one)
