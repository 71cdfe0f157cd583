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

import zmq
import zmq.asyncio

from .backoff import Backoff
from .constants import DEFAULT_ENDPOINT
from .errors import BrokerRefused, RemoteProtocolError
from .events import ConnectionLost, Event, IncomingMessage, LoggedIn, LoginRefused
from .session import ClientSession, State
from .transport import configure_dealer, wall_clock_ms

log = logging.getLogger(__name__)

MessageHandler = Callable[[IncomingMessage], Awaitable[str | None]]
EventHandler = Callable[[Event], Awaitable[None]]


def use_selector_loop_on_windows() -> None:
    """zmq.asyncio needs a selector event loop; Windows defaults to the proactor one."""
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
    ) -> None:
        self.endpoint = endpoint
        self.session = ClientSession(name)
        self._backoff = backoff or Backoff()
        self._message_handlers: list[MessageHandler] = []
        self._event_handlers: list[EventHandler] = []
        self._queue: asyncio.Queue[Event] | None = None
        self._socket: zmq.asyncio.Socket | None = None
        self._wakeup: asyncio.Event | None = None
        self._stopping = False
        self.ready: asyncio.Event | None = None

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
        """Queue a message to `to`; returns its id. Safe to call from handlers."""
        message_id = self.session.send_text(to, text, wall_clock_ms())
        if self._wakeup is not None:
            self._wakeup.set()
        return message_id

    def stop(self) -> None:
        """Leave the broker and make `run_async()` return."""
        self._stopping = True
        if self._wakeup is not None:
            self._wakeup.set()

    def run(self) -> None:
        """Run until `stop()`, Ctrl-C or SIGTERM (blocking); leaves the broker politely."""
        use_selector_loop_on_windows()

        async def main() -> None:
            loop = asyncio.get_running_loop()
            for signum in (signal.SIGINT, signal.SIGTERM):
                # Windows event loops have no signal handlers: Ctrl-C raises instead.
                with contextlib.suppress(NotImplementedError, RuntimeError):
                    loop.add_signal_handler(signum, self.stop)
            await self.run_async()

        try:
            asyncio.run(main())
        except KeyboardInterrupt:
            log.info("interrupted")

    async def run_async(self) -> None:
        """Connect, log in and serve handlers until `stop()`.

        Raises:
            BrokerRefused: the broker refused the bot's name.
        """
        self._queue = asyncio.Queue()
        self._wakeup = asyncio.Event()
        self.ready = self.ready or asyncio.Event()
        context = zmq.asyncio.Context.instance()
        worker = asyncio.create_task(self._run_handlers())
        try:
            await self._serve(context)
        finally:
            worker.cancel()
            if self._socket is not None:
                self._socket.close(linger=0)
                self._socket = None

    async def _serve(self, context: zmq.asyncio.Context) -> None:
        assert self._wakeup is not None
        self._open(context)
        reconnect_at: int | None = None
        leave_deadline: int | None = None
        while True:
            now = wall_clock_ms()
            if self._stopping and leave_deadline is None:
                self.session.leave(now)
                leave_deadline = now + 1000
            if self.session.state is State.CLOSED or (
                leave_deadline is not None and now >= leave_deadline
            ):
                return
            if reconnect_at is not None and now >= reconnect_at:
                self._open(context)
                reconnect_at = None
            for event in self.session.tick(now):
                reconnect_at = self._handle(event, now) or reconnect_at
            await self._flush()
            wait_ms = self._wait_ms(now, reconnect_at, leave_deadline)
            if self._socket is None:
                await self._sleep_or_wake(wait_ms)
                continue
            poll = asyncio.ensure_future(self._socket.poll(wait_ms))
            woken = asyncio.ensure_future(self._wakeup.wait())
            await asyncio.wait({poll, woken}, return_when=asyncio.FIRST_COMPLETED)
            woken.cancel()
            self._wakeup.clear()
            if not poll.done():
                poll.cancel()
                continue
            if poll.result():
                reconnect_at = await self._drain() or reconnect_at

    async def _sleep_or_wake(self, wait_ms: int) -> None:
        assert self._wakeup is not None
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._wakeup.wait(), wait_ms / 1000)
        self._wakeup.clear()

    def _wait_ms(self, now: int, reconnect_at: int | None, leave_deadline: int | None) -> int:
        candidates = [1000]
        for deadline in (self.session.next_deadline(), reconnect_at, leave_deadline):
            if deadline is not None:
                candidates.append(max(0, deadline - now + 1))
        return min(candidates)

    def _open(self, context: zmq.asyncio.Context) -> None:
        self._socket = configure_dealer(context.socket(zmq.DEALER), self.endpoint)
        self.session.connect(wall_clock_ms())

    async def _flush(self) -> None:
        if self._socket is None:
            return
        for frames in self.session.data_to_send():
            try:
                await self._socket.send_multipart(frames, flags=zmq.NOBLOCK)
            except zmq.Again:
                log.debug("send queue full; dropped one %s frame set", frames[1])

    async def _drain(self) -> int | None:
        assert self._socket is not None
        reconnect_at = None
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
                reconnect_at = self._handle(event, now) or reconnect_at
        return reconnect_at

    def _handle(self, event: Event, now: int) -> int | None:
        """Route one event; returns a reconnect time when the connection was lost."""
        assert self._queue is not None
        if isinstance(event, LoginRefused):
            raise BrokerRefused(event.code, event.message)
        if isinstance(event, LoggedIn):
            self._backoff.reset()
            if self.ready is not None:
                self.ready.set()
            log.info("logged in as %s", event.name)
        self._queue.put_nowait(event)
        if isinstance(event, ConnectionLost):
            delay = self._backoff.next_delay_ms()
            log.warning("%s; reconnecting in %d ms", event.reason, delay)
            if self._socket is not None:
                self._socket.close(linger=0)
                self._socket = None
            return now + delay
        return None

    async def _run_handlers(self) -> None:
        assert self._queue is not None
        while True:
            event = await self._queue.get()
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
