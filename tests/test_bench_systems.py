"""The bench's added systems behave as README says: `limit-curve` forwards only over
CurveZMQ, Prosody runs with TLS and offline storage when installed, and its absence is
said in one clear line. Nothing here measures speed."""

from __future__ import annotations

import contextlib
import json
import selectors
import subprocess
import sys
import time

import pytest
import zmq

from bench import prosody
from bench.__main__ import start_server
from bench.load import XMPP_DOMAIN, XMPP_PASSWORD, Client, LimitClient, XmppClient

from .conftest import ROOT

pytestmark = pytest.mark.e2e

needs_prosody = pytest.mark.skipif(
    prosody.missing() is not None, reason=f"optional bench system: {prosody.missing()}"
)


def received(client: LimitClient, timeout_s: float) -> list[str]:
    if client.sock.poll(int(timeout_s * 1000), zmq.POLLIN):
        return client.receive()
    return []


def test_limit_curve_forwards_between_curve_clients_and_refuses_plaintext(tmp_path):
    server = start_server("limit-curve", tmp_path)
    context = zmq.Context()
    try:
        assert server.server_key is not None and len(server.server_key) == 40
        alice = LimitClient(context, server.endpoint, "alice", server.server_key)
        bob = LimitClient(context, server.endpoint, "bob", server.server_key)
        plain = LimitClient(context, server.endpoint, "eve")
        texts: list[str] = []
        deadline = time.monotonic() + 30
        # Routing ids are known once each handshake is done: send until one arrives.
        while not texts and time.monotonic() < deadline:
            alice.send_text(bob, "hello")
            texts = received(bob, 0.2)
        assert texts and set(texts) == {"hello"}
        # A plaintext client never completes a handshake, so nothing it sends arrives
        # (without a connected peer its DEALER may not even take the message).
        with contextlib.suppress(zmq.Again):
            plain.sock.send_multipart([b"bob", b"plaintext"], zmq.NOBLOCK)
        assert "plaintext" not in received(bob, 1.0) + received(plain, 0.1)
    finally:
        context.destroy(linger=0)  # closes every socket, even after a failed assertion
        server.stop()


def test_a_missing_prosody_is_skipped_with_a_clear_line(tmp_path):
    # No prosody on PATH (the bench starts Python by its full path, so the rest runs).
    bench = subprocess.run(
        [sys.executable, "-m", "bench", "--systems", "limit,prosody", "--sizes", "2",
         "--window", "0.2", "--no-memory", "--rtt-count", "20", "--json"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
        env={"PATH": str(tmp_path), "SYSTEMROOT": ""},
    )  # fmt: skip
    assert bench.returncode == 0, bench.stderr[-3000:]
    assert "prosody: skipped, prosody is not installed" in bench.stderr
    report = json.loads(bench.stdout)
    assert report["skipped"] == {"prosody": "prosody is not installed"}
    assert {run["system"] for run in report["runs"]} == {"limit"}
    assert report["ratios"]["mangogram_to_prosody_n100"] is None


def test_an_unknown_system_is_refused():
    from bench.__main__ import chosen_systems

    with pytest.raises(SystemExit, match="unknown systems: nosuch"):
        chosen_systems("limit,nosuch")


def wait_for_messages(client: XmppClient, count: int, timeout_s: float) -> int:
    selector = selectors.DefaultSelector()
    selector.register(client.sock, selectors.EVENT_READ)
    got = len(client.receive())
    deadline = time.monotonic() + timeout_s
    while got < count and time.monotonic() < deadline:
        if selector.select(0.2):
            got += len(client.receive())
    selector.close()
    return got


@needs_prosody
def test_prosody_delivers_over_tls_and_stores_for_offline_users(tmp_path):
    server = prosody.start(tmp_path / "prosody")
    try:
        server.register(["alice", "bob"])
        host, port = server.endpoint.rsplit(":", 1)
        alice = XmppClient(host, int(port), "alice", XMPP_DOMAIN, XMPP_PASSWORD)
        assert alice.sock.version() is not None  # STARTTLS took: the stream is TLS
        # Bob is offline: the messages wait in Prosody's offline store for his login.
        for _ in range(3):
            alice.send_text(Client("bob"), "while you were away")
        bob = XmppClient(host, int(port), "bob", XMPP_DOMAIN, XMPP_PASSWORD)
        assert wait_for_messages(bob, 3, 10) == 3
        # Online now: delivered directly.
        bob.send_text(alice, "back")
        assert wait_for_messages(alice, 1, 10) == 1
        alice.sock.close()
        bob.sock.close()
    finally:
        server.stop()


@needs_prosody
def test_a_wrong_password_is_refused_by_prosody(tmp_path):
    server = prosody.start(tmp_path / "prosody")
    try:
        server.register(["carol"])
        host, port = server.endpoint.rsplit(":", 1)
        with pytest.raises(SystemExit, match="refused the login"):
            XmppClient(host, int(port), "carol", XMPP_DOMAIN, "not-the-password")
    finally:
        server.stop()
