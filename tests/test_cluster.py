"""Cluster mode with real processes: `nats-server -js` on loopback and real brokers
(`python broker.py --nats ...`) in front of it, spoken to by real DEALER sockets."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import zmq

from mangogram_proto import codec
from mangogram_proto.errors import ErrorCode
from mangogram_proto.keys import KeyPair, save_keypair
from mangogram_proto.messages import (
    Accepted,
    Deliver,
    Delivered,
    Error,
    History,
    HistoryPage,
    Leave,
    Login,
    Online,
    Ping,
    Pong,
    Presence,
    Read,
    Receipt,
    Seen,
    Send,
    Welcome,
    Who,
)

from .conftest import BrokerProcess, dealer
from .natsserver import NatsNode, start_single, wait_ready

pytestmark = pytest.mark.sockets

ENCRYPTED = {"MANGOGRAM_INSECURE_PLAINTEXT": "0"}


def recv(sock: zmq.Socket, timeout_ms: int = 10_000):
    assert sock.poll(timeout_ms), "no reply from the broker"
    return codec.decode(sock.recv_multipart())


def recv_until(sock: zmq.Socket, kind: type, timeout_s: float = 10.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        message = recv(sock, int((deadline - time.monotonic()) * 1000) + 1)
        if isinstance(message, kind):
            return message
    raise AssertionError(f"no {kind.__name__} within {timeout_s} s")


@pytest.fixture
def nats_node(tmp_path: Path) -> Iterator[NatsNode]:
    node = start_single(tmp_path / "nats")
    yield node
    node.kill()


def cluster_broker(tmp_path: Path, name: str, node: NatsNode, *extra: str, env=None):
    return BrokerProcess(tmp_path / name, "--nats", node.url, *extra, env=env)


@pytest.fixture
def two_brokers(tmp_path: Path, nats_node: NatsNode) -> Iterator[list[BrokerProcess]]:
    brokers = [cluster_broker(tmp_path, name, nats_node) for name in ("a", "b")]
    yield brokers
    for broker in brokers:
        broker.kill()
    for broker in brokers:
        assert "Traceback" not in broker.log_text(), broker.log_text()


def login(zctx, broker: BrokerProcess, name: str, **options) -> tuple[zmq.Socket, Welcome]:
    sock = dealer(zctx, broker.endpoint)
    sock.send_multipart(codec.encode(Login(name, **options)))
    welcome = recv_until(sock, Welcome)
    return sock, welcome


def login_retrying(zctx, broker: BrokerProcess, name: str, timeout_s: float = 60.0):
    """LOGIN until WELCOME, again after each `unavailable` (NATS electing a leader), as a
    client reconnecting would."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        sock = dealer(zctx, broker.endpoint)
        sock.send_multipart(codec.encode(Login(name)))
        reply = recv(sock, 20_000)
        if isinstance(reply, Welcome):
            return sock
        sock.close(linger=0)
        assert isinstance(reply, Error) and reply.code == ErrorCode.UNAVAILABLE.value, reply
    raise AssertionError(f"{name} could not log in within {timeout_s} s")


def no_more_mail(sock: zmq.Socket, wait_ms: int = 300) -> bool:
    """True if no DELIVER comes within `wait_ms` (PRESENCE from the cluster may)."""
    deadline = time.monotonic() + wait_ms / 1000
    while (left := deadline - time.monotonic()) > 0:
        if sock.poll(int(left * 1000) + 1) and isinstance(
            codec.decode(sock.recv_multipart()), Deliver
        ):
            return False
    return True


def send(sock: zmq.Socket, to: str, text: str, client_id: str, at: int = 1) -> None:
    sock.send_multipart(codec.encode(Send(client_id, to, text, at)))


def leave(sock: zmq.Socket) -> None:
    sock.send_multipart(codec.encode(Leave()))
    sock.close(linger=0)


def test_brokers_on_one_nats_share_users_mailboxes_receipts_and_history(two_brokers, zctx):
    a, b = two_brokers
    bob, _ = login(zctx, b, "Bob")  # Bob exists: he has logged in somewhere in the cluster
    leave(bob)
    alice, _ = login(zctx, a, "Аліса")
    texts = ["перше", "second 🌻", "third"]
    for number, text in enumerate(texts):
        send(alice, "bob", text, f"id{number}")
    acked = []
    while len(acked) < 3:
        reply = recv_until(alice, Accepted)
        acked += list(zip(reply.ids, reply.broker_ids, strict=True))
    assert [client_id for client_id, _ in acked] == ["id0", "id1", "id2"]
    leave(alice)

    bob, welcome = login(zctx, a, "Bob")  # another broker than before
    got = [recv_until(bob, Deliver) for _ in texts]
    assert [(m.text, m.seq, m.sender) for m in got] == [
        (text, seq, "Аліса") for seq, text in enumerate(texts, start=1)
    ]
    assert [m.broker_id for m in got] == [broker_id for _, broker_id in acked]
    bob.send_multipart(codec.encode(Receipt(3)))
    # A PONG leaves after the commit of its turn: the receipt's bookkeeping is stored.
    bob.send_multipart(codec.encode(Ping()))
    recv_until(bob, Pong)
    leave(bob)

    alice, _ = login(zctx, b, "Аліса")  # ✓✓ owed while she was away, told on broker B
    told: list[str] = []
    while len(told) < 3:
        told += list(recv_until(alice, Delivered).ids)
    assert told == ["id0", "id1", "id2"]
    alice.send_multipart(codec.encode(History("Bob", 10)))
    page = recv_until(alice, HistoryPage)
    assert [item.text for item in page.items] == list(reversed(texts))
    assert all(item.delivered_at is not None for item in page.items)
    leave(alice)

    bob, welcome = login(zctx, b, "Bob")  # confirmed on A: nothing comes again on B
    assert welcome.stream_mark == 3
    assert no_more_mail(bob)
    leave(bob)


LONG_HEARTBEATS = ("--heartbeat-interval-ms", "10000", "--heartbeat-timeout-ms", "60000")


@pytest.fixture
def two_live_brokers(tmp_path: Path, nats_node: NatsNode) -> Iterator[list[BrokerProcess]]:
    """Two brokers whose users stay online through a test without pinging."""
    brokers = [cluster_broker(tmp_path, name, nats_node, *LONG_HEARTBEATS) for name in "ab"]
    yield brokers
    for broker in brokers:
        broker.kill()
        print("".join(line for line in broker.lines if " DEBUG " not in line)[-6000:])
    for broker in brokers:
        assert "Traceback" not in broker.log_text(), broker.log_text()


def test_users_online_at_two_brokers_chat_in_real_time_with_receipts_and_seen(
    two_live_brokers, zctx
):
    a, b = two_live_brokers
    alice, _ = login(zctx, a, "alice")
    bob, _ = login(zctx, b, "bob")
    try:
        for number in range(3):
            send(alice, "bob", f"hello {number}", f"a{number}")
        got = [recv_until(bob, Deliver) for _ in range(3)]  # while both stay online
        assert [(m.text, m.seq, m.delayed) for m in got] == [
            (f"hello {n}", n + 1, False) for n in range(3)
        ]
        bob.send_multipart(codec.encode(Receipt(3)))
        told: list[str] = []
        while len(told) < 3:
            told += list(recv_until(alice, Delivered).ids)  # ✓✓ across brokers
        assert told == ["a0", "a1", "a2"]
        bob.send_multipart(codec.encode(Read(got[1].broker_id)))
        seen = recv_until(alice, Seen)
        assert (seen.id, seen.by) == ("a1", "bob")
        send(bob, "alice", "hi back", "b0")
        reply = recv_until(alice, Deliver)
        assert (reply.text, reply.sender, reply.seq) == ("hi back", "bob", 1)
        assert recv_until(bob, Accepted).ids == ("b0",)
        assert no_more_mail(bob), "something was delivered twice"
    finally:
        alice.close(linger=0)
        bob.close(linger=0)


def test_presence_crosses_brokers_and_a_dead_brokers_users_go_offline(two_live_brokers, zctx):
    a, b = two_live_brokers
    alice, welcome = login(zctx, a, "alice")
    bob = carol = None
    try:
        bob, welcome = login(zctx, b, "bob")
        # Bob learns alice (at the other broker) is online from the WELCOME, or, if her
        # login's announcement had not reached broker B yet, from a PRESENCE just after.
        if welcome.online != ("alice",):
            assert welcome.online == ()
            early = recv_until(bob, Presence)
            assert (early.name, early.event) == ("alice", "joined")
        presence = recv_until(alice, Presence)
        assert (presence.name, presence.event) == ("bob", "joined")
        alice.send_multipart(codec.encode(Who()))
        assert recv_until(alice, Online).users == ("alice", "bob")
        leave(bob)
        bob = None
        presence = recv_until(alice, Presence)
        assert (presence.name, presence.event) == ("bob", "left")

        carol, _ = login(zctx, b, "carol")
        assert recv_until(alice, Presence).event == "joined"
        b.kill()  # kill -9: nobody tells the others that carol is gone...
        presence = recv_until(alice, Presence, timeout_s=30)  # ...its silence does
        assert (presence.name, presence.event) == ("carol", "left")
    finally:
        for sock in (alice, bob, carol):
            if sock is not None:
                sock.close(linger=0)


def test_a_user_who_logs_in_at_another_broker_moves_there(two_live_brokers, zctx):
    a, b = two_live_brokers
    alice, _ = login(zctx, a, "alice")
    old_bob, _ = login(zctx, a, "bob")
    new_bob = None
    try:
        new_bob, _ = login(zctx, b, "bob")  # the old connection is dead, say
        assert a.wait_for_log("bob moved to another broker", timeout=10)
        send(alice, "bob", "where are you?", "q1")
        assert recv_until(new_bob, Deliver).text == "where are you?"
        assert no_more_mail(old_bob), "the old broker still delivers to the old session"
        send(old_bob, "alice", "stale", "s1")
        refused = recv_until(old_bob, Error)
        assert refused.code == ErrorCode.NOT_LOGGED_IN.value
        alice.send_multipart(codec.encode(Who()))  # bob is still online, at the other one
        assert recv_until(alice, Online).users == ("alice", "bob")
    finally:
        for sock in (alice, old_bob, new_bob):
            if sock is not None:
                sock.close(linger=0)


def test_the_sdk_fails_over_to_the_next_broker_when_its_broker_is_killed(two_brokers, zctx):
    from mangogram_proto import Client

    a, b = two_brokers
    bob, _ = login(zctx, b, "bob")
    leave(bob)
    alice = Client("alice", f"{a.endpoint},{b.endpoint}", context=zctx)
    bob = None
    try:
        alice.login(timeout=10)
        before = [alice.send("bob", f"before {n}", wait=True) for n in range(5)]
        a.kill()  # kill -9 of alice's broker
        # The SDK notices the silence, reconnects to the next endpoint and resends what
        # has no ACCEPTED; these wait until the other broker has accepted them.
        after = [alice.send("bob", f"after {n}", wait=True, timeout=30) for n in range(5)]
        assert alice.endpoint == b.endpoint
        bob, _ = login(zctx, b, "bob")
        got = [recv_until(bob, Deliver) for _ in range(10)]
        assert [m.id for m in got] == before + after  # every acknowledged one, in order
        assert [m.seq for m in got] == list(range(1, 11))
        assert no_more_mail(bob), "a message came twice"
    finally:
        alice.close(timeout=0.5)
        if bob is not None:
            bob.close(linger=0)


def test_a_resend_landing_on_another_broker_is_stored_once(two_brokers, zctx):
    a, b = two_brokers
    bob, _ = login(zctx, b, "bob")
    leave(bob)
    alice, _ = login(zctx, a, "alice")
    send(alice, "bob", "once only", "same-id")
    first = recv_until(alice, Accepted)
    leave(alice)
    alice, _ = login(zctx, b, "alice")  # failed over before she saw the ACCEPTED, say
    send(alice, "bob", "once only", "same-id")
    again = recv_until(alice, Accepted)
    assert again.broker_ids == first.broker_ids
    leave(alice)
    bob, _ = login(zctx, a, "bob")
    assert recv_until(bob, Deliver).text == "once only"
    assert no_more_mail(bob), "the resend was delivered twice"
    leave(bob)


def test_brokers_racing_to_register_one_name_for_two_keys_exactly_one_wins(
    tmp_path, nats_node, zctx, monkeypatch
):
    monkeypatch.setenv("MANGOGRAM_INSECURE_PLAINTEXT", "0")
    cluster_key = KeyPair.generate()  # one key pair held by every broker of the cluster
    brokers = []
    for name in ("a", "b"):
        save_keypair(tmp_path / name / "broker_key.json", cluster_key)
        brokers.append(
            cluster_broker(
                tmp_path, name, nats_node, "--registrations-per-minute", "1000", env=ENCRYPTED
            )
        )
    try:
        assert all(broker.public_key == cluster_key.public for broker in brokers)
        rounds = 25
        for round_number in range(rounds):
            socks = []
            for broker in brokers:
                identity = KeyPair.generate()
                sock = zctx.socket(zmq.DEALER)
                sock.setsockopt(zmq.LINGER, 0)
                sock.setsockopt(zmq.CURVE_SERVERKEY, cluster_key.public.encode())
                sock.setsockopt(zmq.CURVE_PUBLICKEY, identity.public.encode())
                sock.setsockopt(zmq.CURVE_SECRETKEY, identity.secret.encode())
                sock.connect(broker.endpoint)
                socks.append(sock)
            name = f"racer{round_number}"
            try:
                for sock in socks:  # both logins in flight before either is answered
                    sock.send_multipart(codec.encode(Login(name)))
                replies = [recv(sock) for sock in socks]
            finally:
                for sock in socks:
                    sock.close(linger=0)
            winners = [r for r in replies if isinstance(r, Welcome)]
            losers = [r for r in replies if isinstance(r, Error)]
            assert len(winners) == 1 and len(losers) == 1, (round_number, replies)
            assert losers[0].code == ErrorCode.NAME_OWNED.value
    finally:
        for broker in brokers:
            broker.kill()
            print("".join(line for line in broker.lines if " DEBUG " not in line)[-6000:])
    for broker in brokers:
        assert "Traceback" not in broker.log_text(), broker.log_text()


def test_nats_down_sends_are_refused_not_acknowledged_and_the_broker_recovers(
    tmp_path, nats_node, zctx
):
    broker = cluster_broker(
        tmp_path, "a", nats_node, "--nats-timeout", "1",
        "--heartbeat-interval-ms", "10000", "--heartbeat-timeout-ms", "60000",
    )  # fmt: skip
    bob, _ = login(zctx, broker, "bob")
    alice, _ = login(zctx, broker, "alice")
    try:
        send(alice, "bob", "before", "m1")
        assert recv_until(alice, Accepted).ids == ("m1",)
        assert recv_until(bob, Deliver).text == "before"

        nats_node.kill()
        refused = None
        deadline = time.monotonic() + 20
        while refused is None and time.monotonic() < deadline:
            send(alice, "bob", "while down", "m2")
            reply = recv(alice, 15_000)
            assert not isinstance(reply, Accepted), "acknowledged a message NATS never stored"
            if isinstance(reply, Error):
                refused = reply
        assert refused is not None
        assert refused.code == ErrorCode.UNAVAILABLE.value and refused.ref == "m2"
        assert broker.proc.poll() is None, "the broker died with NATS"

        nats_node.start()  # same ports, same store directory
        wait_ready([nats_node])
        assert broker.wait_for_log("NATS is back", timeout=20), "the broker did not reconnect"
        accepted = None
        deadline = time.monotonic() + 30
        while accepted is None and time.monotonic() < deadline:
            send(alice, "bob", "while down", "m2")  # the client's retry, same id
            reply = recv(alice, 15_000)
            if isinstance(reply, Accepted):
                accepted = reply
            elif isinstance(reply, Error):
                assert reply.code == ErrorCode.UNAVAILABLE.value, reply
                # Back off as a client does (faster retries would use up the error budget
                # of 5 per second, and the broker then drops further ERRORs).
                assert not alice.poll(300)
        # Retries sent while the first was in the broker's queue are acknowledged (merged)
        # with the one broker id the message got.
        assert accepted is not None and set(accepted.ids) == {"m2"}
        assert len(set(accepted.broker_ids)) == 1
        message = recv_until(bob, Deliver)  # bob stayed online through it all
        assert (message.text, message.seq) == ("while down", 2)
        assert no_more_mail(bob), "delivered twice"
        leave(alice)
        leave(bob)
    finally:
        for sock in (alice, bob):
            sock.close(linger=0)
        broker.kill()
        print("".join(line for line in broker.lines if " DEBUG " not in line)[-6000:])
    assert "Traceback" not in broker.log_text(), broker.log_text()


def test_a_broker_that_cannot_reach_nats_at_start_exits_with_a_clear_error(tmp_path):
    import subprocess
    import sys

    from .conftest import ROOT
    from .natsserver import free_port

    dead = f"nats://127.0.0.1:{free_port()}"  # nothing listens there
    result = subprocess.run(
        [sys.executable, str(ROOT / "broker.py"), "--bind", "tcp://127.0.0.1:*",
         "--data", str(tmp_path / "d"), "--nats", dead, "--nats-timeout", "1"],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert f"cannot reach NATS at {dead}" in result.stderr
    assert "Traceback" not in result.stderr


STORM_FLAGS = (
    "--nats-replicas", "3", "--nats-timeout", "2", *LONG_HEARTBEATS,
    "--rate-per-second", "100000", "--rate-burst", "100000",
)  # fmt: skip


def take_acks(sock: zmq.Socket, accepted: dict[str, str], wait_ms: int) -> bool:
    """Read one reply into `accepted` (id -> broker id); False if none came in time.
    A broker id never changes for an id, whichever broker acknowledges it."""
    if not sock.poll(wait_ms):
        return False
    reply = codec.decode(sock.recv_multipart())
    if isinstance(reply, Accepted):
        for client_id, broker_id in zip(reply.ids, reply.broker_ids, strict=True):
            assert accepted.setdefault(client_id, broker_id) == broker_id
    elif isinstance(reply, Error):
        assert reply.code == ErrorCode.UNAVAILABLE.value, reply
    return True


def send_until_accepted(
    sock: zmq.Socket, total: int, accepted: dict[str, str], target: int | None = None
) -> None:
    """Resend what is not acknowledged of the `total` after each quiet spell (same ids),
    as a client does, until `target` (default: all) are acknowledged (bounded)."""
    target = total if target is None else target
    deadline = time.monotonic() + 90
    while len(accepted) < target and time.monotonic() < deadline:
        if not take_acks(sock, accepted, 1500):
            for number in [n for n in range(total) if f"m{n}" not in accepted][:100]:
                send(sock, "bob", f"text {number}", f"m{number}")
    assert len(accepted) >= target


def assert_bob_gets_each_acknowledged_message_once_in_order(
    zctx, broker: BrokerProcess, accepted: dict[str, str], socks: list[zmq.Socket]
) -> None:
    bob = login_retrying(zctx, broker, "bob")
    socks.append(bob)
    got: list[Deliver] = []
    while len(got) < len(accepted):
        message = recv_until(bob, Deliver, timeout_s=30)
        got.append(message)
        if len(got) % 100 == 0:
            bob.send_multipart(codec.encode(Receipt(message.seq)))
    assert [m.seq for m in got] == list(range(1, len(accepted) + 1))  # in order, no gaps
    assert {m.id: m.broker_id for m in got} == accepted  # each acknowledged one, once
    assert no_more_mail(bob, 500), "more messages than were sent"


def test_a_nats_node_killed_during_a_burst_loses_no_acknowledged_message_replicas_3(tmp_path, zctx):
    from .natsserver import start_cluster

    nodes = start_cluster(tmp_path / "nats")
    urls = ",".join(node.url for node in nodes)
    broker = None
    socks: list[zmq.Socket] = []
    try:
        broker = BrokerProcess(tmp_path / "a", "--nats", urls, *STORM_FLAGS)
        bob, _ = login(zctx, broker, "bob")
        leave(bob)
        alice, _ = login(zctx, broker, "alice")
        socks.append(alice)
        total = 300
        accepted: dict[str, str] = {}
        for number in range(total):
            send(alice, "bob", f"text {number}", f"m{number}")
            if number == total // 3:
                nodes[1].kill()  # kill -9 of one NATS node, mid-burst
        send_until_accepted(alice, total, accepted)
        assert_bob_gets_each_acknowledged_message_once_in_order(zctx, broker, accepted, socks)
    finally:
        for sock in socks:
            sock.close(linger=0)
        if broker is not None:
            broker.kill()
            print("".join(line for line in broker.lines if " DEBUG " not in line)[-6000:])
        for node in nodes:
            node.kill()
    assert "Traceback" not in broker.log_text(), broker.log_text()


def test_the_same_storm_with_the_senders_broker_killed_too_loses_nothing(tmp_path, zctx):
    """kill -9 of a NATS node, then of the broker the sender is on; the sender reconnects
    to the other broker and resends what it has no ACCEPTED for (by hand here, as a
    raw client would; the SDK's own failover is in test_cluster_failover.py)."""
    from .natsserver import start_cluster

    nodes = start_cluster(tmp_path / "nats")
    urls = ",".join(node.url for node in nodes)
    brokers: list[BrokerProcess] = []
    socks: list[zmq.Socket] = []
    try:
        for name in ("a", "b"):
            brokers.append(BrokerProcess(tmp_path / name, "--nats", urls, *STORM_FLAGS))
        a, b = brokers
        bob, _ = login(zctx, b, "bob")
        leave(bob)
        alice, _ = login(zctx, a, "alice")
        socks.append(alice)
        total = 300
        accepted: dict[str, str] = {}
        for number in range(2 * total // 3):
            send(alice, "bob", f"text {number}", f"m{number}")
            if number == total // 3:
                nodes[1].kill()
        send_until_accepted(alice, 2 * total // 3, accepted, target=total // 3)
        a.kill()  # kill -9 while it still works through the burst
        while take_acks(alice, accepted, 200):
            pass  # whatever it sent before dying
        alice.close(linger=0)
        socks.remove(alice)
        alice = login_retrying(zctx, b, "alice")
        socks.append(alice)
        send_until_accepted(alice, total, accepted)
        assert_bob_gets_each_acknowledged_message_once_in_order(zctx, b, accepted, socks)
    finally:
        for sock in socks:
            sock.close(linger=0)
        for broker in brokers:
            broker.kill()
            print("".join(line for line in broker.lines if " DEBUG " not in line)[-6000:])
        for node in nodes:
            node.kill()
    for broker in brokers:
        assert "Traceback" not in broker.log_text(), broker.log_text()
