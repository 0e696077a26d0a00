"""Campaigns over generated scripts: bigger, with every misbehaviour on, many at once."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

from _checks import check_round_trip, serve_and_play
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import run_state_machine_as_test
from test_stateful import ReactorMachine

from selectserver.strategies import scripts

from ._campaign import FUZZ, Campaign

#: Big scripts: long, with sends and count steps up to 64 KiB, every misbehaviour allowed.
BIG = scripts(max_steps=40, max_send_size=64 * 1024, max_receive_size=64 * 1024, max_delay=0.005)


def test_fuzz_round_trip(campaign: Campaign) -> None:
    """For any valid script, server and reference client agree on every step's bytes, every sent
    byte and how the connection ended."""

    @FUZZ
    @given(BIG, st.integers(0, 2**32))
    def one(script: list[object], seed: int) -> None:
        campaign.tick()
        check_round_trip(script, seed)

    campaign.run(one)


def test_fuzz_many_servers_at_once(campaign: Campaign) -> None:
    """Up to 8 servers with their own scripts, each played by up to 3 clients at the same time,
    give every client exactly its own script's transcript."""

    @FUZZ
    @given(st.lists(scripts(max_steps=12), min_size=2, max_size=8), st.integers(1, 3))
    def one(many: list[list[object]], clients: int) -> None:
        campaign.tick()
        with ThreadPoolExecutor(max_workers=len(many)) as pool:
            futures = [
                pool.submit(serve_and_play, script, seed, clients)
                for seed, script in enumerate(many)
            ]
            for future in futures:
                future.result(timeout=60)

    campaign.run(one)


def test_fuzz_state_machine(campaign: Campaign) -> None:
    """Long random interleavings of servers opening and closing and clients coming and going keep
    one reactor thread, answering servers, refusing closed ones, and no leaked descriptor."""

    class Counted(ReactorMachine):
        def __init__(self) -> None:
            super().__init__()
            campaign.tick()

    campaign.run(
        lambda: run_state_machine_as_test(  # type: ignore[no-untyped-call, unused-ignore]
            Counted, settings=settings(FUZZ, max_examples=20, stateful_step_count=100)
        )
    )
