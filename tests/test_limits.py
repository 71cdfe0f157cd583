"""Nobody stuck, nothing unbounded, no timer on the wall clock: answers to refused SENDs,
the error budget, per-command rate limits, the HISTORY_PAGE byte cap and the two clocks,
over the broker core with both stores and no sockets."""

from __future__ import annotations

import dataclasses

import pytest

from mangogram_broker.config import parse_config
from mangogram_broker.core import MAX_HISTORY_BYTES, BrokerCore, CommandRates
from mangogram_broker.store import SqliteStore
from mangogram_proto import codec
from mangogram_proto.events import IncomingMessage, PresenceChanged
from mangogram_proto.messages import (
    Accepted,
    Error,
    History,
    HistoryPage,
    Login,
    Online,
    Ping,
    Pong,
    Presence,
    Read,
    Receipt,
    Send,
    Welcome,
    Who,
)

from .harness import TEST_LIMITS, Network


@pytest.fixture(params=["memory", "sqlite"])
def net(request, tmp_path) -> Network:
    if request.param == "memory":
        return Network()
    store = SqliteStore(tmp_path / "limits.sqlite3", durability="normal")
    request.addfinalizer(store.close)
    return Network(store=store)


def offline(net: Network, name: str) -> None:
    """`name` exists (has logged in once) but is offline."""
    client = net.join(name)
    client.session.leave(net.now)
    net.pump()


def answers(net: Network, peer: bytes, frames_list: list[list[bytes]]) -> dict[str, object]:
    """Send each message as `peer`; map every SEND id to its answer (ACCEPTED, or the
    ERROR naming it)."""
    answered: dict[str, object] = {}
    for frames in frames_list:
        for out in net.raw(peer, frames):
            message = out.message
            if isinstance(message, Accepted):
                for message_id in message.ids:
                    assert message_id not in answered
                    answered[message_id] = message
            elif isinstance(message, Error) and message.ref is not None:
                assert message.ref not in answered
                answered[message.ref] = message
    return answered


def wait(net: Network, ms: int) -> None:
    """Let `ms` pass in small steps, the clients keeping their sessions alive."""
    for _ in range(ms // 500):
        net.advance(500)


def raw_login(net: Network, name: str) -> bytes:
    """A connection logged in as `name` by hand: no session reacts to what it is sent."""
    peer = net.new_peer()
    assert isinstance(net.raw(peer, codec.encode(Login(name)))[0].message, Welcome)
    return peer


def sends(to: str, count: int, prefix: str = "m") -> list[list[bytes]]:
    return [codec.encode(Send(f"{prefix}{i}", to, f"text {i}", 1)) for i in range(count)]


# Item 2: a refused SEND is always answered; misbehaviour disconnects.


def test_every_send_to_a_full_mailbox_is_answered_and_the_sender_is_not_stuck(net):
    net.core.limits = dataclasses.replace(
        TEST_LIMITS, max_mailbox=10, rate_per_second=1000, rate_burst=1000
    )
    offline(net, "bob")
    carol = net.join("carol")
    alice = net.join("alice")
    answered = answers(net, alice.peer, sends("bob", 300))
    assert len(answered) == 300
    accepted = [i for i, a in answered.items() if isinstance(a, Accepted)]
    full = [a for a in answered.values() if isinstance(a, Error) and a.code == "mailbox_full"]
    assert len(accepted) == 10 and len(full) == 290
    # Not disconnected: her next text, to Carol who is online, is accepted and delivered.
    to_carol = answers(net, alice.peer, [codec.encode(Send("c1", "carol", "hi", 1))])
    assert isinstance(to_carol["c1"], Accepted)
    assert net.core.registry.by_peer(alice.peer) is not None
    assert [m.text for m in carol.take(IncomingMessage)] == ["hi"]


def test_rate_limited_unknown_recipient_and_not_logged_in_sends_are_all_answered(net):
    offline(net, "bob")
    alice = net.join("alice")
    answered = answers(net, alice.peer, sends("bob", 100))
    codes = [a.code if isinstance(a, Error) else "accepted" for a in answered.values()]
    assert len(answered) == 100
    assert codes.count("accepted") == TEST_LIMITS.rate_burst
    assert codes.count("rate_limited") == 100 - TEST_LIMITS.rate_burst
    net.core.limits = dataclasses.replace(TEST_LIMITS, rate_per_second=1000, rate_burst=1000)
    dave = net.join("dave")
    nobody = answers(net, dave.peer, sends("nobody", 100, "n"))
    assert [a.code for a in nobody.values()] == ["unknown_recipient"] * 100  # type: ignore[attr-defined]
    anonymous = answers(net, net.new_peer(), sends("bob", 100, "x"))
    assert [a.code for a in anonymous.values()] == ["not_logged_in"] * 100  # type: ignore[attr-defined]


def test_a_peer_misbehaving_beyond_its_error_budget_is_disconnected_until_it_logs_in(net, caplog):
    bob = net.join("bob")
    alice = raw_login(net, "alice")
    replies = []
    for _ in range(40):
        replies += [o.message for o in net.raw(alice, [b"garbage"])]
    malformed = [m for m in replies if isinstance(m, Error) and m.code == "malformed"]
    notices = [m for m in replies if isinstance(m, Error) and m.code == "not_logged_in"]
    assert len(malformed) == 20 and len(notices) == 1
    assert "disconnected" in notices[0].message
    assert "disconnecting" in caplog.text and "alice" in caplog.text  # the reason, logged
    assert net.core.registry.by_peer(alice) is None
    assert [p.name for p in bob.take(PresenceChanged) if not p.joined] == ["alice"]
    wait(net, 10_000)  # the budget refills: still nothing is read
    assert net.raw(alice, codec.encode(Ping())) == []
    assert net.raw(alice, sends("bob", 1)[0]) == []
    # A LOGIN that fails does not end it...
    assert net.raw(alice, codec.encode(Login("bob")))[0].message.code == "name_taken"
    assert net.raw(alice, codec.encode(Ping())) == []
    # ...one that succeeds does.
    welcome = net.raw(alice, codec.encode(Login("alice")))[0]
    assert isinstance(welcome.message, Welcome)
    assert isinstance(net.raw(alice, codec.encode(Ping()))[0].message, Pong)


def test_a_bad_send_beyond_the_budget_is_still_answered_then_disconnected(net):
    alice = raw_login(net, "alice")
    for _ in range(20):
        net.raw(alice, [b"garbage"])
    empty = codec.encode(Send("empty", "bob", "", 1))
    replies = [o.message for o in net.raw(alice, empty)]
    assert [(m.code, m.ref) for m in replies] == [("malformed", "empty"), ("not_logged_in", None)]


# Item 3: every command is rate limited, pages are capped in bytes.


@pytest.mark.parametrize(
    "message,rate",
    [
        (Ping(), CommandRates().ping),
        (Who(), CommandRates().who),
        (History("bob", 5), CommandRates().history),
    ],
)
def test_every_answered_command_is_rate_limited_per_connection(net, message, rate):
    alice = net.join("alice")
    offline(net, "bob")
    replies = []
    for _ in range(200):
        replies += [o.message for o in net.raw(alice.peer, codec.encode(message))]
    served = [m for m in replies if isinstance(m, Pong | Online | HistoryPage)]
    limited = [m for m in replies if isinstance(m, Error)]
    assert len(served) == CommandRates().burst(rate)
    assert limited and all(m.code == "rate_limited" and m.retry_after_ms for m in limited)
    assert len(limited) <= 21  # the error budget bounds the refusals too
    wait(net, 10_000)
    assert isinstance(net.raw(alice.peer, codec.encode(message))[0].message, type(served[0]))


def test_the_ping_limit_never_refuses_the_heartbeat_pace():
    limits = dataclasses.replace(TEST_LIMITS, heartbeat_interval_ms=50)  # 20 pings a second
    net = Network(limits)
    alice = net.join("alice")
    for _ in range(200):
        assert isinstance(net.raw(alice.peer, codec.encode(Ping()))[0].message, Pong)
        net.advance(50, tick_clients=False)


def test_rate_flags_reach_the_broker_and_must_be_positive():
    config = parse_config(["--history-rate", "7", "--max-queued-bytes", "4096"])
    assert config.rates.history == 7 and config.max_queued_bytes == 4096
    assert config.max_history_bytes == MAX_HISTORY_BYTES
    for bad in (["--ping-rate", "0"], ["--max-history-bytes", "0"]):
        with pytest.raises(SystemExit):
            parse_config(bad)


def test_honest_pace_is_never_limited(net):
    alice = net.join("alice")
    offline(net, "bob")
    for _ in range(300):  # ten minutes of a busy console user
        for message in (Ping(), Who(), History("bob", 5)):
            replies = net.raw(alice.peer, codec.encode(message))
            assert not any(isinstance(o.message, Error) for o in replies)
        net.advance(2000, tick_clients=False)


def test_read_and_stale_receipt_floods_are_ignored_beyond_their_rate(net):
    alice = net.join("alice")
    bob = net.join("bob")
    answers(net, alice.peer, sends("bob", 3))
    net.pump()
    stream_mark = net.store.confirmed_through("bob")
    assert stream_mark == 3
    calls = []
    real_mark_read = net.store.mark_read
    net.store.mark_read = lambda *a: calls.append(a) or real_mark_read(*a)  # type: ignore[method-assign]
    for _ in range(1000):
        assert net.raw(bob.peer, codec.encode(Read("1"))) == []
    assert len(calls) == CommandRates().burst(CommandRates().read)
    for _ in range(1000):
        assert net.raw(bob.peer, codec.encode(Receipt(3))) == []
    # A RECEIPT that confirms something new is never refused.
    answers(net, alice.peer, sends("bob", 2, "late"))
    bob.events.clear()
    net.raw(bob.peer, codec.encode(Receipt(5)))
    assert net.store.confirmed_through("bob") == 5


def test_history_pages_are_capped_in_bytes_and_page_through_everything(net):
    limits = dataclasses.replace(
        TEST_LIMITS, max_history_page=200, max_mailbox=1000, rate_per_second=1000, rate_burst=1000
    )
    net.core = BrokerCore(limits, store=net.store, max_history_bytes=2000)
    alice = net.join("alice")
    offline(net, "bob")
    answers(net, alice.peer, [codec.encode(Send(f"h{i}", "bob", "x" * 90, 1)) for i in range(60)])
    seen: list[str] = []
    before = None
    for _ in range(60):
        (reply,) = net.raw(alice.peer, codec.encode(History("bob", 200, before)))
        page = reply.message
        assert isinstance(page, HistoryPage)
        assert len(codec.encode(page, 2)[2]) <= 2000
        seen += [item.id for item in page.items]
        if not page.more:
            break
        before = page.items[-1].broker_id
        wait(net, 1000)
    assert seen == [f"h{i}" for i in reversed(range(60))]


def test_a_message_bigger_than_the_page_cap_still_comes_alone(net):
    net.core = BrokerCore(TEST_LIMITS, store=net.store, max_history_bytes=50)
    alice = net.join("alice")
    offline(net, "bob")
    answers(net, alice.peer, sends("bob", 2))
    (reply,) = net.raw(alice.peer, codec.encode(History("bob", 5)))
    assert len(reply.message.items) == 1 and reply.message.more


# Item 6: timers on the monotonic clock, timestamps on the wall clock.


def test_rate_limit_refills_when_the_wall_clock_steps_back(net):
    alice = net.join("alice")
    offline(net, "bob")
    first = answers(net, alice.peer, sends("bob", TEST_LIMITS.rate_burst + 1))
    assert isinstance(first[f"m{TEST_LIMITS.rate_burst}"], Error)
    net.step_wall(-3_600_000)  # an hour back
    net.advance(1000, tick_clients=False)  # one second passes
    # The refused one again (later ids are held behind it until it comes, protocol.md
    # section 4): the bucket has refilled on the monotonic clock.
    refused = f"m{TEST_LIMITS.rate_burst}"
    again = answers(net, alice.peer, sends("bob", TEST_LIMITS.rate_burst + 1)[-1:])
    assert isinstance(again[refused], Accepted)


def test_a_forward_step_of_the_wall_clock_expires_nobody(net):
    alice = net.join("alice")
    bob = net.join("bob")
    net.step_wall(3_600_000)  # an hour forward, no time passes
    assert net.core.registry.by_peer(alice.peer) is not None
    assert net.core.registry.by_peer(bob.peer) is not None
    assert not [e for e in alice.events if isinstance(e, Presence)]
    # Real silence still ends a session.
    net.advance(TEST_LIMITS.heartbeat_timeout_ms + 200, tick_clients=False)
    assert net.core.registry.by_peer(alice.peer) is None


def test_accepted_at_never_goes_back_when_the_wall_clock_does(net):
    # A raw connection: the client session's own timers are not what is tested here.
    alice = raw_login(net, "alice")
    offline(net, "bob")
    (early,) = answers(net, alice, sends("bob", 1, "a")).values()
    net.step_wall(-60_000)  # a minute back
    net.advance(10, tick_clients=False)
    (held,) = answers(net, alice, sends("bob", 1, "b")).values()
    assert held.accepted_at == early.accepted_at  # held, not a minute earlier
    for _ in range(122):  # the clock catches up; alice keeps her session with pings
        net.advance(500, tick_clients=False)
        net.raw(alice, codec.encode(Ping()))
    (later,) = answers(net, alice, sends("bob", 1, "c")).values()
    assert later.accepted_at == net.now > held.accepted_at


def test_pruning_is_scheduled_on_the_monotonic_clock(net):
    prunes = []
    real_prune = net.store.prune
    net.store.prune = lambda *a: prunes.append(a) or real_prune(*a)  # type: ignore[method-assign]
    net.advance(100)
    count = len(prunes)
    for _ in range(5):
        net.step_wall(3_600_000)  # the wall clock jumping forward does not prune more often
    assert len(prunes) == count


@pytest.mark.parametrize("total,limit", [(100, 50), (48, 48), (47, 48), (16, 16), (17, 200)])
def test_history_read_in_chunks_gives_the_same_pages(net, total, limit):
    limits = dataclasses.replace(
        TEST_LIMITS, max_history_page=200, max_mailbox=1000, rate_per_second=1000, rate_burst=1000
    )
    net.core = BrokerCore(limits, store=net.store)
    alice = net.join("alice")
    offline(net, "bob")
    answers(net, alice.peer, sends("bob", total))
    (reply,) = net.raw(alice.peer, codec.encode(History("bob", limit)))
    page = reply.message
    expected = [f"m{i}" for i in reversed(range(total))]
    assert [item.id for item in page.items] == expected[:limit]
    assert page.more == (total > limit)
