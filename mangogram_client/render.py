"""Draw transcript lines as rich renderables, one line after another.

Theory of operation: the console is a scrollback, like irssi or weechat. Each `Line` is
printed once above the prompt and never redrawn, so a delivery mark shows the state at
the moment the line was printed; later changes arrive as their own `SystemLine`.

A `TranscriptRenderer` turns one `Line` into a few renderables. Its only memory is the
local day and minute of the previous line: a date rule is printed before the first line
and whenever the day changes, and a time equal to the one above is left blank (as rich's
own log render does). Everything is pure: the time zone is an argument, no clock is read.

Each chat line is a grid: a fixed "HH:MM" column, the sender, then the text, which wraps
under itself, never under the time or the name; our own messages end in a delivery mark.
Rich measures every character in terminal cells, so wide CJK characters, emoji and
Cyrillic wrap without help; text is never wrapped by hand here.

Text from peers is shown, never obeyed: control characters (escape sequences, bells,
carriage returns) are replaced by visible symbols before they reach the terminal.
"""

from __future__ import annotations

import io
import re
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta, tzinfo

from rich.cells import cell_len
from rich.console import Console, ConsoleOptions, RenderableType, RenderResult
from rich.rule import Rule
from rich.table import Table
from rich.text import Text

from mangogram_proto.names import name_key

from . import widths
from .lines import ChatLine, Line, Mark, SystemKind, SystemLine

# Before anything is measured: rich must count emoji cells as prompt_toolkit and the
# terminal do (see widths.py), or a row can wrap into a blank line.
widths.install()

__all__ = [
    "NAME_PALETTE",
    "DateRule",
    "TranscriptRenderer",
    "name_style",
    "render_plain",
    "safe_text",
]

#: Colours for sender names: readable on dark and light backgrounds. None is red (errors,
#: failed messages) or plain green (joins), nor becomes red, green or white when rich
#: downgrades it for a 16-colour terminal, so a name never looks like a status or like us.
NAME_PALETTE: tuple[str, ...] = (
    "cyan",
    "magenta",
    "orchid",
    "deep_sky_blue1",
    "spring_green3",
    "hot_pink",
    "gold3",
    "dodger_blue1",
    "steel_blue1",
    "orange3",
    "medium_purple3",
    "chartreuse3",
)

TIME_FORMAT = "%H:%M"
TIME_WIDTH = 5  # cells of "HH:MM"

OWN_NAME_STYLE = "bold"  # uncoloured, so it never matches a palette colour
TIME_STYLE = "dim"
DATE_STYLE = "dim"
ELSEWHERE_TEXT_STYLE = "italic"
MENTION_STYLE = "bold underline"

MARKS: dict[Mark, tuple[str, str]] = {
    "pending": ("○", "dim"),  # not "…", which reads as cut-off text
    "sent": ("✓", "dim"),
    "delivered": ("✓✓", "green"),
    "failed": ("✗", "bold red"),
}

#: Per system kind: the marker before the text, the marker's style, the text's style.
SYSTEM_STYLES: dict[SystemKind, tuple[str, str, str]] = {
    "info": ("·", "dim", "dim"),
    "joined": ("→", "bold green", "green"),
    "left": ("←", "dim", "dim"),
    "error": ("!", "bold red", "red"),
    "receipt": ("·", "dim", "dim"),
}

# C0 controls (except newline and tab), DEL and C1 controls: terminals act on these.
_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f]")
_LINE_BREAKS = re.compile("\r\n|[\r\u2028\u2029]")
_ANY_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")


def name_style(name: str) -> str:
    """The colour of a sender's name, the same in every process and every session.

    Names that are one user ("Олена", "олена", "ОЛЕНА") share a colour: the colour is
    picked from `NAME_PALETTE` by a CRC-32 of the name's comparison key. Python's
    `hash()` is salted per process and must not be used for this.

    Args:
        name: a display name.

    Returns:
        A rich colour name, usable as a style ("bold " + it for emphasis).
    """
    digest = zlib.crc32(name_key(name).encode("utf-8"))
    return NAME_PALETTE[digest % len(NAME_PALETTE)]


def _visible_control(match: re.Match[str]) -> str:
    code = ord(match.group())
    if code < 0x20:
        return chr(0x2400 + code)  # "␛" for ESC, "␇" for BEL, ...
    if code == 0x7F:
        return "␡"
    return "\N{REPLACEMENT CHARACTER}"


def safe_text(text: str) -> str:
    """Message text made harmless for a terminal, line breaks and tabs kept.

    Carriage returns and Unicode line separators become newlines; other control
    characters become visible symbols, so a peer cannot move the cursor, recolour the
    screen or retitle the window. Emoji selectors terminals disagree on are dropped
    (`widths.display_text`).
    """
    return _CONTROL.sub(_visible_control, _LINE_BREAKS.sub("\n", widths.display_text(text)))


def _safe_name(name: str) -> str:
    """A name kept on one row: line breaks and tabs are shown as symbols too."""
    return _ANY_CONTROL.sub(_visible_control, _LINE_BREAKS.sub("\n", widths.display_text(name)))


@dataclass(frozen=True)
class _Row:
    """One transcript row: time, who (sender or system marker), body.

    Laid out when printed, so the sender column can be capped at a share of the width
    actually available.
    """

    time: Text
    who: Text
    body: Text

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        grid = Table.grid(padding=(0, 1), expand=True)
        grid.add_column(width=TIME_WIDTH, no_wrap=True, style=TIME_STYLE)
        grid.add_column(no_wrap=True, overflow="ellipsis", max_width=max(1, options.max_width // 3))
        grid.add_column(ratio=1, overflow="fold")
        grid.add_row(self.time, self.who, self.body)
        yield grid


class TranscriptRenderer:
    """Turns transcript lines into what to print, remembering only the last day and minute.

    Use one renderer per console and feed it every line in the order printed; a fresh
    renderer (for example after clearing the screen) starts with a date rule again.

    Args:
        me: our display name; mentions of it in incoming text are highlighted.
        tz: the zone to show times in; None means the viewer's local zone.
    """

    def __init__(self, me: str, tz: tzinfo | None = None) -> None:
        self.tz = tz
        self._last_day: date | None = None
        self._last_minute: datetime | None = None
        self._mention: re.Pattern[str] | None = None
        self.me = me

    @property
    def me(self) -> str:
        """Our display name; may be set later, once the broker has accepted it."""
        return self._me

    @me.setter
    def me(self, name: str) -> None:
        self._me = name
        self._mention = (
            re.compile(rf"(?<!\w)@?{re.escape(name)}(?!\w)", re.IGNORECASE) if name else None
        )

    def render(self, line: Line) -> list[RenderableType]:
        """What to print for `line`, in order: maybe a date rule, then the line itself.

        Args:
            line: a chat or system line.

        Returns:
            Renderables for `Console.print`, each printed on its own.
        """
        out: list[RenderableType] = []
        when = self._local(line.at_ms)
        if when is not None and when.date() != self._last_day:
            self._last_day = when.date()
            out.append(DateRule(when.date()))
        time = self._time_cell(when)
        if isinstance(line, ChatLine):
            out.append(self._chat_row(time, line))
        else:
            out.append(_system_row(time, line))
        return out

    def _local(self, at_ms: int) -> datetime | None:
        try:
            utc = datetime.fromtimestamp(at_ms // 1000, tz=UTC)
            return (utc + timedelta(milliseconds=at_ms % 1000)).astimezone(self.tz)
        except (OverflowError, OSError, ValueError):
            return None  # a clock far outside what datetime can hold

    def _time_cell(self, when: datetime | None) -> Text:
        if when is None:
            self._last_minute = None
            return Text("--:--")
        minute = when.replace(second=0, microsecond=0)
        if minute == self._last_minute:
            return Text("")
        self._last_minute = minute
        return Text(when.strftime(TIME_FORMAT))

    def _chat_row(self, time: Text, line: ChatLine) -> _Row:
        body = Text(safe_text(line.text))
        if line.own:
            who = Text(_safe_name(line.sender), style=OWN_NAME_STYLE)
            if line.elsewhere:
                who.append(" → ", style="dim")
                who.append(_safe_name(line.peer), style=f"bold {name_style(line.peer)}")
            if line.mark is not None:
                body.append(" ")
                body.append(*MARKS[line.mark])
        else:
            who = Text()
            if line.elsewhere:
                who.append("↪ ", style="bold")
                body.stylize(ELSEWHERE_TEXT_STYLE)
            who.append(_safe_name(line.sender), style=f"bold {name_style(line.sender)}")
            if self._mention is not None:
                body.highlight_regex(self._mention, MENTION_STYLE)
        if line.delayed:
            body.append(" (delayed)", style="dim")
        return _Row(time, who, body)


def _system_row(time: Text, line: SystemLine) -> _Row:
    marker, marker_style, text_style = SYSTEM_STYLES.get(line.kind, SYSTEM_STYLES["info"])
    return _Row(time, Text(marker, style=marker_style), Text(safe_text(line.text), text_style))


@dataclass(frozen=True)
class DateRule:
    """A dim rule naming a day, e.g. "── Tuesday, 24 November 2026 ──".

    Narrow consoles get a shorter name ("Tue 24 Nov 2026", then "2026-11-24") rather
    than a cut-off one.
    """

    day: date

    def titles(self) -> tuple[str, str, str]:
        """The day's names, longest first."""
        d = self.day
        return (f"{d:%A}, {d.day} {d:%B %Y}", f"{d:%a} {d.day} {d:%b %Y}", d.isoformat())

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        titles = self.titles()
        # Keep at least "── " on each side of the title.
        title = next((t for t in titles if cell_len(t) + 6 <= options.max_width), titles[-1])
        yield Rule(Text(title, style=DATE_STYLE), characters="─", style=DATE_STYLE)


def render_plain(lines: Iterable[Line], me: str, width: int = 80, tz: tzinfo | None = None) -> str:
    """Render `lines` as plain text, the way a colourless terminal of `width` cells shows them.

    Meant for tests and for screenshots in documentation; trailing spaces are removed.

    Args:
        lines: the transcript, oldest first.
        me: our display name.
        width: terminal width in cells.
        tz: the zone to show times in; None means the local zone.

    Returns:
        The printed text, one terminal row per line, ending in a newline.
    """
    buffer = io.StringIO()
    console = Console(file=buffer, width=width, color_system=None, force_terminal=False)
    renderer = TranscriptRenderer(me, tz=tz)
    for line in lines:
        for renderable in renderer.render(line):
            console.print(renderable)
    return "".join(row.rstrip() + "\n" for row in buffer.getvalue().splitlines())
