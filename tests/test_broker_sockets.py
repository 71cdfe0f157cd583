"""The real broker process on loopback, spoken to by real DEALER sockets."""

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

from mangogram_proto import Client, codec
from mangogram_proto.constants import SIGNATURE_V2
from mangogram_proto.errors import BrokerRefused, ErrorCode
from mangogram_proto.events import MessageDelivered
from mangogram_proto.messages import (
    Deliver,
    Error,
    Login,
    Online,
    Ping,
    Pong,
    Presence,
    Send,
    Welcome,
    Who,
)

from .conftest import ROOT, BrokerProcess, dealer, posix_signals

pytestmark = pytest.mark.sockets


def recv(sock: zmq.Socket, timeout_ms: int = 5000):
    assert sock.poll(timeout_ms), "no reply from the broker"
    return codec.decode(sock.recv_multipart())


def recv_until(sock: zmq.Socket, kind: type, timeout_s: float = 5.0):
    """Receive until a message of `kind` arrives (others are skipped)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        message = recv(sock, int((deadline - time.monotonic()) * 1000) + 1)
        if isinstance(message, kind):
            return message
    raise AssertionError(f"no {kind.__name__} within {timeout_s} s")


def raw_login(zctx, broker, name: str) -> zmq.Socket:
    sock = dealer(zctx, broker.endpoint)
    sock.send_multipart(codec.encode(Login(name)))
    reply = recv(sock)
    assert isinstance(reply, Welcome), reply
    return sock


def test_three_users_chat_privately_in_many_scripts(broker, zctx):
    texts = {
        ("Олена", "Тарас"): "Привіт, Тарасе! Як справи? Ґанок, їжак, є 🌻",
        ("Тарас", "Mei美"): "Hello Mei — 你好! 👋🏽 mixed: Київ/東京/Zürich",
        ("Mei美", "Олена"): "🥭🥭 مرحبا · שלום · नमस्ते · 𝔘𝔫𝔦𝔠𝔬𝔡𝔢",
        ("Олена", "Mei美"): "Дякую! 🇺🇦 e\u0301 ≠ é, ﬁ, ＡＢＣ",
    }
    names = ["Олена", "Тарас", "Mei美"]
    clients = {name: Client(name, broker.endpoint, context=zctx) for name in names}
    try:
        for client in clients.values():
            client.login(timeout=5)
        before = time.time_ns() // 1_000_000
        sent_ids = {
            pair: clients[pair[0]].send(pair[1], text, wait=True) for pair, text in texts.items()
        }
        for name in names:
            expected = [(s, t) for (s, r), t in texts.items() if r == name]
            got = [clients[name].receive(timeout=5) for _ in expected]
            assert [(m.sender, m.text) for m in got] == expected
            for message in got:
                assert message.id == sent_ids[(message.sender, name)]
                assert before <= message.sent_at <= message.accepted_at
                assert message.accepted_at <= time.time_ns() // 1_000_000
            # nothing meant for someone else leaked here
            assert clients[name].receive(timeout=0.3) is None
        for sender, recipient in texts:
            event = _wait_event(clients[sender], MessageDelivered)
            assert event.to == recipient
    finally:
        for client in clients.values():
            client.close()


def _wait_event(client: Client, kind: type, timeout: float = 5.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        event = client.next_event(timeout=deadline - time.monotonic())
        if isinstance(event, kind):
            return event
    raise AssertionError(f"no {kind.__name__}")


def test_messages_arrive_in_order_with_increasing_timestamps(broker, zctx):
    with (
        Client("sender", broker.endpoint, context=zctx) as sender,
        Client("receiver", broker.endpoint, context=zctx) as receiver,
    ):
        ids = [sender.send("receiver", f"#{i} ї", wait=False) for i in range(100)]
        got = [receiver.receive(timeout=5) for _ in ids]
        assert [m.id for m in got] == ids
        stamps = [m.accepted_at for m in got]
        assert stamps == sorted(stamps)


def test_presence_joined_left_and_who(broker, zctx):
    watcher = raw_login(zctx, broker, "watcher")
    with Client("Богдана", broker.endpoint, context=zctx) as bohdana:
        joined = recv_until(watcher, Presence)
        assert (joined.name, joined.event) == ("Богдана", "joined")
        watcher.send_multipart(codec.encode(Who()))
        online = recv_until(watcher, Online)
        assert set(online.users) == {"watcher", "Богдана"}
        assert set(bohdana.online_users()) == {"watcher", "Богдана"}
    left = recv_until(watcher, Presence)
    assert (left.name, left.event) == ("Богдана", "left")
    watcher.close()


def test_duplicate_name_is_refused_across_case(broker, zctx):
    with Client("Олена", broker.endpoint, context=zctx):
        second = Client("ОЛЕНА", broker.endpoint, context=zctx)
        with pytest.raises(BrokerRefused) as caught:
            second.login(timeout=5)
        assert caught.value.code is ErrorCode.NAME_TAKEN
        second.close()


CHILD_CLIENT = """
import sys, time
from mangogram_proto import Client
client = Client(sys.argv[2], sys.argv[1])
client.login(timeout=10)
print("online", flush=True)
while True:
    client.poll(1.0)
"""


def start_child_client(broker: BrokerProcess, name: str) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD_CLIENT, broker.endpoint, name],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "online"
    return proc


def test_killed_client_goes_offline_at_once_and_can_log_in_again(broker, zctx):
    watcher = raw_login(zctx, broker, "watcher")
    child = start_child_client(broker, "Оксана")
    assert recv_until(watcher, Presence).event == "joined"
    started = time.monotonic()
    child.kill()
    child.wait(5)
    left = recv_until(watcher, Presence, timeout_s=5)
    detected_s = time.monotonic() - started
    assert (left.name, left.event) == ("Оксана", "left")
    # a closed TCP connection is noticed without waiting for the heartbeat timeout
    print(f"kill -9 detected in {detected_s * 1000:.0f} ms")
    with Client("оксана", broker.endpoint, context=zctx) as again:
        assert again.name == "оксана"
    watcher.close()


@pytest.mark.skipif(not hasattr(signal, "SIGSTOP"), reason="needs POSIX job control")
def test_frozen_client_is_expired_by_heartbeat(broker, zctx):
    watcher = dealer(zctx, broker.endpoint)
    watcher.send_multipart(codec.encode(Login("watcher")))
    assert isinstance(recv(watcher), Welcome)
    child = start_child_client(broker, "frozen")
    assert recv_until(watcher, Presence).event == "joined"
    os.kill(child.pid, signal.SIGSTOP)
    try:
        started = time.monotonic()
        # keep the watcher alive with pings while waiting for the frozen one to expire
        deadline = started + 10
        left = None
        while time.monotonic() < deadline and left is None:
            watcher.send_multipart(codec.encode(Ping()))
            if watcher.poll(200):
                message = codec.decode(watcher.recv_multipart())
                if isinstance(message, Presence) and message.event == "left":
                    left = message
        assert left is not None and left.name == "frozen"
        elapsed = time.monotonic() - started
        assert elapsed >= 0.8  # not before the 1 s heartbeat timeout
        print(f"frozen client expired after {elapsed * 1000:.0f} ms")
        assert broker.wait_for_log("frozen is offline \\(heartbeat timeout")
    finally:
        os.kill(child.pid, signal.SIGCONT)
        child.kill()
        child.wait(5)
    watcher.close()


def malformed_inputs() -> list[tuple[str, list[bytes]]]:
    send = json.dumps({"id": "m1", "to": "honest", "text": "hi", "sent_at": 1}).encode()
    return [
        ("empty frame", [b""]),
        ("one frame", [b"hello"]),
        ("two frames", [SIGNATURE_V2, b"PING"]),
        ("many frames", [SIGNATURE_V2, b"PING", b"{}"] + [b"x"] * 1000),
        ("bad signature", [b"GET / HTTP/1.1", b"PING", b"{}"]),
        ("future version", [b"MGP99", b"PING", b"{}"]),
        ("unknown command", [SIGNATURE_V2, b"DROP TABLE", b"{}"]),
        ("invalid utf-8", [SIGNATURE_V2, b"LOGIN", b'{"name":"\xc3\x28"}']),
        ("invalid json", [SIGNATURE_V2, b"LOGIN", b'{"name":']),
        ("json not object", [SIGNATURE_V2, b"LOGIN", b"[1,2,3]"]),
        ("missing field", [SIGNATURE_V2, b"LOGIN", b"{}"]),
        ("mistyped field", [SIGNATURE_V2, b"LOGIN", b'{"name":42}']),
        ("command before login", [SIGNATURE_V2, b"SEND", send]),
        ("nested bomb", [SIGNATURE_V2, b"LOGIN", b"[" * 30000]),
        ("surrogate name", [SIGNATURE_V2, b"LOGIN", b'{"name":"\\udc00"}']),
        ("oversized body", [SIGNATURE_V2, b"LOGIN", b'{"name":"' + b"a" * 40000 + b'"}']),
        ("control name", [SIGNATURE_V2, b"LOGIN", b'{"name":"a\\u0000b"}']),
        # Version 3, one frame.
        ("v3 no separator", [b"MGP03PING"]),
        ("v3 empty command", [b"MGP03 {}"]),
        ("v3 extra frames", [b"MGP03PING {}", b"{}"]),
        ("v3 in three frames", [b"MGP03", b"PING", b"{}"]),
        ("v3 future version", [b"MGP04PING {}"]),
        ("v3 unknown command", [b"MGP03DROP TABLE {}"]),
        ("v3 trailing bytes", [b'MGP03LOGIN {"name":"x"} {}']),
        ("v3 oversized body", [b'MGP03LOGIN {"name":"' + b"a" * 40000 + b'"}']),
    ]


@pytest.mark.parametrize("label,frames", malformed_inputs(), ids=[m[0] for m in malformed_inputs()])
def test_malformed_input_is_answered_and_honest_clients_still_served(broker, zctx, label, frames):
    honest = raw_login(zctx, broker, "honest")
    attacker = dealer(zctx, broker.endpoint)
    attacker.send_multipart(frames)
    reply = recv(attacker)
    assert isinstance(reply, Error), reply
    assert reply.code in {c.value for c in ErrorCode}
    assert reply.message
    honest.send_multipart(codec.encode(Ping()))
    assert isinstance(recv(honest), Pong)
    with Client("other", broker.endpoint, context=zctx) as other:
        other.send("honest", "still working ✓", wait=True)
    assert recv_until(honest, Deliver).text == "still working ✓"
    honest.close()
    attacker.close()


def test_frame_just_under_the_transport_limit_gets_an_answer(broker, zctx):
    near = dealer(zctx, broker.endpoint)
    near.send_multipart([SIGNATURE_V2, b"LOGIN", b"x" * (65536 - 1)])
    reply = recv(near)
    assert isinstance(reply, Error) and reply.code == "too_large"  # the body limit speaks
    near.close()


def test_an_oversized_send_is_refused_with_its_id_so_it_is_not_resent(broker, zctx):
    alice = raw_login(zctx, broker, "alice")
    body = json.dumps({"id": "too-big-1", "to": "alice", "text": "x" * 40000, "sent_at": 1})
    alice.send_multipart([SIGNATURE_V2, b"SEND", body.encode()])
    reply = recv(alice)
    assert isinstance(reply, Error)
    assert (reply.code, reply.ref) == ("too_large", "too-big-1")
    alice.close()


def test_oversized_frame_drops_only_that_connection(broker, zctx):
    honest = raw_login(zctx, broker, "honest")
    attacker = dealer(zctx, broker.endpoint)
    attacker.send_multipart([SIGNATURE_V2, b"LOGIN", b"x" * 100_000])
    assert not attacker.poll(500)  # libzmq cut the connection: no reply is possible
    honest.send_multipart(codec.encode(Ping()))
    assert isinstance(recv(honest), Pong)
    honest.close()
    attacker.close()


def test_client_chosen_routing_id_cannot_hijack_a_session(broker, zctx):
    victim = raw_login(zctx, broker, "victim")
    mallory = zctx.socket(zmq.DEALER)
    mallory.setsockopt(zmq.LINGER, 0)
    mallory.setsockopt(zmq.ROUTING_ID, b"\x00\x00\x00\x00\x01")
    mallory.connect(broker.endpoint)
    mallory.send_multipart(codec.encode(Send("x", "victim", "I am you", 1)))
    mallory_reply = recv(mallory)
    assert isinstance(mallory_reply, Error)
    assert mallory_reply.code in ("routing_id_refused", "not_logged_in")
    named = zctx.socket(zmq.DEALER)
    named.setsockopt(zmq.LINGER, 0)
    named.setsockopt(zmq.ROUTING_ID, b"victim")
    named.connect(broker.endpoint)
    named.send_multipart(codec.encode(Login("mallory")))
    assert recv(named).code == "routing_id_refused"
    victim.send_multipart(codec.encode(Ping()))
    assert isinstance(recv(victim), Pong)
    for sock in (victim, mallory, named):
        sock.close()


def chosen_id_dealer(zctx, broker, routing_id: bytes) -> zmq.Socket:
    sock = zctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.ROUTING_ID, routing_id)
    sock.connect(broker.endpoint)
    return sock


@pytest.mark.parametrize(
    "routing_id",
    [
        b"victim",
        b"\x01\x02\x03\x04\x05",  # five bytes, but not starting with 0
        b"\x00\x01\x02\x03",  # starts with 0, four bytes
        b"\x00\x01\x02\x03\x04\x05",  # starts with 0, six bytes
        b"\x00",
        b"\xff" * 255,
    ],
    ids=lambda r: r.hex()[:12],
)
def test_every_routing_id_not_shaped_like_libzmqs_own_is_refused(broker, zctx, routing_id):
    sock = chosen_id_dealer(zctx, broker, routing_id)
    try:
        sock.send_multipart(codec.encode(Login("chooser")))
        reply = recv(sock)
        assert isinstance(reply, Error) and reply.code == "routing_id_refused"
    finally:
        sock.close()


def test_a_chosen_id_shaped_like_libzmqs_own_cannot_be_told_apart(broker, zctx):
    # Five bytes starting with 0 is the shape libzmq generates; the broker sees nothing
    # else, so such an id is served (protocol.md section 1 says never to choose one).
    sock = chosen_id_dealer(zctx, broker, b"\x00\x01\x02\x03\x04")
    try:
        sock.send_multipart(codec.encode(Login("lookalike")))
        assert isinstance(recv(sock), Welcome)
    finally:
        sock.close()


def test_sigterm_stops_the_broker_cleanly(tmp_path):
    process = BrokerProcess(tmp_path / "data")
    assert process.terminate(timeout=10) == 0  # the bound only keeps a hang from blocking
    assert "stopped" in process.log_text()


@posix_signals
def test_sigint_stops_the_broker(tmp_path):
    process = BrokerProcess(tmp_path / "data")
    process.proc.send_signal(signal.SIGINT)
    assert process.proc.wait(5) == 0


def test_broker_help_documents_flags_and_environment():
    out = subprocess.run(
        [sys.executable, str(ROOT / "broker.py"), "--help"],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    ).stdout
    for word in (
        "--bind",
        "MANGOGRAM_BIND",
        "--data",
        "MANGOGRAM_DATA",
        "--log-level",
        "MANGOGRAM_LOG_LEVEL",
        "--max-text-chars",
        "--heartbeat-timeout-ms",
        "--rate-per-second",
    ):
        assert word in out


def test_environment_variables_configure_the_broker(tmp_path):
    env = dict(os.environ, MANGOGRAM_MAX_TEXT_CHARS="7")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "broker.py"), "--help"],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
        env=env,
    )
    assert "default: 7" in proc.stdout


def test_broker_refuses_a_busy_port_clearly(broker, tmp_path):
    port_in_use = broker.endpoint
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "broker.py"),
            "--bind",
            port_in_use,
            "--data",
            str(tmp_path / "d2"),
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 2
    assert "cannot listen" in proc.stderr


@pytest.mark.skipif(not Path("/proc/self/limits").exists(), reason="reads /proc (Linux)")
def test_broker_raises_its_open_file_limit(tmp_path):
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))  # the broker inherits this
    try:
        process = BrokerProcess(tmp_path / "data")
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    try:
        limits = Path(f"/proc/{process.proc.pid}/limits").read_text()
        (line,) = [row for row in limits.splitlines() if row.startswith("Max open files")]
        wanted = 65536 if hard == resource.RLIM_INFINITY else min(hard, 65536)
        assert int(line.split()[3]) >= wanted > 256
    finally:
        process.kill()
