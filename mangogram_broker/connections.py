"""Which TCP connection (file descriptor) carries which routing id, so a closed
descriptor reported by the socket monitor can be turned into "this peer is gone".

Pure bookkeeping, no sockets: the shell feeds it the descriptor of each message
(ZMQ_SRCFD) and each DISCONNECTED event. Descriptors are reused by the OS, and the
monitor's event for an old connection can arrive after the first message of a new one
on the same descriptor; the table remembers such stale events so they end nothing.
"""

from __future__ import annotations

from collections import Counter


class ConnectionTable:
    def __init__(self) -> None:
        self._peer_by_fd: dict[int, bytes] = {}
        self._fd_by_peer: dict[bytes, int] = {}
        self._stale_disconnects: Counter[int] = Counter()

    def seen(self, peer: bytes, fd: int) -> bytes | None:
        """A message from `peer` came on `fd`. Returns the peer that used `fd` before, if
        the descriptor was reused (that connection is closed)."""
        if self._fd_by_peer.get(peer) == fd:
            return None
        old_peer = self._peer_by_fd.get(fd)
        self._peer_by_fd[fd] = peer
        self._fd_by_peer[peer] = fd
        if old_peer is None or old_peer == peer:
            return None
        self._fd_by_peer.pop(old_peer, None)
        self._stale_disconnects[fd] += 1  # its own event is still on the way
        return old_peer

    def closed(self, fd: int) -> bytes | None:
        """The monitor says `fd` closed. Returns the peer that went with it, if any."""
        if self._stale_disconnects[fd]:
            self._stale_disconnects[fd] -= 1
            if not self._stale_disconnects[fd]:
                del self._stale_disconnects[fd]
            return None
        self._stale_disconnects.pop(fd, None)
        peer = self._peer_by_fd.pop(fd, None)
        if peer is not None:
            self._fd_by_peer.pop(peer, None)
        return peer
