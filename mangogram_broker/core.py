"""The broker's routing logic, pure: frames and a clock in, messages to send out.

Theory of operation
-------------------
* A peer is a ROUTER routing id. Only ids of the shape libzmq generates (5 bytes, the
  first 0x00) are served: an id a client chose could be chosen again by someone else,
  so it is refused. A chosen id of that very shape cannot be told from a generated one.
* With keys required (CurveZMQ), every message carries the sender's authenticated
  public key (ZAP User-Id). A message without one is dropped, and so is one whose key
  differs from the key its session logged in with: identity comes from the key, never
  from the payload. A name belongs to the first key that registers it; a LOGIN with
  another key gets `name_owned`. New registrations are rate limited per address.
* A peer becomes a user with LOGIN. Names are unique by `name_key` (NFKC + casefold).
  A LOGIN for a name already online succeeds only with that session's resume token,
  which replaces the old session (the old connection is dead or dying), or, on an
  encrypted broker, with `takeover` from the key that owns the name (the same user,
  elsewhere): the same replacement, without the token.
* Every command but LOGIN and LEAVE needs a session; anything else gets `not_logged_in`,
  which is also how a reconnected client learns it must log in again.
* SEND is routed with `deliver_or_store`: the message is appended to the recipient's
  stream in the store (so it survives everything), an online recipient gets DELIVER at
  once, and ACCEPTED goes to the sender. Nothing is acknowledged before the shell commits
  the store, which it does once per loop turn, before sending anything. The shell merges
  one turn's ACCEPTEDs (and DELIVEREDs) for a peer with `coalesce`.
* A recipient's stream is delivered through a window of `DELIVERY_WINDOW` unconfirmed
  messages. RECEIPT is cumulative: it confirms the stream through a seq (never beyond
  what this connection was sent), tells each sender DELIVERED for its messages (or owes
  it until the sender logs in) and opens the window. Whatever is unconfirmed when a
  session ends is delivered again at the next login, in stream order, marked delayed.
  LOGIN's `resume_from` confirms everything up to it in the same way.
* Message ids are idempotent per sender, across restarts: a repeated id is acknowledged
  again with the same broker id and not stored or delivered twice.
* Presence (PRESENCE, WELCOME's online list) reaches every online user while at most
  `PRESENCE_BROADCAST_LIMIT` are online, and only contacts (people with stored messages
  to or from the user) beyond that. Joins and leaves are noted as they happen and told
  once per turn (`take_presence`): each recipient online at the end of the turn hears
  only the net change since its view was last right (the turn's start, or its own
  WELCOME), so a join then leave within one turn tells nobody, and nobody is told
  anything after leaving. Without `hold_presence` every entry point is its own turn.
* A session ends by LEAVE, by its connection closing (`disconnected`), by silence longer
  than the heartbeat timeout (`expire`), or when a send to it finds it unreachable
  (`send_failed`). Each end tells the other online users it left.
* Every command is rate limited: SEND per user, the others per connection
  (`CommandRates`). A refused SEND is always answered (`rate_limited` with its `ref`).
* Texts from one connection are stored in the order it sent them, also when some are
  refused for now: after a SEND is refused `rate_limited` or `unavailable`, the
  connection's SENDs with other ids get the same refusal (no rate token, no error
  budget) until that id comes again, the gate expires (a heartbeat timeout after its
  retry_after), or the session ends (`Session.send_gate`).
* Nothing here raises on peer input: bad input becomes an ERROR reply. A reply that
  answers a SEND (it names the SEND in `ref`) is always sent; other ERRORs spend the
  connection's error budget and are dropped once it is used up. A connection whose
  protocol violations (`MISBEHAVIOUR`) go beyond the budget is disconnected: its session
  ends, it is told `not_logged_in`, and nothing but a LOGIN is read from it until it
  logs in again. (A ROUTER cannot close one connection; this is the closest it gets.)
* Time comes in as a `Clock`: `wall` for the timestamps people see, `mono` for every
  timer (rate limits, heartbeat expiry, the pruning schedule). `wall` is held at its
  latest value while the machine's clock is behind it, so stored times never go back.
"""

from __future__ import annotations

import dataclasses
import logging
import secrets
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple, TypeGuard

import msgspec

from mangogram_proto import codec
from mangogram_proto.constants import MAX_ID_CHARS, MAX_REF_CHARS
from mangogram_proto.errors import ErrorCode, RemoteProtocolError
from mangogram_proto.messages import (
    CLIENT_COMMANDS,
    Accepted,
    BrokerMessage,
    ClientMessage,
    Deliver,
    Delivered,
    Error,
    Goodbye,
    History,
    HistoryItem,
    HistoryPage,
    Leave,
    Limits,
    Login,
    Lookup,
    NameInfo,
    Online,
    Ping,
    Pong,
    Presence,
    Read,
    Receipt,
    Seen,
    Send,
    Welcome,
    Who,
)
from mangogram_proto.names import name_key, validate_name
from mangogram_proto.ratelimit import TokenBucket

from .clock import Clock
from .cluster import Alone, Cluster, Moved, Notice, RemotePresence, StreamGrew
from .registry import NO_CONTACTS, Registry, SendGate, Session
from .store import (
    DuplicateMessage,
    MemoryStore,
    NameAlreadyClaimed,
    Store,
    StoredMessage,
    StoreUnavailable,
    parse_broker_id,
)

log = logging.getLogger(__name__)

DELIVERY_WINDOW = 256
RECEIPTS_PER_LOGIN = 1000
REGISTRATIONS_PER_MINUTE = 10
REGISTRATION_BURST = 10
ERROR_RATE_PER_SECOND = 5
ERROR_BURST = 20
PRUNE_EVERY_MS = 60_000
# Up to this many users online, everyone hears of everyone (a team, a small community);
# beyond it joins and leaves go only to contacts, or a login storm would cost O(N^2).
PRESENCE_BROADCAST_LIMIT = 500
# Ids per merged ACCEPTED or DELIVERED, which keeps those bodies far below frame limits.
MAX_IDS_PER_ACK = 256
# Bytes of one HISTORY_PAGE body, at most (a page always holds at least one message).
MAX_HISTORY_BYTES = 32_768
# Rows a HISTORY reads from the store first; each further read takes twice as many.
HISTORY_FIRST_READ = 16
# Recipient names of SENDs with their name keys, kept so that `name_key` (two NFKC
# passes and a casefold, ~0.4 us) is not run per message: a broker's SENDs name the same
# few recipients over and over. Emptied when full, so it stays a few megabytes at most.
RECIPIENT_KEYS_KEPT = 16_384
# A per-connection command bucket holds this many seconds' worth of its rate.
COMMAND_BURST_SECONDS = 4
# Errors a correct client never causes: going beyond the error budget with these
# disconnects the connection. (Refusals such as mailbox_full or name_taken are not
# misbehaviour: the command limits bound them.)
MISBEHAVIOUR = frozenset(
    {
        ErrorCode.MALFORMED,
        ErrorCode.UNSUPPORTED_VERSION,
        ErrorCode.UNKNOWN_COMMAND,
        ErrorCode.TOO_LARGE,
        ErrorCode.ROUTING_ID_REFUSED,
        ErrorCode.ALREADY_LOGGED_IN,
    }
)
_LOGIN_FRAME = Login.COMMAND.encode()
# Which per-connection bucket (a `CommandRates` field) each command draws on.
_RATE_CLASSES: dict[type, str] = {
    Login: "login",
    Leave: "login",
    History: "history",
    Who: "who",
    Lookup: "who",  # a cheap question, asked about as often as WHO
    Ping: "ping",
    Read: "read",
    Receipt: "receipt",
}


@dataclass(frozen=True)
class CommandRates:
    """Per-connection limits of the commands other than SEND (which is limited per user
    by `Limits.rate_per_second`), in commands per second; each bucket holds
    `COMMAND_BURST_SECONDS` seconds' worth. RECEIPT counts only when it confirms nothing
    new: a RECEIPT that confirms mail is bounded by the mail delivered."""

    login: int = 2  # LOGIN and LEAVE
    history: int = 2
    who: int = 2
    ping: int = 5
    read: int = 100
    receipt: int = 20

    def burst(self, rate: int) -> int:
        return max(1, rate * COMMAND_BURST_SECONDS)


class Outgoing(NamedTuple):
    """A message for the shell to send to `peer`. (A named tuple: several are made per
    message routed, and a frozen dataclass costs twice as much to build.)"""

    peer: bytes
    message: BrokerMessage


@dataclass(frozen=True)
class Retention:
    """How long confirmed messages stay as history: an age and a count per recipient
    (None: no limit). Unconfirmed messages are never removed."""

    max_age_ms: int | None = None
    keep_per_user: int | None = None


def _token_matches(token: str | None, holder: Session) -> bool:
    return token is not None and secrets.compare_digest(
        token.encode("utf-8"), holder.resume_token.encode("utf-8")
    )


def _ref(client_id: str) -> str | None:
    """The client id to echo in an ERROR, if it can be (up to MAX_REF_CHARS, so also an
    id refused for its length names its message)."""
    return client_id if 0 < len(client_id) <= MAX_REF_CHARS else None


_ACKS = (Accepted, Delivered)  # a tuple: `A | B` would build a union at every call


def coalesce(outgoing: list[Outgoing]) -> list[Outgoing]:
    """Merge acknowledgements that follow each other for one peer: ACCEPTEDs with the same
    time, DELIVEREDs with the same recipient and time. Order per peer is kept: a merge
    only extends the peer's latest message."""
    merged: list[Outgoing] = []
    latest: dict[bytes, int] = {}  # peer -> index in merged of its latest message
    extra: dict[int, tuple[list[str], list[str]]] = {}  # ids and broker ids merged in
    for out in outgoing:
        message = out.message
        at = latest.get(out.peer)
        if at is not None and isinstance(message, _ACKS):
            first = merged[at].message
            if _mergeable(first, message):
                ids, broker_ids = extra.setdefault(at, ([], []))
                if len(first.ids) + len(ids) + len(message.ids) <= MAX_IDS_PER_ACK:
                    ids += message.ids
                    broker_ids += message.broker_ids
                    continue
        latest[out.peer] = len(merged)
        merged.append(out)
    for at, (ids, broker_ids) in extra.items():
        first = merged[at].message
        assert isinstance(first, _ACKS)  # only those get extras
        whole = msgspec.structs.replace(
            first, ids=first.ids + tuple(ids), broker_ids=first.broker_ids + tuple(broker_ids)
        )
        merged[at] = Outgoing(merged[at].peer, whole)
    return merged


def _mergeable(first: BrokerMessage, then: Accepted | Delivered) -> TypeGuard[Accepted | Delivered]:
    if isinstance(then, Accepted):
        return isinstance(first, Accepted) and first.accepted_at == then.accepted_at
    return (
        isinstance(first, Delivered)
        and first.to == then.to
        and first.delivered_at == then.delivered_at
    )


def is_generated_routing_id(peer: bytes) -> bool:
    """True for ids shaped like those libzmq assigns itself (a zero byte then a 32-bit
    counter). A client can set such an id too: nothing in the message tells them apart."""
    return len(peer) == 5 and peer[0] == 0


class _PresenceEvent(NamedTuple):
    """A session's start ("joined", or "resumed": a takeover, not announced) or end
    ("left"), with the number of users online right after it."""

    session: Session
    kind: str
    at: int
    online_after: int


class BrokerCore:
    """Routing state and rules. Drive it with `handle_frames`, `disconnected`, `expire`
    and `send_failed`; commit the store, then send every `Outgoing` they return, in order.
    A shell that calls `hold_presence` adds `take_presence()` once per turn instead.
    """

    def __init__(
        self,
        limits: Limits,
        *,
        store: Store | None = None,
        retention: Retention | None = None,
        token_factory: Callable[[], str] = lambda: secrets.token_urlsafe(18),
        require_keys: bool = False,
        max_sessions: int = 100_000,
        registrations_per_minute: int = REGISTRATIONS_PER_MINUTE,
        rates: CommandRates | None = None,
        max_history_bytes: int = MAX_HISTORY_BYTES,
        cluster: Cluster | None = None,
    ) -> None:
        # The other brokers of a cluster (docs/cluster.md); a single broker is `Alone`.
        self.cluster: Cluster = cluster if cluster is not None else Alone()
        self._registrations_per_minute = registrations_per_minute
        self.rates = rates or CommandRates()
        # Clients ping once per heartbeat interval: never refuse twice that.
        ping_floor = -(-2000 // limits.heartbeat_interval_ms)
        self._rate_of = {
            kind: max(rate, ping_floor) if kind == "ping" else rate
            for kind, rate in dataclasses.asdict(self.rates).items()
        }
        self.max_history_bytes = max_history_bytes
        self._command_budgets: dict[tuple[bytes, str], TokenBucket] = {}
        # Peers disconnected for misbehaving: only a LOGIN is read from them.
        self._cut_off: set[bytes] = set()
        self._latest_wall = 0
        self._wall_behind = False
        self.limits = limits
        self.require_keys = require_keys
        self.max_sessions = max_sessions
        self._registrations: dict[str, TokenBucket] = {}
        self.registry = Registry()
        self.store: Store = store if store is not None else MemoryStore()
        self._retention = retention or Retention()
        self._new_token = token_factory
        self._error_budgets: dict[bytes, TokenBucket] = {}
        # Per user, not per session, so leaving and logging in again does not reset it.
        self._send_budgets: dict[str, TokenBucket] = {}
        self._next_prune = 0
        self._pruning = False
        self._recipient_keys: dict[str, str] = {}  # see RECIPIENT_KEYS_KEPT
        # Joins, leaves and resumes since presence was last told, in order.
        self._presence_events: list[_PresenceEvent] = []
        self._hold_presence = False

    # Entry points

    def hold_presence(self) -> None:
        """From now on, keep joins and leaves until `take_presence` (once per turn)
        instead of telling them in each entry point's reply."""
        self._hold_presence = True

    @property
    def presence_pending(self) -> bool:
        """Whether joins or leaves wait for `take_presence`."""
        return bool(self._presence_events)

    def login_cost(self) -> int:
        """About how many messages and names a successful LOGIN now makes (its WELCOME's
        online list, and a PRESENCE to each other user told): what a shell that bounds its
        turns counts."""
        online = len(self.registry)
        return 1 + (2 * online if online < PRESENCE_BROADCAST_LIMIT else 0)

    def handle_frames(
        self,
        peer: bytes,
        frames: list[bytes],
        now: Clock,
        user_key: str | None = None,
        address: str = "",
    ) -> list[Outgoing]:
        """Handle one multipart message (routing id already stripped) from `peer`;
        `user_key` is its authenticated public key, `address` its IP address."""
        now = self._steady(now)
        return self._told(self._handle_frames(peer, frames, now, user_key, address))

    def _handle_frames(
        self, peer: bytes, frames: list[bytes], now: Clock, user_key: str | None, address: str
    ) -> list[Outgoing]:
        if self.require_keys and not user_key:
            log.warning("dropped a message with no authenticated key from %s", peer.hex())
            return []
        if not is_generated_routing_id(peer):
            log.warning("refused peer with a client-chosen routing id %r", peer[:32])
            return self._error(
                peer,
                now,
                ErrorCode.ROUTING_ID_REFUSED,
                "do not set ZMQ_ROUTING_ID; the broker assigns identities",
            )
        if peer in self._cut_off and codec.command_of(frames) != _LOGIN_FRAME:
            log.debug("ignored a message from %s: disconnected until it logs in", peer.hex())
            return []
        session = self.registry.by_peer(peer)
        if session is not None:
            if session.user_key != user_key:
                log.warning("dropped a message for %s signed by another key", session.name)
                return []
            self.registry.touch(session, now.mono)
        try:
            message = codec.decode(frames, max_body_bytes=self.limits.max_body_bytes)
        except RemoteProtocolError as exc:
            log.info("bad message from %s: %s", peer.hex(), exc.message)
            return self._error(peer, now, exc.code, exc.message, exc.ref)
        if not isinstance(message, CLIENT_COMMANDS):
            return self._error(
                peer, now, ErrorCode.UNKNOWN_COMMAND, f"{message.COMMAND} is sent by brokers only"
            )
        try:
            return self._handle(peer, message, now, user_key, address, session)
        except StoreUnavailable as exc:
            # Cluster mode with NATS out of reach: refuse, never acknowledge.
            log.warning("refused %s from %s: %s", message.COMMAND, peer.hex(), exc)
            if isinstance(message, Login):
                self.registry.deregister(peer)  # a login that could not finish
            ref = None
            if isinstance(message, Send):
                ref = _ref(message.id)
                self._gate_sends(peer, message, ErrorCode.UNAVAILABLE, 0, now)
            return self._error(
                peer, now, ErrorCode.UNAVAILABLE, "message storage is unavailable; retry", ref
            )

    def handle(
        self,
        peer: bytes,
        message: ClientMessage,
        now: Clock,
        user_key: str | None = None,
        address: str = "",
    ) -> list[Outgoing]:
        """Handle one decoded client message from `peer` (see `handle_frames`)."""
        now = self._steady(now)
        session = self.registry.by_peer(peer)
        return self._told(self._handle(peer, message, now, user_key, address, session))

    def _handle(
        self,
        peer: bytes,
        message: ClientMessage,
        now: Clock,
        user_key: str | None,
        address: str,
        session: Session | None,
    ) -> list[Outgoing]:
        """`session` is the peer's as the caller just looked it up (one lookup a message)."""
        if isinstance(message, Send):
            # The hot path first; SEND is limited per user, in `_send`.
            if session is None:
                if peer in self._cut_off:
                    return []
                return self._error(
                    peer, now, ErrorCode.NOT_LOGGED_IN, "log in first", _ref(message.id)
                )
            return self._send(session, message, now)
        if isinstance(message, Receipt):
            if session is not None:
                return self._receipt(session, message, now)
        elif (refusal := self._over_rate(peer, message, now)) is not None:
            return refusal
        if isinstance(message, Login):
            out = self._login(peer, message, now, user_key, address)
            if self.registry.by_peer(peer) is not None:
                self._cut_off.discard(peer)  # logged in again: read from it as from anyone
            return out
        if peer in self._cut_off:
            return []
        if isinstance(message, Leave):
            return self._leave(peer, now)
        session = self.registry.by_peer(peer)
        if session is None:
            return self._error(peer, now, ErrorCode.NOT_LOGGED_IN, "log in first")
        if isinstance(message, Read):
            return self._read(session, message, now)
        if isinstance(message, History):
            return self._history(session, message, now)
        if isinstance(message, Who):
            return [Outgoing(peer, Online(self._online_names(), now.wall))]
        if isinstance(message, Lookup):
            # The store's registry, as SEND's unknown_recipient check (and its length
            # bound): registered means a SEND to this name would not be refused for it.
            asked = message.name
            found = None
            if 0 < len(asked) <= 4 * self.limits.max_name_chars:
                found = self.store.lookup_user(name_key(asked))
            return [Outgoing(peer, NameInfo(found or asked, found is not None))]
        if isinstance(message, Ping):
            return [Outgoing(peer, Pong(now.wall))]
        raise AssertionError(f"unhandled client command {message!r}")  # our bug, not input

    def disconnected(self, peer: bytes, now: Clock) -> list[Outgoing]:
        """The connection of `peer` closed."""
        now = self._steady(now)
        self._error_budgets.pop(peer, None)
        self._cut_off.discard(peer)
        for command in _RATE_CLASSES.values():
            self._command_budgets.pop((peer, command), None)
        return self._told(self._end_session(peer, now, "disconnected"))

    def expire(self, now: Clock) -> list[Outgoing]:
        """End sessions silent for longer than the heartbeat timeout, and apply retention.
        Call periodically."""
        now = self._steady(now)
        out: list[Outgoing] = []
        for session in self.registry.stale(now.mono - self.limits.heartbeat_timeout_ms):
            out += self._end_session(session.peer, now, "heartbeat timeout")
        self._forget_full_buckets(now)
        if now.mono >= self._next_prune:
            self._next_prune = now.mono + PRUNE_EVERY_MS
            self._pruning = True
        if self._pruning:
            # A bounded step per call: a pass over a large store spans many loop turns.
            try:
                removed, finished = self.store.prune_step(
                    now.wall, self._retention.max_age_ms, self._retention.keep_per_user
                )
            except StoreUnavailable as exc:
                log.warning("retention paused: %s", exc)
                removed, finished = 0, False
            self._pruning = not finished
            if removed:
                log.info("retention removed %d old messages", removed)
        return self._told(out)

    def cluster_events(self, now: Clock) -> list[Outgoing]:
        """Apply what the other brokers of a cluster reported (see `cluster.py`) by the
        same rules as local commands. Call every loop turn."""
        now = self._steady(now)
        out: list[Outgoing] = []
        for event in self.cluster.events():
            session = self.registry.by_key(event.key)
            if isinstance(event, RemotePresence):
                if session is None:  # (online here too: it is moving, not joining)
                    presence = Presence(event.name, "joined" if event.online else "left", now.wall)
                    out += self._tell_remote_presence(event.key, presence)
                continue
            if session is None:
                continue  # not (or no longer) online here
            if isinstance(event, StreamGrew):
                if event.seq > session.cursor:
                    try:
                        out += self._fill_window(session, now, delayed=False)
                    except StoreUnavailable as exc:  # it comes with the next RECEIPT
                        log.warning("could not read %s's new mail: %s", session.name, exc)
            elif isinstance(event, Notice):
                out.append(Outgoing(session.peer, event.message))
                if isinstance(event.message, Delivered):
                    self.store.mark_sender_notified(event.message.broker_ids)
            elif isinstance(event, Moved):
                # The user logged in at another broker: this session is the stale one.
                # (No "left": the user is still online, elsewhere.) Its connection is
                # told, in case a client still listens on it (a takeover, or another
                # copy of a bot); one that failed over itself has closed it already.
                notice = Error(ErrorCode.TAKEN_OVER.value, f"{session.name} signed in elsewhere")
                out.append(Outgoing(session.peer, notice))
                self.registry.deregister(session.peer)
                self.cluster.left(session.key, announce=False)
                log.info("%s moved to another broker (%d online)", session.name, len(self.registry))
        return out

    def send_failed(self, failed: Outgoing, unreachable: bool, now: Clock) -> list[Outgoing]:
        """The shell could not send `failed`: the peer is gone (`unreachable`) or its
        queue is full. A DELIVER stays unconfirmed in the store; for a live session the
        window forgets it was sent, so the next fill offers it again. A gone peer's session
        ends (its mail waits for the next login)."""
        now = self._steady(now)
        if unreachable:
            # Its leave is told with the turn's others, so a storm of departures found
            # this way does not cascade into sends to peers that are gone too.
            return self._told(self._end_session(failed.peer, now, "unreachable"))
        message = failed.message
        session = self.registry.by_peer(failed.peer)
        in_flight = session.in_flight if session is not None else {}
        if isinstance(message, Deliver) and in_flight.pop(message.seq, None) is not None:
            assert session is not None
            session.cursor = min(session.cursor, message.seq - 1)
        return []

    # Commands

    def _login(
        self, peer: bytes, login: Login, now: Clock, user_key: str | None, address: str
    ) -> list[Outgoing]:
        if self.registry.by_peer(peer) is not None:
            return self._error(
                peer, now, ErrorCode.ALREADY_LOGGED_IN, "this connection is logged in"
            )
        try:
            name = validate_name(login.name, self.limits.max_name_chars)
        except RemoteProtocolError as exc:
            return self._error(peer, now, exc.code, exc.message)
        key = name_key(name)
        self.store.begin_session(key)
        claim = False
        owned = False  # by this connection's key: proof enough for `takeover`
        if user_key is not None:
            owner = self.store.name_owner(key)
            if owner is not None and owner != user_key:
                log.warning("refused %s: the name belongs to another key", name)
                return self._error(
                    peer, now, ErrorCode.NAME_OWNED, f"{name} belongs to another key; pick another"
                )
            claim = owner is None
            owned = owner == user_key
        resumed = False
        holder = self.registry.by_key(key)
        if holder is not None:
            token = login.resume_token
            # The owner's key asking for a takeover proves as much as the token does.
            proven = bool(login.takeover and owned) or _token_matches(token, holder)
            if not proven:
                return self._error(peer, now, ErrorCode.NAME_TAKEN, f"{holder.name} is online")
        elif (
            not (login.takeover and owned) and self.cluster.proves(key, login.resume_token) is False
        ):
            # Online at another broker of the cluster: the same rule as here.
            return self._error(peer, now, ErrorCode.NAME_TAKEN, f"{name} is online")
        elif len(self.registry) >= self.max_sessions:
            # Only a login that adds a session can find the broker full. `name_taken` comes
            # first: it tells a client whose old session still holds the name to retry.
            return self._error(peer, now, ErrorCode.SERVER_FULL, "the broker is full; try later")
        if claim:
            # Only a login that will succeed registers the name (and spends the token).
            refusal = self._claim(peer, key, name, user_key or "", address, now)
            if refusal is not None:
                return refusal
        told_off: list[Outgoing] = []
        if holder is not None:
            self.registry.deregister(holder.peer)
            resumed = True
            log.info("%s resumed on a new connection", holder.name)
            if holder.peer != peer and not _token_matches(login.resume_token, holder):
                # Taken over (`takeover`), not resumed by the client itself: tell the old
                # connection, so it stops instead of logging in again and again.
                notice = Error(ErrorCode.TAKEN_OVER.value, f"{name} signed in elsewhere")
                told_off.append(Outgoing(holder.peer, notice))
        session = Session(
            peer=peer,
            key=key,
            name=name,
            resume_token=self._new_token(),
            last_seen_ms=now.mono,
            user_key=user_key,
            contacts=self.store.contacts(key) or NO_CONTACTS,
        )
        others = self._visible_online(session)
        self.registry.register(session)
        self.store.remember_user(key, name, now.wall)
        log.info("%s logged in (%d online)", name, len(self.registry))
        told: list[Outgoing] = []
        if login.resume_from is not None and login.resume_from > 0:
            # The client has everything up to here, whatever receipts got lost.
            told = self._confirm(session, login.resume_from, now)
        mark = self.store.confirmed_through(key) or None  # absent on the wire means 0
        welcome = Welcome(name, now.wall, session.resume_token, self.limits, others, mark)
        out = [Outgoing(peer, welcome), *told_off, *told]
        out += self._fill_window(session, now, delayed=True)
        out += self._owed_receipts(session)
        # Someone already online at another broker of the cluster is no news to anyone.
        known_online = resumed or key in self.cluster.online_elsewhere()
        self._note_presence(session, "resumed" if known_online else "joined", now)
        self.cluster.joined(key, name, session.resume_token)
        return out

    def _claim(
        self, peer: bytes, key: str, name: str, user_key: str, address: str, now: Clock
    ) -> list[Outgoing] | None:
        """Register a new name to `user_key`, within the per-address limit; else refuse."""
        bucket = self._registrations.get(address)
        if bucket is None:
            rate = self._registrations_per_minute
            bucket = TokenBucket(rate / 60, max(REGISTRATION_BURST, rate), now.mono)
            self._registrations[address] = bucket
        retry_after = bucket.take(now.mono)
        if retry_after:
            return [
                Outgoing(
                    peer,
                    Error(
                        ErrorCode.RATE_LIMITED.value,
                        "too many new names from your address",
                        retry_after_ms=retry_after,
                    ),
                )
            ]
        try:
            self.store.claim_name(key, user_key, now.wall)
        except NameAlreadyClaimed:
            log.warning("refused %s: another broker registered it first", name)
            return self._error(
                peer, now, ErrorCode.NAME_OWNED, f"{name} belongs to another key; pick another"
            )
        log.info("%s now belongs to key %s", name, user_key[:8])
        return None

    def _leave(self, peer: bytes, now: Clock) -> list[Outgoing]:
        return [Outgoing(peer, Goodbye()), *self._end_session(peer, now, "left")]

    def _send(self, session: Session, send: Send, now: Clock) -> list[Outgoing]:
        peer = session.peer
        gate = session.send_gate
        if gate is not None:
            if send.id != gate.id and now.mono < gate.expires:
                # An earlier text was refused for now: this one must not overtake it.
                wait = max(1, gate.retry_at - now.mono)
                reason = f"held behind {gate.id}, refused {gate.code}: resend that first"
                return [Outgoing(peer, Error(gate.code, reason, _ref(send.id), wait))]
            session.send_gate = None  # the refused id came again, or the gate expired
        problem = self._check_send(send)
        if problem is not None:
            code, reason = problem
            return self._error(peer, now, code, reason, _ref(send.id))
        bucket = self._send_budgets.get(session.key)
        if bucket is None:
            bucket = TokenBucket(self.limits.rate_per_second, self.limits.rate_burst, now.mono)
            self._send_budgets[session.key] = bucket
        retry_after = bucket.take(now.mono)
        if retry_after:
            self._gate_sends(peer, send, ErrorCode.RATE_LIMITED, retry_after, now)
            # Not through the error budget: the client needs every one to retry right.
            error = Error(
                ErrorCode.RATE_LIMITED.value,
                f"too many messages; at most {self.limits.rate_per_second}/s",
                ref=_ref(send.id),
                retry_after_ms=retry_after,
            )
            return [Outgoing(peer, error)]
        return self.deliver_or_store(session, send, now)

    def _gate_sends(
        self, peer: bytes, send: Send, code: ErrorCode, retry_after: int, now: Clock
    ) -> None:
        """`send` was refused for now: hold the connection's other SENDs until it comes
        again (or a heartbeat timeout after its retry_after, for a client that never
        resends it)."""
        session = self.registry.by_peer(peer)
        if session is not None:
            retry_at = now.mono + retry_after
            expires = retry_at + self.limits.heartbeat_timeout_ms
            session.send_gate = SendGate(send.id, code.value, retry_at, expires)

    def deliver_or_store(self, session: Session, send: Send, now: Clock) -> list[Outgoing]:
        """Store a valid SEND in the recipient's stream, acknowledge it, and deliver it at
        once if the recipient is online with room in its window."""
        recipient_key = self._recipient_keys.get(send.to)
        if recipient_key is None:
            if len(self._recipient_keys) >= RECIPIENT_KEYS_KEPT:
                self._recipient_keys.clear()
            recipient_key = self._recipient_keys[send.to] = name_key(send.to)
        recipient_name = self.store.lookup_user(recipient_key)
        mailbox_full = (
            recipient_name is not None
            and self.store.unconfirmed_count(recipient_key) >= self.limits.max_mailbox
        )
        if recipient_name is None or mailbox_full:
            # A refusal must not hit a resend of a message that is already stored.
            earlier = self.store.find(session.key, send.id)
            if earlier is not None:
                return [self._acknowledge_again(session, send, earlier)]
        if recipient_name is None:
            return self._error(
                session.peer,
                now,
                ErrorCode.UNKNOWN_RECIPIENT,
                f"nobody is called {send.to}",
                send.id,
            )
        if mailbox_full:
            return self._error(
                session.peer,
                now,
                ErrorCode.MAILBOX_FULL,
                f"{recipient_name}'s mailbox is full ({self.limits.max_mailbox} messages"
                " waiting); it must be read before more can be sent",
                send.id,
            )
        try:
            stored = self.store.append(
                session.key, session.name, recipient_key, recipient_name, send.id, send.text,
                send.sent_at, now.wall,
            )  # fmt: skip
        except DuplicateMessage:
            earlier = self.store.find(session.key, send.id)
            assert earlier is not None  # the store just said it holds it
            again = self._acknowledge_again(session, send, earlier)
            recipient = self.registry.by_key(recipient_key)
            if recipient is None:
                return [again]
            # A write whose answer was lost (a publish that timed out, then landed) is
            # stored but was never delivered: the recipient's window is looked at again
            # (nothing new in it for a plain resend).
            return [*self._fill_window(recipient, now, delayed=False), again]
        accepted = Outgoing(session.peer, Accepted((send.id,), (stored.broker_id,), now.wall))
        if recipient_key not in session.contacts:
            session.add_contact(recipient_key)
        recipient = self.registry.by_key(recipient_key)
        if recipient is None:
            return [accepted]
        if session.key not in recipient.contacts:
            recipient.add_contact(session.key)
        if recipient.cursor == stored.seq - 1 and len(recipient.in_flight) < DELIVERY_WINDOW:
            # The usual case, a recipient that is keeping up: no need to read it back.
            # DELIVER goes first: the recipient is the one waiting.
            deliver = Outgoing(recipient.peer, self._deliver(stored, now, delayed=False))
            recipient.cursor = stored.seq
            recipient.in_flight[stored.seq] = stored
            return [deliver, accepted]
        return [*self._fill_window(recipient, now, delayed=False), accepted]

    def _acknowledge_again(self, session: Session, send: Send, earlier: StoredMessage) -> Outgoing:
        log.debug("%s resent %s; acknowledging again", session.name, send.id)
        return Outgoing(
            session.peer, Accepted((send.id,), (earlier.broker_id,), earlier.accepted_at)
        )

    def _receipt(self, session: Session, receipt: Receipt, now: Clock) -> list[Outgoing]:
        # Never beyond what this connection was sent: a client cannot confirm unseen mail.
        through = min(receipt.seq, session.cursor)
        if through <= self.store.confirmed_through(session.key) and (
            self._over_rate(session.peer, receipt, now) is not None
        ):
            return []  # confirms nothing new, again and again: ignored (never answered)
        out = self._confirm(session, through, now)
        if session.cursor >= self.store.last_seq(session.key):
            return out  # nothing more in the stream: skip the store read
        return out + self._fill_window(session, now, delayed=False)

    def _confirm(self, session: Session, through: int, now: Clock) -> list[Outgoing]:
        """Confirm `session`'s stream through seq `through` and tell the senders."""
        key = session.key
        mark = self.store.confirmed_through(key)
        through = min(through, self.store.last_seq(key))
        if through <= mark:
            return []  # a repeated or stale receipt
        confirmed = [m for seq, m in session.in_flight.items() if seq <= through]
        for message in confirmed:
            del session.in_flight[message.seq]
        if len(confirmed) < through - mark:
            # Confirmed without having been sent on this connection (LOGIN's resume_from).
            known = {m.seq for m in confirmed}
            confirmed += [
                m
                for m in self.store.unconfirmed(key, mark, through - mark)
                if m.seq <= through and m.seq not in known
            ]
        self.store.confirm_through(key, through, now.wall)
        return self._tell_delivered(session.name, confirmed, now)

    def _tell_delivered(
        self, recipient: str, messages: list[StoredMessage], now: Clock
    ) -> list[Outgoing]:
        """DELIVERED to each online sender of `messages`; owed to the offline ones."""
        by_sender: defaultdict[str, list[StoredMessage]] = defaultdict(list)
        for message in messages:
            by_sender[message.sender_key].append(message)
        out: list[Outgoing] = []
        for sender_key, sent in by_sender.items():
            sender = self.registry.by_key(sender_key)
            if sender is None:
                self.store.owe_receipts(m.broker_id for m in sent)
            for start in range(0, len(sent), MAX_IDS_PER_ACK):
                chunk = sent[start : start + MAX_IDS_PER_ACK]
                ids = tuple(m.client_id for m in chunk)
                broker_ids = tuple(m.broker_id for m in chunk)
                delivered = Delivered(recipient, now.wall, ids, broker_ids)
                if sender is None:
                    # Owed, and offered to the broker the sender may be online at.
                    self.cluster.tell(sender_key, delivered)
                else:
                    out.append(Outgoing(sender.peer, delivered))
        return out

    def _read(self, session: Session, read: Read, now: Clock) -> list[Outgoing]:
        message = self.store.mark_read(session.key, read.broker_id, now.wall)
        if message is None:
            return []
        sender = self.registry.by_key(message.sender_key)
        seen = Seen(message.client_id, message.broker_id, session.name, now.wall)
        if sender is None:
            self.cluster.tell(message.sender_key, seen)  # online at another broker, maybe
            return []
        return [Outgoing(sender.peer, seen)]

    def _history(self, session: Session, request: History, now: Clock) -> list[Outgoing]:
        # Refusals name the request (its optional id), so the SDK can tell which it was.
        ref = _ref(request.id) if request.id else None
        if request.limit <= 0:
            return self._error(
                session.peer, now, ErrorCode.MALFORMED, "limit must be positive", ref
            )
        before: int | None = None
        if request.before is not None:
            before = parse_broker_id(request.before)
            if before is None:
                return self._error(
                    session.peer, now, ErrorCode.MALFORMED, "before must be a broker id", ref
                )
        limit = min(request.limit, self.limits.max_history_page)
        peer_key = name_key(request.peer)
        # Room for the items once the page's own fields are paid for (generously).
        room = self.max_history_bytes - 64 - 6 * len(request.peer)
        items: list[HistoryItem] = []
        # Read in growing chunks, so a page that fills up with a few long texts does not
        # read the other rows of `limit` from the store first.
        chunk = HISTORY_FIRST_READ
        while True:
            want = min(chunk, limit - len(items))
            # The requester is always one side: nobody can read another's conversation.
            rows = self.store.history(session.key, peer_key, before, want + 1)
            for m in rows[:want]:
                item = HistoryItem(
                    m.broker_id, m.client_id, m.sender, m.recipient, m.text, m.sent_at,
                    m.accepted_at, m.delivered_at, m.read_at,
                )  # fmt: skip
                room -= len(codec.encode_body(item)) + 1
                if room < 0 and items:
                    # The page is full; `more` sends the client back for the rest.
                    return [Outgoing(session.peer, HistoryPage(request.peer, tuple(items), True))]
                items.append(item)
            more = len(rows) > want
            if not more or len(items) >= limit:
                return [Outgoing(session.peer, HistoryPage(request.peer, tuple(items), more))]
            before = int(rows[want - 1].broker_id)
            chunk *= 2

    # Helpers

    def _fill_window(self, session: Session, now: Clock, delayed: bool) -> list[Outgoing]:
        """Send the session's next unconfirmed messages, up to the window."""
        in_flight = session.in_flight
        room = DELIVERY_WINDOW - len(in_flight)
        if room <= 0:
            return []
        # Over-fetch by what is in flight: after a failed hand-off the cursor moved back,
        # and messages still awaiting their receipt are skipped, not sent twice.
        batch = self.store.unconfirmed(session.key, session.cursor, room + len(in_flight))
        out = []
        for message in batch:
            session.cursor = max(session.cursor, message.seq)
            if message.seq in in_flight:
                continue
            out.append(Outgoing(session.peer, self._deliver(message, now, delayed)))
            in_flight[message.seq] = message
            if len(in_flight) >= DELIVERY_WINDOW:
                break
        return out

    def _deliver(self, message: StoredMessage, now: Clock, delayed: bool) -> Deliver:
        return Deliver(
            message.client_id, message.broker_id, message.sender, message.text,
            message.sent_at, message.accepted_at, message.seq,
            delayed or now.wall - message.accepted_at > self.limits.heartbeat_timeout_ms,
        )  # fmt: skip

    def _owed_receipts(self, session: Session) -> list[Outgoing]:
        """DELIVERED for our messages confirmed while we were offline."""
        owed = self.store.receipts_owed(session.key, RECEIPTS_PER_LOGIN)
        if not owed:
            return []
        self.store.mark_sender_notified(m.broker_id for m in owed)
        # One per message; the shell's `coalesce` merges neighbours with the same recipient
        # and time.
        return [
            Outgoing(
                session.peer,
                Delivered(
                    m.recipient, m.delivered_at or m.accepted_at, (m.client_id,), (m.broker_id,)
                ),
            )
            for m in owed
        ]

    def _check_send(self, send: Send) -> tuple[ErrorCode, str] | None:
        limits = self.limits
        if not 0 < len(send.id) <= MAX_ID_CHARS:
            return ErrorCode.MALFORMED, f"id must be 1 to {MAX_ID_CHARS} characters"
        if not send.text:
            return ErrorCode.MALFORMED, "text is empty"
        if len(send.text) > limits.max_text_chars:
            return ErrorCode.TOO_LARGE, (
                f"text is {len(send.text)} characters, limit is {limits.max_text_chars}"
            )
        # UTF-8 takes at most four bytes a character: most texts need no encoding to tell.
        if 4 * len(send.text) > limits.max_text_bytes:
            size = len(send.text.encode("utf-8"))
            if size > limits.max_text_bytes:
                return ErrorCode.TOO_LARGE, (
                    f"text is {size} bytes, limit is {limits.max_text_bytes}"
                )
        # Generous bound: a decomposed spelling of a valid name is longer than the name.
        if not send.to or len(send.to) > 4 * limits.max_name_chars:
            return ErrorCode.UNKNOWN_RECIPIENT, "no such name"
        return None

    def _forget_full_buckets(self, now: Clock) -> None:
        # Cheap enough at the expiry tick: a bucket is dropped once it could not limit anyone.
        for peer, bucket in list(self._error_budgets.items()):
            if bucket.is_full(now.mono) and peer not in self._cut_off:
                del self._error_budgets[peer]
        for pair, bucket in list(self._command_budgets.items()):
            if bucket.is_full(now.mono):
                del self._command_budgets[pair]
        for key, bucket in list(self._send_budgets.items()):
            if bucket.is_full(now.mono) and self.registry.by_key(key) is None:
                del self._send_budgets[key]
        for address, bucket in list(self._registrations.items()):
            if bucket.is_full(now.mono):
                del self._registrations[address]

    def _online_names(self) -> tuple[str, ...]:
        """Everyone online, here and (in a cluster) at the other brokers."""
        online = dict(self.cluster.online_elsewhere())
        online.update((s.key, s.name) for s in self.registry)
        return tuple(online[key] for key in sorted(online))

    def _visible_online(self, session: Session) -> tuple[str, ...]:
        """Who a user logging in is told is online (see PRESENCE_BROADCAST_LIMIT)."""
        elsewhere = self.cluster.online_elsewhere()
        if len(self.registry) + len(elsewhere) < PRESENCE_BROADCAST_LIMIT:
            return self._online_names()
        names = {s.name for s in (self.registry.by_key(k) for k in session.contacts) if s}
        names.update(elsewhere[k] for k in session.contacts if k in elsewhere)
        return tuple(sorted(names))

    def _tell_remote_presence(self, key: str, presence: Presence) -> list[Outgoing]:
        """PRESENCE of a user at another broker, to the users here who should hear it."""
        if len(self.registry) <= PRESENCE_BROADCAST_LIMIT:
            targets = list(self.registry)
        else:
            targets = [s for s in self.registry if key in s.contacts]
        return [Outgoing(s.peer, presence) for s in targets]

    def _note_presence(self, session: Session, kind: str, now: Clock) -> None:
        event = _PresenceEvent(session, kind, now.wall, len(self.registry))
        self._presence_events.append(event)

    def _told(self, out: list[Outgoing]) -> list[Outgoing]:
        """`out`, and the presence it caused unless presence is held for the turn."""
        if self._hold_presence or not self._presence_events:
            return out
        return out + self.take_presence()

    def take_presence(self) -> list[Outgoing]:
        """PRESENCE for the joins and leaves since the last call, one per user whose
        state changed for a recipient. A recipient's view was right at the turn's start,
        or at its own WELCOME if it logged in during the turn (that WELCOME listed who
        was online then); it hears each user whose state differs now, as the rule of
        `PRESENCE_BROADCAST_LIMIT` allows. Only users online now are told."""
        events, self._presence_events = self._presence_events, []
        if not events:
            return []
        # Per user: its state at the turn's start, its events in order, its last event.
        history: dict[str, list[tuple[int, bool]]] = defaultdict(list)
        started_online: dict[str, bool] = {}
        last: dict[str, _PresenceEvent] = {}
        # Where each user's own view became right (the index of its latest login).
        view_from: dict[bytes, int] = {}
        for index, event in enumerate(events):
            key = event.session.key
            online = event.kind != "left"
            started_online.setdefault(key, event.kind != "joined")
            history[key].append((index, online))
            last[key] = event
            if online:
                view_from[event.session.peer] = index
        latest_view = max(view_from.values(), default=-1)
        out: list[Outgoing] = []
        for key, event in last.items():
            online_now = event.kind != "left"
            steps = history[key]
            if started_online[key] == online_now and latest_view < steps[0][0]:
                continue  # back where it started for everyone (a join then leave)
            presence = Presence(event.session.name, "joined" if online_now else "left", event.at)
            # The usual recipient's view was right at the turn's start.
            changed_since_start = started_online[key] != online_now
            for recipient in self._presence_targets(event):
                since = view_from.get(recipient.peer)
                if since is None:
                    if changed_since_start and recipient.key != key:
                        out.append(Outgoing(recipient.peer, presence))
                    continue
                if recipient.key == key:
                    continue
                was_online = started_online[key]
                for index, online in steps:
                    if index > since:
                        break
                    was_online = online
                if was_online != online_now:
                    out.append(Outgoing(recipient.peer, presence))
        return out

    def _presence_targets(self, event: _PresenceEvent) -> list[Session]:
        """Who may hear of `event`'s user, online now (see PRESENCE_BROADCAST_LIMIT,
        counted right after the event)."""
        if event.online_after <= PRESENCE_BROADCAST_LIMIT:
            return list(self.registry)
        found = (self.registry.by_key(k) for k in event.session.contacts)
        return [s for s in found if s is not None]

    def _end_session(self, peer: bytes, now: Clock, why: str) -> list[Outgoing]:
        """End `peer`'s session; its leave is noted for `take_presence`."""
        session = self.registry.deregister(peer)
        if session is None:
            return []
        self.cluster.left(session.key)
        log.info("%s is offline (%s; %d online)", session.name, why, len(self.registry))
        self._note_presence(session, "left", now)
        return []

    def _steady(self, now: Clock) -> Clock:
        """`now` with its wall time held at the latest seen: after the machine's clock
        steps back, `accepted_at` and the other timestamps stay where they were until the
        clock catches up, so they never go back within one run of the broker."""
        if now.wall >= self._latest_wall:
            if self._wall_behind:
                self._wall_behind = False
                log.warning("the wall clock has caught up; timestamps move again")
            self._latest_wall = now.wall
            return now
        if not self._wall_behind:
            self._wall_behind = True
            log.warning(
                "the wall clock stepped back %d ms; timestamps hold until it catches up",
                self._latest_wall - now.wall,
            )
        return Clock(self._latest_wall, now.mono)

    def _over_rate(self, peer: bytes, message: ClientMessage, now: Clock) -> list[Outgoing] | None:
        """None if `peer` may send `message` now (a token is taken); else the refusal."""
        kind = _RATE_CLASSES[type(message)]
        bucket = self._command_budgets.get((peer, kind))
        if bucket is None:
            rate = self._rate_of[kind]
            bucket = TokenBucket(rate, self.rates.burst(rate), now.mono)
            self._command_budgets[(peer, kind)] = bucket
        retry_after = bucket.take(now.mono)
        if not retry_after:
            return None
        if isinstance(message, Read | Receipt):
            log.debug("ignored %s from %s: over its rate", message.COMMAND, peer.hex())
            return []  # never answered, so not refused either
        # A request that names itself (`id`) gets it back as `ref`, so the client can
        # retry it; the refusal still spends the error budget like one without.
        request_id = getattr(message, "id", None)
        return self._error(
            peer,
            now,
            ErrorCode.RATE_LIMITED,
            f"too many {message.COMMAND}; at most {self._rate_of[kind]}/s",
            ref=_ref(request_id) if isinstance(request_id, str) else None,
            retry_after_ms=retry_after,
            budgeted=True,
        )

    def _disconnect(self, peer: bytes, now: Clock, why: str) -> list[Outgoing]:
        """End `peer`'s session and ignore it until it logs in again."""
        if peer in self._cut_off:
            return []
        self._cut_off.add(peer)
        session = self.registry.by_peer(peer)
        log.warning(
            "disconnecting %s (%s): %s; only a LOGIN is read from it now",
            peer.hex(),
            session.name if session is not None else "not logged in",
            why,
        )
        notice = Error(ErrorCode.NOT_LOGGED_IN.value, f"disconnected: {why}; log in again")
        return [Outgoing(peer, notice), *self._end_session(peer, now, "disconnected")]

    def _error(
        self,
        peer: bytes,
        now: Clock,
        code: ErrorCode,
        reason: str,
        ref: str | None = None,
        retry_after_ms: int | None = None,
        budgeted: bool = False,
    ) -> list[Outgoing]:
        """An ERROR for `peer`. One that answers a SEND (`ref`, not `budgeted`) always
        goes out; others spend the error budget and are dropped once it is used up.
        Misbehaviour beyond the budget disconnects the peer."""
        error = Outgoing(peer, Error(code.value, reason, ref=ref, retry_after_ms=retry_after_ms))
        misbehaving = code in MISBEHAVIOUR
        if ref is not None and not misbehaving and not budgeted:
            return [error]
        bucket = self._error_budgets.get(peer)
        if bucket is None:
            bucket = TokenBucket(ERROR_RATE_PER_SECOND, ERROR_BURST, now.mono)
            self._error_budgets[peer] = bucket
        if not bucket.take(now.mono):
            return [error]
        if misbehaving:
            why = f"error budget used up ({code.value}: {reason})"
            return ([error] if ref is not None else []) + self._disconnect(peer, now, why)
        log.debug("dropping error %s for %s: error budget used up", code.value, peer.hex())
        return []
