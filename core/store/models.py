"""The store's tables. Postgres in production, SQLite for one machine; the schema comes from
the Alembic migrations in migrations/, which are generated from and checked against these."""
from __future__ import annotations

import math
from datetime import datetime, timezone

from sqlalchemy import JSON, BigInteger, Boolean, DateTime, Float, ForeignKey, Integer, LargeBinary, String, Text, UniqueConstraint
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator


def now() -> datetime:
    return datetime.now(timezone.utc)


# Scores may be NaN: CrossFit's Pearson of constant predictions is, and a diverging run's loss.
# SQLite's REAL turns NaN into NULL, and JSON has no NaN (Postgres refuses it in a json column),
# so these two types store a NaN number as the text "NaN" and read it back as NaN.
_NAN = "NaN"


def _is_nan(value) -> bool:
    return isinstance(value, float) and math.isnan(value)


class FloatNaN(TypeDecorator):
    """A float column that keeps NaN on SQLite too (Postgres keeps it natively)."""
    impl, cache_ok = Float, True

    def bind_processor(self, dialect):  # not process_bind_param: SQLite's Float would make "NaN" a float again
        return (lambda v: _NAN if _is_nan(v) else v) if dialect.name == "sqlite" else super().bind_processor(dialect)

    def process_result_value(self, value, dialect):
        return float(value) if isinstance(value, str) else value


class JSONNaN(TypeDecorator):
    """A JSON column whose NaN numbers are kept (as "NaN"): a learning curve's dev scores and losses."""
    impl, cache_ok = JSON, True

    def process_bind_param(self, value, dialect):
        return _map(value, lambda v: _NAN if _is_nan(v) else v)

    def process_result_value(self, value, dialect):
        return _map(value, lambda v: float(v) if v == _NAN else v)


def _map(value, leaf):
    if isinstance(value, list):
        return [_map(v, leaf) for v in value]
    if isinstance(value, dict):
        return {k: _map(v, leaf) for k, v in value.items()}
    return leaf(value)


class Base(DeclarativeBase):
    pass


class ApiKey(Base):
    __tablename__ = "api_keys"
    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    prefix: Mapped[str] = mapped_column(String(16))  # shown in listings; the secret never is
    hash: Mapped[str] = mapped_column(String(64), unique=True)  # sha256 of the secret
    admin: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=now)
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


class Job(Base):
    __tablename__ = "jobs"
    __table_args__ = (UniqueConstraint("owner", "idempotency_key", name="uq_jobs_owner_idempotency"),)
    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    owner: Mapped[str] = mapped_column(ForeignKey("api_keys.id"), index=True)
    name: Mapped[str] = mapped_column(String(200))
    spec: Mapped[dict] = mapped_column(JSON)
    spec_hash: Mapped[str] = mapped_column(String(64))
    idempotency_key: Mapped[str | None] = mapped_column(String(200), nullable=True)
    status: Mapped[str] = mapped_column(String(16), index=True)  # queued|running|succeeded|failed|cancelled
    phase: Mapped[str] = mapped_column(String(32), default="queued")
    error_code: Mapped[str | None] = mapped_column(String(64), nullable=True)
    error_message: Mapped[str | None] = mapped_column(Text, nullable=True)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=now, index=True)
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    heartbeat_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


class JobUnit(Base):
    """One piece of a job's work (an upstream method, a downstream cell): its step of total."""
    __tablename__ = "job_units"
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True)
    unit: Mapped[str] = mapped_column(String(400), primary_key=True)
    step: Mapped[int] = mapped_column(Integer, default=0)
    total: Mapped[int] = mapped_column(Integer)
    done: Mapped[bool] = mapped_column(Boolean, default=False)


class Dispatch(Base):
    """A step of a job handed to the workers ("start", "cell:<unit>", "aggregate"): the message
    last sent for it, and the lease of the worker that took it. A lease whose beat is older than
    the lease time is lost (its worker died) and the step is sent again."""
    __tablename__ = "dispatches"
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True)
    step: Mapped[str] = mapped_column(String(400), primary_key=True)
    task: Mapped[str] = mapped_column(String(64))  # the Celery task and its arguments, to send it again
    args: Mapped[list] = mapped_column(JSON)
    message_id: Mapped[str] = mapped_column(String(64))
    sent_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=now)
    attempts: Mapped[int] = mapped_column(Integer, default=0)  # times a worker took it
    worker: Mapped[str | None] = mapped_column(String(200), nullable=True)
    heartbeat_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    done: Mapped[bool] = mapped_column(Boolean, default=False, index=True)


class Prompt(Base):
    __tablename__ = "prompts"
    __table_args__ = (UniqueConstraint("job_id", "name", name="uq_prompts_job_name"),)
    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    owner: Mapped[str] = mapped_column(ForeignKey("api_keys.id"), index=True)
    name: Mapped[str] = mapped_column(String(400))  # "init/maml" or "<task>/<method>/seed<N>"
    backbone: Mapped[str] = mapped_column(String(200), index=True)
    algorithm: Mapped[str] = mapped_column(String(32), index=True)
    task: Mapped[str | None] = mapped_column(String(200), nullable=True)
    seed: Mapped[int | None] = mapped_column(Integer, nullable=True)
    shape: Mapped[list] = mapped_column(JSON)
    dtype: Mapped[str] = mapped_column(String(16))
    sha256: Mapped[str] = mapped_column(String(64))  # of `data`, the safetensors bytes
    data: Mapped[bytes] = mapped_column(LargeBinary)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=now)


class Score(Base):
    """One downstream run: (method, target task, split seed, lr) of a job."""
    __tablename__ = "scores"
    __table_args__ = (UniqueConstraint("job_id", "method", "task", "seed", "lr", name="uq_scores_cell"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    method: Mapped[str] = mapped_column(String(32))
    task: Mapped[str] = mapped_column(String(200))
    seed: Mapped[int] = mapped_column(Integer)
    lr: Mapped[float] = mapped_column(Float)
    metric: Mapped[str] = mapped_column(String(32))
    dev: Mapped[float] = mapped_column(FloatNaN)
    test: Mapped[float | None] = mapped_column(FloatNaN, nullable=True)
    best_step: Mapped[int] = mapped_column(Integer)
    steps: Mapped[int] = mapped_column(Integer)
    seconds: Mapped[float] = mapped_column(Float)
    curve: Mapped[list] = mapped_column(JSONNaN)
    prompt: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True)  # best-dev prompt (safetensors)
    # PT and FT runs: a digest of what the run computed from (core.jobs.cell_inputs), so that a
    # later job of the same owner asking for reuse_baselines can take it instead of training
    inputs: Mapped[str | None] = mapped_column(String(64), nullable=True, index=True)
    reused_from: Mapped[str | None] = mapped_column(String(40), nullable=True)  # the job whose run this is


class TaskResult(Base):
    """Per job, method and target task: mean and std of the best-dev runs' test scores, and the
    relative gain over PT (None for PT itself)."""
    __tablename__ = "task_results"
    __table_args__ = (UniqueConstraint("job_id", "method", "task", name="uq_task_results"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    method: Mapped[str] = mapped_column(String(32))
    task: Mapped[str] = mapped_column(String(200))
    metric: Mapped[str] = mapped_column(String(32))
    mean: Mapped[float] = mapped_column(FloatNaN)
    std: Mapped[float] = mapped_column(FloatNaN)
    relative_gain: Mapped[float | None] = mapped_column(FloatNaN, nullable=True)


class MethodResult(Base):
    """Per job and method: the average relative gain (ARG, %) over the target tasks."""
    __tablename__ = "method_results"
    __table_args__ = (UniqueConstraint("job_id", "method", name="uq_method_results"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    method: Mapped[str] = mapped_column(String(32))
    arg: Mapped[float | None] = mapped_column(FloatNaN, nullable=True)  # None: PT scored 0 on every target task
    diverged: Mapped[str | None] = mapped_column(Text, nullable=True)  # why its meta-training stopped (then no ARG)


class Event(Base):
    """A log line or a metric point of a job."""
    __tablename__ = "events"
    # 64-bit: a long-lived service writes billions of events (SQLite's rowid is 64-bit already)
    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    time: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=now)
    kind: Mapped[str] = mapped_column(String(16))  # log | metric
    message: Mapped[str] = mapped_column(Text, default="")
    name: Mapped[str | None] = mapped_column(String(200), nullable=True)  # metric name, e.g. upstream/maml/loss
    step: Mapped[int | None] = mapped_column(Integer, nullable=True)
    value: Mapped[float | None] = mapped_column(FloatNaN, nullable=True)


class Checkpoint(Base):
    __tablename__ = "checkpoints"
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True)
    key: Mapped[str] = mapped_column(String(400), primary_key=True)
    data: Mapped[bytes] = mapped_column(LargeBinary)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=now)
    # A finished upstream method's: a digest of what it computed from (core.jobs.upstream_inputs),
    # so that a later job of the same owner asking for upstream.reuse_starts can take it
    inputs: Mapped[str | None] = mapped_column(String(64), nullable=True, index=True)


class Artifact(Base):
    """Files a job produced for its report (plots, results.json, results.md)."""
    __tablename__ = "artifacts"
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True)
    name: Mapped[str] = mapped_column(String(200), primary_key=True)
    content_type: Mapped[str] = mapped_column(String(100))
    data: Mapped[bytes] = mapped_column(LargeBinary)


class UploadedTask(Base):
    __tablename__ = "tasks"
    __table_args__ = (UniqueConstraint("owner", "name", name="uq_tasks_owner_name"),)
    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    owner: Mapped[str] = mapped_column(ForeignKey("api_keys.id"), index=True)
    name: Mapped[str] = mapped_column(String(200))
    type: Mapped[str] = mapped_column(String(32))
    metric: Mapped[str] = mapped_column(String(32))
    options: Mapped[list | None] = mapped_column(JSON, nullable=True)
    format: Mapped[str] = mapped_column(String(16))  # crossfit | bigbench | jsonl
    examples: Mapped[int] = mapped_column(Integer)
    files: Mapped[dict] = mapped_column(JSON)  # file name -> sha256
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=now)


class TaskFile(Base):
    __tablename__ = "task_files"
    task_id: Mapped[str] = mapped_column(ForeignKey("tasks.id", ondelete="CASCADE"), primary_key=True)
    filename: Mapped[str] = mapped_column(String(255), primary_key=True)
    data: Mapped[bytes] = mapped_column(LargeBinary)
