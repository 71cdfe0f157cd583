"""Texts from one connection are stored in the order it sent them, also when some are
refused for now (`rate_limited`, `unavailable`): the broker holds the connection's later
SENDs behind the refused one until it comes again (its "send gate"), and the SDK resends
its outbox in order. Pure core tests, a socket-free pair of sessions on a hand-driven
clock, and a real broker with real DEALER sockets."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import pytest

from mangogram_broker.clock import Clock
from mangogram_broker.core import ERROR_BURST, BrokerCore, Outgoing
from mangogram_broker.store import MemoryStore, StoreUnavailable
from mangogram_proto import Client, codec, session
from mangogram_proto.events import BrokerError, IncomingMessage, MessageFailed
from mangogram_proto.messages import Accepted, Error, Login, Send, Welcome

from .conftest import BrokerProcess
from .harness import TEST_LIMITS, Network

# Rate 5/s, burst 5: one token every 200 ms.
LIMITS = dataclasses.replace(TEST_LIMITS, rate_per_second=5, rate_burst=5, max_mailbox=10_000)
WALL = 1_767_268_800_000


def peer(n: int) -> bytes:
    return b"\x00" + n.to_bytes(4, "big")


class Broker:
    """A BrokerCore on a hand-driven monotonic clock."""

    def __init__(self, limits=LIMITS, store: MemoryStore | None = None) -> None:
        self.store = store if store is not None else MemoryStore()
        self.core = BrokerCore(limits, store=self.store)
        self.mono = 1_000

    def say(self, who: bytes, message: Any) -> list[Outgoing]:
        clock = Clock(WALL + self.mono, self.mono)
        out = self.core.handle_frames(who, codec.encode(message), clock, None, "127.0.0.1")
        self.store.commit()
        return out

    def login(self, who: bytes, name: str, token: str | None = None) -> Welcome:
        (welcome, *_rest) = self.say(who, Login(name, token))
        assert isinstance(welcome.message, Welcome), welcome
        return welcome.message

    def send(self, who: bytes, message_id: str, to: str = "bob") -> Error | Accepted:
        """The answer to the sender of one SEND."""
        answers = [o.message for o in self.say(who, Send(message_id, to, "hi", 0)) if o.peer == who]
        (answer,) = answers
        assert isinstance(answer, Error | Accepted), answer
        return answer


def accepted(answer: Error | Accepted) -> bool:
    return isinstance(answer, Accepted)


@pytest.fixture
def broker() -> Broker:
    broker = Broker()
    broker.login(peer(9), "bob")
    broker.login(peer(1), "alice")
    return broker


def rate_limited_at(broker: Broker, who: bytes = peer(1)) -> tuple[list[str], Error]:
    """Send until one is refused; returns the accepted ids and the refusal."""
    ids = []
    for n in range(LIMITS.rate_burst + 1):
        answer = broker.send(who, f"s{n}")
        if isinstance(answer, Error):
            assert answer.code == "rate_limited" and answer.ref == f"s{n}"
            return ids, answer
        ids.append(f"s{n}")
    raise AssertionError("never rate limited")


# The core


def test_after_a_rate_limited_send_later_ones_are_held_even_with_a_token_free(broker):
    ids, refusal = rate_limited_at(broker)
    refused = refusal.ref
    assert refused == "s5" and refusal.retry_after_ms == 200
    # A scheduling stall: by the time the next SEND arrives a token is free. Accepting it
    # would store it before the refused one.
    broker.mono += 250
    held = broker.send(peer(1), "s6")
    assert isinstance(held, Error)
    assert (held.code, held.ref) == ("rate_limited", "s6")
    assert held.retry_after_ms is not None and held.retry_after_ms >= 1
    # The refused id opens the gate (and finds the token the held one did not take)...
    assert accepted(broker.send(peer(1), refused))
    broker.mono += 200
    assert accepted(broker.send(peer(1), "s6"))
    stored = [m.client_id for m in broker.store.unconfirmed("bob", 0, 100)]
    assert stored == [*ids, "s5", "s6"]


def test_held_refusals_carry_the_time_left_of_the_first_one(broker):
    _ids, refusal = rate_limited_at(broker)
    broker.mono += 150
    held = broker.send(peer(1), "x")
    assert isinstance(held, Error) and held.retry_after_ms == 200 - 150
    broker.mono += 100  # past the first one's retry_after: "now", at least 1 ms
    held = broker.send(peer(1), "y")
    assert isinstance(held, Error) and held.retry_after_ms == 1


def test_the_refused_id_refused_again_keeps_the_gate(broker):
    _ids, refusal = rate_limited_at(broker)
    again = broker.send(peer(1), "s5")  # too early: no token yet
    assert isinstance(again, Error) and (again.code, again.ref) == ("rate_limited", "s5")
    broker.mono += 300
    held = broker.send(peer(1), "s6")
    assert isinstance(held, Error) and held.ref == "s6"
    assert accepted(broker.send(peer(1), "s5"))


def test_the_gate_expires_for_a_client_that_never_resends(broker):
    _ids, refusal = rate_limited_at(broker)
    assert refusal.retry_after_ms is not None
    broker.mono += refusal.retry_after_ms + LIMITS.heartbeat_timeout_ms - 1
    assert not accepted(broker.send(peer(1), "s6"))
    broker.mono += 1
    # A PING keeps the session alive in real life; here nobody expires it.
    assert accepted(broker.send(peer(1), "s7"))


def test_the_gate_belongs_to_the_connection(broker):
    broker.login(peer(2), "carol")
    _ids, _refusal = rate_limited_at(broker)
    broker.mono += 250
    assert accepted(broker.send(peer(2), "c1"))  # another user's connection: not held
    assert not accepted(broker.send(peer(1), "s6"))
    # The same user resuming on a new connection starts without it (the client resends
    # its outbox in order after a login).
    token = broker.core.registry.by_peer(peer(1)).resume_token
    broker.login(peer(3), "alice", token)
    assert accepted(broker.send(peer(3), "s6"))
    # And a session that ends takes its gate with it.
    _ids, _refusal = rate_limited_at(broker, peer(2))
    broker.core.disconnected(peer(2), Clock(WALL + broker.mono, broker.mono))
    broker.mono += 250
    broker.login(peer(2), "carol")
    assert accepted(broker.send(peer(2), "after"))


def test_held_refusals_spend_no_rate_token_and_no_error_budget(broker):
    _ids, _refusal = rate_limited_at(broker)
    broker.mono += 1000  # the bucket refills (5 tokens) while SENDs are held
    held = [broker.send(peer(1), f"h{n}") for n in range(5 * ERROR_BURST)]
    # Every one answered, with its own ref: none dropped by the error budget.
    assert [(e.code, e.ref) for e in held] == [("rate_limited", f"h{n}") for n in range(100)]
    assert broker.core.registry.by_peer(peer(1)) is not None
    # The budget is whole: ERROR_BURST errors without a ref are all still answered.
    bad = [
        o
        for _ in range(ERROR_BURST)
        for o in broker.core.handle_frames(
            peer(1), [b"MGP02", b"NOPE", b"{}"], Clock(WALL + broker.mono, broker.mono)
        )
    ]
    assert len(bad) == ERROR_BURST
    # No token was taken: the refused one and 4 more go in, then the bucket is empty.
    assert accepted(broker.send(peer(1), "s5"))
    assert [accepted(broker.send(peer(1), f"h{n}")) for n in range(5)] == [True] * 4 + [False]


def test_final_refusals_do_not_gate(broker):
    nobody = broker.send(peer(1), "n1", to="nobody-at-all")
    assert isinstance(nobody, Error) and nobody.code == "unknown_recipient"
    assert accepted(broker.send(peer(1), "ok1"))
    small = Broker(dataclasses.replace(LIMITS, max_mailbox=1, rate_burst=100))
    small.login(peer(9), "bob")
    small.login(peer(1), "alice")
    assert accepted(small.send(peer(1), "m1"))
    full = small.send(peer(1), "m2")
    assert isinstance(full, Error) and full.code == "mailbox_full"
    small.login(peer(8), "carol")
    assert accepted(small.send(peer(1), "m3", to="carol"))


class FlakyStore(MemoryStore):
    """A store that cannot store while `down` (as the cluster's JetStream store raises
    when NATS does not answer)."""

    def __init__(self) -> None:
        super().__init__()
        self.down = False
        self.appends: list[str] = []

    def append(self, *args: Any, **kwargs: Any) -> Any:
        self.appends.append(args[4])
        if self.down:
            raise StoreUnavailable("NATS did not answer")
        return super().append(*args, **kwargs)


def test_a_send_refused_unavailable_gates_the_next_ones_the_same_way():
    store = FlakyStore()
    broker = Broker(dataclasses.replace(LIMITS, rate_burst=100), store)
    broker.login(peer(9), "bob")
    broker.login(peer(1), "alice")
    store.down = True
    first = broker.send(peer(1), "u1")
    assert isinstance(first, Error) and (first.code, first.ref) == ("unavailable", "u1")
    store.down = False  # NATS is back before the client resends...
    held = broker.send(peer(1), "u2")  # ...but u2 must not go in before u1
    assert isinstance(held, Error) and (held.code, held.ref) == ("unavailable", "u2")
    assert held.retry_after_ms == 1
    assert store.appends == ["u1"]  # the held one never reached the store
    assert accepted(broker.send(peer(1), "u1"))
    assert accepted(broker.send(peer(1), "u2"))
    assert [m.client_id for m in store.unconfirmed("bob", 0, 10)] == ["u1", "u2"]


# A pair of sessions and the core, on a hand-driven clock


def test_two_hundred_pipelined_texts_at_a_tight_rate_arrive_once_and_in_order(monkeypatch):
    # The session paces itself far above the broker's rate (5/s, burst 5): many refusals
    # (the gate's held ones included) and resends, none reordered and none given up.
    monkeypatch.setattr(session, "PACE_FRACTION", 4.0)
    net = Network(LIMITS)
    bob = net.join("bob")
    alice = net.join("alice")
    # A loaded broker: each message takes it 30 ms, so tokens come back while a pipeline
    # of SENDs is being read (what lets a later one overtake a refused one).
    handle = net.core.handle_frames

    def slow(who: bytes, frames: list[bytes], now: Clock) -> list[Outgoing]:
        net.now += 30
        return handle(who, frames, net.clock)

    net.core.handle_frames = slow  # type: ignore[method-assign]
    texts = [f"t{n}" for n in range(200)]
    for text in texts:
        alice.session.send_text("bob", text, net.now)
    net.pump()
    refusals = 0
    for _ in range(20_000):
        if alice.session.outbox_size == 0:
            break
        deadlines = [c.session.next_deadline() for c in (alice, bob)]
        step = max(1, min(d for d in deadlines if d is not None) - net.now)
        net.advance(step)
        refusals += len([e for e in alice.take(BrokerError) if e.code == "rate_limited"])
    assert alice.session.outbox_size == 0
    net.pump()
    got = [e.text for e in bob.take(IncomingMessage)]
    assert got == texts
    assert refusals > 10  # the gate and the resends were exercised
    assert not alice.take(MessageFailed)
    assert len(net.store.unconfirmed("bob", 0, 1000)) <= len(texts)  # each stored once


# A real broker, real sockets


def test_texts_piped_faster_than_the_broker_allows_arrive_once_and_in_order(
    tmp_path: Path, zctx, monkeypatch
):
    # The SDK paces at 3 times the broker's rate (100/s, burst 20), as a stalled client
    # or broker does in bursts: hundreds of refusals, every text once, in order.
    monkeypatch.setattr(session, "PACE_FRACTION", 3.0)
    broker = BrokerProcess(tmp_path / "data", "--rate-per-second", "100", "--rate-burst", "20")
    try:
        texts = [f"line {n}" for n in range(300)]
        with Client("bob", broker.endpoint, context=zctx):
            pass
        refused = 0
        with Client("alice", broker.endpoint, context=zctx) as alice:
            for text in texts:
                alice.send("bob", text)
            deadline = time.monotonic() + 60
            while alice.session.outbox_size:
                assert time.monotonic() < deadline, alice.session.outbox_size
                event = alice.next_event(timeout=0.5)
                assert not isinstance(event, MessageFailed), event
                refused += getattr(event, "code", None) == "rate_limited"
        got: list[IncomingMessage] = []
        with Client("bob", broker.endpoint, context=zctx) as bob:
            deadline = time.monotonic() + 30
            while len(got) < len(texts) and time.monotonic() < deadline:
                message = bob.receive(timeout=1)
                if message is not None:
                    got.append(message)
            assert bob.receive(timeout=0.3) is None  # and nothing more
        assert [m.text for m in got] == texts
        assert len({m.id for m in got}) == len(texts)
        assert refused > 0, "the broker never refused: the test proved nothing"
    finally:
        broker.kill()
    assert "Traceback" not in broker.log_text()
