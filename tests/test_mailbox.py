"""Nothing lost: offline mailboxes, receipts, resume, idempotent resends, history and
retention, over the broker core with both stores and no sockets."""

from __future__ import annotations

import dataclasses
import json

import pytest

from mangogram_broker.core import DELIVERY_WINDOW, MAX_IDS_PER_ACK, BrokerCore, Retention
from mangogram_broker.store import MemoryStore, SqliteStore
from mangogram_proto import codec
from mangogram_proto.events import (
    HistoryReceived,
    IncomingMessage,
    MessageAccepted,
    MessageDelivered,
    MessageFailed,
    MessageRead,
)
from mangogram_proto.messages import Deliver, Delivered, Login, Receipt, Send, Welcome
from mangogram_proto.session import ClientSession

from .harness import TEST_LIMITS, Network


@pytest.fixture(params=["memory", "sqlite"])
def net(request, tmp_path) -> Network:
    if request.param == "memory":
        return Network()
    store = SqliteStore(tmp_path / "mailbox.sqlite3", durability="normal")
    request.addfinalizer(store.close)
    return Network(store=store)


def register(net: Network, name: str):
    """Log `name` in once (so the name exists) and leave again."""
    client = net.join(name)
    client.session.leave(net.now)
    net.pump()
    return client


def alice_floods_offline_bob(net: Network):
    """Bob has a name but is offline; Alice is online with room to send hundreds."""
    net.core.limits = dataclasses.replace(
        TEST_LIMITS, max_mailbox=1000, rate_per_second=10_000, rate_burst=10_000
    )
    register(net, "bob")
    return net.join("alice")


def test_offline_recipient_gets_mailbox_on_login_in_order_marked_delayed(net):
    register(net, "bob")
    alice = net.join("alice")
    sent = []
    for i in range(5):
        net.now += 1000
        sent.append(alice.session.send_text("bob", f"повідомлення {i}", net.now))
        net.pump()
    assert [a.id for a in alice.take(MessageAccepted)] == sent
    assert alice.take(MessageDelivered) == []
    net.now += 60_000
    bob = net.join("bob")
    got = bob.take(IncomingMessage)
    assert [m.id for m in got] == sent
    assert [m.text for m in got] == [f"повідомлення {i}" for i in range(5)]
    assert all(m.delayed for m in got)
    assert [m.sent_at for m in got] == sorted(m.sent_at for m in got)
    assert got[0].accepted_at == got[0].sent_at  # original times, not the login time
    assert [d.id for d in alice.take(MessageDelivered)] == sent


def test_sender_offline_at_confirmation_gets_delivered_at_next_login(net):
    register(net, "bob")
    alice = net.join("alice")
    message_id = alice.session.send_text("bob", "ping", net.now)
    net.pump()
    alice.session.leave(net.now)
    net.pump()
    net.join("bob")
    alice_again = net.join("alice")
    assert [d.id for d in alice_again.take(MessageDelivered)] == [message_id]
    net.now += 1
    third = net.join("carol")
    assert third.take(MessageDelivered) == []


def test_full_mailbox_refuses_with_a_clear_error_and_loses_nothing(net):
    register(net, "bob")
    alice = net.join("alice")
    for i in range(TEST_LIMITS.max_mailbox + 3):
        net.now += 300  # stay under the rate limit
        alice.session.send_text("bob", f"m{i}", net.now)
        net.pump()
    failures = alice.take(MessageFailed)
    assert len(failures) == 3
    assert {f.code for f in failures} == {"mailbox_full"}
    assert "mailbox is full" in failures[0].message
    bob = net.join("bob")
    assert len(bob.take(IncomingMessage)) == TEST_LIMITS.max_mailbox
    net.now += 1000
    alice.session.send_text("bob", "room again", net.now)
    net.pump()
    assert [m.text for m in bob.take(IncomingMessage)] == ["room again"]


def test_resent_id_after_broker_restart_is_acked_again_not_stored_twice(net):
    alice = net.join("alice")
    bob = net.join("bob")
    send = Send("same-id", "bob", "once only", net.now)
    (first,) = [o.message for o in net.raw(alice.peer, codec.encode(send))]
    assert len(bob.take(IncomingMessage)) == 1
    net.restart_broker()
    for client in (alice, bob):
        client.connected = False
        net.reconnect(client)
    (again,) = [o.message for o in net.raw(alice.peer, codec.encode(send))]
    assert again == first
    assert bob.take(IncomingMessage) == []


def test_unconfirmed_messages_are_redelivered_to_a_fresh_client(net):
    alice = net.join("alice")
    bob = net.join("bob")
    # bob's process dies after receiving, before its receipts go out
    ids = [alice.session.send_text("bob", f"m{i}", net.now) for i in range(3)]
    for frames in alice.session.data_to_send():
        net.route(net.core.handle_frames(alice.peer, frames, net.clock))
    assert len(bob.take(IncomingMessage)) == 3
    bob.session.data_to_send()  # the receipts are lost with the process
    net.disconnect(bob)
    replacement = net.join("bob")
    assert [m.id for m in replacement.take(IncomingMessage)] == ids


def test_resume_from_confirms_what_the_client_has_so_nothing_repeats(net):
    alice = net.join("alice")
    bob = net.join("bob")
    ids = [alice.session.send_text("bob", f"m{i}", net.now) for i in range(3)]
    for frames in alice.session.data_to_send():
        net.route(net.core.handle_frames(alice.peer, frames, net.clock))
    assert [m.id for m in bob.take(IncomingMessage)] == ids
    bob.session.data_to_send()  # receipts lost, but bob's session remembers its stream
    bob.connected = False
    net.restart_broker()
    net.reconnect(bob)
    assert bob.take(IncomingMessage) == []
    later = net.join("carol")
    assert later.take(IncomingMessage) == []
    assert net.store.unconfirmed_count("bob") == 0


def test_resume_from_tells_online_senders_at_once_in_bounded_batches(net):
    alice = alice_floods_offline_bob(net)
    total = MAX_IDS_PER_ACK + 44
    ids = [alice.session.send_text("bob", f"#{i}", net.now) for i in range(total)]
    net.pump(rounds=1000)
    assert alice.take(MessageDelivered) == []
    # Bob's client already holds them all (say, its receipts were lost): it resumes.
    peer = net.new_peer()
    login = Login("bob", resume_from=total)
    out = net.core.handle_frames(peer, codec.encode(login), net.clock)
    told = [o.message for o in out if o.peer == alice.peer and isinstance(o.message, Delivered)]
    assert [len(d.ids) for d in told] == [MAX_IDS_PER_ACK, 44]
    assert [i for d in told for i in d.ids] == ids
    assert not any(isinstance(o.message, Deliver) for o in out)  # nothing comes again
    net.route(out)
    assert len(alice.take(MessageDelivered)) == total
    assert net.store.receipts_owed("alice", 10) == []


def online_session(name: str) -> ClientSession:
    session = ClientSession(name)
    session.connect(1)
    session.receive(codec.encode(Welcome(name, 1, "token", TEST_LIMITS)), 1)
    session.data_to_send()
    return session


def test_duplicate_deliveries_are_dropped_by_stream_position():
    session = online_session("bob")
    deliveries = [Deliver(f"m{i}", str(i), "alice", "t", 1, 2, seq=i) for i in (1, 2, 3)]
    shown = []
    for deliver in deliveries + deliveries[1:]:  # 2 and 3 come again
        shown += session.receive(codec.encode(deliver), 10)
    assert [e.seq for e in shown] == [1, 2, 3]
    for event in shown:
        session.confirm(event.seq, 10)
    receipts = [
        codec.decode(f) for f in session.data_to_send() if codec.command_of(f) == b"RECEIPT"
    ]
    assert receipts == [Receipt(3)]  # one, cumulative


def test_a_receipt_never_confirms_past_a_gap():
    session = online_session("bob")
    for seq in (1, 2, 4, 5):
        session.receive(codec.encode(Deliver(f"m{seq}", str(seq), "a", "t", 1, 2, seq)), 10)
        session.confirm(seq, 10)
    receipts = [
        codec.decode(f) for f in session.data_to_send() if codec.command_of(f) == b"RECEIPT"
    ]
    assert receipts == [Receipt(2)]
    session.receive(codec.encode(Deliver("m3", "3", "a", "t", 1, 2, 3)), 11)
    session.confirm(3, 11)
    receipts = [
        codec.decode(f) for f in session.data_to_send() if codec.command_of(f) == b"RECEIPT"
    ]
    assert receipts == [Receipt(5)]


def test_a_gap_in_the_stream_is_not_skipped_on_resume():
    session = ClientSession("bob")
    for seq in (1, 3):
        session.receive(codec.encode(Deliver(f"m{seq}", str(seq), "a", "t", 1, 2, seq)), 10)
        session.confirm(seq, 10)
    session.connect(20)
    (login,) = [codec.decode(f) for f in session.data_to_send() if codec.command_of(f) == b"LOGIN"]
    assert login.resume_from == 1  # 2 never arrived, so the broker must send it again


def test_delivery_window_bounds_what_is_in_flight(net):
    alice = alice_floods_offline_bob(net)
    total = DELIVERY_WINDOW + 50
    for i in range(total):
        alice.session.send_text("bob", f"#{i}", net.now)
    net.pump(rounds=1000)
    assert len(alice.take(MessageAccepted)) == total
    peer = net.new_peer()
    login = ClientSession("bob")
    login.connect(net.now)
    out = net.core.handle_frames(peer, login.data_to_send()[0], net.clock)
    delivers = [o for o in out if isinstance(o.message, Deliver)]
    assert len(delivers) == DELIVERY_WINDOW
    assert [d.message.seq for d in delivers] == list(range(1, DELIVERY_WINDOW + 1))


def test_history_pages_and_only_participants_read_it(net):
    alice = net.join("alice")
    bob = net.join("bob")
    carol = net.join("carol")
    for i in range(4):
        net.now += 500
        alice.session.send_text("bob", f"a→b {i}", net.now)
        bob.session.send_text("alice", f"b→a {i}", net.now)
        net.pump()
    carol.session.send_text("alice", "c→a", net.now)
    net.pump()
    bob.session.request_history("Alice", 5, None, net.now)
    net.pump()
    (page,) = bob.take(HistoryReceived)
    assert page.more and len(page.items) == 5
    assert [i.text for i in page.items][:2] == ["b→a 3", "a→b 3"]
    assert all({i.sender, i.to} == {"alice", "bob"} for i in page.items)
    bob.session.request_history("alice", 5, page.items[-1].broker_id, net.now)
    net.pump()
    (older,) = bob.take(HistoryReceived)
    assert not older.more and len(older.items) == 3
    assert [i.broker_id for i in page.items + older.items] == sorted(
        (i.broker_id for i in page.items + older.items), key=int, reverse=True
    )
    carol.session.request_history("bob", 50, None, net.now)
    net.pump()
    (nothing,) = carol.take(HistoryReceived)
    assert nothing.items == ()  # carol was never in alice↔bob
    carol.session.request_history("alice", 50, None, net.now)
    net.pump()
    (own,) = carol.take(HistoryReceived)
    assert [i.text for i in own.items] == ["c→a"]


def test_history_page_is_capped_by_the_broker(net):
    alice = net.join("alice")
    net.join("bob")
    for i in range(12):
        net.now += 500
        alice.session.send_text("bob", f"{i}", net.now)
        net.pump()
    alice.session.request_history("bob", 1000, None, net.now)
    net.pump()
    (page,) = alice.take(HistoryReceived)
    assert len(page.items) == TEST_LIMITS.max_history_page and page.more


def test_read_receipt_reaches_the_sender(net):
    alice = net.join("alice")
    bob = net.join("bob")
    message_id = alice.session.send_text("bob", "read me", net.now)
    net.pump()
    (incoming,) = bob.take(IncomingMessage)
    bob.session.mark_read(incoming.broker_id, net.now)
    net.pump()
    (read,) = alice.take(MessageRead)
    assert (read.id, read.by) == (message_id, "bob")
    carol = net.join("carol")
    carol.session.mark_read(incoming.broker_id, net.now)  # not carol's message: ignored
    net.pump()
    assert alice.take(MessageRead) == []


def test_retention_removes_old_confirmed_history_but_never_the_unconfirmed(tmp_path):
    for store in (MemoryStore(), SqliteStore(tmp_path / "r.sqlite3", "normal")):
        net = Network(store=store)
        net.core = BrokerCore(
            TEST_LIMITS, store=store, retention=Retention(max_age_ms=10_000, keep_per_user=None)
        )
        register(net, "carol")
        alice = net.join("alice")
        bob = net.join("bob")
        alice.session.send_text("bob", "old, read", net.now)
        alice.session.send_text("carol", "old, unread", net.now)
        net.pump()
        for _ in range(70):  # past the age limit and the once-a-minute prune
            net.advance(1000)
        alice.session.request_history("bob", 10, None, net.now)
        net.pump()
        (page,) = alice.take(HistoryReceived)
        assert page.items == ()
        assert store.unconfirmed_count("carol") == 1
        assert bob.take(IncomingMessage)


def test_keep_per_user_keeps_the_newest_confirmed(tmp_path):
    for store in (MemoryStore(), SqliteStore(tmp_path / "k.sqlite3", "normal")):
        for i in range(5):
            store.append("a", "a", "b", "b", f"id{i}", f"t{i}", i, i)
            store.confirm_through("b", i + 1, 100)
        store.append("a", "a", "b", "b", "unconfirmed", "t", 9, 9)
        assert store.prune(1000, None, 2) == 3
        assert [m.text for m in store.history("a", "b", None, 10)] == ["t", "t4", "t3"]
        assert [m.text for m in store.unconfirmed("b", 0, 10)] == ["t"]
        assert store.prune(1000, None, 2) == 0  # what the first one removed is gone for good


@pytest.mark.parametrize("bad", ["²", "١", "9" * 100])
def test_odd_digit_broker_ids_get_no_crash(net, bad):
    alice = net.join("alice")
    for frames in (
        [b"MGP02", b"RECEIPT", json.dumps({"seq": bad}).encode()],
        [b"MGP02", b"READ", json.dumps({"broker_id": bad}).encode()],
        [b"MGP02", b"HISTORY", json.dumps({"peer": "bob", "limit": 5, "before": bad}).encode()],
    ):
        net.raw(alice.peer, frames)  # must not raise
    assert net.core.registry.by_key("alice") is not None


def test_read_tells_the_sender_but_only_a_receipt_confirms_delivery(net):
    alice = net.join("alice")
    bob = net.join("bob")
    message_id = alice.session.send_text("bob", "hi", net.now)
    out = net.core.handle_frames(alice.peer, alice.session.data_to_send()[0], net.clock)
    (deliver,) = [o.message for o in out if isinstance(o.message, Deliver)]
    net.route([o for o in out if not isinstance(o.message, Deliver)])
    read = [b"MGP02", b"READ", json.dumps({"broker_id": deliver.broker_id}).encode()]
    net.raw(bob.peer, read)
    assert [r.id for r in alice.take(MessageRead)] == [message_id]
    assert alice.take(MessageDelivered) == []
    assert net.store.unconfirmed_count("bob") == 1
    net.raw(bob.peer, codec.encode(Receipt(deliver.seq)))
    assert [d.id for d in alice.take(MessageDelivered)] == [message_id]
    assert net.store.unconfirmed_count("bob") == 0


def test_a_handoff_refused_by_a_full_queue_is_offered_again_and_never_lost(net):
    alice = net.join("alice")
    bob = net.join("bob")
    first = alice.session.send_text("bob", "one", net.now)
    out = net.core.handle_frames(alice.peer, alice.session.data_to_send()[0], net.clock)
    (deliver,) = [o for o in out if isinstance(o.message, Deliver)]
    # bob's queue is full: the hand-off fails, bob's connection lives on
    net.route(net.core.send_failed(deliver, unreachable=False, now=net.clock))
    net.route([o for o in out if o is not deliver])
    second = alice.session.send_text("bob", "two", net.now)
    net.pump()
    assert [m.id for m in bob.take(IncomingMessage)] == [first, second]
    assert net.store.unconfirmed_count("bob") == 0


def test_a_fresh_client_starts_from_the_brokers_mark_not_from_what_it_saw_first():
    session = ClientSession("bob")
    session.connect(1)
    session.data_to_send()
    welcome = Welcome("bob", 1, "token", TEST_LIMITS, (), stream_mark=3)
    session.receive(codec.encode(welcome), 2)
    session.receive(codec.encode(Deliver("m5", "5", "a", "t", 1, 2, seq=5)), 3)
    session.confirm(5, 3)
    session.connect(4)
    (login,) = [codec.decode(f) for f in session.data_to_send() if codec.command_of(f) == b"LOGIN"]
    assert login.resume_from == 3  # seq 4 never arrived: it must not be confirmed
    shown = session.receive(codec.encode(Deliver("m4", "4", "a", "t", 1, 2, seq=4)), 5)
    assert [e.seq for e in shown] == [4]  # arriving late, it is still shown
