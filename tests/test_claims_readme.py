"""Claims in README.md that had no test behind them: the "Broker options" table (every
flag, its environment variable, its default, flags winning) and where the client's
settings come from."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from mangogram_broker.config import build_parser, parse_config
from mangogram_client import cli as client_cli
from mangogram_client import scripting
from mangogram_proto.constants import DEFAULT_ENDPOINT
from mangogram_proto.keys import key_endpoint_for

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"

# A value other than the default for each flag of the table, as typed on a command line.
OTHER_VALUES = {
    "--bind": "tcp://127.0.0.1:7000",
    "--key-bind": "tcp://127.0.0.1:7101",
    "--data": "elsewhere",
    "--log-level": "DEBUG",
    "--durability": "normal",
    "--key-file": "cluster.json",
}
# A third value, given as a flag while the variable holds the one above.
FLAG_VALUES = {
    "--bind": "tcp://127.0.0.1:7002",
    "--key-bind": "tcp://127.0.0.1:7102",
    "--data": "third",
    "--log-level": "WARNING",
    "--durability": "full",
    "--key-file": "third.json",
}
# The BrokerConfig value each flag lands in, where it is not simply a field of that name.
READ_BACK = {
    "--data": lambda c: str(c.data_dir),
    "--key-file": lambda c: c.key_file.as_posix(),
    "--key-bind": lambda c: c.key_bind,
    "--retention-days": lambda c: (c.retention.max_age_ms or 0) // 86_400_000,
    "--retention-messages": lambda c: c.retention.keep_per_user or 0,
}


def broker_options_table() -> list[tuple[list[str], list[str], str]]:
    """README's "Broker options" rows: (flags, environment tokens, default cell)."""
    text = README.read_text(encoding="utf-8")
    section = text.split("## Broker options", 1)[1].split("\n#", 1)[0]
    rows = []
    for line in section.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) != 3 or cells[0] in ("flag", "---"):
            continue
        flags = re.findall(r"`(--[a-z-]+)", cells[0])
        envs = re.findall(r"`([A-Z_…]+)(?:=[^`]*)?`", cells[1])
        rows.append((flags, envs, cells[2]))
    return rows


def env_for(flag: str, tokens: list[str]) -> str:
    """The variable the README names for `flag`, expanding its abbreviations:
    `MANGOGRAM_RATE_…` (a prefix), `MANGOGRAM_…_RATE` (a prefix and a suffix) and
    `_BYTES` (the second flag's suffix)."""
    wanted = "MANGOGRAM_" + flag.lstrip("-").replace("-", "_").upper()
    for token in tokens:
        if token == wanted:
            return token
        if "…" in token:
            head, tail = token.split("…", 1)
            if wanted.startswith(head) and wanted.endswith(tail):
                return wanted
        if token.startswith("_") and wanted.endswith(token) and len(tokens) > 1:
            return wanted
    raise AssertionError(f"README names no environment variable for {flag}: {tokens}")


def read_back(config, flag: str):
    if flag in READ_BACK:
        return READ_BACK[flag](config)
    if flag.endswith("-rate") and flag != "--rate-per-second":
        return getattr(config.rates, flag[2 : -len("-rate")])
    field = flag.lstrip("-").replace("-", "_")
    if hasattr(config.limits, field):
        return getattr(config.limits, field)
    return getattr(config, field)


@pytest.fixture
def clean_env(monkeypatch):
    for name in list(os.environ):
        if name.startswith("MANGOGRAM_"):
            monkeypatch.delenv(name)
    return monkeypatch


def test_the_table_covers_the_flags_it_promises():
    rows = broker_options_table()
    documented = {flag for flags, _, _ in rows for flag in flags}
    assert len(rows) >= 15, "README's broker options table could not be read"
    parser_flags = {f for action in build_parser()._actions for f in action.option_strings}
    assert documented <= parser_flags, documented - parser_flags
    help_text = build_parser().format_help()
    for flag in documented:
        assert flag in help_text, f"broker.py --help does not list {flag}"


def test_every_documented_variable_sets_its_flag_and_the_flag_wins(clean_env):
    """README: "Every flag has an environment variable; flags win." For each row: the
    variable changes the setting, and the flag given as well overrides the variable."""
    for flags, tokens, _default in broker_options_table():
        for flag in flags:
            if flag in ("--release-name", "--insecure-plaintext"):
                continue  # no variable / a switch: tested below
            default = read_back(parse_config([]), flag)
            other = OTHER_VALUES.get(flag) or str(default + 1)
            env = env_for(flag, tokens)
            clean_env.setenv(env, other)
            from_env = parse_config([])
            assert str(read_back(from_env, flag)) == other, f"{env} did not set {flag}"
            assert f"[{env}]" in build_parser().format_help(), f"--help hides {env}"
            if flag == "--durability":
                clean_env.setenv(env, "normal")
            flag_value = FLAG_VALUES.get(flag) or str(default + 2)
            both = parse_config([flag, flag_value])
            assert str(read_back(both, flag)) == flag_value, f"{env} beat {flag}"
            clean_env.delenv(env)


def test_the_plaintext_switch_and_its_variable(clean_env):
    assert parse_config([]).plaintext is False
    assert parse_config(["--insecure-plaintext"]).plaintext is True
    clean_env.setenv("MANGOGRAM_INSECURE_PLAINTEXT", "on")
    assert parse_config([]).plaintext is True
    clean_env.setenv("MANGOGRAM_INSECURE_PLAINTEXT", "0")
    assert parse_config(["--insecure-plaintext"]).plaintext is True  # the flag wins


def test_documented_defaults_are_the_defaults(clean_env):
    config = parse_config([])
    checked = 0
    for flags, _tokens, default in broker_options_table():
        if flags[0] in ("--release-name", "--insecure-plaintext", "--key-bind"):
            continue
        values = [read_back(config, flag) for flag in flags]
        if all(isinstance(v, int) for v in values):
            numbers = [int(n.replace(",", "")) for n in re.findall(r"\d[\d,]*", default)]
            assert numbers[: len(values)] == values, f"{flags}: README says {default!r}"
        else:
            assert f"`{values[0]}`" in default, f"{flags}: README says {default!r}"
        checked += 1
    assert checked >= 12
    assert parse_config([]).key_bind is None  # derived, as the table says: the bind port + 1
    assert key_endpoint_for(DEFAULT_ENDPOINT) == "tcp://127.0.0.1:5556"
    assert config.plaintext is False  # "off"


class Recorder:
    """Stands in for the script modes' network part: records where main() sends."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, str]] = []

    def send_one(self, server, name, to, text, security) -> int:
        self.calls.append((server, name, to))
        return 0


@pytest.fixture
def client_main(clean_env, tmp_path):
    config_dir = tmp_path / "config"
    config_dir.mkdir()
    clean_env.setenv("MANGOGRAM_CONFIG_DIR", str(config_dir))
    recorder = Recorder()
    clean_env.setattr(scripting, "send_one", recorder.send_one)
    clean_env.setattr(scripting, "use_utf8_streams", lambda: None)

    def run(*argv: str) -> tuple[str, str, str]:
        assert client_cli.main([*argv, "--send", "hi"]) == 0
        return recorder.calls.pop()

    return run, config_dir, clean_env


def test_client_settings_come_from_flags_then_variables_then_file_then_last_time(client_main):
    """README "Chatting": flags, then MANGOGRAM_SERVER / _NAME / _TO, then config.toml in
    the user config directory, then the server used last time."""
    run, config_dir, env = client_main
    assert run("--name", "n", "--to", "t")[0] == DEFAULT_ENDPOINT
    (config_dir / "state.json").write_text(
        json.dumps({"server": "tcp://127.0.0.1:4001", "name": "last"}), encoding="utf-8"
    )
    assert run("--name", "n", "--to", "t")[0] == "tcp://127.0.0.1:4001"
    (config_dir / "config.toml").write_text(
        'server = "tcp://127.0.0.1:4002"\nname = "file"\nto = "file_to"\n', encoding="utf-8"
    )
    assert run() == ("tcp://127.0.0.1:4002", "file", "file_to")
    env.setenv("MANGOGRAM_SERVER", "tcp://127.0.0.1:4003")
    env.setenv("MANGOGRAM_NAME", "env")
    env.setenv("MANGOGRAM_TO", "env_to")
    assert run() == ("tcp://127.0.0.1:4003", "env", "env_to")
    assert run("--server", "tcp://127.0.0.1:4004", "--name", "flag", "--to", "flag_to") == (
        "tcp://127.0.0.1:4004",
        "flag",
        "flag_to",
    )


def test_client_config_flag_names_another_file(client_main, tmp_path):
    run, _config_dir, _env = client_main
    other = tmp_path / "other.toml"
    other.write_text('server = "tcp://127.0.0.1:4005"\nname = "o"\nto = "p"\n', encoding="utf-8")
    assert run("--config", str(other)) == ("tcp://127.0.0.1:4005", "o", "p")
    with pytest.raises(SystemExit, match="config file not found"):
        client_cli.main(["--config", str(tmp_path / "missing.toml"), "--send", "x"])


def test_client_help_documents_the_readme_flags_and_config_path(client_main, capsys):
    _run, config_dir, _env = client_main
    with pytest.raises(SystemExit) as done:
        client_cli.main(["--help"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    readme = README.read_text(encoding="utf-8")
    for flag in sorted(set(re.findall(r"`(--[a-z-]+)", readme.split("## Docker")[0]))):
        assert flag in out, f"README documents client flag {flag}; client.py --help lacks it"
    for variable in ("MANGOGRAM_SERVER", "MANGOGRAM_NAME", "MANGOGRAM_TO", "MANGOGRAM_SERVER_KEY"):
        assert variable in out
    assert str(config_dir / "config.toml") in out.replace("\n", "")


@pytest.mark.sockets
def test_any_number_of_piped_lines_are_all_accepted_and_arrive_in_order(tmp_path, zctx):
    """README: piped input is read only as fast as the broker accepts it (at most 512
    lines await their answer), so any number of lines can be piped in; exit 0 once every
    line was accepted. 1,200 lines is more than twice that window. The broker's rate limit
    is raised so that the test measures the window, not the pacing."""
    from mangogram_proto import Client

    from .conftest import BrokerProcess

    lines = [f"рядок {i}" for i in range(1200)]
    broker = BrokerProcess(
        tmp_path / "data", "--rate-per-second", "100000", "--rate-burst", "100000"
    )
    try:
        with Client("Тарас", broker.endpoint, context=zctx):
            pass  # registers the name; the mail waits in the store
        done = subprocess.run(
            [sys.executable, str(ROOT / "client.py"), "--server", broker.endpoint,
             "--name", "Олена", "--to", "Тарас"],
            input="".join(line + "\n" for line in lines),
            env=dict(os.environ, MANGOGRAM_CONFIG_DIR=str(tmp_path / "config")),
            capture_output=True, text=True, encoding="utf-8", timeout=120,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr[-2000:]
        with Client("Тарас", broker.endpoint, context=zctx) as taras:
            got = [taras.receive(timeout=10).text for _ in lines]
        assert got == lines
    finally:
        broker.kill()
    assert "Traceback" not in broker.log_text()


def imported_modules(path: Path) -> set[str]:
    import ast

    tree = ast.parse(path.read_text(encoding="utf-8"))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_only_the_socket_and_key_modules_of_the_sdk_import_zmq():
    """README "Architecture": in mangogram_proto only the socket and key modules import
    zmq; the codec, session and the rest are sans-I/O."""
    socket_and_key = {"aio.py", "client.py", "transport.py", "keys.py"}
    importers = {
        path.name
        for path in (ROOT / "mangogram_proto").glob("*.py")
        if "zmq" in imported_modules(path)
    }
    assert importers <= socket_and_key, importers - socket_and_key


@pytest.mark.parametrize("module", ["core.py", "registry.py", "store.py", "connections.py"])
def test_the_brokers_routing_rules_touch_no_sockets(module):
    """README: core.py is pure routing rules (frames and a clock in, messages out)."""
    imports = imported_modules(ROOT / "mangogram_broker" / module)
    assert not imports & {"zmq", "socket", "asyncio", "selectors", "threading"}, imports


def test_the_compose_file_has_the_documented_defaults():
    """README "Docker": ports 5555 and 5556 (MANGOGRAM_PORT / MANGOGRAM_KEY_PORT), the
    image mangogram-broker (MANGOGRAM_IMAGE), data in the mangogram-data volume at /data,
    restart unless-stopped; the image runs as uid 10001. The engine test overrides all
    of these, so their defaults are checked here."""
    compose = (ROOT / "docker-compose.yml").read_text(encoding="utf-8")
    assert "image: ${MANGOGRAM_IMAGE:-mangogram-broker}" in compose
    assert '"${MANGOGRAM_PORT:-5555}:5555"' in compose
    assert '"${MANGOGRAM_KEY_PORT:-5556}:5556"' in compose
    assert re.search(r"^\s+- mangogram-data:/data$", compose, re.M)
    assert re.search(r"^  mangogram-data:$", compose, re.M)  # a named volume
    assert re.search(r"^\s+restart: unless-stopped$", compose, re.M)
    dockerfile = (ROOT / "Dockerfile").read_text(encoding="utf-8")
    assert re.search(r"^USER 10001(:10001)?$", dockerfile, re.M)
    assert "MANGOGRAM_DATA=/data" in dockerfile


def test_the_readme_python_examples_compile_and_use_the_sdk_as_it_is():
    import inspect

    import mangogram_proto

    readme = README.read_text(encoding="utf-8")
    blocks = re.findall(r"```python\n(.*?)```", readme, re.S)
    assert len(blocks) >= 2
    for block in blocks:
        compile(block, "README.md", "exec")
        for names in re.findall(r"from mangogram_proto import (.+)", block):
            for name in names.split(","):
                assert hasattr(mangogram_proto, name.strip()), name
    # The parameters the README names in prose.
    for cls, parameter in (
        (mangogram_proto.Client, "server_key"),
        (mangogram_proto.Client, "identity"),
        (mangogram_proto.Client, "trust_new_server"),
        (mangogram_proto.Bot, "server_key"),
        (mangogram_proto.Bot, "identity"),
    ):
        assert parameter in inspect.signature(cls).parameters, (cls.__name__, parameter)
    assert "trust_new_server" not in inspect.signature(mangogram_proto.Bot).parameters
    assert "wait" in inspect.signature(mangogram_proto.Client.send).parameters
    assert "timeout" in inspect.signature(mangogram_proto.Client.receive).parameters
    assert hasattr(mangogram_proto.Client, "confirm")
    assert "confirm" in inspect.signature(mangogram_proto.Client.close).parameters
