"""A socket-free network: the broker core wired to N client sessions (h11's
ConnectionPair idea), with a hand-driven clock."""

from __future__ import annotations

from dataclasses import dataclass, field

from mangogram_broker.clock import Clock
from mangogram_broker.core import BrokerCore, Outgoing, coalesce
from mangogram_broker.store import MemoryStore, Store
from mangogram_proto import codec
from mangogram_proto.events import Event, IncomingMessage
from mangogram_proto.messages import Limits
from mangogram_proto.session import ClientSession

T0 = 1_700_000_000_000
MONO0 = 5_000  # a monotonic clock has its own origin, unrelated to the wall clock

TEST_LIMITS = Limits(
    max_name_chars=32,
    max_text_chars=100,
    max_text_bytes=200,
    max_body_bytes=1000,
    max_frame_bytes=4096,
    heartbeat_interval_ms=1000,
    heartbeat_timeout_ms=3000,
    rate_per_second=5,
    rate_burst=10,
    max_mailbox=20,
    max_history_page=5,
)


@dataclass
class FakeClient:
    peer: bytes
    session: ClientSession
    events: list[Event] = field(default_factory=list)
    connected: bool = True
    frozen: bool = False
    # The fake application finishes with each incoming message as it arrives; with
    # False the test confirms by hand (session.confirm).
    auto_confirm: bool = True

    def take(self, kind: type) -> list:
        """Remove and return the events of one kind."""
        found = [e for e in self.events if isinstance(e, kind)]
        self.events = [e for e in self.events if not isinstance(e, kind)]
        return found


class Network:
    """Moves frames between the broker core and client sessions until all is quiet.

    `now` is the wall clock (what the client sessions and timestamps see), `mono` the
    broker's monotonic clock. Time passing moves both (`advance`, or `now += ms`);
    `step_wall` sets the wall clock alone, as an operator or NTP would."""

    def __init__(self, limits: Limits = TEST_LIMITS, store: Store | None = None) -> None:
        self._wall = T0
        self.mono = MONO0
        self.tokens = iter(f"token-{i}" for i in range(10**6))
        self.store = store if store is not None else MemoryStore()
        self.core = BrokerCore(limits, store=self.store, token_factory=lambda: next(self.tokens))
        self.clients: dict[bytes, FakeClient] = {}
        self._next_peer = 1
        self.raw_replies: dict[bytes, list[list[bytes]]] = {}

    @property
    def now(self) -> int:
        return self._wall

    @now.setter
    def now(self, wall: int) -> None:
        self.mono += wall - self._wall
        self._wall = wall

    @property
    def clock(self) -> Clock:
        """Both clocks, as the broker's shell reads them."""
        return Clock(self._wall, self.mono)

    def new_peer(self) -> bytes:
        peer = b"\x00" + self._next_peer.to_bytes(4, "big")
        self._next_peer += 1
        return peer

    def join(self, name: str, *, auto_confirm: bool = True) -> FakeClient:
        """A new connection whose session logs in as `name`."""
        client = FakeClient(self.new_peer(), ClientSession(name), auto_confirm=auto_confirm)
        self.clients[client.peer] = client
        client.session.connect(self.now)
        self.pump()
        return client

    def raw(self, peer: bytes, frames: list[bytes]) -> list[Outgoing]:
        """Send raw frames as `peer`; returns what the broker said to that peer, and
        routes everything else."""
        out = self.core.handle_frames(peer, frames, self.clock)
        self.route(out)
        self.pump()
        return [o for o in out if o.peer == peer]

    def restart_broker(self) -> None:
        """The broker process dies and starts again on the same store: sessions are gone."""
        self.core = BrokerCore(
            self.core.limits, store=self.store, token_factory=lambda: next(self.tokens)
        )

    def route(self, outgoing: list[Outgoing]) -> None:
        self.store.commit()  # as the shell does: nothing goes out before its commit
        for out in coalesce(outgoing):
            client = self.clients.get(out.peer)
            if client is None or not client.connected:
                self.raw_replies.setdefault(out.peer, []).append(codec.encode(out.message))
                continue
            events = client.session.receive(codec.encode(out.message), self.now)
            client.events += events
            if client.auto_confirm:
                for event in events:
                    if isinstance(event, IncomingMessage):
                        client.session.confirm(event.seq, self.now)

    def pump(self, rounds: int = 100) -> None:
        for _ in range(rounds):
            busy = False
            for client in list(self.clients.values()):
                if not client.connected:
                    client.session.data_to_send()
                    continue
                for frames in client.session.data_to_send():
                    busy = True
                    self.route(self.core.handle_frames(client.peer, frames, self.clock))
            if not busy:
                return
        raise AssertionError("network did not settle")

    def advance(self, ms: int, *, tick_clients: bool = True) -> None:
        """Move the clock; run broker expiry and (optionally) client timers."""
        self.now += ms
        self.route(self.core.expire(self.clock))
        if tick_clients:
            for client in self.clients.values():
                if not client.frozen:
                    client.events += client.session.tick(self.now)
        self.pump()

    def step_wall(self, ms: int) -> None:
        """The machine's wall clock is set `ms` forward (or back, if negative); the
        monotonic clock does not move. The broker's expiry runs, client timers do not."""
        self._wall += ms
        self.route(self.core.expire(self.clock))
        self.pump()

    def disconnect(self, client: FakeClient) -> None:
        """The client's TCP connection closes (as when its process is killed)."""
        client.connected = False
        self.route(self.core.disconnected(client.peer, self.clock))
        self.pump()

    def reconnect(self, client: FakeClient) -> None:
        """The client opens a fresh connection (new routing id) and logs in again."""
        del self.clients[client.peer]
        client.peer = self.new_peer()
        client.connected = True
        self.clients[client.peer] = client
        client.session.connect(self.now)
        self.pump()
