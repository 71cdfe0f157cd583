"""Socket details shared by the blocking `Client` and the asyncio `Bot`."""

from __future__ import annotations

import time
from typing import Any, TypeVar

import zmq

from .keys import Security

SocketT = TypeVar("SocketT", bound=zmq.Socket[Any])


def wall_clock_ms() -> int:
    """Milliseconds since the Unix epoch: the protocol's time unit."""
    return time.time_ns() // 1_000_000


HANDSHAKE_FAILURES = (
    zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
    | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
    | zmq.EVENT_HANDSHAKE_FAILED_AUTH
)


def configure_dealer(socket: SocketT, endpoint: str, security: Security | None) -> SocketT:
    """Set a DEALER up for talking to a broker and connect it.

    With `security`, CurveZMQ encrypts and authenticates both ends. No routing id is set
    (the broker refuses client-chosen ones); linger is 0 so a dead broker never blocks
    closing; reconnects back off up to 2 s.
    """
    if security is not None:
        socket.setsockopt(zmq.CURVE_SERVERKEY, security.server_key.encode("ascii"))
        socket.setsockopt(zmq.CURVE_PUBLICKEY, security.identity.public.encode("ascii"))
        socket.setsockopt(zmq.CURVE_SECRETKEY, security.identity.secret.encode("ascii"))
    socket.setsockopt(zmq.LINGER, 0)
    socket.setsockopt(zmq.RECONNECT_IVL, 100)
    socket.setsockopt(zmq.RECONNECT_IVL_MAX, 2000)
    socket.connect(endpoint)
    return socket


WATCHED_EVENTS = HANDSHAKE_FAILURES | zmq.EVENT_HANDSHAKE_SUCCEEDED
# One failed handshake without detail can be a broker dying mid-handshake, and libzmq
# retries it; two in a row are a verdict.
FAILURES_BEFORE_GIVING_UP = 2
# How much a failure tells, for choosing the message: the broker refused our key (AUTH)
# > the two ends speak different mechanisms (PROTOCOL) > no detail.
_TELLING: dict[int, int] = {
    zmq.EVENT_HANDSHAKE_FAILED_AUTH: 3,
    zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL: 2,
    zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL: 1,
}


class HandshakeWatch:
    """Reads a socket monitor's events and decides when handshakes keep failing.

    A PROTOCOL failure (a plaintext end meeting a CurveZMQ end, or something that does
    not speak ZMTP) is final at once: libzmq never retries after one, so the socket
    would stay silent, and a new socket would meet the same broker. A failure without
    detail (wrong server key, or the same mismatch seen as a dropped connection, or a
    broker that died mid-handshake) is retried by libzmq and final the second time in a
    row. `last_failure` is the most telling failure of the current run of failures.
    """

    def __init__(self) -> None:
        self.failures = 0
        self.last_failure = 0

    def note(self, event: int) -> bool:
        """Record one monitor event; True once the client should give up."""
        if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
            self.failures = 0
            self.last_failure = 0
        elif event & HANDSHAKE_FAILURES:
            self.failures += 1
            if _TELLING.get(event, 0) >= _TELLING.get(self.last_failure, 0):
                self.last_failure = event
        return (
            self.failures >= FAILURES_BEFORE_GIVING_UP
            or self.last_failure == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
        )


def close_with_monitor(socket: zmq.Socket[Any] | None, monitor: zmq.Socket[Any] | None) -> None:
    """Close a DEALER and its handshake monitor without waiting for anything."""
    if socket is not None:
        socket.disable_monitor()
        socket.close(linger=0)
    if monitor is not None:
        monitor.close(linger=0)
