"""Which TCP connection carries which routing id, so that the socket monitor's report of
a closed connection can be turned into "these peers are gone".

Pure bookkeeping, no sockets. The monitor reports ACCEPTED and DISCONNECTED with the
connection's file descriptor; messages carry the descriptor too (ZMQ_SRCFD). Descriptors
are reused by the OS, so a descriptor alone does not name a connection: the table numbers
each accepted connection and keys its peers by that number. For one descriptor, libzmq
reports a connection's DISCONNECTED before the descriptor is closed, hence before the
next ACCEPTED on it: the events of one descriptor alternate, and a DISCONNECTED always
ends the connection accepted last on it, never a later one.

A message can be read before the monitor events that preceded it. So the shell passes a
new peer to `seen` only after it has read every monitor event up to that moment: the
peer's own ACCEPTED was reported before its first message, so the connection open on the
descriptor then is the peer's own (or, for a message read after its connection closed, a
later one, which ends later: a dead peer is ended late, a live one never early). A peer
whose descriptor is closed by then is left untracked; its session ends by heartbeat
timeout or a failed send instead.
"""

from __future__ import annotations

import itertools


class ConnectionTable:
    def __init__(self) -> None:
        self._numbers = itertools.count(1)
        self._open: dict[int, int] = {}  # descriptor -> number of the connection on it
        # Connection number -> its routing ids (a list: almost always one, and a set
        # would cost four times the memory of a one-item list per connection).
        self._peers: dict[int, list[bytes]] = {}
        self._connection_of: dict[bytes, int] = {}

    def knows(self, peer: bytes) -> bool:
        """Whether `peer` is tied to a connection already (then `seen` is not needed)."""
        return peer in self._connection_of

    def accepted(self, fd: int) -> list[bytes]:
        """The monitor says a connection was accepted on `fd`. Returns peers still tied
        to a previous connection on `fd` (its close was never reported): they are gone."""
        gone = self._end(fd)
        self._open[fd] = next(self._numbers)
        return gone

    def closed(self, fd: int) -> list[bytes]:
        """The monitor says the connection on `fd` closed. Returns the peers it carried."""
        return self._end(fd)

    def seen(self, peer: bytes, fd: int) -> bool:
        """The first message of `peer` came on `fd`; call it after reading every monitor
        event so far. Returns whether the peer is now tied to the connection open on
        `fd` (False: none is open, the peer's connection has closed already)."""
        if peer in self._connection_of:
            return True
        number = self._open.get(fd)
        if number is None:
            return False
        self._peers.setdefault(number, []).append(peer)  # new: not tied yet (above)
        self._connection_of[peer] = number
        return True

    def _end(self, fd: int) -> list[bytes]:
        number = self._open.pop(fd, None)
        if number is None:
            return []
        peers = self._peers.pop(number, [])
        for peer in peers:
            del self._connection_of[peer]
        return sorted(peers)
