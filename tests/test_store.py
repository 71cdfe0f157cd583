"""The store contract, run against both stores, plus what only SQLite must do."""

from __future__ import annotations

import sqlite3

import pytest

from mangogram_broker import store as store_module
from mangogram_broker.store import _SCHEMA, MemoryStore, SqliteStore

from .natsserver import start_single


@pytest.fixture(params=["memory", "sqlite", "jetstream"])
def store(request, tmp_path):
    if request.param == "memory":
        return MemoryStore()
    if request.param == "jetstream":
        # A real single-node nats-server per test: the cluster store, same contract.
        from mangogram_broker.jetstream_store import JetStreamStore
        from mangogram_broker.nats_settings import NatsSettings

        node = start_single(tmp_path / "nats")
        request.addfinalizer(node.kill)
        opened = JetStreamStore(NatsSettings((node.url,), timeout_s=5))
        request.addfinalizer(opened.close)
        return opened
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
    assert db.execute("PRAGMA user_version").fetchone()[0] == len(_SCHEMA) == 4
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


def test_a_duplicate_is_refused_within_one_turn_and_across_turns(store):
    from mangogram_broker.store import DuplicateMessage

    first = put(store, "a", "b", "same")
    with pytest.raises(DuplicateMessage):
        put(store, "a", "b", "same")  # the SQLite store has not written `first` yet
    assert store.find("a", "same") == first
    store.commit()
    with pytest.raises(DuplicateMessage):
        put(store, "a", "b", "same")
    # A refused resend takes no number: the next message follows on.
    later = put(store, "a", "b", "next")
    assert (later.seq, int(later.broker_id)) == (first.seq + 1, int(first.broker_id) + 1)
    store.commit()
    assert [m.client_id for m in store.unconfirmed("b", 0, 10)] == ["same", "next"]


def test_reads_in_a_turn_see_its_messages_before_the_commit(store):
    put(store, "a", "b", "c1")
    put(store, "a", "b", "c2")
    store.commit()
    stored = [put(store, "a" if i % 2 else "d", "b", f"p{i}") for i in range(4)]
    assert [m.seq for m in stored] == [3, 4, 5, 6]
    assert store.find("d", "p2") == stored[2]
    # Window fills: from the committed rows into this turn's, from inside this turn's,
    # bounded by the limit, and nothing past the end.
    assert [m.client_id for m in store.unconfirmed("b", 0, 10)] == [
        "c1", "c2", "p0", "p1", "p2", "p3",
    ]  # fmt: skip
    assert [m.client_id for m in store.unconfirmed("b", 1, 2)] == ["c2", "p0"]
    assert [m.client_id for m in store.unconfirmed("b", 3, 2)] == ["p1", "p2"]
    assert store.unconfirmed("b", 6, 10) == []
    assert store.unconfirmed_count("b") == 6
    store.confirm_through("b", 4, 20)
    assert [m.seq for m in store.unconfirmed("b", 0, 10)] == [5, 6]
    store.owe_receipts([stored[1].broker_id])
    assert [m.client_id for m in store.receipts_owed("a", 10)] == ["p1"]
    assert store.mark_read("b", stored[3].broker_id, 21).read_at == 21
    assert [m.client_id for m in store.history("b", "a", None, 10)] == ["p3", "p1", "c2", "c1"]
    assert store.contacts("d") == {"b"}
    assert [m.client_id for m in store.unconfirmed("b", 0, 10)] == ["p2", "p3"]
    store.commit()
    assert [(m.seq, m.delivered_at, m.read_at) for m in store.unconfirmed("b", 0, 10)] == [
        (5, None, None),
        (6, None, 21),
    ]


def test_a_turn_holding_messages_commits_with_the_fsync_even_with_confirmations(tmp_path):
    store = SqliteStore(tmp_path / "sync.sqlite3", "full")
    try:
        put(store, "a", "b", "x")
        store.commit()
        statements: list[str] = []
        store._db.set_trace_callback(statements.append)
        store.confirm_through("b", 1, 5)  # bookkeeping first, then a message: an ACCEPTED
        put(store, "a", "b", "y")
        store.commit()
        store._db.set_trace_callback(None)
        assert not [s for s in statements if "synchronous" in s.lower()]
        assert any(s.startswith("INSERT INTO messages") for s in statements)
    finally:
        store.close()


def test_broker_ids_after_a_restart_continue_past_the_highest_ever_stored(tmp_path):
    path = tmp_path / "ids.sqlite3"
    first = SqliteStore(path, "full")
    ids = [int(put(first, "a", "b", f"x{i}").broker_id) for i in range(5)]
    first.commit()
    first.close()
    second = SqliteStore(path, "full")
    assert int(put(second, "a", "b", "y").broker_id) == ids[-1] + 1
    second.confirm_through("b", 6, 10)
    second.commit()
    # Retention removes every message, the newest too: its number is still never reused,
    # as a client may hold it (READ names a message by it).
    assert second.prune(10_000, 1, None) == 6
    second.close()
    third = SqliteStore(path, "full")
    try:
        after = put(third, "a", "b", "z")
        assert int(after.broker_id) == ids[-1] + 2
        assert after.seq == 7
    finally:
        third.close()


def test_a_turn_lost_in_a_crash_leaves_nothing_and_the_store_carries_on(tmp_path):
    path = tmp_path / "crash.sqlite3"
    store = SqliteStore(path, "full")
    kept = put(store, "a", "b", "kept")
    store.commit()
    for i in range(3):  # numbers handed out, never committed: the broker dies here
        put(store, "a", "b", f"lost{i}")
    store._db.close()  # the connection ends without COMMIT, as a killed process's would
    reopened = SqliteStore(path, "full")
    try:
        assert reopened.find("a", "lost0") is None
        assert reopened.last_seq("b") == 1
        # The sender never got an ACCEPTED for them, so it sends them again.
        again = [put(reopened, "a", "b", f"lost{i}") for i in range(3)]
        assert [m.seq for m in again] == [2, 3, 4]
        assert [int(m.broker_id) for m in again] == [int(kept.broker_id) + i for i in (1, 2, 3)]
        reopened.commit()
        assert [m.client_id for m in reopened.unconfirmed("b", 0, 10)] == [
            "kept", "lost0", "lost1", "lost2",
        ]  # fmt: skip
        reopened.confirm_through("b", 4, 9)
        reopened.commit()
        assert reopened.unconfirmed_count("b") == 0
    finally:
        reopened.close()


def test_a_turns_messages_are_written_at_the_commit_a_row_per_cached_statement(tmp_path):
    store = SqliteStore(tmp_path / "turn.sqlite3", "normal")
    try:
        statements: list[str] = []
        store._db.set_trace_callback(statements.append)
        for i in range(100):
            put(store, "a", "b", f"x{i:03d}")
        before_commit = [s for s in statements if s.startswith("INSERT INTO messages")]
        store.commit()
        store._db.set_trace_callback(None)
        inserts = [s for s in statements if s.startswith("INSERT INTO messages")]
        assert before_commit == []  # held until the turn's commit
        assert len(inserts) == 100  # one row each (the texts hold no "), (")
        assert not any("), (" in s for s in inserts)
        assert [m.seq for m in store.unconfirmed("b", 0, 200)] == list(range(1, 101))
    finally:
        store.close()


# Retention in bounded steps, and lookups through indexes (nothing may stall the loop).


def prune_in_steps(store, now, max_age_ms, keep_per_user, most_steps=10_000):
    """Step until the pass finishes; returns (messages removed, steps taken)."""
    removed = 0
    for steps in range(1, most_steps + 1):
        step_removed, finished = store.prune_step(now, max_age_ms, keep_per_user)
        removed += step_removed
        if finished:
            return removed, steps
    raise AssertionError("the retention pass never finished")


def test_retention_steps_are_bounded_and_a_pass_removes_everything_eligible(store, monkeypatch):
    monkeypatch.setattr(store_module, "PRUNE_STEP_ROWS", 16)
    for i in range(200):  # three streams (67, 67, 66 messages), accepted at 0..199
        put(store, "a", ("b", "c", "d")[i % 3], f"x{i}", at=i)
    store.confirm_through("b", 60, 500)
    store.confirm_through("c", 66, 500)  # c: 66 of 67 confirmed; d: none
    store.commit()
    removed, steps = prune_in_steps(store, 1000, 1000 - 150, None)  # older than 150
    # Confirmed and accepted before 150: b's seqs 1-50, c's 1-50; d keeps everything.
    assert removed == 100
    assert steps > 200 // 16  # the pass was spread over many steps
    assert [m.seq for m in store.unconfirmed("d", 0, 100)] == list(range(1, 67))
    assert [m.seq for m in store.unconfirmed("b", 0, 100)] == list(range(61, 68))
    assert {m.seq for m in store.history("a", "b", None, 100)} == set(range(51, 68))
    assert {m.seq for m in store.history("a", "c", None, 100)} == set(range(51, 68))
    assert prune_in_steps(store, 1000, 1000 - 150, None)[0] == 0  # nothing left to do


def test_the_count_rule_keeps_the_newest_below_each_mark_over_many_steps(store, monkeypatch):
    monkeypatch.setattr(store_module, "PRUNE_STEP_ROWS", 8)
    for recipient in ("b", "c"):
        for i in range(40):
            put(store, "a", recipient, f"{recipient}{i}", at=i)
    store.confirm_through("b", 30, 50)
    store.confirm_through("c", 40, 50)
    removed, steps = prune_in_steps(store, 100, None, 5)
    assert removed == 25 + 35
    assert steps > 60 // 8
    assert {m.seq for m in store.history("a", "b", None, 100)} == set(range(26, 41))
    assert {m.seq for m in store.history("a", "c", None, 100)} == set(range(36, 41))
    # A later pass takes up each stream where the last one left it: a step of 8 removes
    # one message, and b's 10 newly prunable ones take 10 steps (plus one for c), not a
    # walk from seq 1 again.
    store.confirm_through("b", 40, 60)
    assert prune_in_steps(store, 100, None, 5) == (10, 11)
    assert {m.seq for m in store.history("a", "b", None, 100)} == set(range(36, 41))


def test_a_message_stored_during_a_pass_is_pruned_by_a_later_one(store, monkeypatch):
    monkeypatch.setattr(store_module, "PRUNE_STEP_ROWS", 4)
    for i in range(20):
        put(store, "a", "b", f"x{i}", at=1)
    store.confirm_through("b", 20, 5)
    assert store.prune_step(1000, 10, None) == (4, False)
    late = put(store, "a", "b", "late", at=2)
    store.confirm_through("b", late.seq, 6)
    removed, _steps = prune_in_steps(store, 1000, 10, None)
    assert removed == 17  # the rest of the first pass, the late one included
    assert store.history("a", "b", None, 100) == []


def test_owed_receipts_go_with_the_messages_retention_removes(store):
    m = put(store, "a", "b", "x", at=1)
    kept = put(store, "a", "b", "y", at=500)
    store.confirm_through("b", 2, 5)
    store.owe_receipts([m.broker_id, kept.broker_id])
    assert store.prune(1000, 600, None) == 1  # accepted before 400
    assert [o.broker_id for o in store.receipts_owed("a", 10)] == [kept.broker_id]


def test_contacts_are_everyone_exchanged_with_either_way_and_outlive_retention(store):
    put(store, "a", "b", "1")
    put(store, "c", "a", "2")
    put(store, "a", "b", "3")
    put(store, "d", "e", "4")
    assert store.contacts("a") == {"b", "c"}
    assert store.contacts("b") == {"a"}
    assert store.contacts("c") == {"a"}
    assert store.contacts("z") == set()
    store.confirm_through("b", 2, 5)
    store.confirm_through("a", 1, 5)
    assert store.prune(10**6, 1, None) == 3
    assert store.contacts("a") == {"b", "c"}


def test_sqlite_contacts_survive_reopen(tmp_path):
    path = tmp_path / "c.sqlite3"
    store = SqliteStore(path)
    put(store, "a", "b", "1")
    store.close()
    store = SqliteStore(path)
    try:
        assert store.contacts("b") == {"a"}
        put(store, "b", "a", "2")  # a pair already stored: written again harmlessly
        assert store.contacts("a") == {"b"}
    finally:
        store.close()


def test_a_version_3_store_migrates_its_contacts(tmp_path):
    path = tmp_path / "v3.sqlite3"
    db = sqlite3.connect(path, isolation_level=None)
    for script in _SCHEMA[:3]:
        db.executescript(script)
    db.execute("PRAGMA user_version=3")
    for seq, (sender, recipient) in enumerate([("a", "b"), ("c", "a"), ("a", "b")], start=1):
        db.execute(
            "INSERT INTO messages (recipient_key, seq, sender_key, sender, recipient,"
            " client_id, text, sent_at, accepted_at) VALUES (?, ?, ?, ?, ?, ?, 't', 1, 1)",
            (recipient, seq, sender, sender, recipient, f"id{seq}"),
        )
    db.close()
    store = SqliteStore(path)
    try:
        assert store.contacts("a") == {"b", "c"}
        assert store.contacts("c") == {"a"}
    finally:
        store.close()


def query_plans(store, work):
    """Every statement `work()` runs on the store's connection, with its query plan."""
    statements: list[str] = []
    store._db.set_trace_callback(statements.append)
    try:
        work()
    finally:
        store._db.set_trace_callback(None)
    plans = {}
    for sql in statements:
        if sql.split()[0].upper() in ("SELECT", "DELETE", "UPDATE", "INSERT"):
            plans[sql] = [row[3] for row in store._db.execute(f"EXPLAIN QUERY PLAN {sql}")]
    return plans


def full_scans(plans):
    # A scan of a subquery's few rows or of constant rows is no scan of a table.
    return {
        sql: plan
        for sql, plan in plans.items()
        if any(
            step.startswith("SCAN")
            and not step.startswith(("SCAN (subquery", "SCAN CONSTANT", "SCAN 2 CONSTANT"))
            for step in plan
        )
    }


def test_lookups_and_retention_go_through_indexes_not_table_scans(tmp_path):
    store = SqliteStore(tmp_path / "plan.sqlite3", "normal")
    try:
        for i in range(50):
            put(store, ("a", "c")[i % 2], "b", f"x{i}", at=i)
        store.confirm_through("b", 40, 60)
        store.owe_receipts(["1", "2", "3"])
        store.commit()

        def login_and_retention():
            put(store, "e", "b", "first")  # the sender's id mark is read through an index
            store.contacts("b")
            store.receipts_owed("a", 10)
            store.mark_sender_notified(["1"])
            store.history("b", "a", None, 10)
            store.commit()
            store.prune(1000, 990, 5)
            store.commit()

        plans = query_plans(store, login_and_retention)
        assert any("max(client_id)" in sql for sql in plans)
        assert any("FROM contacts" in sql for sql in plans)
        assert any(sql.startswith("DELETE FROM messages") for sql in plans)
        assert any("receipts_owed WHERE message_id" in sql for sql in plans)
        assert full_scans(plans) == {}
    finally:
        store.close()


def test_the_old_retention_statements_were_table_scans(tmp_path):
    # What the plan test above tells apart: the statements version 3 ran for retention.
    # (Its contacts query did use indexes, but walked every message to or from the user:
    # bench/store_scale.py measures that.)
    store = SqliteStore(tmp_path / "old.sqlite3", "normal")
    try:
        old = [
            "DELETE FROM messages WHERE delivered_at IS NOT NULL AND accepted_at < 5",
            "DELETE FROM messages WHERE delivered_at IS NOT NULL AND id IN ("
            " SELECT id FROM (SELECT id, row_number() OVER ("
            "  PARTITION BY recipient_key ORDER BY seq DESC) AS newer"
            "  FROM messages WHERE delivered_at IS NOT NULL) WHERE newer > 5)",
        ]
        plans = {
            sql: [row[3] for row in store._db.execute(f"EXPLAIN QUERY PLAN {sql}")] for sql in old
        }
        assert set(full_scans(plans)) == set(old)
    finally:
        store.close()


def test_growing_ids_wait_for_the_commit_and_others_are_checked_at_once(tmp_path):
    from mangogram_broker.store import DuplicateMessage

    path = tmp_path / "marks.sqlite3"
    store = SqliteStore(path, "normal")
    put(store, "a", "b", "m05")
    store.commit()
    store.close()
    store = SqliteStore(path, "normal")  # the sender's mark is read from the store
    try:
        statements: list[str] = []
        store._db.set_trace_callback(statements.append)
        put(store, "a", "b", "m06")
        put(store, "a", "b", "m07")
        assert [s for s in statements if s.startswith("INSERT INTO messages")] == []
        with pytest.raises(DuplicateMessage):
            put(store, "a", "b", "m05")  # below the mark and stored: a resend
        with pytest.raises(DuplicateMessage):
            put(store, "a", "b", "m06")  # below the mark and in this turn
        assert put(store, "a", "b", "m01").seq == 4  # below the mark but new
        put(store, "a", "b", "m08")
        assert [m.seq for m in store.unconfirmed("b", 0, 10)] == [1, 2, 3, 4, 5]
        assert [m.seq for m in store.unconfirmed("b", 3, 10)] == [4, 5]
        statements.clear()
        store.commit()
        store._db.set_trace_callback(None)
        assert len([s for s in statements if s.startswith("INSERT INTO messages")]) == 1
        assert [m.client_id for m in store.unconfirmed("b", 0, 10)] == [
            "m05", "m06", "m07", "m01", "m08",
        ]  # fmt: skip
    finally:
        store.close()
