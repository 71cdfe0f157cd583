"""Cluster mode with real processes: `nats-server -js` on loopback and real brokers
(`python broker.py --nats ...`) in front of it, spoken to by real DEALER sockets."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import zmq

from mangogram_broker.cluster import Notice
from mangogram_proto import codec, loops
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
    """LOGIN until WELCOME; again (bounded) after `name_taken`, as clients do: a session
    just ended at another broker may hold the name for a moment longer there."""
    deadline = time.monotonic() + 10
    while True:
        sock = dealer(zctx, broker.endpoint)
        sock.send_multipart(codec.encode(Login(name, **options)))
        reply = recv(sock)
        while not isinstance(reply, Welcome | Error):
            reply = recv(sock)
        if isinstance(reply, Welcome):
            return sock, reply
        sock.close(linger=0)
        assert reply.code == ErrorCode.NAME_TAKEN.value and time.monotonic() < deadline, reply


def login_retrying(zctx, broker: BrokerProcess, name: str, timeout_s: float = 60.0, **options):
    """LOGIN until WELCOME, again after each `unavailable` (NATS electing a leader), as a
    client reconnecting would."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        sock = dealer(zctx, broker.endpoint)
        sock.send_multipart(codec.encode(Login(name, **options)))
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


def test_logins_leave_no_consumers_behind_and_told_receipts_leave_no_keys(
    two_brokers, nats_node, zctx
):
    """A login lists the user's contacts and owed ✓✓ in one request each, creating no
    consumer (a KV watch per login left more consumers than the server allows after a
    few hundred logins in seconds, and every later login failed); an owed ✓✓ once told
    leaves no key behind, so later listings stay short."""
    import nats

    a, b = two_brokers
    bob, _ = login(zctx, b, "Bob")
    leave(bob)
    alice, _ = login(zctx, a, "Alice")
    for number in range(2):
        send(alice, "bob", f"text {number}", f"id{number}")
    accepted: list[str] = []
    while len(accepted) < 2:
        accepted += recv_until(alice, Accepted).ids
    leave(alice)
    bob, _ = login(zctx, a, "Bob")
    for _ in range(2):
        recv_until(bob, Deliver)
    bob.send_multipart(codec.encode(Receipt(2)))
    bob.send_multipart(codec.encode(Ping()))
    recv_until(bob, Pong)
    leave(bob)
    alice, _ = login(zctx, b, "Alice")
    told: list[str] = []
    while len(told) < 2:
        told += recv_until(alice, Delivered).ids
    alice.send_multipart(codec.encode(Ping()))
    recv_until(alice, Pong)

    async def look() -> tuple[dict[str, int], dict[str, object]]:
        client = await nats.connect(nats_node.url)
        try:
            js = client.jetstream()
            consumers = {}
            for bucket in ("mg_contacts", "mg_owed"):
                info = await js.stream_info(f"KV_{bucket}")
                consumers[bucket] = info.state.consumer_count
            owed = await js.stream_info("KV_mg_owed", subjects_filter="$KV.mg_owed.>")
            return consumers, dict(owed.state.subjects or {})
        finally:
            await client.close()

    try:
        # The told ✓✓ were removed in the login's turn, whose commit waits for its bucket
        # writes; the PONG above left after a later turn: nothing is still on its way.
        assert loops.run(look()) == ({"mg_contacts": 0, "mg_owed": 0}, {})
    finally:
        leave(alice)


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
    old_bob, welcome = login(zctx, a, "bob")
    new_bob = None
    try:
        # The old connection is dead, say: the client reconnects with its resume token.
        new_bob, _ = login(zctx, b, "bob", resume_token=welcome.resume_token)
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


def login_once(zctx, broker: BrokerProcess, name: str, **options):
    """One LOGIN: (socket, its WELCOME or ERROR)."""
    sock = dealer(zctx, broker.endpoint)
    sock.send_multipart(codec.encode(Login(name, **options)))
    reply = recv(sock)
    while not isinstance(reply, Welcome | Error):
        reply = recv(sock)
    return sock, reply


def test_a_name_online_at_one_broker_is_taken_at_the_other_unless_its_token_comes(
    two_live_brokers, zctx
):
    a, b = two_live_brokers
    socks = []
    try:
        bob, welcome = login(zctx, a, "bob")
        socks.append(bob)
        for options in ({}, {"resume_token": "not-his-token"}):
            sock, refused = login_once(zctx, b, "bob", **options)
            socks.append(sock)
            assert isinstance(refused, Error) and refused.code == ErrorCode.NAME_TAKEN.value
        assert not a.wait_for_log("bob moved to another broker", timeout=0.5)  # still there
        bob.send_multipart(codec.encode(Ping()))
        assert isinstance(recv_until(bob, Pong), Pong)

        moved, resumed = login_once(zctx, b, "bob", resume_token=welcome.resume_token)
        socks.append(moved)
        assert isinstance(resumed, Welcome)  # his own session, moved to broker B
        assert a.wait_for_log("bob moved to another broker", timeout=10)
        leave(moved)  # ends it: the name is free again, at either broker
        socks.remove(moved)
        again, _ = login(zctx, a, "bob")  # (retried while B has not finished the LEAVE)
        socks.append(again)
    finally:
        for sock in socks:
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


def test_a_hint_from_another_broker_wakes_the_loop_at_once(nats_node):
    """The loop polls `wakeup()` beside its sockets: a hint makes it readable, so it is
    handled now, not at the next 100 ms tick."""
    import select

    from mangogram_broker.jetstream_cluster import NatsCluster
    from mangogram_broker.jetstream_store import JetStreamStore
    from mangogram_broker.nats_settings import NatsSettings

    stores = [JetStreamStore(NatsSettings((nats_node.url,))) for _ in range(2)]
    try:
        here, there = (NatsCluster(store) for store in stores)
        wakeup = here.wakeup()
        here.joined("bob", "Bob")
        told: list[object] = []
        deadline = time.monotonic() + 20
        while not told:  # (until bob's subscription is in place: then the hint comes)
            assert time.monotonic() < deadline, "no hint woke the loop"
            there.tell("bob", Seen("m1", "7", "alice", 5))
            if select.select([wakeup], [], [], 1)[0] == [wakeup]:
                told = [e for e in here.events() if isinstance(e, Notice)]
        assert told[0] == Notice("bob", Seen("m1", "7", "alice", 5))
    finally:
        for store in stores:
            store.close()


def test_a_message_stored_by_another_broker_reaches_the_recipients_broker_with_its_id(
    nats_node,
):
    """The storing broker's hint carries the message and its broker id: the recipient's
    broker delivers it from that, without reading the mailbox."""
    import select

    from mangogram_broker.cluster import StreamGrew
    from mangogram_broker.jetstream_cluster import NatsCluster
    from mangogram_broker.jetstream_store import JetStreamStore
    from mangogram_broker.nats_settings import NatsSettings

    stores = [JetStreamStore(NatsSettings((nats_node.url,), timeout_s=2)) for _ in range(2)]
    try:
        here, there = (NatsCluster(store) for store in stores)
        here_store, there_store = stores
        here_store.remember_user("bob", "Bob", 1)
        assert (here_store.last_seq("bob"), here_store.confirmed_through("bob")) == (0, 0)
        here.joined("bob", "Bob")
        deadline = time.monotonic() + 20
        grew: list[StreamGrew] = []
        number = 0
        while not grew:  # (until bob's subscription is in place: then hints come)
            assert time.monotonic() < deadline, "no hint came"
            there_store.append("alice", "Alice", "bob", "Bob", f"m{number}", "hi", 1, 2)
            number += 1
            select.select([here.wakeup()], [], [], 1)
            grew = [e for e in here.events() if isinstance(e, StreamGrew)]
        while select.select([here.wakeup()], [], [], 0.5)[0]:  # the hints still in flight
            here.events()
        known = here_store.unconfirmed("bob", 0, 1000)  # all read: the cache is warm
        last = known[-1].seq
        stored = there_store.append("alice", "Alice", "bob", "Bob", "final", "bye", 3, 4)
        assert stored.seq == last + 1
        deadline = time.monotonic() + 10
        grew = []
        while not grew:
            assert time.monotonic() < deadline, "no hint for the last message"
            select.select([here.wakeup()], [], [], 1)
            grew = [e for e in here.events() if isinstance(e, StreamGrew)]
        assert grew == [StreamGrew("bob", stored.seq)]
        reads = []
        get_msg = here_store._js.get_msg

        async def counted(*args, **kwargs):
            reads.append(args)
            return await get_msg(*args, **kwargs)

        here_store._js.get_msg = counted  # type: ignore[method-assign]
        assert here_store.unconfirmed("bob", last, 10) == [stored]  # with its broker id
        assert reads == []  # from the hint, not read from the mailbox
    finally:
        for store in stores:
            store.close()


def test_a_lost_left_is_corrected_by_the_next_heartbeat_of_that_broker(nats_node):
    """A "joined" with no "left" after it (the left lost in transit): the broker it names
    does not have the user, its next heartbeat's checksum says so, and the user goes
    offline here without waiting for that broker to die."""
    import select

    import nats
    import orjson

    from mangogram_broker.cluster import RemotePresence
    from mangogram_broker.jetstream_cluster import PRESENCE, NatsCluster
    from mangogram_broker.jetstream_store import JetStreamStore
    from mangogram_broker.nats_settings import NatsSettings

    async def publish(record: dict[str, object]) -> None:
        client = await nats.connect(nats_node.url)
        await client.publish(PRESENCE, orjson.dumps(record))
        await client.flush()
        await client.close()

    stores = [JetStreamStore(NatsSettings((nats_node.url,))) for _ in range(2)]
    try:
        here, there = (NatsCluster(store) for store in stores)
        there.joined("bob", "Bob")  # really online there
        deadline = time.monotonic() + 20
        # Past the start-up exchange (each "hello" answered with a roster): each has had
        # a heartbeat from the other, and here knows bob.
        while not (here.online_elsewhere() and there.broker_id in here._alive
                   and here.broker_id in there._alive):  # fmt: skip
            assert time.monotonic() < deadline
            select.select([here.wakeup(), there.wakeup()], [], [], 1)
            there.events()
            here.events()
        ghost = {"e": "joined", "k": "ghost", "n": "Ghost", "b": there.broker_id}
        stores[0].call(publish(ghost))
        seen: list[RemotePresence] = []
        deadline = time.monotonic() + 20
        while RemotePresence("ghost", "Ghost", False) not in seen:
            assert time.monotonic() < deadline, seen
            select.select([here.wakeup(), there.wakeup()], [], [], 1)
            there.events()  # (as its loop would: it answers the ask)
            seen += [e for e in here.events() if isinstance(e, RemotePresence)]
        assert RemotePresence("ghost", "Ghost", True) in seen  # shown, then corrected
        assert RemotePresence("bob", "Bob", False) not in seen  # the real one stays
        assert here.online_elsewhere() == {"bob": "Bob"}
    finally:
        for store in stores:
            store.close()


def test_brokers_given_one_key_file_share_the_key_pair_the_first_one_created(tmp_path, nats_node):
    shared = tmp_path / "cluster-key" / "broker_key.json"  # not there yet
    brokers = []
    try:
        for name in ("a", "b"):
            brokers.append(
                cluster_broker(tmp_path, name, nats_node, "--key-file", str(shared), env=ENCRYPTED)
            )
        a, b = brokers
        assert f"created the broker's key pair in {shared}" in a.log_text()
        assert "created the broker's key pair" not in b.log_text()
        assert a.public_key == b.public_key != ""
        assert not (tmp_path / "a" / "broker_key.json").exists()  # not in --data
        if sys.platform != "win32":
            assert shared.stat().st_mode & 0o777 == 0o600
    finally:
        for broker in brokers:
            broker.kill()


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
        alice, welcome = login(zctx, a, "alice")
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
        # Her session at the dead broker holds the name until it is known dead: her
        # reconnection carries its resume token, as the SDK's does.
        alice = login_retrying(zctx, b, "alice", resume_token=welcome.resume_token)
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


@pytest.mark.parametrize(
    ("version", "too_old"),
    [("2.10.22", True), ("1.4.1", True), ("2.11.0", False), ("v2.11.0-beta", False),
     ("2.15.1", False), ("3.0.0", False), ("unknown", False)],
)  # fmt: skip
def test_servers_older_than_2_11_are_refused(version, too_old):
    from mangogram_broker.jetstream_store import server_too_old

    assert server_too_old(version) is too_old
