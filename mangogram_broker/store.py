"""Where messages live until they are confirmed, and afterwards as history.

Two stores with one interface: `SqliteStore` (the broker's default, a file in the data
dir) and `MemoryStore` (tests, throwaway brokers). The core writes freely during a loop
turn; the shell calls `commit()` once per turn, before any acknowledgement goes out, so
an ACCEPTED always means "stored" (and, with durability `full`, "on disk").

Each recipient has a stream: its messages numbered `seq` = 1, 2, 3... A message is
"confirmed" once the recipient's client sent RECEIPT for it (or resumed past it); until
then it is redelivered at every login. Confirmed messages stay as history until the
retention rules remove them.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal, Protocol

Durability = Literal["full", "normal"]


def parse_broker_id(text: str) -> int | None:
    """The message number in a broker id, or None if `text` is not one. Only ASCII
    digits count: str.isdigit() also accepts "²" and "١", which int() then refuses."""
    if not (0 < len(text) <= 18 and text.isascii() and text.isdigit()):
        return None
    return int(text)


class DuplicateMessage(Exception):
    """`append` found the sender's message id already stored (a resend)."""


@dataclass(frozen=True)
class StoredMessage:
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
    sender_notified: bool = False


class Store(Protocol):
    """What the broker core needs from storage. Writes become durable at `commit()`."""

    def remember_user(self, key: str, name: str, now: int) -> None: ...
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
    def unconfirmed(
        self, recipient_key: str, after_seq: int, limit: int
    ) -> list[StoredMessage]: ...
    def confirm(
        self, recipient_key: str, broker_id: str, now: int, sender_notified: bool = False
    ) -> StoredMessage | None: ...
    def last_seq(self, recipient_key: str) -> int: ...
    def confirmed_through(self, recipient_key: str) -> int:
        """The highest seq up to which every message of the stream is confirmed."""
        ...

    def contacts(self, key: str) -> set[str]:
        """Name keys of everyone `key` has exchanged messages with (as stored)."""
        ...

    def confirm_through(self, recipient_key: str, seq: int, now: int) -> None: ...
    def mark_read(self, recipient_key: str, broker_id: str, now: int) -> StoredMessage | None: ...
    def receipts_owed(self, sender_key: str, limit: int) -> list[StoredMessage]: ...
    def mark_sender_notified(self, broker_ids: Iterable[str]) -> None: ...
    def history(
        self, key: str, peer_key: str, before: int | None, limit: int
    ) -> list[StoredMessage]: ...
    def prune(self, now: int, max_age_ms: int | None, keep_per_user: int | None) -> int: ...
    def name_owner(self, key: str) -> str | None: ...
    def claim_name(self, key: str, public_key: str, now: int) -> None: ...
    def release_name(self, key: str) -> bool: ...
    def commit(self) -> None: ...
    def close(self) -> None: ...


class MemoryStore:
    """A `Store` in dictionaries; nothing survives the process."""

    def __init__(self) -> None:
        self._users: dict[str, str] = {}
        self._messages: dict[int, StoredMessage] = {}
        self._by_client: dict[tuple[str, str], int] = {}
        self._last_seq: dict[str, int] = {}
        self._owners: dict[str, str] = {}
        self._next_id = 1

    def name_owner(self, key: str) -> str | None:
        return self._owners.get(key)

    def claim_name(self, key: str, public_key: str, now: int) -> None:
        self._owners[key] = public_key

    def release_name(self, key: str) -> bool:
        return self._owners.pop(key, None) is not None

    def remember_user(self, key: str, name: str, now: int) -> None:
        self._users[key] = name

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
        return message

    def _stream(self, recipient_key: str) -> list[StoredMessage]:
        return sorted(
            (m for m in self._messages.values() if m.recipient_key == recipient_key),
            key=lambda m: m.seq,
        )

    def unconfirmed_count(self, recipient_key: str) -> int:
        return sum(1 for m in self._stream(recipient_key) if m.delivered_at is None)

    def unconfirmed(self, recipient_key: str, after_seq: int, limit: int) -> list[StoredMessage]:
        found = [
            m for m in self._stream(recipient_key) if m.seq > after_seq and m.delivered_at is None
        ]
        return found[:limit]

    def _get(self, recipient_key: str, broker_id: str) -> StoredMessage | None:
        number = parse_broker_id(broker_id)
        if number is None:
            return None
        message = self._messages.get(number)
        if message is None or message.recipient_key != recipient_key:
            return None
        return message

    def last_seq(self, recipient_key: str) -> int:
        return self._last_seq.get(recipient_key, 0)

    def confirmed_through(self, recipient_key: str) -> int:
        waiting = [m.seq for m in self._stream(recipient_key) if m.delivered_at is None]
        return min(waiting) - 1 if waiting else self.last_seq(recipient_key)

    def contacts(self, key: str) -> set[str]:
        found = {m.recipient_key for m in self._messages.values() if m.sender_key == key}
        return found | {m.sender_key for m in self._messages.values() if m.recipient_key == key}

    def confirm(
        self, recipient_key: str, broker_id: str, now: int, sender_notified: bool = False
    ) -> StoredMessage | None:
        message = self._get(recipient_key, broker_id)
        if message is None or message.delivered_at is not None:
            return None
        confirmed = replace(message, delivered_at=now, sender_notified=sender_notified)
        self._messages[int(broker_id)] = confirmed
        return confirmed

    def confirm_through(self, recipient_key: str, seq: int, now: int) -> None:
        for message in self._stream(recipient_key):
            if message.seq <= seq and message.delivered_at is None:
                self._messages[int(message.broker_id)] = replace(message, delivered_at=now)

    def mark_read(self, recipient_key: str, broker_id: str, now: int) -> StoredMessage | None:
        message = self._get(recipient_key, broker_id)
        if message is None or message.read_at is not None:
            return None
        read = replace(message, read_at=now)
        self._messages[int(broker_id)] = read
        return read

    def receipts_owed(self, sender_key: str, limit: int) -> list[StoredMessage]:
        owed = [
            m
            for m in sorted(self._messages.values(), key=lambda m: int(m.broker_id))
            if m.sender_key == sender_key and m.delivered_at is not None and not m.sender_notified
        ]
        return owed[:limit]

    def mark_sender_notified(self, broker_ids: Iterable[str]) -> None:
        for broker_id in broker_ids:
            message = self._messages.get(int(broker_id))
            if message is not None:
                self._messages[int(broker_id)] = replace(message, sender_notified=True)

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

    def prune(self, now: int, max_age_ms: int | None, keep_per_user: int | None) -> int:
        doomed: set[int] = set()
        for number, message in self._messages.items():
            old = max_age_ms is not None and message.accepted_at < now - max_age_ms
            if message.delivered_at is not None and old:
                doomed.add(number)
        if keep_per_user is not None:
            for recipient_key in {m.recipient_key for m in self._messages.values()}:
                confirmed = [m for m in self._stream(recipient_key) if m.delivered_at is not None]
                for message in confirmed[: max(0, len(confirmed) - keep_per_user)]:
                    doomed.add(int(message.broker_id))
        for number in doomed:
            message = self._messages.pop(number)
            self._by_client.pop((message.sender_key, message.client_id), None)
        return len(doomed)

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
]

_COLUMNS = (
    "id, seq, sender_key, sender, recipient_key, recipient, client_id, text,"
    " sent_at, accepted_at, delivered_at, read_at, sender_notified"
)


def _row(row: tuple[Any, ...]) -> StoredMessage:
    (number, seq, sender_key, sender, recipient_key, recipient, client_id, text,
     sent_at, accepted_at, delivered_at, read_at, notified) = row  # fmt: skip
    return StoredMessage(
        str(number), seq, sender_key, sender, recipient_key, recipient, client_id, text,
        sent_at, accepted_at, delivered_at, read_at, bool(notified),
    )  # fmt: skip


class SqliteStore:
    """The store in one SQLite file: WAL, one writer (the broker thread), explicit
    transactions, schema versioned by `PRAGMA user_version`.

    Args:
        path: the database file (its directory is created).
        durability: "full" fsyncs every commit (an ack means on disk); "normal" survives
            a crash of the broker but not of the machine.
    """

    def __init__(self, path: Path, durability: Durability = "full") -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        # An admin command may write while the broker runs; wait for each other briefly.
        self._db.execute("PRAGMA busy_timeout=5000")
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(f"PRAGMA synchronous={'FULL' if durability == 'full' else 'NORMAL'}")
        self._db.execute("PRAGMA foreign_keys=ON")
        self._migrate()
        self._in_transaction = False
        self._users: dict[str, str] = dict(self._db.execute("SELECT key, name FROM users"))
        # Hot-path counters kept in memory, read from disk once per recipient. The store is
        # the only writer, so they cannot go stale.
        self._last_seq: dict[str, int] = dict(self._db.execute("SELECT * FROM streams"))
        self._unconfirmed: dict[str, int] = {}
        self._dirty_streams: set[str] = set()

    def _migrate(self) -> None:
        version = int(self._db.execute("PRAGMA user_version").fetchone()[0])
        for number, script in enumerate(_SCHEMA[version:], start=version + 1):
            self._db.execute("BEGIN IMMEDIATE")
            try:
                for statement in script.split(";"):
                    if statement.strip():
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

    def commit(self) -> None:
        if self._dirty_streams:
            self._write().executemany(
                "INSERT INTO streams (recipient_key, last_seq) VALUES (?, ?)"
                " ON CONFLICT(recipient_key) DO UPDATE SET last_seq = excluded.last_seq",
                [(key, self._last_seq[key]) for key in self._dirty_streams],
            )
            self._dirty_streams.clear()
        if self._in_transaction:
            self._db.execute("COMMIT")
            self._in_transaction = False

    def close(self) -> None:
        self.commit()
        self._db.close()

    def last_seq(self, recipient_key: str) -> int:
        return self._last_seq.get(recipient_key, 0)

    def confirmed_through(self, recipient_key: str) -> int:
        row = self._db.execute(
            "SELECT min(seq) FROM messages WHERE recipient_key = ? AND delivered_at IS NULL",
            (recipient_key,),
        ).fetchone()
        return int(row[0]) - 1 if row[0] is not None else self.last_seq(recipient_key)

    def contacts(self, key: str) -> set[str]:
        rows = self._db.execute(
            "SELECT DISTINCT recipient_key FROM messages WHERE sender_key = ?"
            " UNION SELECT DISTINCT sender_key FROM messages WHERE recipient_key = ?",
            (key, key),
        )
        return {str(row[0]) for row in rows}

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
        db = self._write()
        seq = self._last_seq.get(recipient_key, 0) + 1
        try:
            cursor = db.execute(
                "INSERT INTO messages (recipient_key, seq, sender_key, sender, recipient,"
                " client_id, text, sent_at, accepted_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (recipient_key, seq, sender_key, sender, recipient, client_id, text, sent_at,
                 accepted_at),
            )  # fmt: skip
        except sqlite3.IntegrityError as exc:
            # The unique (sender, id) index is the idempotency check: no lookup beforehand.
            raise DuplicateMessage(client_id) from exc
        # The stream position is written once per commit, not once per message.
        self._last_seq[recipient_key] = seq
        self._dirty_streams.add(recipient_key)
        if recipient_key in self._unconfirmed:
            self._unconfirmed[recipient_key] += 1
        return StoredMessage(
            str(cursor.lastrowid), seq, sender_key, sender, recipient_key, recipient, client_id,
            text, sent_at, accepted_at,
        )  # fmt: skip

    def unconfirmed_count(self, recipient_key: str) -> int:
        count = self._unconfirmed.get(recipient_key)
        if count is None:
            row = self._db.execute(
                "SELECT count(*) FROM messages WHERE recipient_key = ? AND delivered_at IS NULL",
                (recipient_key,),
            ).fetchone()
            count = self._unconfirmed[recipient_key] = int(row[0])
        return count

    def unconfirmed(self, recipient_key: str, after_seq: int, limit: int) -> list[StoredMessage]:
        rows = self._db.execute(
            f"SELECT {_COLUMNS} FROM messages WHERE recipient_key = ? AND seq > ?"
            " AND delivered_at IS NULL ORDER BY seq LIMIT ?",
            (recipient_key, after_seq, limit),
        ).fetchall()
        return [_row(r) for r in rows]

    def _get(self, recipient_key: str, broker_id: str) -> StoredMessage | None:
        number = parse_broker_id(broker_id)
        if number is None:
            return None
        row = self._db.execute(
            f"SELECT {_COLUMNS} FROM messages WHERE id = ? AND recipient_key = ?",
            (number, recipient_key),
        ).fetchone()
        return _row(row) if row else None

    def confirm(
        self, recipient_key: str, broker_id: str, now: int, sender_notified: bool = False
    ) -> StoredMessage | None:
        number = parse_broker_id(broker_id)
        if number is None:
            return None
        row = (
            self._write()
            .execute(
                "UPDATE messages SET delivered_at = ?, sender_notified = ?"
                " WHERE id = ? AND recipient_key = ? AND delivered_at IS NULL"
                f" RETURNING {_COLUMNS}",
                (now, int(sender_notified), number, recipient_key),
            )
            .fetchone()
        )
        if row is None:
            return None
        if recipient_key in self._unconfirmed:
            self._unconfirmed[recipient_key] -= 1
        return _row(row)

    def confirm_through(self, recipient_key: str, seq: int, now: int) -> None:
        self._write().execute(
            "UPDATE messages SET delivered_at = ? WHERE recipient_key = ? AND seq <= ?"
            " AND delivered_at IS NULL",
            (now, recipient_key, seq),
        )
        self._unconfirmed.pop(recipient_key, None)  # recount on next use

    def mark_read(self, recipient_key: str, broker_id: str, now: int) -> StoredMessage | None:
        message = self._get(recipient_key, broker_id)
        if message is None or message.read_at is not None:
            return None
        self._write().execute("UPDATE messages SET read_at = ? WHERE id = ?", (now, int(broker_id)))
        return replace(message, read_at=now)

    def receipts_owed(self, sender_key: str, limit: int) -> list[StoredMessage]:
        rows = self._db.execute(
            f"SELECT {_COLUMNS} FROM messages WHERE sender_key = ? AND delivered_at IS NOT NULL"
            " AND sender_notified = 0 ORDER BY id LIMIT ?",
            (sender_key, limit),
        ).fetchall()
        return [_row(r) for r in rows]

    def mark_sender_notified(self, broker_ids: Iterable[str]) -> None:
        self._write().executemany(
            "UPDATE messages SET sender_notified = 1 WHERE id = ?",
            [(int(b),) for b in broker_ids],
        )

    def history(
        self, key: str, peer_key: str, before: int | None, limit: int
    ) -> list[StoredMessage]:
        bound = before if before is not None else 2**63 - 1
        rows = self._db.execute(
            f"SELECT {_COLUMNS} FROM messages WHERE id < ? AND ("
            " (sender_key = ? AND recipient_key = ?) OR (sender_key = ? AND recipient_key = ?))"
            " ORDER BY id DESC LIMIT ?",
            (bound, key, peer_key, peer_key, key, limit),
        ).fetchall()
        return [_row(r) for r in rows]

    def prune(self, now: int, max_age_ms: int | None, keep_per_user: int | None) -> int:
        db = self._write()
        removed = 0
        if max_age_ms is not None:
            removed += db.execute(
                "DELETE FROM messages WHERE delivered_at IS NOT NULL AND accepted_at < ?",
                (now - max_age_ms,),
            ).rowcount
        if keep_per_user is not None:
            removed += db.execute(
                "DELETE FROM messages WHERE delivered_at IS NOT NULL AND id IN ("
                " SELECT id FROM (SELECT id, row_number() OVER ("
                "  PARTITION BY recipient_key ORDER BY seq DESC) AS newer"
                "  FROM messages WHERE delivered_at IS NOT NULL) WHERE newer > ?)",
                (keep_per_user,),
            ).rowcount
        return removed
