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

from mangogram_proto.keys import user_config_dir

log = logging.getLogger(__name__)


def config_dir() -> Path:
    """The user config dir (`MANGOGRAM_CONFIG_DIR` overrides, e.g. for tests); the SDK keeps
    the identity and pinned server keys there too."""
    return user_config_dir()


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
    return {k: str(v) for k, v in data.items() if k in ("server", "name", "to")}


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
