"""Protocol versions 3 and 2 on one real broker (docs/protocol.md, section 3): each
connection is answered in its own framing, and an unsupported version gets a clear ERROR
in the framing of the message that named it."""

from __future__ import annotations

import time

import pytest
import zmq

from mangogram_proto import Client, codec
from mangogram_proto.constants import SIGNATURE, SIGNATURE_V2
from mangogram_proto.events import IncomingMessage
from mangogram_proto.messages import (
    Accepted,
    Deliver,
    Delivered,
    Error,
    Login,
    Ping,
    Pong,
    Presence,
    Receipt,
    Send,
    Welcome,
)

from .conftest import dealer

pytestmark = pytest.mark.sockets


def recv_frames(sock: zmq.Socket, timeout_ms: int = 5000) -> list[bytes]:
    assert sock.poll(timeout_ms), "no reply from the broker"
    return sock.recv_multipart()


def framing(frames: list[bytes]) -> int:
    """3 for one MGP03 frame, 2 for three frames starting MGP02; fails on anything else."""
    if len(frames) == 1:
        assert frames[0].startswith(SIGNATURE), frames
        return 3
    assert len(frames) == 3 and frames[0] == SIGNATURE_V2, frames
    return 2


def recv_until(sock: zmq.Socket, kind: type, seen: list, timeout_s: float = 5.0):
    """The first message of `kind` not yet taken from `seen` (everything this socket
    received, as (framing, message, taken) lists), receiving more until it arrives."""
    deadline = time.monotonic() + timeout_s
    while True:
        for entry in seen:
            if isinstance(entry[1], kind) and not entry[2]:
                entry[2] = True
                return entry[1]
        assert time.monotonic() < deadline, f"no {kind.__name__} within {timeout_s} s"
        frames = recv_frames(sock, int((deadline - time.monotonic()) * 1000) + 1)
        seen.append([framing(frames), codec.decode(frames), False])


def test_a_v2_dealer_and_a_v3_sdk_client_chat_each_in_its_own_framing(broker, zctx):
    old = dealer(zctx, broker.endpoint)
    new = dealer(zctx, broker.endpoint)  # a raw version 3 peer, to see the frames
    old_seen: list = []
    new_seen: list = []
    try:
        old.send_multipart(codec.encode(Login("old"), 2))
        assert isinstance(recv_until(old, Welcome, old_seen), Welcome)
        new.send_multipart(codec.encode(Login("new")))
        assert isinstance(recv_until(new, Welcome, new_seen), Welcome)
        # The same PRESENCE (one message object in the core) reaches each in its framing.
        assert recv_until(old, Presence, old_seen).name == "new"
        with Client("sdk", broker.endpoint, context=zctx) as sdk:
            assert recv_until(old, Presence, old_seen).name == "sdk"
            assert recv_until(new, Presence, new_seen).name == "sdk"
            old.send_multipart(codec.encode(Send("o-1", "sdk", "Привіт з v2", 1), 2))
            accepted = recv_until(old, Accepted, old_seen)
            assert accepted.ids == ("o-1",)
            incoming = sdk.receive(timeout=5)
            assert isinstance(incoming, IncomingMessage)
            assert (incoming.sender, incoming.text) == ("old", "Привіт з v2")
            sdk.confirm(incoming)  # RECEIPT: the v2 sender gets DELIVERED in its framing
            reply_id = sdk.send("old", "hello from v3", wait=True)
            deliver = recv_until(old, Deliver, old_seen)
            assert (deliver.id, deliver.sender, deliver.text) == (reply_id, "sdk", "hello from v3")
            assert recv_until(old, Delivered, old_seen).ids == ("o-1",)
            old.send_multipart(codec.encode(Receipt(deliver.seq), 2))
            sdk.send("new", "to the raw v3 peer", wait=True)
            to_new = recv_until(new, Deliver, new_seen)
            assert to_new.text == "to the raw v3 peer"
            new.send_multipart(codec.encode(Receipt(to_new.seq)))
        old.send_multipart(codec.encode(Ping(), 2))
        assert isinstance(recv_until(old, Pong, old_seen), Pong)
        new.send_multipart(codec.encode(Ping()))
        assert isinstance(recv_until(new, Pong, new_seen), Pong)
    finally:
        old.close()
        new.close()
    assert len(old_seen) >= 6 and {version for version, *_ in old_seen} == {2}
    assert len(new_seen) >= 5 and {version for version, *_ in new_seen} == {3}


@pytest.mark.parametrize(
    "frames,expected_framing",
    [
        ([b"MGP04PING {}"], 3),  # one frame: answered in version 3
        ([b"MGP01", b"PING", b"{}"], 2),  # three frames: answered in version 2
        ([b"MGP99", b"PING"], 2),
        ([b"MGP02PING {}"], 2),  # names version 2: malformed, but answered in it
    ],
)
def test_an_unsupported_version_gets_a_clear_error_in_its_own_framing(
    broker, zctx, frames, expected_framing
):
    sock = dealer(zctx, broker.endpoint)
    try:
        sock.send_multipart(frames)
        reply = recv_frames(sock)
        assert framing(reply) == expected_framing
        error = codec.decode(reply)
        assert isinstance(error, Error)
        if frames[0].startswith(SIGNATURE_V2):
            assert error.code == "malformed" and "expected 3 frames" in error.message
        else:
            assert error.code == "unsupported_version"
            assert "this peer speaks MGP03 and MGP02" in error.message
        # The connection still works, in either framing.
        sock.send_multipart(codec.encode(Ping()))
        assert framing(reply := recv_frames(sock)) == 3
        assert codec.decode(reply).code == "not_logged_in"
    finally:
        sock.close()


def test_a_first_message_that_is_not_mgp_at_all_is_answered_in_version_3(broker, zctx):
    sock = dealer(zctx, broker.endpoint)
    try:
        sock.send_multipart([b"GET / HTTP/1.1", b"Host: x", b""])
        reply = recv_frames(sock)
        assert framing(reply) == 3
        assert codec.decode(reply).code == "malformed"
    finally:
        sock.close()


def test_a_connection_is_answered_in_the_framing_of_its_last_mgp_message(broker, zctx):
    sock = dealer(zctx, broker.endpoint)
    try:
        sock.send_multipart(codec.encode(Login("switcher"), 2))
        assert framing(recv_frames(sock)) == 2  # WELCOME
        sock.send_multipart(codec.encode(Ping()))
        reply = recv_frames(sock)
        assert framing(reply) == 3 and isinstance(codec.decode(reply), Pong)
        sock.send_multipart([b"junk"])  # not MGP: the framing stays
        reply = recv_frames(sock)
        assert framing(reply) == 3 and codec.decode(reply).code == "malformed"
        sock.send_multipart(codec.encode(Ping(), 2))
        reply = recv_frames(sock)
        assert framing(reply) == 2 and isinstance(codec.decode(reply), Pong)
    finally:
        sock.close()


@pytest.mark.parametrize("count", [2, 5, 100])
def test_a_v3_message_with_extra_frames_is_refused_whole(broker, zctx, count):
    sock = dealer(zctx, broker.endpoint)
    try:
        (whole,) = codec.encode(Send("x-1", "nobody", "hi", 1))
        sock.send_multipart([whole] + [b"{}"] * (count - 1))
        reply = recv_frames(sock)
        error = codec.decode(reply)
        assert isinstance(error, Error) and error.code == "malformed"
        assert f"one frame, got {min(count, 4)}" in error.message
        assert error.ref == "x-1"
        assert framing(reply) == 3  # it names version 3
    finally:
        sock.close()


@pytest.mark.parametrize(
    "peers",
    [
        [b"\x00new1", b"\x00old", b"\x00new2"],  # the v2 copy made from the v3 one
        [b"\x00old", b"\x00new1", b"\x00new2"],  # and the other way round
    ],
)
def test_the_shell_encodes_a_message_once_per_framing_its_recipients_speak(
    zctx, monkeypatch, peers
):
    """One PRESENCE for three peers, one of them version 2: one body encoded, framed
    twice (once per framing), the same bytes to both version 3 peers."""
    from mangogram_broker.clock import Clock
    from mangogram_broker.core import BrokerCore, Outgoing
    from mangogram_broker.shell import BrokerServer
    from mangogram_broker.store import MemoryStore

    from .harness import TEST_LIMITS

    server = BrokerServer(
        BrokerCore(TEST_LIMITS, store=MemoryStore()), "tcp://127.0.0.1:*", context=zctx
    )
    try:
        bodies = 0
        real = codec.encode_parts

        def counting(message):
            nonlocal bodies
            bodies += 1
            return real(message)

        monkeypatch.setattr(codec, "encode_parts", counting)
        sent: list[tuple[bytes, list[bytes]]] = []
        monkeypatch.setattr(
            server, "_send_frames", lambda peer, frames: sent.append((peer, frames)) or 0
        )
        server._v2_peers.add(b"\x00old")
        presence = Presence("Олена", "joined", 5)
        server._send_all([Outgoing(peer, presence) for peer in peers], Clock(5, 5))
        assert bodies == 1
        by_peer = dict(sent)
        assert by_peer[b"\x00new1"] is by_peer[b"\x00new2"]  # one framed copy, reused
        (whole,) = by_peer[b"\x00new1"]
        signature, command, body = by_peer[b"\x00old"]
        assert (signature, command) == (SIGNATURE_V2, b"PRESENCE")
        assert whole == SIGNATURE + b"PRESENCE " + body
    finally:
        server.close()
