"""What Windows and macOS would do differently, simulated on the machine at hand.

Nobody can run those systems here, so each known difference is reproduced with a stand-in
(a fake `resource` module, a monkeypatched `sys.platform`, a socket that raises what pyzmq
raises there) and the code is checked against it.
"""

from __future__ import annotations

import errno
import logging
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import zmq

from mangogram_broker import cli as broker_cli
from mangogram_broker import shell
from mangogram_broker.core import Outgoing
from mangogram_broker.openfiles import MACOS_FALLBACK, WANTED_OPEN_FILES, raise_open_file_limit
from mangogram_broker.shell import BrokerServer
from mangogram_broker.store import _SCHEMA, SqliteStore, SqliteTooOld
from mangogram_proto.messages import Pong

from .harness import Network

ROOT = Path(__file__).resolve().parent.parent
RLIM_INFINITY = -1


class FakeResource:
    """`resource` as macOS has it: the hard limit says unlimited, but any soft limit above
    kern.maxfilesperproc is refused with EINVAL (Python raises ValueError)."""

    RLIMIT_NOFILE = 8
    RLIM_INFINITY = RLIM_INFINITY

    def __init__(self, soft: int, hard: int, max_per_process: int) -> None:
        self.limits = (soft, hard)
        self.max_per_process = max_per_process
        self.requests: list[int] = []

    def getrlimit(self, which: int) -> tuple[int, int]:
        assert which == self.RLIMIT_NOFILE
        return self.limits

    def setrlimit(self, which: int, limits: tuple[int, int]) -> None:
        soft, hard = limits
        self.requests.append(soft)
        if soft > self.max_per_process:
            raise ValueError("current limit exceeds maximum limit")
        self.limits = (soft, hard)


def test_macos_open_file_limit_falls_back_when_the_wanted_one_is_refused() -> None:
    fake = FakeResource(soft=256, hard=RLIM_INFINITY, max_per_process=24_576)
    assert raise_open_file_limit(fake) == MACOS_FALLBACK
    assert fake.requests == [WANTED_OPEN_FILES, MACOS_FALLBACK]
    assert fake.limits == (MACOS_FALLBACK, RLIM_INFINITY)


def test_open_file_limit_takes_the_wanted_one_where_allowed() -> None:
    fake = FakeResource(soft=1024, hard=1_048_576, max_per_process=1_048_576)
    assert raise_open_file_limit(fake) == WANTED_OPEN_FILES
    assert fake.requests == [WANTED_OPEN_FILES]


def test_open_file_limit_never_exceeds_a_low_hard_limit() -> None:
    fake = FakeResource(soft=256, hard=4096, max_per_process=4096)
    assert raise_open_file_limit(fake) == 4096
    assert fake.requests == [4096]


def test_open_file_limit_left_alone_when_high_enough_or_all_refused() -> None:
    high = FakeResource(soft=100_000, hard=RLIM_INFINITY, max_per_process=10**6)
    assert raise_open_file_limit(high) == 100_000
    assert high.requests == []
    stuck = FakeResource(soft=256, hard=RLIM_INFINITY, max_per_process=256)
    assert raise_open_file_limit(stuck) == 256
    assert stuck.limits == (256, RLIM_INFINITY)


def test_open_file_limit_is_not_touched_on_windows(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "platform", "win32")
    assert raise_open_file_limit() is None


def test_scripts_keep_lf_line_endings_on_any_checkout() -> None:
    if not (ROOT / ".git").exists():
        pytest.skip("not a git checkout: .gitattributes applies only to git checkouts")
    paths = [".ci/run", ".ci/check-docker", "Dockerfile", "broker.py", "README.md"]
    result = subprocess.run(
        ["git", "check-attr", "eol", "--", *paths],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    for line in result.stdout.splitlines():
        assert line.endswith(": eol: lf"), line
    assert len(result.stdout.splitlines()) == len(paths)


# Python's errno numbers on Windows (WinSock's), where libzmq reports its own (110, 11).
WINDOWS_PYTHON_ERRNO = {"EHOSTUNREACH": 10065, "EAGAIN": 10035}


@pytest.mark.parametrize("zmq_errno", ["EHOSTUNREACH", "EAGAIN"])
def test_broker_survives_a_failed_send_with_windows_errno_numbers(
    monkeypatch: pytest.MonkeyPatch, zmq_errno: str
) -> None:
    """pyzmq raises libzmq's errno; on Windows Python's errno module disagrees with it, so a
    comparison with errno.EHOSTUNREACH let the first send to a vanished peer kill the loop."""
    network = Network()
    alice = network.join("Alice")
    context = zmq.Context()
    server = BrokerServer(network.core, "tcp://127.0.0.1:0", context=context)
    try:
        for name, number in WINDOWS_PYTHON_ERRNO.items():
            monkeypatch.setattr(errno, name, number)

        class FailingSocket:
            @staticmethod
            def send(_socket: object, _frame: bytes, _flags: int) -> None:
                raise zmq.ZMQError(getattr(zmq, zmq_errno))

        monkeypatch.setattr(shell, "SocketBase", FailingSocket)
        server._send_all([Outgoing(alice.peer, Pong(server_time=network.now))], network.clock)
        online = network.core.registry.by_peer(alice.peer) is not None
        # A vanished peer's session ends; a full queue leaves it online.
        assert online == (zmq_errno == "EAGAIN")
    finally:
        server.close()
        context.term()


def test_sqlite_too_old_for_upsert_is_refused_with_a_clear_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(sqlite3, "sqlite_version_info", (3, 22, 0))
    monkeypatch.setattr(sqlite3, "sqlite_version", "3.22.0")
    with pytest.raises(SqliteTooOld, match=r"SQLite 3\.22\.0 is too old .* 3\.24\.0 or newer"):
        SqliteStore(tmp_path / "store.sqlite3")
    # The broker says so and exits 2 before it listens anywhere.
    args = ["--data", str(tmp_path / "data"), "--bind", "tcp://127.0.0.1:0"]
    with caplog.at_level(logging.ERROR):
        assert broker_cli.main(args) == 2
    assert "is too old for the store" in caplog.text


def test_a_version_2_store_migrates_where_sqlite_has_no_drop_column(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    path = tmp_path / "old.sqlite3"
    db = sqlite3.connect(path, isolation_level=None)
    for script in _SCHEMA[:2]:
        db.executescript(script)
    db.execute("PRAGMA user_version=2")
    db.close()
    monkeypatch.setattr(sqlite3, "sqlite_version_info", (3, 34, 1))
    store = SqliteStore(path)
    try:
        stored = store.append("a", "Alice", "b", "Bob", "id-1", "привіт", 1, 2)
        store.commit()
        assert [m.text for m in store.unconfirmed("b", 0, 10)] == ["привіт"]
        assert stored.seq == 1
    finally:
        store.close()
    columns = {row[1] for row in sqlite3.connect(path).execute("PRAGMA table_info(messages)")}
    assert "sender_notified" in columns  # kept: dropping it needs SQLite 3.35


@pytest.mark.parametrize(
    ("platform", "durability", "full_fsync"),
    [
        ("darwin", "full", 1),
        ("darwin", "normal", 0),
        ("linux", "full", 0),
    ],
)
def test_full_durability_uses_fullfsync_on_macos(
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    platform: str,
    durability: str,
    full_fsync: int,
) -> None:
    """On macOS fsync() only reaches the drive's cache; F_FULLFSYNC reaches the platter."""
    monkeypatch.setattr(sys, "platform", platform)
    store = SqliteStore(tmp_path / "store.sqlite3", durability)  # type: ignore[arg-type]
    try:
        db = store._db
        assert db.execute("PRAGMA fullfsync").fetchone()[0] == full_fsync
        assert db.execute("PRAGMA checkpoint_fullfsync").fetchone()[0] == full_fsync
    finally:
        store.close()


def test_ctrl_break_stops_the_broker_on_windows(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "platform", "win32")
    monkeypatch.setattr(signal, "SIGBREAK", 21, raising=False)
    assert broker_cli.stop_signals() == [signal.SIGINT, signal.SIGTERM, 21]
    monkeypatch.setattr(sys, "platform", "linux")
    assert broker_cli.stop_signals() == [signal.SIGINT, signal.SIGTERM]


class FakeLibc:
    def __init__(self) -> None:
        self.seeded: list[str] = []

    def srand(self, _seed: int) -> None:
        self.seeded.append("srand")

    def srandom(self, _seed: int) -> None:
        self.seeded.append("srandom")


@pytest.mark.parametrize("platform", ["darwin", "linux", "win32"])
def test_routing_ids_are_seeded_through_rand_on_every_platform(
    monkeypatch: pytest.MonkeyPatch, platform: str
) -> None:
    """libzmq draws its first routing id from rand(); macOS's srandom() does not seed it."""
    libc = FakeLibc()
    opened: list[str | None] = []

    def fake_cdll(name: str | None) -> FakeLibc:
        opened.append(name)
        return libc

    monkeypatch.setattr(sys, "platform", platform)
    monkeypatch.setattr(shell.ctypes, "CDLL", fake_cdll)
    shell.unpredictable_routing_ids()
    assert "srand" in libc.seeded
    assert opened == (["ucrtbase"] if platform == "win32" else [None])


FIRST_GENERATED_ID = """
import zmq
from mangogram_broker.shell import unpredictable_routing_ids
unpredictable_routing_ids()
context = zmq.Context()
router = context.socket(zmq.ROUTER)
port = router.bind_to_random_port("tcp://127.0.0.1")
dealer = context.socket(zmq.DEALER)
dealer.connect(f"tcp://127.0.0.1:{port}")
dealer.send(b"hello")
if not router.poll(10_000):
    raise SystemExit("no message within 10 s")
print(router.recv_multipart()[0].hex())
context.destroy(linger=0)
"""


def test_two_broker_processes_hand_out_different_first_routing_ids() -> None:
    ids = [
        subprocess.run(
            [sys.executable, "-c", FIRST_GENERATED_ID],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
            timeout=30,
        ).stdout.strip()
        for _ in range(2)
    ]
    assert all(len(i) == 10 and i.startswith("00") for i in ids), ids
    assert ids[0] != ids[1]


@pytest.mark.parametrize("platform", ["win32", "linux"])
def test_listen_stops_cleanly_on_ctrl_break_on_windows(
    monkeypatch: pytest.MonkeyPatch, platform: str
) -> None:
    from mangogram_client import scripting

    installed: list[int] = []
    monkeypatch.setattr(sys, "platform", platform)
    monkeypatch.setattr(signal, "SIGBREAK", 21, raising=False)
    monkeypatch.setattr(signal, "signal", lambda signum, _handler: installed.append(signum))
    scripting.install_stop_handler(lambda _signum, _frame: None)
    expected = [signal.SIGINT, signal.SIGTERM] + ([21] if platform == "win32" else [])
    assert installed == expected
