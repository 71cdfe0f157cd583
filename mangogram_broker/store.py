"""Where messages live until they are confirmed, and afterwards as history.

Two stores with one interface: `SqliteStore` (the broker's default, a file in the data
dir) and `MemoryStore` (tests, throwaway brokers). The core writes freely during a loop
turn; the shell calls `commit()` once per turn, before any acknowledgement goes out, so
an ACCEPTED always means "stored" (and, with durability `full`, "on disk"). The SQLite
store hands out broker ids and seqs in memory and writes a turn's new messages at the
commit, through one cached one-row statement; reads in the turn see them.

Each recipient has a stream: its messages numbered `seq` = 1, 2, 3... Confirmation is
cumulative: a stream is confirmed through a mark (the recipient's RECEIPT, or LOGIN's
`resume_from`), so one statement confirms a whole batch. Everything above the mark is
redelivered at every login. Confirmed messages stay as history until the retention rules
remove them. A DELIVERED that could not be told to an offline sender is "owed" until it
logs in.

Nothing here may stall the broker's loop as the store grows: every query of the routing
thread goes through an index, and retention runs in bounded steps (`prune_step`, a pass
over the whole store spread across many loop turns; `_RetentionSweep`).
"""

from __future__ import annotations

import sqlite3
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Literal, NamedTuple, Protocol

Durability = Literal["full", "normal"]

# Work per retention step, in messages looked at (one each; one per stream looked at by
# the count rule), where removing a message costs `REMOVAL_COST` more: a step looks at up
# to 2,048 messages or removes up to about 256. Removing is what costs: each removal
# updates four indexes and dirties pages the commit must write. Measured with a million
# messages stored (python -m bench.store_scale).
PRUNE_STEP_ROWS = 2048
REMOVAL_COST = 8
AGE_CHUNK = 256  # message numbers per statement of the age rule
# The SQLite store remembers this many contact pairs it has written, so that the messages
# of a conversation do not each try to write it again.
RECENT_CONTACT_PAIRS = 65_536


def parse_broker_id(text: str) -> int | None:
    """The message number in a broker id, or None if `text` is not one. Only ASCII
    digits count: str.isdigit() also accepts "²" and "١", which int() then refuses."""
    if not (0 < len(text) <= 18 and text.isascii() and text.isdigit()):
        return None
    return int(text)


class DuplicateMessage(Exception):
    """`append` found the sender's message id already stored (a resend)."""


class NameAlreadyClaimed(Exception):
    """`claim_name` lost a race: another broker of the cluster registered the name first."""


class StoreUnavailable(Exception):
    """A store across the network (JetStream) cannot be reached in time. Nothing the
    operation would have stored can be acknowledged; the caller refuses and the client
    retries later."""


class StoredMessage(NamedTuple):
    """One stored message. (A named tuple: one is built per message appended or read, and
    a frozen dataclass costs twice as much to build.)"""

    broker_id: str
    seq: int
    sender_key: str
    sender: str
    recipient_key: str
    recipient: str
    client_id: str
    text: str
    sent_at: int
    accepted_at: int
    delivered_at: int | None = None
    read_at: int | None = None


class Store(Protocol):
    """What the broker core needs from storage. Writes become durable at `commit()`."""

    # The most messages one loop turn should handle with this store (None: the shell's
    # own bound): a store that waits a network round trip per SEND needs smaller turns.
    turn_messages: int | None

    def remember_user(self, key: str, name: str, now: int) -> None: ...
    def begin_session(self, key: str) -> None:
        """`key` is logging in: forget what was cached about it (in a cluster, another
        broker may have changed it since)."""
        ...

    def lookup_user(self, key: str) -> str | None: ...
    def find(self, sender_key: str, client_id: str) -> StoredMessage | None: ...
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
        """Append to the recipient's stream. Raises DuplicateMessage for a stored id."""
        ...

    def unconfirmed_count(self, recipient_key: str) -> int: ...
    def unconfirmed(self, recipient_key: str, after_seq: int, limit: int) -> list[StoredMessage]:
        """Messages above the confirmed mark and `after_seq`, in stream order."""
        ...

    def last_seq(self, recipient_key: str) -> int: ...
    def confirmed_through(self, recipient_key: str) -> int:
        """The mark: every message of the stream up to this seq is confirmed."""
        ...

    def confirm_through(self, recipient_key: str, seq: int, now: int) -> None:
        """Move the mark up to `seq` (at most the last seq; never down)."""
        ...

    def contacts(self, key: str) -> set[str]:
        """Name keys of everyone `key` has exchanged a message with (either way), even if
        retention has removed the messages since."""
        ...

    def mark_read(self, recipient_key: str, broker_id: str, now: int) -> StoredMessage | None: ...
    def owe_receipts(self, broker_ids: Iterable[str]) -> None:
        """Remember that these confirmed messages' senders have not been told yet."""
        ...

    def receipts_owed(self, sender_key: str, limit: int) -> list[StoredMessage]: ...
    def mark_sender_notified(self, broker_ids: Iterable[str]) -> None: ...
    def history(
        self, key: str, peer_key: str, before: int | None, limit: int
    ) -> list[StoredMessage]: ...
    def prune_step(
        self, now: int, max_age_ms: int | None, keep_per_user: int | None
    ) -> tuple[int, bool]:
        """One bounded step of a retention pass: remove confirmed messages older than
        `max_age_ms`, and those more than `keep_per_user` below their stream's confirmed
        mark (None: no such rule). Returns (messages removed, whether the pass finished);
        the call after a finished pass starts a new one."""
        ...

    def prune(self, now: int, max_age_ms: int | None, keep_per_user: int | None) -> int:
        """A whole retention pass at once (tools and tests; the broker uses `prune_step`).
        Returns how many messages it removed."""
        ...

    def name_owner(self, key: str) -> str | None: ...
    def claim_name(self, key: str, public_key: str, now: int) -> None: ...
    def release_name(self, key: str) -> bool: ...
    def commit(self) -> None: ...
    def close(self) -> None: ...


class _Prunable(Protocol):
    """What `_RetentionSweep` needs from a store."""

    def confirmed_through(self, recipient_key: str) -> int: ...
    def _stream_keys(self) -> list[str]: ...
    def _max_number(self) -> int: ...
    def _remove_old(self, first: int, end: int, cutoff: int) -> int:
        """Remove confirmed messages numbered first..end-1 accepted before `cutoff`."""
        ...

    def _remove_confirmed(
        self, recipient_key: str, after: int, through: int, limit: int
    ) -> tuple[int, int]:
        """Remove the stream's messages with seq in after+1..through, looking at no more
        than `limit` of them (stream order). Returns how many it removed and the seq it
        got to."""
        ...


def whole_pass(step: Callable[[], tuple[int, bool]]) -> int:
    """Run retention `step`s until the pass is finished; how many messages went."""
    removed, finished = 0, False
    while not finished:
        step_removed, finished = step()
        removed += step_removed
    return removed


class _RetentionSweep:
    """Where a retention pass stands, so each step does a bounded amount of work: first
    the age rule over message numbers, a range at a time; then the count rule, stream by
    stream, from where the last pass left each stream. Both stores use it, so they prune
    alike."""

    def __init__(self) -> None:
        self._next_number = 1
        self._age_done = False
        self._streams: list[str] | None = None
        self._pruned_through: dict[str, int] = {}  # stream -> seq removed through

    def step(
        self, store: _Prunable, now: int, max_age_ms: int | None, keep_per_user: int | None
    ) -> tuple[int, bool]:
        removed = 0
        budget = PRUNE_STEP_ROWS
        if max_age_ms is not None and not self._age_done:
            last = store._max_number()
            while budget > 0 and self._next_number <= last:
                end = min(self._next_number + min(budget, AGE_CHUNK), last + 1)
                count = store._remove_old(self._next_number, end, now - max_age_ms)
                removed += count
                budget -= end - self._next_number + REMOVAL_COST * count
                self._next_number = end
            if self._next_number <= last:
                return removed, False
            self._age_done = True
        if keep_per_user is not None:
            if self._streams is None:
                self._streams = sorted(store._stream_keys(), reverse=True)
            while self._streams and budget > 0:
                key = self._streams[-1]
                done = self._pruned_through.get(key, 0)
                through = store.confirmed_through(key) - keep_per_user
                if through > done:
                    limit = max(1, budget // (1 + REMOVAL_COST))
                    count, reached = store._remove_confirmed(key, done, through, limit)
                    removed += count
                    budget -= min(reached - done, limit) + REMOVAL_COST * count
                    self._pruned_through[key] = reached
                    if reached < through:
                        continue
                self._streams.pop()
                budget -= 1
            if self._streams:
                return removed, False
        self._next_number = 1
        self._age_done = False
        self._streams = None
        return removed, True


class MemoryStore:
    """A `Store` in dictionaries; nothing survives the process. The hot path (append,
    confirm, read the next unconfirmed) costs time in proportion to the messages it
    touches, not to the store's size."""

    turn_messages: int | None = None

    def __init__(self) -> None:
        self._users: dict[str, str] = {}
        self._messages: dict[int, StoredMessage] = {}
        self._streams: dict[str, dict[int, int]] = {}  # recipient key -> seq -> number
        self._by_client: dict[tuple[str, str], int] = {}
        self._last_seq: dict[str, int] = {}
        self._confirmed: dict[str, int] = {}
        self._owed: set[int] = set()
        self._owners: dict[str, str] = {}
        self._contacts: dict[str, set[str]] = {}
        self._next_id = 1
        self._sweep = _RetentionSweep()

    def name_owner(self, key: str) -> str | None:
        return self._owners.get(key)

    def claim_name(self, key: str, public_key: str, now: int) -> None:
        self._owners[key] = public_key

    def release_name(self, key: str) -> bool:
        return self._owners.pop(key, None) is not None

    def remember_user(self, key: str, name: str, now: int) -> None:
        self._users[key] = name

    def begin_session(self, key: str) -> None:
        pass  # the only writer: nothing can be stale

    def lookup_user(self, key: str) -> str | None:
        return self._users.get(key)

    def find(self, sender_key: str, client_id: str) -> StoredMessage | None:
        number = self._by_client.get((sender_key, client_id))
        return self._messages.get(number) if number is not None else None

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
        if (sender_key, client_id) in self._by_client:
            raise DuplicateMessage(client_id)
        number = self._next_id
        self._next_id += 1
        seq = self._last_seq.get(recipient_key, 0) + 1
        self._last_seq[recipient_key] = seq
        message = StoredMessage(
            str(number), seq, sender_key, sender, recipient_key, recipient, client_id, text,
            sent_at, accepted_at,
        )  # fmt: skip
        self._messages[number] = message
        self._by_client[(sender_key, client_id)] = number
        self._streams.setdefault(recipient_key, {})[seq] = number
        self._contacts.setdefault(sender_key, set()).add(recipient_key)
        self._contacts.setdefault(recipient_key, set()).add(sender_key)
        return message

    def _at(self, recipient_key: str, seq: int) -> StoredMessage | None:
        number = self._streams.get(recipient_key, {}).get(seq)
        return self._messages.get(number) if number is not None else None

    def unconfirmed_count(self, recipient_key: str) -> int:
        return self.last_seq(recipient_key) - self.confirmed_through(recipient_key)

    def unconfirmed(self, recipient_key: str, after_seq: int, limit: int) -> list[StoredMessage]:
        # Unconfirmed messages are never pruned, so the stream has no gaps after the mark.
        first = max(after_seq, self.confirmed_through(recipient_key)) + 1
        last = min(self.last_seq(recipient_key), first + limit - 1)
        found = (self._at(recipient_key, seq) for seq in range(first, last + 1))
        return [m for m in found if m is not None]

    def last_seq(self, recipient_key: str) -> int:
        return self._last_seq.get(recipient_key, 0)

    def confirmed_through(self, recipient_key: str) -> int:
        return self._confirmed.get(recipient_key, 0)

    def contacts(self, key: str) -> set[str]:
        return set(self._contacts.get(key, ()))

    def confirm_through(self, recipient_key: str, seq: int, now: int) -> None:
        mark = self.confirmed_through(recipient_key)
        seq = min(seq, self.last_seq(recipient_key))
        if seq <= mark:
            return
        for confirmed_seq in range(mark + 1, seq + 1):
            message = self._at(recipient_key, confirmed_seq)
            if message is not None:
                self._messages[int(message.broker_id)] = message._replace(delivered_at=now)
        self._confirmed[recipient_key] = seq

    def _get(self, recipient_key: str, broker_id: str) -> StoredMessage | None:
        number = parse_broker_id(broker_id)
        if number is None:
            return None
        message = self._messages.get(number)
        if message is None or message.recipient_key != recipient_key:
            return None
        return message

    def mark_read(self, recipient_key: str, broker_id: str, now: int) -> StoredMessage | None:
        message = self._get(recipient_key, broker_id)
        if message is None or message.read_at is not None:
            return None
        read = message._replace(read_at=now)
        self._messages[int(broker_id)] = read
        return read

    def owe_receipts(self, broker_ids: Iterable[str]) -> None:
        self._owed.update(int(b) for b in broker_ids)

    def receipts_owed(self, sender_key: str, limit: int) -> list[StoredMessage]:
        owed = [
            self._messages[number]
            for number in sorted(self._owed)
            if number in self._messages and self._messages[number].sender_key == sender_key
        ]
        return owed[:limit]

    def mark_sender_notified(self, broker_ids: Iterable[str]) -> None:
        self._owed.difference_update(int(b) for b in broker_ids)

    def history(
        self, key: str, peer_key: str, before: int | None, limit: int
    ) -> list[StoredMessage]:
        pair = {(key, peer_key), (peer_key, key)}
        found = [
            m
            for number, m in sorted(self._messages.items(), reverse=True)
            if (m.sender_key, m.recipient_key) in pair and (before is None or number < before)
        ]
        return found[:limit]

    def prune_step(
        self, now: int, max_age_ms: int | None, keep_per_user: int | None
    ) -> tuple[int, bool]:
        return self._sweep.step(self, now, max_age_ms, keep_per_user)

    def prune(self, now: int, max_age_ms: int | None, keep_per_user: int | None) -> int:
        self._sweep = _RetentionSweep()
        return whole_pass(lambda: self.prune_step(now, max_age_ms, keep_per_user))

    def _stream_keys(self) -> list[str]:
        return list(self._last_seq)

    def _max_number(self) -> int:
        return self._next_id - 1

    def _remove(self, number: int) -> None:
        message = self._messages.pop(number)
        self._by_client.pop((message.sender_key, message.client_id), None)
        del self._streams[message.recipient_key][message.seq]
        self._owed.discard(number)

    def _remove_old(self, first: int, end: int, cutoff: int) -> int:
        removed = 0
        for number in range(first, end):
            message = self._messages.get(number)
            if message is None or message.delivered_at is None:
                continue  # removed already, or not confirmed: never removed
            if message.accepted_at < cutoff:
                self._remove(number)
                removed += 1
        return removed

    def _remove_confirmed(
        self, recipient_key: str, after: int, through: int, limit: int
    ) -> tuple[int, int]:
        reached = min(through, after + limit)
        stream = self._streams.get(recipient_key, {})
        removed = 0
        for seq in range(after + 1, reached + 1):
            number = stream.get(seq)
            if number is not None and self._messages[number].delivered_at is not None:
                self._remove(number)
                removed += 1
        return removed, reached

    def commit(self) -> None:
        pass

    def close(self) -> None:
        pass


_SCHEMA = [
    # version 1
    """
    CREATE TABLE users (
        key TEXT PRIMARY KEY,
        name TEXT NOT NULL,
        first_seen_ms INTEGER NOT NULL,
        last_seen_ms INTEGER NOT NULL
    );
    CREATE TABLE messages (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        recipient_key TEXT NOT NULL,
        seq INTEGER NOT NULL,
        sender_key TEXT NOT NULL,
        sender TEXT NOT NULL,
        recipient TEXT NOT NULL,
        client_id TEXT NOT NULL,
        text TEXT NOT NULL,
        sent_at INTEGER NOT NULL,
        accepted_at INTEGER NOT NULL,
        delivered_at INTEGER,
        read_at INTEGER,
        sender_notified INTEGER NOT NULL DEFAULT 0,
        UNIQUE (recipient_key, seq),
        UNIQUE (sender_key, client_id)
    );
    CREATE INDEX messages_unconfirmed ON messages (recipient_key, seq)
        WHERE delivered_at IS NULL;
    CREATE INDEX messages_owed ON messages (sender_key, id)
        WHERE delivered_at IS NOT NULL AND sender_notified = 0;
    CREATE INDEX messages_pair ON messages (sender_key, recipient_key, id);
    CREATE TABLE streams (
        recipient_key TEXT PRIMARY KEY,
        last_seq INTEGER NOT NULL
    );
    """,
    # version 2: names belong to the CurveZMQ key that first registered them
    """
    CREATE TABLE name_owners (
        key TEXT PRIMARY KEY,
        public_key TEXT NOT NULL,
        claimed_ms INTEGER NOT NULL
    );
    """,
    # version 3: cumulative confirmation (a mark per stream replaces a flag per message,
    # which cost an UPDATE and two index changes per message) and a table of owed receipts
    """
    ALTER TABLE streams ADD COLUMN confirmed_seq INTEGER NOT NULL DEFAULT 0;
    UPDATE streams SET confirmed_seq = coalesce((SELECT min(m.seq) - 1 FROM messages m
        WHERE m.recipient_key = streams.recipient_key AND m.delivered_at IS NULL), last_seq);
    CREATE TABLE receipts_owed (
        sender_key TEXT NOT NULL,
        message_id INTEGER NOT NULL,
        PRIMARY KEY (sender_key, message_id)
    ) WITHOUT ROWID;
    INSERT INTO receipts_owed SELECT sender_key, id FROM messages
        WHERE delivered_at IS NOT NULL AND sender_notified = 0;
    DROP INDEX messages_owed;
    DROP INDEX messages_unconfirmed;
    ALTER TABLE messages DROP COLUMN sender_notified;
    """,
    # version 4: what the routing thread looks up goes through an index. Contacts (read at
    # every LOGIN) get their own table instead of a scan of everyone's messages; owed
    # receipts are found by message too (told, or removed by retention).
    """
    CREATE TABLE contacts (
        key TEXT NOT NULL,
        peer_key TEXT NOT NULL,
        PRIMARY KEY (key, peer_key)
    ) WITHOUT ROWID;
    INSERT OR IGNORE INTO contacts SELECT sender_key, recipient_key FROM messages;
    INSERT OR IGNORE INTO contacts SELECT recipient_key, sender_key FROM messages;
    CREATE INDEX receipts_owed_by_message ON receipts_owed (message_id);
    """,
]

# UPSERT (ON CONFLICT ... DO UPDATE) arrived in SQLite 3.24; Python's own builds carry newer
# ones, but a Python linked against an old system SQLite would fail mid-turn without this.
MIN_SQLITE = (3, 24, 0)
# DROP COLUMN arrived in 3.35. Only migration 3 uses it, to drop a column nothing reads any
# more (it has a default, so inserts need not name it): older SQLite keeps the column.
DROP_COLUMN_SQLITE = (3, 35, 0)


# A turn's messages are written at the flush by one `executemany` of this one-row
# statement. Statements of 64 rows (then 32, ... 1) were used before. The store alone
# (8,192 appends a turn over 100 recipients, durability full, 5 runs in turns): 64-row
# statements cost 22-30 us of CPU a message, `executemany` 16-18, one `execute` per row
# 13.5-25. The broker under `python -m bench` (N=100, 3 runs in turns with the old store):
# broker thread 53-71 -> 53-57 us a message; at N=1000 no difference. Only with one
# sender and one recipient (`bench.store_commits`) do 64 rows win, 10 -> 14 us.
_INSERT_MESSAGE = (
    "INSERT INTO messages (id, seq, sender_key, sender, recipient_key, recipient,"
    " client_id, text, sent_at, accepted_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)


class SqliteTooOld(Exception):
    """The SQLite library Python is linked with lacks what the store needs."""


def _statements(script: str, sqlite_version: tuple[int, int, int]) -> list[str]:
    statements = [part.strip() for part in script.split(";") if part.strip()]
    if sqlite_version < DROP_COLUMN_SQLITE:
        statements = [s for s in statements if "DROP COLUMN" not in s.upper()]
    return statements


_COLUMNS = (
    "id, seq, sender_key, sender, recipient_key, recipient, client_id, text,"
    " sent_at, accepted_at, delivered_at, read_at"
)


# The same columns read through the join of receipts_owed with messages (alias m).
_OWED_COLUMNS = ", ".join(f"m.{column.strip()}" for column in _COLUMNS.split(","))


def _row(row: tuple[Any, ...]) -> StoredMessage:
    (number, *rest) = row
    return StoredMessage(str(number), *rest)


class SqliteStore:
    """The store in one SQLite file: WAL, one writer (the broker thread), explicit
    transactions, schema versioned by `PRAGMA user_version`.

    Args:
        path: the database file (its directory is created).
        durability: "full" fsyncs every commit (an ack means on disk); "normal" survives
            a crash of the broker but not of the machine.
    """

    turn_messages: int | None = None

    def __init__(self, path: Path, durability: Durability = "full") -> None:
        if sqlite3.sqlite_version_info < MIN_SQLITE:
            raise SqliteTooOld(
                f"SQLite {sqlite3.sqlite_version} is too old for the store: it needs "
                f"{'.'.join(map(str, MIN_SQLITE))} or newer (upgrade Python or its SQLite)"
            )
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        # An admin command may write while the broker runs; wait for each other briefly.
        self._db.execute("PRAGMA busy_timeout=5000")
        self._db.execute("PRAGMA journal_mode=WAL")
        self._full = durability == "full"
        self._db.execute(f"PRAGMA synchronous={'FULL' if self._full else 'NORMAL'}")
        if self._full and sys.platform == "darwin":
            # macOS's fsync leaves data in the drive's cache; only F_FULLFSYNC survives a
            # power cut, and SQLite uses it only when asked.
            self._db.execute("PRAGMA fullfsync=ON")
            self._db.execute("PRAGMA checkpoint_fullfsync=ON")
        self._db.execute("PRAGMA foreign_keys=ON")
        # Each commit writes every page it dirtied to the WAL; checkpoints copy them back.
        # A longer WAL (about 40 MB) lets a checkpoint copy a busy page once for many
        # commits; measured: commit cost per message -33% under a 100-pair load.
        self._db.execute("PRAGMA wal_autocheckpoint=10000")
        self._migrate()
        self._in_transaction = False
        self._users: dict[str, str] = dict(self._db.execute("SELECT key, name FROM users"))
        # Hot-path counters kept in memory, read from disk once per recipient. The store is
        # the only writer, so they cannot go stale.
        self._last_seq: dict[str, int] = {}
        self._confirmed: dict[str, int] = {}
        for key, last, confirmed in self._db.execute("SELECT * FROM streams"):
            self._last_seq[key] = last
            self._confirmed[key] = confirmed
        self._dirty_streams: set[str] = set()
        # Bookkeeping writes (confirmations, reads, owed receipts) wait for the commit. A
        # turn with nothing else commits without an fsync: if the machine dies, they are
        # redone (messages come again and clients drop them by seq), and the next fsync of
        # the WAL makes them durable anyway.
        self._deferred: list[tuple[str, Any, bool]] = []
        # This turn's new messages, written together at the flush (the commit, or a read
        # that must see them) instead of each as it comes. Broker ids and
        # seqs are handed out here, so ACCEPTED can carry them before the rows exist. An
        # id is never reused: AUTOINCREMENT's high-water mark outlives retention.
        self._pending: list[StoredMessage] = []
        self._pending_by_client: dict[tuple[str, str], StoredMessage] = {}
        self._pending_streams: dict[str, list[StoredMessage]] = {}
        self._next_id = self._highest_id() + 1
        # Per sender, an id at or above every client id it has stored (read through the
        # unique index the first time; one short string per sender, like `_users`). An id
        # above it cannot be a resend, so it waits for the flush; ids that grow (the SDK's
        # do) always take that path. Others are written at once, as before.
        self._id_marks: dict[str, str] = {}
        self._recent_contacts: set[tuple[str, str]] = set()
        self._sweep = _RetentionSweep()

    def _highest_id(self) -> int:
        (stored,) = self._db.execute("SELECT coalesce(max(id), 0) FROM messages").fetchone()
        row = self._db.execute("SELECT seq FROM sqlite_sequence WHERE name = 'messages'").fetchone()
        return max(int(stored), int(row[0]) if row else 0)

    def _migrate(self) -> None:
        version = int(self._db.execute("PRAGMA user_version").fetchone()[0])
        for number, script in enumerate(_SCHEMA[version:], start=version + 1):
            self._db.execute("BEGIN IMMEDIATE")
            try:
                for statement in _statements(script, sqlite3.sqlite_version_info):
                    self._db.execute(statement)
                self._db.execute(f"PRAGMA user_version={number}")
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def _write(self) -> sqlite3.Connection:
        if not self._in_transaction:
            self._db.execute("BEGIN IMMEDIATE")
            self._in_transaction = True
        return self._db

    def _defer(self, sql: str, parameters: Any, many: bool = False) -> None:
        self._deferred.append((sql, parameters, many))

    def _flush_messages(self) -> None:
        if not self._pending:
            return
        self._write().executemany(
            _INSERT_MESSAGE, [(int(m.broker_id), *m[1:10]) for m in self._pending]
        )
        self._pending.clear()
        self._pending_by_client.clear()
        self._pending_streams.clear()

    def _apply_deferred(self) -> None:
        """Run the deferred writes now: before a read that must see them. This turn's
        messages go first, as the bookkeeping may refer to them."""
        self._flush_messages()
        if not self._deferred:
            return
        db = self._write()
        for sql, parameters, many in self._deferred:
            if many:
                db.executemany(sql, parameters)
            else:
                db.execute(sql, parameters)
        self._deferred.clear()

    def commit(self) -> None:
        unsynced = (
            self._full and not self._in_transaction and not self._pending and bool(self._deferred)
        )
        if unsynced:
            # Only bookkeeping in this turn. (SQLite takes the setting between transactions.)
            self._db.execute("PRAGMA synchronous=NORMAL")
        self._apply_deferred()
        if self._dirty_streams:
            self._write().executemany(
                "INSERT INTO streams (recipient_key, last_seq, confirmed_seq) VALUES (?, ?, ?)"
                " ON CONFLICT(recipient_key) DO UPDATE SET last_seq = excluded.last_seq,"
                " confirmed_seq = excluded.confirmed_seq",
                [(k, self._last_seq[k], self._confirmed.get(k, 0)) for k in self._dirty_streams],
            )
            self._dirty_streams.clear()
        if self._in_transaction:
            self._db.execute("COMMIT")
            self._in_transaction = False
        if unsynced:
            self._db.execute("PRAGMA synchronous=FULL")

    def close(self) -> None:
        self.commit()
        self._db.close()

    def last_seq(self, recipient_key: str) -> int:
        return self._last_seq.get(recipient_key, 0)

    def confirmed_through(self, recipient_key: str) -> int:
        return self._confirmed.get(recipient_key, 0)

    def contacts(self, key: str) -> set[str]:
        rows = self._db.execute("SELECT peer_key FROM contacts WHERE key = ?", (key,))
        return {str(row[0]) for row in rows}

    def _note_contact(self, sender_key: str, recipient_key: str) -> None:
        pair = (sender_key, recipient_key)
        if pair in self._recent_contacts:
            return
        if len(self._recent_contacts) >= RECENT_CONTACT_PAIRS:
            self._recent_contacts.clear()  # a miss only costs a write that changes nothing
        self._write().execute(
            "INSERT OR IGNORE INTO contacts (key, peer_key) VALUES (?, ?), (?, ?)",
            (sender_key, recipient_key, recipient_key, sender_key),
        )
        self._recent_contacts.add(pair)

    def remember_user(self, key: str, name: str, now: int) -> None:
        if self._users.get(key) == name:
            return
        self._write().execute(
            "INSERT INTO users (key, name, first_seen_ms, last_seen_ms) VALUES (?, ?, ?, ?)"
            " ON CONFLICT(key) DO UPDATE SET name = excluded.name,"
            " last_seen_ms = excluded.last_seen_ms",
            (key, name, now, now),
        )
        self._users[key] = name

    def lookup_user(self, key: str) -> str | None:
        return self._users.get(key)

    def begin_session(self, key: str) -> None:
        pass  # the only writer: nothing can be stale

    def name_owner(self, key: str) -> str | None:
        # Not cached: an operator may release a name while the broker runs.
        row = self._db.execute(
            "SELECT public_key FROM name_owners WHERE key = ?", (key,)
        ).fetchone()
        return str(row[0]) if row else None

    def claim_name(self, key: str, public_key: str, now: int) -> None:
        self._write().execute(
            "INSERT INTO name_owners (key, public_key, claimed_ms) VALUES (?, ?, ?)",
            (key, public_key, now),
        )

    def release_name(self, key: str) -> bool:
        removed = self._write().execute("DELETE FROM name_owners WHERE key = ?", (key,)).rowcount
        self.commit()
        return bool(removed)

    def find(self, sender_key: str, client_id: str) -> StoredMessage | None:
        pending = self._pending_by_client.get((sender_key, client_id))
        if pending is not None:
            return pending
        row = self._db.execute(
            f"SELECT {_COLUMNS} FROM messages WHERE sender_key = ? AND client_id = ?",
            (sender_key, client_id),
        ).fetchone()
        return _row(row) if row else None

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
        seq = self._last_seq.get(recipient_key, 0) + 1
        message = StoredMessage(
            str(self._next_id), seq, sender_key, sender, recipient_key, recipient, client_id,
            text, sent_at, accepted_at,
        )  # fmt: skip
        if self._grows(sender_key, client_id):
            # Cannot be stored yet: written with the rest of the turn.
            self._pending.append(message)
            self._pending_by_client[(sender_key, client_id)] = message
            self._pending_streams.setdefault(recipient_key, []).append(message)
        else:
            # Maybe a resend: written now, so that the unique (sender, id) index checks it
            # (no dearer than a lookup first). The turn's rows go before it: they are
            # checked too, and stay the stream's newest but this one.
            self._flush_messages()
            try:
                self._write().execute(_INSERT_MESSAGE, (self._next_id, *message[1:10]))
            except sqlite3.IntegrityError as exc:
                raise DuplicateMessage(client_id) from exc
        self._next_id += 1
        self._note_contact(sender_key, recipient_key)
        # The stream position is written once per commit, not once per message.
        self._last_seq[recipient_key] = seq
        self._dirty_streams.add(recipient_key)
        return message

    def _grows(self, sender_key: str, client_id: str) -> bool:
        """Whether `client_id` is above every id the sender has stored, so certainly new.
        (Then it becomes the sender's mark.)"""
        mark = self._id_marks.get(sender_key)
        if mark is None:
            # Inside the turn's transaction: a read outside one also takes and drops a
            # WAL read lock, measured at 5x the cost of the lookup.
            (mark,) = (
                self._write()
                .execute(
                    "SELECT coalesce(max(client_id), '') FROM messages WHERE sender_key = ?",
                    (sender_key,),
                )
                .fetchone()
            )
        if client_id > mark:
            self._id_marks[sender_key] = client_id
            return True
        self._id_marks[sender_key] = mark
        return False

    def unconfirmed_count(self, recipient_key: str) -> int:
        return self.last_seq(recipient_key) - self.confirmed_through(recipient_key)

    def unconfirmed(self, recipient_key: str, after_seq: int, limit: int) -> list[StoredMessage]:
        after = max(after_seq, self.confirmed_through(recipient_key))
        # This turn's messages of the stream are its newest, numbered without gaps.
        pending = self._pending_streams.get(recipient_key, [])
        if pending and after >= pending[0].seq - 1:
            start = after - (pending[0].seq - 1)
            return pending[start : start + limit]
        rows = self._db.execute(
            f"SELECT {_COLUMNS} FROM messages WHERE recipient_key = ? AND seq > ?"
            " ORDER BY seq LIMIT ?",
            (recipient_key, after, limit),
        ).fetchall()
        found = [_row(r) for r in rows]
        return found + pending[: limit - len(found)] if len(found) < limit else found

    def _get(self, recipient_key: str, broker_id: str) -> StoredMessage | None:
        number = parse_broker_id(broker_id)
        if number is None:
            return None
        self._apply_deferred()
        row = self._db.execute(
            f"SELECT {_COLUMNS} FROM messages WHERE id = ? AND recipient_key = ?",
            (number, recipient_key),
        ).fetchone()
        return _row(row) if row else None

    def confirm_through(self, recipient_key: str, seq: int, now: int) -> None:
        mark = self.confirmed_through(recipient_key)
        seq = min(seq, self.last_seq(recipient_key))
        if seq <= mark:
            return
        # One statement per batch, through the (recipient_key, seq) unique index.
        self._defer(
            "UPDATE messages SET delivered_at = ? WHERE recipient_key = ? AND seq > ? AND seq <= ?",
            (now, recipient_key, mark, seq),
        )
        self._confirmed[recipient_key] = seq
        self._dirty_streams.add(recipient_key)

    def mark_read(self, recipient_key: str, broker_id: str, now: int) -> StoredMessage | None:
        message = self._get(recipient_key, broker_id)
        if message is None or message.read_at is not None:
            return None
        self._defer("UPDATE messages SET read_at = ? WHERE id = ?", (now, int(broker_id)))
        return message._replace(read_at=now)

    def owe_receipts(self, broker_ids: Iterable[str]) -> None:
        self._defer(
            "INSERT OR IGNORE INTO receipts_owed (sender_key, message_id)"
            " SELECT sender_key, id FROM messages WHERE id = ?",
            [(int(b),) for b in broker_ids],
            many=True,
        )

    def receipts_owed(self, sender_key: str, limit: int) -> list[StoredMessage]:
        self._apply_deferred()
        rows = self._db.execute(
            f"SELECT {_OWED_COLUMNS} FROM receipts_owed o JOIN messages m ON m.id = o.message_id"
            " WHERE o.sender_key = ? ORDER BY o.message_id LIMIT ?",
            (sender_key, limit),
        ).fetchall()
        return [_row(r) for r in rows]

    def mark_sender_notified(self, broker_ids: Iterable[str]) -> None:
        self._defer(
            "DELETE FROM receipts_owed WHERE message_id = ?",
            [(int(b),) for b in broker_ids],
            many=True,
        )

    def history(
        self, key: str, peer_key: str, before: int | None, limit: int
    ) -> list[StoredMessage]:
        bound = before if before is not None else 2**63 - 1
        self._apply_deferred()
        # Each direction walks the pair index newest first and stops at `limit`; only
        # those rows are merged. (One query with OR sorted the pair's whole history.)
        one_way = (
            f"SELECT * FROM (SELECT {_COLUMNS} FROM messages WHERE sender_key = ?"
            " AND recipient_key = ? AND id < ? ORDER BY id DESC LIMIT ?)"
        )
        rows = self._db.execute(
            f"{one_way} UNION ALL {one_way} ORDER BY id DESC LIMIT ?",
            (key, peer_key, bound, limit, peer_key, key, bound, limit, limit),
        ).fetchall()
        return [_row(r) for r in rows]

    def prune_step(
        self, now: int, max_age_ms: int | None, keep_per_user: int | None
    ) -> tuple[int, bool]:
        if max_age_ms is None and keep_per_user is None:
            return 0, True
        self._apply_deferred()  # confirmations first: only confirmed messages go
        return self._sweep.step(self, now, max_age_ms, keep_per_user)

    def prune(self, now: int, max_age_ms: int | None, keep_per_user: int | None) -> int:
        self._sweep = _RetentionSweep()
        return whole_pass(lambda: self.prune_step(now, max_age_ms, keep_per_user))

    def _stream_keys(self) -> list[str]:
        return list(self._last_seq)

    def _max_number(self) -> int:
        row = self._db.execute("SELECT max(id) FROM messages").fetchone()
        return int(row[0] or 0)

    def _forget_owed(self, removed: list[tuple[int]]) -> None:
        if removed:
            self._write().executemany("DELETE FROM receipts_owed WHERE message_id = ?", removed)

    def _remove_old(self, first: int, end: int, cutoff: int) -> int:
        removed = (
            self._write()
            .execute(
                "DELETE FROM messages WHERE id >= ? AND id < ? AND delivered_at IS NOT NULL"
                " AND accepted_at < ? RETURNING id",
                (first, end, cutoff),
            )
            .fetchall()
        )
        self._forget_owed(removed)
        return len(removed)

    def _remove_confirmed(
        self, recipient_key: str, after: int, through: int, limit: int
    ) -> tuple[int, int]:
        looked_at = self._db.execute(
            "SELECT seq FROM messages WHERE recipient_key = ? AND seq > ? AND seq <= ?"
            " ORDER BY seq LIMIT ?",
            (recipient_key, after, through, limit),
        ).fetchall()
        reached = through if len(looked_at) < limit else int(looked_at[-1][0])
        removed = (
            self._write()
            .execute(
                "DELETE FROM messages WHERE recipient_key = ? AND seq > ? AND seq <= ?"
                " AND delivered_at IS NOT NULL RETURNING id",
                (recipient_key, after, reached),
            )
            .fetchall()
        )
        self._forget_owed(removed)
        return len(removed), reached
