"""The console client in a real terminal (tmux), one behaviour a newcomer noticed per test:
the real `python client.py` against the real broker on 127.0.0.1, read back from the screen.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import socket
import sys
import time

import pytest

from mangogram_proto import Client
from mangogram_proto.keys import KeyPair

from .conftest import ROOT, BrokerProcess
from .test_client_e2e import Tmux, client_env

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is installed by .ci/run"),
]


@pytest.fixture
def tmux():
    server = Tmux()
    yield server
    server.kill()


def free_port_pair() -> int:
    """A port P with P and P+1 free now (the broker's chat and key-discovery ports)."""
    for _ in range(50):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        if port >= 65535:
            continue
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
        return port
    raise RuntimeError("no free pair of ports")


def client_cmd(server: str, *args: str) -> list[str]:
    return [sys.executable, str(ROOT / "client.py"), "--server", server, *args]


def start_sized(
    tmux: Tmux, session: str, command: list[str], env: dict[str, str], size: tuple[int, int]
) -> None:
    """As Tmux.start, in a terminal of `size` (columns, rows)."""
    exports = " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items())
    line = f'env {exports} {shlex.join(command)}; echo "[exited $?]"; sleep 30'
    columns, rows = size
    tmux.run("new-session", "-d", "-s", session, "-x", str(columns), "-y", str(rows), line)
    # A detached session can start at the default 80x24 before taking its size: say it
    # again, so the program (which follows SIGWINCH) sees the size under test.
    tmux.run("resize-window", "-t", session, "-x", str(columns), "-y", str(rows))


def toolbar_row(screen: str) -> str:
    return [row for row in screen.splitlines() if row.strip()][-1]


def wait_for_toolbar(tmux: Tmux, session: str, check, what: str, timeout: float = 15.0) -> str:
    """Poll until `check(toolbar row)` holds; returns that screen. (One capture can land
    while prompt_toolkit redraws, before the toolbar row is drawn again.)"""
    return wait_until(
        lambda: s if check(toolbar_row(s := tmux.screen(session))) else None,
        f"the toolbar to show {what}",
        timeout,
        context=lambda: tmux.screen(session),
    )


def keys(tmux: Tmux, session: str, *names: str) -> None:
    """Press keys by tmux name ("C-c", "Enter") or type literal text ("-l", "text")."""
    tmux.run("send-keys", "-t", session, *names)


INPUT_ROW = re.compile(r"^(\[[^\]]*\] )?›( |$)")


def transcript_rows(screen: str) -> list[str]:
    """The rows above the input line (the last row that starts with a prompt)."""
    rows = screen.splitlines()
    inputs = [i for i, row in enumerate(rows) if INPUT_ROW.match(row)]
    return rows[: inputs[-1]] if inputs else rows


def input_row(screen: str) -> str:
    return [row for row in screen.splitlines() if INPUT_ROW.match(row)][-1]


def wait_until(check, what: str, timeout: float = 15.0, context=lambda: ""):
    """Poll `check` until it returns something true; `context()` explains a timeout."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}\n{context()}")
        time.sleep(0.1)  # polling, bounded by the deadline


def test_keys_typed_while_connecting_stay_in_the_input_line(tmux, tmp_path):
    port = free_port_pair()
    endpoint = f"tcp://127.0.0.1:{port}"
    # Тарас has an account on this broker (its store), so /to finds him once logged in.
    earlier = BrokerProcess(tmp_path / "data", bind=endpoint)
    try:
        with Client("Тарас", earlier.endpoint) as taras:
            assert taras.is_online
    finally:
        earlier.kill()
    tmux.start("olena", client_cmd(endpoint, "--name", "Олена"), client_env(tmp_path, "olena"))
    tmux.wait_for("olena", "connecting to")
    keys(tmux, "olena", "-l", "typed while connecting")
    tmux.wait_for("olena", r"(?m)^› typed while connecting")
    keys(tmux, "olena", "Enter")  # kept for after the login, and said so
    tmux.wait_for("olena", "“typed while connecting” waits for the login")
    keys(tmux, "olena", "-l", "/to Тарас")
    keys(tmux, "olena", "Enter")
    broker = BrokerProcess(tmp_path / "data", bind=endpoint)
    try:
        screen = tmux.wait_for("olena", "logged in as Олена", timeout=20)
        # After the login the lines are acted on in order: the text had no conversation
        # yet, so it is back in the input line; then the conversation opens.
        screen = tmux.wait_for("olena", r"talking to Тарас")
        assert "choose whom to talk to first" in screen
        leaked = [
            r for r in transcript_rows(screen) if "typed while connecting" in r and "“" not in r
        ]
        assert not leaked, screen
        assert input_row(screen) == "[Тарас] › typed while connecting", screen
        keys(tmux, "olena", "Enter")
        tmux.wait_for("olena", r"Олена typed while connecting [○✓✗]")
    finally:
        broker.kill()


def test_exit_typed_while_connecting_leaves_at_once(tmux, tmp_path):
    endpoint = f"tcp://127.0.0.1:{free_port_pair()}"  # nothing answers there
    tmux.start("olena", client_cmd(endpoint, "--name", "Олена"), client_env(tmp_path, "olena"))
    tmux.wait_for("olena", "connecting to")
    tmux.type("olena", "/exit")
    assert tmux.exit_status("olena") == 0


def test_a_burst_of_lines_shows_each_message_once_and_nothing_raw(broker, tmux, tmp_path):
    taras = Client("Тарас", broker.endpoint)
    try:
        taras.login(timeout=10)
        command = client_cmd(broker.endpoint, "--name", "Олена", "--to", "Тарас")
        tmux.start("olena", command, client_env(tmp_path, "olena"))

        def olena_sees_taras() -> bool:
            taras.next_event(timeout=0.1)  # keeps Тарас's session alive meanwhile
            return "talking to Тарас (online)" in tmux.screen("olena")

        wait_until(olena_sees_taras, "Олена to see Тарас online")
        burst: list[str] = []
        for i in range(1, 13):
            burst += [f"quick-{i}", "Enter"]  # not key names, so tmux types them as text
        # One send-keys: the keys arrive back to back, as from a fast typist.
        keys(tmux, "olena", *burst)
        got = []
        deadline = time.monotonic() + 20
        while len(got) < 12 and time.monotonic() < deadline:
            message = taras.receive(timeout=0.5)
            if message is not None:
                got.append(message.text)
        assert got == [f"quick-{i}" for i in range(1, 13)], tmux.screen("olena")

        def all_shown() -> str | None:
            taras.next_event(timeout=0.1)
            screen = tmux.screen("olena")
            rows = transcript_rows(screen)
            return screen if any(re.search(r"quick-12 ✓", r) for r in rows) else None

        screen = wait_until(all_shown, "the twelfth message on screen")
        rows = transcript_rows(screen)
        for i in range(1, 13):
            shown = [r for r in rows if re.search(rf"quick-{i}\b", r)]
            assert len(shown) == 1, screen  # once, as the message; no echo of the typing
            assert len(re.findall(r"quick-", shown[0])) == 1, screen  # no keys leaked into it
        assert not [r for r in rows if "›" in r], screen
    finally:
        taras.close()


def test_ctrl_c_clears_a_half_typed_line_and_quits_on_an_empty_one(broker, tmux, tmp_path):
    command = client_cmd(broker.endpoint, "--name", "Олена")
    tmux.start("olena", command, client_env(tmp_path, "olena"))
    tmux.wait_for("olena", "logged in as Олена")
    keys(tmux, "olena", "-l", "half-typed")
    tmux.wait_for("olena", r"(?m)^› half-typed")
    keys(tmux, "olena", "C-c")

    def cleared() -> str | None:
        screen = tmux.screen("olena")
        return screen if "half-typed" not in screen else None

    screen = wait_until(cleared, "the line to be cleared")
    assert "[exited" not in screen and "online" in screen.rstrip().splitlines()[-1]
    keys(tmux, "olena", "C-c")
    assert tmux.exit_status("olena") == 0
    assert broker.wait_for_log("Олена is offline \\(left")


def test_ctrl_d_on_an_empty_line_quits(broker, tmux, tmp_path):
    command = client_cmd(broker.endpoint, "--name", "Олена")
    tmux.start("olena", command, client_env(tmp_path, "olena"))
    tmux.wait_for("olena", "logged in as Олена")
    keys(tmux, "olena", "C-d")
    assert tmux.exit_status("olena") == 0


ENCRYPTED = {"MANGOGRAM_INSECURE_PLAINTEXT": "0"}


def trust_and_log_in(tmux: Tmux, session: str, broker: BrokerProcess, name: str) -> str:
    tmux.wait_for(session, re.escape(broker.fingerprint), timeout=20)
    tmux.wait_for(session, r"trust this server and remember it\? \[y/N\]")
    tmux.type(session, "y")
    return tmux.wait_for(session, f"logged in as {name}", timeout=20)


def test_an_address_without_tcp_scheme_is_accepted(tmux, tmp_path):
    port = free_port_pair()
    broker = BrokerProcess(tmp_path / "data", bind=f"tcp://127.0.0.1:{port}", env=ENCRYPTED)
    try:
        env = client_env(tmp_path, "olena") | ENCRYPTED
        tmux.start("olena", client_cmd(f"localhost:{port}", "--name", "Олена"), env)
        screen = trust_and_log_in(tmux, "olena", broker, "Олена")
        assert f"connecting to tcp://localhost:{port} as Олена" in screen
    finally:
        broker.kill()


def test_first_connection_to_a_broker_that_is_down_waits_for_it(tmux, tmp_path):
    port = free_port_pair()
    env = client_env(tmp_path, "olena") | ENCRYPTED
    tmux.start("olena", client_cmd(f"127.0.0.1:{port}", "--name", "Олена"), env)
    tmux.wait_for("olena", rf"no answer from tcp://127\.0\.0\.1:{port} yet", timeout=20)
    broker = BrokerProcess(tmp_path / "data", bind=f"tcp://127.0.0.1:{port}", env=ENCRYPTED)
    try:
        screen = trust_and_log_in(tmux, "olena", broker, "Олена")
        assert f":{port + 1}" not in screen  # the key port was never the user's business
    finally:
        broker.kill()


def test_at_40_columns_the_toolbar_keeps_the_unread_counter(broker, tmux, tmp_path):
    command = client_cmd(broker.endpoint, "--name", "Олена", "--to", "Тарас")
    start_sized(tmux, "olena", command, client_env(tmp_path, "olena"), (40, 12))
    tmux.wait_for("olena", r"talking to Тарас")
    with Client("Mei", broker.endpoint) as mei:
        mei.send("Олена", "你好! slides?", wait=True)
        screen = tmux.wait_for("olena", r"你好! slides\?")
    toolbar = wait_until(
        lambda: row if "Mei (1)" in (row := toolbar_row(tmux.screen("olena"))) else None,
        "the unread counter in the toolbar",
    )
    assert toolbar.startswith(" online") and "Тарас" in toolbar, screen


def test_a_skin_tone_emoji_leaves_no_blank_row(broker, tmux, tmp_path):
    command = client_cmd(broker.endpoint, "--name", "Олена", "--to", "Mei")
    start_sized(tmux, "olena", command, client_env(tmp_path, "olena"), (40, 20))
    tmux.wait_for("olena", r"talking to Mei")
    with Client("Mei", broker.endpoint) as mei:
        mei.send("Олена", "a 👍🏽", wait=True)
        mei.send("Олена", "next line", wait=True)
        tmux.wait_for("olena", r"next line")
    # Rows as drawn: without -J, which would join a wrapped row to the one it spilled into.
    screen = tmux.run("capture-pane", "-p", "-t", "olena")
    rows = screen.splitlines()
    first = next(i for i, row in enumerate(rows) if "a 👍🏽" in row)
    assert "next line" in rows[first + 1], screen


def test_after_an_impostor_the_client_recovers_when_the_real_broker_is_back(tmux, tmp_path):
    port = free_port_pair()
    endpoint = f"tcp://127.0.0.1:{port}"
    real = BrokerProcess(tmp_path / "real", bind=endpoint, env=ENCRYPTED)
    brokers = [real]
    try:
        taras_key = KeyPair.generate()

        def taras() -> Client:
            return Client(
                "Тарас", endpoint, server_key=real.public_key, identity=taras_key, plaintext=False
            )

        with taras():
            pass  # Тарас has a mailbox now
        env = client_env(tmp_path, "olena") | ENCRYPTED
        command = client_cmd(endpoint, "--name", "Олена", "--to", "Тарас")
        tmux.start("olena", command, env)
        trust_and_log_in(tmux, "olena", real, "Олена")
        real.kill()
        impostor = BrokerProcess(tmp_path / "impostor", bind=endpoint, env=ENCRYPTED)
        brokers.append(impostor)
        tmux.wait_for("olena", "does not hold the expected key", timeout=30)
        tmux.type("olena", "написано під час підміни")
        screen = tmux.wait_for("olena", "wrong server key")  # the toolbar
        assert "session is closed" not in screen
        impostor.kill()
        brokers.append(BrokerProcess(tmp_path / "real", bind=endpoint, env=ENCRYPTED))
        screen = tmux.wait_for("olena", "reconnected", 30)
        assert screen.count("does not hold the expected key") == 1, screen
        with taras() as client:
            message = client.receive(timeout=10)
        assert message is not None and message.text == "написано під час підміни"
        wait_for_toolbar(tmux, "olena", lambda row: row.startswith(" online"), "online")
    finally:
        for broker in brokers:
            broker.kill()


def test_an_outage_is_announced_once_and_its_end_too(tmux, tmp_path):
    broker = BrokerProcess(tmp_path / "data")
    endpoint = broker.endpoint
    brokers = [broker]
    try:
        # INFO logging shows each reconnection attempt, so the test can count them.
        command = client_cmd(endpoint, "--name", "Олена", "--log-level", "INFO")
        tmux.start("olena", command, client_env(tmp_path, "olena"))
        tmux.wait_for("olena", "logged in as Олена")
        broker.kill()
        tmux.wait_for("olena", "connection lost")
        wait_until(
            lambda: tmux.screen("olena").count("; reconnecting in") >= 3,
            "three attempts to reconnect",
            timeout=30,
        )
        screen = wait_for_toolbar(
            tmux, "olena", lambda row: row.startswith(" reconnecting"), "reconnecting"
        )
        assert screen.count("connection lost") == 1, screen
        brokers.append(BrokerProcess(tmp_path / "data", bind=endpoint))
        tmux.wait_for("olena", "reconnected", timeout=30)
        screen = wait_for_toolbar(tmux, "olena", lambda row: row.startswith(" online"), "online")
        assert screen.count("connection lost") == 1, screen
    finally:
        for each in brokers:
            each.kill()


def test_an_over_long_message_is_counted_refused_and_kept_for_editing(tmux, tmp_path):
    broker = BrokerProcess(tmp_path / "data", "--max-text-chars", "300")
    try:
        command = client_cmd(broker.endpoint, "--name", "Олена", "--to", "Тарас")
        tmux.start("olena", command, client_env(tmp_path, "olena"))
        tmux.wait_for("olena", r"talking to Тарас")
        keys(tmux, "olena", "-l", "x" * 250)
        wait_for_toolbar(tmux, "olena", lambda row: "250/300" in row, "250/300")  # near the limit
        keys(tmux, "olena", "-l", "y" * 70)
        screen = tmux.wait_for("olena", r"320/300")
        keys(tmux, "olena", "Enter")
        screen = tmux.wait_for("olena", r"too long to send: 320 characters, the limit is 300")
        assert "xxxx" not in "".join(transcript_rows(screen)), screen  # neither shown nor sent
        # The input scrolls sideways; Ctrl-A brings its start, prompt included, into view.
        keys(tmux, "olena", "C-a")
        wait_until(
            lambda: re.search(r"(?m)^\[Тарас\] › xxxx", tmux.screen("olena")),
            "the text kept in the input line",
            context=lambda: tmux.screen("olena"),
        )
        keys(tmux, "olena", "C-k")  # the cursor is at the start: clear to the end
        tmux.type("olena", "коротко")
        screen = tmux.wait_for("olena", r"Олена коротко")
        assert [r for r in transcript_rows(screen) if "Олена " in r and "·" not in r] == [
            r for r in transcript_rows(screen) if "Олена коротко" in r
        ], screen  # the long text was never sent: the short one is our only message
    finally:
        broker.kill()


def test_first_run_asks_server_then_fingerprint_then_name(tmux, tmp_path):
    port = free_port_pair()
    broker = BrokerProcess(tmp_path / "data", bind=f"tcp://127.0.0.1:{port}", env=ENCRYPTED)
    try:
        env = client_env(tmp_path, "olena") | ENCRYPTED
        tmux.start("olena", [sys.executable, str(ROOT / "client.py")], env)
        tmux.wait_for("olena", r"(?m)^server: tcp://127\.0\.0\.1:5555")
        wait_for_toolbar(  # not "connecting" while the address is still being typed
            tmux, "olena", lambda row: row.startswith(" not connected"), "not connected"
        )
        keys(tmux, "olena", "C-u")
        tmux.type("olena", f"127.0.0.1:{port}")
        screen = tmux.wait_for("olena", re.escape(broker.fingerprint))
        assert "your name:" not in screen  # the key is checked before a name is given
        tmux.wait_for("olena", r"trust this server and remember it\? \[y/N\]")
        tmux.type("olena", "y")
        tmux.wait_for("olena", "trusted; this key is expected from now on")
        tmux.wait_for("olena", r"(?m)^your name: *$")
        keys(tmux, "olena", "Enter")  # an empty name is explained, not silently asked again
        tmux.wait_for("olena", "a name is needed")
        tmux.type("olena", "Олена")
        tmux.wait_for("olena", "logged in as Олена")
    finally:
        broker.kill()


def test_tab_completes_people_offline_and_after_a_restart(broker, tmux, tmp_path):
    with Client("Богдан", broker.endpoint):
        pass  # Богдан exists, and is offline from now on
    env = client_env(tmp_path, "olena")
    tmux.start("olena", client_cmd(broker.endpoint, "--name", "Олена"), env)
    tmux.wait_for("olena", "logged in as Олена")
    tmux.type("olena", "@Богдан привіт")
    tmux.wait_for("olena", r"привіт ✓")
    for run in range(2):
        keys(tmux, "olena", "-l", "/to Бо")
        keys(tmux, "olena", "Tab")
        tmux.wait_for("olena", r"(?m)^› /to Богдан")
        keys(tmux, "olena", "Enter")
        tmux.wait_for("olena", r"talking to Богдан \(offline\)")
        tmux.type("olena", "/exit")
        assert tmux.exit_status("olena") == 0
        if run == 0:
            restart(tmux, "olena", client_cmd(broker.endpoint, "--name", "Олена"), env)
            tmux.wait_for("olena", "logged in as Олена")


def restart(tmux: Tmux, session: str, command: list[str], env: dict[str, str]) -> None:
    """Run `command` again in a fresh window of the same name. The old session is killed
    only after a placeholder exists: killing the last session ends the tmux server, and a
    new-session racing that exit fails."""
    tmux.run("new-session", "-d", "-s", "placeholder", "sleep 60")
    tmux.run("kill-session", "-t", session)
    tmux.start(session, command, env)


def pane(tmux: Tmux, session: str, variable: str) -> str:
    return tmux.run("display-message", "-p", "-t", session, f"#{{{variable}}}").strip()


def test_other_conversations_ring_retitle_and_keep_unread_across_restarts(broker, tmux, tmp_path):
    env = client_env(tmp_path, "olena")
    command = client_cmd(broker.endpoint, "--name", "Олена", "--to", "Тарас")
    tmux.start("olena", command, env)
    tmux.wait_for("olena", r"talking to Тарас")
    title_before = pane(tmux, "olena", "pane_title")
    with Client("Mei", broker.endpoint) as mei:
        mei.send("Олена", "are you there?", wait=True)
        tmux.wait_for("olena", r"are you there\?")

    def context() -> str:
        title, bell = pane(tmux, "olena", "pane_title"), pane(tmux, "olena", "window_bell_flag")
        return f"title {title!r}, bell {bell!r}\n{tmux.screen('olena')}"

    wait_until(
        lambda: pane(tmux, "olena", "pane_title") == "MangoGram (1 unread)", "title", 15, context
    )
    wait_until(lambda: pane(tmux, "olena", "window_bell_flag") == "1", "the bell", 15, context)
    tmux.type("olena", "/exit")
    assert tmux.exit_status("olena") == 0
    assert pane(tmux, "olena", "pane_title") != "MangoGram (1 unread)", context()  # given back
    restart(tmux, "olena", command, env)
    tmux.wait_for("olena", r"talking to Тарас")
    wait_until(
        lambda: s if "unread: Mei (1)" in toolbar_row(s := tmux.screen("olena")) else None,
        "the unread count from the last run",
        context=context,
    )
    assert title_before != "MangoGram (1 unread)"


def test_bell_and_title_can_be_turned_off(broker, tmux, tmp_path):
    command = client_cmd(broker.endpoint, "--name", "Олена", "--to", "Тарас")
    tmux.start("olena", [*command, "--no-bell", "--no-title"], client_env(tmp_path, "olena"))
    tmux.wait_for("olena", r"talking to Тарас")
    title_before = pane(tmux, "olena", "pane_title")
    with Client("Mei", broker.endpoint) as mei:
        mei.send("Олена", "are you there?", wait=True)
        tmux.wait_for("olena", r"unread: Mei \(1\)")
    assert pane(tmux, "olena", "pane_title") == title_before
    assert pane(tmux, "olena", "window_bell_flag") == "0"


def test_up_recalls_the_lines_sent_before(broker, tmux, tmp_path):
    command = client_cmd(broker.endpoint, "--name", "Олена", "--to", "Тарас")
    tmux.start("olena", command, client_env(tmp_path, "olena"))
    tmux.wait_for("olena", r"talking to Тарас")
    for text in ("перший", "другий"):
        tmux.type("olena", text)
        tmux.wait_for("olena", rf"Олена {text}")
    keys(tmux, "olena", "Up", "Up")
    wait_until(lambda: input_row(tmux.screen("olena")).endswith("› перший"), "the first line")
    keys(tmux, "olena", "Down")
    wait_until(lambda: input_row(tmux.screen("olena")).endswith("› другий"), "the second line")


def test_recalling_and_clearing_a_long_line_keeps_the_transcript_in_view(broker, tmux, tmp_path):
    command = client_cmd(broker.endpoint, "--name", "Олена", "--to", "Тарас")
    start_sized(tmux, "olena", command, client_env(tmp_path, "olena"), (40, 12))
    tmux.wait_for("olena", r"talking to Тарас")
    tmux.type("olena", "z" * 900)  # longer than the screen is high, once wrapped
    tmux.wait_for("olena", r"zzz [○✓✗]")
    tmux.type("olena", "last words")
    tmux.wait_for("olena", r"last words")
    keys(tmux, "olena", "Up", "Up")  # the long line again

    def recalled() -> bool:
        """The row just above the toolbar (where the input ends) holds the long line."""
        visible = [r for r in tmux.run("capture-pane", "-p", "-t", "olena").splitlines() if r]
        return "zzzzzzzzzz" in visible[-2]

    wait_until(recalled, "the recalled line")
    keys(tmux, "olena", "C-u")
    wait_until(lambda: not recalled(), "the line cleared")
    visible = tmux.run("capture-pane", "-p", "-t", "olena")  # the screen, not the scrollback
    assert "last words" in visible, visible


def test_a_message_to_myself_shows_once(broker, tmux, tmp_path):
    command = client_cmd(broker.endpoint, "--name", "Олена", "--to", "Олена")
    tmux.start("olena", command, client_env(tmp_path, "olena"))
    tmux.wait_for("olena", r"talking to Олена")
    tmux.type("olena", "нотатка собі")
    screen = tmux.wait_for("olena", r"нотатка собі ✓✓")
    rows = [r for r in transcript_rows(screen) if "нотатка собі" in r]
    assert len(rows) == 1, screen


def test_the_cursor_follows_emoji_sequences_in_the_input_line(broker, tmux, tmp_path):
    command = client_cmd(broker.endpoint, "--name", "Олена", "--to", "Тарас")
    tmux.start("olena", command, client_env(tmp_path, "olena"))
    tmux.wait_for("olena", r"talking to Тарас")
    keys(tmux, "olena", "-l", "x👨‍👩‍👧🇺🇦👍🏽")
    row = wait_until(
        lambda: r if "x" in (r := input_row(tmux.screen("olena"))) else None, "the typed line"
    )
    # Where tmux puts the cursor is where prompt_toolkit believes the text ends; both must
    # be where tmux drew the last glyph: "[Тарас] › " (10) + x (1) + 👨👩👧 (6) + UA (2) + 👍🏽 (4).
    assert row.startswith("[Тарас] › x"), row
    wait_until(
        lambda: pane(tmux, "olena", "cursor_x") == "23",
        "the cursor after the text",
        context=lambda: f"{pane(tmux, 'olena', 'cursor_x')} {row!r}",
    )
    tmux.type("olena", "")
    tmux.wait_for("olena", r"Олена x👨‍👩‍👧🇺🇦👍🏽")  # sent as typed


def test_logging_in_while_online_elsewhere_offers_to_take_over(tmux, tmp_path):
    port = free_port_pair()
    broker = BrokerProcess(tmp_path / "data", bind=f"tcp://127.0.0.1:{port}", env=ENCRYPTED)
    bob = Client(
        "bob",
        broker.endpoint,
        server_key=broker.public_key,
        identity=KeyPair.generate(),
        plaintext=False,
    )
    try:
        # One config directory: the same key, the server already trusted by the first run.
        env = client_env(tmp_path, "mei") | ENCRYPTED
        tmux.start("laptop", client_cmd(f"127.0.0.1:{port}", "--name", "Mei"), env)
        trust_and_log_in(tmux, "laptop", broker, "Mei")
        tmux.start("desk", client_cmd(f"127.0.0.1:{port}", "--name", "Mei", "--to", "bob"), env)
        tmux.wait_for("desk", r"You are online elsewhere \(another window or machine\)")
        tmux.wait_for("desk", r"Take over here\? \[y/N\]")
        tmux.type("desk", "y")
        tmux.wait_for("desk", "logged in as Mei", timeout=20)
        bob.login(timeout=10)
        bob.send("Mei", "hello desk", wait=True)

        def desk_shows_it() -> bool:
            bob.next_event(timeout=0.1)  # keeps bob's session alive meanwhile
            return "hello desk" in tmux.screen("desk")

        wait_until(desk_shows_it, "the message on the desk", context=lambda: tmux.screen("desk"))
        assert "hello desk" not in tmux.screen("laptop")
    finally:
        bob.close(confirm=False)
        broker.kill()


def test_declining_the_takeover_keeps_the_other_session(tmux, tmp_path):
    port = free_port_pair()
    broker = BrokerProcess(tmp_path / "data", bind=f"tcp://127.0.0.1:{port}", env=ENCRYPTED)
    try:
        env = client_env(tmp_path, "mei") | ENCRYPTED
        tmux.start("laptop", client_cmd(f"127.0.0.1:{port}", "--name", "Mei"), env)
        trust_and_log_in(tmux, "laptop", broker, "Mei")
        tmux.start("desk", client_cmd(f"127.0.0.1:{port}", "--name", "Mei"), env)
        tmux.wait_for("desk", r"Take over here\? \[y/N\]")
        tmux.type("desk", "n")
        tmux.wait_for("desk", "Mei stays logged in elsewhere; pick another name")
        tmux.wait_for("desk", "your name:")
        assert "connection lost" not in tmux.screen("laptop")
    finally:
        broker.kill()


def test_to_a_name_nobody_has_is_refused_at_once(broker, tmux, tmp_path):
    taras = Client("Тарас", broker.endpoint)
    try:
        taras.login(timeout=10)
        command = client_cmd(broker.endpoint, "--name", "Олена", "--to", "Тарас")
        tmux.start("olena", command, client_env(tmp_path, "olena"))

        def olena_sees_taras() -> bool:
            taras.next_event(timeout=0.1)
            return "talking to Тарас (online)" in tmux.screen("olena")

        wait_until(olena_sees_taras, "Олена to see Тарас online")
        tmux.type("olena", "/to Nobody")
        screen = tmux.wait_for("olena", "nobody is called Nobody")
        assert "talking to Nobody" not in screen
        assert input_row(screen).startswith("[Тарас] ›")  # still where she was
        taras.close()  # offline now, but registered: /to opens it, with no warning
        tmux.type("olena", "/to тарас")
        screen = tmux.wait_for("olena", r"talking to Тарас \(offline\)")
        assert "nobody called" not in screen
    finally:
        taras.close()


def test_a_client_killed_mid_burst_loses_no_message_it_confirmed(broker, tmux, tmp_path):
    """kill -9 while a backlog is being printed, then start again: every message is on one
    screen or the other. The old test of this (test_confirm.py) gave ChatApp a console of
    its own, which writes at once; the real client prints through prompt_toolkit's
    patch_stdout, which queued the text for a writer thread while the message was already
    confirmed, so a kill lost what was queued. Here the real client.py runs in a terminal.

    Duplicates are allowed, and expected: what was written but not yet confirmed when the
    kill came is shown again by the second run."""
    total = 300
    texts = [f"k{i}" for i in range(1, total + 1)]
    with Client("Тарас", broker.endpoint):
        pass  # the name exists; Тарас is offline while x writes
    with Client("x", broker.endpoint) as x:
        for text in texts:
            x.send("Тарас", text)
        deadline = time.monotonic() + 30
        while x.session.unacknowledged and time.monotonic() < deadline:
            x.poll(0.05)
        assert not x.session.unacknowledged
    env = client_env(tmp_path, "taras")
    command = client_cmd(broker.endpoint, "--name", "Тарас")
    # The pane stays after its program dies (its screen is read after the kill), and the
    # program is exec'd, so the pane's pid is the client's.
    tmux.run("new-session", "-d", "-s", "placeholder", "-x", "200", "-y", "50", "sleep 120")
    tmux.run("set-option", "-g", "remain-on-exit", "on")
    tmux.run("set-option", "-g", "history-limit", "5000")
    exports = " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items())
    shown = re.compile(r"\bk(\d+)\b")

    def run_and_read(session: str, kill_at_first: bool) -> set[int]:
        line = f"exec env {exports} {shlex.join(command)}"
        tmux.run("new-session", "-d", "-s", session, "-x", "200", "-y", "50", line)
        pid = int(pane(tmux, session, "pane_pid"))

        def read() -> str:
            return tmux.run("capture-pane", "-p", "-J", "-t", session, "-S", "-")

        if kill_at_first:
            wait_until(lambda: shown.search(read()), "the first message on screen", 30, read)
            os.kill(pid, signal.SIGKILL)
            wait_until(lambda: pane(tmux, session, "pane_dead") == "1", "the kill", 10, read)
            return {int(n) for n in shown.findall(read())}
        seen: set[int] = set()

        def the_rest_came() -> bool:
            seen.update(int(n) for n in shown.findall(read()))
            return f"k{total}" in read() and seen.issuperset(range(min(seen), total + 1))

        wait_until(the_rest_came, "the rest of the backlog", 60, read)
        return seen

    first = run_and_read("first", kill_at_first=True)
    second = run_and_read("second", kill_at_first=False)
    assert first, "nothing was on screen at the kill"
    assert len(first) < total, "all came before the kill: the test proved nothing"
    missing = sorted(set(range(1, total + 1)) - first - second)
    assert not missing, f"lost: {missing[:20]}… ({len(missing)}); first run showed {len(first)}"


def test_a_quick_reply_shows_below_the_message_it_answers(broker, tmux, tmp_path):
    """The echo bot answers before it confirms, so its reply reached us before the ✓✓
    of our message, whose line used to wait for that ✓✓ (or a grace period): the reply
    was printed above the message it answers."""
    from .test_sdk_and_examples import start_bot

    bot = start_bot("echo_bot.py", broker, "echo")
    try:
        command = client_cmd(broker.endpoint, "--name", "Олена", "--to", "echo")
        tmux.start("olena", command, client_env(tmp_path, "olena"))
        wait_until(
            lambda: (
                "echo is online" in tmux.screen("olena")
                or "talking to echo (online)" in tmux.screen("olena")
            ),
            "the echo bot online",
            context=lambda: tmux.screen("olena"),
        )
        for n in (1, 2, 3):
            tmux.type("olena", f"order test {n}")
            tmux.wait_for("olena", rf"echo: order test {n}\b")
        screen = tmux.wait_for("olena", r"Олена order test 3\b")
        rows = transcript_rows(screen)
        for n in (1, 2, 3):
            own = [i for i, r in enumerate(rows) if re.search(rf"Олена order test {n}\b", r)]
            reply = [i for i, r in enumerate(rows) if f"echo: order test {n}" in r]
            assert len(own) == 1 and len(reply) == 1, screen
            assert own[0] < reply[0], screen
    finally:
        bot.terminate()
        bot.wait(10)
