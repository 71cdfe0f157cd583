"""The user directory: every name that ever logged in, so the broker can tell an
offline user ("recipient_offline") from a name nobody has ("unknown_recipient")."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Protocol


class UserDirectory(Protocol):
    def remember(self, key: str, name: str, now_ms: int) -> None:
        """Record that `name` (comparison key `key`) has logged in."""

    def lookup(self, key: str) -> str | None:
        """The display name last used for `key`, or None if nobody ever had it."""


class MemoryDirectory:
    """A directory that lives as long as the process: for tests and throwaway brokers."""

    def __init__(self) -> None:
        self._names: dict[str, str] = {}

    def remember(self, key: str, name: str, now_ms: int) -> None:
        self._names[key] = name

    def lookup(self, key: str) -> str | None:
        return self._names.get(key)


class SqliteDirectory:
    """The directory in `users.sqlite3` under the broker's data dir."""

    SCHEMA_VERSION = 1

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        version = self._db.execute("PRAGMA user_version").fetchone()[0]
        if version == 0:
            with self._db:
                self._db.execute("BEGIN")
                self._db.execute(
                    "CREATE TABLE IF NOT EXISTS users ("
                    " key TEXT PRIMARY KEY, name TEXT NOT NULL,"
                    " first_seen_ms INTEGER NOT NULL, last_seen_ms INTEGER NOT NULL)"
                )
                self._db.execute(f"PRAGMA user_version={self.SCHEMA_VERSION}")
        self._cache: dict[str, str] = dict(self._db.execute("SELECT key, name FROM users"))

    def remember(self, key: str, name: str, now_ms: int) -> None:
        if self._cache.get(key) == name:
            return
        self._db.execute(
            "INSERT INTO users (key, name, first_seen_ms, last_seen_ms) VALUES (?, ?, ?, ?)"
            " ON CONFLICT(key) DO UPDATE SET name = excluded.name,"
            " last_seen_ms = excluded.last_seen_ms",
            (key, name, now_ms, now_ms),
        )
        self._cache[key] = name

    def lookup(self, key: str) -> str | None:
        return self._cache.get(key)

    def close(self) -> None:
        self._db.close()
