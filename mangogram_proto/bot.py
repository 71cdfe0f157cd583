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
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path

from . import loops
from .aio import AsyncConnection
from .backoff import Backoff
from .constants import DEFAULT_ENDPOINT
from .errors import BrokerRefused
from .events import Event, IncomingMessage, LoggedIn
from .keys import KeyPair, SecurityRequest
from .session import ClientSession

log = logging.getLogger(__name__)

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
        endpoint: the broker's ZeroMQ endpoint.
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
    ) -> None:
        self.endpoint = endpoint
        self._name = name
        self._backoff = backoff
        self._security = SecurityRequest(server_key, identity, plaintext)
        self._message_handlers: list[MessageHandler] = []
        self._event_handlers: list[EventHandler] = []
        self._connection: AsyncConnection | None = None

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
        """Queue a message to `to`; returns its id. Call it while the bot runs."""
        if self._connection is None:
            raise RuntimeError("the bot is not running")
        return self._connection.send_text(to, text)

    def stop(self) -> None:
        """Leave the broker and make `run_async()` return."""
        if self._connection is not None:
            self._connection.stop()

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
            BrokerRefused: the broker refused the bot's name.
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
        while True:
            event = await connection.events.get()
            if isinstance(event, LoggedIn):
                log.info("logged in as %s", event.name)
            try:
                await self._dispatch(event)
            except Exception:
                log.exception("handler failed on %r", event)

    async def _dispatch(self, event: Event) -> None:
        for event_handler in self._event_handlers:
            await event_handler(event)
        if isinstance(event, IncomingMessage):
            for handler in self._message_handlers:
                reply = await handler(event)
                if isinstance(reply, str) and reply:
                    self.send(event.sender, reply)


__all__ = ["Bot", "use_selector_loop_on_windows"]
