"""The per-key rate limit of one API process (PRIMER_RATE_LIMIT, core.settings)."""
from __future__ import annotations

import math
import threading
import time


class RateLimiter:
    """A token bucket per key: each holds up to `per_minute` tokens and gains per_minute/60 a
    second; a request takes one. Shared by the threads that serve requests, hence the lock."""

    def __init__(self, per_minute: int):
        self.per_minute = per_minute
        self.buckets: dict[str, tuple[float, float]] = {}  # key id -> (tokens, when counted)
        self.lock = threading.Lock()

    def take(self, key: str) -> int:
        """0 if the key may go on (a token is taken), else the whole seconds until it may."""
        if self.per_minute <= 0:
            return 0
        rate, now = self.per_minute / 60, time.monotonic()
        with self.lock:
            tokens, then = self.buckets.get(key, (self.per_minute, now))
            tokens = min(self.per_minute, tokens + (now - then) * rate)
            if tokens >= 1:
                self.buckets[key] = (tokens - 1, now)
                return 0
            self.buckets[key] = (tokens, now)
            return max(1, math.ceil((1 - tokens) / rate))
