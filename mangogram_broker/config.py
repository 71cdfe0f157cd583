"""Broker settings from flags and MANGOGRAM_* environment variables (flags win)."""

from __future__ import annotations

import argparse
import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path

from mangogram_proto import constants
from mangogram_proto.env import SettingError, env_bool
from mangogram_proto.messages import Limits

from .core import (
    COMMAND_BURST_SECONDS,
    ERROR_BURST,
    ERROR_RATE_PER_SECOND,
    MAX_HISTORY_BYTES,
    CommandRates,
    Retention,
)
from .nats_settings import NatsSettings, add_nats_arguments, nats_settings
from .security import KEY_FILE
from .sendqueue import MAX_QUEUED_BYTES, SEND_QUEUE_PER_PEER
from .store import Durability

# (flag, Limits field, default, help)
_LIMIT_OPTIONS = (
    ("--max-name-chars", "max_name_chars", constants.MAX_NAME_CHARS, "longest user name"),
    ("--max-text-chars", "max_text_chars", constants.MAX_TEXT_CHARS, "longest text, characters"),
    ("--max-text-bytes", "max_text_bytes", constants.MAX_TEXT_BYTES, "longest text, UTF-8 bytes"),
    ("--max-body-bytes", "max_body_bytes", constants.MAX_BODY_BYTES, "largest JSON body"),
    (
        "--max-frame-bytes",
        "max_frame_bytes",
        constants.MAX_FRAME_BYTES,
        "largest frame; a peer sending more is disconnected (ZMQ_MAXMSGSIZE)",
    ),
    (
        "--heartbeat-interval-ms",
        "heartbeat_interval_ms",
        constants.HEARTBEAT_INTERVAL_MS,
        "how often clients should ping when idle",
    ),
    (
        "--heartbeat-timeout-ms",
        "heartbeat_timeout_ms",
        constants.HEARTBEAT_TIMEOUT_MS,
        "silence after which a session ends",
    ),
    ("--rate-per-second", "rate_per_second", constants.RATE_PER_SECOND, "messages/s per user"),
    ("--rate-burst", "rate_burst", constants.RATE_BURST, "burst of messages per user"),
    (
        "--max-mailbox",
        "max_mailbox",
        constants.MAX_MAILBOX,
        "unconfirmed messages kept per recipient; more are refused with mailbox_full",
    ),
    (
        "--max-history-page",
        "max_history_page",
        constants.MAX_HISTORY_PAGE,
        "most messages one HISTORY answer carries",
    ),
)

_DEFAULT_RATES = CommandRates()
_REFUSED = "beyond it: ERROR rate_limited with retry_after_ms"
# (flag, CommandRates field, which commands, what happens beyond the rate)
_RATE_OPTIONS = (
    ("--login-rate", "login", "LOGIN and LEAVE together", _REFUSED),
    ("--history-rate", "history", "HISTORY", _REFUSED),
    ("--who-rate", "who", "WHO and LOOKUP together", _REFUSED),
    ("--ping-rate", "ping", "PING", _REFUSED),
    ("--read-rate", "read", "READ", "beyond it, ignored (READ is never answered)"),
    (
        "--receipt-rate",
        "receipt",
        "RECEIPTs that confirm nothing new",
        "beyond it, ignored (one that confirms mail is never limited)",
    ),
)


@dataclass(frozen=True)
class BrokerConfig:
    bind: str
    data_dir: Path
    log_level: str
    limits: Limits
    durability: Durability
    retention: Retention
    plaintext: bool
    key_bind: str | None
    key_file: Path
    max_sessions: int
    registrations_per_minute: int
    release_name: str | None
    rates: CommandRates
    max_history_bytes: int
    max_queued_bytes: int
    nats: NatsSettings | None = None  # cluster mode (docs/cluster.md); None: SQLite


def _env_name(flag: str) -> str:
    return "MANGOGRAM_" + flag.lstrip("-").replace("-", "_").upper()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="broker.py",
        description=(
            "MangoGram broker: routes private messages between MangoGram clients and bots "
            "over ZeroMQ. Every option can also be set with the environment variable shown."
        ),
        epilog=(
            "Fixed limits: SEND is limited per user name (--rate-per-second, --rate-burst);"
            f" each connection has an error budget of {ERROR_BURST} ERRORs refilled at"
            f" {ERROR_RATE_PER_SECOND}/s. An ERROR answering a SEND is always sent; other"
            " ERRORs are dropped while the budget is empty, and a connection that sends bad"
            " messages then is disconnected (its session ends, the reason is logged, and"
            " only a LOGIN is read from it). See docs/protocol.md section 9."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )

    def add(flag: str, default: object, kind: type, text: str) -> None:
        env = _env_name(flag)
        raw = os.environ.get(env)
        if raw is not None:
            try:
                default = kind(raw)
            except ValueError:
                parser.error(f"{env}={raw!r} is not a valid {kind.__name__}")
        parser.add_argument(flag, type=kind, default=default, help=f"{text} [{env}]")

    add("--bind", constants.DEFAULT_ENDPOINT, str, "ZeroMQ endpoint to listen on ('*' port = any)")
    add("--data", "data", str, "data directory (created if missing)")
    add("--log-level", "INFO", str, "DEBUG, INFO, WARNING or ERROR")
    add(
        "--durability",
        "full",
        str,
        "full: fsync every commit, an ack means on disk; normal: survives a broker crash,"
        " not a power cut",
    )
    add("--max-sessions", 20_000, int, "most users online at once; more get server_full")
    add(
        "--registrations-per-minute",
        10,
        int,
        "new names one IP address may register per minute (burst: the same number, at least 10)",
    )
    add(
        "--key-bind",
        "",
        str,
        "endpoint answering key-discovery requests in plaintext (default: --bind's port + 1)",
    )
    add(
        "--key-file",
        "",
        str,
        "the broker's key pair, created there if missing (default: broker_key.json in"
        " --data); the brokers of a cluster share one",
    )
    try:
        plaintext = env_bool("MANGOGRAM_INSECURE_PLAINTEXT") or False
    except SettingError as exc:
        parser.error(str(exc))
    parser.add_argument(
        "--insecure-plaintext",
        action="store_true",
        default=plaintext,
        help="development only: no encryption and no identity; refused unless --bind is a"
        " loopback address [MANGOGRAM_INSECURE_PLAINTEXT=1]",
    )
    parser.add_argument(
        "--release-name",
        metavar="NAME",
        help="admin: free NAME from the key that owns it (so a user who lost their key can"
        " register it again), then exit; works while the broker runs",
    )
    add("--retention-days", 0, int, "delete confirmed messages older than this (0: keep)")
    add(
        "--retention-messages",
        0,
        int,
        "keep at most this many confirmed messages per recipient (0: no limit)",
    )
    for flag, _field, default, text in _LIMIT_OPTIONS:
        add(flag, default, int, text)
    add(
        "--max-history-bytes",
        MAX_HISTORY_BYTES,
        int,
        "largest HISTORY_PAGE body in bytes; a page that would be larger holds fewer messages"
        " (at least one) and says more=true",
    )
    add(
        "--max-queued-bytes",
        MAX_QUEUED_BYTES,
        int,
        "bytes the broker holds per connection for a client that does not read, beyond"
        f" libzmq's queue of {SEND_QUEUE_PER_PEER} messages; what does not fit is dropped"
        " (a DELIVER stays in the mailbox)",
    )
    for flag, field, what, beyond in _RATE_OPTIONS:
        add(
            flag,
            getattr(_DEFAULT_RATES, field),
            int,
            f"{what} per second per connection (bursts of {COMMAND_BURST_SECONDS} seconds'"
            f" worth); {beyond}",
        )
    add_nats_arguments(parser)
    return parser


def parse_config(argv: list[str] | None = None) -> BrokerConfig:
    """Read flags and environment. Exits with a usage message on bad values."""
    parser = build_parser()
    args = parser.parse_args(argv)
    values = {field: getattr(args, field) for _flag, field, _d, _t in _LIMIT_OPTIONS}
    for field, value in values.items():
        if value <= 0:
            parser.error(f"{field.replace('_', '-')} must be positive")
    if values["heartbeat_timeout_ms"] <= values["heartbeat_interval_ms"]:
        parser.error("heartbeat-timeout-ms must exceed heartbeat-interval-ms")
    level = args.log_level.upper()
    if level not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        parser.error(f"unknown log level {args.log_level!r}")
    if args.durability not in ("full", "normal"):
        parser.error("durability must be full or normal")
    if args.max_sessions <= 0 or args.registrations_per_minute <= 0:
        parser.error("max-sessions and registrations-per-minute must be positive")
    rates = CommandRates(**{f: getattr(args, f + "_rate") for _flag, f, *_text in _RATE_OPTIONS})
    if min(dataclasses.astuple(rates)) <= 0:
        parser.error("the command rates must be positive")
    if args.max_history_bytes <= 0 or args.max_queued_bytes <= 0:
        parser.error("max-history-bytes and max-queued-bytes must be positive")
    if args.retention_days < 0 or args.retention_messages < 0:
        parser.error("retention settings must not be negative")
    retention = Retention(
        max_age_ms=args.retention_days * 86_400_000 or None,
        keep_per_user=args.retention_messages or None,
    )
    return BrokerConfig(
        bind=args.bind,
        data_dir=Path(args.data),
        log_level=level,
        limits=Limits(**values),
        durability=args.durability,
        retention=retention,
        plaintext=args.insecure_plaintext,
        key_bind=args.key_bind or None,
        key_file=Path(args.key_file) if args.key_file else Path(args.data) / KEY_FILE,
        max_sessions=args.max_sessions,
        registrations_per_minute=args.registrations_per_minute,
        release_name=args.release_name,
        rates=rates,
        max_history_bytes=args.max_history_bytes,
        max_queued_bytes=args.max_queued_bytes,
        nats=nats_settings(parser, args),
    )
