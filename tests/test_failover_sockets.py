"""Endpoint rotation, request retries and the `taken_over` notice with real brokers on
loopback and real DEALER sockets (the SDK's blocking Client, AsyncConnection and Bot).

Two SQLite brokers on two ports are two separate services, not a cluster: enough to see
that a client whose broker dies logs in at the next endpoint. Resuming with nothing lost
across a cluster is in test_cluster_failover.py."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from mangogram_proto import Bot, Client, codec, loops
from mangogram_proto.aio import AsyncConnection
from mangogram_proto.errors import BrokerRefused
from mangogram_proto.events import Event, IncomingMessage, LoggedIn, LoginRefused, OnlineUsers
from mangogram_proto.keys import KeyPair, save_keypair
from mangogram_proto.messages import Error

from .conftest import BrokerProcess, posix_signals

pytestmark = pytest.mark.sockets

ENCRYPTED = {"MANGOGRAM_INSECURE_PLAINTEXT": "0"}


@pytest.fixture
def two_brokers(tmp_path: Path):
    brokers = [BrokerProcess(tmp_path / name) for name in ("a", "b")]
    yield brokers
    for broker in brokers:
        broker.kill()
    for broker in brokers:
        assert "Traceback" not in broker.log_text(), broker.log_text()


async def next_of(connection: AsyncConnection, kind: type, timeout: float = 20.0) -> Event:
    """The next event of `kind` from the connection (others are skipped)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while (left := deadline - loop.time()) > 0:
        event = await asyncio.wait_for(connection.events.get(), left)
        if isinstance(event, kind):
            return event
    raise AssertionError(f"no {kind.__name__} within {timeout} s")


@posix_signals
def test_async_connection_logs_in_at_the_next_endpoint_when_its_broker_dies(two_brokers):
    a, b = two_brokers

    async def main() -> list[str]:
        connection = AsyncConnection("alice", f"{a.endpoint},{b.endpoint}")
        assert connection.endpoints == (a.endpoint, b.endpoint)
        runner = asyncio.create_task(connection.run())
        try:
            await next_of(connection, LoggedIn)
            used = [connection.endpoint]
            a.kill()  # kill -9
            await next_of(connection, LoggedIn)
            used.append(connection.endpoint)
            return used
        finally:
            connection.stop()
            await asyncio.wait_for(runner, 10)

    assert loops.run(main()) == [a.endpoint, b.endpoint]
    assert b.wait_for_log("alice logged in")


@posix_signals
def test_a_bot_answers_from_the_next_broker_after_its_broker_dies(two_brokers, zctx):
    a, b = two_brokers
    with Client("bob", b.endpoint, context=zctx):
        pass  # bob is a known name at b, so the bot's reply there is stored

    async def main() -> str:
        bot = Bot("helper", f"{a.endpoint},{b.endpoint}")

        @bot.on_message
        async def echo(message: IncomingMessage) -> str:
            return f"echo: {message.text}"

        runner = asyncio.create_task(bot.run_async())
        try:
            assert await asyncio.to_thread(a.wait_for_log, "helper logged in", 20)
            a.kill()
            assert await asyncio.to_thread(b.wait_for_log, "helper logged in", 30)

            def ask() -> str:
                with Client("bob", b.endpoint, context=zctx) as bob:
                    bob.send("helper", "are you there?", wait=True)
                    answer = bob.receive(timeout=20)
                    assert answer is not None
                    return answer.text

            return await asyncio.to_thread(ask)
        finally:
            bot.stop()
            await asyncio.wait_for(runner, 15)

    assert loops.run(main()) == "echo: are you there?"


def test_the_blocking_client_moves_on_too_and_names_the_endpoint_in_use(two_brokers, zctx):
    a, b = two_brokers
    client = Client("carol", f"{a.endpoint}, {b.endpoint}", context=zctx)
    try:
        client.login(timeout=10)
        assert client.endpoint == a.endpoint
        a.kill()
        deadline = time.monotonic() + 30
        while client.endpoint != b.endpoint or not client.is_online:
            assert time.monotonic() < deadline, "never logged in at the second broker"
            client.poll(0.2)
        assert b.wait_for_log("carol logged in")
    finally:
        client.close(timeout=0.5)


def test_a_first_endpoint_that_is_down_is_passed_over_at_the_first_login(broker):
    # Nothing listens on the first port: the LOGIN gets no answer, and after the
    # heartbeat timeout (6 s before any WELCOME) the connection tries the next endpoint.
    dead = f"tcp://127.0.0.1:{free_port()}"

    async def main() -> str:
        connection = AsyncConnection("fred", f"{dead},{broker.endpoint}")
        runner = asyncio.create_task(connection.run())
        try:
            # (A bound, not a measurement: 6 s of silence, then a backoff, on a machine
            # that may be busy with the rest of the suite.)
            await next_of(connection, LoggedIn, timeout=60)
            return connection.endpoint
        finally:
            connection.stop()
            await asyncio.wait_for(runner, 10)

    assert loops.run(main()) == broker.endpoint


def free_port() -> int:
    """A loopback port nothing listens on (bound and released at once)."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_who_and_history_asked_faster_than_the_broker_allows_are_answered(broker, zctx):
    # The broker answers WHO (and LOOKUP) and HISTORY 2 times a second, burst 8: twenty
    # of each in a row used to time out after 5 s each once the burst was spent.
    with Client("dora", broker.endpoint, context=zctx) as dora:
        refusals = watch_refusals(dora)
        for _ in range(20):
            assert "dora" in dora.online_users(timeout=10)
        for _ in range(12):
            assert dora.history("nobody", limit=1, timeout=10).items == ()
    # The broker did refuse some (with the request's id), and each was asked again.
    assert {"WHO", "HISTORY"} <= {command for command, _ref in refusals}
    assert all(ref for _command, ref in refusals)


def test_async_who_asked_faster_than_the_broker_allows_is_answered(broker):
    async def main() -> int:
        connection = AsyncConnection("gwen", broker.endpoint)
        runner = asyncio.create_task(connection.run())
        try:
            await next_of(connection, LoggedIn)
            answered = 0
            for _ in range(14):  # the burst is 8, then 2 a second
                connection.request_online()
                await next_of(connection, OnlineUsers, timeout=10)
                answered += 1
            return answered
        finally:
            connection.stop()
            await asyncio.wait_for(runner, 10)

    assert loops.run(main()) == 14


def watch_refusals(client: Client) -> list[tuple[str, str | None]]:
    """Record each rate_limited ERROR the client's session gets: (what it refused, ref)."""
    seen: list[tuple[str, str | None]] = []
    receive = client.session.receive

    def recording(frames: list[bytes], now: int) -> list[Event]:
        message = codec.decode(frames)
        if isinstance(message, Error) and message.code == "rate_limited":
            seen.append((message.message.split()[2].rstrip(";"), message.ref))
        return receive(frames, now)

    client.session.receive = recording  # type: ignore[method-assign]
    return seen


@pytest.fixture
def secure_broker(tmp_path, monkeypatch):
    monkeypatch.setenv("MANGOGRAM_INSECURE_PLAINTEXT", "0")
    monkeypatch.setenv("MANGOGRAM_CONFIG_DIR", str(tmp_path / "config"))
    process = BrokerProcess(tmp_path / "broker-data", env=ENCRYPTED)
    yield process
    process.kill()
    assert "Traceback" not in process.log_text(), process.log_text()


def test_a_session_taken_over_elsewhere_is_told_and_stops(secure_broker, zctx, tmp_path):
    identity = tmp_path / "mei.json"
    save_keypair(identity, KeyPair.generate())
    options = {"server_key": secure_broker.public_key, "identity": identity, "context": zctx}
    first = Client("Mei", secure_broker.endpoint, **options)
    second = Client("Mei", secure_broker.endpoint, takeover=True, **options)
    try:
        first.login(timeout=10)
        second.login(timeout=10)
        with pytest.raises(BrokerRefused) as refused:
            first.receive(timeout=10)
        assert refused.value.wire_code == "taken_over"
        assert "elsewhere" in str(refused.value)
        with pytest.raises(BrokerRefused):
            first.send("Mei", "still here?")
        with pytest.raises(BrokerRefused) as waiting:
            first.poll(0.1)
        assert waiting.value.wire_code == "taken_over"
        # It does not log in again: the second keeps the name, without a fight.
        second.poll(1.5)  # longer than the test broker's heartbeat timeout
        assert second.is_online
        assert secure_broker.log_text().count("Mei resumed on a new connection") == 1
    finally:
        first.close(timeout=0.5)
        second.close(timeout=0.5)


def test_an_async_connection_taken_over_ends_with_a_refusal(secure_broker, zctx, tmp_path):
    identity = tmp_path / "mei.json"
    save_keypair(identity, KeyPair.generate())

    async def main() -> LoginRefused:
        options = {"server_key": secure_broker.public_key, "identity": identity}
        first = AsyncConnection("Mei", secure_broker.endpoint, **options)
        runner = asyncio.create_task(first.run())
        await next_of(first, LoggedIn)
        second = await asyncio.to_thread(
            Client, "Mei", secure_broker.endpoint, takeover=True, context=zctx, **options
        )
        try:
            await asyncio.to_thread(second.login, 10)
            refusal = await next_of(first, LoginRefused)
            await asyncio.wait_for(runner, 10)  # run() ends by itself: no reconnecting
            assert first.refused == refusal
            return refusal
        finally:
            first.stop()
            await asyncio.to_thread(second.close, 0.5)

    refusal = loops.run(main())
    assert refusal.code == "taken_over"
