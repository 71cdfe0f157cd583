"""Attacks on an encrypted broker, one test each, with the honest client still served.

The broker here runs as shipped: CurveZMQ on, names owned by keys. Each client gets its
own config dir (its own identity and pinned keys), as separate machines would."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import zmq

from mangogram_proto import BrokerRefused, Client, ErrorCode, codec
from mangogram_proto.keys import (
    KeyFileError,
    KeyPair,
    ServerKeyError,
    fingerprint,
    load_keypair,
    save_keypair,
)
from mangogram_proto.messages import Login, Ping, Pong, Send

from .conftest import ROOT, BrokerProcess, posix_signals, wait_for_line

pytestmark = pytest.mark.sockets

ENCRYPTED = {"MANGOGRAM_INSECURE_PLAINTEXT": "0"}


@pytest.fixture
def secure_broker(tmp_path, monkeypatch):
    monkeypatch.setenv("MANGOGRAM_INSECURE_PLAINTEXT", "0")
    broker = BrokerProcess(tmp_path / "broker-data", env=ENCRYPTED)
    monkeypatch.setenv("MANGOGRAM_KEY_ENDPOINT", broker.key_endpoint)
    yield broker
    broker.kill()
    assert "Traceback" not in broker.log_text(), broker.log_text()


def machine(tmp_path: Path, who: str, monkeypatch) -> Path:
    """A config dir of its own, as on another computer."""
    directory = tmp_path / f"machine-{who}"
    monkeypatch.setenv("MANGOGRAM_CONFIG_DIR", str(directory))
    return directory


def curve_dealer(zctx, broker: BrokerProcess, identity: KeyPair | None = None) -> zmq.Socket:
    identity = identity or KeyPair.generate()
    sock = zctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.CURVE_SERVERKEY, broker.public_key.encode())
    sock.setsockopt(zmq.CURVE_PUBLICKEY, identity.public.encode())
    sock.setsockopt(zmq.CURVE_SECRETKEY, identity.secret.encode())
    sock.connect(broker.endpoint)
    return sock


def reply(sock: zmq.Socket, timeout_ms: int = 5000):
    assert sock.poll(timeout_ms), "no reply"
    return codec.decode(sock.recv_multipart())


def test_first_use_trust_pins_the_key_and_chat_is_encrypted(
    secure_broker, tmp_path, monkeypatch, zctx
):
    alice_dir = machine(tmp_path, "alice", monkeypatch)
    with Client("alice", secure_broker.endpoint, context=zctx) as alice:
        assert alice.security is not None
        assert alice.security.server_key == secure_broker.public_key
        pinned = (alice_dir / "known_servers").read_text()
        assert f"{secure_broker.endpoint} {secure_broker.public_key}" in pinned
        assert fingerprint(secure_broker.public_key) == secure_broker.fingerprint
        machine(tmp_path, "bob", monkeypatch)
        with Client("bob", secure_broker.endpoint, context=zctx) as bob:
            alice.send("bob", "таємниця 🔐", wait=True)
            message = bob.receive(timeout=5)
            assert (message.sender, message.text) == ("alice", "таємниця 🔐")


def count_sockets_opened(monkeypatch) -> list[int]:
    """The times `Client` opened a socket (each reconnect opens a new one)."""
    opened: list[int] = []
    real_open = Client._open

    def counting_open(self, now):
        opened.append(now)
        real_open(self, now)

    monkeypatch.setattr(Client, "_open", counting_open)
    return opened


def test_plaintext_client_gets_a_clear_error_not_silence(
    secure_broker, tmp_path, monkeypatch, zctx
):
    machine(tmp_path, "dev", monkeypatch)
    opened = count_sockets_opened(monkeypatch)
    client = Client("dev", secure_broker.endpoint, context=zctx, plaintext=True)
    with pytest.raises(ServerKeyError, match="requires encryption"):
        client.login(timeout=20)
    assert len(opened) == 1  # refused on the first socket, not retried until the timeout


def test_encrypted_client_meeting_a_plaintext_broker_is_told_so_without_reconnecting(
    broker, tmp_path, monkeypatch, zctx
):
    # `broker` runs in plaintext. libzmq never retries after the PROTOCOL failure this
    # gives, so the SDK must decide on that one failure instead of waiting for silence.
    machine(tmp_path, "careful", monkeypatch)
    opened = count_sockets_opened(monkeypatch)
    key = KeyPair.generate().public
    client = Client("careful", broker.endpoint, context=zctx, plaintext=False, server_key=key)
    # libzmq reports the mismatch as PROTOCOL (said plainly) or, at random, as failures
    # without detail, which cannot be told from a wrong key (both named in that message).
    with pytest.raises(ServerKeyError, match="does not speak CurveZMQ|runs without encryption"):
        client.login(timeout=30)
    assert len(opened) == 1  # decided on the first socket, not after a silent reconnect
    client.close()


def test_wrong_server_key_is_a_clear_error_not_a_retry_loop(
    secure_broker, tmp_path, monkeypatch, zctx
):
    machine(tmp_path, "victim", monkeypatch)
    impostor_key = KeyPair.generate().public
    opened = count_sockets_opened(monkeypatch)
    client = Client("victim", secure_broker.endpoint, context=zctx, server_key=impostor_key)
    with pytest.raises(ServerKeyError, match="does not hold the expected key"):
        client.login(timeout=20)
    assert len(opened) == 1  # decided on the first socket, not retried until the timeout


def test_changed_server_key_is_refused_loudly(tmp_path, monkeypatch, zctx):
    monkeypatch.setenv("MANGOGRAM_INSECURE_PLAINTEXT", "0")
    machine(tmp_path, "alice", monkeypatch)
    first = BrokerProcess(tmp_path / "first", env=ENCRYPTED)
    monkeypatch.setenv("MANGOGRAM_KEY_ENDPOINT", first.key_endpoint)
    endpoint = first.endpoint
    with Client("alice", endpoint, context=zctx):
        pass  # pinned now
    first.kill()
    # someone else answers at the same address, with another key
    # (its key port anywhere free: port + 1 may have been taken meanwhile on a busy machine)
    second = BrokerProcess(
        tmp_path / "impostor", "--key-bind", "tcp://127.0.0.1:*", bind=endpoint, env=ENCRYPTED
    )
    try:
        assert second.public_key != first.public_key
        client = Client("alice", endpoint, context=zctx)
        with pytest.raises(ServerKeyError, match="known_servers"):
            client.login(timeout=20)
    finally:
        second.kill()


def test_a_registered_name_cannot_be_taken_with_another_key(
    secure_broker, tmp_path, monkeypatch, zctx
):
    machine(tmp_path, "alice", monkeypatch)
    with Client("Alice", secure_broker.endpoint, context=zctx):
        pass  # Alice's key now owns the name
    machine(tmp_path, "mallory", monkeypatch)
    mallory = Client("ALICE", secure_broker.endpoint, context=zctx)
    with pytest.raises(BrokerRefused) as caught:
        mallory.login(timeout=10)
    assert caught.value.code is ErrorCode.NAME_OWNED
    mallory.close()
    machine(tmp_path, "alice", monkeypatch)
    with Client("alice", secure_broker.endpoint, context=zctx) as alice_again:
        assert alice_again.is_online


def test_operator_releases_a_name_whose_key_was_lost(secure_broker, tmp_path, monkeypatch, zctx):
    machine(tmp_path, "old", monkeypatch)
    with Client("Тарас", secure_broker.endpoint, context=zctx):
        pass
    released = subprocess.run(
        [sys.executable, str(ROOT / "broker.py"), "--data", str(secure_broker.data_dir),
         "--release-name", "ТАРАС"],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert released.returncode == 0, released.stderr
    machine(tmp_path, "new", monkeypatch)
    with Client("Тарас", secure_broker.endpoint, context=zctx) as taras:
        assert taras.is_online


def test_exported_identity_carries_the_name_to_another_machine(
    secure_broker, tmp_path, monkeypatch, zctx
):
    first = machine(tmp_path, "laptop", monkeypatch)
    with Client("Олена", secure_broker.endpoint, context=zctx):
        pass
    exported = tmp_path / "olena.identity"
    done = subprocess.run(
        [sys.executable, str(ROOT / "client.py"), "--export-identity", str(exported)],
        capture_output=True, text=True, timeout=30,
        env={**os.environ, "MANGOGRAM_CONFIG_DIR": str(first)},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    if os.name == "posix":  # Windows: the user profile's ACL protects it (docs/security.md)
        assert oct(exported.stat().st_mode & 0o777) == "0o600"
    machine(tmp_path, "desktop", monkeypatch)
    with Client("олена", secure_broker.endpoint, context=zctx, identity=exported) as olena:
        assert olena.is_online


@pytest.mark.skipif(os.name != "posix", reason="POSIX permissions")
def test_secret_keys_are_private_files(secure_broker, tmp_path, monkeypatch, zctx):
    directory = machine(tmp_path, "me", monkeypatch)
    with Client("me", secure_broker.endpoint, context=zctx):
        pass
    for path in (secure_broker.data_dir / "broker_key.json", directory / "identity.json"):
        assert oct(path.stat().st_mode & 0o777) == "0o600", path
    leaky = tmp_path / "leaky.json"
    save_keypair(leaky, KeyPair.generate())
    leaky.chmod(0o644)
    with pytest.raises(KeyFileError, match="readable by others"):
        load_keypair(leaky)


def test_identity_comes_from_the_key_not_the_payload(secure_broker, tmp_path, monkeypatch, zctx):
    machine(tmp_path, "bob", monkeypatch)
    with Client("bob", secure_broker.endpoint, context=zctx) as bob:
        mallory = curve_dealer(zctx, secure_broker)
        mallory.send_multipart(codec.encode(Login("mallory")))
        assert reply(mallory).COMMAND == "WELCOME"
        body = {"id": "x1", "to": "bob", "text": "I am alice", "sent_at": 1, "sender": "alice"}
        mallory.send_multipart([b"MGP02", b"SEND", json.dumps(body).encode()])
        message = bob.receive(timeout=5)
        assert message.sender == "mallory"
        mallory.close()


def test_routing_id_hijack_is_refused_under_encryption(secure_broker, tmp_path, monkeypatch, zctx):
    machine(tmp_path, "victim", monkeypatch)
    with Client("victim", secure_broker.endpoint, context=zctx) as victim:
        hijacker = zctx.socket(zmq.DEALER)
        hijacker.setsockopt(zmq.ROUTING_ID, b"victim")
        hijacker.setsockopt(zmq.LINGER, 0)
        pair = KeyPair.generate()
        hijacker.setsockopt(zmq.CURVE_SERVERKEY, secure_broker.public_key.encode())
        hijacker.setsockopt(zmq.CURVE_PUBLICKEY, pair.public.encode())
        hijacker.setsockopt(zmq.CURVE_SECRETKEY, pair.secret.encode())
        hijacker.connect(secure_broker.endpoint)
        hijacker.send_multipart(codec.encode(Send("x", "victim", "hi", 1)))
        assert reply(hijacker).code == "routing_id_refused"
        hijacker.close()
        assert victim.online_users() == ("victim",)


def test_flood_from_one_user_does_not_stop_others(secure_broker, tmp_path, monkeypatch, zctx):
    machine(tmp_path, "honest", monkeypatch)
    with (
        Client("alice", secure_broker.endpoint, context=zctx) as alice,
        Client("bob", secure_broker.endpoint, context=zctx) as bob,
    ):
        flooder = curve_dealer(zctx, secure_broker)
        flooder.send_multipart(codec.encode(Login("flooder")))
        assert reply(flooder).COMMAND == "WELCOME"
        limited = 0
        deadline = time.monotonic() + 30
        for i in range(3000):  # bounded in count and in time
            if time.monotonic() > deadline:
                break
            flooder.send_multipart(codec.encode(Send(f"f{i}", "alice", "spam", 1)), zmq.NOBLOCK)
            while flooder.poll(0):
                answer = codec.decode(flooder.recv_multipart())
                limited += getattr(answer, "code", "") == "rate_limited"
            if i % 500 == 0:
                bob.send("alice", f"still here {i}", wait=True, timeout=10)
        assert limited > 0
        texts = {m.text for m in alice.messages(timeout=1) if m.sender == "bob"}
        assert {f"still here {i}" for i in range(0, 3000, 500)} <= texts
        flooder.close()


@posix_signals  # SIGSTOP freezes the listener
def test_frozen_receiver_does_not_stall_anyone(secure_broker, tmp_path, monkeypatch, zctx):
    frozen_dir = machine(tmp_path, "frozen", monkeypatch)
    env = {**os.environ, "MANGOGRAM_CONFIG_DIR": str(frozen_dir)}
    listener = subprocess.Popen(
        [sys.executable, str(ROOT / "client.py"), "--server", secure_broker.endpoint,
         "--name", "sleepy", "--listen", "--json"],
        env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, encoding="utf-8",
    )  # fmt: skip
    try:
        lines = wait_for_line(listener.stderr, "listening as sleepy")
        assert any("trusting" in line and "first use" in line for line in lines)
        listener.send_signal(signal.SIGSTOP)
        machine(tmp_path, "others", monkeypatch)
        with (
            Client("alice", secure_broker.endpoint, context=zctx) as alice,
            Client("bob", secure_broker.endpoint, context=zctx) as bob,
        ):
            for i in range(150):
                alice.send("sleepy", f"for later {i}")
            for i in range(5):
                alice.send("bob", f"live {i}", wait=True)
                assert bob.receive(timeout=5).text == f"live {i}"
            while alice.session.unacknowledged:
                alice.poll(0.1)
        listener.send_signal(signal.SIGCONT)
        got = [json.loads(listener.stdout.readline())["text"] for _ in range(150)]
        assert got == [f"for later {i}" for i in range(150)]
    finally:
        listener.send_signal(signal.SIGCONT)
        listener.kill()
        listener.wait(10)


def test_ping_still_answered_after_every_attack(secure_broker, zctx):
    honest = curve_dealer(zctx, secure_broker)
    honest.send_multipart(codec.encode(Login("honest")))
    assert reply(honest).COMMAND == "WELCOME"
    honest.send_multipart(codec.encode(Ping()))
    assert isinstance(reply(honest), Pong)
    honest.close()


@pytest.mark.skipif(sys.platform != "linux", reason="only Linux answers all of 127/8 on lo")
def test_new_names_are_limited_per_source_address(secure_broker, zctx):
    # The shell reads each LOGIN's Peer-Address for the core's per-address limit (10 new
    # names a minute by default): 127.0.0.1 runs out, 127.0.0.2 is another address.
    def login_from(source: str, name: str) -> str:
        sock = zctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        identity = KeyPair.generate()
        sock.setsockopt(zmq.CURVE_SERVERKEY, secure_broker.public_key.encode())
        sock.setsockopt(zmq.CURVE_PUBLICKEY, identity.public.encode())
        sock.setsockopt(zmq.CURVE_SECRETKEY, identity.secret.encode())
        host_port = secure_broker.endpoint.removeprefix("tcp://")
        sock.connect(f"tcp://{source}:0;{host_port}")  # libzmq's source-address form
        try:
            sock.send_multipart(codec.encode(Login(name)))
            answer = reply(sock)
            return answer.COMMAND if answer.COMMAND == "WELCOME" else answer.code
        finally:
            sock.close()

    first = [login_from("127.0.0.1", f"local{i}") for i in range(11)]
    assert first[:10] == ["WELCOME"] * 10 and first[10] == "rate_limited"
    assert login_from("127.0.0.2", "neighbour") == "WELCOME"
