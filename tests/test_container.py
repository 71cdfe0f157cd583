"""The container's commands, run as the image would run them, outside any container.

There is no Docker engine in CI, so these tests read the Dockerfile's exec-form `CMD`,
its `ENV` and its `HEALTHCHECK` and run those exact command lines on this machine, with
`python` swapped for the interpreter running pytest, the data directory moved to a tmp
dir and the port to a free one. What they prove: the image's command starts a broker
that answers, stops with exit code 0 on SIGTERM (what `docker stop` sends), and the
health probe tells a live broker from a dead port. They also check that `.dockerignore`
lets into the build context every file `pip install .` needs, read from `pyproject.toml`.
The image itself is built and run by a container engine in test_container_engine.py.
"""

from __future__ import annotations

import json
import os
import queue
import re
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import pytest
import zmq

from mangogram_proto.keys import fetch_server_key

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
STARTUP_TIMEOUT_S = 15.0
REPLY_TIMEOUT_MS = 3000
STOP_TIMEOUT_S = 2.0
PROBE_TIMEOUT_S = 15.0
LISTENING = re.compile(r"MangoGram broker listening on (\S+) \(data in (.+?)[,)]")
KEY_DISCOVERY = re.compile(r"key discovery on (\S+)")


# The Dockerfile, read just far enough for the instructions we run.


def dockerfile_instructions(path: Path = DOCKERFILE) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, with continuation lines joined and comments dropped."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if line.startswith("#") or (not line and not pending):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        whole = (pending + line).strip()
        pending = ""
        keyword, _, rest = whole.partition(" ")
        instructions.append((keyword.upper(), rest.strip()))
    return instructions


def dockerfile_env(path: Path = DOCKERFILE) -> dict[str, str]:
    """Every ENV of the Dockerfile, later ones winning, as the image's environment has them."""
    env: dict[str, str] = {}
    for keyword, rest in dockerfile_instructions(path):
        if keyword != "ENV":
            continue
        words = shlex.split(rest)
        if "=" not in words[0]:  # legacy form: ENV KEY value with spaces
            env[words[0]] = rest.split(None, 1)[1]
            continue
        for word in words:
            key, _, value = word.partition("=")
            env[key] = value
    return env


def exec_form(arguments: str, instruction: str) -> list[str]:
    command = json.loads(arguments)
    assert isinstance(command, list) and command, f"{instruction} must use the exec (JSON) form"
    assert all(isinstance(word, str) for word in command)
    return command


def dockerfile_cmd(path: Path = DOCKERFILE) -> list[str]:
    """The last CMD, which must be exec form so the broker is PID 1 and gets SIGTERM."""
    commands = [rest for keyword, rest in dockerfile_instructions(path) if keyword == "CMD"]
    assert commands, "the Dockerfile has no CMD"
    return exec_form(commands[-1], "CMD")


def dockerfile_healthcheck(path: Path = DOCKERFILE) -> list[str]:
    """The HEALTHCHECK's command, without its --interval/--timeout/... options."""
    checks = [rest for keyword, rest in dockerfile_instructions(path) if keyword == "HEALTHCHECK"]
    assert checks, "the Dockerfile has no HEALTHCHECK"
    rest = checks[-1]
    while rest.startswith("--"):
        rest = rest.split(None, 1)[1]
    keyword, _, arguments = rest.partition(" ")
    assert keyword.upper() == "CMD", f"unexpected HEALTHCHECK {rest!r}"
    return exec_form(arguments.strip(), "HEALTHCHECK CMD")


def on_this_machine(command: list[str]) -> list[str]:
    """The image's command line with its `python` replaced by the one running the tests."""
    assert command[0] == "python", f"expected the image's python, got {command[0]!r}"
    return [sys.executable, *command[1:]]


def image_environment(**overrides: str) -> dict[str, str]:
    """This machine's environment less any MANGOGRAM_*, plus the image's ENV, plus overrides."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MANGOGRAM_")}
    env.update(dockerfile_env())
    env.update(overrides)
    return env


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


# The broker, started with the image's CMD.


@dataclass
class RunningBroker:
    process: subprocess.Popen[str]
    endpoint: str
    key_endpoint: str
    data_dir: Path
    stderr: list[str]


def _pump(stream: IO[str], lines: queue.Queue[str | None]) -> None:
    # Draining stderr in a thread keeps the broker from blocking on a full pipe.
    for line in stream:
        lines.put(line)
    lines.put(None)


def wait_for_line(
    process: subprocess.Popen[str],
    lines: queue.Queue[str | None],
    seen: list[str],
    pattern: re.Pattern[str],
    timeout: float,
) -> re.Match[str]:
    deadline = time.monotonic() + timeout
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            pytest.fail(f"no line matching {pattern.pattern!r} in {timeout}s; stderr: {seen}")
        try:
            line = lines.get(timeout=remaining)
        except queue.Empty:
            continue
        if line is None:
            process.wait(timeout=STOP_TIMEOUT_S)
            pytest.fail(f"broker exited with {process.returncode} before ready; stderr: {seen}")
        seen.append(line.rstrip("\n"))
        match = pattern.search(line)
        if match:
            return match


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[RunningBroker]:
    data_dir = tmp_path / "data"
    # Port `*` lets the OS pick a free port with no race; the broker logs the one it got.
    env = image_environment(
        MANGOGRAM_BIND="tcp://127.0.0.1:*",
        MANGOGRAM_KEY_BIND="tcp://127.0.0.1:*",
        MANGOGRAM_DATA=str(data_dir),
    )
    process = subprocess.Popen(
        on_this_machine(dockerfile_cmd()),
        cwd=ROOT,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    lines: queue.Queue[str | None] = queue.Queue()
    reader = threading.Thread(target=_pump, args=(process.stderr, lines), daemon=True)
    reader.start()
    seen: list[str] = []
    try:
        keys = wait_for_line(process, lines, seen, KEY_DISCOVERY, STARTUP_TIMEOUT_S)
        ready = wait_for_line(process, lines, seen, LISTENING, STARTUP_TIMEOUT_S)
        yield RunningBroker(process, ready.group(1), keys.group(1), data_dir, seen)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=10)
        reader.join(timeout=10)  # ends at EOF, once the broker is gone
        assert process.stderr is not None
        process.stderr.close()


def ping(endpoint: str, key_endpoint: str) -> list[bytes]:
    """One encrypted PING from a client that never logged in; the broker's reply frames.
    The broker's key comes from its key-discovery port, as a first-time client learns it."""
    server_key = fetch_server_key(key_endpoint)
    public, secret = zmq.curve_keypair()
    context = zmq.Context()
    try:
        with context.socket(zmq.DEALER) as dealer:
            dealer.setsockopt(zmq.CURVE_SERVERKEY, server_key.encode())
            dealer.setsockopt(zmq.CURVE_PUBLICKEY, public)
            dealer.setsockopt(zmq.CURVE_SECRETKEY, secret)
            dealer.setsockopt(zmq.LINGER, 0)
            dealer.setsockopt(zmq.RCVTIMEO, REPLY_TIMEOUT_MS)
            dealer.connect(endpoint)
            dealer.send_multipart([b"MGP02", b"PING", b"{}"])
            return dealer.recv_multipart()
    finally:
        context.term()


def run_healthcheck(key_bind: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        on_this_machine(dockerfile_healthcheck()),
        cwd=ROOT,
        env=image_environment(MANGOGRAM_KEY_BIND=key_bind),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=PROBE_TIMEOUT_S,
    )


def as_in_container(endpoint: str) -> str:
    """The image's MANGOGRAM_KEY_BIND (tcp://0.0.0.0:5556) moved to `endpoint`'s port."""
    port = endpoint.rsplit(":", 1)[1]
    return dockerfile_env()["MANGOGRAM_KEY_BIND"].rsplit(":", 1)[0] + ":" + port


# The build context, as the engine cuts it with .dockerignore.


@dataclass(frozen=True)
class IgnoreRule:
    regex: re.Pattern[str]
    exclusion: bool  # a `!` rule lets back in what an earlier rule left out


def _ignore_regex(pattern: str) -> re.Pattern[str]:
    """A .dockerignore pattern as the engines read it (Go's filepath.Match plus `**`)."""
    out = "^"
    i = 0
    while i < len(pattern):
        ch = pattern[i]
        if pattern.startswith("**", i):
            i += 2
            if pattern.startswith("/", i):
                i += 1
            out += ".*" if i == len(pattern) else "(.*/)?"
            continue
        if ch == "*":
            out += "[^/]*"
        elif ch == "?":
            out += "[^/]"
        elif ch == "\\" and i + 1 < len(pattern):
            i += 1
            out += re.escape(pattern[i])
        elif ch in ".+(){}|^$":
            out += "\\" + ch
        else:  # letters, `/`, and `[...]` classes, which mean the same in a regex
            out += ch
        i += 1
    return re.compile(out + "$")


def dockerignore_rules(path: Path = DOCKERIGNORE) -> list[IgnoreRule]:
    rules = []
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        exclusion = line.startswith("!")
        pattern = os.path.normpath(line.lstrip("!").strip()).replace(os.sep, "/").lstrip("/")
        rules.append(IgnoreRule(_ignore_regex(pattern), exclusion))
    return rules


def left_out_of_context(relative: str, rules: list[IgnoreRule]) -> bool:
    """Whether the engine leaves `relative` (a path under the context) out of the build:
    the last rule matching the path or one of its parent directories decides."""
    parts = relative.split("/")
    candidates = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    left_out = False
    for rule in rules:
        if any(rule.regex.match(candidate) for candidate in candidates):
            left_out = not rule.exclusion
    return left_out


def files_pip_install_needs() -> list[str]:
    """What `pip install .` reads, from pyproject.toml: the project file, its readme and
    license files, every file of every package, and every top-level module."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    setuptools = project["tool"]["setuptools"]
    needed = ["pyproject.toml"]
    readme = project["project"].get("readme")
    if readme:
        needed.append(readme if isinstance(readme, str) else readme["file"])
    license_ = project["project"].get("license", {})
    if isinstance(license_, dict) and "file" in license_:
        needed.append(license_["file"])
    for package in setuptools["packages"]:
        directory = ROOT / package.replace(".", "/")
        assert directory.is_dir(), f"pyproject.toml packages {package}, which does not exist"
        needed += [
            path.relative_to(ROOT).as_posix()
            for path in directory.rglob("*")
            if path.is_file() and "__pycache__" not in path.parts and path.suffix != ".pyc"
        ]
    needed += [f"{module}.py" for module in setuptools.get("py-modules", [])]
    return needed


# The tests.


def test_image_cmd_starts_a_broker_that_answers_and_stops_cleanly_on_sigterm(
    broker: RunningBroker,
) -> None:
    assert broker.endpoint.startswith("tcp://127.0.0.1:")

    frames = ping(broker.endpoint, broker.key_endpoint)

    assert len(frames) == 3, frames
    assert frames[0] == b"MGP02"
    assert frames[1] == b"ERROR"
    assert json.loads(frames[2])["code"] == "not_logged_in"
    assert (broker.data_dir / "mangogram.sqlite3").exists(), "MANGOGRAM_DATA was not used"

    broker.process.send_signal(signal.SIGTERM)
    assert broker.process.wait(timeout=STOP_TIMEOUT_S) == 0, broker.stderr


def test_image_environment_points_the_broker_at_the_volume_and_all_interfaces() -> None:
    env = dockerfile_env()

    assert env["MANGOGRAM_BIND"] == "tcp://0.0.0.0:5555"
    assert env["MANGOGRAM_KEY_BIND"] == "tcp://0.0.0.0:5556"
    assert "MANGOGRAM_INSECURE_PLAINTEXT" not in env  # the image encrypts
    assert env["MANGOGRAM_DATA"] == "/data"


def test_healthcheck_passes_against_a_live_broker(broker: RunningBroker) -> None:
    result = run_healthcheck(as_in_container(broker.key_endpoint))

    assert result.returncode == 0, result.stderr


def test_healthcheck_fails_against_a_closed_port() -> None:
    result = run_healthcheck(f"tcp://0.0.0.0:{free_port()}")

    assert result.returncode != 0


def test_build_context_holds_every_file_pip_install_needs() -> None:
    rules = dockerignore_rules()

    missing = [path for path in files_pip_install_needs() if left_out_of_context(path, rules)]

    assert not missing, f".dockerignore leaves out what `pip install .` needs: {missing}"


def test_build_context_leaves_out_tests_data_and_caches() -> None:
    rules = dockerignore_rules()

    for path in (
        ".git/HEAD",
        ".venv/bin/python",
        "data/mangogram.sqlite3",
        "tests/test_core.py",
        "mangogram_proto/__pycache__/codec.cpython-311.pyc",
        "mangogram_broker/core.pyc",
    ):
        assert left_out_of_context(path, rules), path


def test_dockerignore_reading_follows_the_engines_rules() -> None:
    rules = [
        IgnoreRule(_ignore_regex("*"), False),
        IgnoreRule(_ignore_regex("pkg"), True),
        IgnoreRule(_ignore_regex("**/__pycache__"), False),
        IgnoreRule(_ignore_regex("**/*.py[cod]"), False),
    ]

    assert left_out_of_context("other/file.py", rules)
    assert not left_out_of_context("pkg/sub/file.py", rules)  # a directory rule covers its tree
    assert left_out_of_context("pkg/sub/__pycache__/x.py", rules)  # `**` spans directories
    assert left_out_of_context("pkg/x.pyo", rules)  # `[...]` is a character class
    assert not left_out_of_context("pkg/x.pyx", rules)
    assert _ignore_regex("a.b").match("a.b") and not _ignore_regex("a.b").match("axb")
