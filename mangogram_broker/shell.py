"""The broker's socket shell: one ROUTER socket, one thread, one poll loop.

It owns all I/O and calls the pure `BrokerCore`; nothing here decides routing. Each
loop turn drains up to `BATCH` messages, commits the store once (group commit), and only
then sends what the core returned: an acknowledgement never precedes its commit. The
turn's joins and leaves are told once, at its end (`BrokerCore.take_presence`), and a
turn admits LOGINs only up to a bound of work (`TURN_LOGIN_WORK`).
A socket monitor reports accepted and closed TCP connections, so a client that dies
(even kill -9) goes offline at once instead of after the heartbeat timeout; the
connection's file descriptor (ZMQ_SRCFD of its messages) ties a closed connection to its
routing ids (see connections.py for why a new peer is tied only after the monitor is read).

Framing (docs/protocol.md, section 3): the core is framing-agnostic (`codec.decode` reads
both); the shell answers each connection in the framing named by the last message it
sent that started with `MGP` (`codec.version_of`), version 3 until it has sent one.
Only version 2 connections are remembered (`_v2_peers`). Each message is encoded once per
framing its recipients speak.
"""

from __future__ import annotations

import ctypes
import logging
import secrets
import sys
from collections.abc import Callable

import zmq
from zmq.backend import Socket as SocketBase
from zmq.utils.monitor import parse_monitor_message

from mangogram_proto import codec
from mangogram_proto.constants import (
    FRAME_COUNT_V2,
    SIGNATURE,
    SIGNATURE_PREFIX,
    SIGNATURE_V2,
)
from mangogram_proto.keys import KeyPair
from mangogram_proto.messages import (
    Accepted,
    BrokerMessage,
    Deliver,
    HistoryPage,
    Login,
    Online,
    Receipt,
    Welcome,
)

from .authenticator import Authenticator
from .clock import Clock, system_clock
from .connections import ConnectionTable
from .core import BrokerCore, Outgoing, coalesce
from .crashpoints import CrashPoints
from .sendqueue import MAX_QUEUED_BYTES, SEND_QUEUE_PER_PEER, Queued, SendQueues

log = logging.getLogger(__name__)

# Messages handled per loop turn before housekeeping gets a look in. Large, so that a
# turn holds several messages per connection even with thousands connected and their
# acknowledgements merge; a saturated turn then takes a few hundred milliseconds.
BATCH = 8192
_LOGIN = Login.COMMAND.encode()
_RECEIPT = Receipt.COMMAND.encode()
# The same commands as the start of a version 3 frame.
_LOGIN_V3 = SIGNATURE + _LOGIN + b" "
_RECEIPT_V3 = SIGNATURE + _RECEIPT + b" "
_NOBLOCK_MORE = int(zmq.NOBLOCK) | int(zmq.SNDMORE)
_MORE = int(zmq.SNDMORE)
_NOBLOCK = int(zmq.NOBLOCK)
# libzmq's own numbers: on Windows Python's errno module has WinSock's.
_EAGAIN = int(zmq.EAGAIN)
_EHOSTUNREACH = int(zmq.EHOSTUNREACH)
TICK_MS = 100
# A turn stops handling messages once its big replies (HISTORY_PAGE, ONLINE) may hold
# this many bytes; the rest waits for the next turn. Replies are kept until the turn's
# commit, so without it a turn of 8,192 HISTORY requests would hold a gigabyte at once.
TURN_REPLY_BYTES = 16 * 2**20
# A turn admits LOGINs until what they make (WELCOME's online list, PRESENCE to the others;
# `BrokerCore.login_cost`) reaches this; later LOGINs, and whatever their connections sent
# after them, wait for the next turn while everyone else's messages are handled now. A
# login storm then costs a few tens of milliseconds per turn, not seconds.
TURN_LOGIN_WORK = 4096
_BIG_REPLIES = frozenset({HistoryPage, Online})  # by exact type: one lookup per reply


def _size_bound(message: HistoryPage | Online) -> int:
    """At least the encoded size of a big reply, without encoding it: four bytes per
    character covers UTF-8; a generous allowance per item covers the rest. (JSON escapes
    of control characters can take six, which the allowance absorbs in practice.)"""
    if isinstance(message, HistoryPage):
        return sum(4 * len(item.text) + 256 for item in message.items)
    return sum(4 * len(name) + 4 for name in message.users)


def unpredictable_routing_ids() -> None:
    """Seed the C library's rand(), which libzmq uses for the first routing id it
    generates. Unseeded, every broker starts at the same id, so a client could claim the
    next one in advance and libzmq aborts on the collision; seeded, it must guess among
    2**32. (libzmq offers no other way to refuse such ids; see docs/security.md.)

    glibc's rand() and random() share one state; macOS keeps them apart, so srand() is the
    one that counts there. On Windows rand()'s state is per thread in the C runtime
    libzmq was linked with: seeding the shared UCRT (ucrtbase) reaches it only if libzmq
    uses that runtime, so there this is best effort."""
    seed = secrets.randbits(31)
    try:
        if sys.platform == "win32":
            libc, seeders = ctypes.CDLL("ucrtbase"), ("srand",)
        else:
            libc, seeders = ctypes.CDLL(None), ("srand", "srandom")
        for name in seeders:
            getattr(libc, name)(seed)
    except (OSError, AttributeError, TypeError):
        log.debug("could not seed the C library's rand(); routing ids stay predictable")


class BrokerServer:
    """Binds the ROUTER socket and runs the loop until `stop()` is called."""

    def __init__(
        self,
        core: BrokerCore,
        bind: str,
        *,
        context: zmq.Context[zmq.Socket[bytes]] | None = None,
        clock: Callable[[], Clock] = system_clock,
        crash_points: CrashPoints | None = None,
        keys: KeyPair | None = None,
        key_bind: str | None = None,
        max_queued_bytes: int = MAX_QUEUED_BYTES,
    ) -> None:
        """`keys`: serve CurveZMQ with this key pair (None: plaintext, development only);
        `key_bind`: where to answer key-discovery requests (with `keys`);
        `max_queued_bytes`: what is held per connection beyond libzmq's queue."""
        self._crash = crash_points or CrashPoints(None)
        self._keys = keys
        self.core = core
        self._batch = core.store.turn_messages or BATCH
        core.hold_presence()  # told once per turn (`take_presence`), merged and net
        self._clock = clock
        self._context = context or zmq.Context.instance()
        self._stopping = False
        unpredictable_routing_ids()
        self._router = self._context.socket(zmq.ROUTER)
        self._router.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self._router.setsockopt(zmq.LINGER, 0)
        self._router.setsockopt(zmq.MAXMSGSIZE, core.limits.max_frame_bytes)
        # libzmq queues at most this many messages per peer (a count, not bytes); then
        # sends to it fail (EAGAIN) and the rest waits in `_queues`, bounded in bytes.
        self._router.setsockopt(zmq.SNDHWM, SEND_QUEUE_PER_PEER)
        self._auth: Authenticator | None = None
        self._logins = 0
        self._queues = SendQueues(max_queued_bytes)
        # Received messages a turn left for the next (see TURN_REPLY_BYTES).
        self._carried: list[tuple[zmq.Frame, list[bytes], int]] = []
        self.key_endpoint: str | None = None
        if keys is not None:
            # ZAP and key discovery on their own thread (authenticator.py); the handler
            # must exist before the first handshake, in this context.
            self._auth = Authenticator(self._context, keys, key_bind)
            self.key_endpoint = self._auth.key_endpoint
            self._router.setsockopt(zmq.CURVE_SERVER, 1)
            self._router.setsockopt(zmq.CURVE_SECRETKEY, keys.secret.encode("ascii"))
            self._router.setsockopt(zmq.CURVE_PUBLICKEY, keys.public.encode("ascii"))
        self._monitor = self._monitor_socket()
        try:
            self._router.bind(bind)
        except zmq.ZMQError:
            self.close()  # the authentication thread too
            raise
        self.endpoint: str = self._router.getsockopt_string(zmq.LAST_ENDPOINT)
        self._connections = ConnectionTable()
        # Peers whose last message claimed version 2 framing; everyone else gets version 3.
        self._v2_peers: set[bytes] = set()

    def _monitor_socket(self) -> zmq.Socket[bytes]:
        """The PAIR socket that reads the ROUTER's connection events. Unbounded: libzmq
        blocks its I/O thread on a full monitor pipe, and a connect storm during a long
        loop turn must not stall every connection's traffic."""
        address = f"inproc://mangogram-monitor-{id(self):x}"
        self._router.monitor(address, zmq.EVENT_ACCEPTED | zmq.EVENT_DISCONNECTED)
        monitor = self._context.socket(zmq.PAIR)
        monitor.setsockopt(zmq.RCVHWM, 0)
        monitor.setsockopt(zmq.LINGER, 0)
        monitor.connect(address)
        return monitor

    def stop(self) -> None:
        """Ask the loop to finish; safe to call from a signal handler."""
        self._stopping = True

    def serve_forever(self) -> None:
        """Run until `stop()`; then close the sockets."""
        poller = zmq.Poller()
        poller.register(self._router, zmq.POLLIN)
        poller.register(self._monitor, zmq.POLLIN)
        wakeup = self.core.cluster.wakeup()  # hints from other brokers are handled at once
        if wakeup is not None:
            poller.register(wakeup, zmq.POLLIN)
        next_expiry = self._clock().mono + TICK_MS
        try:
            while not self._stopping:
                ready = dict(poller.poll(self._poll_timeout_ms()))
                outgoing: list[Outgoing] = []
                if self._monitor in ready:
                    outgoing += self._drain_monitor()
                if self._router in ready or self._carried:
                    outgoing += self._drain_router()
                now = self._clock()
                if now.mono >= next_expiry:
                    outgoing += self.core.expire(now)
                    next_expiry = now.mono + TICK_MS
                outgoing += self.core.cluster_events(now)  # (a single broker has none)
                # Leaves found by the last turn's failed sends are told now, with this
                # turn's: never to a peer already known gone.
                outgoing += self.core.take_presence()
                self.core.store.commit()
                if self._queues:
                    outgoing += self._flush_backlogs(now)
                if outgoing:
                    # (A look at every message of the turn: only when the point is armed.)
                    if self._crash.armed("after_commit") and any(
                        isinstance(o.message, Accepted) for o in outgoing
                    ):
                        self._crash.reached("after_commit")
                    self._send_all(coalesce(outgoing), now)
                    self.core.store.commit()  # what send failures changed
                if self._auth is not None:
                    self._auth.turn_done(self._logins)  # as many new handshakes may go on
                    self._logins = 0
        finally:
            self.close()

    def _poll_timeout_ms(self) -> int:
        """Until the next housekeeping tick, or sooner when a backlog is due."""
        if self._carried or self.core.presence_pending:
            return 0
        due = self._queues.next_retry_ms() if self._queues else None
        if due is None:
            return TICK_MS
        return max(0, min(TICK_MS, due - self._clock().mono))

    def _flush_backlogs(self, now: Clock) -> list[Outgoing]:
        """Offer libzmq what slow readers' backlogs hold. A peer found gone is
        disconnected (its session ends; its mail waits in the store)."""
        gone: list[bytes] = []

        def send(queued: Queued) -> bool:
            error = self._send_frames(queued.peer, queued.frames)
            if error == _EHOSTUNREACH:
                self._queues.drop(queued.peer)
                gone.append(queued.peer)
            return error == 0

        self._queues.flush(send, now.mono)
        outgoing: list[Outgoing] = []
        for peer in gone:
            self._v2_peers.discard(peer)
            log.info("%s is gone; dropped what was queued for it", peer.hex())
            outgoing += self.core.disconnected(peer, now)
        return outgoing

    def close(self) -> None:
        if self._auth is not None:
            self._auth.stop()
        self._router.disable_monitor()
        self._monitor.close(linger=0)
        self._router.close(linger=0)

    def _drain_router(self) -> list[Outgoing]:
        recv = self._router.recv
        # What the last turn received but left, first: it arrived first.
        received, self._carried = self._carried, []
        for _ in range(self._batch - len(received)):
            try:
                first = recv(_NOBLOCK, copy=False)
            except zmq.Again:
                break
            received.append((first, *self._recv_rest(first)))
        # One time for the whole turn, read after the last message arrived (so none is
        # accepted before it was sent): what the turn accepts shares it, so its ACCEPTEDs
        # merge.
        now = self._clock()
        outgoing: list[Outgoing] = []
        known = self._connections.knows
        reply_bytes = 0
        login_work = 0
        # Connections with a LOGIN left for the next turn: the rest of what they sent
        # waits too, so each connection's messages keep their order.
        waiting: set[bytes] = set()
        carried = self._carried
        v2_peers = self._v2_peers
        for index, received_message in enumerate(received):
            if reply_bytes > TURN_REPLY_BYTES:
                # Big replies are held until the turn ends: stop making them here, send
                # these, and handle the rest next turn (each connection's own rate limits
                # do not bound what many connections ask for in one turn).
                carried += received[index:]
                break
            first, frames, extra = received_message
            peer = first.bytes
            # The framing this peer is answered in: the one its message names
            # (`codec.version_of`, written out here for the hot path).
            head = frames[0] if frames else b""
            if len(frames) == 1:
                command = (
                    _LOGIN
                    if head.startswith(_LOGIN_V3)
                    else _RECEIPT
                    if head.startswith(_RECEIPT_V3)
                    else b""
                )
                if head.startswith(SIGNATURE_V2):
                    v2_peers.add(peer)
                elif v2_peers and head.startswith(SIGNATURE_PREFIX):
                    v2_peers.discard(peer)
            else:
                command = frames[1] if len(frames) > 1 else b""
                if head.startswith(SIGNATURE):
                    if v2_peers:
                        v2_peers.discard(peer)
                elif head.startswith(SIGNATURE_PREFIX):
                    v2_peers.add(peer)
            if waiting and peer in waiting:
                carried.append(received_message)
                continue
            if command == _LOGIN:
                cost = self.core.login_cost()
                if login_work and login_work + cost > TURN_LOGIN_WORK:
                    waiting.add(peer)
                    carried.append(received_message)
                    continue
                login_work += cost
            if not known(peer):
                outgoing += self._note_connection(peer, first)
            if extra:
                log.info("dropped %d surplus frames from %s", extra, peer.hex())
            # The address only matters to LOGIN (registration limits): not read for the rest.
            user_key, address = self._credentials(first, with_address=command == _LOGIN)
            if command == _LOGIN:
                self._logins += 1  # admission of new handshakes follows (authenticator.py)
            if command == _RECEIPT:
                self._crash.reached("before_receipt")
            replies = self.core.handle_frames(peer, frames, now, user_key, address)
            for out in replies:
                if type(out.message) in _BIG_REPLIES:
                    reply_bytes += _size_bound(out.message)  # type: ignore[arg-type]
            outgoing += replies
        if waiting:
            log.debug("%d LOGINs wait for the next turn (login work per turn)", len(waiting))
        return outgoing

    def _credentials(self, frame: zmq.Frame, with_address: bool) -> tuple[str | None, str]:
        """The authenticated key (ZAP User-Id) a message came with, read from every
        message (never cached: identity must come from the connection that sent it), and
        its IP address if asked for."""
        user_key: str | None = None
        address = ""
        try:
            if self._keys is not None:
                user_key = str(frame.get("User-Id")) or None
            if with_address:
                address = str(frame.get("Peer-Address"))
        except zmq.ZMQError:
            pass  # no such property: fail closed on the key, no address for limits
        return user_key, address

    def _recv_rest(self, first: zmq.Frame) -> tuple[list[bytes], int]:
        # A hostile peer can send a million empty frames; keep only what could be valid.
        # Frame.more instead of getsockopt(RCVMORE): the latter builds an enum per call.
        frames: list[bytes] = []
        extra = 0
        recv = self._router.recv
        frame = first
        while frame.more:
            frame = recv(copy=False)
            if len(frames) <= FRAME_COUNT_V2:
                frames.append(frame.bytes)
            else:
                extra += 1
        return frames, extra

    def _note_connection(self, peer: bytes, frame: zmq.Frame) -> list[Outgoing]:
        """Tie a new peer to its connection, after reading every monitor event so far:
        its connection's ACCEPTED came before this message."""
        try:
            fd = int(frame.get(zmq.SRCFD))
        except zmq.ZMQError:
            return []
        outgoing = self._drain_monitor()
        if not self._connections.seen(peer, fd):
            # No close event will name it now: forget its framing here.
            self._v2_peers.discard(peer)
            log.debug("%s wrote from a connection that has closed since", peer.hex())
        return outgoing

    def _drain_monitor(self) -> list[Outgoing]:
        outgoing: list[Outgoing] = []
        while True:
            try:
                event = parse_monitor_message(self._monitor.recv_multipart(zmq.NOBLOCK))
            except zmq.Again:
                return outgoing
            fd = int(event["value"])
            if event["event"] == zmq.EVENT_ACCEPTED:
                gone = self._connections.accepted(fd)
            elif event["event"] == zmq.EVENT_DISCONNECTED:
                gone = self._connections.closed(fd)
            else:
                continue
            for peer in gone:
                self._queues.drop(peer)
                self._v2_peers.discard(peer)
                outgoing += self.core.disconnected(peer, self._clock())

    def _count_login_delivery(self, out: Outgoing, after_welcome: dict[bytes, int]) -> None:
        """Crash point `mid_login`: a WELCOME and one stored message sent, the rest not."""
        if isinstance(out.message, Welcome):
            after_welcome[out.peer] = 0
        elif out.peer in after_welcome and isinstance(out.message, Deliver):
            after_welcome[out.peer] += 1
            if after_welcome[out.peer] == 2:
                self._crash.reached("mid_login")

    def _send_frames(self, peer: bytes, frames: list[bytes]) -> int:
        """Hand one message to libzmq without waiting: 0, or EAGAIN (the peer's queue is
        full) or EHOSTUNREACH (no such peer)."""
        router = self._router
        send = SocketBase.send
        try:
            # Frame by frame with plain int flags, through the backend's send: the
            # sugar layer's enum flag arithmetic and draft-option checks showed up in
            # profiles. Only the first frame can fail; the rest follow.
            send(router, peer, _NOBLOCK_MORE)
            if len(frames) == 1:
                send(router, frames[0], 0)
            else:
                signature, command, body = frames
                send(router, signature, _MORE)
                send(router, command, _MORE)
                send(router, body, 0)
        except zmq.ZMQError as exc:
            if exc.errno != _EAGAIN and exc.errno != _EHOSTUNREACH:
                raise
            return exc.errno
        return 0

    @staticmethod
    def _encode(message: BrokerMessage, v2: bool, encoded: dict[int, list[bytes]]) -> list[bytes]:
        """`message` framed for a version 2 peer or a version 3 one, its body taken from
        the other framing's copy if there is one (the body is the same)."""
        other = encoded.get(id(message) if v2 else -id(message))
        if other is None:
            command, body = codec.encode_parts(message)
        elif v2:
            command, body = codec.split(other)
        else:
            command, body = other[1], other[2]
        return codec.frame(command, body, 2 if v2 else 3)

    def _send_all(self, outgoing: list[Outgoing], now: Clock, retry: bool = True) -> None:
        delivered_after_welcome: dict[bytes, int] = {}
        count_logins = self._crash.armed("mid_login")
        queues = self._queues
        backlogs = queues.waiting  # peers with a backlog: a plain lookup per message
        # One PRESENCE goes to many peers: encode each message object once per framing
        # (keys: the message's id, negated for version 2).
        encoded: dict[int, list[bytes]] = {}
        v2_peers = self._v2_peers
        # Peers found gone in this call, and how many messages were not sent to them.
        gone: set[bytes] = set()
        unsent = 0
        for out in outgoing:
            if gone and out.peer in gone:
                unsent += 1
                continue
            if count_logins:
                self._count_login_delivery(out, delivered_after_welcome)
            key = id(out.message)
            if v2_peers and out.peer in v2_peers:
                key = -key
            frames = encoded.get(key)
            if frames is None:
                frames = encoded[key] = self._encode(out.message, key < 0, encoded)
            if backlogs and out.peer in backlogs:
                # Behind what already waits for this peer, so the order holds.
                if queues.add(out, frames, now.mono):
                    continue
                error = _EAGAIN
            else:
                error = self._send_frames(out.peer, frames)
                if error == 0 or (error == _EAGAIN and queues.add(out, frames, now.mono)):
                    continue
            unreachable = error == _EHOSTUNREACH
            if unreachable:
                queues.drop(out.peer)
                gone.add(out.peer)
                unsent += 1
                log.debug("could not send %s to %s: gone", out.message.COMMAND, out.peer.hex())
            else:
                log.debug(
                    "dropped %s for %s: %d bytes already wait for it",
                    out.message.COMMAND,
                    out.peer.hex(),
                    queues.queued_bytes(out.peer),
                )
            follow_up = self.core.send_failed(out, unreachable, now)
            if retry:
                self._send_all(follow_up, now, retry=False)
        if gone:
            self._v2_peers.difference_update(gone)
            # Once per turn: a storm of departures would otherwise log a line per message.
            log.warning("could not send %d messages to %d peers that are gone", unsent, len(gone))
