"""What one API process lets a key do: requests per minute, and how big an uploaded task or a job
may be. Settings from the environment (prefix PRIMER_), like core.settings."""
from __future__ import annotations

import math
import threading
import time
from functools import lru_cache

from pydantic_settings import BaseSettings, SettingsConfigDict


class Limits(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="PRIMER_")

    # Requests per minute per API key, in bursts of up to as many; 0 turns the limit off. Counted
    # in each API process's memory: N API processes let a key make N times as many.
    rate_limit: int = 1200
    # An uploaded task: at most this many examples (lines), each input or answer at most this
    # many characters (a backbone reads a few hundred tokens of it).
    max_task_examples: int = 100_000
    max_example_chars: int = 100_000
    # A job: at most this many downstream runs (targets x methods x split seeds x learning rates).
    max_job_runs: int = 10_000


@lru_cache
def limits() -> Limits:
    return Limits()


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
