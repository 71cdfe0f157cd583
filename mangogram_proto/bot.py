"""An asyncio bot framework: register handlers, call `run()`.

Example:
    bot = Bot("echo")

    @bot.on_message
    async def echo(message: IncomingMessage) -> str:
        return f"you said: {message.text}"   # a returned string is sent back

    bot.run()

Handlers run one message at a time, in arrival order, in a task of their own, so a slow
handler never delays heartbeats. The bot reconnects with backoff and logs in again on
its own; texts not yet accepted by the broker are resent with their original ids.

A message is confirmed to the broker only after every handler returned for it and the
broker accepted every text the bot sent on its behalf: the string a handler returned,
and each `bot.send()` made while a handler ran for it (also from tasks it started). A
text refused for good (say `unknown_recipient`) is logged and ends the wait too.
Confirmations stay in order: a later message is confirmed only after the earlier ones.
So a bot killed between handling a message and the broker accepting its reply gets
that message again at its next start and answers it again: every message is answered
at least once, and a user may get a reply twice (at-least-once).

If a
handler raises, the message stays unconfirmed and all handlers run for it again after
`retry_delay` seconds (doubling), up to `handler_attempts` runs in all; later messages
wait, so order holds. After the last failed run the message is logged as given up and
confirmed, so that one bad message cannot stop the bot for ever. A bot stopped (or
killed) meanwhile gets it again at its next start, as it gets every message it had
received but not finished: `stop()` lets the handler at work finish (for up to
STOP_GRACE_S seconds), gives replies still queued up to STOP_GRACE_S seconds to be
accepted, and leaves the rest of the queue unconfirmed.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import signal
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

from . import loops
from .aio import AsyncConnection
from .backoff import Backoff
from .constants import DEFAULT_ENDPOINT
from .errors import BrokerRefused
from .events import Event, IncomingMessage, LoggedIn, MessageFailed
from .keys import KeyPair, SecurityRequest
from .session import ClientSession

log = logging.getLogger(__name__)

# How long stop() waits for a running handler before leaving anyway (that message then
# stays unconfirmed and comes again), and for queued replies to be accepted.
STOP_GRACE_S = 5.0


@dataclass
class _Handling:
    """The message whose handlers run in this context, and the texts sent for it."""

    bot: Bot
    sent: list[str] = field(default_factory=list)


# Set while handlers run for a message; tasks a handler starts inherit it, so their
# sends count as sent for that message too.
_handling: contextvars.ContextVar[_Handling | None] = contextvars.ContextVar(
    "mangogram_bot_handling", default=None
)

MessageHandler = Callable[[IncomingMessage], Awaitable[str | None]]
EventHandler = Callable[[Event], Awaitable[None]]


def use_selector_loop_on_windows() -> None:
    """Kept for programs written against earlier versions: it sets a loop policy, which
    Python 3.14 deprecates. Run your coroutine with `mangogram_proto.loops.run` instead."""
    if sys.platform == "win32":
        asyncio.set_event_loop_policy(asyncio.WindowsSelectorEventLoopPolicy())  # type: ignore[attr-defined,unused-ignore]


class Bot:
    """A MangoGram user driven by async handlers.

    Args:
        name: the name to log in with.
        endpoint: the broker's ZeroMQ endpoint; for a cluster (docs/cluster.md), several
            separated by commas: after a lost connection the bot logs in again at the
            next one, resuming its session (nothing confirmed is lost, unanswered
            replies are resent with their ids).
        handler_attempts: how many times the handlers run for a message that makes one
            of them raise, before the message is given up (logged and confirmed).
        retry_delay: seconds before the second run; doubled for each further one.

    A message is confirmed only after its handlers returned and the broker accepted
    (or refused for good) every text sent for it, so replies are at least once: a bot
    killed in between answers the message again after its restart.
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
        handler_attempts: int = 3,
        retry_delay: float = 1.0,
    ) -> None:
        if handler_attempts < 1:
            raise ValueError("handler_attempts must be at least 1")
        self.endpoint = endpoint
        self._name = name
        self._backoff = backoff
        self._security = SecurityRequest(server_key, identity, plaintext)
        self._message_handlers: list[MessageHandler] = []
        self._event_handlers: list[EventHandler] = []
        self._connection: AsyncConnection | None = None
        self._handler_attempts = handler_attempts
        self._retry_delay = retry_delay
        self._stopping: asyncio.Event | None = None
        self._handling = False

    @property
    def session(self) -> ClientSession | None:
        """The protocol session while the bot runs."""
        return self._connection.session if self._connection else None

    def on_message(self, handler: MessageHandler) -> MessageHandler:
        """Decorator: call `handler(message)` for each incoming message. If it returns a
        string, that string is sent back to the message's sender."""
        self._message_handlers.append(handler)
        return handler

    def on_event(self, handler: EventHandler) -> EventHandler:
        """Decorator: call `handler(event)` for every session event (presence, acks...)."""
        self._event_handlers.append(handler)
        return handler

    def send(self, to: str, text: str) -> str:
        """Queue a message to `to`; returns its id. Call it while the bot runs. Called
        from a handler (or a task it started), the incoming message is confirmed only
        once the broker has accepted this text too."""
        if self._connection is None:
            raise RuntimeError("the bot is not running")
        message_id = self._connection.send_text(to, text)
        handling = _handling.get()
        if handling is not None and handling.bot is self:
            handling.sent.append(message_id)
        return message_id

    def stop(self) -> None:
        """Leave the broker and make `run_async()` return. A handler at work finishes
        first (for up to STOP_GRACE_S seconds), and replies not yet accepted get up to
        STOP_GRACE_S seconds more; messages still queued stay unconfirmed and come again
        at the next start."""
        if self._stopping is not None:
            self._stopping.set()
        connection = self._connection
        if connection is None:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            loop = None  # called from another thread: stop now; the message comes again
        if self._handling and loop is not None:
            # The worker leaves once the handler returns; a handler that hangs must not
            # keep the bot from stopping.
            loop.call_later(STOP_GRACE_S, self._stop_connection, connection)
        else:
            self._stop_connection(connection)

    @staticmethod
    def _stop_connection(connection: AsyncConnection) -> None:
        # Replies still queued get a grace period: left behind, their messages would
        # come again at the next start and be answered twice.
        connection.stop(drain=STOP_GRACE_S)

    def run(self) -> None:
        """Run until `stop()`, Ctrl-C or SIGTERM (blocking); leaves the broker politely."""

        async def main() -> None:
            loop = asyncio.get_running_loop()
            for signum in (signal.SIGINT, signal.SIGTERM):
                # Windows event loops have no signal handlers: Ctrl-C raises instead.
                with contextlib.suppress(NotImplementedError, RuntimeError):
                    loop.add_signal_handler(signum, self.stop)
            await self.run_async()

        try:
            loops.run(main())
        except KeyboardInterrupt:
            log.info("interrupted")

    async def run_async(self) -> None:
        """Connect, log in and serve handlers until `stop()`. From your own code, run it on
        a loop zmq.asyncio can use on every platform: `mangogram_proto.loops.run(...)`.

        Raises:
            BrokerRefused: the broker refused the bot's name, or (`taken_over`) the
                name's session was taken over elsewhere (a login with `takeover`).
            ServerKeyError: the broker's key is unknown or not the expected one.
        """
        request = self._security
        connection = AsyncConnection(
            self._name,
            self.endpoint,
            backoff=self._backoff,
            server_key=request.server_key,
            identity=request.identity,
            plaintext=request.plaintext,
        )
        self._connection = connection
        self._stopping = asyncio.Event()
        worker = asyncio.create_task(self._run_handlers(connection))
        try:
            await connection.run()
        finally:
            worker.cancel()
            await asyncio.gather(worker, return_exceptions=True)
        if connection.failure is not None:
            raise connection.failure
        if connection.refused is not None:
            raise BrokerRefused(connection.refused.code, connection.refused.message)

    async def _run_handlers(self, connection: AsyncConnection) -> None:
        # Handlers run here, one event at a time, so a slow one never stalls heartbeats.
        assert self._stopping is not None
        while not self._stopping.is_set():
            event = await connection.events.get()
            if isinstance(event, LoggedIn):
                log.info("logged in as %s", event.name)
            self._handling = True
            try:
                if isinstance(event, IncomingMessage):
                    handling = _Handling(self)
                    token = _handling.set(handling)
                    try:
                        handled = await self._handle_message(event)
                    finally:
                        _handling.reset(token)
                    if handled:
                        # Confirmed once the replies are accepted: a kill before that
                        # brings the message (and so its answer) again.
                        connection.confirm(event, after=handling.sent)
                else:
                    if isinstance(event, MessageFailed):
                        log.warning(
                            "message %s to %s refused for good (%s): %s",
                            event.id,
                            event.to,
                            event.code,
                            event.message,
                        )
                    try:
                        await self._dispatch(event)
                    except Exception:
                        log.exception("handler failed on %r", event)
            finally:
                self._handling = False
        self._stop_connection(connection)

    async def _handle_message(self, message: IncomingMessage) -> bool:
        """Run the handlers for `message`, again after a failure; True once it may be
        confirmed (handled, or given up), False if the bot stops before either."""
        assert self._stopping is not None
        delay = self._retry_delay
        for attempt in range(1, self._handler_attempts + 1):
            try:
                await self._dispatch(message)
                return True
            except Exception:
                if attempt == self._handler_attempts:
                    log.exception(
                        "giving up message %s from %s after %d failed attempts; confirming"
                        " it so the messages after it can be handled",
                        message.id,
                        message.sender,
                        attempt,
                    )
                    return True
                log.exception(
                    "handler failed on message %s from %s (attempt %d of %d); again in %.1f s",
                    message.id,
                    message.sender,
                    attempt,
                    self._handler_attempts,
                    delay,
                )
            if self._stopping.is_set():
                return False
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), delay)
            if self._stopping.is_set():
                return False
            delay *= 2
        return False

    async def _dispatch(self, event: Event) -> None:
        for event_handler in self._event_handlers:
            await event_handler(event)
        if isinstance(event, IncomingMessage):
            for handler in self._message_handlers:
                reply = await handler(event)
                if isinstance(reply, str) and reply:
                    self.send(event.sender, reply)


__all__ = ["Bot", "use_selector_loop_on_windows"]
