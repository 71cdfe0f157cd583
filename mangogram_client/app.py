"""The interactive chat: a prompt_toolkit prompt with a status toolbar, and rich lines
printed above it as messages arrive (patch_stdout keeps them off the line being typed).

One prompt runs from the first keystroke to the last: Enter hands the line to
`_accept` instead of ending the prompt, so the terminal never leaves raw mode between
lines (keys typed in such a gap would be echoed into the transcript), and a sent line
is shown once, as the rendered message, not also as an echoed prompt line. Questions
asked while logging in (server, name, trust) are asked in the same input line."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import sys
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from prompt_toolkit import PromptSession
from prompt_toolkit.application import run_in_terminal
from prompt_toolkit.buffer import Buffer
from prompt_toolkit.completion import CompleteEvent, Completer, Completion
from prompt_toolkit.document import Document
from prompt_toolkit.formatted_text import FormattedText
from prompt_toolkit.input import Input
from prompt_toolkit.key_binding import KeyBindings, KeyPressEvent
from prompt_toolkit.output import Output
from prompt_toolkit.patch_stdout import patch_stdout
from rich.console import Console

from mangogram_proto.aio import AsyncConnection
from mangogram_proto.endpoints import EndpointRing
from mangogram_proto.errors import ErrorCode
from mangogram_proto.events import Closed, Event, IncomingMessage, LoggedIn, LoginRefused
from mangogram_proto.keys import (
    KeyFileError,
    KnownServers,
    fetch_server_key,
    fingerprint,
    key_endpoint_for,
    plaintext_requested,
    user_config_dir,
)
from mangogram_proto.names import name_key
from mangogram_proto.session import State
from mangogram_proto.transport import wall_clock_ms

from .commands import (
    Exit,
    Hint,
    ListUsers,
    Nothing,
    SendText,
    ShowHelp,
    ShowHistory,
    SwitchPeer,
    help_lines,
    parse_input,
)
from .lines import ChatLine, Line, SystemLine
from .render import TranscriptRenderer
from .settings import ChatMemory, load_memory, normalise_servers, save_memory, save_remembered
from .state import ChatState, snippet
from .widths import InputAsDrawn

log = logging.getLogger(__name__)

LOGIN_HINT_AFTER_S = 5.0
TICK_S = 0.1
# One try at learning a new server's key; short, so Ctrl-C is not kept waiting long.
KEY_ATTEMPT_MS = 1000
# How often to look again for the broker with the pinned key after an impostor answered.
KEY_RETRY_S = 2.0
# The toolbar's state while the client asks for the server, the name, or trust.
SETTING_UP = "not connected"
# How long leaving waits for the lines still being written to the terminal.
DRAIN_S = 5.0
# xterm's title stack: save the terminal's title before changing it, restore it at exit.
TITLE_PUSH = "\x1b[22;0t"
TITLE_POP = "\x1b[23;0t"


class NameCompleter(Completer):
    """Tab completion of user names after `/to ` and `@`."""

    def __init__(self, state: ChatState) -> None:
        self._state = state

    def get_completions(
        self, document: Document, complete_event: CompleteEvent
    ) -> Iterator[Completion]:
        text = document.text_before_cursor
        if text.startswith("/to ") and " " not in text[4:]:
            prefix = text[4:]
        elif text.startswith("@") and " " not in text:
            prefix = text[1:]
        else:
            return
        folded = name_key(prefix)
        for name in self._state.completions():
            if name_key(name).startswith(folded):
                yield Completion(name, start_position=-len(prefix))


@contextlib.contextmanager
def _logging_above_prompt() -> Iterator[None]:
    """Point log handlers at the current (patched) stderr, so a warning is printed above
    the input line rather than into it; the old streams come back afterwards."""
    moved: list[tuple[logging.StreamHandler[Any], Any]] = []
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.StreamHandler) and handler.stream is sys.__stderr__:
            moved.append((handler, handler.setStream(sys.stderr)))
    try:
        yield
    finally:
        for handler, stream in moved:
            handler.setStream(stream)


class ChatApp:
    """One run of the interactive client.

    Args:
        server: the broker endpoint.
        name: the name to log in with; asked for when None (or when refused).
        peer: the conversation to open after login.
        console: where lines are printed (a terminal console by default).
        input, output: prompt_toolkit I/O; tests pass a pipe input and a dummy output.
    """

    def __init__(
        self,
        server: str,
        name: str | None,
        *,
        peer: str | None = None,
        default_name: str | None = None,
        console: Console | None = None,
        input: Input | None = None,
        output: Output | None = None,
        remember: bool = True,
        ask_server: bool = False,
        bell: bool = False,
        title: bool = False,
        security: dict[str, Any] | None = None,
    ) -> None:
        self._security = dict(security or {})
        self.server = server
        self._ask_server = ask_server
        self.name = name
        self._name_given = bool(name)
        self.default_name = default_name or ""
        self._remembered_name = default_name
        self.initial_peer = peer
        self.console = console or Console(force_terminal=True, highlight=False)
        self._own_console = console is None
        self.state = ChatState(name or "")
        self.renderer = TranscriptRenderer(me=name or "")
        self.connection: AsyncConnection | None = None
        # The broker of a cluster last named on screen (it changes on a failover).
        self._broker_shown = ""
        self._remember = remember
        self._bell = bell
        # A legacy Windows console has no escape sequences: its title is left alone.
        self._title = title and not self.console.legacy_windows
        self._title_shown: int | None = None
        self._closing = False
        self.exit_code = 0
        self._patch_stdout = input is None
        # Rendered text not yet on the terminal, each with what to do once it is there
        # (confirm the message it shows); one task writes them, in order.
        self._unwritten: list[tuple[str, Callable[[], None]]] = []
        self._writer: asyncio.Task[None] | None = None
        # Lines typed before anyone asks for them: answers to the next login question, or
        # chat lines acted on once logged in.
        self._typed: asyncio.Queue[str] = asyncio.Queue()
        self._question: tuple[str, asyncio.Future[str]] | None = None
        self._chatting = False
        self._quit = asyncio.Event()
        # Set once the prompt runs: before that its start would wipe a pre-filled answer.
        self._ui_started = asyncio.Event()
        self._prompt: PromptSession[str] = PromptSession(
            input=input,
            output=output,
            completer=NameCompleter(self.state),
            complete_while_typing=False,
            bottom_toolbar=lambda: FormattedText(
                self.state.toolbar(self._columns(), self._text_being_typed())
            ),
            refresh_interval=0.5,
            key_bindings=self._key_bindings(),
            # One input row that scrolls sideways, as in irssi and weechat: a long line
            # that wrapped would push the transcript up the scrollback, and clearing it
            # left blank rows where the chat had been.
            wrap_lines=False,
            input_processors=[InputAsDrawn()],
        )
        self._prompt.default_buffer.accept_handler = self._accept

    @property
    def _first_server(self) -> str:
        return self.server.split(",")[0]

    def _text_being_typed(self) -> str:
        """The message text the input line would send (without an @NAME prefix)."""
        if self._question is not None:
            return ""
        command = parse_input(self._prompt.default_buffer.text)
        return command.text if isinstance(command, SendText) else ""

    def _columns(self) -> int:
        return self._prompt.app.output.get_size().columns

    def _key_bindings(self) -> KeyBindings:
        bindings = KeyBindings()

        @bindings.add("c-c")
        def _interrupt(event: KeyPressEvent) -> None:
            # As in shells: Ctrl-C drops a half-typed line; on an empty line it quits.
            if event.current_buffer.text:
                event.current_buffer.reset()
            else:
                event.app.exit(exception=EOFError)  # KeyboardInterrupt would escape asyncio.run

        # Up and Down walk the lines sent before. Bound here because, with the prompt
        # kept running across lines, the default binding did not fire in tmux (checked
        # in test_up_recalls_the_lines_sent_before).
        @bindings.add("up")
        def _previous(event: KeyPressEvent) -> None:
            event.current_buffer.auto_up(count=event.arg)

        @bindings.add("down")
        def _next(event: KeyPressEvent) -> None:
            event.current_buffer.auto_down(count=event.arg)

        return bindings

    def _accept(self, buffer: Buffer) -> bool:
        """Enter pressed: hand the line on; True keeps it in the input line for editing."""
        text = buffer.text
        if self._question is not None:
            _label, answer = self._question
            self._question = None
            if not answer.done():
                answer.set_result(text)
            return False
        if not self._chatting or self.connection is None:
            if isinstance(parse_input(text), Exit):
                self._prompt.app.exit(result="")  # no need to wait for a login to leave
                return False
            self._typed.put_nowait(text)
            if text.strip():
                self.show([SystemLine(wall_clock_ms(), f"“{snippet(text)}” waits for the login")])
            return False
        keep = self._act(self.connection, text)
        if keep is None:
            self._quit.set()
            return False
        return keep

    def show(self, lines: Iterable[Line]) -> None:
        """Print `lines`; then confirm the incoming messages among them (only once they
        are on the terminal: a client killed before gets them again)."""
        lines = list(lines)
        shown: list[IncomingMessage] = []
        reads: list[str] = []
        if self.connection is not None:
            shown, reads = self.state.take_shown(), self.state.take_reads()
        after = functools.partial(self._on_screen, shown, reads)
        idle = self._writer is None or self._writer.done()
        if not lines and idle:
            after()  # nothing to print (a message held back, or one to ourselves)
            return
        if not (self._own_console and self._patch_stdout):
            self._print(lines)  # a console of the caller's: written when print returns
            after()
            return
        # Under patch_stdout a print only queues the text for the proxy's thread, which
        # writes it a moment later: a message confirmed at print time was lost by a kill
        # in between. So the text is rendered here and written by `_write_unwritten`,
        # which confirms after the write (and, as the proxy did, above the input line).
        with self.console.capture() as captured:
            self._print(lines)
        if idle and not self._prompt.app.is_running:
            # No input line to keep clear (before the prompt is first drawn, or after
            # it ended): written now, so that it precedes the prompt's first drawing.
            if self._write_now(captured.get()):
                after()
            return
        self._unwritten.append((captured.get(), after))
        if idle:
            self._writer = asyncio.get_running_loop().create_task(self._write_unwritten())

    def _print(self, lines: list[Line]) -> None:
        if self._own_console:
            # Lay rows out for the width prompt_toolkit draws in: rich alone would trust
            # a stale COLUMNS variable, and a row wider than the terminal wraps.
            size = self._prompt.app.output.get_size()
            self.console.size = (size.columns, size.rows)
        if self._bell and any(isinstance(x, ChatLine) and x.elsewhere and not x.own for x in lines):
            self.console.bell()  # someone wrote in a conversation that is not open
        for line in lines:
            for renderable in self.renderer.render(line):
                self.console.print(renderable)

    def _on_screen(self, shown: list[IncomingMessage], reads: list[str]) -> None:
        """What `show` printed is on the terminal: confirm it, and tell senders it was read."""
        if self.connection is not None:
            for message in shown:
                self.connection.confirm(message)
            # Shown in the open conversation means read: tell the senders.
            for broker_id in reads:
                self.connection.mark_read(broker_id)
        if self._title:
            self._set_title(sum(self.state.unread.values()))
        if self._prompt.app.is_running:
            self._prompt.app.invalidate()

    def _write_now(self, text: str) -> bool:
        """Write `text` to the terminal; False (and a warning) if that failed."""
        output = self._prompt.app.output
        try:
            output.enable_autowrap()  # as patch_stdout does: Windows resets it per flush
            output.write_raw(text)
            output.flush()  # on the terminal (the tty's buffer) when this returns
        except Exception as exc:
            log.warning("could not write to the terminal (%s); not confirmed", exc)
            return False
        return True

    async def _write_unwritten(self) -> None:
        """Write the queued text to the terminal, all that has gathered in one go, and only
        then run what waited for it. Text that cannot be written is not confirmed: its
        messages come again at the next login."""
        while self._unwritten:
            batch, self._unwritten = self._unwritten, []
            text = "".join(text for text, _after in batch)
            if self._prompt.app.is_running:
                await self._first_drawing()
                # Clears the input line, writes, draws it again below the text.
                try:
                    written = await run_in_terminal(
                        functools.partial(self._write_now, text), in_executor=False
                    )
                except Exception as exc:  # the prompt ending meanwhile, say
                    log.warning("could not write above the input line (%s)", exc)
                    written = False
            else:
                written = self._write_now(text)
            if written:
                for _text, after in batch:
                    after()

    async def _first_drawing(self) -> None:
        """Wait (up to a second; the toolbar redraws every half) until the prompt has been
        drawn twice. Text written above the prompt's first drawing, made before the
        terminal answered its cursor-position request, left that prompt row in the
        transcript (seen in tmux, test_after_an_impostor_...); the proxy's thread hop
        happened to come late enough."""
        app = self._prompt.app
        if app.render_counter > 1:
            return
        drawn = asyncio.get_running_loop().create_future()

        def on_render(_app: object) -> None:
            if not drawn.done():
                drawn.set_result(None)

        app.after_render += on_render
        try:
            await asyncio.wait_for(drawn, 1.0)
        except TimeoutError:
            pass  # written anyway, at worst below a stray prompt row
        finally:
            app.after_render -= on_render

    async def _screen_caught_up(self) -> None:
        """Wait (a bounded time) until what was shown is written and confirmed."""
        if self._writer is not None and not self._writer.done():
            with contextlib.suppress(Exception):
                await asyncio.wait_for(asyncio.shield(self._writer), DRAIN_S)

    def _set_title(self, unread: int | None) -> None:
        """Name the unread count in the window title; None gives the title back."""
        if unread is None:
            if self._title_shown is not None:
                self.console.file.write(TITLE_POP)
                self.console.file.flush()
            return
        if unread == self._title_shown:
            return
        if self._title_shown is None:
            self.console.file.write(TITLE_PUSH)  # xterm keeps the old title to restore
        self._title_shown = unread
        self.console.set_window_title(f"MangoGram ({unread} unread)" if unread else "MangoGram")

    async def run(self) -> int:
        """Log in, chat until /exit, Ctrl-D or Ctrl-C; returns the exit code."""
        context = patch_stdout(raw=True) if self._patch_stdout else contextlib.nullcontext()
        with context, _logging_above_prompt():
            # The work first: its first line is printed before the prompt is first drawn.
            work = asyncio.create_task(self._work())
            ui = asyncio.create_task(
                self._prompt.prompt_async(self._prompt_text, pre_run=self._ui_started.set)
            )
            await asyncio.wait({ui, work}, return_when=asyncio.FIRST_COMPLETED)
            if ui.done() and not work.done():
                if self._chatting:
                    self._quit.set()  # leave politely: the session says GOODBYE
                else:
                    work.cancel()
            await asyncio.gather(work, return_exceptions=True)
            await self._screen_caught_up()  # the last lines, before the prompt goes
            if not ui.done():
                self._prompt.app.exit()
            await asyncio.gather(ui, return_exceptions=True)
        return self.exit_code

    async def _work(self) -> None:
        connection, runner = await self._log_in()
        if connection is None or runner is None:
            return
        pump = asyncio.create_task(self._pump_events(connection))
        try:
            if self.initial_peer:
                self.show(self.state.switch_peer(self.initial_peer, wall_clock_ms()))
            self._chatting = True
            # What was typed while connecting is acted on now, in order.
            while not self._typed.empty():
                text = self._typed.get_nowait()
                keep = self._act(connection, text)
                if keep is None:
                    return
                buffer = self._prompt.default_buffer
                if keep and not buffer.text:
                    buffer.document = Document(text, len(text))  # back to the input line
            while True:
                quit_asked = asyncio.create_task(self._quit.wait())
                await asyncio.wait({quit_asked, runner}, return_when=asyncio.FIRST_COMPLETED)
                if self._quit.is_set():
                    break
                quit_asked.cancel()
                runner = await self._retry_after_key_failure(connection, runner)
        finally:
            self._chatting = False
            await self._screen_caught_up()  # confirmations of what is on screen go out
            connection.stop()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(runner, 3)
            # A flag, not cancel(): Python 3.11's wait_for can swallow a cancellation.
            self._closing = True
            await asyncio.gather(pump, return_exceptions=True)
            self.show(self.state.due(wall_clock_ms() + 10**9))
            if self._remember:
                save_memory(self.server, ChatMemory(self.state.contacts, dict(self.state.unread)))
            if self._title:
                self._set_title(None)

    async def _retry_after_key_failure(
        self, connection: AsyncConnection, runner: asyncio.Task[None]
    ) -> asyncio.Task[None]:
        """The connection gave up on its own: the broker answering at our address does not
        hold the key we pinned (the pump has said so, once). Keep refusing it, and try
        again every few seconds, so that the real broker is found when it is back.

        The session is reopened rather than replaced: its outbox keeps what was typed
        meanwhile (sent once, with the same ids, after the next login) and its resume
        token keeps our name."""
        with contextlib.suppress(Exception):
            await runner
        if connection.failure is None:
            # Ended for another reason (a refused re-login): nothing to retry.
            await self._quit.wait()
            return runner
        # Reopened at once, so a text typed now is queued, not refused as "closed".
        connection.failure = None
        connection.session.state = State.DISCONNECTED
        await asyncio.sleep(KEY_RETRY_S)  # paced retries against an impostor
        return asyncio.create_task(connection.run())

    async def _ask(self, label: str, default: str = "", *, fresh: bool = False) -> str:
        """Ask a question in the input line and wait for Enter. A line typed ahead answers
        it, unless `fresh` (a trust decision must follow the question, not precede it)."""
        if fresh:
            while not self._typed.empty():
                self._typed.get_nowait()
        elif not self._typed.empty():
            return self._typed.get_nowait()
        answer: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._question = (label, answer)
        await self._ui_started.wait()
        buffer = self._prompt.default_buffer
        if default and not buffer.text:
            buffer.document = Document(default, len(default))
        if self._prompt.app.is_running:
            self._prompt.app.invalidate()
        try:
            return await answer
        finally:
            self._question = None

    async def _log_in(self) -> tuple[AsyncConnection | None, asyncio.Task[None] | None]:
        # The order a newcomer meets: the server, its fingerprint, then the name.
        self.state.connection = SETTING_UP
        while self._ask_server:
            answer = await self._ask("server: ", self.server)
            try:
                self.server = normalise_servers(answer or self.server)
                break
            except ValueError as exc:
                self.show([SystemLine(wall_clock_ms(), str(exc), "error")])
        if not await self._trust_server():
            return None, None
        takeover = False
        while True:
            if not self.name:
                self.name = (await self._ask("your name: ", self.default_name)).strip()
                if not self.name:
                    self.show([SystemLine(wall_clock_ms(), "a name is needed to log in", "error")])
                    continue
            self.state.connection = "connecting"
            self.show([SystemLine(wall_clock_ms(), f"connecting to {self.server} as {self.name}…")])
            connection = AsyncConnection(
                self.name, self.server, takeover=takeover, **self._security
            )
            takeover = False  # asked for this login only
            runner = asyncio.create_task(connection.run())
            outcome = await self._await_login(connection, runner)
            if isinstance(outcome, LoggedIn):
                self.connection = connection
                if self._remember:
                    self.state.remember(load_memory(self.server))
                self.state.me = outcome.name
                self.renderer.me = outcome.name
                self.show(self.state.on_event(outcome, wall_clock_ms()))
                self._broker_shown = connection.endpoint
                if len(connection.endpoints) > 1:
                    self.show([SystemLine(wall_clock_ms(), f"connected to {connection.endpoint}")])
                if self._remember:
                    # A name given for this run (--name) does not replace the remembered one.
                    keep = self._remembered_name if self._name_given else None
                    save_remembered(self.server, keep or outcome.name)
                return connection, runner
            with contextlib.suppress(Exception):
                await runner
            if outcome is None or connection.failure is not None:
                return None, None
            self.state.connection = SETTING_UP
            text = outcome.message
            if outcome.code == ErrorCode.NAME_TAKEN and connection.security is not None:
                # Encrypted, the broker checks the key first: a name online with our own
                # key is ours, in another window or on another machine. The broker lets
                # that key take the session over (LOGIN `takeover`), if the user says so.
                answer = await self._ask(
                    "You are online elsewhere (another window or machine). Take over here? [y/N] ",
                    fresh=True,
                )
                if answer.strip().lower() in ("y", "yes"):
                    takeover = True
                    continue
                text = f"{self.name} stays logged in elsewhere; pick another name"
            elif "another" not in text:
                text += "; try another name"
            self.show([SystemLine(wall_clock_ms(), text, "error")])
            # Not offered again: the same name would be refused again.
            self.default_name = ""
            self.name = None

    async def _trust_server(self) -> bool:
        """First connection to an encrypted broker: show its key's fingerprint and let the
        user decide before pinning it (like ssh does for a new host)."""
        if self._security.get("plaintext") or plaintext_requested():
            return True
        if self._security.get("server_key") or os.environ.get("MANGOGRAM_SERVER_KEY"):
            return True
        known = KnownServers(user_config_dir() / "known_servers")
        # A cluster's brokers share one key: it is learned and pinned for the first one,
        # as the SDK looks it up.
        first = self._first_server
        if known.lookup(first) is not None:
            return True
        key = await self._fetch_key()
        if key is None:
            return False
        self.show(
            [
                SystemLine(
                    wall_clock_ms(),
                    f"first connection to {first}; its key fingerprint is"
                    f" {fingerprint(key)}. Compare it with the one the broker printed at start.",
                )
            ]
        )
        answer = await self._ask("trust this server and remember it? [y/N] ", fresh=True)
        if answer.strip().lower() not in ("y", "yes"):
            self.show([SystemLine(wall_clock_ms(), "not trusted; nothing was sent", "error")])
            self.exit_code = 1
            return False
        known.pin(first, key)
        # The answer is not echoed (the input line is reused): say what it did.
        self.show([SystemLine(wall_clock_ms(), "trusted; this key is expected from now on")])
        return True

    async def _fetch_key(self) -> str | None:
        """Ask the broker for its key until it answers: a broker that is down now may be
        up in a minute, as a known one is waited for. Errors speak of the address the
        user gave, not of the key port beside it. Of a cluster's brokers (several
        addresses), each is asked in turn: they share one key."""
        hinted = False
        ring = EndpointRing(self.server)
        while True:
            try:
                where = os.environ.get("MANGOGRAM_KEY_ENDPOINT") or key_endpoint_for(ring.current)
                return await asyncio.to_thread(fetch_server_key, where, KEY_ATTEMPT_MS)
            except TimeoutError:
                ring.advance()
                if not hinted:
                    hinted = True
                    self.show(
                        [
                            SystemLine(
                                wall_clock_ms(),
                                f"no answer from {self.server} yet; is the broker running?"
                                " Still trying (Ctrl-C to quit)",
                                "error",
                            )
                        ]
                    )
            except (KeyFileError, ValueError) as exc:
                self.show(
                    [
                        SystemLine(
                            wall_clock_ms(),
                            f"cannot learn the key of {self.server}: {exc}",
                            "error",
                        )
                    ]
                )
                self.exit_code = 1
                return None

    async def _await_login(
        self, connection: AsyncConnection, runner: asyncio.Task[None]
    ) -> LoggedIn | LoginRefused | None:
        hinted = False
        loop = asyncio.get_running_loop()
        started = loop.time()
        while True:
            if runner.done() and connection.events.empty():
                error = runner.exception()
                if error is not None:
                    self.show([SystemLine(wall_clock_ms(), str(error), "error")])
                    self.exit_code = 1
                return None
            try:
                event = await asyncio.wait_for(connection.events.get(), 1.0)
            except TimeoutError:
                if not hinted and loop.time() - started > LOGIN_HINT_AFTER_S:
                    hinted = True
                    self.show(
                        [
                            SystemLine(
                                wall_clock_ms(),
                                f"no answer from {self.server} yet; is the broker running?"
                                " Still trying (Ctrl-C to quit)",
                                "error",
                            )
                        ]
                    )
                continue
            except asyncio.CancelledError:
                connection.stop()
                raise
            if isinstance(event, LoggedIn | LoginRefused):
                if connection.failure is not None:
                    self.show([SystemLine(wall_clock_ms(), str(connection.failure), "error")])
                    self.exit_code = 1
                return event

    async def _pump_events(self, connection: AsyncConnection) -> None:
        while not self._closing:
            try:
                event: Event | None = await asyncio.wait_for(connection.events.get(), TICK_S)
            except TimeoutError:
                event = None
            now = wall_clock_ms()
            lines: list[Line] = []
            if event is not None and not isinstance(event, Closed):
                lines += self.state.on_event(event, now)
            if isinstance(event, LoggedIn) and connection.endpoint != self._broker_shown:
                # Failed over to another broker of the cluster: say which, once.
                self._broker_shown = connection.endpoint
                lines.append(SystemLine(now, f"now connected to {connection.endpoint}"))
            lines += self.state.due(now)
            if lines or isinstance(event, IncomingMessage):
                self.show(lines)
            elif event is not None and self._prompt.app.is_running:
                self._prompt.app.invalidate()

    def _prompt_text(self) -> str:
        if self._question is not None:
            return self._question[0]
        return f"[{self.state.peer}] › " if self.state.peer else "› "

    def _act(self, connection: AsyncConnection, line: str) -> bool | None:
        """Carry out one typed line. Returns None to leave, True to keep the line in the
        input for editing, False when it is done with."""
        command = parse_input(line)
        now = wall_clock_ms()
        if isinstance(command, Exit):
            return None
        if isinstance(command, Nothing):
            return False
        if isinstance(command, Hint):
            self.show([SystemLine(now, command.text)])
        elif isinstance(command, ShowHelp):
            self.show([SystemLine(now, "commands:"), *(SystemLine(now, h) for h in help_lines())])
        elif isinstance(command, ListUsers):
            connection.request_online()
        elif isinstance(command, ShowHistory):
            if self.state.peer is None:
                self.show([SystemLine(now, "open a conversation first: /to NAME")])
            else:
                connection.request_history(self.state.peer, command.count)
        elif isinstance(command, SwitchPeer):
            # Asked of the broker only online: offline, the conversation opens with what
            # is known here (and a warning for an unknown name).
            can_ask = connection.state is State.ONLINE
            opened = self.state.ask_peer(command.name, now, can_ask=can_ask)
            if opened is None:
                connection.lookup_name(command.name)
            else:
                self.show(opened)
        elif isinstance(command, SendText):
            to = command.to or self.state.peer
            if to is None:
                self.show(
                    [SystemLine(now, "choose whom to talk to first: /to NAME (Tab completes)")]
                )
                return True
            problem = self.state.text_problem(command.text)
            if problem is not None:
                self.show([SystemLine(now, problem, "error")])
                return True
            try:
                message_id = connection.send_text(to, command.text)
            except Exception as exc:  # an unsendable text must not end the chat
                self.show([SystemLine(now, f"cannot send that: {exc}", "error")])
                return True
            self.state.sent(message_id, to, command.text, now)
        return False
