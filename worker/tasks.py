"""The tasks. Each is idempotent: run twice (a redelivered message), it resumes from its
checkpoint or finds its result stored. Torch and the backbone load inside the worker's child
process, never in the parent that forks it."""
from __future__ import annotations

from dataclasses import asdict
from functools import lru_cache

from celery import chord, group

from core import jobs
from core.settings import settings
from worker.app import app


@lru_cache(maxsize=1)
def store():
    from core.store import Store

    return Store(settings().db_url())


def _fail(job_id: str, error: Exception) -> None:
    from core.backbones import BackboneError
    from core.tasks import TaskError

    code = ("invalid_task" if isinstance(error, TaskError) else
            "backbone_unavailable" if isinstance(error, BackboneError) else "internal")
    message = f"{type(error).__name__}: {error}"
    store().add_event(job_id, f"failed: {message}")
    store().set_status(job_id, "failed", phase="failed", error_code=code, error_message=message)


@app.task(name="primer.start")
def start(job_id: str) -> None:
    try:
        cells = jobs.start(store(), job_id)
    except jobs.Cancelled:
        return
    except Exception as e:
        _fail(job_id, e)
        raise
    if cells:
        chord(group(cell.si(job_id, asdict(c)) for c in cells), aggregate.si(job_id)).apply_async()


@app.task(name="primer.cell")
def cell(job_id: str, which: dict) -> None:
    try:
        jobs.run_cell(store(), job_id, jobs.Cell(**which))
    except jobs.Cancelled:
        return
    except Exception as e:
        _fail(job_id, e)
        raise


@app.task(name="primer.aggregate")
def aggregate(job_id: str) -> None:
    try:
        jobs.aggregate(store(), job_id)
    except Exception as e:
        _fail(job_id, e)
        raise
