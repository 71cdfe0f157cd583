"""One broker per data directory: a second one is refused and the first keeps serving."""

from __future__ import annotations

import subprocess
import sys

from mangogram_broker.datadir import DataDirInUse, DataDirLock
from mangogram_proto import Client

from .conftest import ROOT, BrokerProcess


def test_a_second_lock_on_the_same_directory_is_refused_until_the_first_is_gone(tmp_path):
    first = DataDirLock(tmp_path)
    first.acquire()
    second = DataDirLock(tmp_path)
    try:
        try:
            second.acquire()
            raise AssertionError("the second lock was granted")
        except DataDirInUse as exc:
            assert "in use by another broker" in str(exc)
        del first  # collected: its file closes and the lock goes with it
        second.acquire()
    finally:
        second.release()


def test_second_broker_on_the_same_data_is_refused_and_the_first_keeps_serving(tmp_path, zctx):
    first = BrokerProcess(tmp_path / "data")
    try:
        second = subprocess.run(
            [sys.executable, str(ROOT / "broker.py"), "--bind", "tcp://127.0.0.1:*",
             "--data", str(tmp_path / "data")],
            cwd=ROOT, capture_output=True, text=True, encoding="utf-8", timeout=60,
        )  # fmt: skip
        assert second.returncode == 2
        assert f"in use by another broker (process {first.proc.pid})" in second.stderr
        assert "listening on" not in second.stderr
        with Client("Олена", first.endpoint, context=zctx) as olena:
            olena.send("олена", "досі працює", wait=True)
    finally:
        first.kill()
    # killed: the kernel dropped its lock, so the next broker starts at once
    after = BrokerProcess(tmp_path / "data")
    assert after.terminate() == 0
