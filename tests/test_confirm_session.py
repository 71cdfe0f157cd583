"""The session confirms only what the application says it finished with: pure tests over
the broker core, no sockets (the socket-level proofs are in test_confirm.py)."""

from __future__ import annotations

import dataclasses

import pytest

from mangogram_broker.store import MemoryStore
from mangogram_proto import codec
from mangogram_proto.events import IncomingMessage, MessageDelivered
from mangogram_proto.messages import Deliver, Receipt, Welcome

from .harness import TEST_LIMITS, Network


@pytest.fixture
def net() -> Network:
    network = Network(store=MemoryStore())
    network.core.limits = dataclasses.replace(
        TEST_LIMITS, rate_per_second=10_000, rate_burst=10_000, max_mailbox=1000
    )
    return network


def offline_mailbox(net: Network, count: int) -> list[str]:
    bob = net.join("bob")
    bob.session.leave(net.now)
    net.pump()
    alice = net.join("alice")
    return [alice.session.send_text("bob", f"m{i}", net.now) for i in range(count)]


def test_received_but_unconfirmed_messages_come_again_to_the_next_process(net):
    ids = offline_mailbox(net, 5)
    net.pump()
    bob = net.join("bob", auto_confirm=False)
    got = bob.take(IncomingMessage)
    assert [m.id for m in got] == ids
    bob.session.confirm(got[0].seq, net.now)
    bob.session.confirm(got[1].seq, net.now)
    net.pump()
    net.disconnect(bob)  # killed holding m2..m4
    again = net.join("bob")
    assert [m.id for m in again.take(IncomingMessage)] == ids[2:]


def test_confirming_out_of_order_confirms_only_the_finished_prefix():
    net = Network()
    bob = net.join("bob")
    session = bob.session
    for seq in (1, 2, 3, 4):
        session.receive(codec.encode(Deliver(f"m{seq}", str(seq), "a", "t", 1, 2, seq)), 10)
    for seq in (1, 3, 4):
        session.confirm(seq, 10)
    receipts = [
        codec.decode(f) for f in session.data_to_send() if codec.command_of(f) == b"RECEIPT"
    ]
    assert receipts == [Receipt(1)]  # 2 is not finished, so 3 and 4 cannot be confirmed
    session.confirm(2, 11)
    session.confirm(2, 11)  # twice is harmless
    session.confirm(99, 11)  # never received: ignored
    receipts = [
        codec.decode(f) for f in session.data_to_send() if codec.command_of(f) == b"RECEIPT"
    ]
    assert receipts == [Receipt(4)]
    assert session.data_to_send() == []


def test_nothing_is_confirmed_on_arrival_and_a_repeat_gets_the_confirmed_mark():
    net = Network()
    session = net.join("bob").session
    deliver = Deliver("m1", "1", "a", "t", 1, 2, 1)
    session.receive(codec.encode(deliver), 10)
    assert [f for f in session.data_to_send() if codec.command_of(f) == b"RECEIPT"] == []
    session.confirm(1, 10)
    session.data_to_send()
    session.receive(codec.encode(deliver), 11)  # the broker did not hear our RECEIPT
    receipts = [
        codec.decode(f) for f in session.data_to_send() if codec.command_of(f) == b"RECEIPT"
    ]
    assert receipts == [Receipt(1)]


def test_receipt_goes_before_read_and_before_leave():
    net = Network()
    session = net.join("bob").session
    session.receive(codec.encode(Deliver("m1", "1", "a", "t", 1, 2, 1)), 10)
    session.confirm(1, 10)
    session.mark_read("1", 10)
    session.receive(codec.encode(Deliver("m2", "2", "a", "t", 1, 2, 2)), 11)
    session.confirm(2, 11)
    session.leave(11)
    commands = [codec.command_of(f) for f in session.data_to_send()]
    assert commands == [b"RECEIPT", b"READ", b"RECEIPT", b"LEAVE"]


def test_resume_from_carries_the_confirmed_mark_not_the_received_one():
    net = Network()
    session = net.join("bob").session
    for seq in (1, 2, 3):
        session.receive(codec.encode(Deliver(f"m{seq}", str(seq), "a", "t", 1, 2, seq)), 10)
    session.confirm(1, 10)
    session.connect(20)
    (login,) = [codec.decode(f) for f in session.data_to_send() if codec.command_of(f) == b"LOGIN"]
    assert login.resume_from == 1
    # The broker's mark is the floor: what it holds confirmed is not ours to hold back.
    session.receive(codec.encode(Welcome("bob", 21, "t2", TEST_LIMITS, (), stream_mark=2)), 21)
    assert session.confirmed_mark == 2
    session.confirm(3, 22)
    assert session.confirmed_mark == 3


def test_sender_hears_delivered_only_when_the_recipient_finished(net):
    bob = net.join("bob", auto_confirm=False)
    alice = net.join("alice")
    alice.session.send_text("bob", "hi", net.now)
    net.pump()
    (message,) = bob.take(IncomingMessage)
    assert alice.take(MessageDelivered) == []
    bob.session.confirm(message.seq, net.now)
    net.pump()
    assert [d.id for d in alice.take(MessageDelivered)] == [message.id]


def test_message_ids_grow_even_when_the_clock_stands_still_or_steps_back(monkeypatch):
    from mangogram_proto import session as session_module

    clock = iter([5_000_000, 5_000_000, 4_000_000] + [6_000_000] * 3)
    monkeypatch.setattr(session_module.time, "time_ns", lambda: next(clock))
    ids = [session_module.new_message_id() for _ in range(6)]
    assert all(len(i) == 32 and int(i, 16) >= 0 for i in ids)
    assert ids == sorted(ids) and len(set(ids)) == 6
