"""The load generator: one process driving many clients of one system over loopback.

    python -m bench.load SYSTEM ENDPOINT MODE [options]   (ends with one JSON object)

SYSTEM is mangogram, limit or thread-server; MODE is throughput (N sender->receiver
pairs, `--inflight` messages outstanding per pair, counted over a window after a
warm-up), rtt (one pair, one message at a time, each answered: round-trip samples) or
idle (log `--clients` in, report the time, then wait for stdin to close). Throughput
prints a line as its measured window starts and another as it ends, so that whoever runs
it can sample the server's CPU time over exactly that window. Every loop is
bounded by a count and a deadline. The same generator drives every system, so the
ratios between systems are fair even where the generator itself limits the rate.
"""

from __future__ import annotations

import argparse
import itertools
import json
import selectors
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable

import orjson  # what the MangoGram SDK uses, so the generator costs what a client does
import zmq

PAYLOAD = "x" * 100  # 100-byte texts
WINDOW_START = "window-start"
WINDOW_END = "window-end"
SIGNATURE = b"MGP02"


class Client:
    """One simulated user; subclasses speak one system's protocol."""

    def __init__(self, name: str) -> None:
        self.name = name

    def fileno_or_socket(self) -> object:
        raise NotImplementedError

    def send_text(self, to: Client, text: str) -> None:
        raise NotImplementedError

    def receive(self) -> list[str]:
        """Texts delivered to this client (non-blocking); protocol chatter is handled."""
        raise NotImplementedError


class LimitClient(Client):
    def __init__(self, context: zmq.Context, endpoint: str, name: str) -> None:
        super().__init__(name)
        self.sock = context.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.ROUTING_ID, name.encode())
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(endpoint)

    def fileno_or_socket(self) -> object:
        return self.sock

    def send_text(self, to: Client, text: str) -> None:
        self.sock.send_multipart([to.name.encode(), text.encode()])

    def receive(self) -> list[str]:
        texts = []
        while True:
            try:
                _sender, payload = self.sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return texts
            texts.append(payload.decode())


class MangoClient(Client):
    def __init__(
        self, context: zmq.Context, endpoint: str, name: str, server_key: str | None
    ) -> None:
        super().__init__(name)
        self.sock = context.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        if server_key:
            public, secret = zmq.curve_keypair()
            self.sock.setsockopt(zmq.CURVE_SERVERKEY, server_key.encode())
            self.sock.setsockopt(zmq.CURVE_PUBLICKEY, public)
            self.sock.setsockopt(zmq.CURVE_SECRETKEY, secret)
        self.sock.connect(endpoint)
        self.online = False
        self.ids = itertools.count(1)  # unique per sender, as the protocol asks
        self.mark = 0  # highest stream seq held; the broker delivers in order here
        self.sock.send_multipart([SIGNATURE, b"LOGIN", orjson.dumps({"name": name})])

    def fileno_or_socket(self) -> object:
        return self.sock

    def send_text(self, to: Client, text: str) -> None:
        # Fixed width, so the ids grow as strings too, as the SDK's do (the broker's store
        # then knows a new id from a resend without a lookup).
        body = {"id": f"{next(self.ids):012d}", "to": to.name, "text": text, "sent_at": 0}
        self.sock.send_multipart([SIGNATURE, b"SEND", orjson.dumps(body)])

    def ping(self) -> None:
        self.sock.send_multipart([SIGNATURE, b"PING", b"{}"])

    def receive(self) -> list[str]:
        texts = []
        while True:
            try:
                _signature, command, body = self.sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                if texts:  # one cumulative receipt for everything this call took in
                    receipt = orjson.dumps({"seq": self.mark})
                    self.sock.send_multipart([SIGNATURE, b"RECEIPT", receipt])
                return texts
            if command == b"DELIVER":
                message = orjson.loads(body)
                self.mark = max(self.mark, message["seq"])
                texts.append(message["text"])
            elif command == b"WELCOME":
                self.online = True
            elif command == b"ERROR":
                raise SystemExit(f"{self.name}: broker error {body.decode()}")


class ThreadServerClient(Client):
    def __init__(self, host: str, port: int, name: str) -> None:
        super().__init__(name)
        self.sock = socket.create_connection((host, port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock.sendall(f"LOGIN {name}\n".encode())
        self.sock.setblocking(False)
        self.buffer = b""

    def fileno_or_socket(self) -> object:
        return self.sock

    def send_text(self, to: Client, text: str) -> None:
        self.sock.setblocking(True)
        self.sock.sendall(f"SEND {to.name} {text}\n".encode())
        self.sock.setblocking(False)

    def receive(self) -> list[str]:
        try:
            chunk = self.sock.recv(1 << 16)
        except BlockingIOError:
            return []
        self.buffer += chunk
        *lines, self.buffer = self.buffer.split(b"\n")
        return [line.split(b" ", 2)[2].decode() for line in lines if line.startswith(b"FROM ")]


class Waiter:
    """Waits for any client to have input, for zmq sockets or plain TCP sockets."""

    def __init__(self, clients: list[Client], system: str) -> None:
        self.system = system
        self.by_key: dict[object, Client] = {}
        if system == "thread-server":
            self.selector = selectors.DefaultSelector()
            for client in clients:
                self.selector.register(client.fileno_or_socket(), selectors.EVENT_READ, client)  # type: ignore[arg-type]
        else:
            self.poller = zmq.Poller()
            for client in clients:
                self.poller.register(client.fileno_or_socket(), zmq.POLLIN)
                self.by_key[client.fileno_or_socket()] = client

    def ready(self, timeout_ms: int) -> list[Client]:
        if self.system == "thread-server":
            return [key.data for key, _ in self.selector.select(timeout_ms / 1000)]
        return [self.by_key[s] for s, _ in self.poller.poll(timeout_ms)]


def make_clients(args: argparse.Namespace, names: list[str]) -> list[Client]:
    if args.system == "thread-server":
        host, port = args.endpoint.rsplit(":", 1)
        return [ThreadServerClient(host, int(port), n) for n in names]
    context = zmq.Context.instance()
    context.set(zmq.MAX_SOCKETS, 50_000)
    if args.system == "limit":
        return [LimitClient(context, args.endpoint, n) for n in names]
    return [MangoClient(context, args.endpoint, n, args.server_key) for n in names]


def wait_online(clients: list[Client], system: str, deadline: float) -> None:
    """Every client must be reachable before the measurement starts: MangoGram clients
    wait for WELCOME; the others send themselves a probe (their servers drop messages
    for peers they do not know yet, which would strand in-flight messages)."""
    if system == "mangogram":
        pending = list(clients)
        waiter = Waiter(pending, system)
        while pending:
            if time.monotonic() > deadline:
                raise SystemExit(f"{len(pending)} clients never logged in")
            for client in waiter.ready(100):
                client.receive()
            pending = [c for c in pending if not c.online]  # type: ignore[attr-defined]
        return
    waiter = Waiter(clients, system)
    pending_set = set(range(len(clients)))
    index = {id(c): i for i, c in enumerate(clients)}
    next_probe = 0.0
    while pending_set:
        if time.monotonic() > deadline:
            raise SystemExit(f"{len(pending_set)} clients never became reachable")
        if time.monotonic() >= next_probe:
            for i in pending_set:
                clients[i].send_text(clients[i], "probe")
            next_probe = time.monotonic() + 0.5
        for client in waiter.ready(50):
            if client.receive():
                pending_set.discard(index[id(client)])
    # late duplicate probes must not be counted as deliveries
    end = time.monotonic() + 0.6
    while time.monotonic() < end:
        for client in waiter.ready(50):
            client.receive()


def throughput(args: argparse.Namespace) -> dict[str, float]:
    names = [f"{args.prefix}s{i}" for i in range(args.pairs)] + [
        f"{args.prefix}r{i}" for i in range(args.pairs)
    ]
    clients = make_clients(args, names)
    senders, receivers = clients[: args.pairs], clients[args.pairs :]
    wait_online(clients, args.system, time.monotonic() + 120)
    partner = {id(r): i for i, r in enumerate(receivers)}
    outstanding = [0] * args.pairs
    waiter = Waiter(clients, args.system)
    started = time.monotonic()
    window_start = started + args.warmup
    window_end = window_start + args.window
    delivered = 0
    window_cpu_start: float | None = None  # this process's CPU time (all threads)
    while time.monotonic() < window_end:
        if window_cpu_start is None and time.monotonic() >= window_start:
            window_cpu_start = time.process_time()
            # The orchestrator samples the server's CPU time on these two lines.
            print(WINDOW_START, flush=True)
        for i, sender in enumerate(senders):
            while outstanding[i] < args.inflight:
                sender.send_text(receivers[i], PAYLOAD)
                outstanding[i] += 1
        for client in waiter.ready(10):
            texts = client.receive()
            if texts and id(client) in partner:
                pair = partner[id(client)]
                outstanding[pair] -= len(texts)
                if window_start <= time.monotonic() < window_end:
                    delivered += len(texts)
    print(WINDOW_END, flush=True)
    window_cpu = time.process_time() - (window_cpu_start or time.process_time())
    return {"delivered": delivered, "window_s": args.window, "cpu_s": window_cpu}


def rtt(args: argparse.Namespace) -> dict[str, object]:
    alice, bob = make_clients(args, [f"{args.prefix}a", f"{args.prefix}b"])
    wait_online([alice, bob], args.system, time.monotonic() + 60)
    waiter = Waiter([alice, bob], args.system)
    samples: list[float] = []
    deadline = time.monotonic() + args.window * 10
    for round_trip in range(args.count + args.count // 10):
        if time.monotonic() > deadline:
            break
        started = time.perf_counter()
        alice.send_text(bob, PAYLOAD)
        answered = False
        while not answered and time.monotonic() < deadline:
            for client in waiter.ready(100):
                for _text in client.receive():
                    if client is bob:
                        bob.send_text(alice, PAYLOAD)
                    else:
                        answered = True
        if round_trip >= args.count // 10:  # the first tenth warms up
            samples.append((time.perf_counter() - started) * 1e6)
    return {"rtt_us": samples}


def round_trips(
    alice: Client,
    bob: Client,
    waiter: Waiter,
    deadline: float,
    count: int | None = None,
    until: Callable[[], bool] = lambda: False,
) -> list[float]:
    """Alice sends, Bob answers, Alice hears it: one sample in microseconds per round
    trip, until there are `count`, `until()` says stop, or the deadline passes."""
    samples: list[float] = []
    while (count is None or len(samples) < count) and not until():
        if time.monotonic() > deadline:
            break
        started = time.perf_counter()
        alice.send_text(bob, PAYLOAD)
        answered = False
        while not answered and time.monotonic() < deadline:
            for client in waiter.ready(100):
                for _text in client.receive():
                    if client is bob:
                        bob.send_text(alice, PAYLOAD)
                    else:
                        answered = True
        if answered:
            samples.append((time.perf_counter() - started) * 1e6)
    return samples


def storm(args: argparse.Namespace) -> dict[str, object]:
    """An honest pair's round trips, first on a quiet broker (`--count` of them), then
    while `--clients` new connections log in at once (another process, started here, as
    the idle mode); the storm is over when that process reports every client online."""
    alice, bob = make_clients(args, [f"{args.prefix}a", f"{args.prefix}b"])
    wait_online([alice, bob], args.system, time.monotonic() + 60)
    waiter = Waiter([alice, bob], args.system)
    deadline = time.monotonic() + 120
    round_trips(alice, bob, waiter, deadline, count=max(1, args.count // 10))  # warm-up
    quiet = round_trips(alice, bob, waiter, deadline, count=args.count)
    command = [sys.executable, "-m", "bench.load", args.system, args.endpoint, "idle",
               "--clients", str(args.clients), "--prefix", f"{args.prefix}storm-"]  # fmt: skip
    if args.server_key:
        command.append(f"--server-key={args.server_key}")
    crowd = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert crowd.stdout is not None
    online = threading.Event()
    report: list[str] = []

    def follow() -> None:
        line = crowd.stdout.readline()  # type: ignore[union-attr]
        report.append(line)
        online.set()

    threading.Thread(target=follow, daemon=True).start()
    started = time.monotonic()
    try:
        during = round_trips(alice, bob, waiter, started + 300, until=online.is_set)
    finally:
        assert crowd.stdin is not None
        crowd.stdin.close()
        try:
            crowd.wait(60)
        except subprocess.TimeoutExpired:
            crowd.kill()
            crowd.wait()
    if not report or not report[0].startswith("{"):
        raise SystemExit("the storm's clients never all logged in")
    return {
        "quiet_rtt_us": quiet,
        "storm_rtt_us": during,
        "storm_s": round(time.monotonic() - started, 3),
        "storm_clients": args.clients,
    }


def idle(args: argparse.Namespace) -> dict[str, object]:
    started = time.monotonic()
    clients = make_clients(args, [f"{args.prefix}i{i}" for i in range(args.clients)])
    wait_online(clients, args.system, started + 300)
    print(json.dumps({"connect_s": time.monotonic() - started}), flush=True)
    sys.stdin.read()  # hold the connections until the orchestrator closes our stdin
    return {}


def main() -> None:
    parser = argparse.ArgumentParser(description="MangoGram benchmark load generator")
    parser.add_argument("system", choices=["mangogram", "limit", "thread-server"])
    parser.add_argument("endpoint")
    parser.add_argument("mode", choices=["throughput", "rtt", "idle", "storm"])
    parser.add_argument("--server-key")
    parser.add_argument("--pairs", type=int, default=1)
    parser.add_argument("--inflight", type=int, default=32)
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--window", type=float, default=3.0)
    parser.add_argument("--count", type=int, default=2000)
    parser.add_argument("--clients", type=int, default=1000)
    parser.add_argument("--prefix", default="b")
    args = parser.parse_args()
    modes: dict[str, Callable[[argparse.Namespace], dict[str, object]]] = {
        "throughput": throughput,  # type: ignore[dict-item]
        "rtt": rtt,
        "idle": idle,
        "storm": storm,
    }
    result = modes[args.mode](args)
    if result:
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
