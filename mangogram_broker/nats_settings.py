"""Cluster mode's settings: where NATS is and how to authenticate to it.

Kept apart from the JetStream store so that parsing the command line never imports the
NATS client: the single broker runs without it installed.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass

DEFAULT_REPLICAS = 1
DEFAULT_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class NatsSettings:
    """How to reach the NATS servers holding the cluster's state.

    Args:
        servers: NATS URLs (`nats://host:4222`, `tls://host:4222`; user and password may
            be in the URL).
        creds: a NATS credentials file (JWT + NKey seed), or None.
        tls_ca: CA bundle to verify the NATS servers with, or None.
        tls_cert, tls_key: client certificate and key for mutual TLS, or None.
        replicas: copies JetStream keeps of every stream and bucket (1 or 3 usually); an
            ACCEPTED waits until this many (a majority of them) have the message.
        timeout_s: how long one store operation may wait for NATS before the broker
            answers `unavailable` instead.
    """

    servers: tuple[str, ...]
    creds: str | None = None
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    replicas: int = DEFAULT_REPLICAS
    timeout_s: float = DEFAULT_TIMEOUT_S


def add_nats_arguments(parser: argparse.ArgumentParser) -> None:
    """The cluster options of `broker.py` (each also read from its MANGOGRAM_* variable)."""
    env = os.environ.get
    parser.add_argument(
        "--nats",
        default=env("MANGOGRAM_NATS", ""),
        metavar="URL[,URL...]",
        help="cluster mode: keep all state in NATS JetStream at these servers instead of"
        " SQLite, so several brokers serve one set of users (see docs/cluster.md)"
        " [MANGOGRAM_NATS]",
    )
    parser.add_argument(
        "--nats-creds",
        default=env("MANGOGRAM_NATS_CREDS", ""),
        metavar="FILE",
        help="NATS credentials file (JWT and seed) [MANGOGRAM_NATS_CREDS]",
    )
    parser.add_argument(
        "--nats-tls-ca",
        default=env("MANGOGRAM_NATS_TLS_CA", ""),
        metavar="FILE",
        help="CA bundle that signed the NATS servers' certificates [MANGOGRAM_NATS_TLS_CA]",
    )
    parser.add_argument(
        "--nats-tls-cert",
        default=env("MANGOGRAM_NATS_TLS_CERT", ""),
        metavar="FILE",
        help="client certificate for NATS mutual TLS [MANGOGRAM_NATS_TLS_CERT]",
    )
    parser.add_argument(
        "--nats-tls-key",
        default=env("MANGOGRAM_NATS_TLS_KEY", ""),
        metavar="FILE",
        help="client key for NATS mutual TLS [MANGOGRAM_NATS_TLS_KEY]",
    )
    parser.add_argument(
        "--nats-replicas",
        default=env("MANGOGRAM_NATS_REPLICAS", str(DEFAULT_REPLICAS)),
        metavar="N",
        help="JetStream replicas of every stream and bucket the broker creates"
        " [MANGOGRAM_NATS_REPLICAS]",
    )
    parser.add_argument(
        "--nats-timeout",
        default=env("MANGOGRAM_NATS_TIMEOUT", str(DEFAULT_TIMEOUT_S)),
        metavar="SECONDS",
        help="longest wait for NATS per operation; then sends are refused with"
        " `unavailable` [MANGOGRAM_NATS_TIMEOUT]",
    )


def nats_settings(parser: argparse.ArgumentParser, args: argparse.Namespace) -> NatsSettings | None:
    """The parsed cluster settings, or None for the single broker (no --nats)."""
    servers = tuple(url.strip() for url in args.nats.split(",") if url.strip())
    if not servers:
        return None
    try:
        replicas = int(args.nats_replicas)
        timeout_s = float(args.nats_timeout)
    except ValueError:
        parser.error("nats-replicas must be an integer and nats-timeout a number")
    if not 1 <= replicas <= 5:
        parser.error("nats-replicas must be 1 to 5 (JetStream's limit)")
    if timeout_s <= 0:
        parser.error("nats-timeout must be positive")
    if bool(args.nats_tls_cert) != bool(args.nats_tls_key):
        parser.error("nats-tls-cert and nats-tls-key go together")
    return NatsSettings(
        servers=servers,
        creds=args.nats_creds or None,
        tls_ca=args.nats_tls_ca or None,
        tls_cert=args.nats_tls_cert or None,
        tls_key=args.nats_tls_key or None,
        replicas=replicas,
        timeout_s=timeout_s,
    )
