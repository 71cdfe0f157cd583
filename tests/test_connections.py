"""The table that turns closed descriptors into departed peers, without sockets."""

from __future__ import annotations

from mangogram_broker.connections import ConnectionTable

ALICE, BOB = b"\x00\x00\x00\x00\x01", b"\x00\x00\x00\x00\x02"


def test_a_closed_descriptor_names_its_peer_once():
    table = ConnectionTable()
    assert table.seen(ALICE, 13) is None
    assert table.seen(ALICE, 13) is None
    assert table.closed(13) == ALICE
    assert table.closed(13) is None


def test_reuse_before_the_old_disconnect_event_spares_the_new_connection():
    table = ConnectionTable()
    table.seen(ALICE, 13)
    # alice's connection closed and bob got descriptor 13 before the event was read
    assert table.seen(BOB, 13) == ALICE
    assert table.closed(13) is None  # the late event is alice's, not bob's
    assert table.closed(13) == BOB  # bob's own close, later, still counts


def test_unknown_descriptors_are_ignored():
    assert ConnectionTable().closed(99) is None
