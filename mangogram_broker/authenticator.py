"""CurveZMQ admission on its own thread: the ZAP handler and key discovery.

Theory of operation
-------------------
* libzmq holds each CurveZMQ handshake until the ZAP handler answers for it (RFC 27).
  The handler lives here, on a thread of its own with its own sockets, so handshakes and
  key-discovery requests never wait for a busy routing turn. The routing thread keeps
  the ROUTER; each socket is used by one thread only.
* The handler needs nothing from the routing state: it admits every client that completes
  the handshake and libzmq stamps the client's key (ZAP User-Id) on its messages. Which
  key may use which name, and how many new names an address may register, is decided by
  the core at LOGIN, on the routing thread. No state is shared, so there are no locks.
* Admission is paced by the routing thread, by message passing over an inproc PAIR. A
  handshake cannot send its LOGIN before it is admitted, and every LOGIN costs the routing
  thread work (its WELCOME, its PRESENCE to the others): a storm of a thousand LOGINs in
  one loop turn makes a turn of seconds, and everyone's messages wait for it. So at most
  `ADMIT_AHEAD` admitted handshakes may be waiting for their LOGIN to be handled: after
  each loop turn that handled LOGINs, the routing thread reports how many (`turn_done`),
  and as many new handshakes are admitted. A storm then reaches the routing thread a few
  LOGINs per turn, between everyone else's messages. An admitted client that never sends
  LOGIN stops counting after `ADMISSION_TIMEOUT_S`. (A handshake that waits longer than
  libzmq's handshake interval, 30 s, is dropped; the client reconnects.)
* Waiting handshakes are admitted in turns by IP address (`FairQueue`): handshakes that
  never log in hold a slot until the timeout, and one address opening them by the
  hundred must not starve everyone else's. One that has waited `MAX_WAIT_S` is admitted
  at once: pacing must never make a handshake time out (the client would take it for a
  wrong server key), so a storm larger than the loop can take in that time is let in.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from typing import Any

import zmq

from mangogram_proto.keys import KeyPair

from .security import ZAP_ENDPOINT, key_reply, zap_reply

log = logging.getLogger(__name__)

# Admitted handshakes whose LOGIN the routing thread has not handled yet. With a few
# hundred users online a LOGIN costs the routing thread several milliseconds, so this
# bounds a turn's LOGIN work to a few tenths of a second; see python -m bench --storm-only.
ADMIT_AHEAD = 8
ADMISSION_TIMEOUT_S = 2.0
# A handshake waits for admission at most this long (libzmq drops one after 30 s).
MAX_WAIT_S = 10.0
KEY_REQUESTS_PER_WAKE = 2048
STOP = b"S"  # a report of LOGINs is four bytes
STOP_TIMEOUT_S = 5.0


class AdmissionGate:
    """The pacing rule, pure (the clock is passed in): at most `ahead` admitted handshakes
    wait for their LOGIN to be handled, each for at most `timeout_s`."""

    def __init__(self, ahead: int = ADMIT_AHEAD, timeout_s: float = ADMISSION_TIMEOUT_S) -> None:
        self._ahead = ahead
        self._timeout_s = timeout_s
        self._admitted: deque[float] = deque()  # when each admission was made, oldest first

    def admit(self, now: float) -> bool:
        """Whether a handshake may be admitted now; if so, it is counted."""
        while self._admitted and self._admitted[0] + self._timeout_s <= now:
            self._admitted.popleft()
        if len(self._admitted) >= self._ahead:
            return False
        self._admitted.append(now)
        return True

    def logged_in(self, count: int) -> None:
        """The routing thread handled `count` LOGINs: their admissions are done."""
        for _ in range(min(count, len(self._admitted))):
            self._admitted.popleft()

    def wait_s(self, now: float) -> float | None:
        """How long until a counted admission times out (None: none is counted)."""
        if not self._admitted:
            return None
        return max(0.0, self._admitted[0] + self._timeout_s - now)


class FairQueue:
    """Waiting handshakes, taken in turns by address (round robin), so that one address
    flooding handshakes that never log in holds only its share of the admissions; and
    oldest first once one has waited `max_wait_s`, so that pacing never makes a handshake
    overrun libzmq's handshake interval (a client would see a failed handshake). Pure:
    the clock is passed in."""

    def __init__(self, max_wait_s: float = MAX_WAIT_S) -> None:
        self._max_wait_s = max_wait_s
        # Entries are [request, taken]; each address's in arrival order, addresses in turn
        # order. `_arrivals` holds every entry in arrival order, taken ones dropped lazily.
        self._by_address: dict[bytes, deque[list[Any]]] = {}
        self._arrivals: deque[tuple[float, bytes, list[Any]]] = deque()
        self._count = 0

    def __len__(self) -> int:
        return self._count

    def put(self, address: bytes, request: list[bytes], now: float) -> None:
        entry: list[Any] = [request, False]
        self._by_address.setdefault(address, deque()).append(entry)
        self._arrivals.append((now, address, entry))
        self._count += 1

    def take(self) -> list[bytes]:
        """The next request in turn; the queue must not be empty."""
        address = next(iter(self._by_address))
        return self._take_from(address)

    def take_overdue(self, now: float) -> list[list[bytes]]:
        """Every request that has waited `max_wait_s` or more, oldest first."""
        overdue = []
        while self._arrivals:
            arrived, address, entry = self._arrivals[0]
            if entry[1]:
                self._arrivals.popleft()
            elif arrived + self._max_wait_s <= now:
                # The oldest waiting request is the first of its address's.
                overdue.append(self._take_from(address))
            else:
                break
        return overdue

    def overdue_in_s(self, now: float) -> float | None:
        """How long until the oldest waiting request is overdue (None: nothing waits)."""
        while self._arrivals and self._arrivals[0][2][1]:
            self._arrivals.popleft()
        if not self._arrivals:
            return None
        return max(0.0, self._arrivals[0][0] + self._max_wait_s - now)

    def _take_from(self, address: bytes) -> list[bytes]:
        waiting = self._by_address.pop(address)
        entry = waiting.popleft()
        entry[1] = True
        if waiting:
            self._by_address[address] = waiting  # to the back of the line
        self._count -= 1
        request: list[bytes] = entry[0]
        return request


class Authenticator:
    """The ZAP handler and the key-discovery socket, served by a thread of their own.

    Created (and its sockets bound) by the routing thread before the ROUTER binds, so the
    handler exists before the first handshake. The routing thread then calls
    `turn_done(logins)` after each loop turn, and `stop()` at the end.
    """

    def __init__(
        self,
        context: zmq.Context[zmq.Socket[bytes]],
        keys: KeyPair,
        key_bind: str | None,
        gate: AdmissionGate | None = None,
        max_wait_s: float = MAX_WAIT_S,
    ) -> None:
        self._public = keys.public
        self._gate = gate or AdmissionGate()  # the authentication thread's from here on
        self._max_wait_s = max_wait_s
        # ROUTER, not REP: requests can wait for admission while others are read.
        self._zap = context.socket(zmq.ROUTER)
        self._zap.setsockopt(zmq.LINGER, 0)
        self._zap.bind(ZAP_ENDPOINT)
        self._key_socket: zmq.Socket[bytes] | None = None
        self.key_endpoint: str | None = None
        if key_bind is not None:
            self._key_socket = context.socket(zmq.ROUTER)
            self._key_socket.setsockopt(zmq.LINGER, 0)
            self._key_socket.setsockopt(zmq.MAXMSGSIZE, 256)
            self._key_socket.bind(key_bind)
            self.key_endpoint = self._key_socket.getsockopt_string(zmq.LAST_ENDPOINT)
        address = f"inproc://mangogram-admission-{id(self):x}"
        self._thread_end = context.socket(zmq.PAIR)
        self._thread_end.setsockopt(zmq.LINGER, 0)
        self._thread_end.bind(address)
        # The routing thread's end of the channel: only that thread touches it.
        self._channel = context.socket(zmq.PAIR)
        self._channel.setsockopt(zmq.LINGER, 0)
        self._channel.connect(address)
        self._thread = threading.Thread(target=self._run, name="mangogram-auth", daemon=True)
        self._thread.start()

    # The routing thread's side

    def turn_done(self, logins: int) -> None:
        """Report the LOGINs the loop turn handled: as many more handshakes may go on."""
        if logins:
            try:
                self._channel.send(logins.to_bytes(4, "big"), zmq.NOBLOCK)
            except zmq.Again:  # the thread is far behind (or gone): never block the loop
                log.warning("the authentication thread is not reading; admissions wait")

    def stop(self) -> None:
        """Stop the thread (it closes its sockets) and close the channel."""
        if self._thread.is_alive():
            self._channel.send(STOP)
            self._thread.join(STOP_TIMEOUT_S)
            if self._thread.is_alive():
                log.error("the authentication thread did not stop")
        self._channel.close(linger=0)

    # The authentication thread

    def _run(self) -> None:
        try:
            self._serve()
        except Exception:  # a dead handler would hold every handshake: say so loudly
            log.exception("the authentication thread failed")
        finally:
            for socket in (self._zap, self._key_socket, self._thread_end):
                if socket is not None:
                    socket.close(linger=0)

    def _serve(self) -> None:
        poller = zmq.Poller()
        for socket in (self._zap, self._key_socket, self._thread_end):
            if socket is not None:
                poller.register(socket, zmq.POLLIN)
        waiting = FairQueue(self._max_wait_s)
        gate = self._gate
        while True:
            timeout: int | None = None
            if waiting:  # wake when an admission stops counting or a request is overdue
                now = time.monotonic()
                waits = (gate.wait_s(now), waiting.overdue_in_s(now))
                timeout = int(min(w for w in waits if w is not None) * 1000) + 1
            ready = dict(poller.poll(timeout))
            if self._thread_end in ready:
                while True:
                    try:
                        message = self._thread_end.recv(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    if message == STOP:
                        return
                    gate.logged_in(int.from_bytes(message, "big"))
            if self._zap in ready:
                while True:
                    try:
                        request = self._zap.recv_multipart(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    # [routing id, b"", version, request id, domain, address, ...]
                    address = request[5] if len(request) > 5 else b""
                    waiting.put(address, request, time.monotonic())
            if self._key_socket is not None and self._key_socket in ready:
                self._answer_key_requests(self._key_socket)
            now = time.monotonic()
            for overdue in waiting.take_overdue(now):
                gate.admit(now)  # counted when there is room; admitted anyway
                self._admit(overdue)
            while waiting and gate.admit(now):
                self._admit(waiting.take())

    def _admit(self, request: list[bytes]) -> None:
        # [routing id, empty delimiter, ZAP request...]: libzmq sends it as a REQ would.
        if len(request) < 3 or request[1] != b"":
            log.warning("malformed ZAP envelope")
            return
        self._zap.send_multipart([*request[:2], *zap_reply(request[2:])])

    def _answer_key_requests(self, socket: zmq.Socket[bytes]) -> None:
        for _ in range(KEY_REQUESTS_PER_WAKE):
            try:
                request = socket.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            reply = key_reply(request, self._public)
            if reply is not None:
                try:
                    socket.send_multipart(reply, flags=zmq.NOBLOCK)
                except zmq.Again:
                    log.debug("key request dropped: the asker is not reading")
