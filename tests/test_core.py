"""The broker core and client sessions together, with no sockets and a fake clock."""

from __future__ import annotations

import dataclasses
import json

import pytest

from mangogram_broker.clock import Clock
from mangogram_broker.core import MAX_IDS_PER_ACK, BrokerCore, Outgoing, coalesce
from mangogram_broker.store import MemoryStore, SqliteStore
from mangogram_proto import codec
from mangogram_proto.constants import SIGNATURE_V2 as SIGNATURE
from mangogram_proto.errors import ErrorCode, RemoteProtocolError
from mangogram_proto.events import (
    BrokerError,
    Closed,
    ConnectionLost,
    IncomingMessage,
    LoggedIn,
    LoginRefused,
    MessageAccepted,
    MessageDelivered,
    MessageFailed,
    OnlineUsers,
    PresenceChanged,
)
from mangogram_proto.messages import (
    Accepted,
    Deliver,
    Delivered,
    Error,
    Login,
    Ping,
    Pong,
    Receipt,
    Send,
    Welcome,
)
from mangogram_proto.session import ClientSession, State

from .harness import TEST_LIMITS, Network

AT = Clock(1, 1)  # a moment, for tests that drive the core without a Network


def error_codes(outgoing: list[Outgoing]) -> list[str]:
    return [o.message.code for o in outgoing if isinstance(o.message, Error)]


@pytest.fixture(params=["memory", "sqlite"])
def net(request, tmp_path) -> Network:
    """The same rules must hold over both stores."""
    if request.param == "memory":
        return Network()
    store = SqliteStore(tmp_path / "core.sqlite3", durability="normal")
    request.addfinalizer(store.close)
    return Network(store=store)


def test_login_welcomes_with_session_facts(net):
    alice = net.join("Alice")
    (welcome,) = alice.take(LoggedIn)
    assert welcome.name == "Alice"
    assert welcome.server_time == net.now
    assert welcome.limits == TEST_LIMITS
    assert welcome.online == ()
    assert alice.session.state is State.ONLINE


def test_welcome_lists_who_else_is_online(net):
    net.join("Олена")
    net.join("Taras")
    carol = net.join("carol")
    (welcome,) = carol.take(LoggedIn)
    assert welcome.online == ("Taras", "Олена")


def test_name_taken_is_case_and_normalization_blind(net):
    net.join("Олена")
    impostor = net.join("ОЛЕНА")
    (refused,) = impostor.take(LoginRefused)
    assert refused.code == ErrorCode.NAME_TAKEN.value
    assert impostor.session.state is State.CLOSED


def test_invalid_name_is_refused(net):
    client = net.join("two words")
    (refused,) = client.take(LoginRefused)
    assert refused.code == ErrorCode.NAME_INVALID.value


def test_presence_joined_and_left_reach_others(net):
    alice = net.join("alice")
    bob = net.join("bob")
    assert alice.take(PresenceChanged) == [PresenceChanged("bob", True, net.now)]
    assert bob.take(PresenceChanged) == []
    bob.session.leave(net.now)
    net.pump()
    assert bob.take(Closed) == [Closed()]
    assert alice.take(PresenceChanged) == [PresenceChanged("bob", False, net.now)]
    assert "bob" not in alice.session.online.values()


def test_private_message_is_delivered_acked_and_receipted(net):
    alice = net.join("alice")
    bob = net.join("bob")
    carol = net.join("carol")
    net.now += 5
    message_id = alice.session.send_text("BOB", "Привіт, Бобе 🥭", net.now - 2)
    net.pump()
    (incoming,) = bob.take(IncomingMessage)
    assert incoming.sender == "alice"
    assert incoming.text == "Привіт, Бобе 🥭"
    assert incoming.sent_at == net.now - 2
    assert incoming.accepted_at == net.now
    (accepted,) = alice.take(MessageAccepted)
    assert accepted.id == message_id == incoming.id
    assert accepted.broker_id == incoming.broker_id
    (delivered,) = alice.take(MessageDelivered)
    assert delivered.id == message_id and delivered.to == "bob"
    assert carol.take(IncomingMessage) == []


def test_resent_message_id_is_acked_again_not_delivered_twice(net):
    alice = net.join("alice")
    bob = net.join("bob")
    send = Send("fixed-id", "bob", "once", net.now)
    first = net.raw(alice.peer, codec.encode(send))
    second = net.raw(alice.peer, codec.encode(send))
    assert [o.message for o in first] == [o.message for o in second]
    assert len(bob.take(IncomingMessage)) == 1


def test_never_registered_name_is_refused(net):
    alice = net.join("alice")
    alice.session.send_text("nobody", "hello?", net.now)
    net.pump()
    (failure,) = alice.take(MessageFailed)
    assert failure.code == "unknown_recipient"
    assert alice.session.unacknowledged == ()


def test_commands_before_login_get_not_logged_in(net):
    peer = net.new_peer()
    for message in (Send("m1", "bob", "hi", 1), Ping()):
        replies = net.raw(peer, codec.encode(message))
        assert error_codes(replies) == ["not_logged_in"]


def test_second_login_on_same_connection_is_refused(net):
    alice = net.join("alice")
    replies = net.raw(alice.peer, codec.encode(Login("alice2")))
    assert error_codes(replies) == ["already_logged_in"]


def test_client_chosen_routing_id_is_refused(net):
    replies = net.raw(b"victim", codec.encode(Login("mallory")))
    assert error_codes(replies) == ["routing_id_refused"]
    assert net.core.registry.by_peer(b"victim") is None


def test_broker_only_commands_from_a_client_are_refused(net):
    alice = net.join("alice")
    fake = Welcome("x", 1, "t", TEST_LIMITS)
    assert error_codes(net.raw(alice.peer, codec.encode(fake))) == ["unknown_command"]


@pytest.mark.parametrize(
    "text,code",
    [
        ("x" * 101, "too_large"),  # over max_text_chars (100)
        ("ї" * 99, None),  # 198 bytes: under both limits
        ("😀" * 51, "too_large"),  # 51 chars but 204 bytes > max_text_bytes (200)
        ("", "malformed"),
    ],
)
def test_text_limits_are_enforced_in_chars_and_bytes(net, text, code):
    alice = net.join("alice")
    net.join("bob")
    replies = net.raw(alice.peer, codec.encode(Send("m1", "bob", text, 1)))
    assert error_codes(replies) == ([code] if code else [])


def test_oversized_body_gets_too_large(net):
    alice = net.join("alice")
    body = json.dumps({"id": "m", "to": "bob", "text": "x" * 2000, "sent_at": 1}).encode()
    assert error_codes(net.raw(alice.peer, [SIGNATURE, b"SEND", body])) == ["too_large"]


def test_broker_rate_limits_a_flood_with_retry_after(net):
    alice = net.join("alice")
    bob = net.join("bob")
    replies = []
    for i in range(15):
        replies += net.raw(alice.peer, codec.encode(Send(f"m{i}", "bob", "flood", net.now)))
    limited = [o.message for o in replies if isinstance(o.message, Error)]
    assert len(limited) == 15 - TEST_LIMITS.rate_burst
    assert all(e.code == "rate_limited" and e.retry_after_ms > 0 for e in limited)
    assert [e.ref for e in limited] == [f"m{i}" for i in range(10, 15)]
    assert len(bob.take(IncomingMessage)) == TEST_LIMITS.rate_burst


def test_session_paces_itself_under_the_broker_limit_keeping_order(net):
    alice = net.join("alice")
    bob = net.join("bob")
    ids = [alice.session.send_text("bob", f"msg {i}", net.now) for i in range(30)]
    for _ in range(40):
        net.advance(250)
    assert [m.id for m in bob.take(IncomingMessage)] == ids
    assert alice.take(BrokerError) == []
    assert alice.session.unacknowledged == ()


def test_session_retries_after_rate_limited(net):
    alice = net.join("alice")
    bob = net.join("bob")
    # the broker tightens its limit after alice learned the old one
    net.core.limits = dataclasses.replace(TEST_LIMITS, rate_per_second=1, rate_burst=2)
    net.core._send_budgets.clear()
    ids = [alice.session.send_text("bob", f"msg {i}", net.now) for i in range(4)]
    net.pump()
    limited = [e for e in alice.take(BrokerError) if e.code == "rate_limited"]
    assert limited and all(e.retry_after_ms > 0 for e in limited)
    for _ in range(20):
        net.advance(500)
    assert sorted(m.id for m in bob.take(IncomingMessage)) == sorted(ids)
    assert alice.session.unacknowledged == ()


def test_silent_client_expires_after_heartbeat_timeout(net):
    alice = net.join("alice")
    bob = net.join("bob")
    # bob's process freezes: it neither pings nor reads
    bob.connected = False
    bob.frozen = True
    net.advance(TEST_LIMITS.heartbeat_timeout_ms - 100)
    assert net.core.registry.by_key("bob") is not None
    net.advance(200)
    assert net.core.registry.by_key("bob") is None
    assert PresenceChanged("bob", False, net.now) in alice.take(PresenceChanged)


def test_pinging_client_stays_online(net):
    alice = net.join("alice")
    for _ in range(20):
        net.advance(500)
    assert net.core.registry.by_key("alice") is not None
    assert alice.session.state is State.ONLINE


def test_client_detects_a_silent_broker(net):
    alice = net.join("alice")
    net.core = BrokerCore(TEST_LIMITS)  # the broker "restarts" and forgets alice...
    alice.connected = False  # ...and nothing comes back
    net.advance(TEST_LIMITS.heartbeat_timeout_ms + 1)
    (lost,) = alice.take(ConnectionLost)
    assert "no reply" in lost.reason
    assert alice.session.state is State.DISCONNECTED


def test_disconnect_frees_the_name_at_once(net):
    alice = net.join("alice")
    net.disconnect(alice)
    again = net.join("Alice")
    assert again.take(LoggedIn)


def test_reconnect_resumes_with_token_even_before_old_session_expires(net):
    alice = net.join("alice")
    bob = net.join("bob")
    bob.take(PresenceChanged)
    alice.connected = False  # network drop: the broker has not noticed
    net.reconnect(alice)
    (logged_in,) = alice.take(LoggedIn)[-1:]
    assert logged_in.resumed
    assert bob.take(PresenceChanged) == []  # a resume is not a leave + join
    bob.session.send_text("alice", "still there?", net.now)
    net.pump()
    assert [m.text for m in alice.take(IncomingMessage)] == ["still there?"]


def test_wrong_resume_token_cannot_steal_a_name(net):
    net.join("alice")
    thief = net.new_peer()
    replies = net.raw(thief, codec.encode(Login("alice", resume_token="guess")))
    assert error_codes(replies) == ["name_taken"]


def test_unacknowledged_messages_are_resent_with_same_id_after_reconnect(net):
    alice = net.join("alice")
    bob = net.join("bob")
    alice.connected = False  # alice's sends are lost on the way
    message_id = alice.session.send_text("bob", "survive me", net.now)
    net.pump()
    assert alice.session.unacknowledged[0].id == message_id
    net.reconnect(alice)
    (incoming,) = bob.take(IncomingMessage)
    assert incoming.id == message_id
    assert [a.id for a in alice.take(MessageAccepted)] == [message_id]


def test_broker_restart_makes_session_log_in_again(net):
    alice = net.join("alice")
    net.core = BrokerCore(TEST_LIMITS)  # restarted broker: alice's next ping is unknown
    net.advance(TEST_LIMITS.heartbeat_interval_ms)
    assert alice.session.state is State.ONLINE
    assert net.core.registry.by_key("alice") is not None


def test_duplicate_delivery_is_shown_once_and_still_receipted(net):
    alice = net.join("alice")
    deliver = Deliver("m1", "9", "bob", "hi", 1, 2, 1)
    first = alice.session.receive(codec.encode(deliver), net.now)
    second = alice.session.receive(codec.encode(deliver), net.now)
    assert len(first) == 1 and second == []
    alice.session.confirm(first[0].seq, net.now)  # the application is done with it
    # Both answered by one cumulative receipt...
    receipts = [f for f in alice.session.data_to_send() if codec.command_of(f) == b"RECEIPT"]
    assert [codec.decode(r) for r in receipts] == [Receipt(1)]
    # ...and a later duplicate is confirmed again: the first receipt may have been lost.
    alice.session.receive(codec.encode(deliver), net.now)
    receipts = [f for f in alice.session.data_to_send() if codec.command_of(f) == b"RECEIPT"]
    assert [codec.decode(r) for r in receipts] == [Receipt(1)]


def test_receipt_confirms_only_the_own_stream_and_only_what_was_sent(net):
    alice = net.join("alice")
    bob = net.join("bob")
    mallory = net.join("mallory")
    bob.connected = False  # bob's client takes no part: the test speaks for it
    alice.session.send_text("bob", "secret", net.now)
    out = net.core.handle_frames(alice.peer, alice.session.data_to_send()[0], net.clock)
    net.route(out)
    receipt = [SIGNATURE, b"RECEIPT", json.dumps({"seq": 1}).encode()]
    net.raw(mallory.peer, receipt)  # mallory's stream is empty: nothing to confirm
    assert alice.take(MessageDelivered) == []
    # Bob's client claims far more than it was sent: only seq 1 is confirmed.
    net.raw(bob.peer, [SIGNATURE, b"RECEIPT", json.dumps({"seq": 99}).encode()])
    assert [d.to for d in alice.take(MessageDelivered)] == ["bob"]
    alice.session.send_text("bob", "second", net.now)
    net.pump()
    assert net.store.confirmed_through("bob") == 1
    assert net.store.unconfirmed_count("bob") == 1


def test_one_receipt_confirms_a_batch_with_one_delivered_per_sender(net):
    alice = net.join("alice")
    carol = net.join("carol")
    bob = net.join("bob")
    bob.connected = False  # collect what bob is sent, then answer all at once
    for i in range(3):
        alice.session.send_text("bob", f"a{i}", net.now)
        carol.session.send_text("bob", f"c{i}", net.now)
    net.pump()
    delivers = [codec.decode(f) for f in net.raw_replies[bob.peer]]
    assert [d.seq for d in delivers if isinstance(d, Deliver)] == [1, 2, 3, 4, 5, 6]
    out = net.core.handle_frames(bob.peer, codec.encode(Receipt(6)), net.clock)
    told = {o.peer: o.message for o in out}
    assert isinstance(told[alice.peer], Delivered) and len(told[alice.peer].ids) == 3
    assert isinstance(told[carol.peer], Delivered) and len(told[carol.peer].ids) == 3
    net.route(out)
    assert sorted(e.to for e in alice.take(MessageDelivered)) == ["bob"] * 3
    assert net.store.confirmed_through("bob") == 6


def test_coalesce_merges_a_turns_acknowledgements_per_peer_keeping_order():
    a, b = b"\x00aaaa", b"\x00bbbb"
    turn = [
        Outgoing(a, Accepted(("m1",), ("1",), 5)),
        Outgoing(b, Pong(5)),
        Outgoing(a, Accepted(("m2",), ("2",), 5)),
        Outgoing(a, Pong(5)),  # later ACCEPTEDs must not jump ahead of this
        Outgoing(a, Accepted(("m3",), ("3",), 5)),
        Outgoing(a, Accepted(("m4",), ("4",), 6)),  # another time: its own message
        Outgoing(b, Delivered("x", 7, ("n1",), ("8",))),
        Outgoing(b, Delivered("x", 7, ("n2",), ("9",))),
    ]
    assert coalesce(turn) == [
        Outgoing(a, Accepted(("m1", "m2"), ("1", "2"), 5)),
        Outgoing(b, Pong(5)),
        Outgoing(a, Pong(5)),
        Outgoing(a, Accepted(("m3",), ("3",), 5)),
        Outgoing(a, Accepted(("m4",), ("4",), 6)),
        Outgoing(b, Delivered("x", 7, ("n1", "n2"), ("8", "9"))),
    ]


@pytest.mark.parametrize(
    "message",
    [Accepted(("m1", "m2"), ("1",), 5), Delivered("bob", 5, ("m1",), ("1", "2"))],
    ids=["accepted", "delivered"],
)
def test_session_refuses_acknowledgements_with_unpaired_ids(message):
    session = ClientSession("alice", id_factory=lambda: "m1")
    session.connect(1)
    session.receive(codec.encode(Welcome("alice", 1, "token", TEST_LIMITS)), 1)
    session.send_text("bob", "hi", 2)
    with pytest.raises(RemoteProtocolError):
        session.receive(codec.encode(message), 3)
    assert len(session.unacknowledged) == 1  # nothing was taken as acknowledged


def test_coalesce_caps_the_ids_per_message():
    peer = b"\x00aaaa"
    turn = [Outgoing(peer, Accepted((f"m{i}",), (str(i),), 5)) for i in range(MAX_IDS_PER_ACK + 1)]
    merged = coalesce(turn)
    assert [len(o.message.ids) for o in merged] == [MAX_IDS_PER_ACK, 1]
    assert [i for o in merged for i in o.message.ids] == [
        f"m{i}" for i in range(MAX_IDS_PER_ACK + 1)
    ]


def test_who_lists_online_users(net):
    alice = net.join("alice")
    net.join("Богдан")
    alice.session.request_online(net.now)
    net.pump()
    assert alice.take(OnlineUsers) == [OnlineUsers(("alice", "Богдан"))]


def test_ping_gets_pong_with_server_time(net):
    alice = net.join("alice")
    (reply,) = net.raw(alice.peer, codec.encode(Ping()))
    assert reply.message == Pong(net.now)


def test_error_budget_stops_answering_a_garbage_flood(net):
    peer = net.new_peer()
    answered = sum(len(net.raw(peer, [b"garbage"])) for _ in range(100))
    assert 0 < answered < 100
    net.advance(10_000)
    # Disconnected for misbehaving: nothing but a LOGIN is read, even once refilled.
    assert net.raw(peer, [b"garbage"]) == []


def test_handoff_to_a_vanished_recipient_is_kept_for_its_next_login(net):
    alice = net.join("alice")
    bob = net.join("bob")
    message_id = alice.session.send_text("bob", "hello", net.now)
    out = net.core.handle_frames(alice.peer, alice.session.data_to_send()[0], net.clock)
    deliver = next(o for o in out if isinstance(o.message, Deliver))
    follow_up = net.core.send_failed(deliver, unreachable=True, now=net.clock)
    net.route([o for o in out if o is not deliver] + follow_up)
    assert [a.id for a in alice.take(MessageAccepted)] == [message_id]
    assert net.core.registry.by_key("bob") is None
    assert PresenceChanged("bob", False, net.now) in alice.take(PresenceChanged)
    bob.connected = False
    net.reconnect(bob)
    assert [m.id for m in bob.take(IncomingMessage)] == [message_id]
    assert [d.id for d in alice.take(MessageDelivered)] == [message_id]


def test_with_keys_required_identity_is_the_key(net):
    net.core.require_keys = True
    peer, other = net.new_peer(), net.new_peer()
    assert net.core.handle_frames(peer, codec.encode(Login("alice")), net.clock, None) == []
    (welcome,) = net.core.handle_frames(peer, codec.encode(Login("alice")), net.clock, "key-A")
    assert isinstance(welcome.message, Welcome)
    assert net.core.handle_frames(peer, codec.encode(Ping()), net.clock, "key-A")
    # the same connection speaking with another key is dropped, not served
    assert net.core.handle_frames(peer, codec.encode(Ping()), net.clock, "key-B") == []
    net.core.disconnected(peer, net.clock)
    refused = net.core.handle_frames(other, codec.encode(Login("ALICE")), net.clock, "key-B")
    assert error_codes(refused) == ["name_owned"]


def test_session_cap_answers_server_full_and_claims_nothing():
    store = MemoryStore()
    core = BrokerCore(TEST_LIMITS, store=store, require_keys=True, max_sessions=2)
    for i, name in enumerate(("a", "b")):
        peer = b"\x00" + (i + 1).to_bytes(4, "big")
        core.handle_frames(peer, codec.encode(Login(name)), AT, f"key-{name}")
    refused = core.handle_frames(b"\x00\x00\x00\x00\x09", codec.encode(Login("c")), AT, "key-c")
    assert error_codes(refused) == ["server_full"]
    assert store.name_owner("c") is None  # a refused login registers nothing


def test_new_names_are_limited_per_address():
    core = BrokerCore(TEST_LIMITS, store=MemoryStore(), require_keys=True)
    codes = []
    for i in range(12):
        peer = b"\x00" + (i + 1).to_bytes(4, "big")
        out = core.handle_frames(peer, codec.encode(Login(f"user{i}")), AT, f"k{i}", "10.0.0.1")
        codes.append(error_codes(out)[0] if error_codes(out) else "ok")
    assert codes[:10] == ["ok"] * 10 and codes[10:] == ["rate_limited"] * 2
    elsewhere = core.handle_frames(
        b"\x00\x00\x00\x01\x00", codec.encode(Login("x")), AT, "kx", "10.0.0.2"
    )
    assert error_codes(elsewhere) == []


def test_plaintext_to_a_remote_address_is_refused_by_the_sdk():
    from mangogram_proto.keys import ServerKeyError, resolve_security

    assert resolve_security("tcp://127.0.0.1:5555", plaintext=True) is None
    with pytest.raises(ServerKeyError, match="loopback"):
        resolve_security("tcp://192.0.2.10:5555", plaintext=True)


def test_on_a_busy_broker_presence_goes_to_contacts_only(net, monkeypatch):
    import mangogram_broker.core as core_module

    monkeypatch.setattr(core_module, "PRESENCE_BROADCAST_LIMIT", 2)
    alice = net.join("alice")
    dave = net.join("dave")
    alice.session.send_text("dave", "we are contacts now", net.now)
    net.pump()
    bob = net.join("bob")
    carol = net.join("carol")
    for client in (alice, bob, carol):
        client.take(PresenceChanged)
    dave.session.leave(net.now)
    net.pump()
    assert [p.name for p in alice.take(PresenceChanged)] == ["dave"]
    assert bob.take(PresenceChanged) == [] and carol.take(PresenceChanged) == []
    again = net.join("dave")
    (welcome,) = again.take(LoggedIn)
    assert welcome.online == ("alice",)  # only contacts are listed on a busy broker
    alice.session.request_online(net.now)
    net.pump()
    (everyone,) = alice.take(OnlineUsers)
    assert set(everyone.users) == {"alice", "bob", "carol", "dave"}  # WHO still lists all


@pytest.mark.parametrize(
    "field,size,code",
    [
        ("id", 64, None),
        ("id", 65, "malformed"),
        ("body", TEST_LIMITS.max_body_bytes, None),
        ("body", TEST_LIMITS.max_body_bytes + 1, "too_large"),
        ("name", TEST_LIMITS.max_name_chars, None),
        ("name", TEST_LIMITS.max_name_chars + 1, "name_invalid"),
    ],
)
def test_each_limit_just_under_and_just_over(net, field, size, code):
    alice = net.join("alice")
    net.join("bob")
    if field == "name":
        replies = net.raw(net.new_peer(), codec.encode(Login("n" * size)))
    elif field == "id":
        replies = net.raw(alice.peer, codec.encode(Send("i" * size, "bob", "hi", 1)))
    else:
        base = json.dumps({"id": "m1", "to": "bob", "text": "", "sent_at": 1, "pad": ""})
        body = base.replace('"pad": ""', '"pad": "' + "p" * (size - len(base)) + '"')
        body = body.replace('"text": ""', '"text": "x"')
        body = body.replace('"pad": "p', '"pad": "', 1)
        assert len(body.encode()) == size
        replies = net.raw(alice.peer, [SIGNATURE, b"SEND", body.encode()])
    assert error_codes(replies) == ([code] if code else [])


def test_a_rate_limit_hold_that_has_passed_schedules_no_past_deadline(net):
    alice = net.join("alice")
    net.join("bob")
    pending = alice.session.send_text("bob", "x", net.now)
    alice.session.data_to_send()
    limited = Error("rate_limited", "slow down", ref=pending, retry_after_ms=100)
    alice.session.receive(codec.encode(limited), net.now)
    later = net.now + 1000
    for i in range(400):  # more than the in-flight cap, so some always wait
        alice.session.send_text("bob", f"queued {i}", later)
    alice.session.tick(later)
    deadline = alice.session.next_deadline()
    assert deadline is not None and deadline >= later  # a past deadline spins the driver


def refusals(outgoing: list[Outgoing]) -> list[tuple[str, str | None]]:
    return [(o.message.code, o.message.ref) for o in outgoing if isinstance(o.message, Error)]


@pytest.mark.parametrize("length", [65, 100, 256])
def test_a_send_refused_for_its_id_length_names_it(net, length):
    alice = net.join("alice")
    long_id = "i" * length
    replies = net.raw(alice.peer, codec.encode(Send(long_id, "alice", "hi", 1)))
    assert refusals(replies) == [("malformed", long_id)]
    anonymous = net.raw(net.new_peer(), codec.encode(Send(long_id, "alice", "hi", 1)))
    assert refusals(anonymous) == [("not_logged_in", long_id)]


def test_an_id_too_long_to_echo_is_refused_without_a_ref(net):
    alice = net.join("alice")
    replies = net.raw(alice.peer, codec.encode(Send("i" * 257, "alice", "hi", 1)))
    assert refusals(replies) == [("malformed", None)]


def test_an_oversized_send_body_names_the_message(net):
    alice = net.join("alice")
    body = json.dumps({"id": "big-1", "to": "alice", "text": "x" * 2000, "sent_at": 1})
    assert len(body) > TEST_LIMITS.max_body_bytes
    replies = net.raw(alice.peer, [SIGNATURE, b"SEND", body.encode()])
    assert refusals(replies) == [("too_large", "big-1")]


def test_at_the_session_cap_an_online_name_is_taken_and_a_new_one_finds_the_broker_full(net):
    alice = net.join("alice")
    net.core.max_sessions = 1  # alice fills the broker
    assert error_codes(net.raw(net.new_peer(), codec.encode(Login("ALICE")))) == ["name_taken"]
    assert error_codes(net.raw(net.new_peer(), codec.encode(Login("bob")))) == ["server_full"]
    bad = Login("a@b")
    assert error_codes(net.raw(net.new_peer(), codec.encode(bad))) == ["name_invalid"]
    token = net.core.registry.by_peer(alice.peer).resume_token
    taken_over = net.raw(net.new_peer(), codec.encode(Login("alice", resume_token=token)))
    assert isinstance(taken_over[0].message, Welcome)  # a takeover adds no session
    assert len(net.core.registry) == 1


def test_presence_reaches_everyone_while_at_most_the_limit_are_online_after_the_event(
    net, monkeypatch
):
    # protocol.md section 4: count the users online after the event (with a new user,
    # without one who left); at most the limit: everyone; above it: contacts only.
    import mangogram_broker.core as core_module

    monkeypatch.setattr(core_module, "PRESENCE_BROADCAST_LIMIT", 3)
    alice, bob = net.join("alice"), net.join("bob")
    carol = net.join("carol")  # 3 online after her login: at the limit
    assert [p.name for p in alice.take(PresenceChanged)] == ["bob", "carol"]
    assert [p.name for p in bob.take(PresenceChanged)] == ["carol"]
    (welcome,) = carol.take(LoggedIn)
    assert set(welcome.online) == {"alice", "bob"}
    dave = net.join("dave")  # 4 after his login: above it, and dave has no contacts
    assert alice.take(PresenceChanged) == [] and bob.take(PresenceChanged) == []
    (welcome,) = dave.take(LoggedIn)
    assert welcome.online == ()
    carol.take(PresenceChanged)
    dave.session.leave(net.now)  # 3 remain after he left: at the limit again
    net.pump()
    assert [p.name for p in alice.take(PresenceChanged)] == ["dave"]
    assert [p.name for p in carol.take(PresenceChanged)] == ["dave"]
