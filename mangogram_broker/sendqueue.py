"""What the broker holds for clients that read slowly or not at all, bounded in bytes.

libzmq queues at most `SEND_QUEUE_PER_PEER` messages per connection (ZMQ_SNDHWM counts
messages, not bytes). When that queue is full, the shell keeps the encoded messages here,
in order, up to `max_bytes` per connection, and offers them to libzmq again later; what
does not fit is refused, and the shell tells the core (a DELIVER then stays in the
mailbox). Once queued, a message is sent unless its connection goes away (then its
session ends, and its mail waits in the store). So a connection costs at most
`max_bytes` plus `SEND_QUEUE_PER_PEER` of the largest messages (a HISTORY_PAGE is
capped in bytes for that reason), whatever it asks for and however long it does not
read.

A connection whose backlog did not move is retried later and later (from
`RETRY_MIN_MS` doubling to `RETRY_MAX_MS`), so hoarders cost little; one that is reading
is retried at once again.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Mapping
from typing import NamedTuple

from .core import Outgoing

SEND_QUEUE_PER_PEER = 128
MAX_QUEUED_BYTES = 1_048_576
RETRY_MIN_MS = 1
RETRY_MAX_MS = 8
# What Python spends on one queued message besides its bytes (the tuple, the list, the
# bytes objects' headers), counted so the bound is on memory, not only on payload.
OVERHEAD_BYTES = 200


class Queued(NamedTuple):
    peer: bytes
    frames: list[bytes]  # without the routing id; held encoded only, not as a message
    size: int


class _Backlog:
    __slots__ = ("items", "size", "retry_at", "wait_ms")

    def __init__(self) -> None:
        self.items: deque[Queued] = deque()
        self.size = 0
        self.retry_at = 0
        self.wait_ms = RETRY_MIN_MS


class SendQueues:
    """Per-connection backlogs of encoded messages, each at most `max_bytes`."""

    def __init__(self, max_bytes: int = MAX_QUEUED_BYTES) -> None:
        self.max_bytes = max_bytes
        self._backlogs: dict[bytes, _Backlog] = {}

    @property
    def waiting(self) -> Mapping[bytes, object]:
        """The peers with a backlog (read-only; a mapping, for a fast `in` per message)."""
        return self._backlogs

    def __contains__(self, peer: bytes) -> bool:
        return peer in self._backlogs

    def __len__(self) -> int:
        return len(self._backlogs)

    def queued_bytes(self, peer: bytes) -> int:
        backlog = self._backlogs.get(peer)
        return backlog.size if backlog is not None else 0

    def add(self, out: Outgoing, frames: list[bytes], now_ms: int) -> bool:
        """Queue `frames` (`out` encoded) behind what `out.peer` already has; False (and
        nothing queued) if that would go over `max_bytes`."""
        size = OVERHEAD_BYTES + sum(len(f) for f in frames)
        backlog = self._backlogs.get(out.peer)
        if backlog is None:
            if size > self.max_bytes:
                return False
            backlog = self._backlogs[out.peer] = _Backlog()
            backlog.retry_at = now_ms + RETRY_MIN_MS
        elif backlog.size + size > self.max_bytes:
            return False
        backlog.items.append(Queued(out.peer, frames, size))
        backlog.size += size
        return True

    def drop(self, peer: bytes) -> None:
        """Forget `peer`'s backlog (its connection is gone)."""
        self._backlogs.pop(peer, None)

    def next_retry_ms(self) -> int | None:
        """When the earliest backlog is due (monotonic ms), or None if there is none."""
        return min((b.retry_at for b in self._backlogs.values()), default=None)

    def flush(self, send: Callable[[Queued], bool], now_ms: int) -> None:
        """Offer each due backlog to `send`, in order, until it refuses one (returns
        False). `send` may `drop` the peer."""
        for peer, backlog in list(self._backlogs.items()):
            if backlog.retry_at > now_ms:
                continue
            moved = False
            items = backlog.items
            while items:
                if peer not in self._backlogs:
                    break  # `send` found the peer gone and dropped it
                head = items[0]
                if not send(head):
                    break
                items.popleft()
                backlog.size -= head.size
                moved = True
            if peer not in self._backlogs:
                continue
            if not items:
                del self._backlogs[peer]
                continue
            # Reading: try again at once. Not reading: back off, to RETRY_MAX_MS.
            backlog.wait_ms = RETRY_MIN_MS if moved else min(RETRY_MAX_MS, 2 * backlog.wait_ms)
            backlog.retry_at = now_ms + backlog.wait_ms
