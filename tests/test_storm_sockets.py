"""The real broker on loopback while many connections vanish at once: an honest pair
keeps getting answers, everyone who vanished goes offline, and the pair's view of who is
online, kept from WELCOME and PRESENCE, ends right (issue 12 item 4)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import zmq

from mangogram_proto import codec
from mangogram_proto.messages import (
    Deliver,
    Login,
    Online,
    Ping,
    Pong,
    Presence,
    Receipt,
    Send,
    Welcome,
    Who,
)

from .conftest import BrokerProcess, dealer

pytestmark = pytest.mark.sockets

CROWD = 300  # below the broadcast limit (500), so every departure is told to everyone
RELAXED = ("--heartbeat-interval-ms", "1000", "--heartbeat-timeout-ms", "60000")
OPEN = ("--rate-per-second", "100000", "--rate-burst", "100000")


class Person:
    """A DEALER logged in as `name`, keeping who it believes is online."""

    def __init__(self, zctx: zmq.Context, endpoint: str, name: str) -> None:
        self.name = name
        self.sock = dealer(zctx, endpoint)
        self.sock.send_multipart(codec.encode(Login(name)))
        self.view: set[str] | None = None

    def read(self, timeout_ms: int) -> object | None:
        """One message (None after `timeout_ms`), with presence applied to the view."""
        if not self.sock.poll(timeout_ms):
            return None
        message = codec.decode(self.sock.recv_multipart())
        if isinstance(message, Welcome):
            self.view = set(message.online)
        elif isinstance(message, Presence):
            assert self.view is not None
            if message.event == "joined":
                self.view.add(message.name)
            else:
                self.view.discard(message.name)
        elif isinstance(message, Deliver):
            self.sock.send_multipart(codec.encode(Receipt(message.seq)))
        return message

    def wait_for(self, kind: type, timeout_s: float = 30.0) -> object:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            message = self.read(200)
            if isinstance(message, kind):
                return message
        raise AssertionError(f"{self.name} got no {kind.__name__} in {timeout_s} s")


def test_an_honest_pair_is_answered_while_hundreds_of_connections_vanish(tmp_path: Path, zctx):
    broker = BrokerProcess(tmp_path / "data", *RELAXED, *OPEN)
    people: list[Person] = []
    try:
        alice = Person(zctx, broker.endpoint, "alice")
        alice.wait_for(Welcome)
        bob = Person(zctx, broker.endpoint, "bob")
        bob.wait_for(Welcome)
        people = [alice, bob]
        crowd = [Person(zctx, broker.endpoint, f"crowd{i}") for i in range(CROWD)]
        people += crowd
        for person in crowd:
            person.wait_for(Welcome)
        for person in crowd:  # all at once: their connections close together
            person.sock.close(linger=0)
        for round_trip in range(20):
            alice.sock.send_multipart(codec.encode(Send(f"a{round_trip}", "bob", "ping", 1)))
            assert bob.wait_for(Deliver).text == "ping"  # type: ignore[attr-defined]
            bob.sock.send_multipart(codec.encode(Send(f"b{round_trip}", "alice", "pong", 1)))
            assert alice.wait_for(Deliver).text == "pong"  # type: ignore[attr-defined]
        # Every vanished connection goes offline (the broker is told by the OS).
        deadline = time.monotonic() + 60
        online: tuple[str, ...] = ()
        while time.monotonic() < deadline:
            alice.sock.send_multipart(codec.encode(Who()))
            online = alice.wait_for(Online).users  # type: ignore[attr-defined]
            if len(online) == 2:
                break
            alice.read(200)
        assert sorted(online) == ["alice", "bob"]
        # A PONG comes in a later turn than any presence about those departures.
        for person, other in ((alice, "bob"), (bob, "alice")):
            person.sock.send_multipart(codec.encode(Ping()))
            person.wait_for(Pong)
            assert person.view == {other}
    finally:
        for person in people:
            if not person.sock.closed:
                person.sock.close(linger=0)
        broker.kill()
    log = broker.log_text()
    assert "Traceback" not in log


def test_logins_left_for_a_later_turn_keep_each_connections_order(tmp_path: Path, zctx):
    """Hundreds of connections send LOGIN, SEND and PING at once; a turn admits LOGINs
    only up to a bound of work and leaves the rest, with what those connections sent
    after them, for later turns. Each connection still gets WELCOME, then ACCEPTED, then
    PONG, and every message reaches Bob."""
    broker = BrokerProcess(tmp_path / "data", *RELAXED, *OPEN)
    socks: list[zmq.Socket] = []
    try:
        bob = Person(zctx, broker.endpoint, "bob")
        socks.append(bob.sock)
        bob.wait_for(Welcome)
        crowd = [dealer(zctx, broker.endpoint) for _ in range(CROWD)]
        socks += crowd
        for i, sock in enumerate(crowd):
            sock.send_multipart(codec.encode(Login(f"rush{i}")))
            sock.send_multipart(codec.encode(Send(f"m{i}", "bob", f"hello {i}", 1)))
            sock.send_multipart(codec.encode(Ping()))
        for i, sock in enumerate(crowd):
            seen: list[str] = []
            deadline = time.monotonic() + 60
            while "PONG" not in seen and time.monotonic() < deadline:
                if sock.poll(200):
                    message = codec.decode(sock.recv_multipart())
                    if not isinstance(message, Presence):
                        seen.append(message.COMMAND)
            assert seen == ["WELCOME", "ACCEPTED", "PONG"], (i, seen)
        texts: set[str] = set()
        deadline = time.monotonic() + 60
        while len(texts) < CROWD and time.monotonic() < deadline:
            message = bob.read(200)
            if isinstance(message, Deliver):
                texts.add(message.text)
        assert texts == {f"hello {i}" for i in range(CROWD)}
    finally:
        for sock in socks:
            sock.close(linger=0)
        broker.kill()
    assert "Traceback" not in broker.log_text()
