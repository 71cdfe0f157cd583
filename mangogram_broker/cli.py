"""`python broker.py`: configure, start and stop the broker."""

from __future__ import annotations

import gc
import logging
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path

import zmq

from mangogram_proto.keys import KeyFileError, fingerprint, is_loopback_endpoint, key_endpoint_for
from mangogram_proto.names import name_key

from .cluster import Cluster
from .config import parse_config
from .core import BrokerCore
from .crashpoints import CrashPoints
from .datadir import DataDirInUse, DataDirLock
from .nats_settings import NatsSettings
from .openfiles import raise_open_file_limit
from .security import load_broker_keys
from .shell import BrokerServer
from .store import Durability, SqliteStore, SqliteTooOld, Store, StoreUnavailable

log = logging.getLogger("mangogram.broker")

# Young-generation collections every 50,000 allocations instead of 700 (the older
# generations keep their default ratios, 10 and 10). The loop makes a handful of
# short-lived objects per message, freed by reference counting; with the default, each
# turn's surviving lists and in-flight messages were rescanned over and over. Measured:
# broker thread 33.5 -> 30 us per message at 100 pairs.
GC_THRESHOLDS = (50_000, 10, 10)


def tune_garbage_collector() -> None:
    """Collect cycles less often, and never rescan what startup left alive."""
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


def stop_signals() -> list[signal.Signals]:
    """The signals that stop the broker cleanly: Ctrl-C and SIGTERM (docker stop, service
    managers) everywhere, and Ctrl-Break on Windows, whose consoles deliver no SIGTERM."""
    wanted = [signal.SIGINT, signal.SIGTERM]
    if sys.platform == "win32":
        wanted.append(signal.SIGBREAK)
    return wanted


def release_name(data_dir: Path, name: str, nats: NatsSettings | None = None) -> int:
    """Admin: forget which key owns `name` (cluster-wide with `nats`)."""
    store = open_cluster_store(nats) if nats else SqliteStore(data_dir / "mangogram.sqlite3")
    try:
        released = store.release_name(name_key(name))
    finally:
        store.close()
    if released:
        log.info("released %s: the next key to log in with it owns it", name)
        return 0
    log.error("%s is not owned by any key", name)
    return 1


def open_sqlite_store(data_dir: Path, durability: Durability) -> Store:
    return SqliteStore(data_dir / "mangogram.sqlite3", durability)


def cluster_port(store: Store, settings: NatsSettings | None) -> Cluster | None:
    """The other brokers, reached over the JetStream store's connection (None: alone)."""
    if settings is None:
        return None  # (and the NATS client is never imported)
    from .jetstream_cluster import NatsCluster
    from .jetstream_store import JetStreamStore

    assert isinstance(store, JetStreamStore)
    return NatsCluster(store)


def open_cluster_store(settings: NatsSettings) -> Store:
    """The JetStream store (imported here: the single broker needs no NATS client)."""
    try:
        from .jetstream_store import JetStreamStore
    except ImportError as exc:
        raise StoreUnavailable(
            f"cluster mode needs the NATS client ({exc}): pip install -e '.[cluster]'"
        ) from exc

    log.info("cluster mode: state in NATS JetStream at %s", ", ".join(settings.servers))
    return JetStreamStore(settings)


def main(
    argv: list[str] | None = None,
    open_store: Callable[[Path, Durability], Store] = open_sqlite_store,
) -> int:
    """Run the broker. `open_store` is what keeps the messages; anything but the default
    is for experiments (the benchmark's in-memory reference)."""
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

    for signum in stop_signals():
        signal.signal(signum, request_stop)
    if hasattr(os, "umask"):
        os.umask(0o077)  # the store holds everyone's mail: no one else may read it
    if config.release_name is not None:
        try:
            return release_name(config.data_dir, config.release_name, config.nats)
        except StoreUnavailable as exc:
            log.error("%s", exc)
            return 2
    data_lock = DataDirLock(config.data_dir)
    try:
        data_lock.acquire()
    except DataDirInUse as exc:
        log.error("%s", exc)
        return 2
    keys = None
    key_bind = None
    if config.plaintext:
        if not is_loopback_endpoint(config.bind):
            log.error("plaintext mode is allowed only on a loopback address, not %s", config.bind)
            return 2
        log.warning("PLAINTEXT MODE: no encryption and no identity checks; development only")
    else:
        try:
            keys, created = load_broker_keys(config.key_file)
            key_bind = config.key_bind or key_endpoint_for(config.bind)
        except (KeyFileError, ValueError) as exc:
            log.error("%s", exc)
            return 2
        if created:
            log.info("created the broker's key pair in %s", config.key_file)
        log.info("public key %s (fingerprint %s)", keys.public, fingerprint(keys.public))
    raise_open_file_limit()
    crash_points = CrashPoints(os.environ.get("MANGOGRAM_CRASH_AT"))
    try:
        if config.nats is not None:
            store = open_cluster_store(config.nats)
        else:
            store = open_store(config.data_dir, config.durability)
    except (SqliteTooOld, StoreUnavailable) as exc:
        log.error("%s", exc)
        return 2
    try:
        core = BrokerCore(
            config.limits,
            store=store,
            retention=config.retention,
            require_keys=keys is not None,
            max_sessions=config.max_sessions,
            registrations_per_minute=config.registrations_per_minute,
            rates=config.rates,
            max_history_bytes=config.max_history_bytes,
            cluster=cluster_port(store, config.nats),
        )
        try:
            server = BrokerServer(
                core,
                config.bind,
                crash_points=crash_points,
                keys=keys,
                key_bind=key_bind,
                max_queued_bytes=config.max_queued_bytes,
            )
        except zmq.ZMQError as exc:
            log.error("cannot listen on %s: %s", config.bind, exc)
            return 2
        if stop_requested:
            server.stop()
        if server.key_endpoint:
            log.info("key discovery on %s", server.key_endpoint)
        log.info(
            "MangoGram broker listening on %s (data in %s, durability %s)",
            server.endpoint,
            config.data_dir,
            config.durability,
        )
        tune_garbage_collector()
        server.serve_forever()
    finally:
        store.close()
    log.info("stopped")
    return 0
