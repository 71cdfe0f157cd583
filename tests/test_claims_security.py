"""Claims in docs/security.md that had no test behind them: the limits table's defaults,
and plaintext mode being refused away from loopback on both ends."""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from mangogram_broker import core, shell
from mangogram_broker.config import build_parser, parse_config
from mangogram_broker.core import Clock
from mangogram_client.cli import export_identity
from mangogram_proto import codec, constants
from mangogram_proto.keys import (
    KeyPair,
    KnownServers,
    ServerKeyError,
    fingerprint,
    is_loopback_endpoint,
    load_keypair,
    resolve_security,
    save_keypair,
)
from mangogram_proto.messages import Ping

from .conftest import BrokerProcess

ROOT = Path(__file__).resolve().parent.parent
SECURITY_MD = ROOT / "docs" / "security.md"


def limits_table() -> dict[str, tuple[str, str]]:
    """The rows of section 2's "Limits" table: what → (default, set with)."""
    text = SECURITY_MD.read_text(encoding="utf-8")
    section = text.split("### Limits", 1)[1].split("\n### ", 1)[0]
    rows = {}
    for line in section.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) == 4 and cells[0] not in ("What", "---"):
            rows[cells[0]] = (cells[1], cells[2])
    return rows


def thousands(value: int) -> str:
    return f"{value:,}"


@pytest.fixture
def defaults(monkeypatch):
    """The broker's configuration with no flags and no MANGOGRAM_* settings."""
    for name in list(os.environ):
        if name.startswith("MANGOGRAM_"):
            monkeypatch.delenv(name)
    return parse_config([])


def test_limits_table_defaults_are_the_brokers_defaults(defaults):
    rows = limits_table()
    limits = defaults.limits
    expected = {
        "`SEND`s per user name": [limits.rate_per_second, limits.rate_burst],
        "New names per IP address": [defaults.registrations_per_minute],
        "Users online at once": [defaults.max_sessions],
        "Error replies per connection": [core.ERROR_BURST, core.ERROR_RATE_PER_SECOND],
        "Frame size": [limits.max_frame_bytes],
        "JSON body": [limits.max_body_bytes],
        "Text": [limits.max_text_chars, limits.max_text_bytes],
        "Name": [limits.max_name_chars],
        "Message id": [constants.MAX_ID_CHARS],
        "Frames per message": [len(codec.encode(Ping())), constants.FRAME_COUNT_V2],
        "Unconfirmed messages per recipient": [limits.max_mailbox],
        "`HISTORY` page": [limits.max_history_page, defaults.max_history_bytes],
        "Other commands per connection": [
            *dataclasses.astuple(defaults.rates),
            core.COMMAND_BURST_SECONDS,
        ],
        "Silence before a session ends": [
            limits.heartbeat_timeout_ms,
            limits.heartbeat_interval_ms,
        ],
        "Queue towards one connection": [shell.SEND_QUEUE_PER_PEER],
        "Unconfirmed deliveries in flight per session": [core.DELIVERY_WINDOW],
    }
    for what, values in expected.items():
        assert what in rows, f"security.md's limits table lost its {what!r} row"
        default = rows[what][0]
        numbers = [int(n.replace(",", "")) for n in re.findall(r"\d[\d,]*", default)]
        for value in values:
            assert value in numbers, f"{what}: the doc says {default!r}, the broker uses {value}"


def test_limits_table_names_flags_and_constants_that_exist():
    rows = limits_table()
    flags = {flag for action in build_parser()._actions for flag in action.option_strings}
    modules = (constants, core, shell)
    for what, (default, set_with) in rows.items():
        for flag in re.findall(r"`(--[a-z-]+)`", set_with):
            assert flag in flags, f"{what}: {flag} is not a broker flag"
        for name in re.findall(r"`([A-Z][A-Z_]+)`", set_with):
            if name.startswith("ZMQ_"):
                continue  # libzmq's socket option, not a constant of ours
            holders = [m for m in modules if hasattr(m, name)]
            assert holders, f"{what}: no constant {name}"
            value = getattr(holders[0], name)
            numbers = [int(n.replace(",", "")) for n in re.findall(r"\d[\d,]*", default)]
            assert value in numbers, f"{what}: {name} is {value}, the doc says {default!r}"


def test_ref_id_limits_in_the_table_match_the_codec():
    default, _ = limits_table()["Message id"]
    # "`malformed`, with the id as `ref` up to 256 characters (`MAX_REF_CHARS`)" is in the
    # last column, which limits_table drops; read it from the raw line.
    line = next(
        line
        for line in SECURITY_MD.read_text(encoding="utf-8").splitlines()
        if line.startswith("| Message id |")
    )
    assert thousands(constants.MAX_REF_CHARS) in line and "MAX_REF_CHARS" in line
    assert thousands(constants.MAX_ID_CHARS) in default


@pytest.mark.parametrize(
    "endpoint",
    [
        "tcp://127.0.0.1:5555",
        "tcp://127.8.9.10:5555",  # all of 127.0.0.0/8
        "tcp://[::1]:5555",
        "tcp://localhost:5555",
        "ipc:///tmp/mangogram",
        "inproc://mangogram",
    ],
)
def test_loopback_endpoints_named_in_the_doc_allow_plaintext(endpoint):
    assert is_loopback_endpoint(endpoint)


@pytest.mark.parametrize(
    "endpoint",
    [
        "tcp://0.0.0.0:5555",
        "tcp://*:5555",
        "tcp://192.0.2.1:5555",
        "tcp://[::]:5555",
        "tcp://chat.example.org:5555",
        "tcp://localhost.example.org:5555",
        "udp://127.0.0.1:5555",
    ],
)
def test_other_endpoints_do_not_count_as_loopback(endpoint):
    assert not is_loopback_endpoint(endpoint)


def test_broker_refuses_plaintext_mode_on_a_non_loopback_bind(tmp_path):
    """security.md section 4: exit code 2 unless --bind is a loopback address. The address
    is from TEST-NET-1, never assigned to a host, so nothing can listen there even if the
    check went missing; the log line tells the refusal from a failed bind."""
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "broker.py"),
            "--insecure-plaintext",
            "--bind",
            "tcp://192.0.2.1:5555",
            "--data",
            str(tmp_path / "data"),
        ],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=ROOT,
    )
    assert proc.returncode == 2, proc.stderr
    assert "plaintext mode is allowed only on a loopback address" in proc.stderr
    assert "cannot listen" not in proc.stderr


def test_broker_in_plaintext_mode_says_so_in_its_log(broker):
    # The fixture's broker runs in plaintext mode on 127.0.0.1 (tests/conftest.py).
    assert (
        "PLAINTEXT MODE: no encryption and no identity checks; development only"
        in broker.log_text()
    )


def test_client_refuses_plaintext_to_a_remote_endpoint(tmp_path):
    """security.md section 6: a leftover MANGOGRAM_INSECURE_PLAINTEXT=1 cannot downgrade a
    connection to a remote server."""
    with pytest.raises(ServerKeyError, match="not a loopback address"):
        resolve_security("tcp://192.0.2.1:5555", plaintext=True, config_dir=tmp_path)
    assert list(tmp_path.iterdir()) == [], "nothing may be written for a refused endpoint"


def test_client_plaintext_on_loopback_is_allowed_with_a_warning(tmp_path, caplog):
    assert resolve_security("tcp://127.0.0.1:5555", plaintext=True, config_dir=tmp_path) is None
    assert "without encryption" in caplog.text


def test_every_test_the_docs_cite_exists_in_the_file_they_name():
    """Section 5's table (and any other citation) must name tests that exist, in the file
    the row names: a renamed test once left the table pointing at nothing."""
    tests = Path(__file__).resolve().parent
    defined = {
        path.name: set(re.findall(r"^(?:async )?def (test_\w+)", path.read_text("utf-8"), re.M))
        for path in tests.glob("test_*.py")
    }
    everywhere = set().union(*defined.values())
    for doc in (SECURITY_MD, ROOT / "README.md", ROOT / "docs" / "protocol.md"):
        for line in doc.read_text(encoding="utf-8").splitlines():
            cited = re.findall(r"`(test_\w+)`", line)
            files = re.findall(r"\((test_\w+\.py)\)", line)
            for name in cited:
                if name in defined or name + ".py" in defined:
                    continue  # a test file named as a module, not a test
                assert name in everywhere, f"{doc.name} cites {name}, which does not exist"
            for file, names in zip(files, _groups(line), strict=False):
                for name in names:
                    assert name in defined[file], f"{doc.name}: {name} is not in {file}"


def _groups(line: str) -> list[list[str]]:
    """For a table cell like "`a`, `b` (x.py), `c` (y.py)": [[a, b], [c]]."""
    return [re.findall(r"`(test_\w+)`", part) for part in re.split(r"\(test_\w+\.py\)", line)[:-1]]


ENCRYPTED = {"MANGOGRAM_INSECURE_PLAINTEXT": "0"}


@pytest.fixture
def secure_broker(tmp_path, monkeypatch):
    monkeypatch.setenv("MANGOGRAM_INSECURE_PLAINTEXT", "0")
    process = BrokerProcess(tmp_path / "broker-data", env=ENCRYPTED)
    yield process
    process.kill()
    assert "Traceback" not in process.log_text(), process.log_text()


def free_port() -> int:
    """A loopback port nothing listens on (bound and released at once)."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# Section 3: where the broker's key comes from.


def test_a_given_server_key_neither_reads_nor_writes_known_servers(tmp_path, monkeypatch):
    monkeypatch.delenv("MANGOGRAM_SERVER_KEY", raising=False)
    monkeypatch.setenv("MANGOGRAM_INSECURE_PLAINTEXT", "0")
    key = KeyPair.generate().public
    pinned = KeyPair.generate().public
    KnownServers(tmp_path / "known_servers").pin("tcp://127.0.0.1:5555", pinned)
    before = (tmp_path / "known_servers").read_bytes()
    given = resolve_security("tcp://127.0.0.1:5555", server_key=key, config_dir=tmp_path)
    assert given is not None and given.server_key == key  # not the pinned one
    monkeypatch.setenv("MANGOGRAM_SERVER_KEY", key)
    from_env = resolve_security("tcp://127.0.0.1:6000", config_dir=tmp_path)
    assert from_env is not None and from_env.server_key == key
    assert (tmp_path / "known_servers").read_bytes() == before  # nothing pinned


def test_a_pin_is_used_without_asking_the_discovery_port(tmp_path, monkeypatch):
    monkeypatch.delenv("MANGOGRAM_SERVER_KEY", raising=False)
    monkeypatch.setenv("MANGOGRAM_INSECURE_PLAINTEXT", "0")
    pinned = KeyPair.generate().public
    KnownServers(tmp_path / "known_servers").pin("tcp://127.0.0.1:5555", pinned)
    nobody = f"tcp://127.0.0.1:{free_port()}"
    found = resolve_security("tcp://127.0.0.1:5555", key_endpoint=nobody, config_dir=tmp_path)
    assert found is not None and found.server_key == pinned


def test_nothing_at_the_discovery_port_is_cannot_learn_the_key(tmp_path, monkeypatch):
    monkeypatch.delenv("MANGOGRAM_SERVER_KEY", raising=False)
    monkeypatch.setenv("MANGOGRAM_INSECURE_PLAINTEXT", "0")
    nobody = f"tcp://127.0.0.1:{free_port()}"
    with pytest.raises(ServerKeyError, match="cannot learn the key of tcp://127.0.0.1:5999"):
        resolve_security("tcp://127.0.0.1:5999", key_endpoint=nobody, config_dir=tmp_path)
    assert not (tmp_path / "known_servers").exists()


def test_trust_new_server_sees_the_brokers_fingerprint_and_decides(
    secure_broker, tmp_path, monkeypatch
):
    """security.md: trust_new_server=callback(endpoint, key, fingerprint) -> bool; pins
    are per endpoint string (localhost and 127.0.0.1 are two entries)."""
    monkeypatch.delenv("MANGOGRAM_SERVER_KEY", raising=False)
    monkeypatch.setenv("MANGOGRAM_INSECURE_PLAINTEXT", "0")
    endpoint = secure_broker.endpoint
    asked: list[tuple[str, str, str]] = []

    def refuse(*seen: str) -> bool:
        asked.append(seen)
        return False

    with pytest.raises(ServerKeyError, match="did not trust"):
        resolve_security(
            endpoint,
            key_endpoint=secure_broker.key_endpoint,
            trust_new_server=refuse,
            config_dir=tmp_path,
        )
    assert asked == [(endpoint, secure_broker.public_key, secure_broker.fingerprint)]
    assert KnownServers(tmp_path / "known_servers").lookup(endpoint) is None
    trusted = resolve_security(
        endpoint,
        key_endpoint=secure_broker.key_endpoint,
        trust_new_server=lambda *seen: True,
        config_dir=tmp_path,
    )
    assert trusted is not None and trusted.server_key == secure_broker.public_key
    assert KnownServers(tmp_path / "known_servers").lookup(endpoint) == secure_broker.public_key
    other_spelling = endpoint.replace("127.0.0.1", "localhost")
    assert KnownServers(tmp_path / "known_servers").lookup(other_spelling) is None
    asked.clear()
    with pytest.raises(ServerKeyError):
        resolve_security(
            other_spelling,
            key_endpoint=secure_broker.key_endpoint,
            trust_new_server=refuse,
            config_dir=tmp_path,
        )
    assert len(asked) == 1  # asked again for the other string
    assert fingerprint(secure_broker.public_key) == secure_broker.fingerprint


# Section 3: the identity file.


def test_mangogram_identity_names_the_key_file_for_the_sdk_and_the_export(tmp_path, monkeypatch):
    monkeypatch.delenv("MANGOGRAM_SERVER_KEY", raising=False)
    monkeypatch.setenv("MANGOGRAM_INSECURE_PLAINTEXT", "0")
    elsewhere = tmp_path / "keys" / "bot.json"
    elsewhere.parent.mkdir()
    monkeypatch.setenv("MANGOGRAM_IDENTITY", str(elsewhere))
    key = KeyPair.generate().public
    security = resolve_security("tcp://127.0.0.1:5555", server_key=key, config_dir=tmp_path)
    assert security is not None
    assert load_keypair(elsewhere) == security.identity
    assert not (tmp_path / "identity.json").exists()
    exported = tmp_path / "copy.json"
    assert export_identity(None, exported) == 0
    assert load_keypair(exported) == security.identity
    if os.name == "posix":
        assert exported.stat().st_mode & 0o777 == 0o600


# Section 4: operators.


def test_release_name_exits_1_when_no_key_owns_the_name(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "broker.py"),
            "--data",
            str(tmp_path / "data"),
            "--release-name",
            "nobody",
        ],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=ROOT,
    )
    assert proc.returncode == 1, proc.stderr
    assert "nobody is not owned by any key" in proc.stderr


@pytest.mark.skipif(os.name != "posix", reason="POSIX file modes")
def test_the_brokers_files_are_private_to_its_user(secure_broker):
    """The broker sets its umask to 077: the store (and its WAL) are its user's alone."""
    data = secure_broker.data_dir
    created = [p for p in data.iterdir() if p.name.startswith(("mangogram.sqlite3", "broker_"))]
    assert any(p.name == "mangogram.sqlite3" for p in created), created
    for path in created:
        assert path.stat().st_mode & 0o077 == 0, f"{path.name}: {oct(path.stat().st_mode)}"


@pytest.mark.skipif(os.name != "posix", reason="POSIX file modes")
def test_the_broker_refuses_a_key_file_others_can_read(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    save_keypair(data / "broker_key.json", KeyPair.generate())
    (data / "broker_key.json").chmod(0o644)
    proc = subprocess.run(
        [sys.executable, str(ROOT / "broker.py"), "--bind", "tcp://127.0.0.1:*", "--data",
         str(data)],
        capture_output=True, text=True, timeout=30, cwd=ROOT,
        env={**os.environ, **ENCRYPTED},
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert "readable by others" in proc.stderr
    assert "listening on" not in proc.stderr


# Section 2: identity is the key, on the pure core.


def keyed_core():
    from mangogram_broker.core import BrokerCore
    from mangogram_broker.store import MemoryStore

    from .harness import TEST_LIMITS

    return BrokerCore(TEST_LIMITS, store=MemoryStore(), require_keys=True), TEST_LIMITS


def test_the_right_resume_token_from_another_key_is_name_owned():
    """security.md: under encryption the resume token is only honoured for the owning key
    (the ownership check comes first)."""
    from mangogram_proto import codec
    from mangogram_proto.messages import Login, Welcome

    broker, _ = keyed_core()
    (welcome,) = broker.handle_frames(
        b"\x00\x00\x00\x00\x01", codec.encode(Login("alice")), Clock(1, 1), "A"
    )
    assert isinstance(welcome.message, Welcome)
    token = welcome.message.resume_token
    (refused,) = broker.handle_frames(
        b"\x00\x00\x00\x00\x02", codec.encode(Login("alice", resume_token=token)), Clock(2, 2), "B"
    )
    assert refused.message.code == "name_owned"
    (taken_over,) = broker.handle_frames(
        b"\x00\x00\x00\x00\x03", codec.encode(Login("alice", resume_token=token)), Clock(3, 3), "A"
    )
    assert isinstance(taken_over.message, Welcome)


def test_a_message_signed_by_another_key_does_not_keep_the_session_alive():
    """protocol.md section 4 and 8: such a message is dropped, and the session is not
    kept alive by it."""
    from mangogram_proto import codec
    from mangogram_proto.messages import Login, Ping, Presence

    broker, limits = keyed_core()
    alice, watcher = b"\x00\x00\x00\x00\x01", b"\x00\x00\x00\x00\x02"
    broker.handle_frames(alice, codec.encode(Login("alice")), Clock(0, 0), "A")
    broker.handle_frames(watcher, codec.encode(Login("watcher")), Clock(0, 0), "W")
    now = 0
    for _ in range(4):
        now += limits.heartbeat_timeout_ms // 2
        assert broker.handle_frames(alice, codec.encode(Ping()), Clock(now, now), "B") == []
        assert broker.handle_frames(alice, codec.encode(Ping()), Clock(now, now), None) == []
        broker.handle_frames(watcher, codec.encode(Ping()), Clock(now, now), "W")
        out = broker.expire(Clock(now, now))
        if out:
            break
    assert [o.message for o in out if o.peer == watcher] == [Presence("alice", "left", now)]


# Section 3: the key files' format.


def test_a_key_file_whose_public_key_is_not_its_secrets_is_refused(tmp_path):
    from mangogram_proto.keys import KeyFileError

    one, two = KeyPair.generate(), KeyPair.generate()
    path = tmp_path / "identity.json"
    save_keypair(path, KeyPair(one.public, two.secret))
    with pytest.raises(KeyFileError, match="does not belong to the secret key"):
        load_keypair(path)


def test_known_servers_is_the_documented_text_format(tmp_path):
    """One "endpoint key" line per endpoint under a comment header; lines that are not
    exactly that with a valid key are ignored; written with mode 0600."""
    path = tmp_path / "known_servers"
    key, other = KeyPair.generate().public, KeyPair.generate().public
    KnownServers(path).pin("tcp://chat.example.org:5555", key)
    lines = path.read_text(encoding="utf-8").splitlines()
    assert lines == [
        "# MangoGram pinned server keys: endpoint key",
        f"tcp://chat.example.org:5555 {key}",
    ]
    if os.name == "posix":
        assert path.stat().st_mode & 0o777 == 0o600
    with path.open("a", encoding="utf-8") as handle:
        handle.write(f"tcp://a:1 {other} extra\n")  # three fields
        handle.write("tcp://b:1 not-a-key\n")
        handle.write(f"# tcp://c:1 {other}\n")  # a comment
        handle.write(f"tcp://d:1 {other}\n")
    known = KnownServers(path)
    assert [known.lookup(e) for e in ("tcp://a:1", "tcp://b:1", "# tcp://c:1")] == [None] * 3
    assert known.lookup("tcp://d:1") == other
    assert known.lookup("tcp://chat.example.org:5555") == key


def test_the_identity_file_is_json_with_z85_public_and_secret(tmp_path, monkeypatch):
    import json

    monkeypatch.delenv("MANGOGRAM_IDENTITY", raising=False)
    monkeypatch.setenv("MANGOGRAM_INSECURE_PLAINTEXT", "0")
    key = KeyPair.generate().public
    resolve_security("tcp://127.0.0.1:5555", server_key=key, config_dir=tmp_path)
    data = json.loads((tmp_path / "identity.json").read_text(encoding="utf-8"))
    assert sorted(data) == ["public", "secret"]
    for value in data.values():
        assert len(value) == 40 and len(zmq_z85_decode(value)) == 32
    if os.name == "posix":
        assert (tmp_path / "identity.json").stat().st_mode & 0o777 == 0o600


def zmq_z85_decode(text: str) -> bytes:
    from zmq.utils import z85

    return z85.decode(text.encode("ascii"))
