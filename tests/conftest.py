"""Fixtures that start the real broker on loopback and open real DEALER sockets."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import zmq

ROOT = Path(__file__).resolve().parent.parent

# Most tests exercise routing, not cryptography: they run the broker and the SDK in the
# loopback-only plaintext mode. The security tests (test_security.py, test_container.py)
# remove this and use the encrypted default.
os.environ["MANGOGRAM_INSECURE_PLAINTEXT"] = "1"
LISTENING = re.compile(r"listening on (tcp://\S+)")
PUBLIC_KEY = re.compile(r"public key (\S{40}) \(fingerprint (\S+)\)")
KEY_DISCOVERY = re.compile(r"key discovery on (tcp://\S+)")
STARTUP_TIMEOUT_S = 20

# Tests that need POSIX signal delivery (SIGKILL, SIGSTOP, SIGINT to a child) say so with
# this mark; Windows has TerminateProcess and console control events instead.
posix_signals = pytest.mark.skipif(
    sys.platform == "win32",
    reason="POSIX-only: sends a signal (SIGKILL/SIGSTOP/SIGINT/SIGTERM) Windows cannot deliver",
)

# A clean stop the way each system asks for one: SIGTERM, or Ctrl-Break to a child started
# in its own process group on Windows (the broker handles SIGBREAK there).
if sys.platform == "win32":
    GRACEFUL_SPAWN: dict[str, int] = {"creationflags": subprocess.CREATE_NEW_PROCESS_GROUP}
    GRACEFUL_STOP = signal.CTRL_BREAK_EVENT
else:
    GRACEFUL_SPAWN = {}
    GRACEFUL_STOP = signal.SIGTERM


class BrokerProcess:
    """`python broker.py` in a subprocess; its stderr is collected in a thread."""

    def __init__(
        self,
        data_dir: Path,
        *extra: str,
        bind: str = "tcp://127.0.0.1:*",
        env: dict[str, str] | None = None,
    ) -> None:
        self.data_dir = data_dir
        self.args = [
            sys.executable,
            str(ROOT / "broker.py"),
            "--bind",
            bind,
            "--data",
            str(data_dir),
            "--log-level",
            "DEBUG",
            "--heartbeat-interval-ms",
            "200",
            "--heartbeat-timeout-ms",
            "1000",
            *extra,
        ]
        self.lines: list[str] = []
        self._ready = threading.Event()
        self.endpoint = ""
        self.public_key = ""
        self.fingerprint = ""
        self.key_endpoint = ""
        env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
        self.proc = subprocess.Popen(
            self.args,
            cwd=ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            encoding="utf-8",
            **GRACEFUL_SPAWN,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        if not self._ready.wait(STARTUP_TIMEOUT_S):
            self.kill()
            raise RuntimeError("broker did not start:\n" + "".join(self.lines))

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line)
            if key := PUBLIC_KEY.search(line):
                self.public_key, self.fingerprint = key.group(1), key.group(2)
            if discovery := KEY_DISCOVERY.search(line):
                self.key_endpoint = discovery.group(1)
            match = LISTENING.search(line)
            if match and not self.endpoint:
                self.endpoint = match.group(1)
                self._ready.set()

    def log_text(self) -> str:
        return "".join(self.lines)

    def wait_for_log(self, pattern: str, timeout: float = 5.0) -> bool:
        """Poll the collected log for `pattern` until `timeout` seconds pass."""
        deadline = time.monotonic() + timeout
        regex = re.compile(pattern)
        while time.monotonic() < deadline:
            if regex.search(self.log_text()):
                return True
            self.proc.poll()
            time.sleep(0.02)
        return bool(regex.search(self.log_text()))

    def terminate(self, timeout: float = 5.0) -> int:
        self.proc.send_signal(GRACEFUL_STOP)
        return self.proc.wait(timeout)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[BrokerProcess]:
    process = BrokerProcess(tmp_path / "data")
    yield process
    process.kill()
    assert "Traceback" not in process.log_text(), process.log_text()


@pytest.fixture
def zctx() -> Iterator[zmq.Context]:
    """A private context; terminating it with a socket left open fails the test."""
    context = zmq.Context()
    yield context
    done = threading.Event()

    def term() -> None:
        context.term()
        done.set()

    threading.Thread(target=term, daemon=True).start()
    assert done.wait(5), "zmq context did not terminate: a socket was left open"


def dealer(context: zmq.Context, endpoint: str) -> zmq.Socket:
    sock = context.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVTIMEO, 5000)
    sock.setsockopt(zmq.SNDTIMEO, 5000)
    sock.connect(endpoint)
    return sock


def wait_for_line(stream, text: str, max_lines: int = 20) -> list[str]:
    """Read a child's output until a line contains `text` (a few warnings may come
    first); returns the lines read. Fails on end of output."""
    lines = []
    for _ in range(max_lines):
        line = stream.readline()
        if not line:
            break
        lines.append(line)
        if text in line:
            return lines
    raise AssertionError(f"{text!r} never came; got {lines}")
