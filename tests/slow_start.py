"""primer's Celery app (worker.app, its real settings) whose new worker processes take
PRIMER_TEST_SLOW_START seconds to start, standing in for a backbone's preload, and are replaced
after every task; with a task that appends its process id to a file. For tests/test_hardening.py."""
import os
import time

from celery.signals import worker_process_init

from worker.app import app

app.conf.worker_max_tasks_per_child = 1


@worker_process_init.connect
def _slow_start(**_):
    time.sleep(float(os.environ["PRIMER_TEST_SLOW_START"]))


@app.task(name="test.pid")
def pid(path: str) -> None:
    with open(path, "a") as f:
        f.write(f"{os.getpid()}\n")
