"""The broker's two clocks, read once per loop turn by the shell and passed to the core.

`wall` is what people see (`accepted_at`, `delivered_at`, `server_time`, retention by age)
and may step either way when an operator or NTP sets it. `mono` only moves forward and
drives every timer: rate-limit refills, heartbeat expiry, the pruning schedule. A timer on
the wall clock stops refilling when it steps back and expires everyone when it steps
forward.
"""

from __future__ import annotations

import time
from typing import NamedTuple


class Clock(NamedTuple):
    """One moment on both clocks, in milliseconds. `mono` has an arbitrary origin: only
    differences between two readings mean anything."""

    wall: int
    mono: int


def system_clock() -> Clock:
    """Read both of the machine's clocks."""
    return Clock(time.time_ns() // 1_000_000, time.monotonic_ns() // 1_000_000)
