"""Reconnect delays: exponential with jitter, so a restarted broker is not stampeded."""

from __future__ import annotations

import random
from collections.abc import Callable


class Backoff:
    """Delays of `initial_ms` doubling up to `max_ms`, each scaled by a random 0.5..1.0."""

    def __init__(
        self,
        initial_ms: int = 100,
        max_ms: int = 5000,
        rand: Callable[[], float] = random.random,
    ) -> None:
        self.initial_ms = initial_ms
        self.max_ms = max_ms
        self._rand = rand
        self._attempt = 0

    def next_delay_ms(self) -> int:
        """The delay before the next attempt; each call backs off further."""
        ceiling = min(self.max_ms, self.initial_ms * (2 ** min(self._attempt, 30)))
        self._attempt += 1
        return max(1, int(ceiling * (0.5 + self._rand() / 2)))

    def reset(self) -> None:
        """Call after a success: the next failure starts from `initial_ms` again."""
        self._attempt = 0
