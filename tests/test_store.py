"""The store contract, run against both stores, plus what only SQLite must do."""

from __future__ import annotations

import sqlite3

import pytest

from mangogram_broker.store import _SCHEMA, MemoryStore, SqliteStore


@pytest.fixture(params=["memory", "sqlite"])
def store(request, tmp_path):
    if request.param == "memory":
        return MemoryStore()
    opened = SqliteStore(tmp_path / "s.sqlite3", "full")
    request.addfinalizer(opened.close)
    return opened


def put(store, sender, recipient, client_id, text="t", at=1):
    return store.append(sender, sender, recipient, recipient, client_id, text, at, at)


def test_each_recipient_has_its_own_stream_numbered_from_one(store):
    assert [put(store, "a", "b", f"x{i}").seq for i in range(3)] == [1, 2, 3]
    assert put(store, "a", "c", "y").seq == 1
    assert put(store, "c", "b", "z").seq == 4


def test_broker_ids_are_unique_and_increasing(store):
    ids = [int(put(store, "a", "b", f"x{i}").broker_id) for i in range(5)]
    assert ids == sorted(set(ids))


def test_find_by_sender_and_client_id(store):
    stored = put(store, "a", "b", "my-id", "Привіт")
    assert store.find("a", "my-id") == stored
    assert store.find("b", "my-id") is None


def test_confirmation_is_a_mark_per_stream_that_only_moves_up(store):
    messages = [put(store, "a", "b", f"x{i}") for i in range(5)]
    put(store, "a", "c", "other")
    store.confirm_through("b", 2, 9)
    assert store.confirmed_through("b") == 2
    assert [m.seq for m in store.unconfirmed("b", 0, 10)] == [3, 4, 5]
    assert [m.seq for m in store.unconfirmed("b", 3, 1)] == [4]
    assert store.unconfirmed_count("b") == 3
    store.confirm_through("b", 1, 10)  # a stale receipt changes nothing
    assert store.confirmed_through("b") == 2
    store.confirm_through("b", 99, 11)  # never past the end of the stream
    assert store.confirmed_through("b") == 5
    assert store.unconfirmed_count("b") == 0
    assert store.unconfirmed_count("c") == 1  # other streams are untouched
    confirmed = store.history("b", "a", None, 10)
    assert [m.delivered_at for m in confirmed] == [11, 11, 11, 9, 9]
    assert [m.client_id for m in confirmed] == [m.client_id for m in reversed(messages)]


def test_receipts_owed_until_notified(store):
    m = put(store, "a", "b", "x")
    other = put(store, "c", "b", "y")
    assert store.receipts_owed("a", 10) == []
    store.confirm_through("b", 2, 5)
    store.owe_receipts([m.broker_id, other.broker_id])
    store.owe_receipts([m.broker_id])  # owing twice is owing once
    owed = store.receipts_owed("a", 10)
    assert [(o.broker_id, o.delivered_at) for o in owed] == [(m.broker_id, 5)]
    store.mark_sender_notified([m.broker_id])
    assert store.receipts_owed("a", 10) == []
    assert [o.broker_id for o in store.receipts_owed("c", 10)] == [other.broker_id]


def test_read_is_recorded_once(store):
    m = put(store, "a", "b", "x")
    read = store.mark_read("b", m.broker_id, 7)
    assert read.read_at == 7
    assert store.mark_read("b", m.broker_id, 8) is None


@pytest.mark.parametrize("bad", ["²", "١٢", "9" * 40, "-1", "", "1.5", " 1"])
def test_non_ascii_or_huge_broker_ids_are_refused_not_crashing(store, bad):
    put(store, "a", "b", "x")
    assert store.mark_read("b", bad, 5) is None


def test_users_are_remembered(store):
    assert store.lookup_user("олена") is None
    store.remember_user("олена", "Олена", 1)
    assert store.lookup_user("олена") == "Олена"


def test_sqlite_keeps_everything_across_reopen(tmp_path):
    path = tmp_path / "durable.sqlite3"
    first = SqliteStore(path, "full")
    first.remember_user("b", "Bob", 1)
    m = first.append("a", "Alice", "b", "Bob", "id1", "Добрий вечір 🌙", 10, 11)
    first.commit()
    first.close()
    second = SqliteStore(path, "normal")
    assert second.lookup_user("b") == "Bob"
    assert second.find("a", "id1") == m
    assert put(second, "a", "b", "id2").seq == 2
    second.close()


def test_uncommitted_writes_are_not_durable(tmp_path):
    path = tmp_path / "crash.sqlite3"
    store = SqliteStore(path, "full")
    put(store, "a", "b", "committed")
    store.commit()
    put(store, "a", "b", "in flight")
    # simulate a crash: a second connection sees only what was committed
    other = sqlite3.connect(path)
    rows = [r[0] for r in other.execute("SELECT client_id FROM messages")]
    other.close()
    assert rows == ["committed"]
    store.close()


def test_schema_is_versioned(tmp_path):
    path = tmp_path / "v.sqlite3"
    SqliteStore(path).close()
    db = sqlite3.connect(path)
    assert db.execute("PRAGMA user_version").fetchone()[0] == len(_SCHEMA) == 3
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    db.close()


def test_a_turn_of_only_confirmations_skips_the_fsync_but_the_next_ack_has_it(tmp_path):
    path = tmp_path / "sync.sqlite3"
    store = SqliteStore(path, "full")
    put(store, "a", "b", "x")
    store.commit()
    store.confirm_through("b", 1, 5)
    store.mark_read("b", "1", 6)
    store.commit()  # bookkeeping only: committed without waiting for the disk...
    # ...and the setting is back for the next turn, whose ACCEPTED needs the fsync.
    assert store._db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    put(store, "a", "b", "y")
    store.commit()
    store.close()
    reopened = SqliteStore(path, "full")
    try:
        assert reopened.confirmed_through("b") == 1
        (first, _second) = sorted(reopened.history("b", "a", None, 5), key=lambda m: m.seq)
        assert (first.delivered_at, first.read_at) == (5, 6)
    finally:
        reopened.close()


def test_a_version_2_store_migrates_to_stream_marks_and_owed_receipts(tmp_path):
    path = tmp_path / "old.sqlite3"
    db = sqlite3.connect(path, isolation_level=None)
    for script in _SCHEMA[:2]:
        db.executescript(script)
    db.execute("PRAGMA user_version=2")
    rows = [  # seq, delivered_at, sender_notified: 1 confirmed but not told, 2 waiting
        (1, 50, 0),
        (2, None, 0),
        (3, 60, 1),  # confirmed alone (version 2 allowed gaps): delivered again, harmless
    ]
    for seq, delivered_at, notified in rows:
        db.execute(
            "INSERT INTO messages (recipient_key, seq, sender_key, sender, recipient,"
            " client_id, text, sent_at, accepted_at, delivered_at, sender_notified)"
            " VALUES ('b', ?, 'a', 'a', 'b', ?, 't', 1, 1, ?, ?)",
            (seq, f"id{seq}", delivered_at, notified),
        )
    db.execute("INSERT INTO streams VALUES ('b', 3)")
    db.close()
    store = SqliteStore(path)
    try:
        assert store.confirmed_through("b") == 1
        assert [m.seq for m in store.unconfirmed("b", 0, 10)] == [2, 3]
        assert [m.client_id for m in store.receipts_owed("a", 10)] == ["id1"]
        assert put(store, "a", "b", "new").seq == 4
    finally:
        store.close()


def test_a_stored_id_cannot_be_appended_twice(store):
    from mangogram_broker.store import DuplicateMessage

    first = put(store, "a", "b", "same")
    with pytest.raises(DuplicateMessage):
        put(store, "a", "b", "same")
    assert put(store, "c", "b", "same").seq == first.seq + 1  # ids are per sender
