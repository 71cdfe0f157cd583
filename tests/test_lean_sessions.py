"""What the hot path and the idle-client memory work changed: sessions without a set of
contacts of their own until their first, the recipient-key memo of SEND, the UTF-8 size
check without encoding, and the connection table's per-connection list."""

from __future__ import annotations

import pytest

from mangogram_broker import core as core_module
from mangogram_broker.connections import ConnectionTable
from mangogram_broker.registry import NO_CONTACTS, Session
from mangogram_proto import codec
from mangogram_proto.messages import Deliver, Error, Send

from .harness import TEST_LIMITS, Network


def session(name: str) -> Session:
    return Session(peer=b"\x00" + name.encode()[:4], key=name, name=name,
                   resume_token="t", last_seen_ms=0)  # fmt: skip


def test_sessions_share_the_empty_contacts_until_their_first_contact():
    alice, bob = session("alice"), session("bob")
    assert alice.contacts is NO_CONTACTS and bob.contacts is NO_CONTACTS
    alice.add_contact("carol")
    alice.add_contact("carol")
    alice.add_contact("dave")
    assert alice.contacts == {"carol", "dave"}
    assert bob.contacts == set()
    assert frozenset() == NO_CONTACTS


def test_a_session_has_no_per_instance_dict():
    # Slots: tens of thousands of idle sessions are kept, and a dict each cost ~100 bytes.
    assert not hasattr(session("alice"), "__dict__")


def test_people_who_exchanged_messages_become_each_others_contacts():
    net = Network()
    alice, bob = net.join("alice"), net.join("bob")
    carol = net.join("carol")
    net.raw(alice.peer, codec.encode(Send("m1", "Bob", "hi", net.now)))
    registry = net.core.registry
    assert registry.by_key("alice").contacts == {"bob"}  # type: ignore[union-attr]
    assert registry.by_key("bob").contacts == {"alice"}  # type: ignore[union-attr]
    assert registry.by_key("carol").contacts is NO_CONTACTS  # type: ignore[union-attr]
    assert bob.peer and carol.peer


def test_a_returning_user_starts_with_the_contacts_the_store_knows():
    net = Network()
    alice = net.join("alice")
    net.join("bob")
    net.raw(alice.peer, codec.encode(Send("m1", "bob", "hi", net.now)))
    net.core.store.commit()
    net.disconnect(alice)
    net.reconnect(alice)
    net.pump()
    assert net.core.registry.by_key("alice").contacts == {"bob"}  # type: ignore[union-attr]


def test_sends_to_any_spelling_of_a_name_reach_its_user_with_the_memo_bounded(monkeypatch):
    monkeypatch.setattr(core_module, "RECIPIENT_KEYS_KEPT", 2)
    net = Network()
    alice = net.join("alice")
    net.join("olena")
    refused = []
    for number, spelling in enumerate(["Олена", "olena", "ОЛЕНА", "OLENA", "ОЛЕНА", "Olena"]):
        send = Send(f"m{number}", spelling, "hi", net.now)
        replies = net.core.handle(alice.peer, send, net.clock)
        if any(isinstance(o.message, Error) for o in replies):
            refused.append(spelling)
    # Only the Latin spellings name the registered user; the Cyrillic ones are nobody.
    assert refused == ["Олена", "ОЛЕНА", "ОЛЕНА"]
    assert len(net.core._recipient_keys) <= 2


@pytest.mark.parametrize(
    "text,refused",
    [
        ("😀" * 50, False),  # 200 bytes: exactly max_text_bytes
        ("😀" * 50 + "x", True),  # 201 bytes
        ("x" * 100, False),  # 100 bytes: 4 x 100 > 200, so it is encoded, and fits
        ("x" * 50, False),  # 4 x 50 = 200: not encoded at all
    ],
)
def test_the_utf8_size_limit_holds_at_its_edge(text, refused):
    assert TEST_LIMITS.max_text_bytes == 200
    net = Network()
    alice = net.join("alice")
    net.join("bob")
    replies = net.core.handle(alice.peer, Send("m1", "bob", text, net.now), net.clock)
    codes = [o.message.code for o in replies if isinstance(o.message, Error)]
    assert codes == (["too_large"] if refused else [])
    assert refused or any(isinstance(o.message, Deliver) for o in replies)


def test_a_connection_carrying_several_peers_names_each_once_sorted():
    table = ConnectionTable()
    table.accepted(7)
    for peer in (b"\x00b", b"\x00a", b"\x00c"):
        assert table.seen(peer, 7)
    assert table.seen(b"\x00a", 7)  # known already: not added twice
    assert table.closed(7) == [b"\x00a", b"\x00b", b"\x00c"]
    assert table.closed(7) == []
