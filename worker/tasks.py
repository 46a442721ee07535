"""The tasks. Each runs one step of a job under a lease (core.store's dispatches): it takes the
lease, beats while it works, and gives it up when the step is over. A copy of the message that
arrives while a live worker holds the step finds the lease taken and does nothing; a worker
that was silent past its lease and finds at its next beat that the step is another's stops at
its next training step (jobs.LeaseLost); a step run again after its worker died resumes from
its checkpoint or finds its result stored. Torch and the backbone load inside the worker's
child process, never in the parent that forks it."""
from __future__ import annotations

import logging
import os
import socket
import threading
from contextlib import contextmanager

from sqlalchemy.exc import DBAPIError

from core import jobs
from core.settings import settings
from core.store import transient
from worker.app import app, store, transport

log = logging.getLogger("primer.worker")


def _fail(job_id: str, error: Exception, code: str | None = None) -> None:
    from core.backbones import BackboneError
    from core.errors import UserError
    from core.fetch import FetchError
    from core.tasks import TaskError

    code = code or ("invalid_task" if isinstance(error, TaskError) else
                    "backbone_unavailable" if isinstance(error, BackboneError) else
                    "data_unavailable" if isinstance(error, FetchError) else
                    "invalid_input" if isinstance(error, UserError) else "internal")
    # the user's side reads the message alone; primer's own failures keep the exception's type
    message = f"{type(error).__name__}: {error}" if code == "internal" else str(error)
    store().add_event(job_id, f"failed: {message}")
    store().set_status(job_id, "failed", phase="failed", error_code=code, error_message=message)


@contextmanager
def _beating(job_id: str, step: str, worker: str):
    stop = threading.Event()
    jobs.lease_lost.clear()

    def beat():
        while not stop.wait(settings().heartbeat_seconds):
            try:
                if not store().beat(job_id, step, worker):
                    log.warning("%s %s: the lease is no longer this worker's; stopping at the next step", job_id, step)
                    jobs.lease_lost.set()
                    return
            except Exception:  # the store is away for a moment; the next beat may get through
                log.warning("%s %s: heartbeat failed", job_id, step, exc_info=True)

    thread = threading.Thread(target=beat, name=f"heartbeat {job_id} {step}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def run_step(job_id: str, step: str, body) -> None:
    """Run `body()` as the step's leaseholder, if the lease can be had."""
    cfg, worker = settings(), f"{socket.gethostname()}:{os.getpid()}"
    attempts = store().claim(job_id, step, worker, cfg.lease_seconds)
    if attempts is None:
        log.info("%s %s: done, or held by a live worker; this copy of the message is dropped", job_id, step)
        return
    if attempts > cfg.max_attempts:
        _fail(job_id, RuntimeError(f"{step} was started {attempts - 1} times and its worker was lost each "
                                   f"time; given up after {cfg.max_attempts} attempts"), code="worker_lost")
        store().release(job_id, step)
        return
    with _beating(job_id, step, worker):
        try:
            body()
        except jobs.Cancelled:
            pass
        except jobs.LeaseLost:
            return  # the step is the other worker's now, and so is its lease
        except Exception as e:
            if isinstance(e, DBAPIError) and transient(e):
                raise  # the store stayed away too long: the lease lapses and the step is sent again
            _fail(job_id, e)
            store().release(job_id, step)
            raise
    store().release(job_id, step)


@app.task(name="primer.start")
def start(job_id: str) -> None:
    def body():
        for cell in jobs.start(store(), job_id):
            jobs.send_cell(store(), transport, job_id, cell)
        jobs.send_aggregate_if_done(store(), transport, job_id)  # a restart after every run was done

    run_step(job_id, "start", body)


@app.task(name="primer.cell")
def cell(job_id: str, which: dict) -> None:
    c = jobs.Cell(**which)

    def body():
        jobs.run_cell(store(), job_id, c)
        jobs.send_aggregate_if_done(store(), transport, job_id)

    run_step(job_id, f"cell:{c.unit}", body)


@app.task(name="primer.aggregate")
def aggregate(job_id: str) -> None:
    run_step(job_id, "aggregate", lambda: jobs.aggregate(store(), job_id))
