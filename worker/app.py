"""The Celery app: Redis (or, on one machine, a SQLite file) as broker, queues for upstream and
downstream work, late acknowledgement so a task whose worker dies is run again.

Run a worker with `celery -A worker.app worker -Q upstream,downstream --concurrency 1`
(one process per GPU); `primer serve` starts one itself.
"""
from __future__ import annotations

from celery import Celery

from core.settings import settings

QUEUES = ("upstream", "downstream")


def make_app() -> Celery:
    s = settings()
    app = Celery("primer", broker=s.broker(), backend=s.results_url(), include=["worker.tasks"])
    # Redis hands an unacknowledged task to another worker after this long (the SQLite broker
    # of the embedded mode takes no such option).
    redis = {"visibility_timeout": s.visibility_timeout}
    app.conf.update(
        task_acks_late=True,  # acknowledged when done: a task whose worker dies is delivered again
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,  # a worker holds one task at a time; the rest stay for others
        worker_max_tasks_per_child=50,  # a fresh process now and then (memory, CUDA state)
        broker_transport_options=redis if s.broker().startswith("redis") else {},
        result_backend_transport_options=redis if s.results_url().startswith("redis") else {},
        broker_connection_retry_on_startup=True,
        task_default_queue="downstream",
        task_routes={"primer.start": {"queue": "upstream"}, "primer.cell": {"queue": "downstream"},
                     "primer.aggregate": {"queue": "downstream"}, "celery.chord_unlock": {"queue": "downstream"}},
        task_serializer="json", result_serializer="json", accept_content=["json"],  # never pickle
        result_expires=7 * 24 * 3600,
        worker_hijack_root_logger=False,
    )
    return app


app = make_app()


def enqueue(job_id: str) -> None:
    """Hand a new job to the workers (the API calls this after storing it)."""
    app.send_task("primer.start", args=[job_id], queue="upstream")


def broker_ping() -> None:
    """Raise if the broker cannot be reached (for /readyz)."""
    with app.connection_for_write() as conn:
        conn.ensure_connection(max_retries=1, timeout=2)
