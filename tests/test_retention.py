"""Retention as the broker core applies it: a pass in bounded steps, one per `expire`
call, started once a minute; run against both stores."""

from __future__ import annotations

import pytest

from mangogram_broker import store as store_module
from mangogram_broker.clock import Clock
from mangogram_broker.core import PRUNE_EVERY_MS, BrokerCore, Retention
from mangogram_broker.store import MemoryStore, SqliteStore

from .harness import T0, TEST_LIMITS

TICK_MS = 100


@pytest.fixture(params=["memory", "sqlite"])
def store(request, tmp_path):
    if request.param == "memory":
        return MemoryStore()
    opened = SqliteStore(tmp_path / "r.sqlite3", "normal")
    request.addfinalizer(opened.close)
    return opened


def stored(store) -> int:
    return len(store.history("a", "b", None, 10_000))


def test_the_core_spreads_a_retention_pass_over_its_ticks_until_all_is_pruned(store, monkeypatch):
    monkeypatch.setattr(store_module, "PRUNE_STEP_ROWS", 16)
    for i in range(300):
        store.append("a", "a", "b", "b", f"x{i}", "t", T0, T0)
    store.confirm_through("b", 290, T0)  # ten stay unconfirmed: never removed
    store.commit()
    core = BrokerCore(TEST_LIMITS, store=store, retention=Retention(max_age_ms=1000))
    now = T0 + 5000
    core.expire(Clock(now, now))
    store.commit()
    assert 0 < 300 - stored(store) < 290  # the first tick did only a part
    for _ in range(1000):  # bounded: a pass of 300 messages takes far fewer ticks
        if stored(store) == 10:
            break
        now += TICK_MS
        core.expire(Clock(now, now))
        store.commit()
    assert stored(store) == 10
    assert [m.seq for m in store.unconfirmed("b", 0, 100)] == list(range(291, 301))
    # A message that becomes old after the pass waits for the next one, a minute on.
    store.append("a", "a", "c", "c", "late", "t", now, now)
    store.confirm_through("c", 1, now)
    now += 2000
    core.expire(Clock(now, now))
    assert len(store.history("a", "c", None, 10)) == 1
    for _ in range(PRUNE_EVERY_MS // TICK_MS + 100):
        now += TICK_MS
        core.expire(Clock(now, now))
    assert store.history("a", "c", None, 10) == []
    assert stored(store) == 10
