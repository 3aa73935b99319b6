"""Broadcast groups (`cadence.broker.groups`): epochs, ranks, failures and late joiners, as pure logic."""

from __future__ import annotations

import pytest

from cadence.broker.groups import GroupTable
from cadence.errors import InvalidRequest

RUN = "run-g"
MASTER = "10.0.0.1:29500"


def test_members_take_ranks_in_join_order_and_the_group_is_kept_while_membership_holds() -> None:
    table = GroupTable()
    assert table.form(RUN, 1, MASTER, "gloo").epoch == 0  # nobody joined: everyone fetches
    table.join(RUN, "a", -1)
    table.join(RUN, "b", -1)
    group = table.form(RUN, 2, MASTER, "gloo")
    assert (group.epoch, group.members, group.master_addr) == (1, ("a", "b"), MASTER)
    assert table.join(RUN, "b", 2) == (group, 2)
    assert table.join(RUN, "a", 2)[1] == 1
    assert table.form(RUN, 3, "10.0.0.1:29501", "gloo") is group  # same members: same epoch, same rendezvous
    assert table.join(RUN, "a", 1)[1] == -1  # version 1 went out before any group
    assert table.count() == 2


def test_a_late_joiner_fetches_until_the_next_epoch_takes_it_in() -> None:
    table = GroupTable()
    table.join(RUN, "a", -1)
    first = table.form(RUN, 1, MASTER, "gloo")
    assert table.join(RUN, "late", 1) == (first, -1)  # not a member of the epoch that carries version 1
    second = table.form(RUN, 2, MASTER, "gloo")
    assert second.epoch == first.epoch + 1 and second.members == ("a", "late")
    assert table.join(RUN, "late", 2)[1] == 2


def test_a_failed_epoch_re_forms_with_only_the_members_that_rejoined() -> None:
    table = GroupTable()
    for replica in ("a", "dead"):
        table.join(RUN, replica, -1)
    first = table.form(RUN, 1, MASTER, "gloo")
    assert table.join(RUN, "a", 1, failed_epoch=first.epoch) == (first, -1)  # it fell back: fetch version 1
    second = table.form(RUN, 2, MASTER, "gloo", failed_epoch=first.epoch)  # "dead" never rejoined
    assert second.members == ("a",) and second.epoch > first.epoch
    assert table.join(RUN, "a", 2)[1] == 1


def test_members_that_rejoin_after_the_trainer_reported_the_failure_are_in_the_next_epoch() -> None:
    table = GroupTable()
    for replica in ("a", "dead"):
        table.join(RUN, replica, -1)
    first = table.form(RUN, 1, MASTER, "gloo")
    assert table.form(RUN, 2, MASTER, "gloo", failed_epoch=first.epoch).members == ()  # nobody rejoined yet
    table.join(RUN, "a", 2, failed_epoch=first.epoch)
    assert table.form(RUN, 3, MASTER, "gloo").members == ("a",)


def test_a_member_that_failed_alone_makes_the_next_version_a_new_epoch() -> None:
    table = GroupTable()
    table.join(RUN, "a", -1)
    first = table.form(RUN, 1, MASTER, "gloo")
    table.join(RUN, "a", 1, failed_epoch=first.epoch)
    second = table.form(RUN, 2, MASTER, "gloo")
    assert second.epoch > first.epoch and second.members == ("a",)


def test_a_leaving_replica_is_out_of_the_next_epoch() -> None:
    table = GroupTable()
    for replica in ("a", "b"):
        table.join(RUN, replica, -1)
    table.form(RUN, 1, MASTER, "gloo")
    table.join(RUN, "b", -1, leave=True)
    assert table.form(RUN, 2, MASTER, "gloo").members == ("a",)


def test_bad_requests_say_what_to_set() -> None:
    table = GroupTable()
    with pytest.raises(InvalidRequest, match="CADENCE_WORKER_ID"):
        table.join(RUN, "", 1)
    with pytest.raises(InvalidRequest, match="CADENCE_BROADCAST_ADDR"):
        table.form(RUN, 1, "no-port", "gloo")
    with pytest.raises(InvalidRequest, match="gloo, nccl"):
        table.form(RUN, 1, MASTER, "mpi")
