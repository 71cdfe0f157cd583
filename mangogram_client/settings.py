"""Where the client's settings come from: flags, then MANGOGRAM_* variables, then the
config file, then what the user typed last time.

The config file is TOML, `config.toml` in the user config dir (or `--config PATH`):

    server = "tcp://chat.example.org:5555"
    name = "Олена"

The last server and name used are remembered in `state.json` beside it.
"""

from __future__ import annotations

import json
import logging
import tomllib
from dataclasses import dataclass
from pathlib import Path

from mangogram_proto.constants import DEFAULT_ENDPOINT
from mangogram_proto.keys import user_config_dir

log = logging.getLogger(__name__)


def config_dir() -> Path:
    """The user config dir (`MANGOGRAM_CONFIG_DIR` overrides, e.g. for tests); the SDK keeps
    the identity and pinned server keys there too."""
    return user_config_dir()


DEFAULT_PORT = int(DEFAULT_ENDPOINT.rpartition(":")[2])


def normalise_address(text: str) -> str:
    """A broker address as a person types it, made a ZeroMQ endpoint.

    `host`, `host:port`, `tcp://host` and `tcp://host:port` are all accepted (IPv6 in
    brackets, `[::1]:5555`, or bare, `::1`); the port defaults to 5555. `ipc://` and
    `inproc://` endpoints pass unchanged.

    Raises:
        ValueError: not an address; the message says what is wrong, to show the user.
    """
    address = text.strip()
    scheme, sep, rest = address.partition("://")
    if sep and scheme.lower() in ("ipc", "inproc"):
        return address
    if sep and scheme.lower() != "tcp":
        raise ValueError(f"{text!r}: only tcp:// addresses are supported")
    if not sep:
        rest = address
    if rest.startswith("["):
        host, _, tail = rest[1:].partition("]")
        port = tail[1:] if tail.startswith(":") else tail
        host = f"[{host}]"
    elif rest.count(":") > 1:
        host, port = f"[{rest}]", ""  # a bare IPv6 address
    else:
        host, _, port = rest.partition(":")
    if not host or host == "[]" or any(c.isspace() or c in "/@" for c in host):
        raise ValueError(f"{text!r} is not an address; try host, host:port or tcp://host:port")
    if not port:
        return f"tcp://{host}:{DEFAULT_PORT}"
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{text!r}: the port must be a number from 1 to 65535")
    return f"tcp://{host}:{int(port)}"


def normalise_servers(text: str) -> str:
    """One broker address, or several of one cluster separated by commas (each as
    `normalise_address` takes it), as the endpoint list the SDK takes: normalised,
    joined by commas, repeats left out. The client connects to the first and, whenever
    the connection is lost, tries the next.

    Raises:
        ValueError: an item is not an address, or there is none.
    """
    found: list[str] = []
    for item in text.split(","):
        if not item.strip():
            continue
        endpoint = normalise_address(item)
        if endpoint not in found:
            found.append(endpoint)
    if not found:
        raise ValueError(f"{text!r} is not an address; try host, host:port or tcp://host:port")
    return ",".join(found)


@dataclass
class Remembered:
    server: str | None = None
    name: str | None = None


def load_config_file(path: Path | None) -> dict[str, str]:
    """Read the TOML config; a missing default file is fine, a broken one is reported."""
    explicit = path is not None
    path = path or config_dir() / "config.toml"
    try:
        with path.open("rb") as handle:
            data = tomllib.load(handle)
    except FileNotFoundError:
        if explicit:
            raise SystemExit(f"config file not found: {path}") from None
        return {}
    except (tomllib.TOMLDecodeError, OSError) as exc:
        raise SystemExit(f"cannot read config file {path}: {exc}") from None
    return {k: str(v) for k, v in data.items() if k in ("server", "name", "to", "bell", "title")}


def load_remembered() -> Remembered:
    path = config_dir() / "state.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return Remembered()
    if not isinstance(data, dict):
        return Remembered()
    server, name = data.get("server"), data.get("name")
    return Remembered(
        server if isinstance(server, str) else None, name if isinstance(name, str) else None
    )


def save_remembered(server: str, name: str) -> None:
    """Remember the server and name for next time; failure only costs convenience."""
    path = config_dir() / "state.json"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"server": server, "name": name}, ensure_ascii=False), "utf-8")
        tmp.replace(path)
    except OSError as exc:
        log.warning("could not remember settings in %s: %s", path, exc)


def _memory_path() -> Path:
    return config_dir() / "contacts.json"


@dataclass
class ChatMemory:
    """What one server's chats leave for the next run: who we talked with (name key →
    display name) and how many messages each left unread."""

    contacts: dict[str, str]
    unread: dict[str, int]


def load_memory(server: str) -> ChatMemory:
    """The contacts and unread counts saved for `server`; empty if none or unreadable."""
    try:
        saved = json.loads(_memory_path().read_text(encoding="utf-8"))[server]
        contacts, unread = saved["contacts"], saved["unread"]
    except (OSError, ValueError, KeyError, TypeError):
        return ChatMemory({}, {})
    if not isinstance(contacts, dict) or not isinstance(unread, dict):
        return ChatMemory({}, {})
    return ChatMemory(
        {k: v for k, v in contacts.items() if isinstance(k, str) and isinstance(v, str)},
        {k: n for k, n in unread.items() if isinstance(k, str) and isinstance(n, int) and n > 0},
    )


def save_memory(server: str, memory: ChatMemory) -> None:
    """Keep `memory` for `server` (other servers' entries stay); failure is only logged."""
    path = _memory_path()
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(data, dict):
            data = {}
    except (OSError, ValueError):
        data = {}
    data[server] = {"contacts": memory.contacts, "unread": memory.unread}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, ensure_ascii=False), "utf-8")
        tmp.replace(path)
    except OSError as exc:
        log.warning("could not save contacts in %s: %s", path, exc)
