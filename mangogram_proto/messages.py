"""Protocol messages: one frozen `msgspec.Struct` per command.

Classes are grouped by direction. The wire command name is the class's `COMMAND`;
the JSON body holds the struct fields by name. Times are integer milliseconds since
the Unix epoch (UTC); ids are strings. The field types are the wire schema: the codec
decodes and validates bodies straight into these classes (strict: no coercion; every
integer within the signed 64-bit range, see `Int64`).

Structs rather than frozen dataclasses: msgspec builds, decodes and encodes them several
times faster (measured in bench/decode_cost.py), and the broker builds several per
message routed. `WireStruct` is their base class; `Limits` stays a frozen dataclass, since it
doubles as broker configuration (`dataclasses.replace`) and msgspec reads it all the same.
None of them is ever part of a reference cycle (strings, integers and tuples of other
messages only), so they skip the garbage collector's tracking (`gc=False`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, ClassVar, Literal

import msgspec

from .errors import ErrorCode

# Every integer on the wire: JSON integers within the signed 64-bit range.
Int64 = Annotated[int, msgspec.Meta(ge=-(2**63), le=2**63 - 1)]


class WireStruct(msgspec.Struct, frozen=True, gc=False, omit_defaults=True):
    """Base of every message and of `HistoryItem`. Optional fields default to None and are
    left out of the encoded body when they hold it (the broker never sends null); the two
    fields with another default (`Deliver.delayed`, `Welcome.online`) are always written
    (see codec.py)."""


@dataclass(frozen=True)
class Limits:
    """The limits a broker enforces, announced in WELCOME so clients can stay inside them."""

    max_name_chars: Int64
    max_text_chars: Int64
    max_text_bytes: Int64
    max_body_bytes: Int64
    max_frame_bytes: Int64
    heartbeat_interval_ms: Int64
    heartbeat_timeout_ms: Int64
    rate_per_second: Int64
    rate_burst: Int64
    max_mailbox: Int64
    max_history_page: Int64


# Client -> broker


class Login(WireStruct, frozen=True):
    """Claim a name. `resume_token` (from an earlier WELCOME) lets a reconnecting client
    take over its own session even before the broker noticed the old connection died.
    `takeover` (True, or absent) asks to end the name's online session without its
    token: honoured only on an encrypted broker, for the key that owns the name."""

    COMMAND: ClassVar[str] = "LOGIN"
    name: str
    resume_token: str | None = None
    resume_from: Int64 | None = None
    takeover: bool | None = None


class Send(WireStruct, frozen=True):
    """A private message. `id` is chosen by the client and unique per sender: resending
    the same id is idempotent."""

    COMMAND: ClassVar[str] = "SEND"
    id: str
    to: str
    text: str
    sent_at: Int64


class Receipt(WireStruct, frozen=True):
    """The recipient confirms it holds every message of its stream up to `seq`
    (cumulative: one RECEIPT answers any number of DELIVERs; 0 confirms nothing)."""

    COMMAND: ClassVar[str] = "RECEIPT"
    seq: Int64


class Read(WireStruct, frozen=True):
    """The recipient's user has seen message `broker_id` (a read receipt). It does not
    confirm delivery: that is RECEIPT's job."""

    COMMAND: ClassVar[str] = "READ"
    broker_id: str


class History(WireStruct, frozen=True):
    """Ask for the conversation with `peer`, newest first, older than broker id `before`
    (None: from the newest), at most `limit` messages. `id` (optional) is echoed as the
    `ref` of an ERROR refusing it, such as `rate_limited`."""

    COMMAND: ClassVar[str] = "HISTORY"
    peer: str
    limit: Int64
    before: str | None = None
    id: str | None = None


class Who(WireStruct, frozen=True):
    """Ask for the list of online users. `id` (optional) is echoed as the `ref` of an
    ERROR refusing it, such as `rate_limited`."""

    COMMAND: ClassVar[str] = "WHO"
    id: str | None = None


class Lookup(WireStruct, frozen=True):
    """Ask whether `name` is registered (has ever logged in to this broker). `id`
    (optional) is echoed as the `ref` of an ERROR refusing it, such as `rate_limited`."""

    COMMAND: ClassVar[str] = "LOOKUP"
    name: str
    id: str | None = None


class Ping(WireStruct, frozen=True):
    """Heartbeat from the client; the broker answers PONG."""

    COMMAND: ClassVar[str] = "PING"


class Leave(WireStruct, frozen=True):
    """End the session now; the broker answers GOODBYE and tells others the user left."""

    COMMAND: ClassVar[str] = "LEAVE"


# Broker -> client


class Welcome(WireStruct, frozen=True):
    """Login succeeded. `name` is the display form the broker registered. Stored messages
    follow as DELIVER; `resume_from` in LOGIN says where this client's stream stopped.
    `stream_mark`: every message of our stream up to this seq is confirmed, so a fresh
    client starts counting from here (absent: 0, nothing confirmed yet)."""

    COMMAND: ClassVar[str] = "WELCOME"
    name: str
    server_time: Int64
    resume_token: str
    limits: Limits
    online: tuple[str, ...] = ()
    stream_mark: Int64 | None = None


class Accepted(WireStruct, frozen=True):
    """First level ("sent", one tick): the broker took responsibility for the messages
    `ids`, which it numbered `broker_ids` (same order). One ACCEPTED may cover many SENDs
    of one loop turn."""

    COMMAND: ClassVar[str] = "ACCEPTED"
    ids: tuple[str, ...]
    broker_ids: tuple[str, ...]
    accepted_at: Int64


class Deliver(WireStruct, frozen=True, omit_defaults=False):
    """A private message for this client. Confirm it with RECEIPT (cumulative, by seq).

    `seq` numbers this user's stream (1, 2, 3...) so a client can resume after it;
    `delayed` is set when it waited in the mailbox because we were offline."""

    COMMAND: ClassVar[str] = "DELIVER"
    id: str
    broker_id: str
    sender: str
    text: str
    sent_at: Int64
    accepted_at: Int64
    seq: Int64
    delayed: bool = False


class Delivered(WireStruct, frozen=True):
    """Second level ("delivered", two ticks): recipient `to` confirmed our messages `ids`
    (numbered `broker_ids`, same order)."""

    COMMAND: ClassVar[str] = "DELIVERED"
    to: str
    delivered_at: Int64
    ids: tuple[str, ...]
    broker_ids: tuple[str, ...]


class Seen(WireStruct, frozen=True):
    """`by` has seen our message `id` (third level, "read")."""

    COMMAND: ClassVar[str] = "SEEN"
    id: str
    broker_id: str
    by: str
    read_at: Int64


class HistoryItem(WireStruct, frozen=True):
    """One message of a conversation, as stored by the broker."""

    broker_id: str
    id: str
    sender: str
    to: str
    text: str
    sent_at: Int64
    accepted_at: Int64
    delivered_at: Int64 | None = None
    read_at: Int64 | None = None


class HistoryPage(WireStruct, frozen=True):
    """Answer to HISTORY: messages newest first; `more` says older ones exist."""

    COMMAND: ClassVar[str] = "HISTORY_PAGE"
    peer: str
    items: tuple[HistoryItem, ...]
    more: bool


class Online(WireStruct, frozen=True):
    """Snapshot of who is online, in answer to WHO."""

    COMMAND: ClassVar[str] = "ONLINE"
    users: tuple[str, ...]
    server_time: Int64


class NameInfo(WireStruct, frozen=True):
    """Answer to LOOKUP: whether the name is registered; `name` is its registered
    display form, or the name as asked when it is not registered."""

    COMMAND: ClassVar[str] = "NAME_INFO"
    name: str
    registered: bool


class Presence(WireStruct, frozen=True):
    """Pushed to online users when someone joins or leaves."""

    COMMAND: ClassVar[str] = "PRESENCE"
    name: str
    event: Literal["joined", "left"]
    at: Int64


class Pong(WireStruct, frozen=True):
    """Answer to PING."""

    COMMAND: ClassVar[str] = "PONG"
    server_time: Int64


class Goodbye(WireStruct, frozen=True):
    """Answer to LEAVE: the session is over."""

    COMMAND: ClassVar[str] = "GOODBYE"


class Error(WireStruct, frozen=True):
    """Something went wrong. `ref` names the client message id it concerns, if any;
    `retry_after_ms` is set with `rate_limited`."""

    COMMAND: ClassVar[str] = "ERROR"
    code: str
    message: str
    ref: str | None = None
    retry_after_ms: Int64 | None = None

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
