"""Cluster mode's store: a broker's state in NATS JetStream, shared by every broker.

The broker core calls its store synchronously (see `store.Store`); this class is that
interface in front of the asyncio NATS client, which runs its own event loop on a thread
of its own. Each call waits at most `NatsSettings.timeout_s`; when NATS cannot answer in
time the call raises `StoreUnavailable` and the core refuses the command with
`unavailable`, so nothing is acknowledged that JetStream has not stored.

Layout (docs/cluster.md explains every choice):

* One stream, `MG_MAIL`, holds every mailbox. A message to R from S is published on
  `mg.mail.<R>.<S>` (name keys in hex, so any name is a valid subject token). Its stream
  sequence is its broker id: unique and increasing across the cluster, as history paging
  needs. Its per-recipient `seq` is in the body, assigned by the publishing broker with
  `Nats-Expected-Last-Subject-Sequence` over `mg.mail.<R>.*`: if another broker appended
  to R's mailbox since we looked, JetStream refuses the write and we read the tail again
  (optimistic concurrency; the seqs of a mailbox stay 1, 2, 3... with no gaps or twins).
* `Nats-Msg-Id` = a hash of (sender key, message id): a resend within the stream's
  duplicate window is not stored twice, whichever broker it lands on.
* `append` waits for JetStream's acknowledgement, which comes only once the configured
  number of replicas (a majority of them) has the message: the core's ACCEPTED follows.
* Key-value buckets: `mg_names` (name -> owning public key, written create-only, so two
  brokers registering one name at once cannot both win), `mg_users` (display names),
  `mg_marks` (each mailbox's confirmed seq, moved up only, by compare-and-set),
  `mg_status` (delivered/read times per message), `mg_owed` (DELIVERED notices owed),
  `mg_contacts` (who has exchanged messages with whom, kept after retention).
  Bookkeeping writes to the buckets go out at once, unwaited, and `commit()` waits for
  them, as the SQLite store groups a turn's writes into one transaction.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import hashlib
import logging
import ssl
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Coroutine, Iterable
from typing import Any, TypeVar

import nats
import nats.errors
import nats.js.errors
import orjson
from nats.aio.client import Client
from nats.js.api import (
    DiscardPolicy,
    KeyValueConfig,
    RawStreamMsg,
    StorageType,
    StreamConfig,
)
from nats.js.client import JetStreamContext
from nats.js.kv import KeyValue

from .nats_settings import NatsSettings
from .store import (
    DuplicateMessage,
    NameAlreadyClaimed,
    StoredMessage,
    StoreUnavailable,
    _RetentionSweep,
    parse_broker_id,
    whole_pass,
)

log = logging.getLogger(__name__)

STREAM = "MG_MAIL"
MAIL = "mg.mail"
BUCKET_NAMES = "mg_names"
BUCKET_USERS = "mg_users"
BUCKET_MARKS = "mg_marks"
BUCKET_STATUS = "mg_status"
BUCKET_OWED = "mg_owed"
BUCKET_CONTACTS = "mg_contacts"
BUCKET_SESSIONS = "mg_sessions"  # written by the cluster port (jetstream_cluster.py)
# How long JetStream remembers a message id for de-duplication. A resend later than this
# (a client offline for longer with unacknowledged texts) is stored again.
DUPLICATE_WINDOW_S = 3600
# A write that loses this many races in a row for one mailbox is refused (unavailable).
MAX_RACES = 32
# Recently used messages kept in memory (by broker id), and (sender, id) -> broker id.
CACHED_MESSAGES = 50_000
# Tries at creating the stream at start-up, each bounded by --nats-timeout.
STARTUP_ATTEMPTS = 5
# After a call timed out, others are refused at once for this long (seconds).
REFUSE_AFTER_TIMEOUT_S = 1.0
_WRONG_LAST_SEQUENCE = 10071
_UNREACHABLE = (
    TimeoutError,
    asyncio.TimeoutError,
    nats.errors.TimeoutError,
    nats.errors.NoRespondersError,
    nats.errors.ConnectionClosedError,
    nats.errors.OutboundBufferLimitError,
    nats.errors.NoServersError,
    nats.errors.StaleConnectionError,
    nats.js.errors.ServiceUnavailableError,
    OSError,
)

T = TypeVar("T")


def _is_outage(exc: BaseException) -> bool:
    """True if `exc` means NATS or a stream cannot serve now (no connection, no leader,
    no quorum, a server error), rather than an answer about the data."""
    if isinstance(exc, _UNREACHABLE):
        return True
    if isinstance(exc, nats.js.errors.APIError):
        # (The key-value errors are APIErrors without a status code.)
        return (getattr(exc, "code", None) or 0) >= 500
    return isinstance(exc, nats.errors.Error)  # the client's own: no responders, closed...


# Mailbox writes are fenced with Nats-Expected-Last-Subject-Sequence-Subject, which
# servers before 2.11 ignore (two brokers could then give one seq to two messages).
OLDEST_SERVER = (2, 11)


def server_too_old(version: str) -> bool:
    """True if nats-server `version` ("2.10.4", "v2.11.0-beta") predates OLDEST_SERVER."""
    try:
        major, minor = (int(part) for part in version.lstrip("v").split(".")[:2])
    except ValueError:
        return False  # unknown: let the server's answers decide
    return (major, minor) < OLDEST_SERVER


def token(key: str) -> str:
    """A name key as a NATS subject token / KV key: its UTF-8 in hex."""
    return key.encode("utf-8").hex()


def untoken(text: str) -> str:
    return bytes.fromhex(text).decode("utf-8")


def message_id(sender_key: str, client_id: str) -> str:
    """The Nats-Msg-Id of a SEND: one per (sender, id), whatever the broker."""
    return hashlib.sha256(f"{sender_key}\0{client_id}".encode()).hexdigest()


def _mailbox(recipient_key: str) -> str:
    return f"{MAIL}.{token(recipient_key)}.*"


def _number(raw: RawStreamMsg) -> int:
    """The stream sequence of a message read back (JetStream always sends it)."""
    if raw.seq is None:
        raise StoreUnavailable("JetStream returned a message without its sequence")
    return raw.seq


def _parse(raw: RawStreamMsg) -> StoredMessage:
    body = orjson.loads(raw.data or b"{}")
    return StoredMessage(
        str(_number(raw)), body["q"], body["s"], body["sn"], body["r"], body["rn"], body["c"],
        body["t"], body["sa"], body["aa"],
    )  # fmt: skip


async def _cancel_other_tasks() -> None:
    """End what still runs on the NATS loop (the cluster's heartbeat) before it stops."""
    others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    for task in others:
        task.cancel()
    await asyncio.gather(*others, return_exceptions=True)


def _log_failure(future: concurrent.futures.Future[Any]) -> None:
    if not future.cancelled() and future.exception() is not None:
        log.info("a cluster hint was not sent: %s", future.exception())


class _Lru(OrderedDict[Any, Any]):
    def __init__(self, size: int) -> None:
        super().__init__()
        self._size = size

    def put(self, key: Any, value: Any) -> None:
        self[key] = value
        self.move_to_end(key)
        if len(self) > self._size:
            self.popitem(last=False)


class JetStreamStore:
    """The `Store` of a broker in cluster mode. Connects at construction.

    Raises:
        StoreUnavailable: NATS could not be reached (or JetStream is not enabled there).
    """

    # Each SEND waits about a millisecond for JetStream's acknowledgement, so a turn of
    # the shell's 8,192 messages took seconds: at N=1000 in the bench nothing was
    # delivered within the measured window, and heartbeats waited as long.
    turn_messages: int | None = 256

    def __init__(self, settings: NatsSettings) -> None:
        self._settings = settings
        self._timeout = settings.timeout_s
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="nats", daemon=True)
        self._thread.start()
        self._pending: list[concurrent.futures.Future[Any]] = []
        self._nc: Client | None = None
        self._refuse_until = 0.0
        try:
            self._js, self._kv = self._call(self._connect(), self._timeout * (STARTUP_ATTEMPTS + 8))
        except BaseException:
            if self._nc is not None:
                with contextlib.suppress(Exception):
                    asyncio.run_coroutine_threadsafe(self._nc.close(), self._loop).result(2)
            self._stop_loop()
            raise
        self._users: dict[str, str] = {}
        # Per mailbox: (last seq, its broker id); (confirmed seq, its broker id).
        self._tail: dict[str, tuple[int, int]] = {}
        self._marks: dict[str, tuple[int, int]] = {}
        # Per mailbox: its messages above the mark that we know, by seq.
        self._index: dict[str, dict[int, StoredMessage]] = {}
        self._by_id: _Lru = _Lru(CACHED_MESSAGES)  # broker id (int) -> StoredMessage
        self._by_client: _Lru = _Lru(CACHED_MESSAGES)  # (sender, client id) -> broker id
        self._status: _Lru = _Lru(CACHED_MESSAGES)  # broker id -> [delivered_at, read_at]
        self._met: set[tuple[str, str]] = set()  # (sender, recipient) pairs recorded
        self._sweep = _RetentionSweep()
        # Told of each message this broker appends, once JetStream has acknowledged it
        # (the cluster port passes it on to the recipient's broker).
        self.on_append: Callable[[StoredMessage], None] | None = None

    # The event loop thread

    def _call(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        """Run `coro` on the NATS thread and wait for it (bounded)."""
        # Refuse at once while the client reconnects, and for a moment after a timeout
        # (a stream electing a leader): a turn full of sends must not wait a timeout each.
        if self._nc is not None and not self._nc.is_connected:
            coro.close()
            raise StoreUnavailable("not connected to NATS (reconnecting)")
        if time.monotonic() < self._refuse_until:
            coro.close()
            raise StoreUnavailable("NATS did not answer in time a moment ago")
        future = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return future.result(timeout or self._timeout + 1)
        except Exception as exc:
            if not _is_outage(exc):
                raise  # an answer the caller handles (not found, wrong last sequence...)
            future.cancel()
            self._refuse_until = time.monotonic() + REFUSE_AFTER_TIMEOUT_S
            raise StoreUnavailable(f"NATS did not answer: {type(exc).__name__} {exc}") from exc

    def _submit(self, coro: Coroutine[Any, Any, Any]) -> None:
        """Start `coro` now; `commit()` waits for it."""
        self._pending.append(asyncio.run_coroutine_threadsafe(coro, self._loop))

    def submit(self, coro: Coroutine[Any, Any, Any]) -> None:
        """Start `coro` now; `commit()` (the end of the loop's turn) waits for it."""
        self._submit(coro)

    def start(self, coro: Coroutine[Any, Any, Any]) -> None:
        """Run `coro` on the NATS thread without waiting for it (cluster hints); a
        failure is logged."""
        future = asyncio.run_coroutine_threadsafe(coro, self._loop)
        future.add_done_callback(_log_failure)

    def bucket(self, name: str) -> KeyValue:
        """A key-value bucket, for the cluster port (use it on the NATS thread only)."""
        return self._kv[name]

    def call(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run `coro` on the NATS thread and wait for it, as store calls do (bounded;
        `StoreUnavailable` when NATS cannot answer)."""
        return self._call(coro)

    @property
    def connection(self) -> Client:
        """The NATS connection, for the cluster port (use it on the NATS thread only)."""
        assert self._nc is not None
        return self._nc

    def known_last_seq(self, recipient_key: str) -> int:
        """The mailbox's last seq as far as this broker knows, without asking NATS."""
        return self._tail.get(recipient_key, (0, 0))[0]

    def learn(self, message: StoredMessage) -> bool:
        """Another broker appended `message`: take it into the cache if it is the next
        of its mailbox we know (True: no need to read the mailbox again)."""
        key = message.recipient_key
        known = self._tail.get(key)
        if known is None:
            return False
        if message.seq <= known[0]:
            return True
        if message.seq != known[0] + 1:
            return False
        self._tail[key] = (message.seq, int(message.broker_id))
        self._index.setdefault(key, {})[message.seq] = self._remember(message)
        return True

    def forget_tail(self, recipient_key: str) -> None:
        """Another broker wrote to this mailbox: read its tail again when next needed."""
        self._tail.pop(recipient_key, None)

    async def read_last_seq(self, recipient_key: str) -> int:
        """The mailbox's last seq, read from JetStream (on the NATS thread)."""
        try:
            raw = await self._js.get_msg(STREAM, subject=_mailbox(recipient_key))
        except nats.js.errors.NotFoundError:
            return 0
        return _parse(raw).seq

    def _stop_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(self._timeout + 1)
        if not self._thread.is_alive():
            self._loop.close()

    async def _connect(self) -> tuple[JetStreamContext, dict[str, KeyValue]]:
        s = self._settings
        tls: ssl.SSLContext | None = None
        if s.tls_ca or s.tls_cert or any(url.startswith("tls://") for url in s.servers):
            tls = ssl.create_default_context(cafile=s.tls_ca)
            if s.tls_cert and s.tls_key:
                tls.load_cert_chain(s.tls_cert, s.tls_key)

        options: dict[str, Any] = {}
        if s.creds:
            options["user_credentials"] = s.creds
        if tls is not None:
            options["tls"] = tls
        try:
            # Bounded here: the client retries forever (reconnects must), the first
            # connection too.
            self._nc = await asyncio.wait_for(self._open(options), self._timeout * 2)
        except _UNREACHABLE as exc:
            raise StoreUnavailable(
                f"cannot reach NATS at {', '.join(s.servers)}: {type(exc).__name__} {exc}"
            ) from exc
        server = self._nc.connected_server_version
        version = f"{server.major}.{server.minor}.{server.patch}"
        if server_too_old(version):
            raise StoreUnavailable(
                f"nats-server {version} is too old: cluster mode needs"
                f" {'.'.join(map(str, OLDEST_SERVER))} or later"
            )
        js = self._nc.jetstream(timeout=self._timeout)
        # A cluster that has just started may need a while to create replicated streams.
        for attempt in range(STARTUP_ATTEMPTS):
            try:
                await self._ensure_stream(js)
                break
            except (nats.errors.TimeoutError, nats.js.errors.ServiceUnavailableError):
                if attempt == STARTUP_ATTEMPTS - 1:
                    raise
                log.info("JetStream not ready yet; trying again")
        buckets = {}
        for bucket in (
            BUCKET_NAMES, BUCKET_USERS, BUCKET_MARKS, BUCKET_STATUS, BUCKET_OWED, BUCKET_CONTACTS,
            BUCKET_SESSIONS,
        ):  # fmt: skip
            config = KeyValueConfig(
                bucket=bucket, history=1, replicas=s.replicas, storage=StorageType.FILE
            )
            try:
                buckets[bucket] = await js.create_key_value(config)
            except nats.js.errors.BadRequestError:
                buckets[bucket] = await js.key_value(bucket)  # exists with other settings
        return js, buckets

    async def _open(self, options: dict[str, Any]) -> Client:
        async def disconnected() -> None:
            log.warning("lost NATS; sends are refused until it is back")

        async def reconnected() -> None:
            log.warning("NATS is back")

        async def error(exc: Exception) -> None:
            log.info("NATS client: %s", exc)

        return await nats.connect(
            servers=list(self._settings.servers),
            name="mangogram-broker",
            connect_timeout=max(1, int(self._timeout)),
            allow_reconnect=True,
            max_reconnect_attempts=-1,
            reconnect_time_wait=0.25,
            disconnected_cb=disconnected,
            reconnected_cb=reconnected,
            error_cb=error,
            **options,
        )

    async def _ensure_stream(self, js: JetStreamContext) -> None:
        config = StreamConfig(
            name=STREAM,
            subjects=[f"{MAIL}.*.*"],
            storage=StorageType.FILE,
            num_replicas=self._settings.replicas,
            duplicate_window=DUPLICATE_WINDOW_S,
            discard=DiscardPolicy.OLD,
        )
        try:
            await js.add_stream(config)
        except nats.js.errors.BadRequestError as exc:
            # Already there with other settings (say another replica count): use it as is.
            log.warning("stream %s exists with other settings; using it: %s", STREAM, exc)
            await js.stream_info(STREAM)

    def commit(self) -> None:
        """Wait for this turn's bookkeeping writes. A failed one is logged, not raised:
        it costs at most a message delivered again or a receipt told again."""
        pending, self._pending = self._pending, []
        if not pending:
            return
        done, late = concurrent.futures.wait(pending, timeout=self._timeout)
        for future in late:
            future.cancel()
        failed = len(late) + sum(1 for f in done if f.exception() is not None)
        if failed:
            log.warning("%d bookkeeping writes to NATS failed this turn", failed)

    def close(self) -> None:
        self.commit()
        if self._nc is not None:
            with contextlib.suppress(StoreUnavailable):
                self._call(self._nc.close(), self._timeout)
        with contextlib.suppress(Exception):
            self._call(_cancel_other_tasks(), self._timeout)
        self._stop_loop()

    # Users and names

    def remember_user(self, key: str, name: str, now: int) -> None:
        if self._users.get(key) == name:
            return
        self._users[key] = name
        self._submit(self._kv[BUCKET_USERS].put(token(key), name.encode("utf-8")))

    def lookup_user(self, key: str) -> str | None:
        known = self._users.get(key)
        if known is not None:
            return known
        value = self._call(self._get(BUCKET_USERS, token(key)))
        if value is None:
            return None
        self._users[key] = value.decode("utf-8")
        return self._users[key]

    def begin_session(self, key: str) -> None:
        self._tail.pop(key, None)
        self._marks.pop(key, None)
        self._index.pop(key, None)

    async def _get(self, bucket: str, key: str) -> bytes | None:
        try:
            entry = await self._kv[bucket].get(key)
        except nats.js.errors.KeyNotFoundError:
            return None
        return entry.value

    def name_owner(self, key: str) -> str | None:
        # Never cached: another broker, or an operator, may change it at any time.
        value = self._call(self._get(BUCKET_NAMES, token(key)))
        return value.decode("ascii") if value else None

    def claim_name(self, key: str, public_key: str, now: int) -> None:
        try:
            self._call(self._kv[BUCKET_NAMES].create(token(key), public_key.encode("ascii")))
        except nats.js.errors.KeyWrongLastSequenceError as exc:
            raise NameAlreadyClaimed(key) from exc

    def release_name(self, key: str) -> bool:
        if self.name_owner(key) is None:
            return False
        self._call(self._kv[BUCKET_NAMES].delete(token(key)))
        return True

    # Mailboxes

    def _remember(self, message: StoredMessage) -> StoredMessage:
        number = int(message.broker_id)
        self._by_id.put(number, message)
        self._by_client.put((message.sender_key, message.client_id), number)
        return message

    def _message_at(self, number: int) -> StoredMessage | None:
        known = self._by_id.get(number)
        if known is not None:
            return known  # type: ignore[no-any-return]
        try:
            raw = self._call(self._js.get_msg(STREAM, seq=number))
        except nats.js.errors.NotFoundError:
            return None
        return self._remember(_parse(raw))

    def find(self, sender_key: str, client_id: str) -> StoredMessage | None:
        number = self._by_client.get((sender_key, client_id))
        return self._message_at(number) if number is not None else None

    def _tail_of(self, recipient_key: str) -> tuple[int, int]:
        known = self._tail.get(recipient_key)
        if known is not None:
            return known
        try:
            raw = self._call(self._js.get_msg(STREAM, subject=_mailbox(recipient_key)))
            last = self._remember(_parse(raw))
            tail = (last.seq, int(last.broker_id))
        except nats.js.errors.NotFoundError:
            tail = (0, 0)
        self._tail[recipient_key] = tail
        return tail

    def append(
        self,
        sender_key: str,
        sender: str,
        recipient_key: str,
        recipient: str,
        client_id: str,
        text: str,
        sent_at: int,
        accepted_at: int,
    ) -> StoredMessage:
        subject = f"{MAIL}.{token(recipient_key)}.{token(sender_key)}"
        for _ in range(MAX_RACES):
            last_seq, last_number = self._tail_of(recipient_key)
            body = orjson.dumps(
                {"q": last_seq + 1, "s": sender_key, "sn": sender, "r": recipient_key,
                 "rn": recipient, "c": client_id, "t": text, "sa": sent_at, "aa": accepted_at}
            )  # fmt: skip
            headers = {
                "Nats-Msg-Id": message_id(sender_key, client_id),
                "Nats-Expected-Last-Subject-Sequence": str(last_number),
                "Nats-Expected-Last-Subject-Sequence-Subject": _mailbox(recipient_key),
            }
            try:
                ack = self._call(self._js.publish(subject, body, headers=headers))
            except StoreUnavailable:
                # The publish may still land (the client sends what it buffered once it
                # reconnects): read the mailbox's tail again next time, not this guess.
                self._tail.pop(recipient_key, None)
                raise
            except nats.js.errors.APIError as exc:
                if exc.err_code != _WRONG_LAST_SEQUENCE:
                    raise
                # Another broker wrote to this mailbox (or this is a resend): look again.
                self._tail.pop(recipient_key, None)
                continue
            if ack.duplicate:
                self._message_at(ack.seq)  # so that `find` has it (unless pruned since)
                self._tail.pop(recipient_key, None)  # it may be the mailbox's newest
                raise DuplicateMessage(client_id)
            stored = StoredMessage(
                str(ack.seq), last_seq + 1, sender_key, sender, recipient_key, recipient,
                client_id, text, sent_at, accepted_at,
            )  # fmt: skip
            self._tail[recipient_key] = (stored.seq, ack.seq)
            self._index.setdefault(recipient_key, {})[stored.seq] = stored
            self._meet(sender_key, recipient_key)
            if self.on_append is not None:
                self.on_append(stored)
            return self._remember(stored)
        raise StoreUnavailable(f"lost {MAX_RACES} races in a row writing one mailbox")

    def last_seq(self, recipient_key: str) -> int:
        return self._tail_of(recipient_key)[0]

    def confirmed_through(self, recipient_key: str) -> int:
        return self._mark_of(recipient_key)[0]

    def _mark_of(self, recipient_key: str) -> tuple[int, int]:
        known = self._marks.get(recipient_key)
        if known is not None:
            return known
        value = self._call(self._get(BUCKET_MARKS, token(recipient_key)))
        mark = (0, 0)
        if value:
            stored = orjson.loads(value)
            mark = (int(stored["q"]), int(stored["n"]))
        self._marks[recipient_key] = mark
        return mark

    def unconfirmed_count(self, recipient_key: str) -> int:
        return self.last_seq(recipient_key) - self.confirmed_through(recipient_key)

    def unconfirmed(self, recipient_key: str, after_seq: int, limit: int) -> list[StoredMessage]:
        mark, mark_number = self._mark_of(recipient_key)
        first = max(after_seq, mark) + 1
        last = min(self.last_seq(recipient_key), first + limit - 1)
        index = self._index.setdefault(recipient_key, {})
        found: list[StoredMessage] = []
        for seq in range(first, last + 1):
            message = index.get(seq)
            if message is None:
                self._load(recipient_key, seq, last, mark_number)
                message = index.get(seq)
                if message is None:
                    break  # the tail moved back under us (pruned): nothing more to give
            found.append(message)
        return found

    def _load(self, recipient_key: str, first: int, last: int, mark_number: int) -> None:
        """Read the mailbox's messages `first`..`last` into the index, walking the
        mailbox's subjects from the closest broker id we know below them."""
        index = self._index.setdefault(recipient_key, {})
        below = [m for seq, m in index.items() if seq < first]
        start = max([int(m.broker_id) for m in below] + [mark_number]) + 1
        subject = _mailbox(recipient_key)
        for _ in range(last - first + 1 + len(index) + 1):
            try:
                raw = self._call(self._js.get_msg(STREAM, seq=start, subject=subject, next=True))
            except nats.js.errors.NotFoundError:
                return
            message = self._remember(_parse(raw))
            start = _number(raw) + 1
            if message.seq >= first:
                index[message.seq] = message
            tail = self._tail.get(recipient_key, (0, 0))
            if message.seq > tail[0]:
                self._tail[recipient_key] = (message.seq, _number(raw))
            if message.seq >= last:
                return

    def confirm_through(self, recipient_key: str, seq: int, now: int) -> None:
        mark, _ = self._mark_of(recipient_key)
        seq = min(seq, self.last_seq(recipient_key))
        if seq <= mark:
            return
        confirmed = self.unconfirmed(recipient_key, mark, seq - mark)
        if not confirmed or confirmed[-1].seq != seq:
            raise StoreUnavailable(f"could not read mailbox messages {mark + 1}..{seq}")
        for message in confirmed:
            self._set_status(int(message.broker_id), delivered_at=now)
        number = int(confirmed[-1].broker_id)
        self._marks[recipient_key] = (seq, number)
        index = self._index.get(recipient_key, {})
        for done in [q for q in index if q <= seq]:
            del index[done]
        self._submit(self._raise_mark(recipient_key, seq, number))

    async def _raise_mark(self, recipient_key: str, seq: int, number: int) -> None:
        """Move the stored mark up to `seq`, never down, whoever else moves it."""
        kv = self._kv[BUCKET_MARKS]
        key = token(recipient_key)
        value = orjson.dumps({"q": seq, "n": number})
        for _ in range(MAX_RACES):
            try:
                entry = await kv.get(key)
            except nats.js.errors.KeyNotFoundError:
                try:
                    await kv.create(key, value)
                    return
                except nats.js.errors.KeyWrongLastSequenceError:
                    continue
            if entry.value and int(orjson.loads(entry.value)["q"]) >= seq:
                return
            try:
                await kv.update(key, value, last=entry.revision)
                return
            except nats.js.errors.KeyWrongLastSequenceError:
                continue

    # Delivered and read times, owed notices

    def _status_of(self, number: int) -> list[int | None]:
        known = self._status.get(number)
        if known is not None:
            return known  # type: ignore[no-any-return]
        value = self._call(self._get(BUCKET_STATUS, str(number)))
        status: list[int | None] = list(orjson.loads(value)) if value else [None, None]
        self._status.put(number, status)
        return status

    def _set_status(
        self, number: int, delivered_at: int | None = None, read_at: int | None = None
    ) -> None:
        status = list(self._status.get(number) or [None, None])
        if delivered_at is not None:
            status[0] = delivered_at
        if read_at is not None:
            status[1] = read_at
        self._status.put(number, status)
        self._submit(self._kv[BUCKET_STATUS].put(str(number), orjson.dumps(status)))

    def _with_status(self, message: StoredMessage) -> StoredMessage:
        delivered_at, read_at = self._status_of(int(message.broker_id))
        return message._replace(delivered_at=delivered_at, read_at=read_at)

    def mark_read(self, recipient_key: str, broker_id: str, now: int) -> StoredMessage | None:
        number = parse_broker_id(broker_id)
        if number is None:
            return None
        message = self._message_at(number)
        if message is None or message.recipient_key != recipient_key:
            return None
        delivered_at, read_at = self._status_of(number)
        if read_at is not None:
            return None
        self._set_status(number, read_at=now)
        cached = self._index.get(recipient_key, {})
        if message.seq in cached:  # the window's copy must say so too, as a re-read would
            cached[message.seq] = cached[message.seq]._replace(read_at=now)
        return message._replace(delivered_at=delivered_at, read_at=now)

    def owe_receipts(self, broker_ids: Iterable[str]) -> None:
        for broker_id in broker_ids:
            message = self._message_at(int(broker_id))
            if message is not None:
                key = f"{token(message.sender_key)}.{broker_id}"
                self._submit(self._kv[BUCKET_OWED].put(key, b""))

    async def _keys(self, bucket: str, pattern: str) -> list[str]:
        """Every key of `bucket` matching `pattern`, read in one request: the bucket
        stream's subjects (STREAM.INFO with a subjects filter). A KV watch would create a
        consumer per call: at a login each (contacts, owed receipts), hundreds of logins
        in a few seconds left more consumers behind than the server allows
        ("maximum consumers limit reached") and every later login failed. A key removed
        with `_remove_key` leaves no subject behind; none of these buckets uses KV
        deletes, whose markers would still be listed here."""
        prefix = f"$KV.{bucket}."
        info = await self._js.stream_info(f"KV_{bucket}", subjects_filter=prefix + pattern)
        return [subject[len(prefix) :] for subject in (info.state.subjects or {})]

    async def _remove_key(self, bucket: str, key: str) -> None:
        """Remove `key` and every revision of it, leaving no marker (unlike a KV purge),
        so that `_keys` does not list it."""
        await self._js.purge_stream(f"KV_{bucket}", subject=f"$KV.{bucket}.{key}")

    def receipts_owed(self, sender_key: str, limit: int) -> list[StoredMessage]:
        self.commit()  # owed in this very turn counts too
        keys = self._call(self._keys(BUCKET_OWED, f"{token(sender_key)}.*"))
        numbers = sorted(int(key.rsplit(".", 1)[1]) for key in keys)
        owed = []
        for number in numbers[:limit]:
            message = self._message_at(number)
            if message is None:  # pruned meanwhile: nothing to tell
                self._submit(self._remove_key(BUCKET_OWED, f"{token(sender_key)}.{number}"))
                continue
            owed.append(self._with_status(message))
        return owed

    def mark_sender_notified(self, broker_ids: Iterable[str]) -> None:
        for broker_id in broker_ids:
            message = self._message_at(int(broker_id))
            if message is not None:
                key = f"{token(message.sender_key)}.{broker_id}"
                self._submit(self._remove_key(BUCKET_OWED, key))

    # Conversations

    def contacts(self, key: str) -> set[str]:
        self.commit()  # pairs met in this very turn count too
        keys = self._call(self._keys(BUCKET_CONTACTS, f"{token(key)}.*"))
        return {untoken(found.split(".", 1)[1]) for found in keys}

    def _meet(self, sender_key: str, recipient_key: str) -> None:
        """Record the pair both ways in the contacts bucket (kept after retention)."""
        if (sender_key, recipient_key) in self._met:
            return
        self._met.add((sender_key, recipient_key))
        for me, other in ((sender_key, recipient_key), (recipient_key, sender_key)):
            self._submit(self._kv[BUCKET_CONTACTS].put(f"{token(me)}.{token(other)}", b""))

    def _walk(self, subject: str, below: int | None) -> list[StoredMessage]:
        """Every message on `subject` with a broker id below `below`, oldest first."""
        found: list[StoredMessage] = []
        start = 1
        while True:
            try:
                raw = self._call(self._js.get_msg(STREAM, seq=start, subject=subject, next=True))
            except nats.js.errors.NotFoundError:
                return found
            if below is not None and _number(raw) >= below:
                return found
            found.append(self._remember(_parse(raw)))
            start = _number(raw) + 1

    def history(
        self, key: str, peer_key: str, before: int | None, limit: int
    ) -> list[StoredMessage]:
        me, peer = token(key), token(peer_key)
        both = self._walk(f"{MAIL}.{me}.{peer}", before)
        if peer != me:
            both += self._walk(f"{MAIL}.{peer}.{me}", before)
        newest = sorted(both, key=lambda m: int(m.broker_id), reverse=True)[:limit]
        return [self._with_status(m) for m in newest]

    # Retention: the same bounded sweep as the other stores (`store._RetentionSweep`)

    def prune_step(
        self, now: int, max_age_ms: int | None, keep_per_user: int | None
    ) -> tuple[int, bool]:
        if max_age_ms is None and keep_per_user is None:
            return 0, True
        self.commit()  # confirmations first: only confirmed messages go
        return self._sweep.step(self, now, max_age_ms, keep_per_user)

    def prune(self, now: int, max_age_ms: int | None, keep_per_user: int | None) -> int:
        self._sweep = _RetentionSweep()
        return whole_pass(lambda: self.prune_step(now, max_age_ms, keep_per_user))

    def _stream_keys(self) -> list[str]:
        # Only a mailbox with a mark has confirmed messages to remove.
        return [untoken(key) for key in self._call(self._keys(BUCKET_MARKS, ">"))]

    def _max_number(self) -> int:
        info = self._call(self._js.stream_info(STREAM))
        return int(info.state.last_seq)

    def _next(self, number: int, subject: str) -> tuple[int, StoredMessage] | None:
        """The first message at or after broker id `number` on `subject` (wildcards
        allowed), or None."""
        try:
            raw = self._call(self._js.get_msg(STREAM, seq=number, subject=subject, next=True))
        except nats.js.errors.NotFoundError:
            return None
        return _number(raw), _parse(raw)

    def _remove_old(self, first: int, end: int, cutoff: int) -> int:
        removed = 0
        number = first
        while number < end:
            found = self._next(number, f"{MAIL}.*.*")
            if found is None or found[0] >= end:
                break
            number, message = found
            mark, _ = self._mark_of(message.recipient_key)
            if message.seq <= mark and message.accepted_at < cutoff:
                self._call(self._js.delete_msg(STREAM, number))
                self._forget(number, message)
                removed += 1
            number += 1
        return removed

    def _remove_confirmed(
        self, recipient_key: str, after: int, through: int, limit: int
    ) -> tuple[int, int]:
        self._marks.pop(recipient_key, None)  # the freshest mark bounds what may go
        through = min(through, self.confirmed_through(recipient_key))
        subject = _mailbox(recipient_key)
        doomed: list[tuple[int, StoredMessage]] = []
        number, reached = 1, after
        while reached < through and len(doomed) < limit:
            found = self._next(number, subject)
            if found is None:
                break
            number, message = found
            if message.seq > through:
                break
            doomed.append(found)
            reached = message.seq
            number += 1
        if doomed:
            # Purge takes the mailbox's messages below a broker id, on every replica.
            self._call(self._js.purge_stream(STREAM, seq=doomed[-1][0] + 1, subject=subject))
            for gone, message in doomed:
                self._forget(gone, message)
        return len(doomed), max(reached, min(through, after + limit))

    def _forget(self, number: int, message: StoredMessage) -> None:
        """Drop what goes with a removed message: caches, its status, its owed notice."""
        self._by_id.pop(number, None)
        self._by_client.pop((message.sender_key, message.client_id), None)
        self._status.pop(number, None)
        self._submit(self._kv[BUCKET_STATUS].purge(str(number)))
        self._submit(self._remove_key(BUCKET_OWED, f"{token(message.sender_key)}.{number}"))
