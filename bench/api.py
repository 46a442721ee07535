"""Service overhead, measured on loopback against a real uvicorn (the API), real Postgres (the
store), Redis (the broker) and a real Celery worker process:

1. POST /jobs and GET /jobs/{id} under N concurrent clients for a fixed time: requests/s,
   p50/p99/max latency, errors. Twice: closed loop (each client sends its next request when
   the last one has answered: the API's throughput at saturation, where latency is N divided
   by throughput) and paced (each client sends at a fixed rate, the total well under that
   throughput: the latency a request sees when the API is not the bottleneck). No worker runs
   meanwhile, so the figure is the API's own cost (auth, spec check, store, broker hand-off),
   not the API fighting a training job for the CPU.
2. Queueing delay: the broker is emptied, the backbone is converted to the cache if this machine
   has never used it (once per machine, not per job), one worker is started, and jobs are
   submitted one at a time: POST -> the worker marks the job running (started_at) and POST -> its first training
   step (the first upstream loss event), both from the store's timestamps. Then that worker is
   stopped and one started with PRIMER_PRELOAD_BACKBONE: once its process has loaded the
   backbone, one more job, whose first step no longer waits for the load.
"""
from __future__ import annotations

import asyncio
import gc
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BROKER_DB = 7


def spec(backbone: str, i: int, steps: int = 2) -> dict:
    """A small real job on real task packs; `i` makes every body distinct."""
    return {"name": f"bench-{i}", "backbone": backbone, "prompt": {"length": 4}, "targets": ["sms_spam"],
            "upstream": {"sources": ["trec_coarse", "disaster_tweets"], "methods": ["maml"], "steps": steps,
                         "optimizer": "adamw", "outer_lr": 0.01, "seeds": [100]},
            "downstream": {"seeds": [100], "lrs": [0.01], "max_steps": 2, "eval_every": 2, "batch_size": 2,
                           "max_test_examples": 8}}


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


class Service:
    """A fresh Postgres database, two Redis databases, the API process and (on demand) a worker."""

    def __init__(self, backbone: str, uvicorn_args: list[str] = ()):
        import redis
        from sqlalchemy import create_engine, text

        from core.store import Store

        self.tmp = tempfile.TemporaryDirectory(prefix="primer-bench-")
        self.db = f"primer_bench_{os.getpid()}"
        self.admin = create_engine("postgresql+psycopg://postgres@127.0.0.1:5432/postgres", isolation_level="AUTOCOMMIT")
        with self.admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{self.db}" WITH (FORCE)'))
            conn.execute(text(f'CREATE DATABASE "{self.db}"'))
        self.redis = redis.Redis(db=BROKER_DB)
        self.redis.flushdb()
        # A model directory is allowed under the name "bench"; a registry name is allowed as itself.
        self.backbone = "bench" if Path(backbone).is_dir() else backbone
        self.env = os.environ | {
            "PRIMER_DATABASE_URL": f"postgresql+psycopg://postgres@127.0.0.1:5432/{self.db}",
            "PRIMER_BROKER_URL": f"redis://127.0.0.1:6379/{BROKER_DB}",
            "PRIMER_RATE_LIMIT": "0",  # one key at saturation: the limit would answer most of it with 429
            "PRIMER_BACKBONES": f"bench={backbone}" if self.backbone == "bench" else backbone,
        }
        self.store = Store(self.env["PRIMER_DATABASE_URL"])
        self.store.upgrade()
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.url = f"http://127.0.0.1:{s.getsockname()[1]}"
        self.procs = [self._spawn([sys.executable, "-m", "uvicorn", "api.app:create_app", "--factory",
                                   "--port", self.url.rsplit(":", 1)[1], "--log-level", "warning",
                                   *uvicorn_args])]
        import httpx

        for _ in range(300):
            try:
                if httpx.get(f"{self.url}/healthz").status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        else:
            raise RuntimeError(f"the API did not answer /healthz at {self.url} within 30 s")

    def _spawn(self, argv: list[str], env: dict | None = None, log: Path | None = None) -> subprocess.Popen:
        with open(log or os.devnull, "w") as out:
            return subprocess.Popen(argv, env=env or self.env, stdout=out, stderr=out, start_new_session=True)

    def start_worker(self, preload: bool = False, timeout: float = 300) -> float | None:
        """One Celery worker; with `preload`, one whose process loads the backbone at start,
        waited for: the seconds from its start to the backbone loaded."""
        env, log, t = self.env, None, time.monotonic()
        if preload:
            env, log = self.env | {"PRIMER_PRELOAD_BACKBONE": self.backbone}, Path(self.tmp.name) / "preload.log"
        self.procs.append(self._spawn([sys.executable, "-m", "celery", "-A", "worker.app", "worker", "-Q",
                                       "upstream,downstream", "--concurrency", "1", "-n", f"bench{len(self.procs)}@%h",
                                       "--loglevel", "info"], env, log))
        while preload and "preloaded backbone" not in log.read_text():
            if self.procs[-1].poll() is not None or time.monotonic() - t > timeout:
                raise RuntimeError(f"the worker did not preload {self.backbone} within {timeout} s:\n"
                                   + log.read_text()[-2000:])
            time.sleep(0.1)
        return time.monotonic() - t if preload else None

    def stop(self, proc: subprocess.Popen) -> None:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGTERM)  # the main process: to the group, it can hang a Celery worker
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)

    def close(self) -> None:
        from sqlalchemy import text

        for proc in self.procs:
            self.stop(proc)
        self.store.engine.dispose()
        with self.admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{self.db}" WITH (FORCE)'))
        self.admin.dispose()
        self.tmp.cleanup()


async def load(url: str, secret: str, clients: int, seconds: float, request, rate: float = 0.0) -> dict:
    """`clients` loops for `seconds`; request(http, i) sends the i-th request of a loop. Closed
    loops when `rate` is 0, else each loop sends `rate` requests/s on a fixed schedule (the clients
    staggered over the first period) and a late request is sent at once."""
    import httpx

    latencies: list[float] = []
    errors: dict[str, int] = {}
    # below uvicorn's 5 s keep-alive timeout, so no client reuses a connection the server is closing
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients, keepalive_expiry=2)
    async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {secret}"}, limits=limits,
                                 timeout=60) as http:

        async def loop(c: int) -> None:
            i, start = 0, time.perf_counter() + (c / clients / rate if rate else 0)
            while i == 0 or time.perf_counter() < end:  # every client sends at least one request
                if rate:
                    await asyncio.sleep(max(0.0, start + i / rate - time.perf_counter()))
                t0 = time.perf_counter()
                try:
                    r = await request(http, c * 1_000_000 + i)
                    if r.status_code >= 400:
                        errors[str(r.status_code)] = errors.get(str(r.status_code), 0) + 1
                except httpx.HTTPError as e:
                    errors[type(e).__name__] = errors.get(type(e).__name__, 0) + 1
                latencies.append(time.perf_counter() - t0)
                i += 1

        # The load generator's own full collections walked everything this process had imported
        # (~150 ms, every coroutine waiting) and were timed as the API's latency: out of their way.
        gc.collect()
        gc.freeze()
        t0 = time.perf_counter()
        end = t0 + seconds  # after the collection, which took over a second on a loaded CI machine
        try:
            await asyncio.gather(*(loop(c) for c in range(clients)))
        finally:
            gc.unfreeze()
        elapsed = time.perf_counter() - t0
    ms = [x * 1000 for x in latencies]
    return {"mode": f"paced {rate * clients:g}/s" if rate else "closed loop",
            "requests": len(ms), "requests_per_s": round(len(ms) / elapsed, 1),
            "p50_ms": round(percentile(ms, 50), 1), "p99_ms": round(percentile(ms, 99), 1),
            "max_ms": round(max(ms), 1), "errors": sum(errors.values()), "error_kinds": errors}


def queue_delay(svc: Service, http, n: int, timeout: float = 300, offset: int = 0) -> list[dict]:
    """Submit n jobs one after another to an idle worker; seconds from POST to running, to step 1,
    and from step 1 to step 2."""
    from sqlalchemy import select

    from core.store.models import Event, Job

    def step_times(job_id):
        with svc.store.session() as s:
            job = s.get(Job, job_id)
            return job, list(s.scalars(select(Event.time).where(Event.job_id == job_id, Event.kind == "metric",
                                                               Event.name.like("upstream/%"))
                                       .order_by(Event.id).limit(2)))

    out = []
    for i in range(n):
        r = http.post("/jobs", json=spec(svc.backbone, 10_000_000 + offset + i))
        r.raise_for_status()
        job_id, deadline = r.json()["id"], time.monotonic() + timeout
        while True:
            job, steps = step_times(job_id)
            if steps or job.status in ("failed", "cancelled") or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        if not steps:
            raise RuntimeError(f"job {job_id} reached no training step ({job.status}: {job.error_message}); "
                               f"is a worker running against {svc.env['PRIMER_BROKER_URL']}?")
        while http.get(f"/jobs/{job_id}").json()["status"] not in ("succeeded", "failed", "cancelled"):
            time.sleep(0.2)  # one job at a time: the next one meets an idle worker
        _, steps = step_times(job_id)
        out.append({"to_running_s": (job.started_at - job.created_at).total_seconds(),
                    "to_first_step_s": (steps[0] - job.created_at).total_seconds(),
                    # about what the first step itself takes (a step's loss is recorded at most once a second)
                    "step_s": (steps[1] - steps[0]).total_seconds() if len(steps) == 2 else None})
    return out


def cancel_unfinished(store) -> None:
    from core.store import STATUSES, TERMINAL

    for status in set(STATUSES) - set(TERMINAL):
        while jobs := store.list_jobs(status=status, limit=100)[0]:  # a cancelled job leaves the page
            for job in jobs:
                store.request_cancel(job.id)


def prepare_backbone(name: str) -> float:
    """What `primer backbones prepare` does: a registered backbone's first use on a machine
    converts it to the fp32 cache (~20-60 s), which would otherwise land in the first job's
    delay. Seconds it took (~0 when the cache has it)."""
    from core.backbones import REGISTRY
    from core.backbones.registry import cached_dir

    start = time.monotonic()
    if name in REGISTRY:
        cached_dir(name)
    return time.monotonic() - start


def untimed(figure: dict, smoke: bool) -> dict:
    """The smoke run reports no time-based figure: they mean nothing on a busy CI machine."""
    timed = ("requests_per_s", "p50_ms", "p99_ms", "max_ms", "to_running_s", "to_first_step_s",
             "first_job_to_first_step_s", "step_s", "preload_s", "prepare_s")
    return {k: (None if smoke and k in timed else v) for k, v in figure.items()}


def run(args, emit) -> None:
    import httpx

    clients, seconds = (2, 1.0) if args.smoke else (args.api_clients, args.api_seconds)
    svc = Service(args.backbone)
    try:
        _, secret = svc.store.create_key("bench")
        base = {"impl": "primer", "clients": clients, "seconds": seconds, "store": "postgres", "broker": "redis"}

        async def post(http, i):
            return await http.post("/jobs", json=spec(svc.backbone, i))

        async def get(http, i):
            return await http.get(f"/jobs/{ids[i % len(ids)]}")

        ids: list[str] = []
        for name, request in (("api POST /jobs", post), ("api GET /jobs/{id}", get)):
            for rate in (0.0, args.api_rate):
                figure = asyncio.run(load(svc.url, secret, clients, seconds, request, rate))
                emit({"figure": name, **base, **untimed(figure, args.smoke)})
            ids = ids or [j.id for j in svc.store.list_jobs(limit=100)[0]]

        # The load's jobs never reach a worker: the delay is measured on an idle one. They are
        # cancelled as well as dropped from the broker, or the worker's reconciler would send
        # them all again and the measured job would queue behind them.
        cancel_unfinished(svc.store)
        svc.redis.flushdb()
        prepare_s = prepare_backbone(args.backbone)  # a one-time conversion is not a job's queueing delay
        svc.start_worker()
        with httpx.Client(base_url=svc.url, headers={"Authorization": f"Bearer {secret}"}, timeout=60) as http:
            delays = queue_delay(svc, http, 1 if args.smoke else 3)
        # The first job loads the backbone; the worker keeps it for the later ones.
        later = delays[1:] or delays
        steps = [d["step_s"] for d in delays if d["step_s"] is not None]
        emit({"figure": "queueing delay", "impl": "primer", "jobs": len(delays), **untimed({
            "to_running_s": round(statistics.median(d["to_running_s"] for d in later), 3),
            "to_first_step_s": round(statistics.median(d["to_first_step_s"] for d in later), 3),
            "first_job_to_first_step_s": round(delays[0]["to_first_step_s"], 3),
            "step_s": round(statistics.median(steps), 3) if steps else None,
            "prepare_s": round(prepare_s, 3)}, args.smoke)})

        svc.stop(svc.procs[-1])  # a worker whose process loads the backbone before its first job
        preload_s = svc.start_worker(preload=True)
        with httpx.Client(base_url=svc.url, headers={"Authorization": f"Bearer {secret}"}, timeout=60) as http:
            first, = queue_delay(svc, http, 1, offset=len(delays))
        emit({"figure": "queueing delay, preloaded worker", "impl": "primer", "jobs": 1, **untimed({
            "preload_s": round(preload_s, 3), "to_running_s": round(first["to_running_s"], 3),
            "first_job_to_first_step_s": round(first["to_first_step_s"], 3)}, args.smoke)})
    finally:
        svc.close()
