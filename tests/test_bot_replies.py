"""A bot's reply is not lost when the bot dies: the message it answers is confirmed only
once the broker has accepted the reply. Real broker, real bot processes, kill -9."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from mangogram_proto import Bot, Client
from mangogram_proto.events import IncomingMessage

from .conftest import ROOT, BrokerProcess
from .test_confirm import FAST, LineReader, collect, fill_mailbox, run_bot
from .test_sdk_and_examples import start_bot, stop_bot

pytestmark = pytest.mark.sockets

# The echo bot, except that its SEND frames never reach the socket (as when pacing or a
# full send queue holds them back); everything else, RECEIPT included, goes out. After
# it has handled the message "last" it makes two WHO round trips, so the broker has
# read everything the bot sent up to then, and prints "ready": the moment to kill it.
HELD_REPLIES_BOT = """
import asyncio, sys
from mangogram_proto import Bot, aio, codec, loops
from mangogram_proto.events import OnlineUsers
from mangogram_proto.session import ClientSession

class HeldSends(ClientSession):
    def data_to_send(self):
        return [frames for frames in super().data_to_send() if codec.command_of(frames) != b"SEND"]

aio.ClientSession = HeldSends
bot = Bot("echo", sys.argv[1])
answers = asyncio.Queue()

@bot.on_event
async def note(event):
    if isinstance(event, OnlineUsers):
        answers.put_nowait(event)

async def barrier():
    # Runs once the worker is back at its queue, i.e. after it dealt with "last".
    for _ in range(2):
        bot._connection.request_online()
        await asyncio.wait_for(answers.get(), 10)
    print("ready", flush=True)

@bot.on_message
async def echo(message):
    if message.text == "last":
        asyncio.get_running_loop().create_task(barrier())
    return f"echo: {message.text}"

loops.run(bot.run_async())
"""


@pytest.fixture
def fast_broker(tmp_path: Path) -> Iterator[BrokerProcess]:
    # WHO is limited to 2 a second per connection by default; the held bot asks twice.
    process = BrokerProcess(tmp_path / "data", *FAST, "--who-rate", "100")
    yield process
    process.kill()
    assert "Traceback" not in process.log_text(), process.log_text()


def test_bot_killed_before_its_reply_was_accepted_answers_after_restart(fast_broker, zctx):
    texts = ["c1", "c2", "last"]
    with Client("echo", fast_broker.endpoint, context=zctx):
        pass  # the name exists, so texts to it wait in its mailbox
    with Client("alice", fast_broker.endpoint, context=zctx) as alice:
        for text in texts:
            alice.send("echo", text, wait=True)
        held = subprocess.Popen(
            [sys.executable, "-c", HELD_REPLIES_BOT, fast_broker.endpoint],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        try:
            assert LineReader(held.stdout).next(timeout=20) == "ready\n"
        finally:
            held.kill()  # kill -9: handled, replies never accepted
            held.wait(10)
        restarted = start_bot("echo_bot.py", fast_broker, "echo")
        try:
            replies = collect(alice, len(texts), timeout=10)
        finally:
            stop_bot(restarted)
    assert replies == [f"echo: {text}" for text in texts]


@pytest.fixture
def paced_broker(tmp_path: Path) -> Iterator[BrokerProcess]:
    # 10 texts a second, burst 1: the bot's replies queue up behind one another.
    process = BrokerProcess(tmp_path / "data", "--rate-per-second", "10", "--rate-burst", "1")
    yield process
    process.kill()
    assert "Traceback" not in process.log_text(), process.log_text()


def test_a_stopped_bot_sends_its_queued_replies_before_it_leaves(paced_broker, zctx):
    texts = ["a", "b", "c"]
    fill_mailbox(paced_broker.endpoint, zctx, "echo", texts)
    bot = Bot("echo", paced_broker.endpoint)

    @bot.on_message
    async def echo(message: IncomingMessage) -> str:
        if message.text == texts[-1]:
            bot.stop()  # the replies to "b" and "c" are still paced in the outbox
        return f"echo: {message.text}"

    run_bot(bot)
    session = bot.session
    assert session is not None
    assert (session.outbox_size, session.held_confirms()) == (0, {})
    assert session.confirmed_mark == len(texts)
    with Client("alice", paced_broker.endpoint, context=zctx) as alice:
        assert collect(alice, len(texts), timeout=5) == [f"echo: {text}" for text in texts]
