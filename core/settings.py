"""Settings read from the environment (prefix PRIMER_), with defaults that work on one machine."""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="PRIMER_")

    # Converted backbones, fetched registry distributions and built task packs live here.
    cache_dir: Path = Path.home() / ".cache" / "primer"
    # CrossFit's data directory (holding <task>/<task>_<k>_<seed>_<split>.tsv), for catalog tasks.
    crossfit_dir: Path | None = None
    # Extra pip arguments used when fetching registry distributions (e.g. an index URL).
    pip_args: str = ""

    # Where jobs train: "auto" (CUDA when the process sees a GPU, else CPU), "cpu" or "cuda[:N]".
    device: str = "auto"

    # --- the service (docs: README, "Running the service") ---
    # The store: Postgres in production (postgresql+psycopg://...), else SQLite under cache_dir.
    database_url: str | None = None
    # Celery's broker: Redis for a team, else a SQLite file under cache_dir. There is no result
    # backend: steps report to the store, and the store says when a job's last run is done.
    broker_url: str | None = None
    # Backbones a job may name: registry names, or name=location pairs, comma-separated
    # (e.g. "smollm2-135m,tiny=/models/tiny"). Jobs never name a path themselves.
    backbones: str = "smollm2-135m"
    # A backbone each worker process loads when it starts, so that its first job does not wait
    # for it: an allowed name, optionally with the precision its jobs ask for ("smollm2-135m:bf16").
    # Unset: a process loads a backbone at its first job. Either way it keeps the last one it
    # loaded for the next job on the same backbone and precision.
    preload_backbone: str = ""
    # How long a worker process may take to start, its preload included, before Celery kills it
    # as hung. Celery's own default, 4 s, is shorter than most backbones take to load: every
    # process replacing one (after worker_max_tasks_per_child tasks, or a crash) would be killed,
    # and the next, and the worker would run nothing more.
    process_start_seconds: float = 600.0
    # Longest a broker waits before it hands an unacknowledged task to another worker (s);
    # must exceed the longest task.
    visibility_timeout: int = 4 * 3600
    # Leases (docs: docs/reliability.md): a worker beats every heartbeat_seconds while it runs a
    # step; a step whose beat is older than lease_seconds is taken as lost and sent again, at most
    # max_attempts times in all. Every reconcile_seconds a worker also re-sends steps whose broker
    # message is gone (a broker restarted without persistence, a send that failed).
    heartbeat_seconds: float = 10.0
    lease_seconds: float = 120.0
    reconcile_seconds: float = 30.0
    max_attempts: int = 3
    # How long a store call waits for the database to come back (a Postgres restart) before it fails.
    db_retry_seconds: float = 30.0
    # Connections each process keeps open to a Postgres store; a burst opens up to twice as many
    # more, closed when it is over. Below the API's concurrent requests, connections are opened
    # and closed all the time under load, each costing both processes a few ms.
    db_pool_size: int = 10
    max_upload_bytes: int = 20 * 1024 * 1024
    # An uploaded task: at most this many examples (lines), each input or answer at most this
    # many characters (a backbone reads a few hundred tokens of it).
    max_task_examples: int = 100_000
    max_example_chars: int = 100_000
    # A job: at most this many downstream runs (targets x methods x split seeds x learning rates).
    max_job_runs: int = 10_000
    # Requests per minute per API key, in bursts of up to as many; 0 turns the limit off. Counted
    # in each API process's memory: N API processes let a key make N times as many.
    rate_limit: int = 1200
    # Failed authentications per minute per client address (in bursts of as many), after which the
    # address gets 429s without a store lookup until its bucket refills; keys this API process
    # has found valid are not held back (clients behind one proxy). 0 turns it off.
    auth_failure_limit: int = 60
    max_body_bytes: int = 1024 * 1024  # JSON bodies (specs)
    cors_origins: str = ""  # comma-separated; CORS is off unless set
    # The client (`primer submit`): where the API is and the key it sends.
    api_url: str = "http://127.0.0.1:8000"
    api_key: str | None = None

    def torch_device(self) -> str:
        if self.device != "auto":
            return self.device
        import torch  # only where training happens: the worker's child process, or the CLI

        return "cuda" if torch.cuda.is_available() else "cpu"

    def db_url(self) -> str:
        return self.database_url or f"sqlite:///{self.cache_dir / 'primer.db'}"

    def broker(self) -> str:
        return self.broker_url or f"sqla+sqlite:///{self.cache_dir / 'broker.db'}"

    def backbone_allowlist(self) -> dict[str, str]:
        """name -> what core.backbones.load takes (a registry name or a directory)."""
        out = {}
        for item in filter(None, (x.strip() for x in self.backbones.split(","))):
            name, _, location = item.partition("=")
            out[name.strip()] = location.strip() or name.strip()
        return out


@lru_cache
def settings() -> Settings:
    return Settings()
