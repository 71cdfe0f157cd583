"""Claims in docs/security.md that had no test behind them: the limits table's defaults,
and plaintext mode being refused away from loopback on both ends."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from mangogram_broker import core, shell
from mangogram_broker.config import build_parser, parse_config
from mangogram_proto import constants
from mangogram_proto.keys import ServerKeyError, is_loopback_endpoint, resolve_security

ROOT = Path(__file__).resolve().parent.parent
SECURITY_MD = ROOT / "docs" / "security.md"


def limits_table() -> dict[str, tuple[str, str]]:
    """The rows of section 2's "Limits" table: what → (default, set with)."""
    text = SECURITY_MD.read_text(encoding="utf-8")
    section = text.split("### Limits", 1)[1].split("\n### ", 1)[0]
    rows = {}
    for line in section.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) == 4 and cells[0] not in ("What", "---"):
            rows[cells[0]] = (cells[1], cells[2])
    return rows


def thousands(value: int) -> str:
    return f"{value:,}"


@pytest.fixture
def defaults(monkeypatch):
    """The broker's configuration with no flags and no MANGOGRAM_* settings."""
    for name in list(os.environ):
        if name.startswith("MANGOGRAM_"):
            monkeypatch.delenv(name)
    return parse_config([])


def test_limits_table_defaults_are_the_brokers_defaults(defaults):
    rows = limits_table()
    limits = defaults.limits
    expected = {
        "`SEND`s per user name": [limits.rate_per_second, limits.rate_burst],
        "New names per IP address": [defaults.registrations_per_minute],
        "Users online at once": [defaults.max_sessions],
        "Error replies per connection": [core.ERROR_BURST, core.ERROR_RATE_PER_SECOND],
        "Frame size": [limits.max_frame_bytes],
        "JSON body": [limits.max_body_bytes],
        "Text": [limits.max_text_chars, limits.max_text_bytes],
        "Name": [limits.max_name_chars],
        "Message id": [constants.MAX_ID_CHARS],
        "Frames per message": [constants.FRAME_COUNT],
        "Unconfirmed messages per recipient": [limits.max_mailbox],
        "`HISTORY` page": [limits.max_history_page],
        "Silence before a session ends": [
            limits.heartbeat_timeout_ms,
            limits.heartbeat_interval_ms,
        ],
        "Queue towards one connection": [shell.SEND_QUEUE_PER_PEER],
        "Unconfirmed deliveries in flight per session": [core.DELIVERY_WINDOW],
    }
    for what, values in expected.items():
        assert what in rows, f"security.md's limits table lost its {what!r} row"
        default = rows[what][0]
        numbers = [int(n.replace(",", "")) for n in re.findall(r"\d[\d,]*", default)]
        for value in values:
            assert value in numbers, f"{what}: the doc says {default!r}, the broker uses {value}"


def test_limits_table_names_flags_and_constants_that_exist():
    rows = limits_table()
    flags = {flag for action in build_parser()._actions for flag in action.option_strings}
    modules = (constants, core, shell)
    for what, (default, set_with) in rows.items():
        for flag in re.findall(r"`(--[a-z-]+)`", set_with):
            assert flag in flags, f"{what}: {flag} is not a broker flag"
        for name in re.findall(r"`([A-Z][A-Z_]+)`", set_with):
            if name.startswith("ZMQ_"):
                continue  # libzmq's socket option, not a constant of ours
            holders = [m for m in modules if hasattr(m, name)]
            assert holders, f"{what}: no constant {name}"
            value = getattr(holders[0], name)
            numbers = [int(n.replace(",", "")) for n in re.findall(r"\d[\d,]*", default)]
            assert value in numbers, f"{what}: {name} is {value}, the doc says {default!r}"


def test_ref_id_limits_in_the_table_match_the_codec():
    default, _ = limits_table()["Message id"]
    # "`malformed`, with the id as `ref` up to 256 characters (`MAX_REF_CHARS`)" is in the
    # last column, which limits_table drops; read it from the raw line.
    line = next(
        line
        for line in SECURITY_MD.read_text(encoding="utf-8").splitlines()
        if line.startswith("| Message id |")
    )
    assert thousands(constants.MAX_REF_CHARS) in line and "MAX_REF_CHARS" in line
    assert thousands(constants.MAX_ID_CHARS) in default


@pytest.mark.parametrize(
    "endpoint",
    [
        "tcp://127.0.0.1:5555",
        "tcp://127.8.9.10:5555",  # all of 127.0.0.0/8
        "tcp://[::1]:5555",
        "tcp://localhost:5555",
        "ipc:///tmp/mangogram",
        "inproc://mangogram",
    ],
)
def test_loopback_endpoints_named_in_the_doc_allow_plaintext(endpoint):
    assert is_loopback_endpoint(endpoint)


@pytest.mark.parametrize(
    "endpoint",
    [
        "tcp://0.0.0.0:5555",
        "tcp://*:5555",
        "tcp://192.0.2.1:5555",
        "tcp://[::]:5555",
        "tcp://chat.example.org:5555",
        "tcp://localhost.example.org:5555",
        "udp://127.0.0.1:5555",
    ],
)
def test_other_endpoints_do_not_count_as_loopback(endpoint):
    assert not is_loopback_endpoint(endpoint)


def test_broker_refuses_plaintext_mode_on_a_non_loopback_bind(tmp_path):
    """security.md section 4: exit code 2 unless --bind is a loopback address. The address
    is from TEST-NET-1, never assigned to a host, so nothing can listen there even if the
    check went missing; the log line tells the refusal from a failed bind."""
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "broker.py"),
            "--insecure-plaintext",
            "--bind",
            "tcp://192.0.2.1:5555",
            "--data",
            str(tmp_path / "data"),
        ],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=ROOT,
    )
    assert proc.returncode == 2, proc.stderr
    assert "plaintext mode is allowed only on a loopback address" in proc.stderr
    assert "cannot listen" not in proc.stderr


def test_broker_in_plaintext_mode_says_so_in_its_log(broker):
    # The fixture's broker runs in plaintext mode on 127.0.0.1 (tests/conftest.py).
    assert (
        "PLAINTEXT MODE: no encryption and no identity checks; development only"
        in broker.log_text()
    )


def test_client_refuses_plaintext_to_a_remote_endpoint(tmp_path):
    """security.md section 6: a leftover MANGOGRAM_INSECURE_PLAINTEXT=1 cannot downgrade a
    connection to a remote server."""
    with pytest.raises(ServerKeyError, match="not a loopback address"):
        resolve_security("tcp://192.0.2.1:5555", plaintext=True, config_dir=tmp_path)
    assert list(tmp_path.iterdir()) == [], "nothing may be written for a refused endpoint"


def test_client_plaintext_on_loopback_is_allowed_with_a_warning(tmp_path, caplog):
    assert resolve_security("tcp://127.0.0.1:5555", plaintext=True, config_dir=tmp_path) is None
    assert "without encryption" in caplog.text


def test_every_test_the_docs_cite_exists_in_the_file_they_name():
    """Section 5's table (and any other citation) must name tests that exist, in the file
    the row names: a renamed test once left the table pointing at nothing."""
    tests = Path(__file__).resolve().parent
    defined = {
        path.name: set(re.findall(r"^(?:async )?def (test_\w+)", path.read_text("utf-8"), re.M))
        for path in tests.glob("test_*.py")
    }
    everywhere = set().union(*defined.values())
    for doc in (SECURITY_MD, ROOT / "README.md", ROOT / "docs" / "protocol.md"):
        for line in doc.read_text(encoding="utf-8").splitlines():
            cited = re.findall(r"`(test_\w+)`", line)
            files = re.findall(r"\((test_\w+\.py)\)", line)
            for name in cited:
                if name in defined or name + ".py" in defined:
                    continue  # a test file named as a module, not a test
                assert name in everywhere, f"{doc.name} cites {name}, which does not exist"
            for file, names in zip(files, _groups(line), strict=False):
                for name in names:
                    assert name in defined[file], f"{doc.name}: {name} is not in {file}"


def _groups(line: str) -> list[list[str]]:
    """For a table cell like "`a`, `b` (x.py), `c` (y.py)": [[a, b], [c]]."""
    return [re.findall(r"`(test_\w+)`", part) for part in re.split(r"\(test_\w+\.py\)", line)[:-1]]
