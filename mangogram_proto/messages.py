"""Protocol messages: one frozen dataclass per command.

Classes are grouped by direction. The wire command name is the class's `COMMAND`;
the JSON body holds the dataclass fields by name. Times are integer milliseconds since
the Unix epoch (UTC); ids are strings.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

from .errors import ErrorCode


@dataclass(frozen=True)
class Limits:
    """The limits a broker enforces, announced in WELCOME so clients can stay inside them."""

    max_name_chars: int
    max_text_chars: int
    max_text_bytes: int
    max_body_bytes: int
    max_frame_bytes: int
    heartbeat_interval_ms: int
    heartbeat_timeout_ms: int
    rate_per_second: int
    rate_burst: int
    max_mailbox: int
    max_history_page: int


# Client -> broker


@dataclass(frozen=True)
class Login:
    """Claim a name. `resume_token` (from an earlier WELCOME) lets a reconnecting client
    take over its own session even before the broker noticed the old connection died.
    `takeover` (True, or absent) asks to end the name's online session without its
    token: honoured only on an encrypted broker, for the key that owns the name."""

    COMMAND: ClassVar[str] = "LOGIN"
    name: str
    resume_token: str | None = None
    resume_from: int | None = None
    takeover: bool | None = None


@dataclass(frozen=True)
class Send:
    """A private message. `id` is chosen by the client and unique per sender: resending
    the same id is idempotent."""

    COMMAND: ClassVar[str] = "SEND"
    id: str
    to: str
    text: str
    sent_at: int


@dataclass(frozen=True)
class Receipt:
    """The recipient confirms it holds every message of its stream up to `seq`
    (cumulative: one RECEIPT answers any number of DELIVERs; 0 confirms nothing)."""

    COMMAND: ClassVar[str] = "RECEIPT"
    seq: int


@dataclass(frozen=True)
class Read:
    """The recipient's user has seen message `broker_id` (a read receipt). It does not
    confirm delivery: that is RECEIPT's job."""

    COMMAND: ClassVar[str] = "READ"
    broker_id: str


@dataclass(frozen=True)
class History:
    """Ask for the conversation with `peer`, newest first, older than broker id `before`
    (None: from the newest), at most `limit` messages. `id` (optional) is echoed as the
    `ref` of an ERROR refusing it, such as `rate_limited`."""

    COMMAND: ClassVar[str] = "HISTORY"
    peer: str
    limit: int
    before: str | None = None
    id: str | None = None


@dataclass(frozen=True)
class Who:
    """Ask for the list of online users. `id` (optional) is echoed as the `ref` of an
    ERROR refusing it, such as `rate_limited`."""

    COMMAND: ClassVar[str] = "WHO"
    id: str | None = None


@dataclass(frozen=True)
class Lookup:
    """Ask whether `name` is registered (has ever logged in to this broker). `id`
    (optional) is echoed as the `ref` of an ERROR refusing it, such as `rate_limited`."""

    COMMAND: ClassVar[str] = "LOOKUP"
    name: str
    id: str | None = None


@dataclass(frozen=True)
class Ping:
    """Heartbeat from the client; the broker answers PONG."""

    COMMAND: ClassVar[str] = "PING"


@dataclass(frozen=True)
class Leave:
    """End the session now; the broker answers GOODBYE and tells others the user left."""

    COMMAND: ClassVar[str] = "LEAVE"


# Broker -> client


@dataclass(frozen=True)
class Welcome:
    """Login succeeded. `name` is the display form the broker registered. Stored messages
    follow as DELIVER; `resume_from` in LOGIN says where this client's stream stopped.
    `stream_mark`: every message of our stream up to this seq is confirmed, so a fresh
    client starts counting from here (absent: 0, nothing confirmed yet)."""

    COMMAND: ClassVar[str] = "WELCOME"
    name: str
    server_time: int
    resume_token: str
    limits: Limits
    online: tuple[str, ...] = ()
    stream_mark: int | None = None


@dataclass(frozen=True)
class Accepted:
    """First level ("sent", one tick): the broker took responsibility for the messages
    `ids`, which it numbered `broker_ids` (same order). One ACCEPTED may cover many SENDs
    of one loop turn."""

    COMMAND: ClassVar[str] = "ACCEPTED"
    ids: tuple[str, ...]
    broker_ids: tuple[str, ...]
    accepted_at: int


@dataclass(frozen=True)
class Deliver:
    """A private message for this client. Confirm it with RECEIPT (cumulative, by seq).

    `seq` numbers this user's stream (1, 2, 3...) so a client can resume after it;
    `delayed` is set when it waited in the mailbox because we were offline."""

    COMMAND: ClassVar[str] = "DELIVER"
    id: str
    broker_id: str
    sender: str
    text: str
    sent_at: int
    accepted_at: int
    seq: int
    delayed: bool = False


@dataclass(frozen=True)
class Delivered:
    """Second level ("delivered", two ticks): recipient `to` confirmed our messages `ids`
    (numbered `broker_ids`, same order)."""

    COMMAND: ClassVar[str] = "DELIVERED"
    to: str
    delivered_at: int
    ids: tuple[str, ...]
    broker_ids: tuple[str, ...]


@dataclass(frozen=True)
class Seen:
    """`by` has seen our message `id` (third level, "read")."""

    COMMAND: ClassVar[str] = "SEEN"
    id: str
    broker_id: str
    by: str
    read_at: int


@dataclass(frozen=True)
class HistoryItem:
    """One message of a conversation, as stored by the broker."""

    broker_id: str
    id: str
    sender: str
    to: str
    text: str
    sent_at: int
    accepted_at: int
    delivered_at: int | None = None
    read_at: int | None = None


@dataclass(frozen=True)
class HistoryPage:
    """Answer to HISTORY: messages newest first; `more` says older ones exist."""

    COMMAND: ClassVar[str] = "HISTORY_PAGE"
    peer: str
    items: tuple[HistoryItem, ...]
    more: bool


@dataclass(frozen=True)
class Online:
    """Snapshot of who is online, in answer to WHO."""

    COMMAND: ClassVar[str] = "ONLINE"
    users: tuple[str, ...]
    server_time: int


@dataclass(frozen=True)
class NameInfo:
    """Answer to LOOKUP: whether the name is registered; `name` is its registered
    display form, or the name as asked when it is not registered."""

    COMMAND: ClassVar[str] = "NAME_INFO"
    name: str
    registered: bool


@dataclass(frozen=True)
class Presence:
    """Pushed to online users when someone joins or leaves."""

    COMMAND: ClassVar[str] = "PRESENCE"
    name: str
    event: Literal["joined", "left"]
    at: int


@dataclass(frozen=True)
class Pong:
    """Answer to PING."""

    COMMAND: ClassVar[str] = "PONG"
    server_time: int


@dataclass(frozen=True)
class Goodbye:
    """Answer to LEAVE: the session is over."""

    COMMAND: ClassVar[str] = "GOODBYE"


@dataclass(frozen=True)
class Error:
    """Something went wrong. `ref` names the client message id it concerns, if any;
    `retry_after_ms` is set with `rate_limited`."""

    COMMAND: ClassVar[str] = "ERROR"
    code: str
    message: str
    ref: str | None = None
    retry_after_ms: int | None = None

    @property
    def error_code(self) -> ErrorCode | None:
        """The code as an `ErrorCode`, or None for a code this SDK does not know yet."""
        try:
            return ErrorCode(self.code)
        except ValueError:
            return None


ClientMessage = Login | Send | Receipt | Read | History | Who | Lookup | Ping | Leave
BrokerMessage = (
    Welcome
    | Accepted
    | Deliver
    | Delivered
    | Seen
    | HistoryPage
    | Online
    | NameInfo
    | Presence
    | Pong
    | Goodbye
    | Error
)
Message = ClientMessage | BrokerMessage

CLIENT_COMMANDS: tuple[type[ClientMessage], ...] = (
    Login,
    Send,
    Receipt,
    Read,
    History,
    Who,
    Lookup,
    Ping,
    Leave,
)
BROKER_COMMANDS: tuple[type[BrokerMessage], ...] = (
    Welcome,
    Accepted,
    Deliver,
    Delivered,
    Seen,
    HistoryPage,
    Online,
    NameInfo,
    Presence,
    Pong,
    Goodbye,
    Error,
)
