"""The asyncio SDK failing over in a real cluster: `nats-server -js` on loopback, two
brokers in front of it, and `kill -9` of the broker a client is on. Nothing acknowledged
is lost: each message reaches the client once and in order, and its unanswered texts are
resent with their ids and stored once. Also the SDK's retries on `unavailable` (NATS
down) with the broker's real refusals."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from mangogram_proto import Bot, Client, loops, session
from mangogram_proto.aio import AsyncConnection
from mangogram_proto.errors import BrokerRefused
from mangogram_proto.events import IncomingMessage, LoggedIn, MessageAccepted, MessageFailed

from .conftest import BrokerProcess, posix_signals
from .natsserver import NatsNode, start_single, wait_ready
from .test_cluster import LONG_HEARTBEATS, cluster_broker

pytestmark = [pytest.mark.sockets, posix_signals]


@pytest.fixture
def nats_node(tmp_path: Path) -> Iterator[NatsNode]:
    node = start_single(tmp_path / "nats")
    yield node
    node.kill()


@pytest.fixture
def two_brokers(tmp_path: Path, nats_node: NatsNode) -> Iterator[list[BrokerProcess]]:
    """Two brokers of one cluster (one NATS node), heartbeats of 200/1000 ms."""
    brokers = [cluster_broker(tmp_path, name, nats_node) for name in ("a", "b")]
    yield brokers
    for broker in brokers:
        broker.kill()
    for broker in brokers:
        assert "Traceback" not in broker.log_text(), broker.log_text()


def take_all(client: Client, count: int, timeout: float = 30.0) -> list[IncomingMessage]:
    """Receive `count` messages (each confirmed by asking for the next), then make sure
    no further one comes for a while."""
    got: list[IncomingMessage] = []
    deadline = time.monotonic() + timeout
    while len(got) < count and time.monotonic() < deadline:
        message = client.receive(timeout=max(0.1, deadline - time.monotonic()))
        if message is not None:
            got.append(message)
    extra = client.receive(timeout=1.0)
    assert extra is None, f"more than {count} messages: {extra}"
    return got


def test_an_async_connection_killed_under_loses_nothing_in_or_out(two_brokers, zctx):
    a, b = two_brokers
    with Client("bob", b.endpoint, context=zctx):
        pass  # a known name, so alice's texts to him are stored

    async def main() -> tuple[list[IncomingMessage], list[str]]:
        alice = AsyncConnection("alice", f"{a.endpoint},{b.endpoint}")
        runner = asyncio.create_task(alice.run())
        received: list[IncomingMessage] = []
        accepted: set[str] = set()
        try:
            await asyncio.wait_for(logged_in(alice), 20)
            # bob writes from b; alice reads at a and confirms as she goes.
            sender = Client("bob", b.endpoint, context=zctx)
            await asyncio.to_thread(sender.login, 10)
            for n in range(10):
                await asyncio.to_thread(sender.send, "alice", f"to alice {n}", wait=True)
            sent = [alice.send_text("bob", f"to bob {n}") for n in range(5)]
            deadline = asyncio.get_running_loop().time() + 30
            while len(received) < 4:
                assert asyncio.get_running_loop().time() < deadline, received
                await take(alice, received, accepted)
            a.kill()  # kill -9 of alice's broker, some messages unconfirmed
            sent += [alice.send_text("bob", f"to bob {n}") for n in range(5, 10)]  # queued
            for n in range(10, 15):
                await asyncio.to_thread(sender.send, "alice", f"to alice {n}", wait=True)
            deadline = asyncio.get_running_loop().time() + 40
            while len(received) < 15 or not accepted >= set(sent):
                assert asyncio.get_running_loop().time() < deadline, (received, accepted)
                await take(alice, received, accepted)
            assert alice.endpoint == b.endpoint
            await asyncio.to_thread(sender.close, 1.0)
            return received, sent
        finally:
            alice.stop(drain=2)
            await asyncio.wait_for(runner, 10)

    received, sent = loops.run(main())
    assert [m.text for m in received] == [f"to alice {n}" for n in range(15)]  # once, in order
    with Client("bob", b.endpoint, context=zctx) as bob:
        got = take_all(bob, 10)
    assert [m.id for m in got] == sent  # every text once, with its id, in order


async def logged_in(connection: AsyncConnection) -> None:
    while not isinstance(await connection.events.get(), LoggedIn):
        pass


async def take(
    connection: AsyncConnection, received: list[IncomingMessage], accepted: set[str]
) -> None:
    """Handle one event: a message is recorded and confirmed; an acceptance noted."""
    event = await asyncio.wait_for(connection.events.get(), 30)
    if isinstance(event, IncomingMessage):
        received.append(event)
        connection.confirm(event)
    elif isinstance(event, MessageAccepted):
        accepted.add(event.id)
    assert not isinstance(event, MessageFailed), event


def test_a_bot_whose_broker_is_killed_handles_each_message_once_and_answers_all(two_brokers, zctx):
    a, b = two_brokers
    questions = [f"q{n}" for n in range(12)]

    async def main() -> list[str]:
        bot = Bot("helper", f"{a.endpoint},{b.endpoint}", handler_attempts=1)
        handled: list[str] = []

        @bot.on_message
        async def answer(message: IncomingMessage) -> str:
            handled.append(message.text)
            await asyncio.sleep(0.05)  # a handler that takes a moment: some are mid-way
            return f"a:{message.text}"

        runner = asyncio.create_task(bot.run_async())
        try:
            assert await asyncio.to_thread(a.wait_for_log, "helper logged in", 20)

            def ask_all() -> None:
                with Client("bob", b.endpoint, context=zctx) as bob:
                    for question in questions:
                        bob.send("helper", question, wait=True)

            await asyncio.to_thread(ask_all)
            deadline = asyncio.get_running_loop().time() + 30
            while len(handled) < 3:
                assert asyncio.get_running_loop().time() < deadline and not runner.done()
                await asyncio.sleep(0.02)  # polling the handler's record
            a.kill()  # kill -9 of the bot's broker while it works through the queue
            deadline = asyncio.get_running_loop().time() + 40
            while len(handled) < len(questions):
                assert asyncio.get_running_loop().time() < deadline, handled
                await asyncio.sleep(0.05)
            return handled
        finally:
            bot.stop()
            await asyncio.wait_for(runner, 15)

    handled = loops.run(main())
    assert handled == questions  # each once, in order, across the failover
    with Client("bob", b.endpoint, context=zctx) as bob:
        answers = take_all(bob, len(questions))
    assert sorted(m.text for m in answers) == sorted(f"a:{q}" for q in questions)


@pytest.fixture
def lone_broker(tmp_path: Path, nats_node: NatsNode):
    broker = cluster_broker(tmp_path, "a", nats_node, "--nats-timeout", "1", *LONG_HEARTBEATS)
    yield broker
    broker.kill()
    assert "Traceback" not in broker.log_text(), broker.log_text()


def test_a_send_refused_unavailable_is_retried_for_as_long_as_nats_is_down(
    lone_broker, nats_node, zctx
):
    with Client("bob", lone_broker.endpoint, context=zctx):
        pass
    with Client("alice", lone_broker.endpoint, context=zctx) as alice:
        alice.send("bob", "before", wait=True)
        nats_node.kill()
        message_id = alice.send("bob", "while down")
        # More refusals than the attempt bound of other refusals, and never a failure:
        # `unavailable` is flow control, not a verdict on the text.
        refusals = 0
        deadline = time.monotonic() + 60
        while refusals <= session.MAX_SEND_ATTEMPTS:
            assert time.monotonic() < deadline, f"only {refusals} refusals"
            event = alice.next_event(timeout=1)
            assert not isinstance(event, MessageFailed), event
            if getattr(event, "ref", None) == message_id:
                assert event.code == "unavailable"
                refusals += 1
        assert [m.id for m in alice.session.unacknowledged] == [message_id]
        nats_node.start()
        wait_ready([nats_node])
        deadline = time.monotonic() + 60
        while alice.session.outbox_size:
            assert time.monotonic() < deadline, "never accepted"
            alice.poll(0.5)
    with Client("bob", lone_broker.endpoint, context=zctx) as bob:
        got = take_all(bob, 2)
    assert [(m.text, m.id) for m in got] == [("before", got[0].id), ("while down", message_id)]


def test_a_send_refused_unavailable_is_stored_once_nats_is_back(
    lone_broker,
    nats_node,
    zctx,
):
    with Client("bob", lone_broker.endpoint, context=zctx):
        pass
    with Client("alice", lone_broker.endpoint, context=zctx) as alice:
        alice.send("bob", "before", wait=True)
        nats_node.kill()
        refusals = 0
        message_id = alice.send("bob", "while down")
        deadline = time.monotonic() + 30
        while refusals == 0:
            assert time.monotonic() < deadline, "never refused"
            event = alice.next_event(timeout=1)
            if getattr(event, "ref", None) == message_id:
                assert event.code == "unavailable"
                refusals += 1
        nats_node.start()
        wait_ready([nats_node])
        deadline = time.monotonic() + 60
        while alice.session.outbox_size:
            assert time.monotonic() < deadline, "never accepted"
            alice.poll(0.5)
        events = []
        while (event := alice.next_event(timeout=0)) is not None:
            events.append(event)
        assert not any(isinstance(e, MessageFailed) for e in events), events
    with Client("bob", lone_broker.endpoint, context=zctx) as bob:
        got = take_all(bob, 2)
    assert [m.text for m in got] == ["before", "while down"]
    assert got[1].id == message_id


def test_a_client_whose_name_logs_in_at_another_broker_is_told_and_stops(two_brokers, zctx):
    a, b = two_brokers
    first = Client("mei", a.endpoint, context=zctx)
    second = Client("mei", b.endpoint, context=zctx)
    try:
        first.login(timeout=10)
        # A second copy of the same bot holding the session's resume token (as a copy
        # restored from the first one's state would): the cluster moves the session to b
        # (without the token it would be name_taken while mei is online at a).
        second.session._resume_token = first.session._resume_token
        second.login(timeout=10)
        with pytest.raises(BrokerRefused) as refused:
            first.receive(timeout=10)
        assert refused.value.wire_code == "taken_over"
        second.poll(1.5)  # longer than the brokers' heartbeat timeout
        assert second.is_online  # not taken back by the first
        assert a.log_text().count("mei logged in") == 1
    finally:
        first.close(timeout=0.5)
        second.close(timeout=0.5)
