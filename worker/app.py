"""The Celery app: Redis (or, on one machine, a SQLite file) as broker, queues for upstream and
downstream work, late acknowledgement, and a reconciler that sends again what the broker lost.

Run a worker with `celery -A worker.app worker -Q upstream,downstream --concurrency 1`
(one process per GPU); `primer serve` starts one itself.

Every message is recorded in the store before it is sent (core.jobs.send), and every worker
holds a lease on the step it runs, beating while it runs (worker.tasks). Each worker's main
process also runs the reconciler (core.jobs.reconcile) every `reconcile_seconds`: a step whose
worker stopped beating is sent again, and so is one whose message is no longer in the broker.
"""
from __future__ import annotations

import json
import logging
import os
import threading
from functools import lru_cache

from celery import Celery
from celery.signals import worker_process_init, worker_ready, worker_shutdown

from core.settings import settings

# A worker's log is no terminal: no download or weight-loading progress bars in it (each refresh
# came out as a WARNING line). Set here, before a child process imports transformers.
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

QUEUES = ("upstream", "downstream")
ROUTES = {"primer.start": "upstream", "primer.cell": "downstream", "primer.aggregate": "downstream"}
log = logging.getLogger("primer.worker")


def make_app() -> Celery:
    s = settings()
    app = Celery("primer", broker=s.broker(), include=["worker.tasks"])
    # Redis hands an unacknowledged task to another worker after this long (the SQLite broker
    # of the embedded mode takes no such option).
    redis = {"visibility_timeout": s.visibility_timeout}
    app.conf.update(
        task_acks_late=True,  # acknowledged when done: a task whose worker dies is delivered again
        task_reject_on_worker_lost=True,
        task_ignore_result=True,  # results go to the store
        worker_prefetch_multiplier=1,  # a worker holds one task at a time; the rest stay for others
        worker_max_tasks_per_child=50,  # a fresh process now and then (memory, CUDA state)
        worker_proc_alive_timeout=s.process_start_seconds,  # a new process preloads its backbone first
        broker_transport_options=redis if s.broker().startswith("redis") else {},
        broker_connection_retry_on_startup=True,
        broker_connection_max_retries=None,  # a broker restart is waited out, however long
        task_default_queue="downstream",
        task_routes={name: {"queue": queue} for name, queue in ROUTES.items()},
        task_serializer="json", accept_content=["json"],  # never pickle
        worker_hijack_root_logger=False,
    )
    return app


app = make_app()


@lru_cache(maxsize=1)
def store():
    from core.store import Store

    return Store(settings().db_url(), settings().db_retry_seconds)


def transport(task: str, args: list, message_id: str) -> None:
    app.send_task(task, args=args, task_id=message_id, queue=ROUTES[task])


def enqueue(job_id: str, message_id: str) -> None:
    """Hand a new job to the workers: the API calls this once the job is stored with its first
    step recorded as sent under `message_id` (Store.create_job's `first`)."""
    from core.jobs import START

    transport(START[1], [job_id], message_id)


def warm_sender() -> None:
    """Do the first send's one-time work now: the broker connection, the producer, the (disabled)
    result backend Celery loads by entry point, each queue's declaration. Paid by the first job
    instead, it took ~150 ms, and every request that arrived meanwhile waited behind it."""
    from kombu.common import maybe_declare

    app.backend  # noqa: B018 (loaded on first use)
    # Every producer of the pool, each with its own broker connection: the first burst of
    # requests after a start takes several at once, and each new one cost ~30-150 ms.
    held = []
    try:
        for _ in range(app.conf.broker_pool_limit or 1):
            held.append(producer := app.producer_pool.acquire(block=True))
            producer.connection.ensure_connection(max_retries=1, timeout=2)
            for queue in QUEUES:
                maybe_declare(app.amqp.queues[queue], producer.channel)
    finally:
        for producer in held:
            producer.release()


def broker_ping() -> None:
    """Raise if the broker cannot be reached (for /readyz)."""
    with app.connection_for_write() as conn:
        conn.ensure_connection(max_retries=1, timeout=2)


def pending_ids() -> set[str] | None:
    """The ids of the messages the broker holds for the workers (waiting, or taken and not yet
    acknowledged); None for a broker this cannot read."""
    ids: set[str] = set()
    with app.connection_for_read() as conn:
        channel = conn.default_channel
        kind = conn.transport.driver_type
        if kind == "redis":
            client = channel.client
            for queue in QUEUES:
                for key in {channel._q_for_pri(queue, p) for p in channel.priority_steps}:
                    ids.update(json.loads(raw)["headers"]["id"] for raw in client.lrange(key, 0, -1))
            ids.update(json.loads(raw)[0]["headers"]["id"] for raw in client.hvals(channel.unacked_key))
        elif kind == "sql":
            # kombu's SQL transport hides a message once a worker takes it and keeps no unacked
            # list: only the visible ones are still the broker's; a taken one is the lease's.
            session, message, queue = channel.session, channel.message_cls, channel.queue_cls
            try:
                rows = (session.query(message.payload).join(queue, message.queue_id == queue.id)
                        .filter(queue.name.in_(QUEUES), message.visible.is_(True)).all())
            finally:
                session.commit()  # end the read: the broker's SQLite file is shared with the workers
            ids.update(json.loads(payload)["headers"]["id"] for (payload,) in rows)
        else:
            return None
    return ids


_stop = threading.Event()


def reconcile_forever() -> None:
    from core import jobs

    every = settings().reconcile_seconds
    while not _stop.wait(every):
        try:
            for line in jobs.reconcile(store(), transport, pending_ids()):
                log.warning("reconciler: %s", line)
        except Exception:  # the store or the broker is away: try again next round
            log.warning("reconciler: round failed", exc_info=True)


@worker_process_init.connect
def _preload(**_):
    """In each child process, before its first task: the backbone PRIMER_PRELOAD_BACKBONE names."""
    value = settings().preload_backbone
    if value:
        from core import jobs

        try:
            jobs.preload(value)
            log.info("preloaded backbone %s", value)
        except Exception:  # the process still serves: a job on this backbone loads it, or fails saying why
            log.exception("could not preload backbone %s", value)


@worker_ready.connect
def _start_reconciler(**_):
    threading.Thread(target=reconcile_forever, name="reconciler", daemon=True).start()


@worker_shutdown.connect
def _stop_reconciler(**_):
    _stop.set()
