"""The store contract, run against both stores, plus what only SQLite must do."""

from __future__ import annotations

import sqlite3

import pytest

from mangogram_broker.store import MemoryStore, SqliteStore


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


def test_confirm_only_by_the_recipient_and_only_once(store):
    stored = put(store, "a", "b", "x")
    assert store.confirm("a", stored.broker_id, 5) is None
    assert store.confirm("b", "not-a-number", 5) is None
    confirmed = store.confirm("b", stored.broker_id, 5)
    assert confirmed is not None and confirmed.delivered_at == 5
    assert store.confirm("b", stored.broker_id, 6) is None
    assert store.unconfirmed("b", 0, 10) == []


def test_unconfirmed_after_a_cursor_in_order(store):
    messages = [put(store, "a", "b", f"x{i}") for i in range(5)]
    store.confirm("b", messages[1].broker_id, 9)
    assert [m.seq for m in store.unconfirmed("b", 0, 10)] == [1, 3, 4, 5]
    assert [m.seq for m in store.unconfirmed("b", 3, 1)] == [4]
    store.confirm_through("b", 4, 9)
    assert [m.seq for m in store.unconfirmed("b", 0, 10)] == [5]
    assert store.unconfirmed_count("b") == 1


def test_receipts_owed_until_notified(store):
    m = put(store, "a", "b", "x")
    assert store.receipts_owed("a", 10) == []
    store.confirm("b", m.broker_id, 5)
    assert [o.broker_id for o in store.receipts_owed("a", 10)] == [m.broker_id]
    store.mark_sender_notified([m.broker_id])
    assert store.receipts_owed("a", 10) == []


def test_read_is_recorded_once(store):
    m = put(store, "a", "b", "x")
    read = store.mark_read("b", m.broker_id, 7)
    assert read.read_at == 7
    assert store.mark_read("b", m.broker_id, 8) is None


@pytest.mark.parametrize("bad", ["²", "١٢", "9" * 40, "-1", "", "1.5", " 1"])
def test_non_ascii_or_huge_broker_ids_are_refused_not_crashing(store, bad):
    put(store, "a", "b", "x")
    assert store.confirm("b", bad, 5) is None
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
    assert db.execute("PRAGMA user_version").fetchone()[0] == 2
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    db.close()


def test_a_stored_id_cannot_be_appended_twice(store):
    from mangogram_broker.store import DuplicateMessage

    first = put(store, "a", "b", "same")
    with pytest.raises(DuplicateMessage):
        put(store, "a", "b", "same")
    assert put(store, "c", "b", "same").seq == first.seq + 1  # ids are per sender
