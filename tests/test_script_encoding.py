"""The script modes speak UTF-8 whatever the locale says (issue 13 item 3): simulated
with PYTHONIOENCODING=cp1252, what a Windows redirect gets from the ANSI code page."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from mangogram_proto import Client

from .conftest import ROOT, wait_for_line
from .test_confirm import LineReader

pytestmark = pytest.mark.sockets

TEXT = "Привіт, світе 🌻 — ґанок"


def cp1252_env(tmp_path) -> dict[str, str]:
    return dict(
        os.environ,
        MANGOGRAM_CONFIG_DIR=str(tmp_path / "config"),
        PYTHONIOENCODING="cp1252",
        PYTHONUNBUFFERED="1",
    )


@pytest.mark.parametrize("as_json", [True, False])
def test_listen_writes_utf8_under_a_cp1252_locale(broker, zctx, tmp_path, as_json):
    command = [sys.executable, str(ROOT / "client.py"), "--server", broker.endpoint]
    command += ["--name", "Логер", "--listen", *(["--json"] if as_json else [])]
    listener = subprocess.Popen(
        command, env=cp1252_env(tmp_path), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True, encoding="utf-8", errors="backslashreplace",
    )  # fmt: skip
    try:
        wait_for_line(listener.stderr, "listening as")
        lines = LineReader(listener.stdout)
        with Client("Олена", broker.endpoint, context=zctx) as olena:
            olena.send("логер", TEXT, wait=True)
        line = lines.next()
    finally:
        listener.terminate()
        listener.wait(10)
    assert line is not None, listener.stderr.read()
    if as_json:
        assert json.loads(line)["text"] == TEXT
    else:
        assert line == f"Олена: {TEXT}\n"


def test_piped_lines_are_read_as_utf8_under_a_cp1252_locale(broker, zctx, tmp_path):
    with Client("Тарас", broker.endpoint, context=zctx) as taras:
        command = [sys.executable, str(ROOT / "client.py"), "--server", broker.endpoint]
        done = subprocess.run(
            [*command, "--name", "Олена", "--to", "Тарас"],
            input=f"{TEXT}\nдругий рядок\n".encode(),
            env=cp1252_env(tmp_path),
            capture_output=True,
            timeout=60,
        )
        assert done.returncode == 0, done.stderr.decode("utf-8", "backslashreplace")
        texts = [taras.receive(timeout=5).text for _ in range(2)]
    assert texts == [TEXT, "другий рядок"]
