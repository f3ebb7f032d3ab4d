"""The join floor of an in-sync set (cluster/joining.py): monotonic within a leadership, and a fixed
target a follower that keeps up with a steady load does reach."""

from __future__ import annotations

from logd_trio.server.cluster.joining import Joins

LAG = 1.0


def test_the_floor_never_goes_back_within_a_leadership() -> None:
    joins = Joins({"t": 80})
    assert joins.floor("t") == 80  # the takeover head: earlier epochs' acknowledged batches
    assert joins.floor("t", 150, 120) == 150  # acknowledged up to 150
    assert joins.floor("t", 90, 100) == 150  # a member with less was added since: still 150
    assert Joins({"t": 80}).floor("t", 10) == 80  # the next leadership starts from its own takeover head


def test_a_follower_one_step_behind_a_moving_head_joins() -> None:
    """No other member: the floor is the head, which moves on under a steady load; the follower is
    always 10 behind it.  It reaches the snapshot, is waited for, reaches that moment's floor: joins."""
    joins = Joins()
    head, now = 100, 0.0
    admitted = False
    for _ in range(5):
        floors = {"t": joins.floor("t", head)}
        if joins.admit("b", {"t": head - 10}, floors, now, LAG):
            admitted = True
            break
        head, now = head + 10, now + 0.1  # the follower copies what the head was a step ago
    assert admitted
    assert "b" in joins.waited  # acknowledgements waited for it before it joined


def test_a_joiner_is_waited_for_before_it_joins_and_must_hold_what_was_acknowledged_before() -> None:
    joins = Joins()
    assert not joins.admit("b", {"t": 50}, {"t": joins.floor("t", 100)}, 0.0, LAG)  # snapshot 100 taken
    assert "b" not in joins.waited and not joins.changed
    assert not joins.admit("b", {"t": 100}, {"t": joins.floor("t", 130)}, 0.1, LAG)  # holds the snapshot
    assert joins.changed and joins.waited["b"][1] == {"t": 130}  # waited for: must hold 130 (acked until now)
    assert not joins.admit("b", {"t": 120}, {"t": joins.floor("t", 125)}, 0.2, LAG)  # the floor went "back": 130
    assert joins.admit("b", {"t": 130}, {"t": joins.floor("t", 160)}, 0.3, LAG)  # 160 came after: waited for it


def test_a_joiner_that_falls_behind_while_waited_for_stops_being_waited_for() -> None:
    joins = Joins()
    assert not joins.admit("b", {"t": 100}, {"t": joins.floor("t", 200)}, 0.0, LAG)
    assert not joins.admit("b", {"t": 200}, {"t": joins.floor("t", 300)}, 0.1, LAG)
    joins.changed = False
    assert "b" in joins.waited
    assert not joins.admit("b", {"t": 250}, {"t": joins.floor("t", 900)}, 0.1 + LAG + 0.01, LAG)
    assert "b" not in joins.waited and joins.changed


def test_a_topic_not_fetched_keeps_a_joiner_out() -> None:
    joins = Joins()
    floors = {"t": joins.floor("t", 0), "u": joins.floor("u", 0)}
    assert not joins.admit("b", {"t": 0, "u": None}, floors, 0.0, LAG)
    assert joins.admit("b", {"t": 0, "u": 0}, floors, 0.1, LAG)
