"""The console client failing over and being taken over, in real terminals (tmux), read
back from the screen by polling as a person would."""

from __future__ import annotations

import re
import shutil
import socket
import sys
from pathlib import Path

import pytest

from mangogram_client.cli import build_parser

from .conftest import ROOT, BrokerProcess, posix_signals
from .test_client_e2e import Tmux, client_env

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is installed by .ci/run"),
]


@pytest.fixture
def terminals():
    server = Tmux()
    yield server
    server.kill()


def client(*args: str) -> list[str]:
    return [sys.executable, str(ROOT / "client.py"), *args]


def test_help_documents_the_comma_list_of_servers():
    text = " ".join(build_parser().format_help().split())
    assert "several separated by commas (tcp://a:5555,tcp://b:5555)" in text
    assert "logs in again at the next" in text


@posix_signals
def test_the_console_client_moves_to_the_next_broker_and_says_so(terminals, tmp_path: Path):
    a, b = (BrokerProcess(tmp_path / name) for name in ("a", "b"))
    try:
        servers = f"{a.endpoint},{b.endpoint}"
        terminals.start(
            "olena",
            client("--server", servers, "--name", "Олена"),
            client_env(tmp_path, "olena"),
        )
        terminals.wait_for("olena", "logged in as Олена")
        terminals.wait_for("olena", re.escape(f"connected to {a.endpoint}"))
        a.kill()  # kill -9 of the broker it is on
        terminals.wait_for("olena", r"connection lost; reconnecting")
        screen = terminals.wait_for("olena", re.escape(f"now connected to {b.endpoint}"), 30)
        assert b.wait_for_log("Олена logged in")
        # Said once per change, not at every reconnection attempt.
        assert screen.count(f"now connected to {b.endpoint}") == 1
        terminals.wait_for("olena", r"online[^\n]*\s*\Z")  # the toolbar is back online
        terminals.type("olena", "/exit")
        assert terminals.exit_status("olena") == 0
    finally:
        for broker in (a, b):
            broker.kill()
    for broker in (a, b):
        assert "Traceback" not in broker.log_text(), broker.log_text()


def test_a_window_taken_over_says_signed_in_elsewhere_and_stays_offline(terminals, tmp_path: Path):
    broker = BrokerProcess(tmp_path / "broker", env={"MANGOGRAM_INSECURE_PLAINTEXT": "0"})
    try:
        # Two windows of one person: one config dir, so one identity key.
        env = dict(client_env(tmp_path, "mei"), MANGOGRAM_INSECURE_PLAINTEXT="0")
        command = client("--server", broker.endpoint, "--server-key", broker.public_key)
        command += ["--name", "Mei"]
        terminals.start("first", command, env)
        terminals.wait_for("first", "logged in as Mei")
        terminals.start("second", command, env)
        terminals.wait_for("second", r"Take over here\? \[y/N\]")
        terminals.type("second", "y")
        terminals.wait_for("second", "logged in as Mei")
        terminals.wait_for("first", "signed in elsewhere")
        terminals.wait_for("first", r"offline[^\n]*\s*\Z")  # the toolbar
        assert broker.log_text().count("Mei resumed on a new connection") == 1
        # The first window does not fight for the name: the second stays on.
        assert not broker.wait_for_log("Mei resumed on a new connection(.|\n)*resumed", 2.0)
        terminals.type("first", "/exit")
        assert terminals.exit_status("first") == 0
        terminals.type("second", "/exit")
        assert terminals.exit_status("second") == 0
    finally:
        broker.kill()
    assert "Traceback" not in broker.log_text(), broker.log_text()


def test_a_first_server_that_is_down_is_passed_over_for_the_key_and_the_login(
    terminals, tmp_path: Path
):
    # Key discovery on the chat port + 1, where the client looks for it by itself.
    port = two_free_ports()
    broker = BrokerProcess(
        tmp_path / "broker",
        bind=f"tcp://127.0.0.1:{port}",
        env={"MANGOGRAM_INSECURE_PLAINTEXT": "0"},
    )
    try:
        assert broker.key_endpoint == f"tcp://127.0.0.1:{port + 1}"
        dead = f"tcp://127.0.0.1:{free_port()}"  # nothing listens there
        env = dict(client_env(tmp_path, "ivan"), MANGOGRAM_INSECURE_PLAINTEXT="0")
        command = client("--server", f"{dead},{broker.endpoint}", "--name", "Ivan")
        terminals.start("ivan", command, env)
        # The key comes from the second broker (a cluster's brokers share one key pair).
        terminals.wait_for("ivan", re.escape(broker.fingerprint), 20)
        terminals.wait_for("ivan", r"trust this server and remember it\? \[y/N\]")
        terminals.type("ivan", "y")
        terminals.wait_for("ivan", "logged in as Ivan", 30)
        terminals.wait_for("ivan", re.escape(f"connected to {broker.endpoint}"))
        terminals.type("ivan", "/exit")
        assert terminals.exit_status("ivan") == 0
    finally:
        broker.kill()
    assert "Traceback" not in broker.log_text(), broker.log_text()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def two_free_ports(attempts: int = 50) -> int:
    """A loopback port p with p + 1 free too (bound and released at once)."""
    for _ in range(attempts):
        port = free_port()
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
        return port
    raise AssertionError("no two consecutive free ports")
