"""End to end: the real broker and two real `python client.py` processes in tmux, typed
into and read back from the screen as a person would."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import time
import uuid
from datetime import datetime

import pytest

from .conftest import ROOT

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is installed by .ci/run"),
]

TIME = re.compile(r"\b\d\d:\d\d\b")


class Tmux:
    """A private tmux server (its own socket), so tests never touch a user's sessions."""

    def __init__(self) -> None:
        self.socket = f"mangogram-test-{uuid.uuid4().hex[:8]}"

    def run(self, *args: str) -> str:
        done = subprocess.run(
            ["tmux", "-L", self.socket, "-f", "/dev/null", *args],
            capture_output=True,
            text=True,
            encoding="utf-8",
            timeout=10,
        )
        if done.returncode != 0:
            raise RuntimeError(f"tmux {args[0]} failed: {done.stderr}")
        return done.stdout

    def start(self, name: str, command: list[str], env: dict[str, str]) -> None:
        exports = " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items())
        # The shell prints the exit code, so the test reads it off the screen.
        line = f'env {exports} {shlex.join(command)}; echo "[exited $?]"; sleep 30'
        self.run("new-session", "-d", "-s", name, "-x", "100", "-y", "30", line)

    def type(self, name: str, text: str) -> None:
        self.run("send-keys", "-t", name, "-l", text)
        self.run("send-keys", "-t", name, "Enter")

    def screen(self, name: str) -> str:
        return self.run("capture-pane", "-p", "-J", "-t", name, "-S", "-200")

    def wait_for(self, name: str, pattern: str, timeout: float = 15.0) -> str:
        deadline = time.monotonic() + timeout
        while True:
            screen = self.screen(name)
            if re.search(pattern, screen):
                return screen
            if time.monotonic() > deadline:
                raise AssertionError(f"{pattern!r} not on {name}'s screen:\n{screen}")
            time.sleep(0.1)  # polling the screen, bounded by the deadline

    def exit_status(self, name: str, timeout: float = 10.0) -> int:
        screen = self.wait_for(name, r"\[exited \d+\]", timeout)
        return int(re.findall(r"\[exited (\d+)\]", screen)[-1])

    def kill(self) -> None:
        subprocess.run(["tmux", "-L", self.socket, "kill-server"], capture_output=True, timeout=10)


@pytest.fixture
def tmux():
    server = Tmux()
    yield server
    server.kill()


def client_env(tmp_path, who: str) -> dict[str, str]:
    return {
        "MANGOGRAM_CONFIG_DIR": str(tmp_path / who),
        "LANG": "C.UTF-8",
        "LC_ALL": "C.UTF-8",
        "TERM": "xterm-256color",
        "PATH": os.environ.get("PATH", ""),
        "PYTHONPATH": str(ROOT),
    }


def minute_of(screen: str, text: str) -> str | None:
    """The HH:MM shown for the line holding `text` (times repeat only when they change,
    so it is the nearest one at or above that line)."""
    shown = None
    for row in screen.splitlines():
        match = TIME.match(row)
        if match:
            shown = match.group(0)
        if text in row:
            return shown
    return None


def test_two_people_chat_in_real_terminals(broker, tmux, tmp_path):
    people = {"olena": "Олена", "taras": "Тарас"}
    for session, name in people.items():
        command = [
            sys.executable,
            str(ROOT / "client.py"),
            "--server",
            broker.endpoint,
            "--name",
            name,
        ]
        tmux.start(session, command, client_env(tmp_path, session))
    for session, name in people.items():
        tmux.wait_for(session, f"logged in as {name}")
    # each sees the other online, whoever logged in first
    tmux.wait_for("olena", r"Тарас is online|online \(1\): Тарас")
    tmux.wait_for("taras", r"Олена is online|online \(1\): Олена")
    tmux.type("olena", "/to Тарас")
    tmux.wait_for("olena", r"talking to Тарас \(online\)")
    tmux.type("taras", "/to олена")
    tmux.wait_for("taras", r"talking to Олена \(online\)")

    tmux.type("olena", "Привіт, Тарасе! Як справи? 🌻")
    tmux.type("taras", "Добрий день, Олено! Усе гаразд, дякую.")
    before = datetime.now().strftime("%H:%M")
    olena = tmux.wait_for("olena", r"Добрий день, Олено! Усе гаразд, дякую\.")
    taras = tmux.wait_for("taras", r"Привіт, Тарасе! Як справи\? 🌻")
    olena = tmux.wait_for("olena", r"Як справи\? 🌻 ✓✓")
    taras = tmux.wait_for("taras", r"дякую\. ✓✓")
    after = datetime.now().strftime("%H:%M")
    for screen, text in ((olena, "Добрий день, Олено!"), (taras, "Привіт, Тарасе!")):
        assert minute_of(screen, text) in {before, after}, screen
    # The toolbar, the last row drawn, says online (waited for: a capture can land mid-redraw).
    tmux.wait_for("olena", r"online[^\n]*\s*\Z")

    # A message arriving mid-typing prints above the prompt and leaves the typing intact.
    tmux.run("send-keys", "-t", "olena", "-l", "напів")
    tmux.wait_for("olena", r"\[Тарас\] › напів")
    tmux.type("taras", "перебиваю!")
    olena = tmux.wait_for("olena", r"перебиваю!")
    prompt_rows = [row for row in olena.splitlines() if row.startswith("[Тарас] ›")]
    assert prompt_rows[-1].rstrip() == "[Тарас] › напів", olena
    assert olena.index("перебиваю!") < olena.rindex("[Тарас] › напів")
    tmux.type("olena", "писане")
    tmux.wait_for("taras", r"напівписане")

    tmux.type("olena", "/exit")
    tmux.type("taras", "/exit")
    assert tmux.exit_status("olena") == 0
    assert tmux.exit_status("taras") == 0
    assert broker.wait_for_log("Олена is offline \\(left")
    assert broker.wait_for_log("Тарас is offline \\(left")
