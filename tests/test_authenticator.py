"""CurveZMQ admission on its own thread: the pacing rule without sockets, then the real
ZAP handler with real CurveZMQ sockets on loopback."""

from __future__ import annotations

import pytest
import zmq

from mangogram_broker.authenticator import ADMIT_AHEAD, AdmissionGate, Authenticator, FairQueue
from mangogram_proto.keys import KEY_COMMAND, KEY_SIGNATURE, KeyPair


def test_the_gate_admits_a_bounded_number_ahead_of_the_logins():
    gate = AdmissionGate(ahead=3, timeout_s=2.0)
    assert [gate.admit(10.0) for _ in range(4)] == [True, True, True, False]
    gate.logged_in(2)
    assert [gate.admit(10.5) for _ in range(3)] == [True, True, False]
    gate.logged_in(99)  # more LOGINs than admissions (repeated LOGINs): no credit kept
    assert [gate.admit(10.6) for _ in range(4)] == [True, True, True, False]


def test_an_admission_that_never_logs_in_stops_counting_after_the_timeout():
    gate = AdmissionGate(ahead=1, timeout_s=2.0)
    assert gate.wait_s(0.0) is None
    assert gate.admit(1.0)
    assert not gate.admit(2.9)
    assert gate.wait_s(2.5) == pytest.approx(0.5)
    assert gate.admit(3.0)


def test_waiting_handshakes_are_taken_in_turns_by_address():
    queue = FairQueue(max_wait_s=10.0)
    for number in range(5):
        queue.put(b"10.0.0.66", [b"flood %d" % number], 0.0)
    queue.put(b"10.0.0.1", [b"alice"], 0.0)
    queue.put(b"10.0.0.2", [b"bob"], 0.0)
    queue.put(b"10.0.0.1", [b"alice again"], 0.0)
    assert len(queue) == 8
    taken = [queue.take()[0] for _ in range(8)]
    assert taken[:4] == [b"flood 0", b"alice", b"bob", b"flood 1"]
    assert taken[4:] == [b"alice again", b"flood 2", b"flood 3", b"flood 4"]
    assert len(queue) == 0
    assert queue.overdue_in_s(99.0) is None


def test_a_handshake_that_waited_too_long_is_taken_oldest_first():
    queue = FairQueue(max_wait_s=10.0)
    queue.put(b"a", [b"a1"], 0.0)
    queue.put(b"b", [b"b1"], 1.0)
    queue.put(b"a", [b"a2"], 2.0)
    queue.put(b"c", [b"c1"], 3.0)
    assert queue.take() == [b"a1"]  # in turn, before it is overdue
    assert queue.overdue_in_s(5.0) == pytest.approx(6.0)  # b1, waiting since 1.0
    assert queue.take_overdue(10.5) == []
    assert queue.take_overdue(12.0) == [[b"b1"], [b"a2"]]
    assert len(queue) == 1
    assert queue.overdue_in_s(12.0) == pytest.approx(1.0)
    assert queue.take() == [b"c1"]
    assert queue.take_overdue(100.0) == []


@pytest.fixture
def served(zctx):
    """A CurveZMQ ROUTER with the authenticator, in one context; closed at the end."""
    keys = KeyPair.generate()
    # Timeouts far longer than the test's waits: only LOGIN reports admit more.
    gate = AdmissionGate(timeout_s=600)
    auth = Authenticator(zctx, keys, "tcp://127.0.0.1:*", gate, max_wait_s=600)
    router = zctx.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    router.setsockopt(zmq.CURVE_SERVER, 1)
    router.setsockopt(zmq.CURVE_SECRETKEY, keys.secret.encode())
    router.setsockopt(zmq.CURVE_PUBLICKEY, keys.public.encode())
    router.bind("tcp://127.0.0.1:*")
    yield keys, auth, router
    router.close(linger=0)
    auth.stop()


def curve_client(zctx, keys: KeyPair, endpoint: str) -> zmq.Socket:
    mine = KeyPair.generate()
    sock = zctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.CURVE_SERVERKEY, keys.public.encode())
    sock.setsockopt(zmq.CURVE_PUBLICKEY, mine.public.encode())
    sock.setsockopt(zmq.CURVE_SECRETKEY, mine.secret.encode())
    sock.connect(endpoint)
    return sock


def expect_arrivals(router: zmq.Socket, count: int) -> None:
    """Exactly `count` messages reach the ROUTER (from admitted clients only): each within
    a generous timeout, and then no other within a second."""
    for _ in range(count):
        assert router.poll(10_000), "an admitted client's message did not arrive"
        router.recv_multipart()
    assert not router.poll(1000), "a client got through without being admitted"


def test_handshakes_are_admitted_only_as_the_routing_thread_handles_logins(served, zctx):
    keys, auth, router = served
    endpoint = router.getsockopt_string(zmq.LAST_ENDPOINT)
    clients = []
    for number in range(ADMIT_AHEAD + 3):
        sock = curve_client(zctx, keys, endpoint)
        sock.send(b"login %d" % number)  # sent as soon as its handshake is admitted
        clients.append(sock)
    try:
        expect_arrivals(router, ADMIT_AHEAD)  # the rest wait in their handshakes
        auth.turn_done(2)  # the loop handled two of those LOGINs
        expect_arrivals(router, 2)
        auth.turn_done(ADMIT_AHEAD)
        expect_arrivals(router, 1)  # the last one; nothing is lost
    finally:
        for sock in clients:
            sock.close(linger=0)


def test_a_handshake_is_never_held_past_the_longest_wait(zctx):
    # No LOGIN is ever reported, yet every client gets through once it has waited.
    keys = KeyPair.generate()
    gate = AdmissionGate(ahead=1, timeout_s=600)
    auth = Authenticator(zctx, keys, None, gate, max_wait_s=0.2)
    router = zctx.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    router.setsockopt(zmq.CURVE_SERVER, 1)
    router.setsockopt(zmq.CURVE_SECRETKEY, keys.secret.encode())
    router.setsockopt(zmq.CURVE_PUBLICKEY, keys.public.encode())
    router.bind("tcp://127.0.0.1:*")
    endpoint = router.getsockopt_string(zmq.LAST_ENDPOINT)
    clients = [curve_client(zctx, keys, endpoint) for _ in range(4)]
    try:
        for sock in clients:
            sock.send(b"login")
        expect_arrivals(router, 4)
    finally:
        for sock in clients:
            sock.close(linger=0)
        router.close(linger=0)
        auth.stop()


def test_admitted_clients_carry_their_key_and_key_discovery_answers(served, zctx):
    keys, auth, router = served
    endpoint = router.getsockopt_string(zmq.LAST_ENDPOINT)
    sock = curve_client(zctx, keys, endpoint)
    asker = zctx.socket(zmq.DEALER)
    asker.setsockopt(zmq.LINGER, 0)
    asker.connect(auth.key_endpoint)
    try:
        sock.send(b"hello")
        assert router.poll(5000)
        frame = router.recv(copy=False)
        assert frame.more
        client_key = frame.get("User-Id")
        assert router.recv() == b"hello"
        assert len(client_key) == 40 and client_key != keys.public
        asker.send_multipart([KEY_SIGNATURE, KEY_COMMAND])
        assert asker.poll(5000)
        assert asker.recv_multipart() == [KEY_SIGNATURE, KEY_COMMAND, keys.public.encode()]
    finally:
        sock.close(linger=0)
        asker.close(linger=0)
