"""What a broker tells the other brokers of its cluster, and hears from them.

The core stays the one place with routing rules: it tells its `Cluster` port that a user
logged in here or left, and asks it to pass a notice to a user who is not online here;
it reads back `events()` and applies its usual rules to them. A single broker has
`Alone`, which does nothing. The NATS implementation (`NatsCluster`, in
`jetstream_cluster.py`) carries these as hints over core NATS subjects: the messages
themselves are in JetStream, so a hint lost in transit delays a delivery (until the
user's next RECEIPT or login), never loses a message.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from typing import Protocol

from mangogram_proto.messages import BrokerMessage


@dataclass(frozen=True)
class StreamGrew:
    """Another broker stored message `seq` in the mailbox of `key`."""

    key: str
    seq: int


@dataclass(frozen=True)
class Notice:
    """Another broker has `message` (DELIVERED, SEEN) for `key`, whose sender it is."""

    key: str
    message: BrokerMessage


@dataclass(frozen=True)
class Moved:
    """`key` logged in at another broker: a session of it here is a stale one."""

    key: str


@dataclass(frozen=True)
class RemotePresence:
    """`key` (display name `name`) came online (`online`) or went offline at another
    broker."""

    key: str
    name: str
    online: bool


ClusterEvent = StreamGrew | Notice | Moved | RemotePresence


class Cluster(Protocol):
    """The core's view of the other brokers."""

    def joined(self, key: str, name: str, resume_token: str = "") -> None:
        """`key` logged in here (its session's `resume_token`): tell the others, and
        listen for its mail and notices."""
        ...

    def proves(self, key: str, resume_token: str | None) -> bool | None:
        """None if `key` has no live session at another broker; else whether
        `resume_token` is that session's (a login without it gets `name_taken`, as for a
        session online here)."""
        ...

    def left(self, key: str, announce: bool = True) -> None:
        """`key`'s session here ended: stop listening for it, and (`announce`) tell the
        others it is offline (not when it moved to another broker)."""
        ...

    def online_elsewhere(self) -> dict[str, str]:
        """Users online at other brokers: name key -> display name."""
        ...

    def tell(self, key: str, message: BrokerMessage) -> None:
        """Pass `message` to `key` at whichever broker it is online at (if any)."""
        ...

    def events(self) -> list[ClusterEvent]:
        """What arrived from the other brokers since the last call."""
        ...

    def wakeup(self) -> socket.socket | None:
        """A socket that turns readable when something has arrived for `events()`, for
        the broker's loop to poll beside its own (`events()` empties it), or None."""
        ...


class Alone:
    """The `Cluster` of a single broker: nobody else to tell or hear from."""

    def joined(self, key: str, name: str, resume_token: str = "") -> None:
        pass

    def proves(self, key: str, resume_token: str | None) -> bool | None:
        return None

    def left(self, key: str, announce: bool = True) -> None:
        pass

    def online_elsewhere(self) -> dict[str, str]:
        return {}

    def tell(self, key: str, message: BrokerMessage) -> None:
        pass

    def events(self) -> list[ClusterEvent]:
        return []

    def wakeup(self) -> socket.socket | None:
        return None
