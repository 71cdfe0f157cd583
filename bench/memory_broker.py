"""The MangoGram broker with its store in memory: a benchmark reference, never a
deployment. Everything else is the broker as shipped (CurveZMQ, sessions, windows,
acknowledgements, the same flags); only nothing is written to disk, so nothing survives
a restart. Set beside the shipped broker, it shows what durability costs, and what the
rest of the broker costs on its own.

    python -m bench.memory_broker [broker options]
"""

from __future__ import annotations

import sys
from pathlib import Path

from mangogram_broker.cli import main as broker_main
from mangogram_broker.store import Durability, MemoryStore, Store


def open_memory_store(_data_dir: Path, _durability: Durability) -> Store:
    return MemoryStore()


def main() -> int:
    return broker_main(sys.argv[1:], open_store=open_memory_store)


if __name__ == "__main__":
    sys.exit(main())
