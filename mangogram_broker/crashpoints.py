"""Deliberate crashes for durability tests: MANGOGRAM_CRASH_AT=POINT:N kills the broker
(as kill -9 would) the Nth time it reaches POINT. Unset, this costs one dict lookup.

Points:
    after_commit    a batch holding ACCEPTED is committed, no ack sent yet
    before_receipt  a RECEIPT arrived, not yet recorded (the message was delivered)
    mid_login       a login's WELCOME and first stored message are sent, the rest not
"""

from __future__ import annotations

import logging
import os
import signal

log = logging.getLogger(__name__)

POINTS = ("after_commit", "before_receipt", "mid_login")


class CrashPoints:
    def __init__(self, spec: str | None) -> None:
        self._target: str | None = None
        self._remaining = 0
        if spec:
            point, _, count = spec.partition(":")
            if point not in POINTS or not count.isdigit() or int(count) < 1:
                raise ValueError(f"MANGOGRAM_CRASH_AT must be POINT:N with POINT in {POINTS}")
            self._target, self._remaining = point, int(count)

    def armed(self, point: str) -> bool:
        """Whether `point` can crash this process (callers skip their bookkeeping if not)."""
        return point == self._target

    def reached(self, point: str) -> None:
        if point != self._target:
            return
        self._remaining -= 1
        if self._remaining > 0:
            return
        log.critical("crash point %s reached: dying now", point)
        for handler in logging.getLogger().handlers:
            handler.flush()
        if hasattr(signal, "SIGKILL"):
            os.kill(os.getpid(), signal.SIGKILL)
        os._exit(137)
