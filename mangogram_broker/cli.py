"""`python broker.py`: configure, start and stop the broker."""

from __future__ import annotations

import logging
import os
import signal
import sys

import zmq

from .config import parse_config
from .core import BrokerCore
from .crashpoints import CrashPoints
from .shell import BrokerServer
from .store import SqliteStore

log = logging.getLogger("mangogram.broker")

WANTED_OPEN_FILES = 65536


def raise_open_file_limit() -> None:
    """Lift the soft open-file limit toward the hard one so thousands of clients fit."""
    try:
        import resource  # POSIX only
    except ImportError:
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = WANTED_OPEN_FILES if hard == resource.RLIM_INFINITY else min(hard, WANTED_OPEN_FILES)
    if soft == resource.RLIM_INFINITY or soft >= target:
        return
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ValueError, OSError) as exc:
        log.warning("could not raise the open-file limit from %d: %s", soft, exc)
        return
    log.debug("open-file limit raised from %d to %d", soft, target)


def main(argv: list[str] | None = None) -> int:
    config = parse_config(argv)
    logging.basicConfig(
        level=config.log_level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    # Handlers go in first so a stop request during start-up is honoured, not fatal.
    server: BrokerServer | None = None
    stop_requested = False

    def request_stop(signum: int, _frame: object) -> None:
        nonlocal stop_requested
        log.info("received signal %d, stopping", signum)
        stop_requested = True
        if server is not None:
            server.stop()

    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)
    raise_open_file_limit()
    crash_points = CrashPoints(os.environ.get("MANGOGRAM_CRASH_AT"))
    store = SqliteStore(config.data_dir / "mangogram.sqlite3", config.durability)
    try:
        core = BrokerCore(config.limits, store=store, retention=config.retention)
        try:
            server = BrokerServer(core, config.bind, crash_points=crash_points)
        except zmq.ZMQError as exc:
            log.error("cannot listen on %s: %s", config.bind, exc)
            return 2
        if stop_requested:
            server.stop()
        log.info(
            "MangoGram broker listening on %s (data in %s, durability %s)",
            server.endpoint,
            config.data_dir,
            config.durability,
        )
        server.serve_forever()
    finally:
        store.close()
    log.info("stopped")
    return 0
