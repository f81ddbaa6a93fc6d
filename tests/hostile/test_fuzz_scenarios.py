"""Hostile scenarios played by the fuzz harness's hostile peers (the saved seed scripts).

Each test runs the scripted hostile sequence of one scenario of hostile-inputs.md against
xenpv's own sans-IO drivers on instrumented memory and asserts the outcome (peer marked
misbehaving or not, entries handled, statuses answered); the invariant checks of the
harness (single fetch, bounded work, bounded queues, only PeerError) run on every step.
"""

from __future__ import annotations

import pytest

from xenpv.fuzz.seeds import SEEDS, Seed, check_seed


def _run(scenario: int) -> None:
    seeds: list[Seed] = [s for s in SEEDS if s.scenario == scenario]
    assert seeds
    for seed in seeds:
        check_seed(seed)


def test_scenario_01_req_prod_beyond_ring() -> None:
    _run(1)


def test_scenario_02_req_prod_backwards_or_racing() -> None:
    _run(2)


def test_scenario_03_request_fields_flip_after_first_read() -> None:
    _run(3)


def test_scenario_04_out_of_range_block_requests_get_error_responses() -> None:
    _run(4)


def test_scenario_05_grant_copy_with_huge_lengths_leaves_the_daemon_bounded() -> None:
    """loopback:exhaustion: a copy of 5000 segments of 65535 bytes (R5, R11)."""
    _run(5)


def test_scenario_06_net_tx_chain_beyond_fatal_slots() -> None:
    _run(6)


def test_scenario_08_request_storm_is_bounded_per_notification() -> None:
    _run(8)


def test_scenario_09_replayed_request_id() -> None:
    _run(9)


def test_scenario_10_rsp_prod_beyond_ring() -> None:
    _run(10)


def test_scenario_11_duplicate_response() -> None:
    _run(11)


def test_scenario_12_response_rewritten_after_first_read() -> None:
    _run(12)


def test_scenario_18_bad_connect_time_keys() -> None:
    _run(18)


def test_scenario_19_invalid_state_value() -> None:
    _run(19)


def test_scenario_21_guest_floods_leave_the_daemon_descriptors_bounded() -> None:
    """loopback:exhaustion: share, frame and port floods adding up; dom0 still answered."""
    _run(21)


def test_scenario_25_garbage_on_the_xenstore_ring() -> None:
    _run(25)


def test_scenario_26_vchan_insane_indexes() -> None:
    _run(26)


def test_scenario_27_console_out_prod_beyond_ring() -> None:
    _run(27)


def test_scenario_28_keyboard_events_out_of_range() -> None:
    _run(28)


@pytest.mark.parametrize("scenario", sorted({s.scenario for s in SEEDS}))
def test_every_seeded_scenario_has_a_named_test(scenario: int) -> None:
    names = [n for n in globals() if n.startswith(f"test_scenario_{scenario:02d}_")]
    assert names, f"scenario {scenario} has seeds but no named test"
