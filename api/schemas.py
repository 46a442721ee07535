"""Response bodies of the API, and how store rows become them. Pydantic only: importing this
module must not pull in torch (core.store does)."""
from __future__ import annotations

import unicodedata
from datetime import datetime, timezone

from pydantic import BaseModel, Field, field_validator

TERMINAL = ("succeeded", "failed", "cancelled")


def iso(dt: datetime | None) -> str | None:
    """ISO 8601 in UTC (SQLite gives naive datetimes back; they were written in UTC)."""
    if dt is None:
        return None
    return (dt if dt.tzinfo else dt.replace(tzinfo=timezone.utc)).isoformat()


class JobError(BaseModel):
    code: str = Field(description="whose failure: invalid_task (a task's files or content), invalid_input (another "
                                  "input of the job's), backbone_unavailable, data_unavailable (a pack's dataset could "
                                  "not be fetched), worker_lost (its worker died on every "
                                  "attempt) or internal (primer's own; the worker's log holds the traceback)")
    message: str = Field(description="what went wrong; for internal, prefixed by the exception's type")


class JobOut(BaseModel):
    id: str
    name: str
    status: str
    phase: str
    step: int
    total: int
    progress: float
    eta_seconds: float | None
    error: JobError | None
    created_at: str | None
    started_at: str | None
    finished_at: str | None
    spec: dict
    warnings: list[str] = Field([], description="on POST /jobs only: what was accepted but may fail, e.g. a pack "
                                                "whose dataset is no longer served and is not in the service's cache")


class JobList(BaseModel):
    jobs: list[JobOut]
    next_cursor: str | None


class EventOut(BaseModel):
    id: int
    time: str | None
    kind: str
    message: str
    name: str | None
    step: int | None
    value: float | None


class EventList(BaseModel):
    events: list[EventOut]
    next_after: int


class TaskScore(BaseModel):
    method: str
    task: str
    metric: str
    mean: float
    std: float
    relative_gain: float | None


class RunScore(BaseModel):
    method: str
    task: str
    seed: int
    lr: float
    dev: float
    test: float | None
    metric: str
    best_step: int
    steps: int
    reused_from: str | None = Field(None, description="the earlier job whose run this is (downstream.reuse_baselines, upstream.reuse_starts)")


class Results(BaseModel):
    tasks: list[TaskScore]
    arg: dict[str, float | None] = Field(description="ARG (%) per method over the target tasks with a relative gain; "
                                          "null where PT scored 0 on every one (no relative gain is defined) or "
                                          "a score is NaN (CrossFit's Pearson of constant predictions)")
    left_out_of_arg: list[str] = Field(description="target tasks no ARG counts: PT scored 0 there, so no relative "
                                                   "gain is defined")
    diverged: dict[str, str] = Field(default_factory=dict,
                                     description="methods whose meta-training diverged (their loss or meta-gradient "
                                                 "turned non-finite), and why: they have no initial prompt, no "
                                                 "downstream runs and no ARG; the other methods ran in full")
    scores: list[RunScore]


class PromptInfo(BaseModel):
    id: str
    job_id: str
    name: str
    backbone: str
    algorithm: str
    task: str | None
    seed: int | None
    shape: list[int]
    dtype: str
    sha256: str
    created_at: str | None


class PromptList(BaseModel):
    prompts: list[PromptInfo]


class TaskOut(BaseModel):
    id: str
    name: str
    type: str
    metric: str
    options: list[str] | None
    format: str
    examples: int
    files: list[str]
    created_at: str | None
    warnings: list[str] = []  # on upload: what the reader left out of the files, and why


class PackOut(BaseModel):
    name: str
    type: str
    metric: str
    options: list[str] | None
    source: str = Field(description="the registry distribution its data comes from, name==version")
    note: str | None = Field(None, description="set where that distribution can no longer be fetched: why, "
                                               "and what to do instead")


class TaskList(BaseModel):
    tasks: list[TaskOut]
    packs: list[PackOut]


class KeyIn(BaseModel):
    name: str = Field(min_length=1, max_length=200, description="who or what the key is for")
    admin: bool = Field(False, strict=True, description="an admin key sees every key's jobs and manages keys")

    @field_validator("name")
    @classmethod
    def _printable(cls, v: str) -> str:
        # a NUL or a lone surrogate cannot be stored (Postgres refuses them); a newline would
        # break the CLI's one-line-per-key listing
        if any(unicodedata.category(c) in ("Cc", "Cs") for c in v):
            raise ValueError("a key name is printable text: no control characters (NUL, tab, newline) "
                             "and no lone surrogates")
        return v


class KeyOut(BaseModel):
    id: str
    name: str
    prefix: str  # the secret's first characters, to tell keys apart; never the secret or its hash
    admin: bool
    created_at: str | None
    revoked_at: str | None


class KeyCreated(KeyOut):
    secret: str  # shown this once: only its sha256 is stored


class KeyList(BaseModel):
    keys: list[KeyOut]


def key_out(k) -> KeyOut:
    return KeyOut(id=k.id, name=k.name, prefix=k.prefix, admin=k.admin, created_at=iso(k.created_at),
                  revoked_at=iso(k.revoked_at))


def job_out(job, step: int, total: int) -> JobOut:
    progress = 1.0 if job.status == "succeeded" else (step / total if total else 0.0)
    eta = None
    if job.status == "running" and job.started_at is not None and 0 < progress < 1:
        start = job.started_at if job.started_at.tzinfo else job.started_at.replace(tzinfo=timezone.utc)
        elapsed = (datetime.now(timezone.utc) - start).total_seconds()
        eta = round(elapsed * (1 - progress) / progress, 1)
    error = JobError(code=job.error_code, message=job.error_message or "") if job.error_code else None
    return JobOut(id=job.id, name=job.name, status=job.status, phase=job.phase, step=step, total=total,
                  progress=progress, eta_seconds=eta, error=error, created_at=iso(job.created_at),
                  started_at=iso(job.started_at), finished_at=iso(job.finished_at), spec=job.spec)


def event_out(e) -> EventOut:
    return EventOut(id=e.id, time=iso(e.time), kind=e.kind, message=e.message, name=e.name, step=e.step,
                    value=e.value)


def prompt_info(p) -> PromptInfo:
    return PromptInfo(id=p.id, job_id=p.job_id, name=p.name, backbone=p.backbone, algorithm=p.algorithm,
                      task=p.task, seed=p.seed, shape=p.shape, dtype=p.dtype, sha256=p.sha256,
                      created_at=iso(p.created_at))


def task_out(t, warnings: list[str] = ()) -> TaskOut:
    return TaskOut(id=t.id, name=t.name, type=t.type, metric=t.metric, options=t.options, format=t.format,
                   examples=t.examples, files=sorted(t.files), created_at=iso(t.created_at), warnings=list(warnings))
