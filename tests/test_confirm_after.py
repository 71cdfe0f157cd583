"""A message answered by a text is confirmed only once the broker accepted that text (or
refused it for good): pure session tests over the broker core, and the Bot's bookkeeping
of what its handlers sent, with no sockets. The kill -9 proof is in test_bot_replies.py."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest

from mangogram_broker.store import MemoryStore
from mangogram_proto import Bot, codec, loops
from mangogram_proto.events import Event, IncomingMessage, MessageFailed
from mangogram_proto.messages import Accepted, Deliver, Error, Receipt

from .harness import TEST_LIMITS, Network


@pytest.fixture
def net() -> Network:
    network = Network(store=MemoryStore())
    network.core.limits = dataclasses.replace(
        TEST_LIMITS, rate_per_second=10_000, rate_burst=10_000, max_mailbox=1000
    )
    return network


def receipts(frames: list[list[bytes]]) -> list[object]:
    return [codec.decode(f) for f in frames if codec.command_of(f) == b"RECEIPT"]


def delivered(session, *seqs: int) -> None:
    for seq in seqs:
        session.receive(codec.encode(Deliver(f"m{seq}", str(seq), "alice", "t", 1, 2, seq)), 10)


def test_confirmation_waits_for_the_reply_and_keeps_order():
    session = Network().join("bot").session
    delivered(session, 1, 2)
    reply = session.send_text("alice", "answer to m1", 10)
    session.confirm(1, 10, after=[reply])
    session.confirm(2, 10)  # handled, but behind m1, which waits for its reply
    assert receipts(session.data_to_send()) == []
    assert session.held_confirms() == {1: frozenset({reply})}
    session.confirm(1, 11)  # confirming again does not skip the wait
    assert receipts(session.data_to_send()) == []
    session.receive(codec.encode(Accepted([reply], ["b1"], 12)), 12)
    assert receipts(session.data_to_send()) == [Receipt(2)]
    assert session.held_confirms() == {}


def test_a_reply_refused_for_good_ends_the_wait():
    session = Network().join("bot").session
    delivered(session, 1)
    reply = session.send_text("nobody", "answer", 10)
    other = session.send_text("alice", "also sent for m1", 10)
    session.confirm(1, 10, after=[reply, other])
    events = session.receive(
        codec.encode(Error("unknown_recipient", "no such user", ref=reply)), 11
    )
    assert [type(e) for e in events] == [MessageFailed]
    assert receipts(session.data_to_send()) == []  # `other` is still on its way
    session.receive(codec.encode(Accepted([other], ["b2"], 12)), 12)
    assert receipts(session.data_to_send()) == [Receipt(1)]


def test_texts_already_accepted_do_not_hold_the_confirmation():
    session = Network().join("bot").session
    delivered(session, 1)
    reply = session.send_text("alice", "answer", 10)
    session.receive(codec.encode(Accepted([reply], ["b1"], 11)), 11)
    session.confirm(1, 12, after=[reply])
    assert receipts(session.data_to_send()) == [Receipt(1)]


def test_killed_before_the_reply_was_accepted_the_message_comes_again(net):
    bob = net.join("bob")
    bob.session.leave(net.now)
    net.pump()
    alice = net.join("alice")
    question = alice.session.send_text("bob", "question", net.now)
    net.pump()
    bot = net.join("bob", auto_confirm=False)
    [message] = bot.take(IncomingMessage)
    reply = bot.session.send_text("alice", "answer", net.now)
    bot.session.confirm(message.seq, net.now, after=[reply])
    # Everything but the SEND reaches the broker (pacing held it back), then the kill.
    for frames in bot.session.data_to_send():
        if codec.command_of(frames) != b"SEND":
            net.route(net.core.handle_frames(bot.peer, frames, net.clock))
    net.disconnect(bot)
    again = net.join("bob", auto_confirm=False)
    assert [m.id for m in again.take(IncomingMessage)] == [question]


class FakeConnection:
    """What Bot's worker uses of AsyncConnection: an event queue, send_text, confirm."""

    def __init__(self) -> None:
        self.events: asyncio.Queue[Event] = asyncio.Queue()
        self.sent: list[tuple[str, str, str]] = []
        self.confirmed: list[tuple[int, list[str]]] = []

    def send_text(self, to: str, text: str) -> str:
        message_id = f"id{len(self.sent)}"
        self.sent.append((message_id, to, text))
        return message_id

    def confirm(self, message: IncomingMessage, after: list[str]) -> None:
        self.confirmed.append((message.seq, list(after)))

    def stop(self) -> None:
        pass


def test_bot_confirms_after_the_reply_and_every_send_its_handler_made():
    bot = Bot("bot")
    connection = FakeConnection()
    outside: list[str] = []

    @bot.on_message
    async def answer(message: IncomingMessage) -> str:
        bot.send("carol", "sent from the handler")
        await asyncio.get_running_loop().create_task(from_a_task())
        return f"re: {message.text}"

    async def from_a_task() -> None:
        bot.send("dave", "sent from a task the handler started")

    async def main() -> None:
        bot._connection = connection  # type: ignore[assignment]
        bot._stopping = asyncio.Event()
        worker = asyncio.create_task(bot._run_handlers(connection))  # type: ignore[arg-type]
        await connection.events.put(IncomingMessage("m1", "b1", "alice", "hi", 1, 2, 1))
        while not connection.confirmed:
            await asyncio.sleep(0)
        outside.append(bot.send("erin", "sent outside any handler"))
        worker.cancel()
        await asyncio.gather(worker, return_exceptions=True)

    loops.run(asyncio.wait_for(main(), 10))
    ids = {text: message_id for message_id, _, text in connection.sent}
    assert connection.confirmed == [
        (
            1,
            [
                ids["sent from the handler"],
                ids["sent from a task the handler started"],
                ids["re: hi"],
            ],
        )
    ]
    assert outside == [ids["sent outside any handler"]]
