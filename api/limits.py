"""The rate limits of one API process (core.settings): requests per API key (PRIMER_RATE_LIMIT),
failed authentications per client address (PRIMER_AUTH_FAILURE_LIMIT)."""
from __future__ import annotations

import math
import threading
import time


class RateLimiter:
    """A token bucket per key (an API key's id, a client address): each holds up to `per_minute`
    tokens and gains per_minute/60 a second; a request takes one. Shared by the threads that
    serve requests, hence the lock. A bucket that has filled up again is forgotten once there
    are more than PRUNE_AT, so many addresses leave no lasting trace."""

    PRUNE_AT = 10_000

    def __init__(self, per_minute: int):
        self.per_minute = per_minute
        self.buckets: dict[str, tuple[float, float]] = {}  # key -> (tokens, when counted)
        self.lock = threading.Lock()

    def _tokens(self, key: str, now: float) -> float:
        tokens, then = self.buckets.get(key, (self.per_minute, now))
        return min(self.per_minute, tokens + (now - then) * self.per_minute / 60)

    def _wait(self, tokens: float) -> int:
        return 0 if tokens >= 1 else max(1, math.ceil((1 - tokens) * 60 / self.per_minute))

    def take(self, key: str) -> int:
        """0 if the key may go on (a token is taken), else the whole seconds until it may."""
        if self.per_minute <= 0:
            return 0
        now = time.monotonic()
        with self.lock:
            if len(self.buckets) > self.PRUNE_AT:
                self.buckets = {k: v for k, v in self.buckets.items() if self._tokens(k, now) < self.per_minute}
            tokens = self._tokens(key, now)
            self.buckets[key] = (tokens - 1 if tokens >= 1 else tokens, now)
            return self._wait(tokens)

    def wait(self, key: str) -> int:
        """What `take` would answer, without taking a token."""
        if self.per_minute <= 0:
            return 0
        with self.lock:
            return self._wait(self._tokens(key, time.monotonic()))
