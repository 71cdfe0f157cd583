"""Socket details shared by the blocking `Client` and the asyncio `Bot`."""

from __future__ import annotations

import time
from typing import Any, TypeVar

import zmq

SocketT = TypeVar("SocketT", bound=zmq.Socket[Any])


def wall_clock_ms() -> int:
    """Milliseconds since the Unix epoch: the protocol's time unit."""
    return time.time_ns() // 1_000_000


def configure_dealer(socket: SocketT, endpoint: str) -> SocketT:
    """Set a DEALER up for talking to a broker and connect it.

    No routing id is set (the broker refuses client-chosen ones); linger is 0 so a
    dead broker never blocks closing; reconnects back off up to 2 s.
    """
    socket.setsockopt(zmq.LINGER, 0)
    socket.setsockopt(zmq.RECONNECT_IVL, 100)
    socket.setsockopt(zmq.RECONNECT_IVL_MAX, 2000)
    socket.connect(endpoint)
    return socket
