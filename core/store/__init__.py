"""The store: jobs, prompts, scores, results, events, checkpoints, uploaded tasks and API keys.

One `Store` per process over a SQLAlchemy engine; every method is its own short transaction,
so the API and any number of workers can share one Postgres (or, on one machine, one SQLite
file). The schema is created by the Alembic migrations in migrations/ (`Store.upgrade()`).
"""
from __future__ import annotations

import functools
import hashlib
import hmac
import inspect
import io
import logging
import os
import secrets
import sqlite3
import threading
import time
import uuid
import weakref
from datetime import datetime, timedelta
from pathlib import Path

from sqlalchemy import bindparam, case, create_engine, delete, event, func, insert, or_, select, update
from sqlalchemy.exc import DBAPIError, IntegrityError, InterfaceError, OperationalError
from sqlalchemy.orm import sessionmaker

from core.settings import settings
from core.store.models import (ApiKey, Artifact, Checkpoint, Dispatch, Event, Job, JobUnit, MethodResult, Prompt,
                               Score, TaskFile, TaskResult, UploadedTask, now)

log = logging.getLogger("primer.store")

STATUSES = ("queued", "running", "succeeded", "failed", "cancelled")
TERMINAL = ("succeeded", "failed", "cancelled")
MIGRATIONS = Path(__file__).resolve().parents[2] / "migrations"


class StoreError(Exception):
    """Something stored is not as it should be (e.g. a prompt whose bytes fail their sha256)."""


class IdempotencyConflict(Exception):
    """The Idempotency-Key was used before with another body."""

    def __init__(self, job_id: str):
        super().__init__(job_id)
        self.job_id = job_id


class TaskExists(Exception):
    """The owner already has an uploaded task of that name."""

    def __init__(self, owner: str, name: str):
        super().__init__(f"{owner} already has a task named {name!r}")
        self.owner, self.name = owner, name


def new_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(8)}"


def key_hash(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def transient(e: DBAPIError) -> bool:
    """The database went away or is busy, as opposed to a query that is wrong: Postgres restarting
    or refusing connections, a connection cut mid-transaction, a locked SQLite file."""
    if e.connection_invalidated or isinstance(e, InterfaceError):
        return True
    if isinstance(e.orig, sqlite3.Error):
        return "locked" in str(e.orig) or "busy" in str(e.orig)
    return isinstance(e, OperationalError)


_waiting = threading.local()  # inside a retrying store call on this thread


# The statements of the API's hot paths (every request's key lookup, POST /jobs, GET /jobs/{id}),
# built once and run through SQLAlchemy Core: building a statement per call and the ORM's unit
# of work took about half of these calls' CPU time (docs/performance.md, "The service").
_STEPS = case((JobUnit.done, JobUnit.total), (JobUnit.step < JobUnit.total, JobUnit.step), else_=JobUnit.total)
_PROGRESS = (select(JobUnit.job_id, func.sum(_STEPS), func.sum(JobUnit.total))
             .where(JobUnit.job_id.in_(bindparam("ids", expanding=True))).group_by(JobUnit.job_id))
_KEY_BY_HASH = select(ApiKey.__table__).where(ApiKey.hash == bindparam("digest"), ApiKey.revoked_at.is_(None))
_JOB_BY_ID = select(Job.__table__).where(Job.id == bindparam("job_id"))
_NEW_JOB, _NEW_UNITS, _NEW_DISPATCH = insert(Job.__table__), insert(JobUnit.__table__), insert(Dispatch.__table__)


def _progress(s, ids: list[str]) -> dict[str, tuple[int, int]]:
    """(steps done, steps in all) of each job, in session or connection `s`; a finished unit
    counts in full."""
    found = {job_id: (int(step), int(total)) for job_id, step, total in s.execute(_PROGRESS, {"ids": ids})}
    return {job_id: found.get(job_id, (0, 0)) for job_id in ids}


def retrying(method):
    """Run a store method again while the database is away, for up to `retry_seconds`: a worker
    rides out a Postgres restart instead of failing an hours-long job. A write whose commit was
    cut may run twice; every write here is an upsert, guarded by a unique key, or a log line.
    A store method called by another one does not wait on its own: the outermost call waits,
    so an outage is waited out for `retry_seconds` in all, not once per level."""
    @functools.wraps(method)
    def run(self, *args, **kwargs):
        if getattr(_waiting, "active", False):
            return method(self, *args, **kwargs)
        deadline, delay = time.monotonic() + self.retry_seconds, 0.2
        while True:
            try:
                _waiting.active = True
                try:
                    return method(self, *args, **kwargs)
                finally:
                    _waiting.active = False
            except DBAPIError as e:
                if not transient(e) or time.monotonic() + delay > deadline:
                    raise
                log.warning("store.%s: the database is unavailable (%s); retrying in %.1f s",
                            method.__name__, type(e.orig).__name__, delay)
                time.sleep(delay)
                delay = min(2 * delay, 5.0)
    return run


class Store:
    def __init__(self, url: str, retry_seconds: float = 30.0, pre_ping: bool = True):
        """`pre_ping`: test each pooled connection with a round trip before using it. The API
        turns it off: a connection that died (Postgres restarted) fails its first statement,
        is dropped with the rest of the pool, and `retrying` runs the call again on a new one."""
        self.url, self.retry_seconds = url, retry_seconds
        sqlite = url.startswith("sqlite")
        if sqlite:
            path = url.removeprefix("sqlite:///")
            if path and path != ":memory:":
                Path(path).parent.mkdir(parents=True, exist_ok=True)
        size = settings().db_pool_size
        pool = {} if sqlite else {"pool_size": size, "max_overflow": 2 * size}
        self.engine = create_engine(url, pool_pre_ping=pre_ping, **pool,
                                    connect_args={"timeout": 30} if sqlite else {})
        if sqlite:  # foreign keys and a journal that lets readers and one writer work together
            @event.listens_for(self.engine, "connect")
            def _pragmas(conn, _):
                conn.execute("PRAGMA foreign_keys=ON")
                conn.execute("PRAGMA journal_mode=WAL")
                conn.execute("PRAGMA busy_timeout=30000")
        self.session = sessionmaker(self.engine, expire_on_commit=False)
        # Reads of the API's hot paths run without a transaction: with one, psycopg sends BEGIN
        # and ROLLBACK as round trips of their own (3 for one SELECT), and the ROLLBACK drops the
        # connection's prepared statements. Each statement has its own snapshot either way (READ
        # COMMITTED), so nothing a transaction gave them is lost.
        self.reads = self.engine.execution_options(isolation_level="AUTOCOMMIT")
        # A forked child (a Celery pool process) must not share its parent's pooled connections:
        # two processes on one socket corrupt each other's transactions.
        engine = weakref.ref(self.engine)
        os.register_at_fork(after_in_child=lambda: (e := engine()) is not None and e.dispose(close=False))

    # --- schema ------------------------------------------------------------------------------------
    def alembic_config(self):
        from alembic.config import Config

        cfg = Config()
        cfg.set_main_option("script_location", str(MIGRATIONS))
        cfg.set_main_option("sqlalchemy.url", self.url.replace("%", "%%"))
        return cfg

    def upgrade(self, revision: str = "head") -> None:
        from alembic import command

        command.upgrade(self.alembic_config(), revision)

    def downgrade(self, revision: str = "base") -> None:
        from alembic import command

        command.downgrade(self.alembic_config(), revision)

    def ping(self) -> None:
        with self.engine.connect() as conn:
            conn.exec_driver_sql("SELECT 1")

    def warm(self, connections: int) -> None:
        """Open `connections` pooled connections and run the per-request lookups once, so that
        the first requests of a new API process do not each pay a connection (~7 ms) and a
        statement's first compilation: the first second after a start answered POST /jobs in
        200-400 ms, all requests queued behind that work."""
        held = [self.engine.connect() for _ in range(connections)]
        for c in held:
            c.close()
        self.authenticate("")  # no key has this hash: compiles the lookup, finds nothing
        self.job_with_progress("")

    # --- API keys -------------------------------------------------------------------------------
    def create_key(self, name: str, admin: bool = False) -> tuple[ApiKey, str]:
        """A new key; the secret is returned once and only its sha256 is stored."""
        secret = "pk_" + secrets.token_urlsafe(32)
        row = ApiKey(id=new_id("key"), name=name, prefix=secret[:10], hash=key_hash(secret), admin=admin)
        with self.session.begin() as s:
            s.add(row)
        return row, secret

    def authenticate(self, secret: str) -> ApiKey | None:
        digest = key_hash(secret)
        with self.reads.connect() as c:
            found = c.execute(_KEY_BY_HASH, {"digest": digest}).first()
        row = None if found is None else ApiKey(**found._mapping)
        # the lookup is by hash; compare once more in constant time so no timing tells how close a guess was
        return row if row is not None and hmac.compare_digest(row.hash, digest) else None

    def list_keys(self) -> list[ApiKey]:
        with self.session() as s:
            return list(s.scalars(select(ApiKey).order_by(ApiKey.created_at)))

    def revoke_key(self, key_id: str) -> bool:
        with self.session.begin() as s:
            return s.execute(update(ApiKey).where(ApiKey.id == key_id, ApiKey.revoked_at.is_(None))
                             .values(revoked_at=now())).rowcount > 0

    # --- jobs -----------------------------------------------------------------------------------
    def create_job(self, owner: str, name: str, spec: dict, spec_hash: str, units: dict[str, int],
                   idempotency_key: str | None = None, first: tuple[str, str, str] | None = None
                   ) -> tuple[Job, bool]:
        """Insert a queued job with its units of work; (job, created). The same idempotency key
        with the same spec returns the first job; with another spec it is a conflict. `first`,
        (step, task, message id), records the job's first step as sent (as `dispatch` does, with
        the job's id as its args) in the same transaction: the caller then sends that message."""
        if idempotency_key is not None:
            found = self._by_idempotency(owner, idempotency_key)
            if found is not None:
                return self._replay(found, spec_hash)
        row = dict(id=new_id("job"), owner=owner, name=name, spec=spec, spec_hash=spec_hash,
                   idempotency_key=idempotency_key, status="queued", phase="queued", error_code=None,
                   error_message=None, cancel_requested=False, created_at=now(), started_at=None,
                   finished_at=None, heartbeat_at=None)
        try:
            with self.engine.begin() as c:
                c.execute(_NEW_JOB, row)
                if units:
                    c.execute(_NEW_UNITS, [dict(job_id=row["id"], unit=u, step=0, total=t, done=False)
                                           for u, t in units.items()])
                if first is not None:
                    c.execute(_NEW_DISPATCH, self._dispatch_row(row["id"], *first[:2], [row["id"]], first[2]))
        except IntegrityError:  # a concurrent request with the same key won the race
            found = self._by_idempotency(owner, idempotency_key) if idempotency_key else None
            if found is None:
                raise
            return self._replay(found, spec_hash)
        return Job(**row), True

    def _by_idempotency(self, owner: str, key: str) -> Job | None:
        with self.session() as s:
            return s.scalar(select(Job).where(Job.owner == owner, Job.idempotency_key == key))

    @staticmethod
    def _replay(job: Job, spec_hash: str) -> tuple[Job, bool]:
        if job.spec_hash != spec_hash:
            raise IdempotencyConflict(job.id)
        return job, False

    def get_job(self, job_id: str, owner: str | None = None) -> Job | None:
        """The job, or None if it does not exist or (with `owner`) belongs to someone else."""
        with self.session() as s:
            job = s.get(Job, job_id)
        return job if job is not None and (owner is None or job.owner == owner) else None

    def list_jobs(self, owner: str | None = None, status: str | None = None, cursor: str | None = None,
                  limit: int = 50) -> tuple[list[Job], str | None]:
        """Newest first; `cursor` is the last id of the previous page. Returns (jobs, next cursor).
        KeyError if the cursor is not a job of `owner` (an unknown id, or someone else's job)."""
        q = select(Job)
        if owner is not None:
            q = q.where(Job.owner == owner)
        if status is not None:
            q = q.where(Job.status == status)
        with self.session() as s:
            if cursor is not None:
                last = s.get(Job, cursor)
                if last is None or (owner is not None and last.owner != owner):
                    raise KeyError(cursor)
                q = q.where((Job.created_at < last.created_at)
                            | ((Job.created_at == last.created_at) & (Job.id < last.id)))
            jobs = list(s.scalars(q.order_by(Job.created_at.desc(), Job.id.desc()).limit(limit + 1)))
        more = len(jobs) > limit
        return jobs[:limit], (jobs[limit - 1].id if more else None)

    def set_status(self, job_id: str, status: str, phase: str | None = None, error_code: str | None = None,
                   error_message: str | None = None) -> bool:
        """Move a job on; a job in a terminal state stays there (returns False)."""
        assert status in STATUSES, status
        values: dict = {"status": status}
        if phase is not None:
            values["phase"] = phase
        if status == "running":
            values["heartbeat_at"] = now()
        if status in TERMINAL:
            values["finished_at"] = now()
        if error_code is not None:
            values.update(error_code=error_code, error_message=error_message)
        with self.session.begin() as s:
            q = update(Job).where(Job.id == job_id, Job.status.not_in(TERMINAL)).values(**values)
            if status == "running":  # started_at: the first time only, and never on a finished job
                s.execute(update(Job).where(Job.id == job_id, Job.started_at.is_(None), Job.status.not_in(TERMINAL))
                          .values(started_at=now()))
            return s.execute(q).rowcount > 0

    def set_phase(self, job_id: str, phase: str) -> None:
        with self.session.begin() as s:
            s.execute(update(Job).where(Job.id == job_id, Job.status.not_in(TERMINAL))
                      .values(phase=phase, heartbeat_at=now()))

    def request_cancel(self, job_id: str) -> Job | None:
        """Mark the job cancelled (workers stop at their next step); a finished job is left as it is."""
        with self.session.begin() as s:
            s.execute(update(Job).where(Job.id == job_id, Job.status.not_in(TERMINAL))
                      .values(cancel_requested=True, status="cancelled", phase="cancelled", finished_at=now()))
        return self.get_job(job_id)

    def is_cancelled(self, job_id: str) -> bool:
        with self.session() as s:
            return bool(s.scalar(select(Job.cancel_requested).where(Job.id == job_id)))

    def progress(self, job_id: str, unit: str, step: int, done: bool = False) -> None:
        with self.session.begin() as s:
            s.execute(update(JobUnit).where(JobUnit.job_id == job_id, JobUnit.unit == unit)
                      .values(step=step, **({"done": True} if done else {})))
            s.execute(update(Job).where(Job.id == job_id).values(heartbeat_at=now()))

    def drop_units(self, job_id: str, prefix: str) -> None:
        """Forget the job's units whose name starts with `prefix`: work it will not do (the
        downstream runs of a method whose meta-training diverged), so progress ends at 100 %."""
        with self.session.begin() as s:
            s.execute(delete(JobUnit).where(JobUnit.job_id == job_id, JobUnit.unit.startswith(prefix, autoescape=True)))

    def job_progress(self, job_id: str) -> tuple[int, int]:
        """(steps done, steps in all) over the job's units; a finished unit counts in full."""
        return self.job_progress_many([job_id])[job_id]

    def job_progress_many(self, job_ids) -> dict[str, tuple[int, int]]:
        """job_progress of each job in one query, so a page of jobs is one round trip."""
        ids = list(job_ids)
        if not ids:
            return {}
        with self.session() as s:
            return _progress(s, ids)

    def job_with_progress(self, job_id: str, owner: str | None = None) -> tuple[Job, tuple[int, int]] | None:
        """get_job and job_progress on one connection."""
        with self.reads.connect() as c:
            row = c.execute(_JOB_BY_ID, {"job_id": job_id}).first()
            if row is None or (owner is not None and row.owner != owner):
                return None
            return Job(**row._mapping), _progress(c, [job_id])[job_id]

    # --- events ---------------------------------------------------------------------------------
    def add_event(self, job_id: str, message: str = "", kind: str = "log", name: str | None = None,
                  step: int | None = None, value: float | None = None) -> None:
        with self.session.begin() as s:
            s.add(Event(job_id=job_id, kind=kind, message=message, name=name, step=step, value=value))

    def events(self, job_id: str, after: int = 0, limit: int = 100) -> list[Event]:
        with self.session() as s:
            return list(s.scalars(select(Event).where(Event.job_id == job_id, Event.id > after)
                                  .order_by(Event.id).limit(limit)))

    # --- prompts --------------------------------------------------------------------------------
    def save_prompt(self, job: Job, name: str, tensor, backbone: str, algorithm: str,
                    task: str | None = None, seed: int | None = None) -> Prompt:
        """Store a prompt (a torch tensor) once per (job, name): saving it again returns the stored one."""
        from core.prompts import prompt_bytes

        data = prompt_bytes(tensor)
        row = Prompt(id=new_id("prm"), job_id=job.id, owner=job.owner, name=name, backbone=backbone,
                     algorithm=algorithm, task=task, seed=seed, shape=list(tensor.shape),
                     dtype=str(tensor.dtype).removeprefix("torch."), sha256=hashlib.sha256(data).hexdigest(),
                     data=data)
        try:
            with self.session.begin() as s:
                s.add(row)
        except IntegrityError:
            with self.session() as s:
                found = s.scalar(select(Prompt).where(Prompt.job_id == job.id, Prompt.name == name))
            if found is None:  # not the (job, name) constraint: a real error
                raise
            return found
        return row

    def get_prompt(self, prompt_id: str, owner: str | None = None) -> Prompt | None:
        with self.session() as s:
            row = s.get(Prompt, prompt_id)
        return row if row is not None and (owner is None or row.owner == owner) else None

    def job_prompt(self, job_id: str, name: str) -> Prompt | None:
        """The job's prompt of that name (e.g. "init/maml")."""
        with self.session() as s:
            return s.scalar(select(Prompt).where(Prompt.job_id == job_id, Prompt.name == name))

    @staticmethod
    def verified(row: Prompt) -> bytes:
        """The prompt's bytes, after checking them against their stored sha256."""
        if hashlib.sha256(row.data).hexdigest() != row.sha256:
            raise StoreError(f"prompt {row.id}: stored bytes do not match their sha256; not served")
        return row.data

    def prompt_tensor(self, row: Prompt):
        from core.prompts import prompt_from_bytes

        return prompt_from_bytes(self.verified(row))

    def list_prompts(self, owner: str | None = None, backbone: str | None = None, algorithm: str | None = None,
                     job_id: str | None = None, limit: int = 200) -> list[Prompt]:
        q = select(Prompt)
        for column, value in ((Prompt.owner, owner), (Prompt.backbone, backbone), (Prompt.algorithm, algorithm),
                              (Prompt.job_id, job_id)):
            if value is not None:
                q = q.where(column == value)
        with self.session() as s:
            return list(s.scalars(q.order_by(Prompt.created_at.desc(), Prompt.id).limit(limit)))

    # --- scores and results ---------------------------------------------------------------------
    def save_score(self, **fields) -> bool:
        """One downstream run's scores; False if that cell was stored already (a redelivery)."""
        try:
            with self.session.begin() as s:
                s.add(Score(**fields))
        except IntegrityError:
            if self.get_score(*(fields.get(f) for f in ("job_id", "method", "task", "seed", "lr"))) is None:
                raise  # not a redelivery: a missing field or job
            return False
        return True

    def get_score(self, job_id: str, method: str, task: str, seed: int, lr: float) -> Score | None:
        with self.session() as s:
            return s.scalar(select(Score).where(Score.job_id == job_id, Score.method == method, Score.task == task,
                                                Score.seed == seed, Score.lr == lr))

    def find_score(self, owner: str, inputs: str, method: str, task: str, seed: int, lr: float) -> Score | None:
        """The owner's earliest run of that cell computed from the same `inputs`, in any job."""
        with self.session() as s:
            return s.scalar(select(Score).join(Job, Job.id == Score.job_id).where(
                Job.owner == owner, Score.inputs == inputs, Score.method == method, Score.task == task,
                Score.seed == seed, Score.lr == lr).order_by(Score.id).limit(1))

    def scores(self, job_id: str) -> list[Score]:
        with self.session() as s:
            return list(s.scalars(select(Score).where(Score.job_id == job_id).order_by(Score.id)))

    def save_results(self, job_id: str, tasks: list[dict], args: dict[str, float],
                     diverged: dict[str, str] | None = None) -> None:
        """Replace the job's aggregated results (aggregation may run again after a redelivery);
        `diverged`: the methods whose meta-training diverged, and why (a row without an ARG)."""
        with self.session.begin() as s:
            s.execute(delete(TaskResult).where(TaskResult.job_id == job_id))
            s.execute(delete(MethodResult).where(MethodResult.job_id == job_id))
            s.add_all(TaskResult(job_id=job_id, **row) for row in tasks)
            s.add_all(MethodResult(job_id=job_id, method=m, arg=v) for m, v in args.items())
            s.add_all(MethodResult(job_id=job_id, method=m, diverged=why) for m, why in (diverged or {}).items())

    def results(self, job_id: str) -> tuple[list[TaskResult], list[MethodResult]]:
        with self.session() as s:
            return (list(s.scalars(select(TaskResult).where(TaskResult.job_id == job_id).order_by(TaskResult.id))),
                    list(s.scalars(select(MethodResult).where(MethodResult.job_id == job_id).order_by(MethodResult.id))))

    # --- dispatches and leases -------------------------------------------------------------------
    def dispatch(self, job_id: str, step: str, task: str, args: list, resend: Dispatch | None = None) -> str | None:
        """Record that a step is being sent to the workers; the message id to send it with, or
        None if it needs no message: sent before (unless `resend`, the row as the reconciler saw
        it, is still as it was) or done."""
        message_id = str(uuid.uuid4())
        if resend is None:
            try:
                with self.engine.begin() as c:
                    c.execute(_NEW_DISPATCH, self._dispatch_row(job_id, step, task, args, message_id))
            except IntegrityError:  # sent already, by this or another process
                return None
            return message_id
        with self.session.begin() as s:  # only if no worker took it since the reconciler looked
            changed = s.execute(update(Dispatch).where(
                Dispatch.job_id == job_id, Dispatch.step == step, Dispatch.done.is_(False),
                Dispatch.message_id == resend.message_id, Dispatch.attempts == resend.attempts,
            ).values(message_id=message_id, sent_at=now(), worker=None)).rowcount
        return message_id if changed else None

    @staticmethod
    def _dispatch_row(job_id: str, step: str, task: str, args: list, message_id: str) -> dict:
        return dict(job_id=job_id, step=step, task=task, args=args, message_id=message_id, sent_at=now(),
                    attempts=0, worker=None, heartbeat_at=None, done=False)

    def claim(self, job_id: str, step: str, worker: str, lease: float) -> int | None:
        """Take the lease of a step for `worker`: the number of times it has now been taken, or None
        if it is done, unknown, or held by a worker that beat within the last `lease` seconds."""
        with self.session.begin() as s:
            taken = s.execute(update(Dispatch).where(
                Dispatch.job_id == job_id, Dispatch.step == step, Dispatch.done.is_(False),
                or_(Dispatch.worker.is_(None), Dispatch.heartbeat_at < now() - timedelta(seconds=lease)),
            ).values(worker=worker, heartbeat_at=now(), attempts=Dispatch.attempts + 1)).rowcount
            return s.scalar(select(Dispatch.attempts).where(Dispatch.job_id == job_id, Dispatch.step == step)) \
                if taken else None

    def beat(self, job_id: str, step: str, worker: str) -> bool:
        """The worker holding the step is alive; False if it no longer holds it."""
        with self.session.begin() as s:
            held = s.execute(update(Dispatch).where(Dispatch.job_id == job_id, Dispatch.step == step,
                                                    Dispatch.worker == worker, Dispatch.done.is_(False))
                             .values(heartbeat_at=now())).rowcount
            s.execute(update(Job).where(Job.id == job_id).values(heartbeat_at=now()))
        return held > 0

    def release(self, job_id: str, step: str) -> None:
        """The step is over (done, failed or cancelled): no lease on it expires any more."""
        with self.session.begin() as s:
            s.execute(update(Dispatch).where(Dispatch.job_id == job_id, Dispatch.step == step).values(done=True))

    def open_dispatches(self) -> list[Dispatch]:
        """Steps not over, of jobs still queued or running: what the reconciler watches."""
        with self.session() as s:
            return list(s.scalars(select(Dispatch).join(Job, Job.id == Dispatch.job_id)
                                  .where(Dispatch.done.is_(False), Job.status.in_(("queued", "running")))))

    def unsent_jobs(self, older_than: float) -> list[Job]:
        """Queued jobs stored more than `older_than` seconds ago with no step ever recorded as
        sent (stored without `first`: by an API before the job and its first step were one
        transaction, which could stop between the two, or by hand)."""
        sent = select(Dispatch.job_id).where(Dispatch.job_id == Job.id).exists()
        with self.session() as s:
            return list(s.scalars(select(Job).where(Job.status == "queued", ~sent,
                                                    Job.created_at < now() - timedelta(seconds=older_than))))

    def downstream_left(self, job_id: str) -> int:
        """Downstream runs of the job not yet finished."""
        with self.session() as s:
            return s.scalar(select(func.count()).where(JobUnit.job_id == job_id, JobUnit.unit.like("downstream/%"),
                                                       JobUnit.done.is_(False)))

    def awaiting_aggregate(self) -> list[str]:
        """Running jobs whose downstream runs are all finished and whose aggregation was never sent."""
        left = select(JobUnit.job_id).where(JobUnit.job_id == Job.id, JobUnit.unit.like("downstream/%"),
                                            JobUnit.done.is_(False)).exists()
        sent = select(Dispatch.job_id).where(Dispatch.job_id == Job.id, Dispatch.step == "aggregate").exists()
        with self.session() as s:
            return list(s.scalars(select(Job.id).where(Job.status == "running", Job.phase == "downstream",
                                                       ~left, ~sent)))

    # --- checkpoints and artifacts --------------------------------------------------------------
    def save_checkpoint(self, job_id: str, key: str, state: dict) -> None:
        import torch

        buf = io.BytesIO()
        torch.save(state, buf)
        with self.session.begin() as s:
            s.merge(Checkpoint(job_id=job_id, key=key, data=buf.getvalue(), updated_at=now()))

    def load_checkpoint(self, job_id: str, key: str) -> dict | None:
        import torch

        with self.session() as s:
            row = s.get(Checkpoint, (job_id, key))
        return None if row is None else torch.load(io.BytesIO(row.data), weights_only=True)

    def stamp_checkpoint(self, job_id: str, key: str, inputs: str) -> None:
        """Record what a finished checkpoint computed from, for later jobs to find (find_checkpoint)."""
        with self.session.begin() as s:
            s.execute(update(Checkpoint).where(Checkpoint.job_id == job_id, Checkpoint.key == key).values(inputs=inputs))

    def find_checkpoint(self, owner: str, key: str, inputs: str) -> tuple[str, dict] | None:
        """The owner's earliest checkpoint under `key` stamped with the same `inputs`, in any job:
        (that job's id, the state)."""
        import torch

        with self.session() as s:
            row = s.scalar(select(Checkpoint).join(Job, Job.id == Checkpoint.job_id).where(
                Job.owner == owner, Checkpoint.key == key, Checkpoint.inputs == inputs)
                .order_by(Checkpoint.updated_at, Checkpoint.job_id).limit(1))
        return None if row is None else (row.job_id, torch.load(io.BytesIO(row.data), weights_only=True))

    def save_artifact(self, job_id: str, name: str, content_type: str, data: bytes) -> None:
        with self.session.begin() as s:
            s.merge(Artifact(job_id=job_id, name=name, content_type=content_type, data=data))

    def artifact(self, job_id: str, name: str) -> Artifact | None:
        with self.session() as s:
            return s.get(Artifact, (job_id, name))

    # --- uploaded tasks -------------------------------------------------------------------------
    def save_task(self, owner: str, name: str, type: str, metric: str, options: list[str] | None, format: str,
                  examples: int, files: dict[str, bytes]) -> UploadedTask:
        """Store an uploaded task and its files; TaskExists if the owner has a task of that name."""
        row = UploadedTask(id=new_id("task"), owner=owner, name=name, type=type, metric=metric, options=options,
                           format=format, examples=examples,
                           files={f: hashlib.sha256(d).hexdigest() for f, d in files.items()})
        try:
            with self.session.begin() as s:
                s.add(row)
                s.flush()
                s.add_all(TaskFile(task_id=row.id, filename=f, data=d) for f, d in files.items())
        except IntegrityError:
            if self.get_task(owner, name) is not None:
                raise TaskExists(owner, name) from None
            raise
        return row

    def get_task(self, owner: str, name: str) -> UploadedTask | None:
        with self.session() as s:
            return s.scalar(select(UploadedTask).where(UploadedTask.owner == owner, UploadedTask.name == name))

    def task_files(self, task_id: str) -> dict[str, bytes]:
        with self.session() as s:
            return {f.filename: f.data for f in s.scalars(select(TaskFile).where(TaskFile.task_id == task_id))}

    def list_tasks(self, owner: str | None = None) -> list[UploadedTask]:
        q = select(UploadedTask).order_by(UploadedTask.created_at)
        with self.session() as s:
            return list(s.scalars(q if owner is None else q.where(UploadedTask.owner == owner)))

    def counts(self) -> dict[str, int]:
        """Jobs per status, for /metrics."""
        with self.session() as s:
            return dict(s.execute(select(Job.status, func.count()).group_by(Job.status)).all())


for _name, _method in list(vars(Store).items()):
    if inspect.isfunction(_method) and not _name.startswith("_"):
        setattr(Store, _name, retrying(_method))


class StoreCheckpoints:
    """core.experiment's Checkpoints protocol over the store: a job's checkpoints survive the
    worker that wrote them, so any worker can resume the job."""

    def __init__(self, store: Store, job_id: str):
        self.store, self.job_id = store, job_id

    def load(self, key: str) -> dict | None:
        return self.store.load_checkpoint(self.job_id, key)

    def save(self, key: str, state: dict) -> None:
        self.store.save_checkpoint(self.job_id, key, state)


def utc(dt: datetime | None) -> str | None:
    """ISO 8601 in UTC (SQLite gives naive datetimes back; they were written in UTC)."""
    if dt is None:
        return None
    return dt.isoformat() if dt.tzinfo else dt.isoformat() + "+00:00"
