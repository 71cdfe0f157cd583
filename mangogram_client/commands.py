"""What a typed line means: a command, a message, or a mistake to explain."""

from __future__ import annotations

from dataclasses import dataclass

#: Every interactive command with what it does: `/help` and `client.py --help` show it.
COMMANDS: tuple[tuple[str, str], ...] = (
    ("/to NAME", "talk to NAME (Tab completes names)"),
    ("text", "send text to the open conversation"),
    ("@NAME text", "send one message to NAME, staying where you are"),
    ("/history [N]", "the last N messages (20) with the open conversation"),
    ("/users", "who is online"),
    ("/help", "list these commands"),
    ("/exit", "leave (or Ctrl-D; Ctrl-C clears the line, then leaves)"),
    ("//text", "send text that starts with /"),
)


def help_lines() -> list[str]:
    """The commands as an aligned list, one a line."""
    width = max(len(command) for command, _ in COMMANDS)
    return [f"{command.ljust(width)}  {what}" for command, what in COMMANDS]


DEFAULT_HISTORY = 20
MAX_HISTORY = 200


@dataclass(frozen=True)
class SwitchPeer:
    name: str


@dataclass(frozen=True)
class ListUsers:
    pass


@dataclass(frozen=True)
class ShowHistory:
    count: int = DEFAULT_HISTORY


@dataclass(frozen=True)
class ShowHelp:
    pass


@dataclass(frozen=True)
class Exit:
    pass


@dataclass(frozen=True)
class SendText:
    """Send `text`; `to` None means the conversation currently open."""

    text: str
    to: str | None = None


@dataclass(frozen=True)
class Nothing:
    """An empty line."""


@dataclass(frozen=True)
class Hint:
    """The line cannot be acted on; show `text` and keep what the user typed in mind."""

    text: str


Command = SwitchPeer | ListUsers | ShowHistory | ShowHelp | Exit | SendText | Nothing | Hint

_ALIASES = {
    "to": "to",
    "query": "to",
    "msg": "to",
    "users": "users",
    "who": "users",
    "help": "help",
    "?": "help",
    "history": "history",
    "log": "history",
    "exit": "exit",
    "quit": "exit",
}


def parse_input(line: str) -> Command:
    """Interpret one line typed at the prompt."""
    line = line.rstrip("\r\n")
    if not line.strip():
        return Nothing()
    if line.startswith("//"):
        return SendText(line[1:])
    if line.startswith("/"):
        word, _, rest = line[1:].partition(" ")
        command = _ALIASES.get(word.lower())
        rest = rest.strip()
        if command == "to":
            if not rest or " " in rest:
                return Hint("usage: /to NAME")
            return SwitchPeer(rest.lstrip("@"))
        if command == "history":
            if not rest:
                return ShowHistory()
            if not rest.isdigit() or not 0 < int(rest) <= MAX_HISTORY:
                return Hint(f"usage: /history [N], N from 1 to {MAX_HISTORY}")
            return ShowHistory(int(rest))
        if command in ("users", "help", "exit") and rest:
            return Hint(f"/{word} takes no arguments")
        if command == "users":
            return ListUsers()
        if command == "help":
            return ShowHelp()
        if command == "exit":
            return Exit()
        return Hint(f"unknown command /{word} — type /help for the list")
    if line.startswith("@"):
        name, _, text = line[1:].partition(" ")
        if not name:
            return Hint("usage: @NAME message")
        if not text.strip():
            return Hint(f"usage: @{name} message (or /to {name} to switch)")
        return SendText(text, to=name)
    return SendText(line)
