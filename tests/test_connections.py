"""The table that turns closed connections into departed peers, without sockets, and the
shell's order of reading monitor events and messages, with stand-in sockets."""

from __future__ import annotations

import struct

import pytest
import zmq

from mangogram_broker.connections import ConnectionTable
from mangogram_broker.core import BrokerCore
from mangogram_broker.shell import BrokerServer
from mangogram_proto import codec
from mangogram_proto.messages import Login

from .harness import TEST_LIMITS

ALICE, BOB, CAROL = b"\x00\x00\x00\x00\x01", b"\x00\x00\x00\x00\x02", b"\x00\x00\x00\x00\x03"


def test_a_closed_connection_names_its_peer_once():
    table = ConnectionTable()
    table.accepted(13)
    assert table.seen(ALICE, 13)
    assert table.knows(ALICE)
    assert table.closed(13) == [ALICE]
    assert not table.knows(ALICE)
    assert table.closed(13) == []


def test_a_close_ends_only_the_connection_accepted_last_on_its_descriptor():
    table = ConnectionTable()
    table.accepted(13)
    table.seen(ALICE, 13)
    assert table.closed(13) == [ALICE]
    table.accepted(13)  # someone who never wrote a message
    assert table.closed(13) == []
    table.accepted(13)
    table.seen(BOB, 13)
    assert table.knows(BOB)
    assert table.closed(13) == [BOB]


def test_a_message_read_after_its_connection_closed_is_left_untracked():
    table = ConnectionTable()
    table.accepted(13)
    assert table.closed(13) == []
    assert not table.seen(ALICE, 13)
    assert not table.knows(ALICE)


def test_a_late_message_of_a_closed_connection_is_ended_with_the_next_one():
    # Alice's last message was still queued when her connection closed and Bob's was
    # accepted on the same descriptor: she is tied to Bob's connection and ends with it
    # (late for her, who is gone anyway; never early for Bob).
    table = ConnectionTable()
    table.accepted(13)
    table.closed(13)
    table.accepted(13)
    table.seen(ALICE, 13)
    table.seen(BOB, 13)
    assert table.closed(13) == sorted([ALICE, BOB])


def test_peers_of_a_connection_whose_close_was_missed_end_at_the_next_accept():
    table = ConnectionTable()
    table.accepted(13)
    table.seen(ALICE, 13)
    assert table.accepted(13) == [ALICE]
    assert not table.knows(ALICE)


def test_unknown_descriptors_are_ignored():
    assert ConnectionTable().closed(99) == []


# The shell, driven by hand with stand-ins for its ROUTER and monitor sockets, so that the
# order in which each is read can be chosen.


class FakeFrame:
    def __init__(self, data: bytes, more: bool, fd: int) -> None:
        self.bytes = data
        self.more = more
        self._fd = fd

    def get(self, option: object) -> object:
        if option == zmq.SRCFD:
            return self._fd
        raise zmq.ZMQError(zmq.EINVAL)


class FakeRouter:
    """Hands out queued multipart messages frame by frame, as ROUTER.recv does."""

    def __init__(self) -> None:
        self.frames: list[FakeFrame] = []
        self.on_empty: list[object] = []

    def queue(self, peer: bytes, fd: int, frames: list[bytes]) -> None:
        parts = [peer, *frames]
        for index, part in enumerate(parts):
            self.frames.append(FakeFrame(part, index < len(parts) - 1, fd))

    def recv(self, flags: int = 0, copy: bool = True) -> FakeFrame:
        if not self.frames:
            raise zmq.Again()
        return self.frames.pop(0)


class FakeMonitor:
    """Monitor events that become readable only once `release` is called: what the
    I/O thread reported while the routing thread was busy reading messages."""

    def __init__(self) -> None:
        self.readable: list[list[bytes]] = []
        self.pending: list[list[bytes]] = []

    def report(self, event: int, fd: int) -> None:
        self.pending.append([struct.pack("=hi", event, fd), b"tcp://127.0.0.1:1"])

    def release(self) -> None:
        self.readable += self.pending
        self.pending = []

    def recv_multipart(self, flags: int = 0) -> list[bytes]:
        if not self.readable:
            raise zmq.Again()
        return self.readable.pop(0)


@pytest.fixture
def shell():
    context = zmq.Context()
    server = BrokerServer(BrokerCore(TEST_LIMITS), "tcp://127.0.0.1:*", context=context)
    real = server._router, server._monitor
    yield server
    server._router, server._monitor = real
    server.close()
    context.term()


def login(name: str) -> list[bytes]:
    return codec.encode(Login(name))


def test_a_late_close_of_a_silent_connection_does_not_end_the_next_session_on_its_fd(shell):
    router, monitor = FakeRouter(), FakeMonitor()
    shell._router, shell._monitor = router, monitor  # type: ignore[assignment]
    # Bob logs in on descriptor 13, then his connection closes.
    monitor.report(zmq.EVENT_ACCEPTED, 13)
    monitor.release()
    router.queue(BOB, 13, login("bob"))
    shell._drain_monitor()
    shell._drain_router()
    assert shell.core.registry.by_peer(BOB) is not None
    monitor.report(zmq.EVENT_DISCONNECTED, 13)
    # A connection that never sends a message (a failed handshake, a port scan) gets 13
    # and closes; then Alice gets 13 and logs in. The routing thread read the monitor
    # just before all this and reads Alice's LOGIN before the monitor again.
    monitor.report(zmq.EVENT_ACCEPTED, 13)
    monitor.report(zmq.EVENT_DISCONNECTED, 13)
    monitor.report(zmq.EVENT_ACCEPTED, 13)
    router.queue(ALICE, 13, login("alice"))
    shell._drain_monitor()  # nothing readable yet
    monitor.release()  # the events become readable while the ROUTER is read
    shell._drain_router()
    shell._drain_monitor()
    assert shell.core.registry.by_peer(BOB) is None  # his close was noticed
    assert shell.core.registry.by_peer(ALICE) is not None  # and hers was not invented
    # Her own close, when it comes, ends her.
    monitor.report(zmq.EVENT_DISCONNECTED, 13)
    monitor.release()
    shell._drain_monitor()
    assert shell.core.registry.by_peer(ALICE) is None
