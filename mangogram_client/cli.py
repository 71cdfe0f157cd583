"""`python client.py`: flags, settings and the choice between chat and script modes."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from mangogram_proto import loops
from mangogram_proto.constants import DEFAULT_ENDPOINT
from mangogram_proto.env import SettingError, env_bool, env_key
from mangogram_proto.keys import (
    KeyFileError,
    fingerprint,
    load_or_create_keypair,
    save_keypair,
    user_config_dir,
)

from .commands import help_lines
from .settings import config_dir, load_config_file, load_remembered, normalise_servers

EPILOG = """\
interactive commands:
%s

settings: flags win over MANGOGRAM_SERVER / MANGOGRAM_NAME / MANGOGRAM_TO, which win over
the config file (%s), which wins over the server and name remembered from last time.
"""


def export_identity(source: Path | None, target: Path) -> int:
    """Copy the identity key pair so the same name can be used on another machine."""
    path = source or Path(
        os.environ.get("MANGOGRAM_IDENTITY") or user_config_dir() / "identity.json"
    )
    try:
        pair, _created = load_or_create_keypair(path)
        save_keypair(target, pair)
    except (KeyFileError, OSError) as exc:
        print(f"mangogram: {exc}", file=sys.stderr)
        return 1
    print(
        f"identity {fingerprint(pair.public)} written to {target}; keep it secret. On the other"
        f" machine: client.py --identity {target.name} (or copy it to identity.json in its config"
        " dir)",
        file=sys.stderr,
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="client.py",
        description="MangoGram console client: private messages in your terminal.",
        epilog=EPILOG % ("\n".join(f"  {h}" for h in help_lines()), config_dir() / "config.toml"),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--server",
        help="broker address: host, host:port or tcp://host:port"
        f" (default {DEFAULT_ENDPOINT}); for a cluster, several separated by commas"
        " (tcp://a:5555,tcp://b:5555): the client connects to the first and, when the"
        " connection is lost, logs in again at the next, resuming its session"
        " [MANGOGRAM_SERVER]",
    )
    parser.add_argument("--name", help="your user name (asked for if missing)")
    parser.add_argument("--to", help="whom to talk to (opens that conversation)")
    parser.add_argument("--config", type=Path, help="config file (TOML with server, name, to)")
    parser.add_argument(
        "--server-key",
        help="the broker's public key (Z85, as the broker logs it); default: the key pinned"
        " for this server, or learned on first use after you check its fingerprint"
        " [MANGOGRAM_SERVER_KEY]",
    )
    parser.add_argument(
        "--identity",
        type=Path,
        help="your key pair file (default: identity.json in the config dir, created on first"
        " run) [MANGOGRAM_IDENTITY]",
    )
    parser.add_argument(
        "--export-identity",
        metavar="FILE",
        type=Path,
        help="copy your identity to FILE (mode 0600) to use your name on another machine;"
        " then exit",
    )
    parser.add_argument(
        "--insecure-plaintext",
        action="store_true",
        help="development only: talk to a plaintext broker on loopback"
        " [MANGOGRAM_INSECURE_PLAINTEXT=1]",
    )
    parser.add_argument(
        "--no-bell",
        action="store_true",
        help="no terminal bell for a message in another conversation (config: bell = false)",
    )
    parser.add_argument(
        "--no-title",
        action="store_true",
        help="leave the window title alone; by default it shows the unread count"
        " (config: title = false)",
    )
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--send", metavar="TEXT", help="send TEXT to --to and exit once accepted")
    mode.add_argument("--listen", action="store_true", help="print incoming messages; no prompt")
    parser.add_argument("--json", action="store_true", help="with --listen: one JSON per line")
    parser.add_argument("--log-level", default=os.environ.get("MANGOGRAM_LOG_LEVEL", "WARNING"))
    return parser


def glue_key_values(argv: list[str]) -> list[str]:
    """Join `--server-key VALUE` into `--server-key=VALUE`: a Z85 key can begin with "-",
    which argparse would otherwise take for an option."""
    glued: list[str] = []
    values = iter(argv)
    for arg in values:
        if arg == "--server-key":
            glued.append(f"--server-key={next(values, '')}")
        else:
            glued.append(arg)
    return glued


def _enabled(setting: str | None) -> bool:
    """A config file switch: on unless it says false (TOML's false arrives as "False")."""
    return setting is None or setting.strip().lower() not in ("false", "0", "no", "off")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(glue_key_values(sys.argv[1:] if argv is None else argv))
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    config = load_config_file(args.config)
    remembered = load_remembered()
    given_server = args.server or os.environ.get("MANGOGRAM_SERVER") or config.get("server")
    try:
        server = normalise_servers(given_server or remembered.server or DEFAULT_ENDPOINT)
    except ValueError as exc:
        parser.error(str(exc))
    name = args.name or os.environ.get("MANGOGRAM_NAME") or config.get("name")
    to = args.to or os.environ.get("MANGOGRAM_TO") or config.get("to")
    if args.json and not args.listen:
        parser.error("--json goes with --listen")
    try:
        env_bool("MANGOGRAM_INSECURE_PLAINTEXT")
        env_key("MANGOGRAM_SERVER_KEY")
    except SettingError as exc:
        parser.error(str(exc))
    if args.server_key is not None and not args.server_key.strip():
        # An empty value (often a variable that expanded to nothing) must not fall back
        # to trusting whatever key the network announces.
        parser.error(
            "--server-key is empty; give the broker's key (it logs it at start) or leave"
            " the option out"
        )
    if args.export_identity is not None:
        return export_identity(args.identity, args.export_identity)
    security = {
        "server_key": args.server_key,
        "identity": args.identity,
        "plaintext": True if args.insecure_plaintext else None,
    }

    from . import scripting

    if args.send is not None or args.listen or not sys.stdin.isatty():
        if not name:
            parser.error("--name (or MANGOGRAM_NAME) is required without a terminal")
        scripting.use_utf8_streams()
        if args.listen:
            return scripting.listen(server, name, args.json, security)
        if not to:
            parser.error("--to (or MANGOGRAM_TO) is required to send")
        if args.send is not None:
            return scripting.send_one(server, name, to, args.send, security)
        return scripting.send_lines(server, name, to, sys.stdin, security)

    from .app import ChatApp

    # Ask for what was not given, offering last time's answer (or the default) to accept.
    app = ChatApp(
        server,
        name,
        peer=to,
        default_name=remembered.name,
        ask_server=not given_server,
        security=security,
        bell=not args.no_bell and _enabled(config.get("bell")),
        title=not args.no_title and _enabled(config.get("title")),
    )
    try:
        return loops.run(app.run())
    except KeyboardInterrupt:
        return 0
