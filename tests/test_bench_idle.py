"""The idle-clients benchmark (bench.idle) holds its clients and counts every login's
answer. Small counts only: it measures nothing here (see `python -m bench --idle`)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from bench import idle
from bench.load import source_endpoint

from .conftest import ROOT

pytestmark = pytest.mark.e2e

SOURCES = 2 if sys.platform.startswith("linux") else 0  # only Linux answers on 127/8


def test_idle_clients_are_held_on_both_systems_and_every_login_is_counted(tmp_path):
    report = idle.idle_report(40, tmp_path, per_process=20, sources=SOURCES)
    runs = {run["system"]: run for run in report["idle"]}  # type: ignore[attr-defined]
    assert set(runs) == {"mangogram", "limit-curve"}
    for run in runs.values():
        assert (run["clients"], run["welcomed"], run["refused"]) == (40, 40, 0)
        assert run["holders"] == 2 and run["sources"] == SOURCES
        assert run["login_s"] > 0 and isinstance(run["kb_per_client"], float)
    assert isinstance(report["idle_memory_to_limit_curve"], float)


def test_refused_logins_are_counted_and_fail_the_run(tmp_path, monkeypatch):
    from bench import __main__ as bench_main

    flags = list(bench_main.BROKER_BENCH_FLAGS)
    flags[flags.index("--max-sessions") + 1] = "10"
    monkeypatch.setattr(bench_main, "BROKER_BENCH_FLAGS", flags)
    with pytest.raises(idle.IdleRunFailed, match=r"10 of 30 logins welcomed .*server_full"):
        idle.measure_idle("mangogram", 30, tmp_path, per_process=15, sources=SOURCES)


def test_a_server_that_cannot_open_enough_files_is_refused_before_any_client(tmp_path, monkeypatch):
    monkeypatch.setattr(idle, "open_file_limit", lambda _process: 150)

    def no_holders(*_args: object) -> list[subprocess.Popen[str]]:
        raise AssertionError("holders were started")

    monkeypatch.setattr(idle, "start_holders", no_holders)
    with pytest.raises(idle.IdleRunFailed, match="at most 150 files, and 100 clients"):
        idle.measure_idle("limit-curve", 100, tmp_path)
    assert idle.measure_idle  # the server was stopped by the finally: nothing to clean here


def test_fifty_thousand_clients_are_the_default():
    assert idle.DEFAULT_CLIENTS == 50_000


def test_the_holders_connect_from_source_addresses_in_turns():
    assert (
        source_endpoint("tcp://127.0.0.1:5555", "127.0.0.3") == "tcp://127.0.0.3:0;127.0.0.1:5555"
    )
    assert source_endpoint("tcp://127.0.0.1:5555", None) == "tcp://127.0.0.1:5555"
    assert [idle.source_address(n, 3) for n in range(4)] == [
        "127.0.0.2", "127.0.0.3", "127.0.0.4", "127.0.0.2",
    ]  # fmt: skip
    assert idle.source_address(5, 0) is None


def test_the_bench_runs_the_idle_test_alone_with_json_keys():
    done = subprocess.run(
        [sys.executable, "-m", "bench", "--idle", "20", "--json"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert [run["system"] for run in report["idle"]] == ["mangogram", "limit-curve"]
    assert all(run["welcomed"] == 20 for run in report["idle"])
    assert "idle_memory_to_limit_curve" in report
