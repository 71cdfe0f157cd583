"""LOGIN's `takeover` (the owner's key replaces its own session online elsewhere) and
LOOKUP (is a name registered?), in the pure broker core and the client session."""

from __future__ import annotations

import pytest

from mangogram_broker.clock import Clock
from mangogram_broker.core import BrokerCore, Outgoing
from mangogram_broker.store import MemoryStore, SqliteStore, Store
from mangogram_proto import codec
from mangogram_proto.events import LoggedIn, NameStatus
from mangogram_proto.messages import (
    Error,
    Leave,
    Login,
    Lookup,
    NameInfo,
    Online,
    Ping,
    Presence,
    Send,
    Welcome,
    Who,
)
from mangogram_proto.session import ClientSession

from .harness import TEST_LIMITS, Network

NOW = Clock(1_767_268_800_000, 1_000)


def peer(n: int) -> bytes:
    return b"\x00" + n.to_bytes(4, "big")


@pytest.fixture(params=["memory", "sqlite"])
def store(request, tmp_path) -> Store:
    """The same rules over both stores: the answers come from the Store protocol."""
    if request.param == "memory":
        return MemoryStore()
    sqlite = SqliteStore(tmp_path / "takeover.sqlite3", durability="normal")
    request.addfinalizer(sqlite.close)
    return sqlite


def say(core: BrokerCore, who: bytes, message, key: str | None) -> list[Outgoing]:
    return core.handle_frames(who, codec.encode(message), NOW, key, "127.0.0.1")


def codes(out: list[Outgoing]) -> list[str]:
    return [o.message.code for o in out if isinstance(o.message, Error)]


def logged_in(core: BrokerCore, who: bytes, name: str, key: str | None) -> None:
    out = say(core, who, Login(name), key)
    assert isinstance(out[0].message, Welcome), out


def test_the_owner_key_takes_over_its_session_online_elsewhere(store):
    core = BrokerCore(TEST_LIMITS, store=store, require_keys=True)
    logged_in(core, peer(1), "Mei", "key-mei")
    logged_in(core, peer(2), "bob", "key-bob")
    # Without the flag, the same key still gets name_taken (nothing changes for old clients).
    assert codes(say(core, peer(3), Login("Mei"), "key-mei")) == ["name_taken"]
    out = say(core, peer(3), Login("mei", takeover=True), "key-mei")
    assert isinstance(out[0].message, Welcome) and out[0].peer == peer(3)
    # The old connection is dropped from the session and told why (ERROR taken_over, so
    # it stops logging in again), and nobody hears of a leave or a join.
    assert [o.message for o in out if o.peer != peer(3)] == [
        Error("taken_over", "mei signed in elsewhere")
    ]
    assert not any(isinstance(o.message, Presence) for o in out)
    session = core.registry.by_key("mei")
    assert session is not None and session.peer == peer(3) and session.name == "mei"
    assert codes(say(core, peer(1), Ping(), "key-mei")) == ["not_logged_in"]


def test_takeover_from_another_key_is_name_owned(store):
    core = BrokerCore(TEST_LIMITS, store=store, require_keys=True)
    logged_in(core, peer(1), "Mei", "key-mei")
    assert codes(say(core, peer(2), Login("Mei", takeover=True), "key-eve")) == ["name_owned"]
    assert core.registry.by_key("mei").peer == peer(1)


def test_takeover_is_refused_in_plaintext_mode(store):
    core = BrokerCore(TEST_LIMITS, store=store)
    logged_in(core, peer(1), "Mei", None)
    assert codes(say(core, peer(2), Login("Mei", takeover=True), None)) == ["name_taken"]
    assert core.registry.by_key("mei").peer == peer(1)


def test_takeover_with_nobody_online_is_an_ordinary_login(store):
    core = BrokerCore(TEST_LIMITS, store=store, require_keys=True)
    out = say(core, peer(1), Login("Mei", takeover=True), "key-mei")
    assert isinstance(out[0].message, Welcome)
    assert store.name_owner("mei") == "key-mei"


def test_the_taken_over_mailbox_comes_again_to_the_new_connection(store):
    core = BrokerCore(TEST_LIMITS, store=store, require_keys=True)
    logged_in(core, peer(1), "Mei", "key-mei")
    logged_in(core, peer(2), "bob", "key-bob")
    say(core, peer(2), Send("m1", "Mei", "hi", 1), "key-bob")  # unconfirmed at peer 1
    out = say(core, peer(3), Login("Mei", takeover=True), "key-mei")
    assert [o.message.text for o in out if o.message.COMMAND == "DELIVER"] == ["hi"]


def test_lookup_answers_from_the_name_registry(store):
    core = BrokerCore(TEST_LIMITS, store=store)
    logged_in(core, peer(1), "Олена", None)
    logged_in(core, peer(2), "Taras", None)
    say(core, peer(2), Leave(), None)  # offline, but registered for good
    cases = [("TARAS", "Taras", True), ("олена", "Олена", True), ("Nobody", "Nobody", False)]
    cases.append(("x" * (4 * TEST_LIMITS.max_name_chars + 1), "", False))  # as SEND's bound
    cases.append(("", "", False))
    for asked, answered, known in cases:
        (answer,) = say(core, peer(1), Lookup(asked), None)
        assert answer == Outgoing(peer(1), NameInfo(answered or asked, known))


def test_lookup_needs_a_session(store):
    core = BrokerCore(TEST_LIMITS, store=store)
    assert codes(say(core, peer(1), Lookup("x"), None)) == ["not_logged_in"]


def test_lookup_is_rate_limited_together_with_who():
    core = BrokerCore(TEST_LIMITS, store=MemoryStore())
    logged_in(core, peer(1), "Mei", None)
    burst = core.rates.burst(core.rates.who)
    for _ in range(burst // 2):
        assert isinstance(say(core, peer(1), Who(), None)[0].message, Online)
    answers = [say(core, peer(1), Lookup("Nobody"), None) for _ in range(burst // 2 + 1)]
    assert all(isinstance(a[0].message, NameInfo) for a in answers[:-1])
    (refused,) = answers[-1]
    assert refused.message.code == "rate_limited" and refused.message.retry_after_ms


def test_session_asks_for_takeover_once_then_resumes_with_its_token():
    session = ClientSession("Mei", takeover=True)
    session.connect(0)
    (first,) = session.data_to_send()
    assert codec.decode(first) == Login("Mei", takeover=True)
    welcome = Welcome("Mei", 0, "token-1", TEST_LIMITS)
    assert isinstance(session.receive(codec.encode(welcome), 0)[0], LoggedIn)
    session.connect(1)  # a reconnect later: the token, never the flag again
    (again,) = session.data_to_send()
    login = codec.decode(again)
    assert isinstance(login, Login) and login.resume_token == "token-1"
    assert login.takeover is None
    assert codec.encode(Login("Mei")) == codec.encode(Login("Mei", takeover=None))


def test_session_reports_lookup_answers():
    net = Network()
    alice = net.join("alice")
    net.join("bob")
    alice.session.lookup_name("BOB", net.now)
    alice.session.lookup_name("nobody", net.now)
    net.pump()
    assert alice.take(NameStatus) == [NameStatus("bob", True), NameStatus("nobody", False)]
