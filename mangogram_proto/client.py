"""A blocking client for scripts and simple bots.

Example:
    with Client("echo-bot", endpoint="tcp://127.0.0.1:5555") as client:
        for message in client.messages():
            client.send(message.sender, message.text)

Confirming: a message is confirmed to the broker (RECEIPT) only once you are done with
it, so a process that dies while handling one gets it again at its next login. A message
returned by `receive()` (or yielded by `messages()`) counts as done when you ask for the
next one, call `confirm()`, or close the client (`close()`, or leaving the `with` block
without an exception). Until then it and everything after it in your stream stay
unconfirmed. Messages you only see through `next_event()` are confirmed by
`confirm(message)`.

The client does its network work (heartbeats, reconnects, receipts) only while one of
its methods runs, so a script that stays away for longer than the heartbeat timeout is
logged out by the broker; the next call notices and logs in again by itself. Given
several endpoints of a cluster ("tcp://a:5555,tcp://b:5555"), each reconnection goes to
the next one (`mangogram_proto.endpoints`), resuming the session there.

Refusals: a text the broker refuses for now stays queued and goes again, ahead of later
texts and with its id, after the broker's `retry_after_ms` or a short backoff. For
`rate_limited` and `unavailable` (flow control) that goes on for as long as the session
lives: texts are slow, never lost or reordered, for being sent fast; another such code
(`internal`) fails the text after 4 attempts. `online_users()`, `history()` and
`is_registered()` asked faster than the broker allows are asked again the same way (up
to 4 times).

Taken over: when the name signs in elsewhere with `takeover` (another window, same
key), the broker says so (`taken_over`); from then on every call that waits on the
network raises `BrokerRefused` with that code, and the client does not reconnect.

Closing: `send(..., wait=False)` only queues a text. `close()` (and leaving a `with`
block) first waits, up to its `timeout` (10 s by default), until the broker has accepted
or refused for good every queued text (refusals are logged), and only then leaves. Texts
still unanswered after that raise `UnsentMessagesError` naming their ids, once the client
is closed; when the `with` block already ends with an exception, they are logged instead,
so that exception is not hidden.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import zmq
from zmq.utils.monitor import parse_monitor_message

from .backoff import Backoff
from .constants import DEFAULT_ENDPOINT
from .endpoints import EndpointRing
from .errors import BrokerRefused, ErrorCode, RemoteProtocolError, UnsentMessagesError
from .events import (
    BrokerError,
    ConnectionLost,
    Event,
    HistoryReceived,
    IncomingMessage,
    LoggedIn,
    LoginRefused,
    MessageAccepted,
    MessageFailed,
    NameStatus,
    OnlineUsers,
)
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

MAX_EVENTS_KEPT = 10_000
# While messages wait in the inbox, a RECEIPT goes out at least every this many confirmed
# messages (the broker's delivery window is 256), else when the inbox runs empty.
RECEIPT_EVERY = 64
# How long close() waits for the broker's GOODBYE after LEAVE.
LEAVE_WAIT_S = 1.0


class Client:
    """One user's connection to a broker, driven by the calling thread.

    Args:
        name: the name to log in with.
        endpoint: the broker's ZeroMQ endpoint; for a cluster (docs/cluster.md), several
            separated by commas: each reconnection tries the next one.
        context: a zmq.Context to use (default: the process-wide one).
    """

    def __init__(
        self,
        name: str,
        endpoint: str = DEFAULT_ENDPOINT,
        *,
        context: zmq.Context[Any] | None = None,
        clock: Callable[[], int] = wall_clock_ms,
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
        self._security_resolved = False
        self._monitor: zmq.Socket[bytes] | None = None
        self._watch = HandshakeWatch()
        self.session = ClientSession(name, takeover=takeover)
        self._context = context or zmq.Context.instance()
        self._clock = clock
        self._backoff = backoff or Backoff()
        self._socket: zmq.Socket[bytes] | None = None
        self._reconnect_at: int | None = None
        self._inbox: deque[IncomingMessage] = deque()
        # The message receive() returned last, until it is confirmed.
        self._taken: IncomingMessage | None = None
        self._receipted_mark = 0
        self._events: deque[Event] = deque(maxlen=MAX_EVENTS_KEPT)
        self._results: dict[str, MessageAccepted | MessageFailed] = {}
        self._waiting: set[str] = set()
        self._online: tuple[str, ...] | None = None
        self._name_status: NameStatus | BrokerError | None = None
        self._looking_up = False
        # Requests (WHO, HISTORY, LOOKUP) a method waits for, and the refusal that ended
        # one (a BrokerError naming its id).
        self._asking: set[str] = set()
        self._request_errors: dict[str, BrokerError] = {}
        self._history: HistoryReceived | None = None
        self._refused: LoginRefused | None = None
        self._logged_in: LoggedIn | None = None
        # The broker's notice that our name signed in elsewhere: the session is over.
        self._taken_over: LoginRefused | None = None
        # Set by close(): refusals nobody waits for any more are logged.
        self._closing = False

    # Lifecycle

    def __enter__(self) -> Client:
        if self.session.state is not State.ONLINE:
            self.login()
        return self

    def __exit__(self, exc_type: object, *exc_info: object) -> None:
        # An exception means the message in hand was not handled: leave it unconfirmed.
        if exc_type is None:
            self.close()
            return
        try:
            self.close(confirm=False)
        except UnsentMessagesError as exc:
            log.warning("closing after an error: %s", exc)  # do not hide the first one

    @property
    def endpoint(self) -> str:
        """The broker endpoint in use (or tried) now; it moves to the next one given at
        each reconnection (see `mangogram_proto.endpoints`)."""
        return self._ring.current

    @property
    def name(self) -> str:
        """The name as the broker registered it (after login)."""
        return self.session.name

    @property
    def is_online(self) -> bool:
        return self.session.state is State.ONLINE

    def login(self, timeout: float = 10.0) -> LoggedIn:
        """Connect and log in.

        Raises:
            BrokerRefused: the broker refused the name (`name_taken`, `name_invalid`...).
            ServerKeyError: the broker's key is unknown or not the expected one.
            TimeoutError: no broker answered within `timeout` seconds.
        """
        self._logged_in = None
        if self._socket is None:
            self._open(self._clock())
        if not self._pump(timeout, lambda: self._logged_in is not None or self._refused):
            raise TimeoutError(f"no answer from a broker at {self.endpoint} in {timeout} s")
        if self._refused is not None:
            refused, self._refused = self._refused, None
            raise BrokerRefused(refused.code, refused.message)
        assert self._logged_in is not None  # _pump returned on the condition above
        return self._logged_in

    def close(self, timeout: float = 10.0, *, confirm: bool = True) -> None:
        """Send what is queued, leave politely and close the socket.

        Waits up to `timeout` seconds for the broker to accept (or refuse for good, which
        is logged) every text still in the outbox, for example those sent with
        `wait=False`, reconnecting if need be; then leaves, waiting up to 1 s more for
        the broker's GOODBYE. With `confirm` (the default) the message last returned by
        `receive()` is confirmed first; pass False if it was not handled, to get it
        again next time.

        Raises:
            UnsentMessagesError: texts still unanswered after `timeout` (its `ids`);
                the client is closed all the same.
        """
        if confirm:
            self._confirm_taken()
        self._closing = True
        if self.session.outbox_size and (self._socket or self._reconnect_at is not None):
            self._pump(timeout, lambda: not self.session.outbox_size or self._refused)
        if self._socket is not None and self.session.state is State.ONLINE:
            self.session.leave(self._clock())
            self._pump(LEAVE_WAIT_S, lambda: self.session.state is State.CLOSED)
        self.session.state = State.CLOSED
        self._close_socket()
        unsent = [send.id for send in self.session.unacknowledged]
        if unsent:
            raise UnsentMessagesError(unsent, timeout)

    # Messaging

    def send(self, to: str, text: str, *, wait: bool = False, timeout: float = 10.0) -> str:
        """Send `text` to the user `to`; returns the message id.

        With `wait=True`, blocks until the broker accepted it.

        Raises:
            BrokerRefused: (with `wait`) the broker refused the message for good,
                refused it `internal` 4 times, or never answered it in 4 attempts
                (`wire_code` "no_answer", see `session.MAX_SEND_ATTEMPTS`). Never for
                `rate_limited` or `unavailable`: those are retried until accepted.
            TimeoutError: (with `wait`) not accepted within `timeout` (also while the
                broker keeps answering `rate_limited` or `unavailable`); it stays
                queued and is resent, in order.
            LocalProtocolError: the text cannot be sent at all (e.g. invalid Unicode).
        """
        self._check_taken_over()
        message_id = self.session.send_text(to, text, self._clock())
        if not wait:
            self._flush()
            return message_id
        self._waiting.add(message_id)
        try:
            if not self._pump(timeout, lambda: message_id in self._results):
                raise TimeoutError(f"message {message_id} not accepted in {timeout} s")
            result = self._results.pop(message_id)
        finally:
            self._waiting.discard(message_id)
        if isinstance(result, MessageFailed):
            raise BrokerRefused(result.code, result.message, ref=message_id)
        return message_id

    def receive(self, timeout: float | None = None) -> IncomingMessage | None:
        """The next incoming message, or None after `timeout` seconds (None: wait forever).

        Calling it confirms the message it returned the time before: you are done with
        that one. A message you could not handle is not lost if your process ends
        before the next call (or `confirm()`, or `close()`): the broker delivers it
        again at the next login, with everything after it.

        Raises:
            BrokerRefused: (`taken_over`) the name signed in elsewhere (a login with
                `takeover`); this session is over and does not reconnect."""
        self._confirm_taken()
        if not self._inbox:
            self._pump(timeout, lambda: bool(self._inbox))
        elif self.session.confirmed_mark - self._receipted_mark >= RECEIPT_EVERY:
            self._flush()  # keep the broker's delivery window moving through a backlog
        self._taken = self._inbox.popleft() if self._inbox else None
        return self._taken

    def messages(self, timeout: float | None = None) -> Iterator[IncomingMessage]:
        """Yield incoming messages until none arrives for `timeout` seconds. Each one is
        confirmed when the loop asks for the next (see `receive()`)."""
        while (message := self.receive(timeout)) is not None:
            yield message

    def confirm(self, message: IncomingMessage | None = None) -> None:
        """Confirm now that you are done with `message` (default: the one `receive()`
        returned last), instead of at the next `receive()`. Confirming a message twice
        is harmless. The broker learns of it when everything before it in your stream
        is confirmed too."""
        if message is None or message is self._taken:
            self._confirm_taken()
        else:
            self.session.confirm(message.seq, self._clock())
        self._flush()

    def next_event(self, timeout: float | None = None) -> Event | None:
        """The next event of any kind (acks, receipts, presence, errors, messages)."""
        self._pump(timeout, lambda: bool(self._events))
        return self._events.popleft() if self._events else None

    def online_users(self, timeout: float = 5.0) -> tuple[str, ...]:
        """Ask the broker who is online. Asked faster than the broker allows (2 a second
        by default), the question is asked again after the broker's `retry_after_ms`.

        Raises:
            BrokerRefused: the broker refused the question 4 times (`rate_limited`).
            TimeoutError: no answer within `timeout` seconds.
        """
        self._online = None
        request_id = self.session.request_online(self._clock())
        self._await_request(request_id, timeout, lambda: self._online is not None, "WHO")
        assert self._online is not None
        return self._online

    def _await_request(
        self, request_id: str, timeout: float, answered: Callable[[], bool], command: str
    ) -> None:
        """Pump until `answered()` or the session gives up on request `request_id`."""
        self._asking.add(request_id)
        try:
            done = self._pump(timeout, lambda: answered() or request_id in self._request_errors)
            refusal = self._request_errors.pop(request_id, None)
        finally:
            self._asking.discard(request_id)
        if refusal is not None and not answered():
            raise BrokerRefused(
                refusal.code, refusal.message, ref=request_id, retry_after_ms=refusal.retry_after_ms
            )
        if not done:
            raise TimeoutError(f"no answer to {command}")

    def is_registered(self, name: str, timeout: float = 5.0) -> bool:
        """Ask the broker whether `name` is registered (a SEND to it would be stored).

        Raises:
            BrokerRefused: the broker refused the question (`rate_limited` 4 times, or
                `unknown_command` from a broker older than LOOKUP).
            TimeoutError: no answer within `timeout` seconds.
        """
        self._name_status = None
        self._looking_up = True
        request_id = self.session.lookup_name(name, self._clock())
        self._await_request(request_id, timeout, lambda: self._name_status is not None, "LOOKUP")
        answer = self._name_status
        if isinstance(answer, BrokerError):
            raise BrokerRefused(answer.code, answer.message, retry_after_ms=answer.retry_after_ms)
        assert answer is not None
        return answer.registered

    def history(
        self, peer: str, limit: int = 50, before: str | None = None, timeout: float = 5.0
    ) -> HistoryReceived:
        """A page of the conversation with `peer`, newest first, older than broker id
        `before`. Page on with `before=page.items[-1].broker_id` while `page.more`.

        Asked faster than the broker allows (2 a second by default), the question is
        asked again after the broker's `retry_after_ms`.

        Raises:
            BrokerRefused: the broker refused the question 4 times (`rate_limited`).
            TimeoutError: no answer within `timeout` seconds.
        """
        self._history = None
        request_id = self.session.request_history(peer, limit, before, self._clock())
        self._await_request(request_id, timeout, lambda: self._history is not None, "HISTORY")
        assert self._history is not None
        return self._history

    def mark_read(self, message: IncomingMessage) -> None:
        """Tell the sender its message was read (shown to a person)."""
        self.session.mark_read(message.broker_id, self._clock())
        self._flush()

    def poll(self, timeout: float = 0.0) -> None:
        """Do pending network work (heartbeats, receipts) for up to `timeout` seconds."""
        self._pump(timeout, lambda: False)

    # The engine

    def _open(self, now: int) -> None:
        if not self._security_resolved:
            self.security = self._security_request.resolve(self.endpoint)
            self._security_resolved = True
        socket = self._context.socket(zmq.DEALER)
        self._monitor = socket.get_monitor_socket(WATCHED_EVENTS)
        self._socket = configure_dealer(socket, self.endpoint, self.security)
        self._reconnect_at = None
        self.session.connect(now)

    def _close_socket(self) -> None:
        close_with_monitor(self._socket, self._monitor)
        self._socket = None
        self._monitor = None

    def _check_handshakes(self) -> None:
        assert self._monitor is not None
        while self._monitor.poll(0):
            event = parse_monitor_message(self._monitor.recv_multipart())["event"]
            if self._watch.note(int(event)):
                self._close_socket()
                self.session.state = State.CLOSED
                raise ServerKeyError(
                    handshake_failure_message(
                        self.endpoint, self.security, self._watch.last_failure
                    )
                )

    def _check_taken_over(self) -> None:
        """Raise if the broker said our session was taken over elsewhere."""
        if self._taken_over is not None:
            raise BrokerRefused(self._taken_over.code, self._taken_over.message)

    def _confirm_taken(self) -> None:
        if self._taken is not None:
            self.session.confirm(self._taken.seq, self._clock())
            self._taken = None

    def _flush(self) -> None:
        if self._socket is None:
            return
        self._receipted_mark = self.session.confirmed_mark
        for frames in self.session.data_to_send():
            try:
                self._socket.send_multipart(frames, flags=zmq.NOBLOCK)
            except zmq.Again:
                # The broker is not taking messages; texts stay in the session's outbox
                # and go out again after the reconnect this will lead to.
                log.debug("send queue full; dropped one message: %r", frames[0][:40])

    def _pump(self, timeout: float | None, done: Callable[[], object]) -> bool:
        """Do network work until `done()` or `timeout` seconds pass. Returns `done()`."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not done():
            if self.session.state is State.CLOSED and self._socket is None:
                self._check_taken_over()
                return bool(done())
            now = self._clock()
            if self._reconnect_at is not None and now >= self._reconnect_at:
                log.info("reconnecting to %s", self._ring.advance())
                self._open(now)
            for event in self.session.tick(now):
                self._dispatch(event, now)
            self._flush()
            wait_ms = self._wait_ms(now, deadline)
            expired = wait_ms < 0
            # Even with no time left, take what already arrived (timeout=0 is a poll).
            wait_ms = max(wait_ms, 0)
            if self._socket is not None and self._monitor is not None:
                poller = zmq.Poller()
                poller.register(self._socket, zmq.POLLIN)
                poller.register(self._monitor, zmq.POLLIN)
                ready = dict(poller.poll(wait_ms))
                if self._monitor in ready:
                    self._check_handshakes()
                if self._socket in ready:
                    self._drain()
            elif self._socket is None and wait_ms:
                time.sleep(wait_ms / 1000)  # waiting out a reconnect backoff, no socket
            if expired:
                return bool(done())
        return True

    def _wait_ms(self, now: int, deadline: float | None) -> int:
        candidates = [1000]
        session_deadline = self.session.next_deadline()
        if session_deadline is not None:
            candidates.append(max(0, session_deadline - now + 1))
        if self._reconnect_at is not None:
            candidates.append(max(0, self._reconnect_at - now))
        if deadline is not None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return -1
            candidates.append(int(remaining * 1000) + 1)
        return min(candidates)

    def _drain(self) -> None:
        assert self._socket is not None
        while True:
            try:
                frames = self._socket.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                break
            now = self._clock()
            try:
                events = self.session.receive(frames, now)
            except RemoteProtocolError as exc:
                log.warning("ignoring invalid message from the broker: %s", exc.message)
                continue
            for event in events:
                self._dispatch(event, now)
            if self._socket is None:
                break
        self._flush()

    def _dispatch(self, event: Event, now: int) -> None:
        if isinstance(event, IncomingMessage):
            self._inbox.append(event)
        if isinstance(event, MessageFailed) and self._closing:
            log.warning("message %s to %s refused: %s", event.id, event.to, event.message)
        if isinstance(event, MessageAccepted | MessageFailed) and event.id in self._waiting:
            self._results[event.id] = event
        elif isinstance(event, BrokerError) and event.ref in self._asking:
            self._request_errors[event.ref] = event
        elif isinstance(event, OnlineUsers):
            self._online = event.users
        elif self._looking_up and (
            isinstance(event, NameStatus) or (isinstance(event, BrokerError) and not event.ref)
        ):
            # An ERROR without a ref while a LOOKUP waits is taken as its refusal (an
            # older broker names no request).
            self._name_status = event
            self._looking_up = False
        elif isinstance(event, HistoryReceived):
            self._history = event
        elif isinstance(event, LoggedIn):
            self._logged_in = event
            self._backoff.reset()
        elif isinstance(event, LoginRefused):
            self._refused = event
            if event.code == ErrorCode.TAKEN_OVER.value:
                # Signed in elsewhere: the session is over, and reconnecting would only
                # be refused.
                log.warning("%s", event.message)
                self._taken_over = event
                self._close_socket()
        elif isinstance(event, ConnectionLost):
            delay = self._backoff.next_delay_ms()
            log.warning("%s; reconnecting in %d ms", event.reason, delay)
            self._close_socket()
            self._reconnect_at = now + delay
        self._events.append(event)


__all__ = ["Client", "BrokerRefused", "ErrorCode", "UnsentMessagesError"]
