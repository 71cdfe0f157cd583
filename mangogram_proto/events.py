"""What a client session reports to the program driving it.

The SDK and the console client both consume these; they are richer than the wire
messages (a failure is tied to the message it concerns, presence is one event type).
"""

from __future__ import annotations

from dataclasses import dataclass

from .messages import HistoryItem, Limits


@dataclass(frozen=True)
class LoggedIn:
    """The broker accepted the login (again, after a reconnect, when `resumed`)."""

    name: str
    server_time: int
    limits: Limits
    online: tuple[str, ...]
    resumed: bool


@dataclass(frozen=True)
class LoginRefused:
    """The broker refused the name; the session is closed. Pick another name and retry."""

    code: str
    message: str


@dataclass(frozen=True)
class IncomingMessage:
    """A private message for us. Times are ms since the epoch: `sent_at` by the sender's
    clock, `accepted_at` by the broker's."""

    id: str
    broker_id: str
    sender: str
    text: str
    sent_at: int
    accepted_at: int
    seq: int = 0
    delayed: bool = False


@dataclass(frozen=True)
class MessageAccepted:
    """Our message `id` reached the broker ("sent", ✓)."""

    id: str
    broker_id: str
    accepted_at: int


@dataclass(frozen=True)
class MessageDelivered:
    """Our message `id` reached `to`'s client ("delivered", ✓✓)."""

    id: str
    broker_id: str
    to: str
    delivered_at: int


@dataclass(frozen=True)
class MessageRead:
    """`by` has seen our message `id` (a read receipt)."""

    id: str
    broker_id: str
    by: str
    read_at: int


@dataclass(frozen=True)
class HistoryReceived:
    """A page of the conversation with `peer`, newest first; `more` means older exist."""

    peer: str
    items: tuple[HistoryItem, ...]
    more: bool


@dataclass(frozen=True)
class MessageFailed:
    """Our message `id` will not be delivered; `code` is an ErrorCode value."""

    id: str
    to: str
    code: str
    message: str


@dataclass(frozen=True)
class PresenceChanged:
    """`name` came online (`joined`) or went offline."""

    name: str
    joined: bool
    at: int


@dataclass(frozen=True)
class OnlineUsers:
    """Answer to a request for who is online."""

    users: tuple[str, ...]


@dataclass(frozen=True)
class NameStatus:
    """Answer to a lookup: whether `name` is registered with the broker (then `name` is
    its registered display form; else as asked)."""

    name: str
    registered: bool


@dataclass(frozen=True)
class BrokerError:
    """An error not tied to one of our texts (e.g. rate limited, malformed). `ref` is the
    id of the request it answers (a WHO, HISTORY or LOOKUP the session gave an id), if
    the broker named one."""

    code: str
    message: str
    retry_after_ms: int | None
    ref: str | None = None


@dataclass(frozen=True)
class ConnectionLost:
    """No sign of life from the broker; the driver must reconnect and call `connect()`."""

    reason: str


@dataclass(frozen=True)
class Closed:
    """The session ended by our own LEAVE."""


Event = (
    LoggedIn
    | LoginRefused
    | IncomingMessage
    | MessageAccepted
    | MessageDelivered
    | MessageRead
    | HistoryReceived
    | MessageFailed
    | PresenceChanged
    | OnlineUsers
    | NameStatus
    | BrokerError
    | ConnectionLost
    | Closed
)
