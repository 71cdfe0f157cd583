"""The asyncio driver of a `ClientSession`: one task owns the DEALER socket.

`Bot` and the console client are built on it. Events come out of `events`, an
asyncio queue, in order; the loop never waits for the consumer. The consumer calls
`confirm(message)` for each `IncomingMessage` it has finished with: nothing else is
confirmed to the broker, so what is still in the queue when the process ends comes again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterable
from pathlib import Path

import zmq
import zmq.asyncio
from zmq.utils.monitor import parse_monitor_message

from .backoff import Backoff
from .constants import DEFAULT_ENDPOINT
from .endpoints import EndpointRing
from .errors import RemoteProtocolError
from .events import ConnectionLost, Event, IncomingMessage, LoggedIn, LoginRefused
from .keys import (
    KeyPair,
    Security,
    SecurityRequest,
    ServerKeyError,
    TrustPrompt,
    handshake_failure_message,
)
from .session import ClientSession, State
from .transport import (
    WATCHED_EVENTS,
    HandshakeWatch,
    close_with_monitor,
    configure_dealer,
    wall_clock_ms,
)

log = logging.getLogger(__name__)


class AsyncConnection:
    """A session with a broker, kept alive by `run()` until `stop()` or a refused login.

    Args:
        name: the name to log in with.
        endpoint: the broker's ZeroMQ endpoint; for a cluster (docs/cluster.md), several
            separated by commas: each reconnection after a lost connection tries the next
            one (`mangogram_proto.endpoints`), resuming the session there. `endpoint`
            always names the one in use.
    """

    def __init__(
        self,
        name: str,
        endpoint: str = DEFAULT_ENDPOINT,
        *,
        backoff: Backoff | None = None,
        server_key: str | None = None,
        identity: KeyPair | Path | None = None,
        plaintext: bool | None = None,
        trust_new_server: TrustPrompt | None = None,
        takeover: bool = False,
    ) -> None:
        # A cluster's brokers share one key pair: the security resolved for the first
        # endpoint holds for all of them.
        self._ring = EndpointRing(endpoint)
        self._security_request = SecurityRequest(server_key, identity, plaintext, trust_new_server)
        self.security: Security | None = None
        # Set when the connection gave up for good: the broker's key is not the expected one.
        self.failure: ServerKeyError | None = None
        self._monitor: zmq.asyncio.Socket | None = None
        self._watch = HandshakeWatch()
        self.session = ClientSession(name, takeover=takeover)
        self.events: asyncio.Queue[Event] = asyncio.Queue()
        self.refused: LoginRefused | None = None
        self.reconnecting = False
        self._backoff = backoff or Backoff()
        self._socket: zmq.asyncio.Socket | None = None
        self._wakeup = asyncio.Event()
        self._stopping = False
        self._drain_until: int | None = None
        self._reconnect_at: int | None = None

    @property
    def endpoint(self) -> str:
        """The broker endpoint in use (or being tried) now."""
        return self._ring.current

    @property
    def endpoints(self) -> tuple[str, ...]:
        """Every endpoint this connection may use, in the order it tries them."""
        return self._ring.endpoints

    @property
    def state(self) -> State:
        return self.session.state

    def send_text(self, to: str, text: str) -> str:
        """Queue a message to `to`; returns its id. Sent now if online, else after login."""
        message_id = self.session.send_text(to, text, wall_clock_ms())
        self._wakeup.set()
        return message_id

    def confirm(self, message: IncomingMessage, after: Iterable[str] = ()) -> None:
        """Say that the application is done with `message` (shown, stored, answered).
        Only confirmed messages are confirmed to the broker; the others come again at
        the next login, also after the process died. With `after` (ids of texts sent
        for it, such as a reply), the broker hears of it only once those texts are
        accepted or refused for good."""
        self.session.confirm(message.seq, wall_clock_ms(), after=after)
        self._wakeup.set()

    def request_online(self) -> str:
        """Ask who is online; the answer arrives as an `OnlineUsers` event. Returns the
        request's id: refused (rate limited) it is asked again after `retry_after_ms`,
        and only a refusal the session gives up on arrives, as `BrokerError` with this
        id as `ref`."""
        request_id = self.session.request_online(wall_clock_ms())
        self._wakeup.set()
        return request_id

    def lookup_name(self, name: str) -> str:
        """Ask whether `name` is registered; the answer arrives as a `NameStatus` event
        (from a broker older than LOOKUP, a `BrokerError` `unknown_command`). Returns the
        request's id (retried as for `request_online`)."""
        request_id = self.session.lookup_name(name, wall_clock_ms())
        self._wakeup.set()
        return request_id

    def mark_read(self, broker_id: str) -> None:
        """Tell the sender of message `broker_id` that our user has seen it."""
        self.session.mark_read(broker_id, wall_clock_ms())
        self._wakeup.set()

    def request_history(self, peer: str, limit: int, before: str | None = None) -> str:
        """Ask for a page of the conversation with `peer`; it arrives as `HistoryReceived`.
        Returns the request's id (retried as for `request_online`)."""
        request_id = self.session.request_history(peer, limit, before, wall_clock_ms())
        self._wakeup.set()
        return request_id

    def stop(self, *, drain: float = 0.0) -> None:
        """Leave the broker (waiting up to 1 s for GOODBYE) and make `run()` return.

        With `drain`, texts still in the outbox get up to that many seconds to be
        accepted (or refused) before the LEAVE; a later call can only shorten that."""
        until = wall_clock_ms() + int(drain * 1000)
        self._drain_until = until if self._drain_until is None else min(self._drain_until, until)
        self._stopping = True
        self._wakeup.set()

    async def run(self) -> None:
        """Connect, log in and keep the session alive until `stop()`, a refused login
        (also `taken_over`: the name signed in elsewhere; `refused` says which), or a
        broker whose key is not the expected one (then `failure` says why). Refusals
        of a text worth retrying are retried by the session, in order (see
        `ClientSession`): `rate_limited` and `unavailable` for as long as it lives,
        others (`internal`) until a `MessageFailed` reports the final one.

        Raises:
            ServerKeyError: the broker's key could not be learned at all.
            KeyFileError: our identity file is broken or readable by others.
        """
        context = zmq.asyncio.Context.instance()
        # Learning a new server's key is a blocking round trip: keep it off the loop.
        # Resolved for the first endpoint (its pinned key), whichever is in use now.
        first = self._ring.endpoints[0]
        self.security = await asyncio.to_thread(self._security_request.resolve, first)
        try:
            await self._serve(context)
        except ServerKeyError as exc:
            self.failure = exc
            self.session.state = State.CLOSED
            self.events.put_nowait(LoginRefused("server_key", str(exc)))
        finally:
            self._close_socket()

    def _close_socket(self) -> None:
        close_with_monitor(self._socket, self._monitor)
        self._socket = None
        self._monitor = None

    async def _check_handshakes(self) -> None:
        assert self._monitor is not None
        while await self._monitor.poll(0):
            event = parse_monitor_message(await self._monitor.recv_multipart())["event"]
            if self._watch.note(int(event)):
                raise ServerKeyError(
                    handshake_failure_message(
                        self.endpoint, self.security, self._watch.last_failure
                    )
                )

    async def _serve(self, context: zmq.asyncio.Context) -> None:
        self._open(context)
        leave_deadline: int | None = None
        while True:
            now = wall_clock_ms()
            if self._stopping and leave_deadline is None and self._drained(now):
                self.session.leave(now)
                leave_deadline = now + 1000
            if self.session.state is State.CLOSED or (
                leave_deadline is not None and now >= leave_deadline
            ):
                return
            if self._reconnect_at is not None and now >= self._reconnect_at:
                log.info("reconnecting to %s", self._ring.advance())
                self._open(context)
            for event in self.session.tick(now):
                self._handle(event, now)
            await self._flush()
            wait_ms = self._wait_ms(now, leave_deadline)
            if self._socket is None or self._monitor is None:
                await self._sleep_or_wake(wait_ms)
                continue
            poller = zmq.asyncio.Poller()
            poller.register(self._socket, zmq.POLLIN)
            poller.register(self._monitor, zmq.POLLIN)
            poll = asyncio.ensure_future(poller.poll(wait_ms))
            woken = asyncio.ensure_future(self._wakeup.wait())
            await asyncio.wait({poll, woken}, return_when=asyncio.FIRST_COMPLETED)
            woken.cancel()
            self._wakeup.clear()
            if not poll.done():
                poll.cancel()
                continue
            ready = dict(poll.result())
            if self._monitor in ready:
                await self._check_handshakes()
            if self._socket in ready:
                await self._drain()

    async def _sleep_or_wake(self, wait_ms: int) -> None:
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._wakeup.wait(), wait_ms / 1000)
        self._wakeup.clear()

    def _drained(self, now: int) -> bool:
        """May a stopping connection leave: outbox answered, or no time left for it?"""
        return not self.session.outbox_size or now >= (self._drain_until or 0)

    def _wait_ms(self, now: int, leave_deadline: int | None) -> int:
        candidates = [1000]
        drain = self._drain_until if leave_deadline is None else None
        for deadline in (self.session.next_deadline(), self._reconnect_at, leave_deadline, drain):
            if deadline is not None:
                candidates.append(max(0, deadline - now + 1))
        return min(candidates)

    def _open(self, context: zmq.asyncio.Context) -> None:
        socket = context.socket(zmq.DEALER)
        self._monitor = socket.get_monitor_socket(WATCHED_EVENTS)
        self._socket = configure_dealer(socket, self.endpoint, self.security)
        self._reconnect_at = None
        self.session.connect(wall_clock_ms())

    async def _flush(self) -> None:
        if self._socket is None:
            return
        for frames in self.session.data_to_send():
            try:
                await self._socket.send_multipart(frames, flags=zmq.NOBLOCK)
            except zmq.Again:
                # Texts stay in the session's outbox and go out again after a reconnect.
                log.debug("send queue full; dropped one message: %r", frames[0][:40])

    async def _drain(self) -> None:
        while self._socket is not None:
            try:
                frames = await self._socket.recv_multipart(flags=zmq.NOBLOCK)
            except zmq.Again:
                break
            now = wall_clock_ms()
            try:
                events = self.session.receive(frames, now)
            except RemoteProtocolError as exc:
                log.warning("ignoring invalid message from the broker: %s", exc.message)
                continue
            for event in events:
                self._handle(event, now)

    def _handle(self, event: Event, now: int) -> None:
        if isinstance(event, LoginRefused):
            self.refused = event
        elif isinstance(event, LoggedIn):
            self._backoff.reset()
            self.reconnecting = False
        elif isinstance(event, ConnectionLost):
            delay = self._backoff.next_delay_ms()
            log.info("%s; reconnecting in %d ms", event.reason, delay)
            self.reconnecting = True
            self._close_socket()
            self._reconnect_at = now + delay
        self.events.put_nowait(event)
