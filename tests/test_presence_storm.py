"""Presence in storms, pure core: a turn of many logins or leaves makes a bounded number
of PRESENCE messages, every online user ends the turn with the right view of who is
online, and a departure found by a failed send does not cascade into sends to peers
already known gone (issue 12 item 4)."""

from __future__ import annotations

import random

from mangogram_broker.clock import Clock
from mangogram_broker.core import BrokerCore, Outgoing
from mangogram_proto.messages import Leave, Login, Presence, Welcome

from .harness import MONO0, T0, TEST_LIMITS


class Turns:
    """The broker core driven as the shell drives it: presence held and told once per
    turn; every client's view of who is online kept from what it is sent."""

    def __init__(self) -> None:
        self.core = BrokerCore(TEST_LIMITS)
        self.core.hold_presence()
        self.clock = Clock(T0, MONO0)
        self.views: dict[bytes, set[str]] = {}
        self.peer_of: dict[str, bytes] = {}
        self._next = 1
        self.presence_sent = 0
        self.told_after_gone = 0
        self.gone: set[bytes] = set()

    def new_peer(self) -> bytes:
        peer = b"\x00" + self._next.to_bytes(4, "big")
        self._next += 1
        return peer

    def login(self, name: str, *, resume: bool = False) -> list[Outgoing]:
        peer = self.new_peer()
        # A takeover's token: the one the latest WELCOME carries (perhaps not sent yet).
        holder = self.core.registry.by_key(name)
        token = holder.resume_token if resume and holder is not None else None
        out = self.core.handle(peer, Login(name, resume_token=token), self.clock)
        self.peer_of[name] = peer
        return out

    def leave(self, name: str) -> list[Outgoing]:
        return self.core.handle(self.peer_of[name], Leave(), self.clock)

    def vanish(self, name: str) -> list[Outgoing]:
        """The connection closed and the monitor said so."""
        peer = self.peer_of[name]
        self.gone.add(peer)
        return self.core.disconnected(peer, self.clock)

    def deliver(self, outgoing: list[Outgoing]) -> None:
        for out in outgoing:
            message = out.message
            if out.peer in self.gone:
                if isinstance(message, Presence):
                    self.told_after_gone += 1
                continue
            if isinstance(message, Welcome):
                self.views[out.peer] = set(message.online)
            elif isinstance(message, Presence):
                self.presence_sent += 1
                view = self.views[out.peer]
                if message.event == "joined":
                    assert message.name not in view, "told of a join it already knew"
                    view.add(message.name)
                else:
                    assert message.name in view, "told of a leave of someone not online"
                    view.discard(message.name)

    def turn(self, outgoing: list[Outgoing]) -> None:
        self.deliver(outgoing + self.core.take_presence())
        self.clock = Clock(self.clock.wall + 10, self.clock.mono + 10)

    def assert_views_right(self) -> None:
        online = {s.name for s in self.core.registry}
        for session in self.core.registry:
            assert self.views[session.peer] == online - {session.name}, session.name


def test_a_turn_of_many_logins_tells_each_join_once_and_everyone_sees_everyone():
    net = Turns()
    net.turn([o for i in range(20) for o in net.login(f"old{i}")])
    net.presence_sent = 0
    joins = 40
    net.turn([o for i in range(joins) for o in net.login(f"new{i}")])
    net.assert_views_right()
    # Each of the 20 already online hears each join once; a joiner hears only of those
    # who logged in after its WELCOME: no more than one message per pair.
    assert net.presence_sent == 20 * joins + joins * (joins - 1) // 2


def test_a_turn_of_many_leaves_tells_only_those_who_stay():
    net = Turns()
    names = [f"u{i}" for i in range(60)]
    net.turn([o for name in names for o in net.login(name)])
    net.presence_sent = 0
    leaving, staying = names[:45], names[45:]
    net.turn([o for name in leaving for o in net.leave(name)])
    net.assert_views_right()
    # One PRESENCE left per (leaver, stayer); before, each leave also went to every
    # later leaver still online at that moment (45 * 44 / 2 more).
    assert net.presence_sent == len(leaving) * len(staying)
    assert net.told_after_gone == 0


def test_a_join_then_leave_within_one_turn_tells_nobody():
    net = Turns()
    net.turn([o for name in ("alice", "bob") for o in net.login(name)])
    net.presence_sent = 0
    net.turn(net.login("carol") + net.leave("carol"))
    assert net.presence_sent == 0
    net.assert_views_right()


def test_presence_stays_right_through_random_turns_of_joins_leaves_and_takeovers():
    rng = random.Random(12)
    net = Turns()
    names = [f"p{i}" for i in range(30)]
    for _ in range(40):
        outgoing: list[Outgoing] = []
        for _ in range(rng.randint(1, 25)):
            name = rng.choice(names)
            online = net.core.registry.by_key(name) is not None
            if not online:
                outgoing += net.login(name)
            elif rng.random() < 0.2:
                old = net.peer_of[name]
                outgoing += net.login(name, resume=True)  # a takeover: no presence
                net.gone.add(old)
            elif rng.random() < 0.5:
                outgoing += net.leave(name)
            else:
                outgoing += net.vanish(name)
        net.turn(outgoing)
        net.assert_views_right()
    assert net.told_after_gone == 0


def test_a_departure_found_by_a_failed_send_does_not_cascade():
    """1,000 clients vanish at once; the monitor has reported only some when presence
    goes out. Sends to the others fail: each ends that session, and its leave waits for
    the next turn instead of going at once to everyone (mostly peers gone too)."""
    net = Turns()
    names = [f"c{i}" for i in range(300)]
    net.turn([o for name in ["alice", "bob", *names] for o in net.login(name)])
    net.presence_sent = 0
    vanished = {net.peer_of[name] for name in names}
    reported, unreported = names[:100], names[100:]
    outgoing = [o for name in reported for o in net.vanish(name)]
    outgoing += net.core.take_presence()
    # None to the departures the core knew of; the others it could not know yet.
    assert not [o for o in outgoing if o.peer in net.gone]
    follow_ups: list[Outgoing] = []
    failed = 0
    for out in outgoing:
        if out.peer in vanished and out.peer not in net.gone:
            net.gone.add(out.peer)  # the send found it gone
            failed += 1
            follow_ups += net.core.send_failed(out, unreachable=True, now=net.clock)
        elif out.peer not in net.gone:  # the shell skips the rest for a peer found gone
            net.deliver([out])
    assert follow_ups == []  # nothing sent at once to peers that may be gone too
    assert failed == len(unreported)
    # The next turn tells each departure once, only to those still online.
    net.turn([])
    net.assert_views_right()
    assert {s.name for s in net.core.registry} == {"alice", "bob"}
    assert net.told_after_gone == 0
