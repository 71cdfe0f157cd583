"""The disconnect storm: `--clients` logged-in connections vanish at once (their process is
killed), and an honest pair keeps talking through it.

    python -m bench.disconnect_storm [--clients 1000] [--count 300] [--after 8] [--json]

It starts the broker as shipped (CurveZMQ, durability full, the bench's open limits) in
its own process, with one addition for measuring only: the poller of its routing loop is
timed, so the broker reports each loop turn (from one poll's return to the next poll).
This process holds the honest pair (Alice sends, Bob answers, Alice hears it); the crowd
is another process (`bench.load idle`), killed with SIGKILL once every client is online,
which closes its connections at once. Reported: the honest pair's round-trip p99 before
the kill and in the `--after` seconds from it, their ratio, and the longest loop turn in
each period. Figures depend on the machine: compare versions within one run.

    python -m bench.disconnect_storm --serve FILE [broker options]   (the timed broker)
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

import zmq

from bench.__main__ import (
    BROKER_BENCH_FLAGS,
    ROOT,
    Server,
    await_broker,
    load_command,
    percentile,
)
from bench.load import Waiter, make_clients, round_trips, wait_online


def serve(turns_file: str, broker_args: list[str]) -> int:
    """Run the broker with a timed poller; write its turns (monotonic start, seconds) to
    `turns_file` when it stops."""
    from mangogram_broker import shell
    from mangogram_broker.cli import main as broker_main

    turns: list[tuple[float, float]] = []

    class TimedPoller(zmq.Poller):
        returned: float | None = None

        def poll(self, timeout: int | None = None) -> list[tuple[zmq.Socket[bytes], int]]:
            called = time.monotonic()
            if self.returned is not None:
                turns.append((self.returned, called - self.returned))
            ready = super().poll(timeout)
            self.returned = time.monotonic()
            return ready  # type: ignore[return-value]

    # Only the shell's loop sees the timed poller (the authenticator thread keeps its own).
    timed = types.ModuleType("zmq")
    timed.__dict__.update(zmq.__dict__)
    timed.Poller = TimedPoller  # type: ignore[attr-defined]
    shell.zmq = timed  # type: ignore[attr-defined]

    def write() -> None:
        Path(turns_file).write_text(json.dumps(turns))

    atexit.register(write)
    return broker_main(broker_args)


def start_timed_broker(data_dir: Path, turns_file: Path) -> Server:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop("MANGOGRAM_INSECURE_PLAINTEXT", None)
    command = [
        sys.executable, "-m", "bench.disconnect_storm", "--serve", str(turns_file),
        "--bind", "tcp://127.0.0.1:*", "--key-bind", "tcp://127.0.0.1:*",
        "--data", str(data_dir), "--durability", "full", *BROKER_BENCH_FLAGS[:-2],
        "--log-level", "INFO",  # as bench's own broker: its start-up lines are read
    ]  # fmt: skip
    process = subprocess.Popen(command, env=env, stderr=subprocess.PIPE, text=True,
                               stdout=subprocess.DEVNULL, cwd=ROOT)  # fmt: skip
    return await_broker(process, "the timed broker")


def measure(work: Path, clients: int, count: int, after: float) -> dict[str, object]:
    turns_file = work / "turns.json"
    server = start_timed_broker(work / "data", turns_file)
    crowd: subprocess.Popen[str] | None = None
    try:
        args = argparse.Namespace(system="mangogram", endpoint=server.endpoint,
                                  server_key=server.server_key)  # fmt: skip
        alice, bob = make_clients(args, ["ds-a", "ds-b"])
        wait_online([alice, bob], "mangogram", time.monotonic() + 60)
        waiter = Waiter([alice, bob], "mangogram")
        command = load_command("mangogram", server, "idle", "--clients", str(clients),
                               "--prefix", "ds-crowd-")  # fmt: skip
        crowd = subprocess.Popen(command, cwd=ROOT, stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE, text=True)  # fmt: skip
        assert crowd.stdout is not None
        if not crowd.stdout.readline().startswith("{"):
            raise RuntimeError("the crowd never logged in")
        deadline = time.monotonic() + 120
        round_trips(alice, bob, waiter, deadline, count=max(1, count // 10))  # warm-up
        quiet_from = time.monotonic()
        quiet = round_trips(alice, bob, waiter, deadline, count=count)
        killed_at = time.monotonic()
        crowd.kill()  # SIGKILL on POSIX: every connection of the crowd closes at once
        crowd.wait(30)
        end = killed_at + after
        during = round_trips(alice, bob, waiter, end + 60, until=lambda: time.monotonic() > end)
        for sock in (alice, bob):
            sock.sock.close(linger=0)  # type: ignore[attr-defined]
    finally:
        if crowd is not None and crowd.poll() is None:
            crowd.kill()
            crowd.wait(30)
        server.stop()
    turns = [tuple(t) for t in json.loads(turns_file.read_text())]
    if not quiet or not during:
        raise RuntimeError("the disconnect storm took no round-trip samples")

    def longest(start: float, stop: float) -> float:
        inside = [length for at, length in turns if start <= at < stop]
        return round(max(inside, default=0.0) * 1000, 1)

    quiet_p99, storm_p99 = percentile(quiet, 0.99), percentile(during, 0.99)
    return {
        "clients": clients,
        "quiet_p99_us": quiet_p99,
        "storm_p99_us": storm_p99,
        "storm_max_us": round(max(during), 1),
        "storm_samples": len(during),
        "storm_p99_to_quiet_p99": round(storm_p99 / quiet_p99, 2),
        "quiet_longest_turn_ms": longest(quiet_from, killed_at),
        "storm_longest_turn_ms": longest(killed_at, end),
        "turns": sum(1 for at, _length in turns if quiet_from <= at < end),
    }


def main() -> int:
    if len(sys.argv) > 2 and sys.argv[1] == "--serve":
        return serve(sys.argv[2], sys.argv[3:])
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=1000, help="connections that vanish")
    parser.add_argument("--count", type=int, default=300, help="round trips before the kill")
    parser.add_argument("--after", type=float, default=8.0, help="seconds measured from it")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        result = measure(Path(tmp), args.clients, args.count, args.after)
    if args.json:
        print(json.dumps(result))
    else:
        print(
            f"disconnect storm, {result['clients']} connections vanish: honest pair p99"
            f" {result['quiet_p99_us']} µs quiet, {result['storm_p99_us']} µs after"
            f" (max {result['storm_max_us']}; {result['storm_samples']} samples), ratio"
            f" {result['storm_p99_to_quiet_p99']}; longest loop turn"
            f" {result['quiet_longest_turn_ms']} ms quiet,"
            f" {result['storm_longest_turn_ms']} ms after"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
