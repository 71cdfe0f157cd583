"""The longest broker loop turn with a large SQLite store (default: a million messages).

    python -m bench.store_scale [--messages 1000000] [--dir PATH] [--json]

It fills a store the way a busy broker leaves it, then times what the routing thread does
with it, turn by turn, through the real `BrokerCore` and `SqliteStore` (durability full):
housekeeping turns (`expire` and the commit, which apply retention) for a simulated
`--minutes` of 100 ms ticks, and the turn of a LOGIN (the contacts lookup, the mailbox) for
the busiest user and for an ordinary one. A turn longer than the heartbeat timeout
(6 s by default) would disconnect everyone.

The store: 1,000 users and one busy account (`alice`, in half of all messages); every
stream 90 % confirmed; messages accepted over the last ten days. Retention: eight days'
age (a fifth of the messages are old enough) and 100,000 per user (only alice's stream is
longer). Figures depend on the disk and the machine: compare versions within one run.
"""

from __future__ import annotations

import argparse
import json
import random
import sqlite3
import statistics
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from mangogram_broker.clock import Clock
from mangogram_broker.config import parse_config
from mangogram_broker.core import BrokerCore, Retention
from mangogram_broker.store import SqliteStore
from mangogram_proto import codec
from mangogram_proto.messages import Login

DAY_MS = 86_400_000
NOW = 1_800_000_000_000  # a fixed "now", so that every run prunes the same messages
USERS = 1000
BUSY = "alice"
TICK_MS = 100
# The broker's default limits, as `python broker.py` would run.
LIMITS = parse_config(["--log-level", "WARNING"]).limits
RETENTION = Retention(max_age_ms=8 * DAY_MS, keep_per_user=100_000)


def rows(count: int, seed: int = 7) -> Iterator[tuple[object, ...]]:
    """The messages, in the order a broker would have stored them."""
    chance = random.Random(seed)
    last_seq: dict[str, int] = {}
    for number in range(count):
        a = f"u{chance.randrange(USERS)}"
        b = BUSY if number % 2 else f"u{chance.randrange(USERS)}"
        sender, recipient = (a, b) if chance.random() < 0.5 else (b, a)
        seq = last_seq.get(recipient, 0) + 1
        last_seq[recipient] = seq
        accepted = NOW - 10 * DAY_MS + number * (10 * DAY_MS // count)
        yield (recipient, seq, sender, sender, recipient, f"c{number}", "x" * 100,
               accepted, accepted)  # fmt: skip


def fill(path: Path, count: int) -> None:
    """A store with `count` messages, 90 % of each stream confirmed."""
    SqliteStore(path, "normal").close()  # the schema of the code under test
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA synchronous=OFF")
    db.execute("BEGIN")
    db.executemany(
        "INSERT INTO messages (recipient_key, seq, sender_key, sender, recipient, client_id,"
        " text, sent_at, accepted_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
        rows(count),
    )
    streams = db.execute("SELECT recipient_key, max(seq) FROM messages GROUP BY recipient_key")
    for key, last in streams.fetchall():
        mark = last * 9 // 10
        db.execute("INSERT INTO streams (recipient_key, last_seq, confirmed_seq) VALUES (?, ?, ?)",
                   (key, last, mark))  # fmt: skip
        db.execute(
            "UPDATE messages SET delivered_at = accepted_at WHERE recipient_key = ? AND seq <= ?",
            (key, mark),
        )
    tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    if "contacts" in tables:  # what the store's migration would have built
        db.execute("INSERT OR IGNORE INTO contacts SELECT sender_key, recipient_key FROM messages")
        db.execute("INSERT OR IGNORE INTO contacts SELECT recipient_key, sender_key FROM messages")
    db.execute("COMMIT")
    db.execute("ANALYZE")
    db.close()


def timed(work: object) -> float:
    started = time.perf_counter()
    work()  # type: ignore[operator]
    return (time.perf_counter() - started) * 1000


def measure(path: Path, minutes: float) -> dict[str, object]:
    store = SqliteStore(path, "full")
    try:
        core = BrokerCore(LIMITS, store=store, retention=RETENTION)
        before = store._db.execute("SELECT count(*) FROM messages").fetchone()[0]
        turns: list[float] = []
        steps: list[float] = []  # the retention work alone, without the commit
        now = NOW
        for _ in range(int(minutes * 60_000 / TICK_MS)):
            step = timed(lambda at=now: core.expire(Clock(at, at)))
            steps.append(step)
            turns.append(step + timed(store.commit))
            now += TICK_MS
        after = store._db.execute("SELECT count(*) FROM messages").fetchone()[0]

        def login(name: str, peer: bytes) -> float:
            frames = codec.encode(Login(name))
            at = Clock(now, now)
            return timed(lambda: (core.handle_frames(peer, frames, at), store.commit()))

        login_busy = login(BUSY, b"\x00\x00\x00\x00\x01")
        login_other = login("u1", b"\x00\x00\x00\x00\x02")
    finally:
        store.close()
    return {
        "messages": before,
        "removed_by_retention": before - after,
        "housekeeping_turns": len(turns),
        "longest_housekeeping_turn_ms": round(max(turns), 1),
        "median_housekeeping_turn_ms": round(statistics.median(turns), 2),
        # The rest of the longest turns is the commit: fsync, and the WAL checkpoint that
        # every 10,000 written pages costs, whatever wrote them.
        "longest_retention_work_ms": round(max(steps), 1),
        "turns_over_100ms": sum(t > 100 for t in turns),
        "login_turn_busy_user_ms": round(login_busy, 1),
        "login_turn_ordinary_user_ms": round(login_other, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=1_000_000)
    parser.add_argument("--minutes", type=float, default=3.0, help="simulated housekeeping")
    parser.add_argument("--dir", type=Path, help="where to build the store (default: temp)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        path = Path(tmp) / "scale.sqlite3"
        started = time.perf_counter()
        fill(path, args.messages)
        filled_s = time.perf_counter() - started
        result = measure(path, args.minutes)
    result["fill_s"] = round(filled_s, 1)
    if args.json:
        print(json.dumps(result))
        return
    for key, value in result.items():
        print(f"{key:32} {value}")


if __name__ == "__main__":
    main()
