"""The console client's model, pure: session events and user actions in, lines out.

Own messages are printed once their fate is (nearly) known, because printed lines are
never redrawn: normally the ✓✓ arrives within milliseconds, so the line shows ✓✓
straight away. If it has not come after a short grace, the line shows what is known
(… or ✓) and a later receipt gets a line of its own. A message from someone we have
just written to waits for our own line to be printed first: a bot answers before it
confirms, so its reply comes before our ✓✓, and would otherwise be printed above the
message it answers.
"""

from __future__ import annotations

from collections import Counter, deque
from dataclasses import dataclass
from datetime import datetime

from prompt_toolkit.utils import get_cwidth

from mangogram_proto.events import (
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
from mangogram_proto.messages import Limits
from mangogram_proto.names import name_key

from .lines import ChatLine, Line, Mark, SystemLine
from .settings import ChatMemory

# How long an own message waits for its ✓✓ before it is printed anyway.
DELIVERY_GRACE_MS = 300
UNACCEPTED_GRACE_MS = 1000
DELAYED_AFTER_MS = 30_000
# How long late delivery receipts are gathered before one line says them all.
RECEIPT_BATCH_MS = 300
SNIPPET_CHARS = 30
QUIET_PRESENCE_ABOVE = 20
# The connection state while an impostor (a broker without the pinned key) answers.
WRONG_KEY = "wrong server key"
# The toolbar counts the characters typed from this share of the length limit on.
COUNTER_FROM = 0.8


@dataclass
class _OwnMessage:
    to: str
    text: str
    sent_at: int
    print_at: int
    mark: Mark = "pending"
    printed: bool = False
    accepted_at: int | None = None  # the broker's clock


@dataclass
class _Held:
    """An incoming message's lines, waiting for our own lines in `waits_for` (ids)."""

    lines: list[Line]
    message: IncomingMessage
    read: str | None
    waits_for: set[str]


def clock_time(at_ms: int) -> str:
    """HH:MM in the viewer's local time."""
    return datetime.fromtimestamp(at_ms / 1000).strftime("%H:%M")


def _cells(parts: list[tuple[str, str]]) -> int:
    """Terminal cells of toolbar fragments, measured as prompt_toolkit draws them."""
    return sum(get_cwidth(c) for _style, text in parts for c in text)


def snippet(text: str) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= SNIPPET_CHARS else flat[: SNIPPET_CHARS - 1] + "…"


# Refusals of a LOOKUP after which no answer comes (rate_limited; unknown_command from a
# broker older than LOOKUP).
_CANNOT_ASK = frozenset({"rate_limited", "unknown_command"})


class ChatState:
    """Everything the screen needs to know, updated by events and user actions."""

    def __init__(self, me: str) -> None:
        self.me = me
        self.peer: str | None = None
        self.connection = "connecting"
        self.online: dict[str, str] = {}
        self.unread: Counter[str] = Counter()
        self._display: dict[str, str] = {}
        self._talked_with: set[str] = set()
        # People we have talked with, by key: offered by Tab even when offline, and kept
        # across runs (the app saves them). Names we typed count once the broker took a
        # message for them (it refuses names nobody has), so typos are not offered.
        self.contacts: dict[str, str] = {}
        self._own: dict[str, _OwnMessage] = {}
        # Set once the broker refused one of our texts for now (its store is down, say):
        # said once, until a text is accepted again.
        self._retrying_said = False
        # Broker ids shown but not yet seen in the open conversation, per sender key.
        self._unseen: dict[str, list[str]] = {}
        self._reads: list[str] = []
        # Incoming messages whose lines were handed out: confirmed once on screen.
        self._shown: list[IncomingMessage] = []
        self._held: deque[_Held] = deque()
        # Ids of messages this session sent to its own name (their DELIVER is not shown).
        self._to_myself: set[str] = set()
        # Per ("sent" or "delivered", recipient key): when to say it, their display name,
        # the texts: marks that came after their messages were printed.
        self._late_receipts: dict[tuple[str, str], tuple[int, str, list[str]]] = {}
        self.seen_at: dict[str, int] = {}
        # What the broker accepts, as announced at login.
        self.limits: Limits | None = None
        # A name from /to that the broker is being asked about (LOOKUP): the conversation
        # opens when it says the name is registered.
        self.asking: str | None = None

    def remember(self, memory: ChatMemory) -> None:
        """Start from what an earlier run left: contacts and unread counts."""
        self.contacts.update(memory.contacts)
        for key, count in memory.unread.items():
            self.unread[key] += count
            self._display.setdefault(key, memory.contacts.get(key, key))

    # User actions

    def ask_peer(self, name: str, now: int, *, can_ask: bool) -> list[Line] | None:
        """/to NAME: open the conversation now if the name is known here (or the broker
        cannot be asked); else None: ask the broker, whose `NameStatus` answer opens it
        or says nobody has the name, leaving the open conversation as it was."""
        key = name_key(name)
        if not can_ask or key in self.online or key in self.contacts or key == name_key(self.me):
            return self.switch_peer(name, now)
        self.asking = name
        return None

    def switch_peer(self, name: str, now: int, *, registered: bool = False) -> list[Line]:
        """Open the conversation with `name` (`registered`: the broker said it is)."""
        key = name_key(name)
        shown = self.online.get(key) or self._display.get(key) or name
        self.peer = shown
        self._talked_with.add(key)
        unread = self.unread.pop(key, 0)
        self._reads += self._unseen.pop(key, [])
        status = "online" if key in self.online else "offline"
        extra = f", {unread} unread above" if unread else ""
        lines: list[Line] = [SystemLine(now, f"talking to {shown} ({status}{extra})")]
        unknown = key not in self.online and key not in self.contacts
        if unknown and not registered and key != name_key(self.me):
            # The broker could not be asked (offline, or older than LOOKUP): say what is
            # known at once.
            lines.append(
                SystemLine(
                    now,
                    f"nobody called {shown} is online or among the people you have talked"
                    " with; check the spelling (Tab completes known names). If nobody has"
                    " the name, your first message will be refused.",
                    "error",
                )
            )
        return lines

    def sent(self, message_id: str, to: str, text: str, now: int) -> None:
        """We queued a message; it is printed when its fate is known (see `due`)."""
        key = name_key(to)
        self._talked_with.add(key)
        self._display.setdefault(key, to)
        self.unread.pop(key, None)  # answering someone means their messages were seen
        self._own[message_id] = _OwnMessage(to, text, now, now + UNACCEPTED_GRACE_MS)
        if key == name_key(self.me):
            self._to_myself.add(message_id)

    def due(self, now: int) -> list[Line]:
        """Own messages whose grace period ran out, printed with what is known so far."""
        lines: list[Line] = []
        for message_id, own in list(self._own.items()):
            if not own.printed and own.print_at <= now:
                lines.append(self._print_own(message_id, own))
        return lines + self._release() + self._receipt_lines(now)

    def take_reads(self) -> list[str]:
        """Broker ids the user has now seen in the open conversation: send READ for each."""
        reads, self._reads = self._reads, []
        return reads

    def take_shown(self) -> list[IncomingMessage]:
        """Incoming messages whose lines were handed out since the last call (or that need
        no line): to be confirmed once those lines are on screen."""
        shown, self._shown = self._shown, []
        return shown

    def next_due(self) -> int | None:
        waiting = [o.print_at for o in self._own.values() if not o.printed]
        waiting += [at for at, _to, _texts in self._late_receipts.values()]
        return min(waiting) if waiting else None

    # Session events

    def on_event(self, event: Event, now: int) -> list[Line]:
        if isinstance(event, IncomingMessage):
            return self._incoming(event, now)
        if isinstance(event, MessageAccepted):
            self._retrying_said = False
            own = self._own.get(event.id)
            if own is not None:
                self.contacts.setdefault(name_key(own.to), own.to)
            if own is not None and own.mark == "pending":
                own.mark = "sent"
                own.accepted_at = event.accepted_at
                own.print_at = min(own.print_at, now + DELIVERY_GRACE_MS)
                if own.printed:  # shown with ○ while the broker was away
                    self._late(("sent", name_key(own.to)), own.to, own.text, now)
            return []
        if isinstance(event, MessageDelivered):
            return self._delivered(event, now) + self._release()
        if isinstance(event, MessageFailed):
            return self._failed(event, now) + self._release()
        if isinstance(event, PresenceChanged):
            return self._presence(event, now)
        if isinstance(event, MessageRead):
            self.seen_at[name_key(event.by)] = event.read_at
            return []
        if isinstance(event, HistoryReceived):
            return self._history(event, now)
        if isinstance(event, OnlineUsers):
            self.online = {name_key(n): n for n in event.users}
            return [SystemLine(now, self.online_summary())]
        if isinstance(event, LoggedIn):
            self.me = event.name
            self.limits = event.limits
            was = self.connection
            self.connection = "online"
            self.online = {name_key(n): n for n in event.online}
            self.online.setdefault(name_key(event.name), event.name)
            if event.resumed or was in ("reconnecting", WRONG_KEY):
                return [SystemLine(now, "reconnected", "joined")]
            return [
                SystemLine(now, f"logged in as {event.name}"),
                SystemLine(now, self.online_summary()),
            ]
        if isinstance(event, ConnectionLost):
            # Each failed attempt during an outage is another ConnectionLost: said once,
            # the toolbar shows the rest.
            if self.connection == "reconnecting":
                return []
            self.connection = "reconnecting"
            return [SystemLine(now, "connection lost; reconnecting…", "error")]
        if isinstance(event, NameStatus):
            return self._name_status(event, now)
        if isinstance(event, BrokerError) and event.ref is not None and event.ref in self._own:
            # One of our texts refused for now (`unavailable`, `rate_limited`: retried
            # until accepted; `internal`: a MessageFailed reports it if the SDK gives up).
            if self._retrying_said:
                return []
            self._retrying_said = True
            return [SystemLine(now, f"{event.message}; retrying…", "error")]
        if isinstance(event, BrokerError):
            if self.asking is not None and event.code in _CANNOT_ASK:
                # No answer will come: open the conversation as if it could not be asked.
                asked, self.asking = self.asking, None
                lines = self.switch_peer(asked, now)
                if event.code == "unknown_command":
                    return lines  # an older broker: nothing the user can act on
                return [SystemLine(now, event.message, "error"), *lines]
            text = event.message
            if event.retry_after_ms:
                text = f"slow down: {text} (retrying in {event.retry_after_ms / 1000:.1f} s)"
            return [SystemLine(now, text, "error")]
        if isinstance(event, LoginRefused):
            if event.code == "server_key":
                # Said once; the app keeps trying for the broker with the pinned key.
                if self.connection == WRONG_KEY:
                    return []
                self.connection = WRONG_KEY
                return [
                    SystemLine(now, event.message, "error"),
                    SystemLine(
                        now,
                        "not sending anything to it; what you type is kept and sent once"
                        " the broker with the expected key answers again (Ctrl-C quits)",
                        "error",
                    ),
                ]
            self.connection = "offline"
            if event.code == "taken_over":
                return [
                    SystemLine(
                        now,
                        "signed in elsewhere (another window or machine): this one is offline"
                        " now and does not reconnect; /exit to leave",
                        "error",
                    )
                ]
            return [SystemLine(now, event.message, "error")]
        if isinstance(event, Closed):
            self.connection = "offline"
            return []
        return []

    def online_summary(self) -> str:
        others = sorted((n for k, n in self.online.items() if k != name_key(self.me)), key=name_key)
        if not others:
            return "nobody else is online"
        return f"online ({len(others)}): " + ", ".join(others)

    # The bottom toolbar

    def text_problem(self, text: str) -> str | None:
        """Why the broker would refuse `text` for its length, or None if it would not."""
        if self.limits is None:
            return None
        chars, size = len(text), len(text.encode("utf-8"))
        if chars > self.limits.max_text_chars:
            return (
                f"too long to send: {chars} characters, the limit is"
                f" {self.limits.max_text_chars}; it is still in the input line to shorten"
            )
        if size > self.limits.max_text_bytes:
            return (
                f"too long to send: {size} bytes of UTF-8, the limit is"
                f" {self.limits.max_text_bytes}; it is still in the input line to shorten"
            )
        return None

    def length_counter(self, text: str) -> tuple[str, str] | None:
        """A toolbar fragment counting `text` against the limit once it is near, else None."""
        if self.limits is None:
            return None
        limit = self.limits.max_text_chars
        if len(text) < limit * COUNTER_FROM:
            return None
        style = "bg:ansired fg:ansiwhite bold" if self.text_problem(text) else "fg:ansiyellow"
        return (style, f" {len(text)}/{limit} ")

    def toolbar(self, width: int | None = None, typed: str = "") -> list[tuple[str, str]]:
        """Styled fragments for prompt_toolkit's bottom toolbar, fitted to `width` cells.

        What matters most survives a narrow terminal: the connection state and the unread
        counter; the rest is shortened, then dropped (the "seen" time first, then the
        online count, then our own name before the peer's)."""
        state_style = {
            "online": "bg:ansigreen fg:ansiblack",
            "reconnecting": "bg:ansiyellow fg:ansiblack",
        }.get(self.connection, "bg:ansired fg:ansiwhite")
        state = (state_style, f" {self.connection} ")
        counter = self.length_counter(typed)
        lead = [state, counter] if counter else [state]
        peer_key = name_key(self.peer) if self.peer else None
        seen = self.seen_at.get(peer_key) if peer_key else None
        count = len([k for k in self.online if k != name_key(self.me)])
        total = sum(self.unread.values())
        unread_full = ", ".join(
            f"{self._display.get(k, k)} ({n})" for k, n in sorted(self.unread.items())
        )
        # Variants from the fullest to the shortest; the first that fits is shown.
        peer_forms = (
            [f"{self.me} → {self.peer}", f"→ {self.peer}"]
            if self.peer
            else ["no conversation: /to NAME", "/to NAME"]
        )
        seen_forms = [f" (seen {clock_time(seen)})", ""] if seen is not None else [""]
        online_forms = [f"  ·  {count} online", f" · {count} on", ""]
        unread_forms = (
            [f"  ·  unread: {unread_full}", f" · unread {total}", f" · ✉{total}"] if total else [""]
        )
        variants = [
            (peer, seen_text, online, unread)
            for unread in unread_forms
            for online in online_forms
            for seen_text in seen_forms
            for peer in peer_forms
        ]
        # Prefer keeping the unread details, then the online count, then "seen".
        for peer, seen_text, online, unread in variants:
            parts = [*lead, ("", " "), ("bold", peer)]
            if seen_text:
                parts.append(("", seen_text))
            if online:
                parts.append(("", online))
            if unread:
                parts.append(("fg:ansiyellow bold", unread))
            if width is None or _cells(parts) <= width:
                return parts
        # Nothing fits: the state and the unread count stay, the peer gets what is left.
        tail = [("fg:ansiyellow bold", unread_forms[-1])] if total else []
        if self.connection != "online":
            state = (state_style, self.connection[:3])
        lead[0] = state
        room = (width or 0) - _cells([*lead, ("", " "), *tail])
        peer = peer_forms[-1]
        while peer and _cells([("", peer)]) > room:
            peer = peer[:-2] + "…" if len(peer) > 1 else ""
        return [*lead, ("", " "), ("bold", peer), *tail]

    def completions(self) -> list[str]:
        """Names worth offering for Tab: who is online and everyone we have talked with,
        online or not (see `contacts`)."""
        names = dict(self.contacts)
        names.update(self.online)
        names.pop(name_key(self.me), None)
        return sorted(names.values(), key=name_key)

    # Internals

    def _name_status(self, event: NameStatus, now: int) -> list[Line]:
        if self.asking is None or name_key(self.asking) != name_key(event.name):
            return []  # a stale answer: the user asked about someone else since
        self.asking = None
        if event.registered:
            return self.switch_peer(event.name, now, registered=True)
        return [SystemLine(now, f"nobody is called {event.name}", "error")]

    def _incoming(self, message: IncomingMessage, now: int) -> list[Line]:
        if message.id in self._to_myself:
            # A note to ourselves from this very session: its own line already shows it.
            self._to_myself.discard(message.id)
            self._reads.append(message.broker_id)
            self._shown.append(message)
            return []
        key = name_key(message.sender)
        self._display[key] = message.sender
        self.contacts[key] = message.sender
        self._talked_with.add(key)
        lines: list[Line] = []
        if self.peer is None:
            self.peer = message.sender
            lines.append(SystemLine(now, f"talking to {message.sender} (/to NAME to switch)"))
        elsewhere = name_key(self.peer) != key
        if elsewhere:
            self.unread[key] += 1
            self._unseen.setdefault(key, []).append(message.broker_id)
        lines.append(
            ChatLine(
                at_ms=message.sent_at,
                sender=message.sender,
                peer=message.sender,
                text=message.text,
                own=False,
                elsewhere=elsewhere,
                delayed=message.delayed or now - message.accepted_at > DELAYED_AFTER_MS,
            )
        )
        # Our messages to the sender that the broker took before this one (so it may
        # answer them) and that are not printed yet go first, within their grace. Only
        # those: two people writing at once must not hold each other's messages, as
        # each confirms (and so gives the other ✓✓) only what it has printed.
        waits = {
            i
            for i, own in self._own.items()
            if not own.printed
            and name_key(own.to) == key
            and own.accepted_at is not None
            and own.accepted_at <= message.accepted_at
        }
        read = None if elsewhere else message.broker_id
        self._held.append(_Held(lines, message, read, waits))
        return self._release()

    def _release(self) -> list[Line]:
        """Lines of held incoming messages whose own lines are printed now, in order."""
        lines: list[Line] = []
        while self._held:
            head = self._held[0]
            if any(i in self._own and not self._own[i].printed for i in head.waits_for):
                break
            self._held.popleft()
            lines += head.lines
            self._shown.append(head.message)
            if head.read is not None:
                self._reads.append(head.read)
        return lines

    def _print_own(self, message_id: str, own: _OwnMessage) -> ChatLine:
        own.printed = True
        if own.mark in ("delivered", "failed"):
            del self._own[message_id]
        return ChatLine(
            at_ms=own.sent_at,
            sender=self.me,
            peer=own.to,
            text=own.text,
            own=True,
            mark=own.mark,
            elsewhere=self.peer is None or name_key(self.peer) != name_key(own.to),
        )

    def _delivered(self, event: MessageDelivered, now: int) -> list[Line]:
        own = self._own.get(event.id)
        if own is None:
            return []
        own.mark = "delivered"
        if not own.printed:
            return [self._print_own(event.id, own)]
        del self._own[event.id]
        # Late receipts come in bursts (after a reconnect, one per message): gathered
        # for a moment and said in one line per person.
        key = name_key(event.to)
        sent = self._late_receipts.get(("sent", key))
        if sent is not None and own.text in sent[2]:
            sent[2].remove(own.text)  # delivered says more than sent
        self._late(("delivered", key), event.to, own.text, now)
        return []

    def _late(self, batch_key: tuple[str, str], to: str, text: str, now: int) -> None:
        batch = self._late_receipts.setdefault(batch_key, (now + RECEIPT_BATCH_MS, to, []))
        batch[2].append(text)

    def _receipt_lines(self, now: int) -> list[Line]:
        lines: list[Line] = []
        for (kind, key), (at, to, texts) in list(self._late_receipts.items()):
            if at > now:
                continue
            del self._late_receipts[(kind, key)]
            if not texts:
                continue
            first, last = snippet(texts[0]), snippet(texts[-1])
            if kind == "delivered":
                text = f"✓✓ {to} got “{first}”"
                if len(texts) > 1:
                    text = f"✓✓ {to} got {len(texts)} messages, “{first}” to “{last}”"
            else:
                text = f"✓ the broker has “{first}” for {to}"
                if len(texts) > 1:
                    text = f"✓ the broker has {len(texts)} messages for {to}, “{first}” to “{last}”"
            lines.append(SystemLine(now, text, "receipt"))
        return lines

    def _failed(self, event: MessageFailed, now: int) -> list[Line]:
        own = self._own.get(event.id)
        reason = SystemLine(now, f"not delivered to {event.to}: {event.message}", "error")
        if own is None:
            return [reason]
        own.mark = "failed"
        if not own.printed:
            return [self._print_own(event.id, own), reason]
        del self._own[event.id]
        return [SystemLine(now, f"✗ “{snippet(own.text)}” — {event.message}", "error")]

    def _history(self, event: HistoryReceived, now: int) -> list[Line]:
        for item in event.items:
            for name in (item.sender, item.to):
                self.contacts.setdefault(name_key(name), name)
        if not event.items:
            return [SystemLine(now, f"no earlier messages with {event.peer}")]
        me = name_key(self.me)
        lines: list[Line] = [
            SystemLine(now, f"history with {event.peer}: last {len(event.items)} messages")
        ]
        for item in reversed(event.items):  # the page is newest first
            own = name_key(item.sender) == me
            mark: Mark | None = None
            if own:
                mark = "delivered" if item.delivered_at is not None else "sent"
            lines.append(
                ChatLine(
                    at_ms=item.sent_at,
                    sender=item.sender,
                    peer=item.to if own else item.sender,
                    text=item.text,
                    own=own,
                    mark=mark,
                )
            )
        if event.more:
            lines.append(SystemLine(now, "(older messages exist: /history with a larger N)"))
        return lines

    def _presence(self, event: PresenceChanged, now: int) -> list[Line]:
        key = name_key(event.name)
        if event.joined:
            self.online[key] = event.name
            if self.peer is not None and name_key(self.peer) == key:
                self.peer = event.name  # the spelling the broker registered
        else:
            self.online.pop(key, None)
        # On a busy broker only people we talk to get a line; the rest change the count.
        relevant = (
            len(self.online) <= QUIET_PRESENCE_ABOVE
            or key in self._talked_with
            or (self.peer is not None and name_key(self.peer) == key)
        )
        if not relevant:
            return []
        verb = "is online" if event.joined else "went offline"
        return [SystemLine(event.at, f"{event.name} {verb}", "joined" if event.joined else "left")]
