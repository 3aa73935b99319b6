"""Relay routes (`cadence.broker.relay`): chains for fetchers that start together, spread for later ones, never
a cycle, failed and departed relays dropped."""

from __future__ import annotations

import pytest

from cadence.broker.relay import BROKER, RelayTable
from cadence.errors import InvalidRequest

V1 = ("run", 1, False)


def test_fetchers_that_start_together_form_a_chain_from_the_broker() -> None:
    table = RelayTable()
    assert [table.route(V1, f"r{i}:1") for i in range(4)] == [BROKER, "r0:1", "r1:1", "r2:1"]


def test_later_fetchers_spread_over_the_relays_with_the_fewest_fetchers() -> None:
    table = RelayTable()
    for i in range(3):
        table.route(V1, f"r{i}:1")  # r0 ← broker, r1 ← r0, r2 ← r1: r2 serves nobody yet
    assert table.route(V1, "r3:1") == "r2:1"
    assert table.route(V1, "r4:1") == "r3:1"
    assert table.route(V1, "") == "r4:1"  # a fetcher with no relay address is routed, not registered
    assert table.count() == 5


def test_a_failed_relay_is_dropped_and_a_reroute_never_goes_to_a_later_asker() -> None:
    table = RelayTable()
    for i in range(4):
        table.route(V1, f"r{i}:1")
    assert table.route(V1, "r2:1", failed=["r1:1"]) == "r0:1"  # r3 (later, r2's own child) is never offered
    assert table.route(V1, "r1:1") == "r3:1"  # r1 came back as a new asker: the latest in the order
    assert table.route(V1, "r0:1", failed=["r9:1"]) == BROKER  # the first asker always has the broker


def test_a_relay_that_moves_to_another_version_stops_relaying_the_old_one() -> None:
    table = RelayTable()
    table.route(V1, "r0:1")
    assert table.route(("run", 2, True), "r0:1") == BROKER
    assert table.route(V1, "r1:1") == BROKER  # r0 no longer holds version 1
    table.prune("run", held={2})
    assert table.count() == 2  # r0: version 2's delta, and the full version it rebuilds
    assert table.route(("other", 1, False), "r0:1") == BROKER  # runs are apart
    assert table.count() == 3


def test_a_delta_fetcher_relays_the_full_version_it_rebuilds() -> None:
    table = RelayTable()
    assert table.route(("run", 2, True), "a:1") == BROKER
    assert table.route(("run", 2, True), "b:1") == "a:1"
    assert table.route(("run", 2, False), "late:1") == "a:1"  # b serves a delta fetcher already
    assert table.route(("run", 2, False), "next:1") == "b:1"


@pytest.mark.parametrize("address", ["nohost", "host:port", "a b:1", "x" * 300 + ":1"])
def test_relay_addresses_are_host_and_port(address: str) -> None:
    with pytest.raises(InvalidRequest, match="CADENCE_RELAY_ADDR"):
        RelayTable().route(V1, address)
