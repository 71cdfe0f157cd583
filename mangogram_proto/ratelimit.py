"""Token buckets: the broker limits each user's messages and each peer's error replies
with them, and the SDK paces its own sends with one so it never hits the broker's."""

from __future__ import annotations


class TokenBucket:
    """`rate` tokens per second refill up to `burst`; each action takes one token.

    Time is passed in (milliseconds) so the bucket is deterministic under test.
    """

    __slots__ = ("rate", "burst", "_tokens", "_updated_ms")

    def __init__(self, rate: float, burst: int, now_ms: int) -> None:
        self.rate = rate
        self.burst = burst
        self._tokens = float(burst)
        self._updated_ms = now_ms

    def wait_ms(self, now_ms: int) -> int:
        """Milliseconds until a token is free (0: one is free now); takes nothing."""
        elapsed = max(0, now_ms - self._updated_ms)
        tokens = min(float(self.burst), self._tokens + elapsed * self.rate / 1000.0)
        if tokens >= 1.0:
            return 0
        if self.rate <= 0:
            return 60_000
        return max(1, int((1.0 - tokens) * 1000.0 / self.rate + 0.999))

    def take(self, now_ms: int) -> int:
        """Take one token. Returns 0 on success, else the milliseconds until one is free."""
        elapsed = now_ms - self._updated_ms
        if elapsed > 0:  # a loop turn shares one time: most calls skip the refill
            self._updated_ms = now_ms
            self._tokens = min(float(self.burst), self._tokens + elapsed * self.rate / 1000.0)
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return 0
        if self.rate <= 0:
            return 60_000
        return max(1, int((1.0 - self._tokens) * 1000.0 / self.rate + 0.999))

    def is_full(self, now_ms: int) -> bool:
        """True when the bucket has refilled to its whole burst (safe to forget)."""
        elapsed = max(0, now_ms - self._updated_ms)
        return self._tokens + elapsed * self.rate / 1000.0 >= self.burst
