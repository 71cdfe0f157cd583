"""Commits per second of the SQLite store at each durability setting.

    python -m bench.store_commits [--seconds 3] [--dir PATH] [--batches 1,64,1024]

Each commit holds `batch` stored messages, as a broker loop turn would, with message ids
made as the SDK makes them. `us_per_message` is the time of append + commit per message
(wall clock; `cpu_us_per_message` counts only this thread's CPU, which a busy machine
disturbs less). The figures depend on the disk; compare settings within one run.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from mangogram_broker.store import SqliteStore
from mangogram_proto.session import new_message_id


def measure(directory: Path, durability: str, batch: int, seconds: float) -> dict[str, float | str]:
    store = SqliteStore(directory / f"bench-{durability}-{batch}.sqlite3", durability)  # type: ignore[arg-type]
    commits = 0
    number = 0
    started = time.perf_counter()
    cpu_started = time.thread_time()
    deadline = started + seconds
    while time.perf_counter() < deadline:
        for _ in range(batch):
            number += 1
            store.append("a", "alice", "b", "bob", new_message_id(), "x" * 100, number, number)
        store.commit()
        commits += 1
    elapsed = time.perf_counter() - started
    cpu = time.thread_time() - cpu_started
    store.close()
    return {
        "durability": durability,
        "batch": batch,
        "commits_per_s": round(commits / elapsed, 1),
        "messages_per_s": round(commits * batch / elapsed, 1),
        "us_per_message": round(elapsed / (commits * batch) * 1e6, 2),
        "cpu_us_per_message": round(cpu / (commits * batch) * 1e6, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="per measurement")
    parser.add_argument("--dir", type=Path, help="where to put the databases (default: a temp dir)")
    parser.add_argument("--batches", default="1,64,1024", help="messages per commit, e.g. 1,64")
    args = parser.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        results = [
            measure(Path(tmp), durability, batch, args.seconds)
            for durability in ("full", "normal")
            for batch in batches
        ]
    first = batches[0]
    full = next(r for r in results if r["durability"] == "full" and r["batch"] == first)
    normal = next(r for r in results if r["durability"] == "normal" and r["batch"] == first)
    ratio = float(normal["commits_per_s"]) / float(full["commits_per_s"])
    print(json.dumps({"results": results, "normal_to_full_commits": round(ratio, 2)}, indent=2))


if __name__ == "__main__":
    main()
