"""The real broker on loopback: refused SENDs are answered, misbehaving connections are
disconnected, and a connection that asks without reading is held to a bounded cost."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import zmq

from mangogram_proto import codec
from mangogram_proto.messages import (
    Accepted,
    Deliver,
    Error,
    Goodbye,
    History,
    Leave,
    Login,
    Ping,
    Pong,
    Send,
    Welcome,
)

from .conftest import ROOT, BrokerProcess, dealer

pytestmark = pytest.mark.sockets

# The broker fixture's 1 s heartbeat timeout would end sessions that are busy waiting.
RELAXED = ("--heartbeat-interval-ms", "1000", "--heartbeat-timeout-ms", "60000")
OPEN_SEND_RATE = ("--rate-per-second", "100000", "--rate-burst", "100000")


def recv(sock: zmq.Socket, timeout_ms: int = 5000):
    assert sock.poll(timeout_ms), "no reply from the broker"
    return codec.decode(sock.recv_multipart())


def login(zctx, broker: BrokerProcess, name: str, timeout_ms: int = 5000) -> zmq.Socket:
    sock = dealer(zctx, broker.endpoint)
    sock.send_multipart(codec.encode(Login(name)))
    reply = recv(sock, timeout_ms)
    assert isinstance(reply, Welcome), reply
    return sock


def register(zctx, broker: BrokerProcess, name: str) -> None:
    """`name` exists and is offline."""
    sock = login(zctx, broker, name)
    sock.send_multipart(codec.encode(Leave()))
    assert isinstance(recv(sock), Goodbye)
    sock.close(linger=0)


def collect_answers(sock: zmq.Socket, ids: set[str], timeout_s: float = 30.0) -> dict:
    """Read until every id in `ids` has its ACCEPTED or ERROR; fail after `timeout_s`."""
    answered: dict[str, object] = {}
    deadline = time.monotonic() + timeout_s
    while set(answered) != ids and time.monotonic() < deadline:
        if not sock.poll(200):
            continue
        message = codec.decode(sock.recv_multipart())
        if isinstance(message, Accepted):
            for message_id in message.ids:
                answered[message_id] = message
        elif isinstance(message, Error) and message.ref is not None:
            answered[message.ref] = message
    assert set(answered) == ids, f"{len(ids) - len(answered)} sends never answered"
    return answered


def test_every_send_to_a_full_mailbox_is_answered_over_sockets(tmp_path: Path, zctx):
    broker = BrokerProcess(tmp_path, "--max-mailbox", "10", *OPEN_SEND_RATE, *RELAXED)
    try:
        register(zctx, broker, "bob")
        carol = login(zctx, broker, "carol")
        alice = login(zctx, broker, "alice")
        ids = {f"m{i}" for i in range(300)}
        for i in range(300):
            alice.send_multipart(codec.encode(Send(f"m{i}", "bob", f"text {i}", 1)))
        answered = collect_answers(alice, ids)
        accepted = [a for a in answered.values() if isinstance(a, Accepted)]
        full = [a for a in answered.values() if getattr(a, "code", "") == "mailbox_full"]
        assert len(accepted) == 10 and len(full) == 290
        # Her next text, to Carol who is online, goes through at once.
        alice.send_multipart(codec.encode(Send("to-carol", "carol", "hi", 1)))
        assert isinstance(collect_answers(alice, {"to-carol"})["to-carol"], Accepted)
        delivered = recv(carol)
        while not isinstance(delivered, Deliver):  # PRESENCE of alice joining comes first
            delivered = recv(carol)
        assert delivered.text == "hi"
        for sock in (alice, carol):
            sock.close(linger=0)
    finally:
        broker.kill()
    assert "Traceback" not in broker.log_text()


def test_rate_limited_sends_are_all_answered_over_sockets(tmp_path: Path, zctx):
    broker = BrokerProcess(tmp_path, "--rate-per-second", "1", "--rate-burst", "5", *RELAXED)
    try:
        register(zctx, broker, "bob")
        alice = login(zctx, broker, "alice")
        for i in range(200):
            alice.send_multipart(codec.encode(Send(f"m{i}", "bob", "flood", 1)))
        answered = collect_answers(alice, {f"m{i}" for i in range(200)})
        codes = [getattr(a, "code", "accepted") for a in answered.values()]
        assert codes.count("accepted") == 5 and codes.count("rate_limited") == 195
        alice.close(linger=0)
    finally:
        broker.kill()


def test_a_misbehaving_connection_is_disconnected_until_it_logs_in(broker, zctx):
    alice = login(zctx, broker, "alice")
    for _ in range(40):
        alice.send_multipart([b"garbage"])
    replies = []
    while alice.poll(1000):
        replies.append(codec.decode(alice.recv_multipart()))
    codes = [m.code for m in replies if isinstance(m, Error)]
    assert codes == ["malformed"] * 20 + ["not_logged_in"]
    assert broker.wait_for_log(r"disconnecting \w+ \(alice\): error budget used up")
    alice.send_multipart(codec.encode(Ping()))
    assert not alice.poll(500)  # ignored: only a LOGIN is read now
    alice.send_multipart(codec.encode(Login("alice")))
    assert isinstance(recv(alice), Welcome)
    alice.send_multipart(codec.encode(Ping()))
    assert isinstance(recv(alice), Pong)
    alice.close(linger=0)


def hoarder(zctx, broker: BrokerProcess, name: str) -> zmq.Socket:
    """A connection that will ask and not read: libzmq on its side holds one message."""
    sock = zctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVHWM, 1)
    sock.setsockopt(zmq.RCVBUF, 4096)
    sock.connect(broker.endpoint)
    sock.send_multipart(codec.encode(Login(name)))
    assert isinstance(recv(sock), Welcome)
    return sock


def settled_rss(process: psutil.Process, timeout_s: float = 15.0) -> int:
    """The process's resident size once it stops changing (two samples 300 ms apart
    within 1 %), or its last sample after `timeout_s`."""
    previous = process.memory_info().rss
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        psutil.wait_procs([process], timeout=0.3)  # a bounded wait on the process itself
        current = process.memory_info().rss
        if abs(current - previous) < previous / 100:
            return current
        previous = current
    return previous


def test_connections_that_ask_and_never_read_cost_a_bounded_amount(tmp_path: Path, zctx):
    """Twenty connections ask for history pages and never read. Unbounded, the broker
    would hold 20 x 50 pages of 330 KB (330 MB); bounded, about 2 MiB each. Meanwhile an
    honest pair talks as usual."""
    broker = BrokerProcess(
        tmp_path,
        *OPEN_SEND_RATE,
        *RELAXED,
        "--max-queued-bytes",
        "65536",
        "--max-history-bytes",
        "16384",
        "--history-rate",
        "1000",  # so the byte bounds, not the rate limit, are what hold them
        "--log-level",
        "INFO",
    )
    try:
        writer = login(zctx, broker, "writer")
        names = [f"hoarder{i}" for i in range(20)]
        for name in names:
            register(zctx, broker, name)
        big = "😀" * 4096  # 16 KiB of UTF-8
        ids = set()
        for name in names:
            for i in range(20):
                ids.add(f"{name}-{i}")
                writer.send_multipart(codec.encode(Send(f"{name}-{i}", name, big, 1)))
        collect_answers(writer, ids, timeout_s=60)
        process = psutil.Process(broker.proc.pid)
        before = settled_rss(process)
        hoarders = [hoarder(zctx, broker, name) for name in names]
        for _ in range(50):
            for sock in hoarders:
                sock.send_multipart(codec.encode(History("writer", 200)))
        # The honest pair is unaffected: every message arrives, in order. (Its login
        # waits its turn behind the 1,000 HISTORY requests.)
        alice = login(zctx, broker, "alice", 60_000)
        bob = login(zctx, broker, "bob", 60_000)
        for i in range(50):
            alice.send_multipart(codec.encode(Send(f"a{i}", "bob", f"hello {i}", 1)))
        texts = []
        for _ in range(200):  # bounded: at most this many messages before the 50 texts
            message = recv(bob)
            if isinstance(message, Deliver):
                texts.append(message.text)
            if len(texts) == 50:
                break
        assert texts == [f"hello {i}" for i in range(50)]
        grown = settled_rss(process) - before
        # Bounded: per hoarder 64 KiB queued plus libzmq's 128 messages of at most ~17 KB
        # (45 MiB for all), plus the allocator's slack: measured 29-42 MiB; 892 MiB with
        # libzmq's old 1,000-message queue and no page cap.
        assert grown < 128 * 2**20, f"the broker grew by {grown / 2**20:.1f} MiB"
        for sock in (*hoarders, writer, alice, bob):
            sock.close(linger=0)
    finally:
        broker.kill()
    assert "Traceback" not in broker.log_text()


def test_hoarders_bench_reports_the_brokers_memory():
    done = subprocess.run(
        [sys.executable, "-m", "bench.hoarders", "--peers", "3", "--requests", "2",
         "--messages", "2", "--json"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["peers"] == 3 and result["rss_hoarded_mib"] > 0
