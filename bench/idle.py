"""Idle clients by the ten thousand: memory per client and the time to log them all in.

    python -m bench.idle --clients 50000            # MangoGram and the bare CurveZMQ ROUTER
    python -m bench.idle --clients 200 --json       # one JSON object
    python -m bench --idle 50000                    # the same, from the main bench

Each system (the MangoGram broker as shipped, and `limit-curve`: the bare pyzmq ROUTER
with CurveZMQ on every connection, `bench.limit_router --curve`) runs in its own process.
The clients are spread over generator processes (`--per-process` each, every one a
`bench.load ... idle` holder), and the holders over local source addresses: each source
address has its own ~28,000 ephemeral ports, so beyond that one address to one server
port runs out. Holder K connects from 127.0.0.(2 + K mod `--sources`) with libzmq's
`tcp://SOURCE:0;HOST:PORT` form (Linux answers on all of 127/8; elsewhere only
127.0.0.1 is configured, so there `--sources` defaults to 0: no source address).

Every MangoGram LOGIN must be answered: the holders count the WELCOMEs (and any refusal)
and the run fails unless every client was welcomed. The bare ROUTER has no login; its
clients count once a probe sent to themselves came back. Memory per client is the
server's RSS after every client is in, minus its RSS before the first connected,
divided by the clients; the ratio MangoGram / bare ROUTER is the target's figure.

A server can hold only as many connections as it may open files: each holds one
descriptor. The run checks the server's open-file limit first (POSIX: the soft limit the
server raised itself to, bounded by the hard one) and refuses with the limit in the
message rather than failing half-way.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import IO

import psutil

from bench.__main__ import ROOT, Server, load_command, start_server

log = logging.getLogger("bench.idle")

IDLE_SYSTEMS = ("mangogram", "limit-curve")
DEFAULT_CLIENTS = 50_000  # issue 15's target: one broker
PER_PROCESS = 2500  # two descriptors a client in a holder: well inside common limits
DEFAULT_SOURCES = 8 if sys.platform.startswith("linux") else 0
# Descriptors a server needs besides its clients' (its sockets, log, database, libzmq's).
SPARE_FILES = 100
SETTLE_S = 1.0  # after the last login, for the server's buffers to settle before RSS
STOP_GRACE_S = 60.0  # for all holders together to close their clients and exit


class IdleRunFailed(RuntimeError):
    """An idle run could not hold or log in every client; the message says why."""


def open_file_limit(process: psutil.Process) -> int | None:
    """The soft open-file limit of a running process (None where it cannot be read:
    not Linux, or no rlimit support in psutil)."""
    if not hasattr(psutil, "RLIMIT_NOFILE") or not hasattr(process, "rlimit"):
        return None
    soft, _hard = process.rlimit(psutil.RLIMIT_NOFILE)
    return None if soft == psutil.RLIM_INFINITY else int(soft)


def source_address(holder: int, sources: int) -> str | None:
    """The local address holder number `holder` connects from (None: the default)."""
    return f"127.0.0.{2 + holder % sources}" if sources > 0 else None


def read_report(stream: IO[str] | None) -> dict[str, object]:
    line = stream.readline() if stream is not None else ""
    if not line.startswith("{"):
        raise IdleRunFailed("an idle-client holder failed before all its clients were in")
    return dict(json.loads(line))


def measure_idle(
    system: str,
    clients: int,
    work: Path,
    per_process: int = PER_PROCESS,
    sources: int = DEFAULT_SOURCES,
    deadline_s: float = 600.0,
) -> dict[str, object]:
    """Hold `clients` idle clients on a fresh `system` server; returns its memory per
    client, the time they took to log in, and how their logins were answered.

    Raises:
        IdleRunFailed: the server cannot open enough files, a holder failed, or a
            MangoGram login was refused or never answered.
    """
    server = start_server(system, work / f"idle-{system}-{clients}")
    holders: list[subprocess.Popen[str]] = []
    try:
        process = psutil.Process(server.process.pid)
        limit = open_file_limit(process)
        if limit is not None and clients + SPARE_FILES > limit:
            raise IdleRunFailed(
                f"{system} may open at most {limit} files, and {clients} clients need about"
                f" {clients + SPARE_FILES} (one each); raise the hard limit (ulimit -Hn,"
                " LimitNOFILE=) or ask for fewer clients"
            )
        before = process.memory_info().rss
        started = time.monotonic()
        holders = start_holders(system, server, clients, per_process, sources, deadline_s)
        reports = [read_report(holder.stdout) for holder in holders]
        login_s = time.monotonic() - started
        time.sleep(SETTLE_S)  # a fixed pause before a reading, not a wait for a socket
        after = process.memory_info().rss
    finally:
        stop_holders(holders)
        server.stop()
    welcomed = sum(int(r["welcomed"]) for r in reports)  # type: ignore[call-overload]
    refused = sum(int(r["refused"]) for r in reports)  # type: ignore[call-overload]
    if welcomed != clients:
        why = next((r["first_refusal"] for r in reports if r["first_refusal"]), None)
        raise IdleRunFailed(f"{system}: {welcomed} of {clients} logins welcomed ({why})")
    return {
        "system": system,
        "clients": clients,
        "welcomed": welcomed,
        "refused": refused,
        "holders": len(holders),
        "sources": sources,
        "login_s": round(login_s, 2),
        "rss_before_mb": round(before / 2**20, 1),
        "rss_after_mb": round(after / 2**20, 1),
        "kb_per_client": round((after - before) / 1024 / clients, 2),
    }


def start_holders(
    system: str, server: Server, clients: int, per_process: int, sources: int, deadline_s: float
) -> list[subprocess.Popen[str]]:
    holders: list[subprocess.Popen[str]] = []
    for number, first in enumerate(range(0, clients, per_process)):
        size = min(per_process, clients - first)
        extra = ["--clients", str(size), "--prefix", f"i{first}-", "--deadline", str(deadline_s)]
        source = source_address(number, sources)
        if source:
            extra.append(f"--source={source}")
        command = load_command(system, server, "idle", *extra)
        holders.append(
            subprocess.Popen(
                command, cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
            )
        )
    return holders


def stop_holders(holders: list[subprocess.Popen[str]], grace_s: float = STOP_GRACE_S) -> None:
    """Close every holder's stdin (one that has reported then closes its clients and
    exits); kill those still running after `grace_s` in all (one still logging in does
    not read its stdin)."""
    for holder in holders:
        if holder.stdin is not None:
            with contextlib.suppress(OSError):  # a holder that died has a broken pipe
                holder.stdin.close()
    deadline = time.monotonic() + grace_s
    for holder in holders:
        try:
            holder.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            holder.kill()
            holder.wait(10)


def idle_report(
    clients: int,
    work: Path,
    systems: tuple[str, ...] = IDLE_SYSTEMS,
    per_process: int = PER_PROCESS,
    sources: int = DEFAULT_SOURCES,
) -> dict[str, object]:
    """Both systems, one after the other, and MangoGram's memory per client as a ratio to
    the bare ROUTER's (`idle_memory_to_limit_curve`)."""
    runs = []
    for system in systems:
        runs.append(measure_idle(system, clients, work, per_process, sources))
        log.info("%s", runs[-1])  # each as it is done: a later failure keeps it
    per_client = {str(r["system"]): float(r["kb_per_client"]) for r in runs}  # type: ignore[arg-type]
    bare = per_client.get("limit-curve")
    mango = per_client.get("mangogram")
    return {
        "idle": runs,
        "idle_memory_to_limit_curve": round(mango / bare, 3) if mango and bare else None,
    }


def format_idle(report: dict[str, object]) -> str:
    lines = []
    for run in report["idle"]:  # type: ignore[attr-defined]
        lines.append(
            f"{run['system']}: {run['clients']} idle clients, {run['kb_per_client']} KB each"
            f" (RSS {run['rss_before_mb']} -> {run['rss_after_mb']} MB), all logged in within"
            f" {run['login_s']} s ({run['welcomed']} welcomed, {run['holders']} holders,"
            f" {run['sources']} source addresses)"
        )
    ratio = report["idle_memory_to_limit_curve"]
    lines.append(f"memory per idle client, MangoGram / bare ROUTER: {ratio}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--clients", type=int, default=DEFAULT_CLIENTS, help=f"idle clients ({DEFAULT_CLIENTS})"
    )
    parser.add_argument("--per-process", type=int, default=PER_PROCESS,
                        help=f"clients per generator process ({PER_PROCESS})")  # fmt: skip
    parser.add_argument(
        "--sources",
        type=int,
        default=DEFAULT_SOURCES,
        help="local source addresses 127.0.0.2... the holders connect from, in turns"
        f" (default {DEFAULT_SOURCES}; 0: none)",
    )
    parser.add_argument("--systems", default=",".join(IDLE_SYSTEMS),
                        help=f"comma-separated, of {', '.join(IDLE_SYSTEMS)}")  # fmt: skip
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    systems = tuple(args.systems.split(","))
    unknown = [s for s in systems if s not in IDLE_SYSTEMS]
    if unknown or args.clients < 1 or args.per_process < 1:
        parser.error(f"systems are {', '.join(IDLE_SYSTEMS)}; counts must be positive")
    with tempfile.TemporaryDirectory(dir=ROOT) as tmp:
        try:
            report = idle_report(args.clients, Path(tmp), systems, args.per_process, args.sources)
        except IdleRunFailed as exc:
            print(f"idle run failed: {exc}", file=sys.stderr)
            return 1
    print(json.dumps(report) if args.json else format_idle(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
