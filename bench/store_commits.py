"""Commits per second of the SQLite store at each durability setting.

    python -m bench.store_commits [--seconds 3] [--dir PATH]

Each commit holds `batch` stored messages, as a broker loop turn would. The figures
depend on the disk; compare the two settings within one run.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from mangogram_broker.store import SqliteStore


def measure(directory: Path, durability: str, batch: int, seconds: float) -> dict[str, float]:
    store = SqliteStore(directory / f"bench-{durability}-{batch}.sqlite3", durability)  # type: ignore[arg-type]
    commits = 0
    number = 0
    started = time.perf_counter()
    deadline = started + seconds
    while time.perf_counter() < deadline:
        for _ in range(batch):
            number += 1
            store.append("a", "alice", "b", "bob", f"id{number}", "x" * 100, number, number)
        store.commit()
        commits += 1
    elapsed = time.perf_counter() - started
    store.close()
    return {
        "durability": durability,
        "batch": batch,
        "commits_per_s": round(commits / elapsed, 1),
        "messages_per_s": round(commits * batch / elapsed, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="per measurement")
    parser.add_argument("--dir", type=Path, help="where to put the databases (default: a temp dir)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        results = [
            measure(Path(tmp), durability, batch, args.seconds)
            for durability in ("full", "normal")
            for batch in (1, 64)
        ]
    full = next(r for r in results if r["durability"] == "full" and r["batch"] == 1)
    normal = next(r for r in results if r["durability"] == "normal" and r["batch"] == 1)
    print(json.dumps({"results": results, "normal_to_full_commits": round(
        normal["commits_per_s"] / full["commits_per_s"], 2)}, indent=2))  # fmt: skip


if __name__ == "__main__":
    main()
