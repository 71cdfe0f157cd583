"""`python -m bench`: MangoGram against the limit, the old design and Prosody, in one run.

    python -m bench            # N = 1, 10, 100, 1000, latency, memory at 1,000 and 10,000
    python -m bench --quick    # N = 100 and latency only (under a minute)
    python -m bench --json     # one JSON object instead of tables
    python -m bench --repeat 3 # each throughput run three times, systems in turns; medians
    python -m bench --storm-only --storm 1000   # only the login storm (below)
    python -m bench --idle 50000   # only idle clients: MangoGram and the bare CurveZMQ ROUTER

Systems: the MangoGram broker as shipped (CurveZMQ, durability full), with durability
normal, with its store in memory (a reference for what durability costs: nothing on
disk) and with --insecure-plaintext; the limit (a bare pyzmq ROUTER,
`bench.limit_router`), in plaintext (`limit`) and with CurveZMQ on every connection
(`limit-curve`, the fair limit for the shipped broker); the old design (a thread per
client, `bench.thread_server`); and Prosody, an XMPP server with TLS and offline storage
(`bench.prosody`), skipped with a line saying so where it is not installed; and cluster
mode (`bench.cluster_systems`): the broker on a local JetStream, and two brokers sharing it.

Every system runs in its own process with the same load generator (`bench.load`) in
another; the server's CPU time comes from the OS (psutil), sampled when the generator
says its measured window opens and closes. Only loopback addresses are used.
It warns when the machine is already busy before it starts.

The login storm (`--storm N`): an honest pair's round-trip p99 on the MangoGram broker
while N new CurveZMQ connections log in at once, as a ratio to its p99 just before.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import psutil

from bench import cluster_systems, prosody
from bench.load import WINDOW_END, WINDOW_START, rtt_names, throughput_names

ROOT = Path(__file__).resolve().parent.parent
SYSTEMS = (
    "mangogram", "mangogram-normal", "mangogram-memory", "mangogram-plaintext", "limit",
    "limit-curve", "thread-server", "prosody", *cluster_systems.SYSTEMS,
)  # fmt: skip
# Limits a real deployment keeps are opened up so they do not throttle the load itself.
BROKER_BENCH_FLAGS = [
    "--rate-per-second", "1000000000", "--rate-burst", "1000000000",
    "--registrations-per-minute", "1000000000", "--max-mailbox", "10000000",
    "--max-sessions", "100000", "--heartbeat-interval-ms", "60000",
    "--heartbeat-timeout-ms", "600000", "--log-level", "WARNING",
]  # fmt: skip


@dataclass
class Server:
    process: subprocess.Popen[str]
    endpoint: str
    server_key: str | None = None
    xmpp: prosody.Prosody | None = None

    def register(self, names: list[str]) -> None:
        """Users the generator will log in as; only Prosody needs them made beforehand
        (MangoGram registers a name at its first login, the others take any name)."""
        if self.xmpp is not None:
            self.xmpp.register(names)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)


def await_broker(process: subprocess.Popen[str], what: str) -> Server:
    """Read a starting broker's log until it listens (30 s at most); its key if it has one."""
    assert process.stderr is not None
    key = None
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        line = process.stderr.readline()
        if not line:
            break
        if match := re.search(r"public key (\S{40})", line):
            key = match.group(1)
        if match := re.search(r"listening on (tcp://\S+)", line):
            # Keep draining its log, or a full pipe would stall the broker.
            threading.Thread(target=drain, args=(process.stderr,), daemon=True).start()
            return Server(process, match.group(1), key)
    process.kill()
    raise RuntimeError(f"{what} did not start")


def start_server(system: str, data_dir: Path, extra: Sequence[str] = ()) -> Server:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if system in cluster_systems.SYSTEMS:  # brokers on a nats-server (bench/cluster_systems.py)
        return cluster_systems.start(  # type: ignore[return-value]
            system, data_dir, lambda broker_dir, flags: start_server("mangogram", broker_dir, flags)
        )
    if system.startswith("mangogram"):
        env.pop("MANGOGRAM_INSECURE_PLAINTEXT", None)
        durability = "normal" if system == "mangogram-normal" else "full"
        if system == "mangogram-memory":  # the same broker, its store in memory
            program = ["-m", "bench.memory_broker"]
        else:
            program = [str(ROOT / "broker.py")]
        command = [
            sys.executable, *program, "--bind", "tcp://127.0.0.1:*",
            "--key-bind", "tcp://127.0.0.1:*", "--data", str(data_dir),
            "--durability", durability, *BROKER_BENCH_FLAGS[:-2], "--log-level", "INFO", *extra,
        ]  # fmt: skip
        if system == "mangogram-plaintext":  # measured against the plaintext limit
            command.append("--insecure-plaintext")
        process = subprocess.Popen(command, env=env, stderr=subprocess.PIPE, text=True,
                                   stdout=subprocess.DEVNULL, cwd=ROOT)  # fmt: skip
        return await_broker(process, "the MangoGram broker")
    if system == "prosody":
        xmpp = prosody.start(data_dir)
        return Server(xmpp.process, xmpp.endpoint, xmpp=xmpp)  # type: ignore[arg-type]
    if system in ("limit", "limit-curve"):
        module, args = "bench.limit_router", ["tcp://127.0.0.1:*"]
        if system == "limit-curve":
            args.append("--curve")
    else:
        module, args = "bench.thread_server", ["127.0.0.1", "0"]
    process = subprocess.Popen([sys.executable, "-m", module, *args], env=env, cwd=ROOT,
                               stdout=subprocess.PIPE, text=True)  # fmt: skip
    assert process.stdout is not None
    first = process.stdout.readline().strip()
    if system == "thread-server":
        return Server(process, "{}:{}".format(*first.split()))
    key = process.stdout.readline().strip() if system == "limit-curve" else None
    return Server(process, first, key)


def drain(stream: IO[str]) -> None:
    for _line in stream:
        pass


def load_command(system: str, server: Server, mode: str, *extra: str) -> list[str]:
    generator = "mangogram" if system.startswith("mangogram") else system
    command = [sys.executable, "-m", "bench.load", generator, server.endpoint, mode, *extra]
    if server.server_key:
        # "=" form: a Z85 key may begin with "-", which argparse would read as an option.
        command.append(f"--server-key={server.server_key}")
    return command


def run_load(command: list[str], timeout: float) -> dict[str, object]:
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(f"load generator failed: {done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def cpu_seconds(process: psutil.Process) -> float:
    times = process.cpu_times()
    return times.user + times.system


def measure_throughput(
    system: str, pairs: int, work: Path, warmup: float, window: float, attempt: int = 0
) -> dict[str, object]:
    # A fresh data directory each time: the generator's clients have new keys every run,
    # and a name stays owned by the key that registered it.
    server = start_server(system, work / f"{system}-{pairs}-{attempt}")
    try:
        server.register(throughput_names("b", pairs))
        owner = getattr(server, "cpu", None) or psutil.Process(server.process.pid)
        command = load_command(system, server, "throughput", "--pairs", str(pairs),
                               "--warmup", str(warmup), "--window", str(window))  # fmt: skip
        with tempfile.TemporaryFile("w+") as errors:
            load = subprocess.Popen(
                command, cwd=ROOT, stdout=subprocess.PIPE, stderr=errors, text=True
            )
            before, after, result = window_cpu(load, owner)
            if load.returncode != 0 or result is None or before is None or after is None:
                errors.seek(0)
                raise RuntimeError(f"load generator failed: {errors.read()[-2000:]}")
    finally:
        server.stop()
    delivered = int(result["delivered"])
    rate = delivered / float(result["window_s"])
    return {
        "system": system,
        "n": pairs,
        "msgs_per_s": round(rate, 1),
        "cpu_us_per_msg": round((after - before) * 1e6 / delivered, 1) if delivered else None,
        # Both processes share the machine's cores: what the generator spends, the broker
        # cannot have (see README, "Performance"). It measures its own over the window.
        "load_cpu_us_per_msg": round(float(result["cpu_s"]) * 1e6 / delivered, 1)
        if delivered
        else None,
    }


def median_run(attempts: list[dict[str, object]]) -> dict[str, object]:
    """The attempt with the median rate (the lower middle one for an even count), so its
    CPU figures come from the same run; every attempt's rate is kept beside it."""
    ranked = sorted(attempts, key=lambda run: float(run["msgs_per_s"]))  # type: ignore[arg-type]
    chosen = dict(ranked[(len(ranked) - 1) // 2])
    chosen["msgs_per_s_runs"] = [run["msgs_per_s"] for run in attempts]
    return chosen


def window_cpu(
    load: subprocess.Popen[str], server: psutil.Process, timeout: float = 300
) -> tuple[float | None, float | None, dict[str, object] | None]:
    """Follow a throughput generator's output: the server's CPU seconds when its measured
    window starts and when it ends, and the generator's result. A generator that overruns
    `timeout` is killed."""
    before = after = None
    result = None
    watchdog = threading.Timer(timeout, load.kill)
    watchdog.start()
    try:
        assert load.stdout is not None
        for line in load.stdout:
            if line.strip() == WINDOW_START:
                before = cpu_seconds(server)
            elif line.strip() == WINDOW_END:
                after = cpu_seconds(server)
            elif line.startswith("{"):
                result = json.loads(line)
        load.wait()
    finally:
        watchdog.cancel()
        if load.poll() is None:  # we failed while it runs: it must not outlive the run
            load.kill()
            load.wait()
    return before, after, result


def measure_rtt(system: str, work: Path, count: int) -> dict[str, object]:
    server = start_server(system, work / f"{system}-rtt")
    try:
        server.register(rtt_names("b"))
        result = run_load(load_command(system, server, "rtt", "--count", str(count)), 300)
    finally:
        server.stop()
    samples = sorted(float(s) for s in result["rtt_us"])  # type: ignore[union-attr]

    def at(fraction: float) -> float:
        return round(samples[min(len(samples) - 1, int(fraction * len(samples)))], 1)

    return {"system": system, "p50_us": at(0.50), "p99_us": at(0.99), "p999_us": at(0.999),
            "samples": len(samples)}  # fmt: skip


def percentile(samples: list[float], fraction: float) -> float:
    ordered = sorted(samples)
    return round(ordered[min(len(ordered) - 1, int(fraction * len(ordered)))], 1)


def measure_storm(
    work: Path, clients: int, count: int, system: str = "mangogram"
) -> dict[str, object]:
    """An honest pair's round-trip p99 while `clients` new connections log in at once
    (CurveZMQ handshakes, ZAP, LOGINs), against its p99 on the same broker just before:
    the ratio says how much a connect storm slows everyone else."""
    server = start_server(system, work / f"storm-{system}-{clients}")
    try:
        command = load_command(system, server, "storm", "--clients", str(clients),
                               "--count", str(count))  # fmt: skip
        result = run_load(command, 600)
    finally:
        server.stop()
    quiet = [float(s) for s in result["quiet_rtt_us"]]  # type: ignore[attr-defined]
    during = [float(s) for s in result["storm_rtt_us"]]  # type: ignore[attr-defined]
    if not quiet or not during:
        raise RuntimeError("the storm run took no round-trip samples")
    quiet_p99, storm_p99 = percentile(quiet, 0.99), percentile(during, 0.99)
    return {
        "system": system,
        "clients": clients,
        "storm_s": result["storm_s"],
        "quiet_p50_us": percentile(quiet, 0.5),
        "quiet_p99_us": quiet_p99,
        "storm_p50_us": percentile(during, 0.5),
        "storm_p99_us": storm_p99,
        "storm_max_us": round(max(during), 1),
        "storm_samples": len(during),
        "storm_p99_to_quiet_p99": round(storm_p99 / quiet_p99, 2),
    }


def measure_memory(clients: int, work: Path, system: str = "mangogram") -> dict[str, object]:
    server = start_server(system, work / f"memory-{system}-{clients}")
    holders: list[subprocess.Popen[str]] = []
    try:
        broker = psutil.Process(server.process.pid)
        before = broker.memory_info().rss
        per_process = 2500  # keeps each holder well inside its open-file limit
        started = time.monotonic()
        for first in range(0, clients, per_process):
            size = min(per_process, clients - first)
            command = load_command(system, server, "idle", "--clients", str(size),
                                   "--prefix", f"m{first}-")  # fmt: skip
            holders.append(subprocess.Popen(command, cwd=ROOT, stdin=subprocess.PIPE,
                                            stdout=subprocess.PIPE, text=True))  # fmt: skip
        for holder in holders:
            assert holder.stdout is not None
            line = holder.stdout.readline()
            if not line:
                raise RuntimeError("an idle-client holder failed")
        connect_s = time.monotonic() - started
        time.sleep(0.5)  # let the broker settle its buffers after the login burst
        after = broker.memory_info().rss
    finally:
        for holder in holders:
            if holder.stdin:
                holder.stdin.close()
            holder.wait(30)
        server.stop()
    return {
        "clients": clients,
        "kb_per_client": round((after - before) / 1024 / clients, 2),
        "connect_s": round(connect_s, 2),
    }


# Other work on the machine takes cores from the systems under test and skews every
# figure (a stray process spinning at 100 % once did, unnoticed, for ten minutes).
BUSY_WARNING_PERCENT = 15.0


def idle_check() -> float:
    """The machine's CPU use over half a second before the run, in percent of all cores;
    warns on stderr when something else is already using a noticeable share."""
    busy = psutil.cpu_percent(interval=0.5)
    warning = busy_warning(busy)
    if warning:
        print(warning, file=sys.stderr)
    return busy


def busy_warning(busy_percent: float) -> str | None:
    if busy_percent <= BUSY_WARNING_PERCENT:
        return None
    return (
        f"warning: the machine is {busy_percent:.0f}% busy before the benchmark starts;"
        " the figures will be skewed"
    )


def chosen_systems(names: str | None) -> tuple[list[str], dict[str, str]]:
    """The systems to run (all by default, or the comma-separated `names`) and those
    skipped, with why: Prosody when it is not installed."""
    wanted = SYSTEMS if not names else tuple(names.split(","))
    unknown = [name for name in wanted if name not in SYSTEMS]
    if unknown:
        raise SystemExit(f"unknown systems: {', '.join(unknown)} (known: {', '.join(SYSTEMS)})")
    skipped = {}
    if "prosody" in wanted and (why := prosody.missing()):
        skipped["prosody"] = why
    for system in set(wanted) & set(cluster_systems.SYSTEMS):
        if why := cluster_systems.missing():
            skipped[system] = why
    return [name for name in wanted if name not in skipped], skipped


def skip_line(system: str, why: str) -> str:
    if system in cluster_systems.SYSTEMS:
        return f"{system}: skipped, {why} ({cluster_systems.skip_hint()})"
    return f"{system}: skipped, {why} (Debian/Ubuntu: apt-get install prosody)"


def rtt_ratio(rtts: list[dict[str, object]], a: str, b: str) -> float | None:
    p99 = {r["system"]: float(r["p99_us"]) for r in rtts}  # type: ignore[arg-type]
    return round(p99[a] / p99[b], 3) if p99.get(a) and p99.get(b) else None


def ratio(runs: list[dict[str, object]], a: str, b: str, n: int) -> float | None:
    def rate(system: str) -> float | None:
        for run in runs:
            if run["system"] == system and run["n"] == n:
                return float(run["msgs_per_s"])  # type: ignore[arg-type]
        return None

    top, bottom = rate(a), rate(b)
    return round(top / bottom, 3) if top is not None and bottom else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="N=100 and latency only")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--sizes", help="comma-separated N values (default 1,10,100,1000)")
    parser.add_argument("--window", type=float, default=3.0, help="measured seconds per run")
    parser.add_argument("--no-memory", action="store_true", help="skip the idle-client test")
    parser.add_argument(
        "--systems", help=f"comma-separated systems to run (default all: {','.join(SYSTEMS)})"
    )
    parser.add_argument("--rtt-count", type=int, help="round trips per system (default 2000)")
    parser.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="measure each throughput run this many times, the systems taking turns, and"
        " report the median run (the slower middle one for an even count; default 1)",
    )
    parser.add_argument(
        "--storm",
        type=int,
        help="connections in the login-storm test (default 1000 in a full run, none with"
        " --quick; 0: skip)",
    )
    parser.add_argument("--storm-only", action="store_true", help="run only the login-storm test")
    parser.add_argument(
        "--idle",
        type=int,
        metavar="N",
        help="run only the idle-clients test (bench.idle): N clients on MangoGram and on the"
        " bare CurveZMQ ROUTER, memory per client and the time to log them all in",
    )
    args = parser.parse_args()
    if args.idle:
        run_idle(args.idle, args.json)
        return
    storm_clients = args.storm if args.storm is not None else (0 if args.quick else 1000)
    if args.storm_only:
        with tempfile.TemporaryDirectory(dir=ROOT) as tmp:
            result = measure_storm(Path(tmp), storm_clients or 1000, args.rtt_count or 500)
        print(json.dumps(result) if args.json else format_storm(result))
        return
    sizes = [100] if args.quick else [int(n) for n in (args.sizes or "1,10,100,1000").split(",")]
    warmup = 1.0
    report: dict[str, object] = {"runs": [], "rtt": [], "memory": []}
    systems, skipped = chosen_systems(args.systems)
    report["skipped"] = skipped
    for system, why in skipped.items():
        print(skip_line(system, why), file=sys.stderr)
    busy = idle_check()
    with tempfile.TemporaryDirectory(dir=ROOT) as tmp:
        work = Path(tmp)
        # The systems take turns, so a slow spell of the machine hits them all alike.
        attempts: dict[tuple[str, int], list[dict[str, object]]] = {}
        for attempt in range(max(1, args.repeat)):
            for n in sizes:
                for system in systems:
                    run = measure_throughput(system, n, work, warmup, args.window, attempt)
                    attempts.setdefault((system, n), []).append(run)
        runs = [median_run(found) for found in attempts.values()]
        report["runs"] = runs
        count = args.rtt_count or (500 if args.quick else 2000)
        rtts = [measure_rtt(s, work, count) for s in systems]
        report["rtt"] = rtts
        if storm_clients:
            report["storm"] = measure_storm(work, storm_clients, args.rtt_count or 500)
        if not args.quick and not args.no_memory and "mangogram" in systems:
            report["memory"] = [measure_memory(c, work) for c in (1000, 10000)]
            # The same idle clients on the bare ROUTER: what libzmq itself keeps per
            # connection, without encryption, sessions or storage.
            report["memory_limit"] = [measure_memory(c, work, "limit") for c in (1000, 10000)]
    report["ratios"] = {
        "mangogram_to_limit_n100": ratio(runs, "mangogram", "limit", 100),
        "mangogram_normal_to_limit_n100": ratio(runs, "mangogram-normal", "limit", 100),
        "mangogram_memory_to_limit_n100": ratio(runs, "mangogram-memory", "limit", 100),
        "mangogram_to_limit_n1000": ratio(runs, "mangogram", "limit", 1000),
        "mangogram_memory_to_limit_n1000": ratio(runs, "mangogram-memory", "limit", 1000),
        "mangogram_to_thread_server_n1000": ratio(runs, "mangogram", "thread-server", 1000),
        "rtt_p99_to_limit": rtt_ratio(rtts, "mangogram", "limit"),
        # The fair limit: the same forwarder, every connection CurveZMQ-encrypted as the
        # shipped broker's are. The plaintext limit is the one for --insecure-plaintext.
        "mangogram_to_limit_curve_n100": ratio(runs, "mangogram", "limit-curve", 100),
        "mangogram_to_limit_curve_n1000": ratio(runs, "mangogram", "limit-curve", 1000),
        "mangogram_normal_to_limit_curve_n100": ratio(runs, "mangogram-normal", "limit-curve", 100),
        "mangogram_plaintext_to_limit_n100": ratio(runs, "mangogram-plaintext", "limit", 100),
        "mangogram_plaintext_to_limit_n1000": ratio(runs, "mangogram-plaintext", "limit", 1000),
        "limit_curve_to_limit_n100": ratio(runs, "limit-curve", "limit", 100),
        "limit_curve_to_limit_n1000": ratio(runs, "limit-curve", "limit", 1000),
        "rtt_p99_to_limit_curve": rtt_ratio(rtts, "mangogram", "limit-curve"),
        "mangogram_to_prosody_n100": ratio(runs, "mangogram", "prosody", 100),
        "mangogram_to_prosody_n1000": ratio(runs, "mangogram", "prosody", 1000),
        "rtt_p99_to_prosody": rtt_ratio(rtts, "mangogram", "prosody"),
        # Cluster mode (bench/cluster_systems.py): the same broker on JetStream / on SQLite,
        # and two brokers on one JetStream (every message crossing brokers) / one broker.
        "jetstream_to_sqlite_n100": ratio(runs, "mangogram-jetstream", "mangogram", 100),
        "jetstream_2_to_1_n100": ratio(runs, "mangogram-jetstream-2", "mangogram-jetstream", 100),
        "rtt_p99_jetstream_to_sqlite": rtt_ratio(rtts, "mangogram-jetstream", "mangogram"),
        "rtt_p99_jetstream_2_to_1": rtt_ratio(rtts, "mangogram-jetstream-2", "mangogram-jetstream"),
    }
    if "storm" in report:
        ratio_of_storm = report["storm"]["storm_p99_to_quiet_p99"]  # type: ignore[index]
        report["ratios"]["storm_rtt_p99_to_quiet"] = ratio_of_storm  # type: ignore[index]
    memory = {m["clients"]: m["kb_per_client"] for m in report["memory"]}  # type: ignore[attr-defined]
    bare = {m["clients"]: m["kb_per_client"] for m in report.get("memory_limit", [])}  # type: ignore[attr-defined]
    if 10000 in memory and bare.get(10000):
        report["ratios"]["memory_to_limit_10000"] = round(memory[10000] / bare[10000], 3)  # type: ignore[index]
    report["machine"] = {
        "cpus": os.cpu_count(),
        "python": sys.version.split()[0],
        "busy_percent_before": busy,
    }
    if args.json:
        print(json.dumps(report))
        return
    header = f"{'system':22} {'N':>5} {'msgs/s':>10} {'CPU µs/msg':>11} {'load CPU µs/msg':>16}"
    print(header + ("   all runs, msgs/s" if args.repeat > 1 else ""))
    for run in runs:
        cpu, load_cpu = str(run["cpu_us_per_msg"]), str(run["load_cpu_us_per_msg"])
        line = f"{run['system']:22} {run['n']:>5} {run['msgs_per_s']:>10} {cpu:>11} {load_cpu:>16}"
        every = run["msgs_per_s_runs"]
        print(line + (f"   {' '.join(str(r) for r in every)}" if args.repeat > 1 else ""))  # type: ignore[attr-defined]
    print(f"\n{'round trip':22} {'p50 µs':>9} {'p99 µs':>9} {'p99.9 µs':>9}")
    for r in rtts:
        print(f"{r['system']:22} {r['p50_us']:>9} {r['p99_us']:>9} {r['p999_us']:>9}")
    for label, key in (("mangogram", "memory"), ("limit", "memory_limit")):
        for m in report.get(key, []):  # type: ignore[attr-defined]
            print(f"\n{label}: {m['clients']} idle clients, {m['kb_per_client']} KB each,", end=" ")
            print(f"connected in {m['connect_s']} s")
    if "storm" in report:
        print("\n" + format_storm(report["storm"]))  # type: ignore[arg-type]
    for system, why in skipped.items():
        print("\n" + skip_line(system, why))
    print("\nratios:", json.dumps(report["ratios"]))


def run_idle(clients: int, as_json: bool) -> None:
    """`--idle N`: bench.idle's run with its defaults (holders, source addresses)."""
    from bench import idle  # it imports this module: not at the top

    with tempfile.TemporaryDirectory(dir=ROOT) as tmp:
        try:
            report = idle.idle_report(clients, Path(tmp))
        except idle.IdleRunFailed as exc:
            raise SystemExit(f"idle run failed: {exc}") from exc
    print(json.dumps(report) if as_json else idle.format_idle(report))


def format_storm(result: dict[str, object]) -> str:
    return (
        f"login storm, {result['clients']} connections in {result['storm_s']} s:"
        f" honest pair p99 {result['quiet_p99_us']} µs quiet, {result['storm_p99_us']} µs"
        f" during (max {result['storm_max_us']}; {result['storm_samples']} samples),"
        f" ratio {result['storm_p99_to_quiet_p99']}"
    )


if __name__ == "__main__":
    main()
