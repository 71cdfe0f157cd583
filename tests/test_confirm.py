"""Nothing lost when a receiver dies holding messages: the SDK confirms (RECEIPT) only
what the application has finished with. Real broker, real sockets, real processes."""

from __future__ import annotations

import asyncio
import io
import json
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from mangogram_client.app import ChatApp
from mangogram_proto import Bot, Client, loops
from mangogram_proto import bot as bot_module
from mangogram_proto.events import IncomingMessage

from .conftest import ROOT, BrokerProcess, wait_for_line

pytestmark = pytest.mark.sockets

FAST = ("--rate-per-second", "100000", "--rate-burst", "100000")


@pytest.fixture
def fast_broker(tmp_path: Path) -> Iterator[BrokerProcess]:
    process = BrokerProcess(tmp_path / "data", *FAST)
    yield process
    process.kill()
    assert "Traceback" not in process.log_text(), process.log_text()


def fill_mailbox(endpoint: str, zctx, to: str, texts: list[str]) -> None:
    """`to` gets a name and goes offline; Alice sends `texts` and waits until all are
    accepted."""
    with Client(to, endpoint, context=zctx):
        pass
    with Client("alice", endpoint, context=zctx) as alice:
        for text in texts:
            alice.send(to, text)
        deadline = time.monotonic() + 30
        while alice.session.unacknowledged and time.monotonic() < deadline:
            alice.poll(0.05)
        assert not alice.session.unacknowledged


def collect(client: Client, count: int, timeout: float = 10.0) -> list[str]:
    """Up to `count` texts, stopping early when none comes for `timeout` seconds."""
    shown: list[str] = []
    for message in client.messages(timeout=timeout):
        shown.append(message.text)
        if len(shown) == count:
            break
    return shown


class LineReader:
    """Reads a child's stdout in a thread, so that every read can have a timeout."""

    def __init__(self, stream) -> None:
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._thread = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self._thread.start()

    def _read(self, stream) -> None:
        for line in stream:
            self._lines.put(line)
        self._lines.put(None)

    def next(self, timeout: float = 10.0) -> str | None:
        """The next line, or None at end of output; fails after `timeout` seconds."""
        try:
            return self._lines.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"no line in {timeout} s") from None

    def rest(self, timeout: float = 10.0) -> list[str]:
        """Every line up to end of output (the writer has exited)."""
        lines = []
        while (line := self.next(timeout)) is not None:
            lines.append(line)
        return lines


HOLDER = """
import sys
from mangogram_proto import Client
client = Client("bob", sys.argv[1])
client.login()
message = client.receive(timeout=10)
print("holding", message.text, flush=True)
sys.stdin.readline()  # still busy with the message when the test kills us
"""


def test_receiver_killed_holding_a_message_gets_every_unhandled_one_again(fast_broker, zctx):
    texts = [f"текст {i:03d}" for i in range(300)]
    fill_mailbox(fast_broker.endpoint, zctx, "bob", texts)
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, fast_broker.endpoint],
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        encoding="utf-8",
    )
    try:
        assert wait_for_line(holder.stdout, "holding") == ["holding текст 000\n"]
    finally:
        holder.kill()  # SIGKILL (TerminateProcess on Windows): no goodbye, no last receipt
        holder.wait(10)
    assert fast_broker.wait_for_log("bob is offline")
    with Client("bob", fast_broker.endpoint, context=zctx) as bob:
        shown = collect(bob, len(texts))
    # The first process never finished a message, so the second shows all, once, in order.
    assert shown == texts, (len(shown), shown[:2])


def test_receive_confirms_the_previous_message_and_close_the_last(fast_broker, zctx):
    texts = [f"m{i}" for i in range(5)]
    fill_mailbox(fast_broker.endpoint, zctx, "bob", texts)
    bob = Client("bob", fast_broker.endpoint, context=zctx)
    bob.login()
    assert [bob.receive(timeout=10).text for _ in range(3)] == texts[:3]
    bob.close(confirm=False)  # m2 was not handled: it comes again
    with Client("bob", fast_broker.endpoint, context=zctx) as bob:
        assert bob.receive(timeout=10).text == "m2"
        bob.confirm()
        assert bob.receive(timeout=10).text == "m3"
    with Client("bob", fast_broker.endpoint, context=zctx) as bob:  # left cleanly: m3 done
        assert collect(bob, 5, timeout=1) == ["m4"]


def test_listener_killed_mid_stream_loses_no_line(fast_broker, zctx, tmp_path):
    # Lines of about 1 KB: the 64 KB pipe (not read by the test) stops the listener
    # long before it has written the first delivery window of 256 messages.
    texts = [f"{i:03d} " + "ї" * 500 for i in range(300)]
    fill_mailbox(fast_broker.endpoint, zctx, "bob", texts)
    command = [sys.executable, str(ROOT / "client.py"), "--server", fast_broker.endpoint]
    command += ["--name", "bob", "--listen", "--json"]
    env = {"MANGOGRAM_CONFIG_DIR": str(tmp_path / "cfg"), "PYTHONPATH": str(ROOT)}
    env |= {"MANGOGRAM_INSECURE_PLAINTEXT": "1", "PATH": "/usr/bin:/bin"}

    def start() -> tuple[subprocess.Popen, LineReader]:
        proc = subprocess.Popen(
            command, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True, encoding="utf-8",
        )  # fmt: skip
        wait_for_line(proc.stderr, "listening as bob")
        return proc, LineReader(proc.stdout)

    first, first_out = start()
    try:
        written = [json.loads(first_out.next())["text"] for _ in range(5)]
    finally:
        first.kill()
        first.wait(10)
    written += [json.loads(line)["text"] for line in first_out.rest()]
    assert fast_broker.wait_for_log("bob is offline")
    second, second_out = start()
    try:
        again = [json.loads(second_out.next())["text"]]
        start_at = texts.index(again[0])
        again += [json.loads(second_out.next())["text"] for _ in texts[start_at + 1 :]]
    finally:
        second.send_signal(signal.SIGTERM)
        second.wait(10)
    assert written == texts[: len(written)]
    # The second listener starts at or before the first line the first did not write
    # (a line written just before the kill may come again, never one lost), in order.
    assert start_at <= len(written), (start_at, len(written))
    assert again == texts[start_at:]


def run_bot(bot: Bot, timeout: float = 20.0) -> None:
    async def main() -> None:
        await asyncio.wait_for(bot.run_async(), timeout)

    loops.run(main())


def test_bot_stopped_with_a_full_queue_leaves_it_for_the_next_run(fast_broker, zctx):
    texts = [f"job {i}" for i in range(50)]
    fill_mailbox(fast_broker.endpoint, zctx, "worker", texts)
    first = Bot("worker", fast_broker.endpoint)
    done_first: list[str] = []

    @first.on_message
    async def stop_after_one(message: IncomingMessage) -> None:
        first.stop()  # the rest of the mailbox is in the bot's queue by now, or on its way
        await asyncio.sleep(0)  # the handler at work still finishes
        done_first.append(message.text)

    run_bot(first)
    second = Bot("worker", fast_broker.endpoint)
    done_second: list[str] = []

    @second.on_message
    async def take(message: IncomingMessage) -> None:
        done_second.append(message.text)
        if len(done_first) + len(done_second) == len(texts):
            second.stop()

    run_bot(second)
    assert done_first == texts[:1]
    assert done_second == texts[1:]


def test_bot_handler_that_raises_gets_the_message_again(fast_broker, zctx):
    texts = [f"job {i}" for i in range(10)]
    fill_mailbox(fast_broker.endpoint, zctx, "worker", texts)
    bot = Bot("worker", fast_broker.endpoint)  # tries again after 1 s
    attempts: list[str] = []
    done: list[str] = []

    @bot.on_message
    async def flaky(message: IncomingMessage) -> None:
        attempts.append(message.text)
        if message.text == "job 3" and attempts.count("job 3") == 1:
            raise RuntimeError("the database blinked")
        done.append(message.text)
        if len(done) == len(texts):
            bot.stop()

    run_bot(bot)
    assert done == texts
    assert attempts.count("job 3") == 2


def test_bot_stopped_while_a_handler_fails_gets_that_message_next_run(fast_broker, zctx):
    texts = [f"job {i}" for i in range(10)]
    fill_mailbox(fast_broker.endpoint, zctx, "worker", texts)
    first = Bot("worker", fast_broker.endpoint)
    done: list[str] = []

    @first.on_message
    async def broken(message: IncomingMessage) -> None:
        if message.text == "job 3":
            first.stop()
            raise RuntimeError("bug")
        done.append(message.text)

    run_bot(first)
    assert done == texts[:3]
    second = Bot("worker", fast_broker.endpoint)

    @second.on_message
    async def fixed(message: IncomingMessage) -> None:
        done.append(message.text)
        if len(done) == len(texts):
            second.stop()

    run_bot(second)
    assert done == texts


def test_bot_gives_up_a_message_that_always_fails_and_goes_on(fast_broker, zctx):
    texts = [f"job {i}" for i in range(10)]
    fill_mailbox(fast_broker.endpoint, zctx, "worker", texts)
    bot = Bot("worker", fast_broker.endpoint, handler_attempts=2, retry_delay=0.01)
    attempts: list[str] = []

    @bot.on_message
    async def poisoned(message: IncomingMessage) -> None:
        attempts.append(message.text)
        if message.text == "job 3":
            raise ValueError("cannot parse this one")
        if message.text == texts[-1]:
            bot.stop()

    run_bot(bot)
    assert attempts == texts[:4] + ["job 3"] + texts[4:]
    with Client("worker", fast_broker.endpoint, context=zctx) as worker:
        # All were finished or given up, and confirmed: nothing is left to deliver.
        assert worker.receive(timeout=1) is None


class FailingScreen(io.StringIO):
    """A terminal that breaks while one line is being printed."""

    def __init__(self, breaks_on: str) -> None:
        super().__init__()
        self.breaks_on = breaks_on
        self.broke = False

    def write(self, text: str) -> int:
        if self.breaks_on in text:
            self.broke = True
            raise OSError("the terminal went away")
        return super().write(text)


def test_console_confirms_a_message_only_once_it_is_on_screen(fast_broker, zctx):
    from prompt_toolkit.input import create_pipe_input
    from prompt_toolkit.output import DummyOutput
    from rich.console import Console

    texts = [f"line {i}" for i in range(5)]
    fill_mailbox(fast_broker.endpoint, zctx, "bob", texts)
    screen = FailingScreen("line 2")

    async def main() -> None:
        with create_pipe_input() as pipe:
            console = Console(file=screen, width=100, color_system=None, force_terminal=False)
            app = ChatApp(
                fast_broker.endpoint, "bob", console=console, input=pipe, output=DummyOutput(),
                remember=False,
            )  # fmt: skip
            runner = asyncio.create_task(app.run())
            deadline = time.monotonic() + 20
            while not screen.broke and time.monotonic() < deadline:
                await asyncio.sleep(0.02)  # yields to the app; bounded by the deadline
            pipe.send_text("/exit\r")
            await asyncio.wait_for(runner, 10)

    loops.run(main())
    assert screen.broke
    assert "line 1" in screen.getvalue()
    with Client("bob", fast_broker.endpoint, context=zctx) as bob:
        assert collect(bob, 3) == texts[2:]


def test_bot_stops_despite_a_hanging_handler_and_gets_that_message_next_run(
    fast_broker, zctx, monkeypatch
):
    monkeypatch.setattr(bot_module, "STOP_GRACE_S", 0.2)
    texts = [f"job {i}" for i in range(3)]
    fill_mailbox(fast_broker.endpoint, zctx, "worker", texts)
    first = Bot("worker", fast_broker.endpoint)

    @first.on_message
    async def hangs(message: IncomingMessage) -> None:
        first.stop()
        await asyncio.Event().wait()  # never returns: the grace period ends it

    run_bot(first)
    second = Bot("worker", fast_broker.endpoint)
    done: list[str] = []

    @second.on_message
    async def take(message: IncomingMessage) -> None:
        done.append(message.text)
        if len(done) == len(texts):
            second.stop()

    run_bot(second)
    assert done == texts
