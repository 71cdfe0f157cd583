"""The interactive client driven through prompt_toolkit's pipe input, against the real
broker; and the scripting modes as real processes."""

from __future__ import annotations

import asyncio
import io
import json
import os
import subprocess
import sys
import time

import pytest
from prompt_toolkit.input import create_pipe_input
from prompt_toolkit.output import DummyOutput
from rich.console import Console

from mangogram_client.app import ChatApp
from mangogram_client.settings import load_config_file, load_remembered, save_remembered
from mangogram_proto import Client, loops
from mangogram_proto.aio import AsyncConnection
from mangogram_proto.events import IncomingMessage, LoggedIn, MessageRead, PresenceChanged
from mangogram_proto.session import State

from .conftest import GRACEFUL_SPAWN, GRACEFUL_STOP, ROOT, BrokerProcess, wait_for_line

pytestmark = pytest.mark.sockets


async def wait_for(predicate, timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)  # yields to the app under test; bounded by the deadline


async def next_event(connection: AsyncConnection, kind: type, timeout: float = 10.0):
    deadline = time.monotonic() + timeout
    while True:
        remaining = deadline - time.monotonic()
        assert remaining > 0, f"no {kind.__name__}"
        event = await asyncio.wait_for(connection.events.get(), remaining)
        if isinstance(event, kind):
            return event


def run_chat_scenario(endpoint: str, name: str | None, script) -> tuple[int, str]:
    """Run ChatApp with a pipe input; `script(app, pipe)` drives it. Returns (code, screen)."""
    screen = io.StringIO()

    async def main() -> int:
        with create_pipe_input() as pipe:
            console = Console(file=screen, width=100, color_system=None, force_terminal=False)
            app = ChatApp(
                endpoint, name, console=console, input=pipe, output=DummyOutput(), remember=False
            )
            runner = asyncio.create_task(app.run())
            try:
                await asyncio.wait_for(script(app, pipe), 30)
            except BaseException:
                runner.cancel()
                raise
            return await asyncio.wait_for(runner, 10)

    code = loops.run(main())
    return code, screen.getvalue()


def test_chat_with_a_peer_shows_messages_marks_and_leaves_cleanly(broker):
    async def script(app, pipe):
        peer = AsyncConnection("Тарас", broker.endpoint)
        peer_task = asyncio.create_task(peer.run())
        await next_event(peer, LoggedIn)
        await wait_for(lambda: app.state.connection == "online", what="login")
        # The app may log in before Тарас does and learn of him only from the presence
        # event that follows; "/to" typed before that rightly says "(offline)".
        await wait_for(lambda: "Тарас" in app.state.online.values(), what="Тарас's presence")
        pipe.send_text("/to тарас\r")
        await wait_for(lambda: app.state.peer == "Тарас", what="peer switch")
        pipe.send_text("Привіт, Тарасе! 🌻\r")
        message = await next_event(peer, IncomingMessage)
        assert message.text == "Привіт, Тарасе! 🌻" and message.sender == "Олена"
        peer.confirm(message)  # Тарас's program is done with it: Олена gets ✓✓
        peer.send_text("Олена", "Добрий день! 你好")
        await wait_for(lambda: "Добрий день! 你好" in screen_text(app), what="incoming line")
        await wait_for(lambda: "✓✓" in screen_text(app), what="delivery mark")
        pipe.send_text("/exit\r")
        left = await next_event(peer, PresenceChanged)
        assert (left.name, left.joined) == ("Олена", False)
        peer.stop()
        await peer_task

    code, screen = run_chat_scenario(broker.endpoint, "Олена", script)
    assert code == 0
    assert "logged in as Олена" in screen
    assert "talking to Тарас (online)" in screen
    assert "Привіт, Тарасе! 🌻" in screen and "✓✓" in screen


def screen_text(app: ChatApp) -> str:
    return app.console.file.getvalue()


def test_taken_name_asks_again_instead_of_crashing(broker):
    async def script(app, pipe):
        holder = AsyncConnection("Олена", broker.endpoint)
        holder_task = asyncio.create_task(holder.run())
        await next_event(holder, LoggedIn)
        pipe.send_text("ОЛЕНА\r")
        await wait_for(lambda: "try another name" in screen_text(app), what="refusal")
        await wait_for(lambda: app._question is not None, what="the name asked again")
        assert app._prompt.default_buffer.text == ""  # the refused name is not offered again
        pipe.send_text("Оля\r")
        await wait_for(lambda: app.state.connection == "online", what="second login")
        pipe.send_text("/bogus\r")
        pipe.send_text("no peer yet\r")
        await wait_for(lambda: "choose whom" in screen_text(app), what="no-peer hint")
        # The text waits in the input line for a conversation; Ctrl-U clears it.
        assert app._prompt.default_buffer.text == "no peer yet"
        pipe.send_text("\x15/users\r")
        await wait_for(lambda: "online (1): Олена" in screen_text(app), what="/users")
        pipe.send_text("/help\r")
        await wait_for(lambda: "/exit" in screen_text(app), what="help")
        pipe.send_text("\x04")  # Ctrl-D on an empty line leaves
        holder.stop()
        await holder_task

    code, screen = run_chat_scenario(broker.endpoint, None, script)
    assert code == 0
    assert "Олена is online; try another name" in screen  # said once, plainly
    assert "unknown command /bogus" in screen


def test_mention_sends_one_message_without_switching(broker):
    async def script(app, pipe):
        mei = AsyncConnection("Mei", broker.endpoint)
        mei_task = asyncio.create_task(mei.run())
        await next_event(mei, LoggedIn)
        await wait_for(lambda: app.state.connection == "online", what="login")
        pipe.send_text("/to Олена\r")  # a conversation with myself: no lookup needed
        pipe.send_text("@mei 你好 Mei\r")
        assert (await next_event(mei, IncomingMessage)).text == "你好 Mei"
        assert app.state.peer == "Олена"
        pipe.send_text("/exit\r")
        mei.stop()
        await mei_task

    code, screen = run_chat_scenario(broker.endpoint, "Олена", script)
    assert code == 0
    assert "Олена → mei 你好 Mei" in screen  # the own line says to whom it went


def client_cmd(broker, *args: str) -> list[str]:
    return [sys.executable, str(ROOT / "client.py"), "--server", broker.endpoint, *args]


def client_env(tmp_path) -> dict[str, str]:
    return dict(os.environ, MANGOGRAM_CONFIG_DIR=str(tmp_path / "config"), PYTHONUNBUFFERED="1")


def test_send_mode_exits_zero_once_accepted(broker, zctx, tmp_path):
    with Client("Тарас", broker.endpoint, context=zctx) as taras:
        done = subprocess.run(
            client_cmd(broker, "--name", "Олена", "--to", "Тарас", "--send", "Слава Україні 🇺🇦"),
            env=client_env(tmp_path),
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert done.returncode == 0, done.stderr
        message = taras.receive(timeout=5)
        assert (message.sender, message.text) == ("Олена", "Слава Україні 🇺🇦")


def test_send_mode_fails_for_unknown_recipient(broker, tmp_path):
    done = subprocess.run(
        client_cmd(broker, "--name", "Олена", "--to", "nobody", "--send", "hello?"),
        env=client_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 1
    assert "nobody is called nobody" in done.stderr


def test_listen_json_prints_one_object_per_message(broker, zctx, tmp_path):
    listener = subprocess.Popen(
        client_cmd(broker, "--name", "logger", "--listen", "--json"),
        env=client_env(tmp_path),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        encoding="utf-8",
        **GRACEFUL_SPAWN,
    )
    try:
        wait_for_line(listener.stderr, "listening as logger")
        with Client("Олена", broker.endpoint, context=zctx) as olena:
            olena.send("logger", "перше", wait=True)
            olena.send("logger", "second ✓", wait=True)
        records = [json.loads(listener.stdout.readline()) for _ in range(2)]
        assert [r["text"] for r in records] == ["перше", "second ✓"]
        assert all(r["from"] == "Олена" and r["sent_at"] <= r["accepted_at"] for r in records)
    finally:
        listener.send_signal(GRACEFUL_STOP)
        listener.wait(10)
    assert listener.returncode == 0


def test_piped_stdin_sends_each_line(broker, zctx, tmp_path):
    with Client("Тарас", broker.endpoint, context=zctx) as taras:
        done = subprocess.run(
            client_cmd(broker, "--name", "Олена", "--to", "Тарас"),
            input="рядок один\n\nрядок два\n",
            env=client_env(tmp_path),
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert done.returncode == 0, done.stderr
        texts = [taras.receive(timeout=5).text for _ in range(2)]
        assert texts == ["рядок один", "рядок два"]


def test_listen_into_a_reader_that_left_exits_quietly_and_keeps_the_rest(broker, zctx, tmp_path):
    """`--listen --json | head -1`: once the reader is gone the next line cannot be
    written, so the listener leaves without a traceback and without confirming it."""
    with Client("logger", broker.endpoint, context=zctx):
        pass  # the name exists, so messages wait for it
    listener = subprocess.Popen(
        client_cmd(broker, "--name", "logger", "--listen", "--json"),
        env=client_env(tmp_path),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        encoding="utf-8",
        **GRACEFUL_SPAWN,
    )
    try:
        wait_for_line(listener.stderr, "listening as logger")
        with Client("Олена", broker.endpoint, context=zctx) as olena:
            olena.send("logger", "read by head", wait=True)
            assert json.loads(listener.stdout.readline())["text"] == "read by head"
            listener.stdout.close()  # head -1 exits after its line
            olena.send("logger", "nobody reads this", wait=True)
            assert listener.wait(20) == 0
        errors = listener.stderr.read()
        assert "Traceback" not in errors and "BrokenPipe" not in errors, errors
    finally:
        if listener.poll() is None:
            listener.kill()
            listener.wait(10)
    with Client("logger", broker.endpoint, context=zctx) as again:
        texts = [m.text for m in again.messages(timeout=5)]
    assert texts == ["nobody reads this"]


def test_a_piped_line_too_long_is_named_by_its_number(broker, zctx, tmp_path):
    with Client("Тарас", broker.endpoint, context=zctx):
        done = subprocess.run(
            client_cmd(broker, "--name", "Олена", "--to", "Тарас"),
            input="first\n\n" + "x" * 5000 + "\nlast\n",
            env=client_env(tmp_path),
            capture_output=True,
            text=True,
            timeout=30,
        )
    assert done.returncode == 1
    assert "mangogram: line 3: text is 5000 characters, limit is 4096" in done.stderr, done.stderr


def test_client_help_describes_modes(tmp_path):
    done = subprocess.run(
        [sys.executable, str(ROOT / "client.py"), "--help"],
        env=client_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    for word in (
        "--server",
        "--name",
        "--to",
        "--send",
        "--listen",
        "--json",
        "/exit",
        "MANGOGRAM_SERVER",
    ):
        assert word in done.stdout


def test_client_help_lists_every_interactive_command(tmp_path):
    from mangogram_client.commands import COMMANDS

    done = subprocess.run(
        [sys.executable, str(ROOT / "client.py"), "--help"],
        env=client_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    for command, what in COMMANDS:
        assert f"{command}" in done.stdout and what in done.stdout, command
    assert "/history [N]" in done.stdout


def test_text_typed_while_broker_is_down_is_sent_once_after_reconnect(tmp_path, zctx):
    first = BrokerProcess(tmp_path / "data")
    endpoint = first.endpoint
    taras = Client("Тарас", endpoint, context=zctx)  # pumped only when the test says so
    brokers = [first]

    async def script(app, pipe):
        taras.login(timeout=5)
        await wait_for(lambda: app.state.connection == "online", what="login")
        pipe.send_text("/to Тарас\r")
        await wait_for(lambda: app.state.peer == "Тарас", what="peer")
        first.kill()
        await wait_for(lambda: app.state.connection == "reconnecting", what="lost connection")
        assert "reconnecting" in "".join(text for _, text in app.state.toolbar())
        pipe.send_text("написано без зв'язку\r")
        await wait_for(lambda: app.connection.session.unacknowledged, what="queued text")
        brokers.append(BrokerProcess(tmp_path / "data", bind=endpoint))
        # Taras comes back first (this blocks the app's loop on purpose), so the resent
        # text finds him online; with no offline mailbox yet it would be refused otherwise.
        deadline = time.monotonic() + 20
        while not any(
            isinstance(e, LoggedIn) and e.resumed
            for e in iter(lambda: taras.next_event(timeout=0.1), None)
        ):
            assert time.monotonic() < deadline, "Тарас did not log in again"
        await wait_for(lambda: app.state.connection == "online", timeout=20, what="re-login")
        received = None
        deadline = time.monotonic() + 10
        while received is None and time.monotonic() < deadline:
            received = taras.receive(timeout=0)
            await asyncio.sleep(0.05)  # lets the app's loop run; bounded by the deadline
        assert received is not None and received.text == "написано без зв'язку"
        await wait_for(lambda: "reconnected" in screen_text(app), what="reconnected line")
        pipe.send_text("/exit\r")

    try:
        code, screen = run_chat_scenario(endpoint, "Олена", script)
    finally:
        taras.close()
        for broker in brokers:
            broker.kill()
    assert code == 0
    assert "connection lost" in screen
    assert screen.count("написано без зв'язку") == 1
    assert taras.receive(timeout=0) is None


def test_first_run_asks_for_server_and_name_and_remembers_them(broker, tmp_path, monkeypatch):
    monkeypatch.setenv("MANGOGRAM_CONFIG_DIR", str(tmp_path / "config"))
    screen = io.StringIO()

    async def main() -> int:
        with create_pipe_input() as pipe:
            console = Console(file=screen, width=100, color_system=None)
            app = ChatApp(
                "tcp://127.0.0.1:5555",
                None,
                console=console,
                input=pipe,
                output=DummyOutput(),
                ask_server=True,
            )
            runner = asyncio.create_task(app.run())
            pipe.send_text("\x15localhost:port\r")  # a mistake is explained, then asked again
            pipe.send_text(broker.endpoint.removeprefix("tcp://") + "\r")  # no scheme needed
            pipe.send_text("Зоряна\r")
            await wait_for(lambda: app.state.connection == "online", what="login")
            assert "the port must be a number" in screen.getvalue()
            pipe.send_text("\x03")  # Ctrl-C leaves cleanly
            return await asyncio.wait_for(runner, 10)

    assert loops.run(main()) == 0
    remembered = load_remembered()
    assert (remembered.server, remembered.name) == (broker.endpoint, "Зоряна")


def test_config_file_supplies_server_and_name(tmp_path):
    config = tmp_path / "client.toml"
    config.write_text('server = "tcp://127.0.0.1:7777"\nname = "Мар\'яна"\n', encoding="utf-8")
    assert load_config_file(config) == {"server": "tcp://127.0.0.1:7777", "name": "Мар'яна"}
    config.write_text("server = [broken", encoding="utf-8")
    with pytest.raises(SystemExit, match="cannot read config file"):
        load_config_file(config)


def test_tab_completes_names_after_to_and_at():
    from prompt_toolkit.completion import CompleteEvent
    from prompt_toolkit.document import Document

    from mangogram_client.app import NameCompleter
    from mangogram_client.state import ChatState

    state = ChatState("Олена")
    state.online = {"тарас": "Тарас", "taras_bot": "taras_bot", "mei": "Mei"}

    def complete(text: str) -> list[str]:
        document = Document(text, len(text))
        return [c.text for c in NameCompleter(state).get_completions(document, CompleteEvent())]

    assert complete("/to та") == ["Тарас"]
    assert complete("/to ТА") == ["Тарас"]
    assert complete("@m") == ["Mei"]
    assert complete("/to ") == ["Mei", "taras_bot", "Тарас"]
    assert complete("hello t") == []
    assert complete("@mei hi") == []


def test_history_and_read_receipts_in_the_chat(broker):
    async def script(app, pipe):
        peer = AsyncConnection("Тарас", broker.endpoint)
        peer_task = asyncio.create_task(peer.run())
        await next_event(peer, LoggedIn)
        for i in range(3):
            peer.send_text("Олена", f"давнє {i}")
        await wait_for(lambda: "давнє 2" in screen_text(app), what="messages")
        read = await next_event(peer, MessageRead)  # the first one opened the conversation
        assert read.by == "Олена"
        pipe.send_text("/history 2\r")
        await wait_for(lambda: "history with Тарас: last 2" in screen_text(app), what="history")
        pipe.send_text("/exit\r")
        peer.stop()
        await peer_task

    code, screen = run_chat_scenario(broker.endpoint, "Олена", script)
    assert code == 0
    history = screen.split("history with Тарас")[1]
    assert "давнє 1" in history and "давнє 2" in history and "давнє 0" not in history


def test_first_connection_shows_the_fingerprint_and_asks_before_trusting(tmp_path, monkeypatch):
    monkeypatch.setenv("MANGOGRAM_INSECURE_PLAINTEXT", "0")
    monkeypatch.setenv("MANGOGRAM_CONFIG_DIR", str(tmp_path / "config"))
    broker = BrokerProcess(tmp_path / "data", env={"MANGOGRAM_INSECURE_PLAINTEXT": "0"})
    monkeypatch.setenv("MANGOGRAM_KEY_ENDPOINT", broker.key_endpoint)
    endpoint = broker.endpoint.replace("*", "")
    try:
        # ChatApp derives the key port from the chat port, so point it at the real one.
        monkeypatch.setattr(
            "mangogram_client.app.key_endpoint_for", lambda _endpoint: broker.key_endpoint
        )

        async def refuse(app, pipe):
            await wait_for(lambda: "fingerprint" in screen_text(app), what="fingerprint")
            pipe.send_text("n\r")

        code, screen = run_chat_scenario(endpoint, "Олена", refuse)
        assert code == 1 and broker.fingerprint in screen and "not trusted" in screen

        async def accept(app, pipe):
            await wait_for(lambda: "fingerprint" in screen_text(app), what="fingerprint")
            pipe.send_text("y\r")
            await wait_for(lambda: app.state.connection == "online", what="encrypted login")
            assert app.connection.security.server_key == broker.public_key
            pipe.send_text("/exit\r")

        code, screen = run_chat_scenario(endpoint, "Олена", accept)
        assert code == 0 and "logged in as Олена" in screen
        pinned = (tmp_path / "config" / "known_servers").read_text()
        assert broker.public_key in pinned
    finally:
        broker.kill()


def run_app(app: ChatApp, pipe, script) -> int:
    async def main() -> int:
        runner = asyncio.create_task(app.run())
        try:
            await asyncio.wait_for(script(app, pipe), 30)
        except BaseException:
            runner.cancel()
            raise
        return await asyncio.wait_for(runner, 10)

    return loops.run(main())


def test_a_name_given_for_one_run_does_not_replace_the_remembered_one(
    broker, tmp_path, monkeypatch
):
    monkeypatch.setenv("MANGOGRAM_CONFIG_DIR", str(tmp_path / "config"))
    save_remembered(broker.endpoint, "Олена")

    async def script(app, pipe):
        await wait_for(lambda: app.state.connection == "online", what="login")
        pipe.send_text("/exit\r")

    with create_pipe_input() as pipe:
        console = Console(file=io.StringIO(), width=100, color_system=None)
        app = ChatApp(
            broker.endpoint,
            "Оля",  # as from --name
            default_name=load_remembered().name,
            console=console,
            input=pipe,
            output=DummyOutput(),
        )
        assert run_app(app, pipe, script) == 0
    assert load_remembered().name == "Олена"


def test_own_name_online_elsewhere_offers_a_takeover_and_no_keeps_it_there(tmp_path, monkeypatch):
    monkeypatch.setenv("MANGOGRAM_INSECURE_PLAINTEXT", "0")
    monkeypatch.setenv("MANGOGRAM_CONFIG_DIR", str(tmp_path / "config"))
    broker = BrokerProcess(tmp_path / "data", env={"MANGOGRAM_INSECURE_PLAINTEXT": "0"})
    try:

        async def script(app, pipe):
            # Another window of ours: the same config dir, so the same key.
            mine = AsyncConnection("Mei", broker.endpoint, server_key=broker.public_key)
            mine_task = asyncio.create_task(mine.run())
            await next_event(mine, LoggedIn)
            pipe.send_text("Mei\r")

            def asked() -> bool:
                question = app._question
                return question is not None and "You are online elsewhere" in question[0]

            await wait_for(asked, what="the takeover question")
            pipe.send_text("n\r")
            await wait_for(lambda: "Mei stays logged in elsewhere" in screen_text(app), what="no")
            assert mine.state is State.ONLINE
            mine.stop()
            await mine_task
            pipe.send_text("\x04")

        with create_pipe_input() as pipe:
            console = Console(file=io.StringIO(), width=100, color_system=None)
            app = ChatApp(
                broker.endpoint.replace("*", ""),
                None,
                console=console,
                input=pipe,
                output=DummyOutput(),
                remember=False,
                security={"server_key": broker.public_key},
            )
            run_app(app, pipe, script)
        assert "try another name" not in console.file.getvalue()
    finally:
        broker.kill()
