"""Key files on disk: written durably, pinned without losing entries, and the settings
that choose keys and plaintext parsed strictly."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import threading

import pytest
import zmq

from mangogram_broker.config import parse_config
from mangogram_client import cli as client_cli
from mangogram_proto import keys
from mangogram_proto.keys import KeyPair, KnownServers, load_keypair, save_keypair
from mangogram_proto.transport import HandshakeWatch

from .conftest import ROOT

PROCESS_TIMEOUT_S = 60


def run_python(code: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code, *args],
        capture_output=True,
        text=True,
        timeout=PROCESS_TIMEOUT_S,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )


PIN_MANY = """
import sys
from pathlib import Path
from mangogram_proto.keys import KeyPair, KnownServers
known = KnownServers(Path(sys.argv[1]))
key = KeyPair.generate().public
for i in range(int(sys.argv[3])):
    known.pin(f"tcp://10.0.{sys.argv[2]}.{i}:5555", key)
"""


def test_concurrent_pins_from_several_processes_all_survive(tmp_path):
    path = tmp_path / "known_servers"
    processes, per_process = 4, 30
    running = [
        subprocess.Popen(
            [sys.executable, "-c", PIN_MANY, str(path), str(n), str(per_process)],
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
            stderr=subprocess.PIPE,
            text=True,
        )
        for n in range(processes)
    ]
    for process in running:
        _out, err = process.communicate(timeout=PROCESS_TIMEOUT_S)
        assert process.returncode == 0, err
    known = KnownServers(path)
    missing = [
        (n, i)
        for n in range(processes)
        for i in range(per_process)
        if known.lookup(f"tcp://10.0.{n}.{i}:5555") is None
    ]
    assert missing == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["known_servers", "known_servers.lock"]


def test_concurrent_pins_from_several_threads_all_survive(tmp_path):
    known = KnownServers(tmp_path / "known_servers")
    key = KeyPair.generate().public
    failures: list[BaseException] = []

    def pin_many(n: int) -> None:
        try:
            for i in range(25):
                known.pin(f"tcp://10.1.{n}.{i}:5555", key)
        except BaseException as exc:  # reported below: a thread cannot fail the test itself
            failures.append(exc)

    threads = [threading.Thread(target=pin_many, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=PROCESS_TIMEOUT_S)
    assert failures == []
    assert all(known.lookup(f"tcp://10.1.{n}.{i}:5555") == key for n in range(4) for i in range(25))


CRASH_BEFORE_RENAME = """
import os, sys
from pathlib import Path
from mangogram_proto import keys
def crash(src, dst):
    os._exit(17)  # the process dies after writing the new file, before the rename
os.replace = crash
if sys.argv[1] == "pin":
    keys.KnownServers(Path(sys.argv[2])).pin("tcp://192.0.2.1:5555", keys.KeyPair.generate().public)
else:
    keys.save_keypair(Path(sys.argv[2]), keys.KeyPair.generate())
"""


def test_a_crash_before_the_rename_leaves_the_old_files_intact(tmp_path):
    identity = tmp_path / "identity.json"
    pair = KeyPair.generate()
    save_keypair(identity, pair)
    known_path = tmp_path / "known_servers"
    KnownServers(known_path).pin("tcp://127.0.0.1:5555", pair.public)
    pinned_before = known_path.read_text()

    assert run_python(CRASH_BEFORE_RENAME, "identity", str(identity)).returncode == 17
    assert run_python(CRASH_BEFORE_RENAME, "pin", str(known_path)).returncode == 17

    assert load_keypair(identity) == pair
    assert known_path.read_text() == pinned_before
    # The next write works, whatever the crash left behind.
    KnownServers(known_path).pin("tcp://192.0.2.1:5555", pair.public)
    assert KnownServers(known_path).lookup("tcp://127.0.0.1:5555") == pair.public


def test_key_files_reach_the_disk_before_they_replace_the_old_one(tmp_path, monkeypatch):
    steps: list[str] = []
    real_fsync, real_replace = os.fsync, os.replace
    path = tmp_path / "identity.json"

    def fsync(fd: int) -> None:
        is_dir = stat.S_ISDIR(os.fstat(fd).st_mode)
        steps.append("fsync directory" if is_dir else "fsync file")
        real_fsync(fd)

    def replace(src, dst) -> None:
        steps.append("rename")
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    save_keypair(path, KeyPair.generate())
    expected = ["fsync file", "rename"] + (["fsync directory"] if os.name != "nt" else [])
    assert steps == expected
    if os.name == "posix":
        assert path.stat().st_mode & 0o777 == 0o600


CREATE_IDENTITY = """
import sys
from pathlib import Path
from mangogram_proto.keys import load_or_create_keypair
print(load_or_create_keypair(Path(sys.argv[1]))[0].public)
"""


def test_programs_creating_the_identity_at_once_all_get_the_one_on_disk(tmp_path):
    path = tmp_path / "identity.json"
    running = [
        subprocess.Popen(
            [sys.executable, "-c", CREATE_IDENTITY, str(path)],
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(4)
    ]
    publics = {p.communicate(timeout=PROCESS_TIMEOUT_S)[0].strip() for p in running}
    assert publics == {load_keypair(path).public}


# Settings: yes/no variables and keys are read strictly.

YES = ["1", "true", "TRUE", "Yes", "on", "ON"]
NO = ["0", "false", "False", "no", "NO", "off"]
NONSENSE = ["", "2", "maybe", "enable", " 1", "tru", "да"]


@pytest.mark.parametrize("word,expected", [(w, True) for w in YES] + [(w, False) for w in NO])
def test_broker_reads_plaintext_words_strictly(word, expected, monkeypatch):
    monkeypatch.setenv("MANGOGRAM_INSECURE_PLAINTEXT", word)
    assert parse_config([]).plaintext is expected


@pytest.mark.parametrize("word", NONSENSE)
def test_broker_refuses_a_plaintext_value_it_does_not_understand(word, monkeypatch, capsys):
    monkeypatch.setenv("MANGOGRAM_INSECURE_PLAINTEXT", word)
    with pytest.raises(SystemExit) as stopped:
        parse_config([])
    assert stopped.value.code == 2
    assert "MANGOGRAM_INSECURE_PLAINTEXT=" in capsys.readouterr().err


@pytest.mark.parametrize("word,expected", [(w, True) for w in YES] + [(w, False) for w in NO])
def test_sdk_reads_plaintext_words_strictly(word, expected, monkeypatch, tmp_path):
    monkeypatch.setenv("MANGOGRAM_INSECURE_PLAINTEXT", word)
    assert keys.plaintext_requested() is expected
    # "false" once meant plaintext, which is refused for a remote broker.
    security = keys.resolve_security(
        "tcp://127.0.0.1:5555", server_key=KeyPair.generate().public, config_dir=tmp_path
    )
    assert (security is None) is expected


def client_main(argv: list[str], capsys) -> tuple[int | str | None, str]:
    with pytest.raises(SystemExit) as stopped:
        client_cli.main(argv)
    return stopped.value.code, capsys.readouterr().err


SEND_ARGS = ["--server", "tcp://127.0.0.1:9", "--name", "a", "--to", "b", "--send", "hi"]


@pytest.mark.parametrize("word", NONSENSE)
def test_client_refuses_a_plaintext_value_it_does_not_understand(word, monkeypatch, capsys):
    monkeypatch.setenv("MANGOGRAM_INSECURE_PLAINTEXT", word)
    code, err = client_main(SEND_ARGS, capsys)
    assert code == 2
    assert "MANGOGRAM_INSECURE_PLAINTEXT=" in err and "not understood" in err


@pytest.mark.parametrize("argv", [["--server-key", ""], ["--server-key="], ["--server-key", " "]])
def test_client_refuses_an_empty_server_key(argv, monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("MANGOGRAM_INSECURE_PLAINTEXT", "0")
    monkeypatch.setenv("MANGOGRAM_CONFIG_DIR", str(tmp_path))
    code, err = client_main(SEND_ARGS + argv, capsys)
    assert code == 2
    assert "--server-key is empty" in err


def test_client_refuses_an_empty_server_key_variable(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("MANGOGRAM_INSECURE_PLAINTEXT", "0")
    monkeypatch.setenv("MANGOGRAM_CONFIG_DIR", str(tmp_path))
    monkeypatch.setenv("MANGOGRAM_SERVER_KEY", "")
    code, err = client_main(SEND_ARGS, capsys)
    assert code == 2
    assert "MANGOGRAM_SERVER_KEY is set but empty" in err


@pytest.mark.parametrize("given", ["", "  "])
def test_sdk_refuses_an_empty_server_key_instead_of_trusting_on_first_use(
    given, monkeypatch, tmp_path
):
    monkeypatch.setenv("MANGOGRAM_INSECURE_PLAINTEXT", "0")
    with pytest.raises(keys.ServerKeyError, match="empty"):
        keys.resolve_security("tcp://127.0.0.1:9", server_key=given, config_dir=tmp_path)
    monkeypatch.setenv("MANGOGRAM_SERVER_KEY", given)
    with pytest.raises(keys.ServerKeyError, match="MANGOGRAM_SERVER_KEY is set but empty"):
        keys.resolve_security("tcp://127.0.0.1:9", config_dir=tmp_path)
    assert not (tmp_path / "known_servers").exists()  # nothing was trusted


# Handshake failures: which ones end the connection attempt, and what they are called.

FAILED_NO_DETAIL = zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
FAILED_PROTOCOL = zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
SUCCEEDED = zmq.EVENT_HANDSHAKE_SUCCEEDED


@pytest.mark.parametrize(
    "events,verdicts,last",
    [
        ([FAILED_PROTOCOL], [True], FAILED_PROTOCOL),  # libzmq will not retry: final
        ([FAILED_NO_DETAIL, FAILED_NO_DETAIL], [False, True], FAILED_NO_DETAIL),
        ([FAILED_NO_DETAIL, FAILED_PROTOCOL], [False, True], FAILED_PROTOCOL),
        ([FAILED_NO_DETAIL, SUCCEEDED, FAILED_NO_DETAIL], [False, False, False], FAILED_NO_DETAIL),
    ],
)
def test_handshake_watch_gives_up_when_retrying_cannot_help(events, verdicts, last):
    watch = HandshakeWatch()
    assert [watch.note(e) for e in events] == verdicts
    assert watch.last_failure == last


def test_a_mechanism_mismatch_is_named_for_each_side():
    encrypted = keys.Security(KeyPair.generate().public, KeyPair.generate())
    endpoint = "tcp://127.0.0.1:5555"
    plaintext_client = keys.handshake_failure_message(endpoint, None, FAILED_PROTOCOL)
    assert "requires encryption" in plaintext_client
    encrypted_client = keys.handshake_failure_message(endpoint, encrypted, FAILED_PROTOCOL)
    assert "does not speak CurveZMQ" in encrypted_client
    wrong_key = keys.handshake_failure_message(endpoint, encrypted, FAILED_NO_DETAIL)
    assert "does not hold the expected key" in wrong_key
