"""The client side of the protocol as a state machine with no I/O.

Theory of operation
-------------------
States: DISCONNECTED -> (connect) -> LOGGING_IN -> (WELCOME) -> ONLINE -> (LEAVE/GOODBYE)
-> CLOSED. A refused login also ends in CLOSED. Silence from the broker for longer than
the heartbeat timeout, in LOGGING_IN or ONLINE, yields `ConnectionLost` and
DISCONNECTED: the driver then opens a fresh socket (after a `Backoff` delay) and calls
`connect()` again, which logs in with the resume token so the broker hands over our
name even if it has not noticed the old connection die.

The driver feeds in what arrives (`receive`), calls `tick` by `next_deadline()`, and
sends whatever `data_to_send()` returns. Time is always passed in (ms since epoch).

Outgoing texts sit in an outbox until ACCEPTED (or refused for good). After a re-login
every unacknowledged text is sent again with its original id, which the broker treats
as idempotent. A text the broker refuses in a way worth retrying goes back to the
outbox, and no text is sent until every text still on the wire has been answered and
the ERROR's retry_after_ms, or else a backoff doubling from RETRY_INITIAL_MS up to
RETRY_MAX_MS (`retry_delay_ms`), has passed; then the outbox goes out oldest first, the
refused text ahead of later ones (the broker holds a connection's later SENDs until the
refused id comes again, so the recipient sees them in order). Flow control
(`rate_limited`; `unavailable`: the cluster store could not keep it) is retried for as
long as the session lives, never counted against the text; another such refusal
(`internal`...) fails the text after MAX_SEND_ATTEMPTS attempts with the broker's code.
WHO, HISTORY and LOOKUP carry an id, and one refused with it as `ref` (rate limited) is
asked again the same way, up to MAX_SEND_ATTEMPTS times. A text
on the wire that gets no answer within the answer timeout (the announced heartbeat
timeout, doubling with each attempt) is sent again with the same id; after
MAX_SEND_ATTEMPTS unanswered attempts it is reported failed (`no_answer`), so an
in-flight slot is always freed, even by a broker that drops its answers.

Incoming messages are de-duplicated by stream seq. Two contiguous marks are kept: what
has been received (for dropping repeats) and what the application has confirmed it
finished with (`confirm`). Only the second goes into RECEIPT and LOGIN.resume_from,
so a process that dies holding messages it has not handled gets them again. A message
can also be confirmed `after` texts sent for it (a bot's reply): it then counts as
finished only once those texts have been accepted or refused for good. A RECEIPT
goes out with the next frames after the confirmed mark moves, and for every repeated
DELIVER (the broker is resending, so an earlier RECEIPT may have been lost).
"""

from __future__ import annotations

import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from enum import Enum

from . import codec
from .constants import HEARTBEAT_INTERVAL_MS, HEARTBEAT_TIMEOUT_MS
from .errors import ErrorCode, LocalProtocolError, RemoteProtocolError
from .events import (
    BrokerError,
    Closed,
    ConnectionLost,
    Event,
    HistoryReceived,
    IncomingMessage,
    LoggedIn,
    LoginRefused,
    MessageAccepted,
    MessageDelivered,
    MessageFailed,
    MessageRead,
    NameStatus,
    OnlineUsers,
    PresenceChanged,
)
from .messages import (
    Accepted,
    ClientMessage,
    Deliver,
    Delivered,
    Error,
    Goodbye,
    History,
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
from .names import name_key
from .ratelimit import TokenBucket

MAX_OUTBOX = 10_000
# Texts on the wire awaiting ACCEPTED; more wait in the outbox. Keeps a reconnect's
# resend of a long outbox inside the socket's high-water mark.
MAX_IN_FLIGHT = 256
# Transmissions of one text without any answer before it is reported failed. The wait
# for an answer starts at the heartbeat timeout and doubles: 1 + 2 + 4 + 8 = 15 times
# the heartbeat timeout in all.
MAX_SEND_ATTEMPTS = 4
# The SDK's own failure code for a text the broker never answered (not a wire code).
NO_ANSWER = "no_answer"
# A refusal worth retrying (`unavailable`, `rate_limited`, `internal`...) that carries no
# retry_after_ms is retried after RETRY_INITIAL_MS, doubling with each refusal of the
# same text, up to RETRY_MAX_MS.
RETRY_INITIAL_MS = 250
RETRY_MAX_MS = 4000
# WHO, HISTORY and LOOKUP requests awaiting their answer that the session remembers (by
# id), and for how long: enough to retry them after `rate_limited`.
MAX_REQUESTS = 64
REQUEST_KEEP_MS = 60_000
# The share of the broker's announced send rate the session allows itself.
PACE_FRACTION = 0.9

# Refusals after which resending the same message cannot help.
_FINAL_SEND_ERRORS = frozenset(
    {
        ErrorCode.UNKNOWN_RECIPIENT.value,
        ErrorCode.MAILBOX_FULL.value,
        ErrorCode.TOO_LARGE.value,
        ErrorCode.MALFORMED.value,
    }
)
# Refusals of a SEND that are flow control, not a verdict on the text: the broker is
# busy (`rate_limited`) or its cluster store is briefly down (`unavailable`). Retried
# without a count limit while the session lives; a text must not be lost for being sent
# fast.
_FLOW_CONTROL_ERRORS = frozenset({ErrorCode.RATE_LIMITED.value, ErrorCode.UNAVAILABLE.value})
_LOGIN_ERRORS = frozenset(
    {
        ErrorCode.NAME_TAKEN.value,
        ErrorCode.NAME_OWNED.value,
        ErrorCode.SERVER_FULL.value,
        ErrorCode.NAME_INVALID.value,
        ErrorCode.UNSUPPORTED_VERSION.value,
        ErrorCode.ROUTING_ID_REFUSED.value,
    }
)


class State(Enum):
    DISCONNECTED = "disconnected"
    LOGGING_IN = "logging in"
    ONLINE = "online"
    CLOSED = "closed"


@dataclass
class _Pending:
    send: Send
    transmitted: bool
    # When the latest transmission went out, and how many there were on this login.
    sent_at: int = 0
    attempts: int = 0
    # Flow-control refusals of it in a row (`_FLOW_CONTROL_ERRORS`): only for the backoff.
    refusals: int = 0


def retry_delay_ms(refusals: int, retry_after_ms: int | None) -> int:
    """How long to wait before sending again what the broker refused `refusals` times in
    a row (1 for the first refusal): its `retry_after_ms` if it gave one, else a bounded
    exponential backoff (RETRY_INITIAL_MS doubling up to RETRY_MAX_MS)."""
    if retry_after_ms is not None and retry_after_ms >= 0:
        return retry_after_ms
    return min(RETRY_MAX_MS, RETRY_INITIAL_MS << min(max(0, refusals - 1), 16))


@dataclass
class _Request:
    """A WHO, HISTORY or LOOKUP sent with an id, until its answer (or final refusal)."""

    message: Who | History | Lookup
    made_at: int
    attempts: int = 1
    # Set while it waits to go again after a refusal: when it may.
    resend_at: int | None = None


_id_lock = threading.Lock()
_last_id_time = 0


def new_message_id() -> str:
    """A fresh message id: 32 hex digits, the time in microseconds then 72 random bits.
    Ids grow in the order a process makes them, which lets the broker tell a new message
    from a resend without looking the id up (it still checks any id that does not grow)."""
    global _last_id_time
    with _id_lock:
        _last_id_time = max(time.time_ns() // 1000, _last_id_time + 1)
        stamp = _last_id_time
    return f"{stamp:014x}{secrets.token_hex(9)}"


class ClientSession:
    """One user's conversation with a broker, independent of sockets.

    Args:
        name: the name to log in with.
        id_factory: makes client message ids (unique per sender).
        takeover: ask the broker to end the name's session that is online elsewhere
            (encrypted brokers only, for the key that owns the name). Only the first
            login asks: once logged in, reconnects resume with the token as usual.
    """

    def __init__(
        self,
        name: str,
        *,
        id_factory: Callable[[], str] = new_message_id,
        takeover: bool = False,
    ) -> None:
        self.name = name
        self.takeover = takeover
        self.state = State.DISCONNECTED
        self.limits: Limits | None = None
        self.online: dict[str, str] = {}
        self._new_id = id_factory
        self._resume_token: str | None = None
        self._has_logged_in = False
        self._outgoing: list[list[bytes]] = []
        self._outbox: OrderedDict[str, _Pending] = OrderedDict()
        # Every seq up to `_stream_mark` has been received; `_above_mark` holds those
        # received beyond a gap. Only used to drop repeats.
        self._stream_mark: int | None = None
        self._above_mark: set[int] = set()
        # Every seq up to `_confirmed_mark` is finished with by the application; this is
        # what RECEIPT and resume_from carry. `_confirmed_above`: confirmed beyond a gap.
        self._confirmed_mark: int | None = None
        self._confirmed_above: set[int] = set()
        # Confirmations that wait for texts sent on the message's behalf (its reply):
        # seq -> ids still in the outbox, and each such id -> its seq.
        self._held_confirms: dict[int, set[str]] = {}
        self._holding_text: dict[str, int] = {}
        self._receipt_due = False
        # Ids of the texts on the wire awaiting an answer (a set, so that freeing a slot
        # twice cannot miscount).
        self._in_flight: set[str] = set()
        # WHO / HISTORY / LOOKUP sent with an id and not yet answered, oldest first.
        self._requests: OrderedDict[str, _Request] = OrderedDict()
        self._pace: TokenBucket | None = None
        self._pace_until = 0
        self._last_received = 0
        self._last_sent = 0
        self._hold_until = 0
        # After a refusal: nothing is sent until every text on the wire has its answer
        # (the broker holds them behind the refused one), so the outbox goes again in
        # order, the refused text first.
        self._settling = False

    # Driver API

    @property
    def heartbeat_interval_ms(self) -> int:
        return self.limits.heartbeat_interval_ms if self.limits else HEARTBEAT_INTERVAL_MS

    @property
    def heartbeat_timeout_ms(self) -> int:
        return self.limits.heartbeat_timeout_ms if self.limits else HEARTBEAT_TIMEOUT_MS

    @property
    def unacknowledged(self) -> tuple[Send, ...]:
        """Texts sent but not yet accepted by the broker, oldest first."""
        return tuple(p.send for p in self._outbox.values())

    @property
    def outbox_size(self) -> int:
        """How many texts await their answer (on the wire or still queued)."""
        return len(self._outbox)

    @property
    def confirmed_mark(self) -> int:
        """The stream seq up to which the application has confirmed every message."""
        return self._confirmed_mark or 0

    @property
    def answer_timeout_ms(self) -> int:
        """How long a first transmission of a text waits for its answer."""
        return self.heartbeat_timeout_ms

    def connect(self, now: int) -> None:
        """Start (or restart, on a fresh socket) logging in."""
        if self.state is State.CLOSED:
            raise LocalProtocolError(ErrorCode.INTERNAL, "session is closed")
        self.state = State.LOGGING_IN
        self._outgoing.clear()
        self._receipt_due = False
        for pending in self._outbox.values():
            pending.transmitted = False
            pending.attempts = 0  # a broker that was away is no verdict on the text
            pending.refusals = 0
        self._in_flight.clear()
        self._settling = False
        for request_id, request in list(self._requests.items()):
            if now - request.made_at > REQUEST_KEEP_MS:
                del self._requests[request_id]
            else:
                request.resend_at = now  # asked again once logged in
        self._last_received = now
        takeover = True if self.takeover else None  # absent on the wire unless asked
        self._queue(Login(self.name, self._resume_token, self._confirmed_mark, takeover), now)

    def send_text(self, to: str, text: str, now: int) -> str:
        """Queue a private message; returns its id. It goes out now if we are online,
        else as soon as we are."""
        if self.state is State.CLOSED:
            raise LocalProtocolError(ErrorCode.INTERNAL, "session is closed")
        if len(self._outbox) >= MAX_OUTBOX:
            raise LocalProtocolError(ErrorCode.TOO_LARGE, "too many unacknowledged messages")
        message_id = self._new_id()
        send = Send(message_id, to, text, now)
        codec.encode(send)  # raises LocalProtocolError now, not later, for unsendable text
        self._outbox[message_id] = _Pending(send, transmitted=False)
        self._flush_outbox(now)
        return message_id

    def confirm(self, seq: int, now: int, *, after: Iterable[str] = ()) -> None:
        """The application has finished with the incoming message at stream `seq` (shown
        it, written it out, handled it). Confirm each message once it is done, in any
        order: a RECEIPT confirms only up to the first message not yet finished, and
        whatever was received but not confirmed comes again at the next login, also in
        another process. A seq that was never received is ignored.

        `after` names texts sent on the message's behalf (a bot's reply): the message
        counts as finished only once each of them has left the outbox, accepted by the
        broker or refused for good (`MessageAccepted` or `MessageFailed`). A process that
        dies before then gets the message again and can answer it again."""
        waiting = {message_id for message_id in after if message_id in self._outbox}
        if waiting:
            self._held_confirms.setdefault(seq, set()).update(waiting)
            for message_id in waiting:
                self._holding_text[message_id] = seq
            return
        if seq in self._held_confirms:
            return  # confirmed again while its texts are still on their way
        self._confirm_now(seq)

    def held_confirms(self) -> dict[int, frozenset[str]]:
        """Messages handled but not yet confirmed because texts sent for them (seq ->
        their ids) are not yet accepted."""
        return {seq: frozenset(ids) for seq, ids in self._held_confirms.items()}

    def request_online(self, now: int) -> str:
        """Ask who is online; the answer arrives as `OnlineUsers`. Returns the request's
        id: a refusal the session gives up on arrives as `BrokerError` with it as `ref`.

        `rate_limited` (and other refusals naming the id) are retried after the
        broker's `retry_after_ms`, up to MAX_SEND_ATTEMPTS sends in all; a request on
        the wire when the connection is lost is asked again after the next login."""
        return self._request(Who(id=self._new_id()), now)

    def lookup_name(self, name: str, now: int) -> str:
        """Ask whether `name` is registered; the answer arrives as `NameStatus`. Returns
        the request's id (retries as for `request_online`)."""
        return self._request(Lookup(name, id=self._new_id()), now)

    def mark_read(self, broker_id: str, now: int) -> None:
        """Tell the sender of message `broker_id` that our user has seen it."""
        if self.state is State.ONLINE:
            self._queue_due_receipt(now)  # the RECEIPT for a message goes before its READ
            self._queue(Read(broker_id), now)

    def request_history(self, peer: str, limit: int, before: str | None, now: int) -> str:
        """Ask for older messages with `peer`; they arrive as `HistoryReceived`. Returns
        the request's id (retries as for `request_online`)."""
        return self._request(History(peer, limit, before, id=self._new_id()), now)

    def leave(self, now: int) -> None:
        """End the session; `Closed` follows when the broker confirms."""
        if self.state is State.ONLINE:
            self._queue_due_receipt(now)  # what the application finished with, before we go
            self._queue(Leave(), now)
        else:
            self.state = State.CLOSED

    def data_to_send(self) -> list[list[bytes]]:
        """Messages to send, in order, each a list of frames: protocol version 3, so one
        frame each (`codec.encode`). Each call hands them over once.

        Call it after feeding in everything that has arrived and confirming what the
        application finished with: one RECEIPT covers them all."""
        self._queue_due_receipt(self._last_sent)
        out, self._outgoing = self._outgoing, []
        return out

    def next_deadline(self) -> int | None:
        """When `tick` must next be called, or None if nothing is timed."""
        if self.state not in (State.LOGGING_IN, State.ONLINE):
            return None
        deadline = self._last_received + self.heartbeat_timeout_ms
        if self.state is State.ONLINE:
            deadline = min(deadline, self._last_sent + self.heartbeat_interval_ms)
            if self._settling and self._in_flight:
                pass  # an answer moves things on (or the answer timeout, below)
            elif self._pace_until or (
                self._hold_until and any(not p.transmitted for p in self._outbox.values())
            ):
                # Whichever ends later: a pacing wait that ended during a hold would
                # otherwise ask for a tick in the past, again and again (a busy loop).
                deadline = min(deadline, max(self._pace_until, self._hold_until))
            for message_id in self._in_flight:
                deadline = min(deadline, self._answer_deadline(self._outbox[message_id]))
            for request in self._requests.values():
                if request.resend_at is not None:
                    deadline = min(deadline, request.resend_at)
        return deadline

    def tick(self, now: int) -> list[Event]:
        """Run timers: heartbeats, broker-death detection, rate-limit retries, and
        resending (or, at last, failing) texts that got no answer."""
        if self.state not in (State.LOGGING_IN, State.ONLINE):
            return []
        if now - self._last_received > self.heartbeat_timeout_ms:
            self.state = State.DISCONNECTED
            self._outgoing.clear()
            return [ConnectionLost(f"no reply from the broker for {self.heartbeat_timeout_ms} ms")]
        events: list[Event] = []
        if self.state is State.ONLINE:
            events = self._expire_unanswered(now)
            self._flush_outbox(now)
            self._resend_requests(now)
            if now - self._last_sent >= self.heartbeat_interval_ms:
                self._queue(Ping(), now)
        return events

    def receive(self, frames: list[bytes], now: int) -> list[Event]:
        """Handle one message from the broker (in either framing; a broker answers
        version 3 to our version 3).

        Raises:
            RemoteProtocolError: the broker sent something invalid (log it and go on).
        """
        self._last_received = now
        message = codec.decode(frames)
        if isinstance(message, Welcome):
            return self._on_welcome(message, now)
        if isinstance(message, Error):
            return self._on_error(message, now)
        if isinstance(message, Accepted | Delivered) and len(message.ids) != len(
            message.broker_ids
        ):
            raise RemoteProtocolError(
                ErrorCode.MALFORMED, f"{message.COMMAND}: ids and broker_ids differ in length"
            )
        if isinstance(message, Accepted):
            return self._on_accepted(message, now)
        if isinstance(message, Deliver):
            return self._on_deliver(message, now)
        if isinstance(message, Delivered):
            return [
                MessageDelivered(message_id, broker_id, message.to, message.delivered_at)
                for message_id, broker_id in zip(message.ids, message.broker_ids, strict=True)
            ]
        if isinstance(message, Seen):
            return [MessageRead(message.id, message.broker_id, message.by, message.read_at)]
        if isinstance(message, HistoryPage):
            self._answered(History)
            return [HistoryReceived(message.peer, message.items, message.more)]
        if isinstance(message, Presence):
            joined = message.event == "joined"
            if joined:
                self.online[name_key(message.name)] = message.name
            else:
                self.online.pop(name_key(message.name), None)
            return [PresenceChanged(message.name, joined, message.at)]
        if isinstance(message, Online):
            self._answered(Who)
            self.online = {name_key(n): n for n in message.users}
            return [OnlineUsers(message.users)]
        if isinstance(message, NameInfo):
            self._answered(Lookup)
            return [NameStatus(message.name, message.registered)]
        if isinstance(message, Pong):
            return []
        if isinstance(message, Goodbye):
            self.state = State.CLOSED
            return [Closed()]
        raise RemoteProtocolError(
            ErrorCode.UNKNOWN_COMMAND, f"{message.COMMAND} is not sent by brokers"
        )

    # Internals

    def _request(self, message: Who | History | Lookup, now: int) -> str:
        assert message.id is not None
        while len(self._requests) >= MAX_REQUESTS:
            self._requests.popitem(last=False)  # the oldest: nobody waits that long
        if self.state is State.ONLINE:
            self._requests[message.id] = _Request(message, now)
            self._queue(message, now)
        else:
            self._requests[message.id] = _Request(message, now, attempts=0, resend_at=now)
        return message.id

    def _answered(self, kind: type[Who | History | Lookup]) -> None:
        """An answer to a `kind` request came: the broker answers in order, so it is the
        oldest of that kind on the wire (from an older broker, maybe one it refused
        without a ref; forgetting that one is harmless)."""
        for request_id, request in self._requests.items():
            if isinstance(request.message, kind) and request.resend_at is None:
                del self._requests[request_id]
                return

    def _resend_requests(self, now: int) -> None:
        for request in self._requests.values():
            if request.resend_at is not None and now >= request.resend_at:
                request.resend_at = None
                request.attempts += 1
                self._queue(request.message, now)

    def _request_refused(self, request_id: str, error: Error, now: int) -> list[Event]:
        request = self._requests[request_id]
        retryable = error.code not in _FINAL_SEND_ERRORS and error.code not in _LOGIN_ERRORS
        if retryable and request.attempts < MAX_SEND_ATTEMPTS and request.resend_at is None:
            # Rate limited (most likely): ask again once the broker lets us.
            request.resend_at = now + retry_delay_ms(request.attempts, error.retry_after_ms)
            return []
        del self._requests[request_id]
        message = error.message
        if retryable:
            message = f"{message} (refused {request.attempts} times; gave up)"
        return [BrokerError(error.code, message, error.retry_after_ms, request_id)]

    def _confirm_now(self, seq: int) -> None:
        received = seq <= (self._stream_mark or 0) or seq in self._above_mark
        mark = self._confirmed_mark or 0
        if not received or seq <= mark or seq in self._confirmed_above:
            return
        self._confirmed_above.add(seq)
        while mark + 1 in self._confirmed_above:
            mark += 1
            self._confirmed_above.discard(mark)
        if mark != (self._confirmed_mark or 0):
            self._confirmed_mark = mark
            self._receipt_due = True

    def _left_outbox(self, message_id: str) -> None:
        """Text `message_id` was accepted or given up: a confirmation waiting for it may
        go ahead."""
        seq = self._holding_text.pop(message_id, None)
        if seq is None:
            return
        waiting = self._held_confirms.get(seq)
        if waiting is None:
            return
        waiting.discard(message_id)
        if not waiting:
            del self._held_confirms[seq]
            self._confirm_now(seq)

    def _queue_due_receipt(self, now: int) -> None:
        if self._receipt_due and self.state is State.ONLINE:
            self._receipt_due = False
            self._queue(Receipt(self._confirmed_mark or 0), now)

    def _queue(self, message: ClientMessage, now: int) -> None:
        self._outgoing.append(codec.encode(message))
        self._last_sent = now

    def _answer_deadline(self, pending: _Pending) -> int:
        return pending.sent_at + (self.answer_timeout_ms << max(0, pending.attempts - 1))

    def _expire_unanswered(self, now: int) -> list[Event]:
        """Texts whose answer is overdue: send again (the id makes a repeat harmless), or
        after MAX_SEND_ATTEMPTS give up, so that no slot stays taken for ever."""
        overdue = {m for m in self._in_flight if now >= self._answer_deadline(self._outbox[m])}
        events: list[Event] = []
        for message_id in [m for m in self._outbox if m in overdue] if overdue else []:
            pending = self._outbox[message_id]
            self._in_flight.discard(message_id)
            pending.transmitted = False
            if pending.attempts >= MAX_SEND_ATTEMPTS:
                del self._outbox[message_id]
                self._left_outbox(message_id)
                reason = f"no answer from the broker after {pending.attempts} attempts"
                events.append(MessageFailed(message_id, pending.send.to, NO_ANSWER, reason))
        return events

    def _free_slot(self, message_id: str) -> _Pending | None:
        """The answer for text `message_id` came: it no longer occupies a slot."""
        self._in_flight.discard(message_id)
        pending = self._outbox.get(message_id)
        if pending is not None:
            pending.transmitted = False
        return pending

    def _flush_outbox(self, now: int) -> None:
        if self.state is not State.ONLINE or now < self._hold_until:
            return
        self._hold_until = 0  # the hold is over; a past deadline would make drivers spin
        self._pace_until = 0
        if self._settling:
            if self._in_flight:
                return  # their answers first (refusals, most likely, setting a new hold)
            self._settling = False
        for message_id, pending in self._outbox.items():
            if len(self._in_flight) >= MAX_IN_FLIGHT:
                return
            if pending.transmitted:
                continue
            # Stay under the broker's announced rate: a refusal would let later texts
            # overtake the refused one, and order matters.
            if self._pace is not None:
                wait = self._pace.wait_ms(now)
                if wait:
                    self._pace_until = now + wait
                    return
                self._pace.take(now)
            pending.transmitted = True
            pending.sent_at = now
            pending.attempts += 1
            self._in_flight.add(message_id)
            self._queue(pending.send, now)

    def _on_welcome(self, welcome: Welcome, now: int) -> list[Event]:
        resumed = self._has_logged_in
        self.state = State.ONLINE
        self._has_logged_in = True
        self.takeover = False  # one takeover per request, never again on a reconnect
        self._resume_token = welcome.resume_token
        if self.limits != welcome.limits or self._pace is None:
            limits = welcome.limits
            rate = max(1.0, limits.rate_per_second * PACE_FRACTION)
            burst = max(1, int(limits.rate_burst * PACE_FRACTION))
            self._pace = TokenBucket(rate, burst, now)
        self.limits = welcome.limits
        self.name = welcome.name
        self.online = {name_key(n): n for n in welcome.online}
        self._hold_until = 0
        anchor = welcome.stream_mark or 0
        if self._stream_mark is None or anchor > self._stream_mark:
            # Anchor on the broker's word, never on the first seq seen: a message that
            # failed to reach us would otherwise fall below the mark and be lost.
            self._stream_mark = anchor
            self._above_mark = {seq for seq in self._above_mark if seq > anchor}
            while self._stream_mark + 1 in self._above_mark:
                self._stream_mark += 1
                self._above_mark.discard(self._stream_mark)
        if self._confirmed_mark is None or anchor > self._confirmed_mark:
            # The broker holds everything up to its mark confirmed already.
            self._confirmed_mark = anchor
            self._confirmed_above = {seq for seq in self._confirmed_above if seq > anchor}
            while self._confirmed_mark + 1 in self._confirmed_above:
                self._confirmed_mark += 1
                self._confirmed_above.discard(self._confirmed_mark)
        self._flush_outbox(now)
        self._resend_requests(now)
        return [
            LoggedIn(welcome.name, welcome.server_time, welcome.limits, welcome.online, resumed)
        ]

    def _on_accepted(self, accepted: Accepted, now: int) -> list[Event]:
        events: list[Event] = []
        for message_id, broker_id in zip(accepted.ids, accepted.broker_ids, strict=True):
            self._in_flight.discard(message_id)
            pending = self._outbox.pop(message_id, None)
            if pending is None:
                continue  # a repeated acknowledgement
            self._left_outbox(message_id)
            events.append(MessageAccepted(message_id, broker_id, accepted.accepted_at))
        self._flush_outbox(now)
        return events

    def _on_deliver(self, deliver: Deliver, now: int) -> list[Event]:
        if not self._note_seq(deliver.seq):
            # A repeat: answer with the confirmed mark, as the first RECEIPT may have been
            # lost. (A new message is confirmed once the application is done with it.)
            self._receipt_due = True
            return []
        return [
            IncomingMessage(
                deliver.id,
                deliver.broker_id,
                deliver.sender,
                deliver.text,
                deliver.sent_at,
                deliver.accepted_at,
                deliver.seq,
                deliver.delayed,
            )
        ]

    def _note_seq(self, seq: int) -> bool:
        """Record stream position `seq`; False if it was seen before (a redelivery)."""
        if self._stream_mark is None:
            self._stream_mark = 0  # WELCOME sets it; this only guards a broken broker
        if seq <= self._stream_mark or seq in self._above_mark:
            return False
        self._above_mark.add(seq)
        while self._stream_mark + 1 in self._above_mark:
            self._stream_mark += 1
            self._above_mark.discard(self._stream_mark)
        return True

    def _on_error(self, error: Error, now: int) -> list[Event]:
        login_refusal = self.state is State.LOGGING_IN and not error.ref  # not a SEND's
        if login_refusal and error.code == ErrorCode.RATE_LIMITED.value:
            # Too many new names from our address: try again after a backoff.
            self.state = State.DISCONNECTED
            return [ConnectionLost(f"login rate limited: {error.message}")]
        if self.state is State.LOGGING_IN and error.code in _LOGIN_ERRORS:
            transient = (ErrorCode.NAME_TAKEN.value, ErrorCode.SERVER_FULL.value)
            if self._has_logged_in and error.code in transient:
                # Our old session still holds the name and the token did not match it
                # (the broker restarted, say): wait for it to expire, then retry.
                self.state = State.DISCONNECTED
                return [ConnectionLost(f"name still held on the broker: {error.message}")]
            self.state = State.CLOSED
            return [LoginRefused(error.code, error.message)]
        if error.code == ErrorCode.NOT_LOGGED_IN.value:
            if self.state is State.ONLINE:
                # The broker forgot us (restart, or we were silent too long): log in again.
                self.connect(now)
            return []
        if error.code == ErrorCode.TAKEN_OVER.value and not error.ref:
            # Our name's session was taken over by a login elsewhere (the same key): any
            # reconnect would only be refused, so stop here and say why.
            self.state = State.CLOSED
            self._outgoing.clear()
            return [LoginRefused(error.code, error.message)]
        if error.ref and error.ref in self._requests:
            return self._request_refused(error.ref, error, now)
        pending = self._free_slot(error.ref) if error.ref else None
        if pending is not None:
            if error.code in _FINAL_SEND_ERRORS:
                del self._outbox[pending.send.id]
                self._left_outbox(pending.send.id)
                self._flush_outbox(now)  # its slot is free (and it may end a settling)
                return [MessageFailed(pending.send.id, pending.send.to, error.code, error.message)]
            self._settling = True
            if error.code in _FLOW_CONTROL_ERRORS:
                # Flow control: the transmission was answered, so it does not count
                # towards MAX_SEND_ATTEMPTS; wait and send it again, as often as it takes.
                pending.attempts = max(0, pending.attempts - 1)
                pending.refusals += 1
                delay = retry_delay_ms(pending.refusals, error.retry_after_ms)
                self._hold_until = max(self._hold_until, now + delay)
                return [BrokerError(error.code, error.message, error.retry_after_ms, error.ref)]
            if pending.attempts >= MAX_SEND_ATTEMPTS:
                # `internal` or another refusal worth retrying, every time: give up, so
                # the caller hears of it rather than waiting for ever.
                del self._outbox[pending.send.id]
                self._left_outbox(pending.send.id)
                reason = (
                    f"refused by the broker {pending.attempts} times ({error.code}:"
                    f" {error.message}); gave up"
                )
                self._flush_outbox(now)
                return [MessageFailed(pending.send.id, pending.send.to, error.code, reason)]
            # Another refusal worth retrying (`internal`...): back to the outbox, and
            # nothing more is sent (texts keep their order) until its retry_after_ms, or
            # a backoff.
            delay = retry_delay_ms(pending.attempts, error.retry_after_ms)
            self._hold_until = max(self._hold_until, now + delay)
        return [BrokerError(error.code, error.message, error.retry_after_ms, error.ref)]
