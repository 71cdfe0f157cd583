"""The broker's process setup, apart from its sockets."""

from __future__ import annotations

import gc

from mangogram_broker.cli import GC_THRESHOLDS, tune_garbage_collector


def test_garbage_collector_is_tuned_for_the_loop():
    before = gc.get_threshold()
    try:
        tune_garbage_collector()
        assert gc.get_threshold() == GC_THRESHOLDS
        assert gc.get_freeze_count() > 0  # startup's objects are never rescanned
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)
