"""The benchmark runs end to end and reports what README promises. It measures nothing
here: speeds are for `python -m bench`, never asserted in a test."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import psutil
import pytest

from bench import cluster_systems, prosody

from .conftest import ROOT

pytestmark = pytest.mark.e2e


def test_bench_reports_every_system_with_ratios():
    # Its own session, so that on a timeout the servers and generators it started go too.
    bench = subprocess.Popen(
        [sys.executable, "-m", "bench", "--sizes", "10", "--window", "0.3", "--no-memory",
         "--rtt-count", "40", "--repeat", "2", "--storm", "0", "--json"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True,
    )  # fmt: skip
    try:
        out, err = bench.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        if hasattr(os, "killpg"):  # POSIX: the whole session; elsewhere the bench alone
            os.killpg(bench.pid, signal.SIGKILL)
        else:
            bench.kill()
        bench.communicate()
        raise
    assert bench.returncode == 0, err[-3000:]
    report = json.loads(out)
    systems = {"mangogram", "mangogram-normal", "mangogram-memory", "mangogram-plaintext",
               "limit", "limit-curve", "thread-server"}  # fmt: skip
    # Prosody is measured where it is installed and skipped, said so, where it is not.
    # So are the cluster systems (bench/cluster_systems.py) without nats-server.
    expected_skips = set()
    if prosody.missing() is None:
        systems.add("prosody")
    else:
        expected_skips.add("prosody")
        assert "prosody: skipped" in err
    if cluster_systems.missing() is None:
        systems.update(cluster_systems.SYSTEMS)
    else:
        expected_skips.update(cluster_systems.SYSTEMS)
    assert set(report["skipped"]) == expected_skips
    assert {run["system"] for run in report["runs"]} == systems
    assert all(run["n"] == 10 and run["msgs_per_s"] > 0 for run in report["runs"])
    # Each system was measured twice (in turns, each in a fresh data directory), and the
    # slower of the two is the one reported.
    for run in report["runs"]:
        assert len(run["msgs_per_s_runs"]) == 2
        assert run["msgs_per_s"] == min(run["msgs_per_s_runs"])
    assert 0 <= report["machine"]["busy_percent_before"] <= 100
    # The generator's share of the machine is reported beside the server's.
    assert all(run["load_cpu_us_per_msg"] > 0 for run in report["runs"])
    assert {r["system"] for r in report["rtt"]} == systems
    assert all(r["p50_us"] <= r["p99_us"] <= r["p999_us"] for r in report["rtt"])
    assert set(report["ratios"]) >= {
        "mangogram_to_limit_n100",
        "mangogram_to_limit_n1000",
        "mangogram_to_thread_server_n1000",
        "rtt_p99_to_limit",
        "mangogram_to_limit_curve_n100",
        "mangogram_to_limit_curve_n1000",
        "rtt_p99_to_limit_curve",
        "mangogram_to_prosody_n100",
    }
    assert report["ratios"]["rtt_p99_to_limit_curve"] > 0


@pytest.mark.parametrize("system", ["mangogram", "limit"])
def test_idle_clients_memory_is_measured_for_mangogram_and_the_limit(system, tmp_path):
    from bench.__main__ import measure_memory

    result = measure_memory(20, tmp_path, system)
    assert result["clients"] == 20
    assert isinstance(result["kb_per_client"], float)
    assert result["connect_s"] > 0


def test_the_median_attempt_is_reported_whole():
    from bench.__main__ import median_run

    attempts = [
        {"system": "limit", "n": 1, "msgs_per_s": rate, "cpu_us_per_msg": cpu}
        for rate, cpu in ((30.0, 3.0), (10.0, 1.0), (20.0, 2.0))
    ]
    chosen = median_run(attempts)
    assert (chosen["msgs_per_s"], chosen["cpu_us_per_msg"]) == (20.0, 2.0)
    assert chosen["msgs_per_s_runs"] == [30.0, 10.0, 20.0]
    assert "msgs_per_s_runs" not in attempts[2]  # the attempts themselves are left alone


def test_a_busy_machine_is_warned_about():
    from bench.__main__ import BUSY_WARNING_PERCENT, busy_warning

    assert busy_warning(BUSY_WARNING_PERCENT) is None
    warning = busy_warning(55.0)
    assert warning is not None and "55% busy" in warning


def test_the_servers_cpu_is_sampled_on_the_generators_window_lines():
    from bench.__main__ import window_cpu

    # A stand-in that is generator and server at once: it burns 0.6 s of CPU before its
    # window, 0.3 s inside it and 0.6 s after. Sampled on the lines, the window holds
    # about 0.3 s; sampled any earlier or later, 0.9 s or more.
    script = (
        "import time\n"
        "def burn(seconds):\n"
        "    end = time.process_time() + seconds\n"
        "    while time.process_time() < end:\n"
        "        pass\n"
        "burn(0.6)\n"
        "print('window-start', flush=True)\n"
        "burn(0.3)\n"
        "print('window-end', flush=True)\n"
        "burn(0.6)\n"
        "print('{\"delivered\": 7}', flush=True)\n"
    )
    load = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    before, after, result = window_cpu(load, psutil.Process(load.pid))
    assert result == {"delivered": 7}
    assert before is not None and after is not None
    assert 0.25 <= after - before < 0.6
    assert load.returncode == 0


def test_a_generator_that_hangs_is_killed_and_reports_nothing():
    from bench.__main__ import window_cpu

    script = "import time\nprint('window-start', flush=True)\ntime.sleep(600)\n"
    load = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    before, after, result = window_cpu(load, psutil.Process(), timeout=1.0)
    assert before is not None
    assert (after, result) == (None, None)
    assert load.returncode is not None and load.returncode != 0


def test_the_store_scale_benchmark_reports_the_longest_loop_turns(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "bench.store_scale", "--messages", "3000", "--minutes", "0.05",
         "--dir", str(tmp_path), "--json"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout)
    assert report["messages"] == 3000
    assert 0 < report["removed_by_retention"] < 3000  # the unconfirmed tenth stays
    assert report["housekeeping_turns"] == 30
    assert 0 < report["longest_retention_work_ms"] <= report["longest_housekeeping_turn_ms"]
    assert report["login_turn_busy_user_ms"] > 0 and report["login_turn_ordinary_user_ms"] > 0


def test_the_login_storm_is_measured_against_the_quiet_broker(tmp_path):
    from bench.__main__ import measure_storm

    result = measure_storm(tmp_path, clients=20, count=30)
    assert result["clients"] == 20
    assert 0 < result["quiet_p50_us"] <= result["quiet_p99_us"]
    assert result["storm_samples"] >= 1
    assert 0 < result["storm_p50_us"] <= result["storm_p99_us"] <= result["storm_max_us"]
    assert result["storm_p99_to_quiet_p99"] > 0


def test_the_disconnect_storm_reports_round_trips_and_loop_turns(tmp_path):
    from bench.disconnect_storm import measure

    result = measure(tmp_path, clients=20, count=30, after=0.5)
    assert result["clients"] == 20
    assert result["storm_samples"] >= 1
    assert 0 < result["storm_p99_us"] <= result["storm_max_us"]
    # The timed broker wrote its turns: at least one per round trip handled.
    assert int(result["turns"]) >= int(result["storm_samples"])
    assert float(result["storm_longest_turn_ms"]) >= 0
