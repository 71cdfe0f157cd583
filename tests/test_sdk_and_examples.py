"""The SDK and the example bots against the real broker: chatting, reconnecting after a
broker crash, resending what was not acknowledged."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest

from mangogram_proto import Client
from mangogram_proto.events import LoggedIn, MessageDelivered

from .conftest import ROOT, BrokerProcess

pytestmark = pytest.mark.sockets


def start_bot(script: str, broker: BrokerProcess, name: str, *extra: str) -> subprocess.Popen:
    return subprocess.Popen(
        [
            sys.executable,
            str(ROOT / "examples" / script),
            "--name",
            name,
            "--endpoint",
            broker.endpoint,
            *extra,
        ],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_until_online(client: Client, name: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if name in client.online_users():
            return
        client.poll(0.6)  # the broker answers WHO 2 times a second per connection
    raise AssertionError(f"{name} never came online")


def stop_bot(bot: subprocess.Popen, signum: int = signal.SIGINT) -> str:
    bot.send_signal(signum)
    _, err = bot.communicate(timeout=10)
    assert bot.returncode == 0, err
    assert "Traceback" not in err, err
    return err


@pytest.mark.parametrize(
    "script,text,reply",
    [
        ("echo_bot.py", "Привіт, боте! 🥭", "echo: Привіт, боте! 🥭"),
        ("raw_bot.py", "Київ", "вїиК"),
    ],
)
def test_example_bot_answers(broker, zctx, script, text, reply):
    extra = ("--insecure-plaintext",) if script == "raw_bot.py" else ()
    bot = start_bot(script, broker, "helper", *extra)
    try:
        with Client("Олена", broker.endpoint, context=zctx) as user:
            wait_until_online(user, "helper")
            sent = user.send("helper", text, wait=True)
            answer = user.receive(timeout=10)
            assert answer is not None and (answer.sender, answer.text) == ("helper", reply)
            deadline = time.monotonic() + 5
            delivered = None
            while delivered is None and time.monotonic() < deadline:
                event = user.next_event(timeout=0.2)
                if isinstance(event, MessageDelivered) and event.id == sent:
                    delivered = event
            assert delivered is not None, "the bot never confirmed receipt"
    finally:
        stop_bot(bot)
    assert broker.wait_for_log("helper is offline \\(left")


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_raw_bot_leaves_on_a_signal_even_if_started_with_ctrl_c_ignored(broker, zctx, signum):
    # A shell's background job starts with SIGINT ignored; a service manager stops with
    # SIGTERM. Either way the bot says LEAVE, and others see it go at once.
    bot = subprocess.Popen(
        [sys.executable, str(ROOT / "examples" / "raw_bot.py"), "--name", "helper",
         "--endpoint", broker.endpoint, "--insecure-plaintext"],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN),
    )  # fmt: skip
    with Client("Олена", broker.endpoint, context=zctx) as user:
        wait_until_online(user, "helper")
    stop_bot(bot, signum)
    assert broker.wait_for_log("helper is offline \\(left")


def test_raw_bot_speaks_curvezmq_with_only_the_protocol_document(tmp_path, zctx, monkeypatch):
    monkeypatch.setenv("MANGOGRAM_INSECURE_PLAINTEXT", "0")
    monkeypatch.setenv("MANGOGRAM_CONFIG_DIR", str(tmp_path / "user"))
    broker = BrokerProcess(tmp_path / "data", env={"MANGOGRAM_INSECURE_PLAINTEXT": "0"})
    monkeypatch.setenv("MANGOGRAM_KEY_ENDPOINT", broker.key_endpoint)
    bot = start_bot(
        # "=": a Z85 key may begin with "-", which argparse would take for an option
        "raw_bot.py", broker, "reverser", f"--server-key={broker.public_key}",
        "--identity", str(tmp_path / "bot.json"),
    )  # fmt: skip
    try:
        with Client("Олена", broker.endpoint, context=zctx) as user:
            wait_until_online(user, "reverser")
            user.send("reverser", "абв", wait=True)
            answer = user.receive(timeout=10)
            assert answer is not None and answer.text == "вба"
    finally:
        stop_bot(bot)
        broker.kill()


def test_client_logs_in_again_and_resends_after_broker_crash(tmp_path, zctx):
    first = BrokerProcess(tmp_path / "data")
    endpoint = first.endpoint
    alice = Client("alice", endpoint, context=zctx)
    bob = Client("bob", endpoint, context=zctx)
    second = None
    try:
        alice.login(timeout=5)
        bob.login(timeout=5)
        first.kill()  # kill -9: no goodbye to anyone
        pending = alice.send("bob", "written while the broker was down ✉")
        assert [s.id for s in alice.session.unacknowledged] == [pending]
        second = BrokerProcess(tmp_path / "data", bind=endpoint)
        # bob must be back before alice's resend arrives: with no offline mailbox yet,
        # a message for an offline user is refused, not stored
        deadline = time.monotonic() + 20
        while not any(
            isinstance(e, LoggedIn) and e.resumed
            for e in iter(lambda: bob.next_event(timeout=0.1), None)
        ):
            assert time.monotonic() < deadline, "bob did not log in again"
        got = None
        while got is None and time.monotonic() < deadline:
            alice.poll(0.05)
            got = bob.receive(timeout=0.05)
        assert got is not None, second.log_text()
        assert (got.id, got.text) == (pending, "written while the broker was down ✉")
        # The broker hands bob the DELIVER before alice the ACCEPTED of the same turn.
        while alice.session.unacknowledged and time.monotonic() < deadline:
            alice.poll(0.05)
        assert alice.session.unacknowledged == ()
        relogins = []
        while (event := alice.next_event(timeout=0)) is not None:
            if isinstance(event, LoggedIn):
                relogins.append(event)
        assert relogins and relogins[-1].resumed
        assert bob.receive(timeout=0.3) is None  # exactly once
    finally:
        alice.close()
        bob.close()
        first.kill()
        if second is not None:
            second.kill()


def test_bot_reconnects_after_broker_crash(tmp_path, zctx):
    first = BrokerProcess(tmp_path / "data")
    endpoint = first.endpoint
    bot = start_bot("echo_bot.py", first, "echo")
    second = None
    try:
        with Client("watcher", endpoint, context=zctx) as watcher:
            wait_until_online(watcher, "echo")
        first.kill()
        second = BrokerProcess(tmp_path / "data", bind=endpoint)
        with Client("Тарас", endpoint, context=zctx) as user:
            wait_until_online(user, "echo", timeout=20)
            user.send("echo", "ще раз", wait=True)
            answer = user.receive(timeout=10)
            assert answer is not None and answer.text == "echo: ще раз"
    finally:
        stop_bot(bot)
        first.kill()
        if second is not None:
            second.kill()


def test_send_wait_returns_after_acceptance_and_raises_on_refusal(broker, zctx):
    from mangogram_proto import BrokerRefused, ErrorCode

    with Client("alice", broker.endpoint, context=zctx) as alice:
        with pytest.raises(BrokerRefused) as caught:
            alice.send("nobody-here", "hello?", wait=True)
        assert caught.value.code is ErrorCode.UNKNOWN_RECIPIENT
        with Client("bob", broker.endpoint, context=zctx) as bob:
            message_id = alice.send("bob", "hi", wait=True)
            assert bob.receive(timeout=5).id == message_id
        assert alice.session.unacknowledged == ()
