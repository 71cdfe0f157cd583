"""MangoGram's wire protocol and bot SDK.

Pure modules (no sockets): `messages`, `codec`, `errors`, `names`, `events`, `session`,
`backoff`. Socket-facing: `Client` (blocking, for scripts) and `Bot` (asyncio), loaded
on first use so the pure parts import without touching ZeroMQ.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .constants import DEFAULT_ENDPOINT, PROTOCOL_VERSION, SIGNATURE
from .errors import (
    BrokerRefused,
    ErrorCode,
    LocalProtocolError,
    RemoteProtocolError,
    UnsentMessagesError,
)
from .events import IncomingMessage
from .session import ClientSession, State

if TYPE_CHECKING:
    from .bot import Bot
    from .client import Client

__all__ = [
    "DEFAULT_ENDPOINT",
    "PROTOCOL_VERSION",
    "SIGNATURE",
    "Bot",
    "BrokerRefused",
    "Client",
    "ClientSession",
    "ErrorCode",
    "IncomingMessage",
    "LocalProtocolError",
    "RemoteProtocolError",
    "State",
    "UnsentMessagesError",
]


def __getattr__(name: str) -> Any:
    if name == "Client":
        from .client import Client

        return Client
    if name == "Bot":
        from .bot import Bot

        return Bot
    raise AttributeError(f"module 'mangogram_proto' has no attribute {name!r}")
