"""The `Cluster` port over NATS: hints between brokers, on the JetStream store's
connection and event loop.

* `mg.note.<user>`: the broker serving an online user subscribes to it. Each message a
  broker stores is published there once JetStream has acknowledged it, with its mailbox
  seq and broker id, so the user's broker takes it into its cache and delivers it without
  reading the mailbox (it reads it only if it missed one: a gap in the seqs). Also DELIVERED
  and SEEN for a sender online at another broker, and a "moved" notice when the user logs
  in at another broker (its old session here ends).
* `mg.presence`: who logs in and out at each broker, a heartbeat per broker every
  `ALIVE_EVERY_S` (a broker silent for `DEAD_AFTER_S` has its users taken offline: it
  died), and at start a "hello" that the others answer with their lists of users.

Hints travel over core NATS, at most once: a lost one delays a delivery or a ✓✓ (the
message is in the mailbox, the notice is owed in the store) but loses nothing.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hashlib
import hmac
import logging
import secrets
import socket
import time
from typing import Any

import nats.js.errors
import orjson
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from mangogram_proto import codec
from mangogram_proto.errors import RemoteProtocolError
from mangogram_proto.messages import BrokerMessage

from .cluster import ClusterEvent, Moved, Notice, RemotePresence, StreamGrew
from .jetstream_store import BUCKET_SESSIONS, JetStreamStore, token, untoken
from .store import StoredMessage

log = logging.getLogger(__name__)

NOTE = "mg.note"
PRESENCE = "mg.presence"
ALIVE_EVERY_S = 2.0
DEAD_AFTER_S = 10.0
ROSTER_CHUNK = 500
# Asking a broker for its roster again (after a checksum differs) waits this long.
ASK_EVERY_S = 2 * ALIVE_EVERY_S
MAX_ROUNDS = 64  # roster rounds being collected at once
_FROM = "Mg-From"
_KIND = "Mg-Kind"
_SIGNATURE = "Mg-Signature"
_COMMAND = "Mg-Command"


def _checksum(key: str) -> int:
    """A user's share of a broker's presence checksum (the XOR over its users)."""
    return int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:7], "big")


def _digest(resume_token: str) -> str:
    """What the sessions bucket keeps of a resume token: its SHA-256, not the token."""
    return hashlib.sha256(resume_token.encode("utf-8")).hexdigest()


# A "stored" hint's fields, as StoredMessage holds them: broker id (digits), seq, sender
# key, sender, recipient key, recipient, client id, text, sent_at, accepted_at.
_STORED_TYPES = (str, int, str, str, str, str, str, str, int, int)


def _stored_fields(fields: object) -> bool:
    return (
        isinstance(fields, list)
        and len(fields) == len(_STORED_TYPES)
        and all(type(value) is kind for value, kind in zip(fields, _STORED_TYPES, strict=True))
        and fields[0].isdigit()
        and fields[0].isascii()
    )


class NatsCluster:
    """The brokers of one NATS, as the core's `Cluster`. Shares `store`'s connection."""

    def __init__(self, store: JetStreamStore) -> None:
        self._store = store
        self.broker_id = secrets.token_hex(8)
        self._events: collections.deque[ClusterEvent | StoredMessage] = collections.deque()
        # Both touched on the NATS thread only, but for `_wanted`, which the broker
        # thread updates (a membership test from the other thread is safe).
        self._subscriptions: dict[str, list[Subscription]] = {}
        self._wanted: set[str] = set()
        # Presence, on the broker thread: records from the NATS thread wait in _heard.
        self._heard: collections.deque[dict[str, Any]] = collections.deque()
        self._local: dict[str, str] = {}  # key -> name, online here
        self._remote: dict[str, tuple[str, str]] = {}  # key -> (name, broker id)
        self._alive: dict[str, float] = {}  # broker id -> when last heard (monotonic)
        # Checksums of who is online where (`_checksum`): ours, kept on the NATS thread in
        # the order our announcements go out, is in each heartbeat; each other broker's,
        # as our table has it, is kept here. A difference means an announcement was lost:
        # we ask that broker for its whole roster and replace its part of the table.
        self._announced: set[str] = set()  # NATS thread
        self._own_sum = 0  # NATS thread
        self._sums: dict[str, tuple[int, int]] = {}  # broker id -> (checksum, count)
        self._asked: dict[str, float] = {}  # broker id -> when we last asked for a roster
        self._rounds: dict[tuple[str, str], tuple[set[str], set[int]]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._started = time.monotonic()
        # The NATS thread writes a byte when it adds to _events or _heard, so the broker's
        # loop, which polls the other end, runs at once instead of at its next tick.
        self._wake_in, self._wake_out = socket.socketpair()
        for end in (self._wake_in, self._wake_out):
            end.setblocking(False)
        self._store.start(self._start())
        store.on_append = self._appended

    def joined(self, key: str, name: str, resume_token: str = "") -> None:
        self._wanted.add(key)
        self._local[key] = name
        self._store.start(self._join(key))
        self._announce({"e": "joined", "k": key, "n": name}, online=True)
        # Who holds the session now, for a login at another broker (`proves`).
        held = orjson.dumps({"b": self.broker_id, "h": _digest(resume_token)})
        self._store.submit(self._store.bucket(BUCKET_SESSIONS).put(token(key), held))

    def left(self, key: str, announce: bool = True) -> None:
        self._wanted.discard(key)
        name = self._local.pop(key, "")
        self._store.start(self._leave(key))
        if announce:
            self._announce({"e": "left", "k": key, "n": name}, online=False)
            self._store.submit(self._release(key))  # done by the end of this turn
        else:  # moved: no news to anyone, and the broker it moved to holds the entry now
            self._store.start(self._count(key, online=False))

    def proves(self, key: str, resume_token: str | None) -> bool | None:
        entry = self._store.call(self._held(key))
        if entry is None:
            return None
        broker, digest = entry
        if broker == self.broker_id or not self._is_alive(broker):
            return None  # a session that ended here, or at a broker that died since
        return resume_token is not None and hmac.compare_digest(_digest(resume_token), digest)

    def _is_alive(self, broker: str) -> bool:
        """Heard from within DEAD_AFTER_S; any broker counts while we have not been up
        that long (we may not have heard the others yet)."""
        now = time.monotonic()
        if now - self._started < DEAD_AFTER_S:
            return True
        return now - self._alive.get(broker, -DEAD_AFTER_S * 2) <= DEAD_AFTER_S

    def online_elsewhere(self) -> dict[str, str]:
        return {key: name for key, (name, _broker) in self._remote.items()}

    def _announce(self, record: dict[str, Any], online: bool | None = None) -> None:
        """Publish a presence record; a join or leave (`online`) also moves our checksum,
        on the NATS thread, just before the record goes out."""
        record["b"] = self.broker_id
        if online is not None:
            self._store.start(self._count(str(record["k"]), online))
        self._store.start(self._publish(PRESENCE, orjson.dumps(record), {}))

    def tell(self, key: str, message: BrokerMessage) -> None:
        # Notices between brokers keep the three-part form (version 2): the headers name
        # signature and command, the data is the body.
        signature, command, body = codec.encode(message, 2)
        headers = {
            _FROM: self.broker_id,
            _KIND: "notice",
            _SIGNATURE: signature.decode("ascii"),
            _COMMAND: command.decode("ascii"),
        }
        self._store.start(self._publish(f"{NOTE}.{token(key)}", body, headers))

    def _appended(self, stored: StoredMessage) -> None:
        """This broker stored `stored`: tell the recipient's broker, wherever it is."""
        headers = {_FROM: self.broker_id, _KIND: "stored"}
        body = orjson.dumps(stored[:10])  # (broker_id ... accepted_at)
        self._store.start(self._publish(f"{NOTE}.{token(stored.recipient_key)}", body, headers))

    def wakeup(self) -> socket.socket:
        return self._wake_in

    def _woken(self) -> None:
        """Empty the wake-up socket (before reading what woke it: nothing is missed)."""
        try:
            while self._wake_in.recv(4096):
                pass
        except (BlockingIOError, InterruptedError):
            pass

    def _wake(self) -> None:
        """On the NATS thread: something arrived for `events()`."""
        with contextlib.suppress(OSError):  # full (a wake-up is pending already), closing
            self._wake_out.send(b"\0")

    def events(self) -> list[ClusterEvent]:
        self._woken()
        found: list[ClusterEvent] = self._presence_events()
        while self._events:
            event = self._events.popleft()
            if isinstance(event, StoredMessage):  # stored by another broker, for a user here
                if not self._store.learn(event):
                    self._store.forget_tail(event.recipient_key)  # a gap: read it
                found.append(StreamGrew(event.recipient_key, event.seq))
                continue
            if isinstance(event, StreamGrew):
                if event.seq <= self._store.known_last_seq(event.key):
                    continue  # our own append, or one we have read already
                self._store.forget_tail(event.key)
            found.append(event)
        return found

    def _presence_events(self) -> list[ClusterEvent]:
        found: list[ClusterEvent] = []
        now = time.monotonic()
        while self._heard:
            record = self._heard.popleft()
            broker = str(record.get("b", ""))
            if broker == self.broker_id:
                continue
            self._alive[broker] = now
            kind = record.get("e")
            if kind == "hello" or (kind == "ask" and record.get("t") == self.broker_id):
                self._send_roster()
            elif kind == "roster":
                for key, name in record.get("u", []):
                    found += self._came(str(key), str(name), broker)
                found += self._roster_part(broker, record)
            elif kind == "joined":
                found += self._came(str(record.get("k")), str(record.get("n")), broker)
            elif kind == "left":
                found += self._gone(str(record.get("k")), broker)
            elif kind == "alive" and "x" in record:
                differs = (record["x"], record.get("c")) != self._sums.get(broker, (0, 0))
                if differs and now - self._asked.get(broker, -ASK_EVERY_S) >= ASK_EVERY_S:
                    self._asked[broker] = now
                    log.info("presence of broker %s differs here; asking for it", broker)
                    self._announce({"e": "ask", "t": broker})
        for broker, heard in list(self._alive.items()):
            if now - heard > DEAD_AFTER_S:
                # A broker that stopped talking died: its users are offline now.
                del self._alive[broker]
                self._asked.pop(broker, None)
                for key, (_name, at) in list(self._remote.items()):
                    if at == broker:
                        found += self._gone(key, broker)
                self._sums.pop(broker, None)
        return found

    def _send_roster(self) -> None:
        """Everyone online here, in parts of ROSTER_CHUNK (at least one part, so that an
        empty roster says so)."""
        users = sorted(self._local.items())
        parts = max(1, -(-len(users) // ROSTER_CHUNK))
        round_id = secrets.token_hex(4)
        for part in range(parts):
            chunk = users[part * ROSTER_CHUNK : (part + 1) * ROSTER_CHUNK]
            self._announce({"e": "roster", "u": chunk, "r": round_id, "p": part, "n": parts})

    def _roster_part(self, broker: str, record: dict[str, Any]) -> list[ClusterEvent]:
        """Once every part of a roster has come, whoever our table has at `broker` and
        the roster does not is offline (their "left" was lost)."""
        if "n" not in record:
            return []
        round_key = (broker, str(record.get("r")))
        keys, parts = self._rounds.setdefault(round_key, (set(), set()))
        keys.update(str(key) for key, _name in record.get("u", []))
        parts.add(int(record.get("p", 0)))
        if len(parts) < int(record["n"]):
            if len(self._rounds) > MAX_ROUNDS:  # parts lost: the next ask starts again
                self._rounds.clear()
            return []
        del self._rounds[round_key]
        found: list[ClusterEvent] = []
        for key, (_name, at) in list(self._remote.items()):
            if at == broker and key not in keys:
                found += self._gone(key, broker)
        return found

    def _came(self, key: str, name: str, broker: str) -> list[ClusterEvent]:
        known = key in self._remote or key in self._local
        # (Online here too: it is moving there, and the "moved" notice ends it here.)
        if key in self._remote:
            self._tally(self._remote[key][1], key, leaving=True)  # out of its old sum
        self._remote[key] = (name, broker)
        self._tally(broker, key)
        return [] if known else [RemotePresence(key, name, True)]

    def _gone(self, key: str, broker: str) -> list[ClusterEvent]:
        """`key` is no longer online at `broker` (if our table had it there)."""
        if self._remote.get(key, ("", ""))[1] != broker:
            return []
        name, _ = self._remote.pop(key)
        self._tally(broker, key, leaving=True)
        return [RemotePresence(key, name, False)]

    def _tally(self, broker: str, key: str, leaving: bool = False) -> None:
        checksum, count = self._sums.get(broker, (0, 0))
        self._sums[broker] = (checksum ^ _checksum(key), count + (-1 if leaving else 1))

    # On the NATS thread

    async def _start(self) -> None:
        nc = self._store.connection
        await nc.subscribe(PRESENCE, cb=self._on_presence)
        await nc.flush()
        hello = orjson.dumps({"e": "hello", "b": self.broker_id})
        await nc.publish(PRESENCE, hello)
        task = asyncio.get_running_loop().create_task(self._heartbeat())
        self._tasks.add(task)

    async def _count(self, key: str, online: bool) -> None:
        """Move our checksum for a join or leave here (in announcement order)."""
        if online != (key in self._announced):
            self._announced.symmetric_difference_update({key})
            self._own_sum ^= _checksum(key)

    async def _heartbeat(self) -> None:
        nc = self._store.connection
        while not nc.is_closed:
            if nc.is_connected:
                alive = {"e": "alive", "b": self.broker_id, "x": self._own_sum,
                         "c": len(self._announced)}  # fmt: skip
                try:
                    await nc.publish(PRESENCE, orjson.dumps(alive))
                except Exception as exc:  # a reconnect under way: the next beat will do
                    log.debug("heartbeat not sent: %s", exc)
            await asyncio.sleep(ALIVE_EVERY_S)

    async def _on_presence(self, msg: Msg) -> None:
        try:
            record = orjson.loads(msg.data)
        except orjson.JSONDecodeError:
            return
        if isinstance(record, dict):
            self._heard.append(record)
            self._wake()

    async def _publish(self, subject: str, body: bytes, headers: dict[str, str]) -> None:
        nc = self._store.connection
        await nc.publish(subject, body, headers=headers)

    async def _join(self, key: str) -> None:
        nc = self._store.connection
        me = token(key)
        # Whoever serves this user elsewhere lets go of it.
        await nc.publish(f"{NOTE}.{me}", b"", headers={_FROM: self.broker_id, _KIND: "moved"})
        if key not in self._subscriptions:
            self._subscriptions[key] = [await nc.subscribe(f"{NOTE}.{me}", cb=self._on_note)]
            await nc.flush()
        if key not in self._wanted:
            await self._leave(key)
            return
        # A message stored between the login's read and the subscription: look again.
        last = await self._store.read_last_seq(key)
        self._events.append(StreamGrew(key, last))
        self._wake()

    async def _held(self, key: str) -> tuple[str, str] | None:
        try:
            entry = await self._store.bucket(BUCKET_SESSIONS).get(token(key))
        except nats.js.errors.KeyNotFoundError:
            return None
        if not entry.value:
            return None
        record = orjson.loads(entry.value)
        return str(record["b"]), str(record["h"])

    async def _release(self, key: str) -> None:
        """Delete the session entry if it is still ours (not taken over meanwhile)."""
        kv = self._store.bucket(BUCKET_SESSIONS)
        try:
            entry = await kv.get(token(key))
        except nats.js.errors.KeyNotFoundError:
            return
        if entry.value and orjson.loads(entry.value).get("b") == self.broker_id:
            # (Written again meanwhile, by a new login here or elsewhere: it stays.)
            with contextlib.suppress(nats.js.errors.KeyWrongLastSequenceError):
                await kv.delete(token(key), last=entry.revision)

    async def _leave(self, key: str) -> None:
        if key in self._wanted:
            return  # logged in again meanwhile
        for subscription in self._subscriptions.pop(key, []):
            await subscription.unsubscribe()

    async def _on_note(self, msg: Msg) -> None:
        headers: dict[str, Any] = msg.headers or {}
        if headers.get(_FROM) == self.broker_id:
            return
        try:
            key = untoken(msg.subject.split(".")[2])
        except (ValueError, IndexError):
            return
        if headers.get(_KIND) == "moved":
            self._events.append(Moved(key))
            self._wake()
            return
        if headers.get(_KIND) == "stored":
            try:
                fields = orjson.loads(msg.data)
            except orjson.JSONDecodeError as exc:
                log.warning("dropped a hint from another broker: %s", exc)
                return
            if not _stored_fields(fields):
                # The broker loop trusts what it is handed (it parses broker ids as
                # numbers): a hint of any other shape is dropped, as a lost one would be.
                log.warning("dropped a hint from another broker: not a stored message")
                return
            stored = StoredMessage(*fields)
            if stored.recipient_key == key:
                self._events.append(stored)
                self._wake()
            return
        try:
            frames = [headers[_SIGNATURE].encode(), headers[_COMMAND].encode(), msg.data]
            message = codec.decode(frames)
        except (KeyError, RemoteProtocolError) as exc:
            log.warning("dropped a notice from another broker: %s", exc)
            return
        self._events.append(Notice(key, message))  # type: ignore[arg-type]
        self._wake()
