"""What the console shows, as plain data: the app decides the lines, `render` draws them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Mark = Literal["pending", "sent", "delivered", "failed"]
SystemKind = Literal["info", "joined", "left", "error", "receipt"]


@dataclass(frozen=True)
class ChatLine:
    """One private message, ours or someone's.

    Attributes:
        at_ms: when it was sent (sender's clock), ms since the epoch.
        sender: who wrote it (our own name for our messages).
        peer: the other person in this conversation.
        text: the message text, any Unicode.
        own: True for messages we sent.
        mark: delivery state of our own messages (None for incoming ones).
        elsewhere: True when `peer` is not the conversation currently open.
        delayed: True when it reached us well after it was sent.
    """

    at_ms: int
    sender: str
    peer: str
    text: str
    own: bool
    mark: Mark | None = None
    elsewhere: bool = False
    delayed: bool = False


@dataclass(frozen=True)
class SystemLine:
    """A line from the client itself: joins, leaves, errors, hints, late receipts."""

    at_ms: int
    text: str
    kind: SystemKind = "info"


Line = ChatLine | SystemLine
