"""The load generator: one process driving many clients of one system over loopback.

    python -m bench.load SYSTEM ENDPOINT MODE [options]   (ends with one JSON object)

SYSTEM is mangogram, limit, limit-curve, thread-server or prosody; MODE is throughput
(N sender->receiver pairs, `--inflight` messages outstanding per pair, counted over a
window after a warm-up), rtt (one pair, one message at a time, each answered: round-trip samples) or
idle (log `--clients` in, report the time, then wait for stdin to close). Throughput
prints a line as its measured window starts and another as it ends, so that whoever runs
it can sample the server's CPU time over exactly that window. Every loop is
bounded by a count and a deadline. The same generator drives every system, so the
ratios between systems are fair even where the generator itself limits the rate.
"""

from __future__ import annotations

import argparse
import base64
import itertools
import json
import selectors
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import orjson  # what the MangoGram SDK uses, so the generator costs what a client does
import zmq

from mangogram_broker.openfiles import raise_open_file_limit

PAYLOAD = "x" * 100  # 100-byte texts
WINDOW_START = "window-start"
WINDOW_END = "window-end"
# Protocol version 3: one frame per message, signature + command + space + JSON body.
SIGNATURE = b"MGP03"
# Systems reached over plain TCP (or TLS) sockets rather than ZeroMQ.
PLAIN_SOCKET_SYSTEMS = ("thread-server", "prosody")
# Idle mode re-probes a client that is still not reachable only after this long (libzmq
# gives up a handshake after 30 s and reconnects).
IDLE_REPROBE_S = 30.0
XMPP_DOMAIN = "localhost"
XMPP_PASSWORD = "bench-password"  # every bench user's; registered by bench.prosody
# Prosody's certificate is self-signed by the bench, so nothing is verified; the
# traffic is encrypted all the same, which is what is measured.
TLS_CONTEXT = ssl.create_default_context()
TLS_CONTEXT.check_hostname = False
TLS_CONTEXT.verify_mode = ssl.CERT_NONE


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
    def __init__(
        self, context: zmq.Context, endpoint: str, name: str, server_key: str | None = None
    ) -> None:
        super().__init__(name)
        self.sock = context.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.ROUTING_ID, name.encode())
        self.sock.setsockopt(zmq.LINGER, 0)
        if server_key:  # limit-curve: each client with its own key pair, as MangoGram's
            public, secret = zmq.curve_keypair()
            self.sock.setsockopt(zmq.CURVE_SERVERKEY, server_key.encode())
            self.sock.setsockopt(zmq.CURVE_PUBLICKEY, public)
            self.sock.setsockopt(zmq.CURVE_SECRETKEY, secret)
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
        # Idle mode counts refused LOGINs here instead of stopping at the first one.
        self.refusals: list[str] | None = None
        self.sock.send(SIGNATURE + b"LOGIN " + orjson.dumps({"name": name}))

    def fileno_or_socket(self) -> object:
        return self.sock

    def send_text(self, to: Client, text: str) -> None:
        # Fixed width, so the ids grow as strings too, as the SDK's do (the broker's store
        # then knows a new id from a resend without a lookup).
        body = {"id": f"{next(self.ids):012d}", "to": to.name, "text": text, "sent_at": 0}
        self.sock.send(SIGNATURE + b"SEND " + orjson.dumps(body))

    def ping(self) -> None:
        self.sock.send(SIGNATURE + b"PING {}")

    def receive(self) -> list[str]:
        texts = []
        while True:
            try:
                frame = self.sock.recv(zmq.NOBLOCK)
            except zmq.Again:
                if texts:  # one cumulative receipt for everything this call took in
                    receipt = orjson.dumps({"seq": self.mark})
                    self.sock.send(SIGNATURE + b"RECEIPT " + receipt)
                return texts
            command, _, body = frame[len(SIGNATURE) :].partition(b" ")
            if command == b"DELIVER":
                message = orjson.loads(body)
                self.mark = max(self.mark, message["seq"])
                texts.append(message["text"])
            elif command == b"WELCOME":
                self.online = True
            elif command == b"ERROR":
                if not self.online and self.refusals is not None:
                    self.refusals.append(body.decode())  # a refused LOGIN is an answer too
                    continue
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


class XmppClient(Client):
    """A lean XMPP client on a raw socket: stream, STARTTLS, SASL PLAIN, resource bind and
    initial presence, done blocking at setup; then message stanzas out, and incoming ones
    counted by their closing tag without parsing XML (an XMPP library would measure
    itself rather than the server)."""

    STREAM = (
        "<?xml version='1.0'?><stream:stream to='{domain}' version='1.0'"
        " xmlns='jabber:client' xmlns:stream='http://etherx.jabber.org/streams'>"
    )
    CLOSING = b"</message>"

    def __init__(self, host: str, port: int, name: str, domain: str, password: str) -> None:
        super().__init__(name)
        self.domain = domain
        raw = socket.create_connection((host, port), timeout=60)
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock: socket.socket = raw
        self.buffer = b""
        self.open_stream()
        if b"starttls" not in self.until(b"</stream:features>"):
            raise SystemExit("the XMPP server offers no STARTTLS")
        self.sock.sendall(b"<starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>")
        self.until(b"<proceed")
        self.until(b">")  # the whole tag: TLS starts right after it
        self.buffer = b""
        self.sock = TLS_CONTEXT.wrap_socket(raw, server_hostname=domain)
        self.open_stream()
        self.until(b"</stream:features>")
        token = base64.b64encode(b"\0" + name.encode() + b"\0" + password.encode())
        self.sock.sendall(
            b"<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='PLAIN'>"
            + token
            + b"</auth>"
        )
        if b"<success" not in self.until(b"<success", b"<failure"):
            raise SystemExit(f"{name}: the XMPP server refused the login")
        self.buffer = b""
        self.open_stream()
        self.until(b"</stream:features>")
        self.sock.sendall(
            b"<iq type='set' id='bind'><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'>"
            b"<resource>bench</resource></bind></iq>"
        )
        self.until(b"</iq>")
        # Available: messages to the bare JID are delivered, not stored offline.
        self.sock.sendall(b"<presence/>")
        self.sock.setblocking(False)
        self.tail = self.buffer[-(len(self.CLOSING) - 1) :]
        self.ids = itertools.count(1)
        self.pending = self.buffer.count(self.CLOSING)

    def open_stream(self) -> None:
        self.sock.sendall(self.STREAM.format(domain=self.domain).encode())

    def until(self, *markers: bytes) -> bytes:
        """Read (blocking, with the socket's timeout) until one of the markers arrives;
        returns what came up to its end and keeps the rest."""
        while True:
            for marker in markers:
                at = self.buffer.find(marker)
                if at >= 0:
                    head = self.buffer[: at + len(marker)]
                    self.buffer = self.buffer[at + len(marker) :]
                    return head
            chunk = self.sock.recv(1 << 16)
            if not chunk:
                raise SystemExit(f"{self.name}: the XMPP server closed the stream")
            self.buffer += chunk

    def fileno_or_socket(self) -> object:
        return self.sock

    def send_text(self, to: Client, text: str) -> None:
        stanza = (
            f"<message to='{to.name}@{self.domain}' type='chat' id='{next(self.ids)}'>"
            f"<body>{text}</body></message>"
        )
        self.sock.setblocking(True)
        self.sock.sendall(stanza.encode())
        self.sock.setblocking(False)

    def receive(self) -> list[str]:
        count, self.pending = self.pending, 0
        while True:
            try:
                chunk = self.sock.recv(1 << 16)
            except (ssl.SSLWantReadError, BlockingIOError):
                break
            if not chunk:
                break
            # A closing tag split across reads is found in tail + chunk; the tail is
            # shorter than the tag, so no tag is counted twice.
            data = self.tail + chunk
            count += data.count(self.CLOSING)
            self.tail = data[-(len(self.CLOSING) - 1) :]
        return [PAYLOAD] * count


class Waiter:
    """Which clients may have input, at a cost that grows with the ready ones only.

    Polling every socket on every turn (zmq.Poller over 2,000 sockets at N = 1000) took
    a third of the generator's time, so it set the pace there. Instead each socket's
    file descriptor sits in one selector (epoll or kqueue) and only those that signal
    come back. A ZeroMQ socket's descriptor (ZMQ_FD) is edge-like: any call on the socket
    may consume the signal, so a zmq client that was just sent on is checked again by
    `ZMQ_EVENTS` on the next turn (`touched`). Plain TCP and TLS sockets are
    level-triggered and need no such care. Windows' select() takes at most 512
    descriptors, so there the old zmq.Poller stays.
    """

    def __init__(self, clients: list[Client], system: str) -> None:
        self.zmq = system not in PLAIN_SOCKET_SYSTEMS
        self.poller: zmq.Poller | None = None
        self.by_key: dict[object, Client] = {}
        self.recheck: dict[int, Client] = {}
        if self.zmq and sys.platform == "win32":
            self.poller = zmq.Poller()
            for client in clients:
                self.poller.register(client.fileno_or_socket(), zmq.POLLIN)  # type: ignore[arg-type]
                self.by_key[client.fileno_or_socket()] = client
            return
        self.selector = selectors.DefaultSelector()
        for client in clients:
            target = client.fileno_or_socket()
            fd = target.getsockopt(zmq.FD) if self.zmq else target  # type: ignore[attr-defined]
            self.selector.register(fd, selectors.EVENT_READ, client)  # type: ignore[arg-type]
        if self.zmq:  # whatever arrived before registration raised no edge we would see
            self.recheck = {id(c): c for c in clients}

    def touched(self, client: Client) -> None:
        """The client was sent on: its ZeroMQ signal may be gone, so look again."""
        if self.zmq:
            self.recheck[id(client)] = client

    def ready(self, timeout_ms: int) -> list[Client]:
        if self.poller is not None:
            return [self.by_key[s] for s, _ in self.poller.poll(timeout_ms)]
        timeout = 0 if self.recheck else timeout_ms / 1000
        found = {id(key.data): key.data for key, _ in self.selector.select(timeout)}
        if not self.zmq:
            return list(found.values())
        for key, client in self.recheck.items():
            # Reading ZMQ_EVENTS also resets the descriptor, so the next edge is seen.
            if key not in found and client.fileno_or_socket().getsockopt(zmq.EVENTS) & zmq.POLLIN:  # type: ignore[attr-defined]
                found[key] = client
        self.recheck = {}
        # Each of these is drained now and may send (a receipt): look again next turn.
        self.recheck.update(found)
        return list(found.values())


def source_endpoint(endpoint: str, source: str | None) -> str:
    """`endpoint` connected from the local address `source` (libzmq's
    `tcp://SOURCE:0;HOST:PORT` form; port 0 lets the kernel pick the source port). Each
    source address has its own ~28,000 ephemeral ports, so tens of thousands of
    connections to one server port need several (127.0.0.x on Linux)."""
    if not source:
        return endpoint
    scheme, _, rest = endpoint.partition("://")
    return f"{scheme}://{source}:0;{rest}"


def make_clients(args: argparse.Namespace, names: list[str]) -> list[Client]:
    if args.system == "thread-server":
        host, port = args.endpoint.rsplit(":", 1)
        return [ThreadServerClient(host, int(port), n) for n in names]
    if args.system == "prosody":
        host, port = args.endpoint.rsplit(":", 1)
        # Each login waits on several round trips and a password hash on the server:
        # a few at a time keep the server busy. Only the setup is threaded.
        with ThreadPoolExecutor(8) as pool:
            made = pool.map(
                lambda n: XmppClient(host, int(port), n, XMPP_DOMAIN, XMPP_PASSWORD), names
            )
            return list(made)
    context = zmq.Context.instance()
    context.set(zmq.MAX_SOCKETS, 50_000)
    endpoint = source_endpoint(args.endpoint, getattr(args, "source", None))
    if args.system in ("limit", "limit-curve"):
        return [LimitClient(context, endpoint, n, args.server_key) for n in names]
    # Several brokers of one cluster (comma-separated): the second half of the users (the
    # receivers, the round trip's second user) on the last, so each pair spans brokers.
    endpoints = endpoint.split(",")
    return [
        MangoClient(context, endpoints[i * len(endpoints) // len(names)], n, args.server_key)
        for i, n in enumerate(names)
    ]


def answered(client: Client) -> bool:
    """A MangoGram client whose LOGIN was answered: welcomed, or refused when refusals
    are counted (idle mode)."""
    return bool(client.online or client.refusals)  # type: ignore[attr-defined]


def wait_online(
    clients: list[Client], system: str, deadline: float, probe_every: float = 0.5
) -> None:
    """Every client must be reachable before the measurement starts: MangoGram clients
    wait for their LOGIN's answer (WELCOME; or ERROR where refusals are counted); the
    others send themselves a probe (their servers drop messages for peers they do not
    know yet, which would strand in-flight messages)."""
    if system == "mangogram":
        pending = list(clients)
        waiter = Waiter(pending, system)
        while pending:
            if time.monotonic() > deadline:
                raise SystemExit(f"{len(pending)} clients never logged in")
            for client in waiter.ready(100):
                client.receive()
            pending = [c for c in pending if not answered(c)]
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
                waiter.touched(clients[i])
            next_probe = time.monotonic() + probe_every
        for client in waiter.ready(50):
            if client.receive():
                pending_set.discard(index[id(client)])
    # late duplicate probes must not be counted as deliveries
    end = time.monotonic() + 0.6
    while time.monotonic() < end:
        for client in waiter.ready(50):
            client.receive()


def throughput_names(prefix: str, pairs: int) -> list[str]:
    """The users of a throughput run: the senders, then their receivers."""
    return [f"{prefix}s{i}" for i in range(pairs)] + [f"{prefix}r{i}" for i in range(pairs)]


def rtt_names(prefix: str) -> list[str]:
    return [f"{prefix}a", f"{prefix}b"]


def throughput(args: argparse.Namespace) -> dict[str, float]:
    names = throughput_names(args.prefix, args.pairs)
    clients = make_clients(args, names)
    senders, receivers = clients[: args.pairs], clients[args.pairs :]
    wait_online(clients, args.system, time.monotonic() + 120)
    partner = {id(r): i for i, r in enumerate(receivers)}
    outstanding = [0] * args.pairs
    waiter = Waiter(clients, args.system)
    refill = set(range(args.pairs))  # pairs below `inflight`: only they are visited
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
        for i in refill:
            sender = senders[i]
            while outstanding[i] < args.inflight:
                sender.send_text(receivers[i], PAYLOAD)
                outstanding[i] += 1
            waiter.touched(sender)
        refill.clear()
        for client in waiter.ready(10):
            texts = client.receive()
            if texts and id(client) in partner:
                pair = partner[id(client)]
                outstanding[pair] -= len(texts)
                refill.add(pair)
                if window_start <= time.monotonic() < window_end:
                    delivered += len(texts)
    print(WINDOW_END, flush=True)
    window_cpu = time.process_time() - (window_cpu_start or time.process_time())
    return {"delivered": delivered, "window_s": args.window, "cpu_s": window_cpu}


def rtt(args: argparse.Namespace) -> dict[str, object]:
    alice, bob = make_clients(args, rtt_names(args.prefix))
    wait_online([alice, bob], args.system, time.monotonic() + 60)
    waiter = Waiter([alice, bob], args.system)
    samples: list[float] = []
    deadline = time.monotonic() + args.window * 10
    for round_trip in range(args.count + args.count // 10):
        if time.monotonic() > deadline:
            break
        started = time.perf_counter()
        alice.send_text(bob, PAYLOAD)
        waiter.touched(alice)
        answered = False
        while not answered and time.monotonic() < deadline:
            for client in waiter.ready(100):
                for _text in client.receive():
                    if client is bob:
                        bob.send_text(alice, PAYLOAD)
                        waiter.touched(bob)
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
        waiter.touched(alice)
        answered = False
        while not answered and time.monotonic() < deadline:
            for client in waiter.ready(100):
                for _text in client.receive():
                    if client is bob:
                        bob.send_text(alice, PAYLOAD)
                        waiter.touched(bob)
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
    """Log `--clients` in and report, as one JSON line, the time it took and how each
    LOGIN was answered (MangoGram: `welcomed` and `refused`; the others: reachable,
    counted as welcomed); then hold the connections until stdin closes."""
    raise_open_file_limit()  # two descriptors a client here (its TCP socket, its mailbox)
    started = time.monotonic()
    clients = make_clients(args, [f"{args.prefix}i{i}" for i in range(args.clients)])
    mango = args.system == "mangogram"
    if mango:
        for client in clients:
            client.refusals = []  # type: ignore[attr-defined]
    # A ZeroMQ client's probe waits in its queue until its handshake is done, so one
    # probe is enough; probing every half second, as the throughput run does, piled up
    # hundreds per client in a storm of thousands of handshakes, and the server held them.
    wait_online(clients, args.system, started + args.deadline, probe_every=IDLE_REPROBE_S)
    refused = [c for c in clients if c.refusals] if mango else []  # type: ignore[attr-defined]
    report = {
        "connect_s": time.monotonic() - started,
        "clients": len(clients),
        "welcomed": len(clients) - len(refused),
        "refused": len(refused),
        "first_refusal": refused[0].refusals[0] if refused else None,  # type: ignore[attr-defined]
    }
    print(json.dumps(report), flush=True)
    sys.stdin.read()  # hold the connections until the orchestrator closes our stdin
    return {}


def main() -> None:
    parser = argparse.ArgumentParser(description="MangoGram benchmark load generator")
    systems = ["mangogram", "limit", "limit-curve", "thread-server", "prosody"]
    parser.add_argument("system", choices=systems)
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
    parser.add_argument(
        "--source", help="connect from this local address (idle mode; e.g. 127.0.0.2)"
    )
    parser.add_argument(
        "--deadline", type=float, default=300.0, help="seconds for idle clients to log in"
    )
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
