"""Who is online: routing identity <-> user, resume tokens, and liveness.

Sessions are kept in least-recently-seen order so expiring silent peers costs only the
stale entries, not a scan of everyone.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import NamedTuple

from .store import StoredMessage

# Shared by every session with no contacts yet (most idle ones): replaced by a set of its
# own at the first contact (`add_contact`), so an empty set is not kept per session.
NO_CONTACTS: frozenset[str] = frozenset()


class SendGate(NamedTuple):
    """A SEND refused for now (`code`): the connection's later SENDs are held until `id`
    comes again, or the monotonic time `expires` (see BrokerCore._send)."""

    id: str
    code: str
    retry_at: int
    expires: int


@dataclass(slots=True)
class Session:
    """One logged-in connection. (Slots: tens of thousands are kept, one per client.)"""

    peer: bytes
    key: str
    name: str
    resume_token: str
    last_seen_ms: int
    # Delivery window: the highest stream seq sent on this connection.
    cursor: int = 0
    # Messages handed to this connection and awaiting a RECEIPT, by seq: its size is
    # what is in flight (at most the window).
    in_flight: dict[int, StoredMessage] = field(default_factory=dict)
    # Name keys of the people this user has exchanged messages with: read it freely,
    # add to it with `add_contact` only.
    contacts: set[str] | frozenset[str] = NO_CONTACTS
    # The authenticated CurveZMQ public key it logged in with (None in plaintext mode).
    user_key: str | None = None
    # Set while a SEND of this connection refused for now must come again first.
    send_gate: SendGate | None = None

    def add_contact(self, key: str) -> None:
        contacts = self.contacts
        if key in contacts:
            return
        if isinstance(contacts, frozenset):
            self.contacts = {*contacts, key}
        else:
            contacts.add(key)


class Registry:
    """Maps peers (ROUTER routing ids) and name keys to sessions; at most one each."""

    def __init__(self) -> None:
        self._by_peer: OrderedDict[bytes, Session] = OrderedDict()
        self._by_key: dict[str, Session] = {}

    def __len__(self) -> int:
        return len(self._by_peer)

    def register(self, session: Session) -> None:
        """Add a session. The caller has checked that neither its peer nor key is taken."""
        self._by_peer[session.peer] = session
        self._by_key[session.key] = session

    def deregister(self, peer: bytes) -> Session | None:
        """Remove and return the session of `peer`, if any."""
        session = self._by_peer.pop(peer, None)
        if session is not None and self._by_key.get(session.key) is session:
            del self._by_key[session.key]
        return session

    def by_peer(self, peer: bytes) -> Session | None:
        return self._by_peer.get(peer)

    def by_key(self, key: str) -> Session | None:
        return self._by_key.get(key)

    def touch(self, session: Session, now_ms: int) -> None:
        """Record that the session's peer just spoke."""
        if session.last_seen_ms == now_ms:
            return  # already at the end among those seen at this time: the order holds
        session.last_seen_ms = now_ms
        self._by_peer.move_to_end(session.peer)

    def stale(self, deadline_ms: int) -> list[Session]:
        """Sessions not heard from since before `deadline_ms`, oldest first."""
        found = []
        for session in self._by_peer.values():
            if session.last_seen_ms >= deadline_ms:
                break
            found.append(session)
        return found

    def __iter__(self) -> Iterator[Session]:
        return iter(list(self._by_peer.values()))
