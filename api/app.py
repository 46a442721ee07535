"""The HTTP API: checks a request, writes it to the store, hands jobs to the workers.

Thin on purpose: what a job may be is core.jobs.check, what is kept is core.store, the work is
the worker's. Run it with `uvicorn api.app:create_app --factory`. Nothing heavy is imported at
module level; core (and with it torch) is imported when the app is created.
"""
from __future__ import annotations

import asyncio
import base64
import gc
import html
import io
import json
import logging
import math
import re
import tempfile
import threading
import time
import uuid
import zipfile
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Literal

from fastapi import Depends, FastAPI, Header, HTTPException, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from api import schemas as S
from api.limits import RateLimiter
from core.settings import settings

if TYPE_CHECKING:
    from core.store import Store

log = logging.getLogger("primer.api")

STATUSES = ("queued", "running", "succeeded", "failed", "cancelled")
FORMATS = ("safetensors", "pt", "npy", "peft")
PLOTS = ("relative_gain.png", "upstream_loss.png", "clusters.png")
TASK_TYPES = ("classification", "multiple_choice", "qa", "generation", "regression")
TASK_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]{0,99}")
CROSSFIT_FILE = re.compile(r"(?P<task>.+)_\d+_\d+_(train|dev|test)\.tsv")
DB_WAIT = 5.0  # seconds a request waits for the database to come back before it is a 503
FORM_SLACK = 64 * 1024  # multipart boundaries and text fields on top of the files themselves
# Compressed or packed files start with these bytes. A task file is plain text; an archive is refused
# by its first bytes and never opened, so a zip or gzip bomb costs nothing.
ARCHIVES = {b"PK\x03\x04": "zip", b"PK\x05\x06": "zip", b"\x1f\x8b": "gzip", b"BZh": "bzip2",
            b"\xfd7zXZ\x00": "xz", b"\x28\xb5\x2f\xfd": "zstd", b"7z\xbc\xaf\x27\x1c": "7z",
            b"Rar!\x1a\x07": "rar"}
MAX_EVENT_ID = 2**63 - 1  # events.id is a 64-bit integer column: a larger `after` is an error in Postgres

JOB_BODY_DOC = {"requestBody": {"required": True, "content": {"application/json": {"schema": {
    "type": "object", "description": "a job spec: the fields of core.spec.JobSpec (name, backbone, prompt, "
                                     "targets, upstream, downstream, ...)"},
    "example": {"name": "demo", "targets": ["sms_spam"],
                "downstream": {"seeds": [13], "lrs": [0.3], "max_steps": 10}}}}}}
UPLOAD_DOC = {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
    "type": "object", "required": ["name", "files"], "properties": {
        "name": {"type": "string", "pattern": TASK_NAME.pattern},
        "type": {"type": "string", "enum": list(TASK_TYPES), "description": "required unless the file is a "
                                                                               "BIG-bench task.json"},
        "options": {"type": "string", "description": "comma-separated labels"},
        "metric": {"type": "string"},
        "files": {"type": "array", "items": {"type": "string", "format": "binary"}, "description":
                  "CrossFit <name>_<k>_<seed>_<train|dev|test>.tsv files, one BIG-bench task.json, "
                  "or one .jsonl file of {\"input\", \"output\"} objects"}}}}}}}


def _default_enqueue(job_id: str, message_id: str) -> None:
    """Send a new job to the Celery workers."""
    from worker.app import enqueue

    enqueue(job_id, message_id)


def _warm_default_sender() -> None:
    from worker.app import warm_sender

    try:
        warm_sender()
    except Exception as e:  # the first job will connect, or the reconciler sends it once the broker is back
        log.warning("the broker could not be reached at start (%s); jobs are stored and sent once it is back",
                    type(e).__name__)


def _default_broker_ping() -> object:
    from worker.app import broker_ping

    return broker_ping()


def unauthorized() -> HTTPException:
    return HTTPException(401, "missing or invalid API key; send the header 'Authorization: Bearer <secret>'",
                         headers={"WWW-Authenticate": "Bearer"})


def unprocessable(loc: list, msg: str) -> HTTPException:
    return HTTPException(422, [{"loc": loc, "msg": msg}])


def first_bad_value(value) -> tuple[list, str] | None:
    """(path, problem) of the first value in parsed JSON that no store column takes: NaN or
    ±Infinity (Python's json reads them, and 1e400 as inf; JSON has neither), a NUL character or a
    lone surrogate in a string (Postgres refuses both). Iterative: the nesting may be deep."""
    stack = [([], value)]
    while stack:
        path, v = stack.pop()
        if isinstance(v, float) and not math.isfinite(v):
            return path, ("NaN and Infinity are not JSON numbers (and a number beyond 1.8e308 reads as Infinity); "
                          "accepted: finite numbers")
        if isinstance(v, str) and (problem := bad_text(v)):
            return path, problem
        items = v.items() if isinstance(v, dict) else enumerate(v) if isinstance(v, list) else ()
        for k, item in reversed(list(items)):  # reversed onto the stack: popped in document order
            if isinstance(k, str) and (problem := bad_text(k)):
                return path, f"the key {k!r}: {problem}"
            stack.append(([*path, k], item))
    return None


def bad_text(text: str) -> str | None:
    if "\0" in text:
        return "a NUL character is not accepted in text"
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return "a lone surrogate (\\ud800 to \\udfff) is not accepted in text"
    return None


async def read_body(request: Request, limit: int, too_large: str) -> bytes:
    """The request body, refused with 413 (`too_large`) as soon as it is known to exceed `limit` bytes."""
    too_large = HTTPException(413, too_large)
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > limit:
        raise too_large
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large
        chunks.append(chunk)
    return b"".join(chunks)


def not_text(data: bytes) -> str | None:
    """Why `data` is not a task file's text (an archive, binary, not UTF-8), or None."""
    for magic, kind in ARCHIVES.items():
        if data.startswith(magic):
            return (f"is a {kind} archive; archives are not opened: upload the task's files themselves, "
                    "uncompressed (CrossFit .tsv files, a BIG-bench task.json or a .jsonl file)")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        return f"is not UTF-8 text: byte {data[e.start]:#04x} at offset {e.start} is not valid UTF-8"
    if "\0" in text:
        return f"is binary, not text: it holds a NUL byte at offset {text.index(chr(0))}"
    return None


def too_long(parts: dict[str, list], most: int) -> str | None:
    """Which example has an input or an answer longer than `most` characters, if one has."""
    for part, examples in parts.items():
        for i, ex in enumerate(examples, start=1):
            longest = max(len(ex.input), *map(len, ex.outputs), *map(len, ex.options or ()))
            if longest > most:
                return (f"{part}: example {i} has a text of {longest} characters; accepted: at most {most} "
                        "characters per input or answer")
    return None


def create_app(store: Store | None = None, enqueue: Callable[[str, str], None] | None = None,
               broker_ping: Callable[[], object] | None = None) -> FastAPI:
    from core import jobs as core_jobs
    from core.spec import SpecError
    from core.store import IdempotencyConflict, Store, StoreError, TaskExists, key_hash
    from core.tasks import catalog, packs, readers
    from core.tasks.base import TaskError, TaskInfo

    own_store, own_broker = store is None, enqueue is None
    # No pre-ping: a round trip per checkout, 3 per POST /jobs; a dead connection is retried instead
    store = Store(settings().db_url(), retry_seconds=DB_WAIT, pre_ping=False) if own_store else store
    enqueue = enqueue or _default_enqueue
    broker_ping = broker_ping or _default_broker_ping

    @asynccontextmanager
    async def lifespan(_):
        if own_store:
            await run_in_threadpool(store.upgrade)
            await run_in_threadpool(store.warm, settings().db_pool_size)
        if own_broker:  # in the background: a broker that is down must not hold up the start
            threading.Thread(target=_warm_default_sender, name="warm-broker", daemon=True).start()
        if own_store:  # the process is the API's (uvicorn's factory), not a test's or an embedder's
            # Everything loaded so far lives as long as the process: leave it out of the
            # collector's full passes, which otherwise walk it all (~160,000 objects, ~100 ms
            # with every request waiting) a few times a minute under load.
            gc.freeze()
        yield
        if own_store:
            store.engine.dispose()

    app = FastAPI(title="primer", version="0.1.0", lifespan=lifespan,
                  description="Meta-learned soft-prompt initializations: submit jobs, follow them, download "
                              "prompts and results. Every endpoint but /healthz, /readyz and /metrics takes "
                              "'Authorization: Bearer <API key>'.")
    app.state.store = store
    origins = [o.strip() for o in settings().cors_origins.split(",") if o.strip()]
    if origins:
        app.add_middleware(CORSMiddleware, allow_origins=origins, allow_methods=["*"],
                           allow_headers=["Authorization", "Content-Type", "Idempotency-Key"],
                           expose_headers=["Idempotent-Replayed", "X-Content-SHA256", "Content-Disposition"])

    # --- metrics, errors ----------------------------------------------------------------------
    registry = CollectorRegistry()
    requests_total = Counter("primer_http_requests", "HTTP requests by route template and status",
                             ["method", "route", "status"], registry=registry)
    latency = Histogram("primer_http_request_duration_seconds", "HTTP request latency by route template",
                        ["method", "route"], registry=registry)
    jobs_gauge = Gauge("primer_jobs", "Jobs in the store by status", ["status"], registry=registry)

    # Plain ASGI middleware: Starlette's BaseHTTPMiddleware (@app.middleware) costs a task and a
    # pair of streams per request.
    def observe(inner):
        async def app_(scope, receive, send):
            if scope["type"] != "http":
                return await inner(scope, receive, send)
            start, answered = time.perf_counter(), False

            def record(code: int) -> None:  # the route's template, never the raw path: ids would make a series per job
                route = getattr(scope.get("route"), "path", "unmatched")
                requests_total.labels(scope["method"], route, str(code)).inc()
                latency.labels(scope["method"], route).observe(time.perf_counter() - start)

            async def sending(message):
                nonlocal answered
                if message["type"] == "http.response.start":  # timed to the response's start, as a stream may run on
                    answered = True
                    record(message["status"])
                await send(message)
            try:
                await inner(scope, receive, sending)
            finally:
                if not answered:  # raised before answering: the server answers 500
                    record(500)
        return app_

    def refuse_nul(inner):
        async def app_(scope, receive, send):
            # a NUL reaches no route sensibly, and Postgres refuses it in text: refuse it at the door
            if scope["type"] == "http" and ("\0" in scope["path"] or b"%00" in scope["query_string"]):
                return await JSONResponse({"detail": "a NUL character (%00) is not accepted in a URL"}, 400)(
                    scope, receive, send)
            await inner(scope, receive, send)
        return app_

    app.add_middleware(observe)
    app.add_middleware(refuse_nul)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(_, exc: RequestValidationError):
        return JSONResponse({"detail": [{"loc": list(e["loc"]), "msg": e["msg"].removeprefix("Value error, ")}
                                        for e in exc.errors()]}, 422)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception):
        from sqlalchemy.exc import DBAPIError

        from core.store import transient

        if isinstance(exc, DBAPIError) and transient(exc):
            log.warning("store unavailable on %s %s: %s", request.method, request.url.path, type(exc.orig).__name__)
            return JSONResponse({"detail": f"the store is unavailable (its database is restarting or unreachable); "
                                           f"retry in {DB_WAIT:.0f} s, with the same Idempotency-Key for a POST"},
                                503, headers={"Retry-After": f"{DB_WAIT:.0f}"})
        log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
        return JSONResponse({"detail": "internal error"}, 500)

    # --- auth and lookups ---------------------------------------------------------------------
    bearer = HTTPBearer(auto_error=False, description="an API key")
    limiter, failures = RateLimiter(settings().rate_limit), RateLimiter(settings().auth_failure_limit)
    known: set[str] = set()  # hashes of the keys this process found valid: an address's failures do not hold them back

    def auth(request: Request, creds: HTTPAuthorizationCredentials | None = Depends(bearer)):
        if creds is None:
            raise unauthorized()
        digest, address = key_hash(creds.credentials), request.client.host if request.client else "unknown"
        if digest not in known and (wait := failures.wait(address)):
            raise HTTPException(429, f"too many failed authentications from {address}: at most "
                                     f"{failures.per_minute} a minute per client address; retry in {wait} s with a "
                                     "valid API key", headers={"Retry-After": str(wait)})
        key = store.authenticate(creds.credentials)
        if key is None:
            known.discard(digest)  # revoked since
            failures.take(address)
            raise unauthorized()
        known.add(digest)
        wait = limiter.take(key.id)
        if wait:
            raise HTTPException(429, f"rate limit reached: at most {limiter.per_minute} requests per minute per API "
                                     f"key; retry in {wait} s", headers={"Retry-After": str(wait)})
        return key

    def admin(key=Depends(auth)):
        if not key.admin:
            raise HTTPException(403, f"managing API keys needs an admin key, and key {key.id} is not one; an admin "
                                     "creates one with POST /keys {\"admin\": true} or `primer keys create --admin`")
        return key

    def owner(key) -> str | None:
        return None if key.admin else key.id

    def no_job(job_id: str) -> HTTPException:
        return HTTPException(404, f"no job {job_id!r}")  # another key's job is as absent as a missing one

    def find_job(job_id: str, key):
        job = store.get_job(job_id, owner(key))
        if job is None:
            raise no_job(job_id)
        return job

    def succeeded_job(job_id: str, key):
        job = find_job(job_id, key)
        if job.status != "succeeded":
            raise HTTPException(409, f"job {job.id} is {job.status}; results are served once it has succeeded")
        return job

    def find_prompt(prompt_id: str, key):
        row = store.get_prompt(prompt_id, owner(key))
        if row is None:
            raise HTTPException(404, f"no prompt {prompt_id!r}")
        return row

    def view(job, progress: tuple[int, int] | None = None) -> S.JobOut:
        return S.job_out(job, *(progress or store.job_progress(job.id)))

    # --- service ------------------------------------------------------------------------------
    @app.get("/healthz", tags=["service"])
    def healthz():
        return {"status": "ok"}

    @app.get("/readyz", tags=["service"])
    def readyz():
        checks = {}
        for name, ping in (("database", store.ping), ("broker", broker_ping)):
            try:
                checks[name] = "ok" if ping() is not False else "down"
            except Exception as e:  # the class only: messages can hold URLs with passwords
                checks[name] = f"down ({type(e).__name__})"
        return JSONResponse(checks, 200 if all(v == "ok" for v in checks.values()) else 503)

    @app.get("/metrics", tags=["service"], response_class=Response)
    def metrics():
        counts = store.counts()
        for status in STATUSES:
            jobs_gauge.labels(status).set(counts.get(status, 0))
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/backbones", tags=["catalog"])
    def backbones(key=Depends(auth)):
        return {"backbones": list(settings().backbone_allowlist())}  # names only, never locations

    @app.get("/partitions", tags=["catalog"])
    def partitions(key=Depends(auth)):
        return {name: {"train": list(p.train), "dev": list(p.dev), "test": list(p.test),
                       "description": p.description} for name, p in catalog.partitions().items()}

    # --- API keys (admin only) -----------------------------------------------------------------
    @app.post("/keys", status_code=201, response_model=S.KeyCreated, tags=["keys"])
    def create_key(body: S.KeyIn, key=Depends(admin)):
        """A new key. Its secret is in this response only: the store keeps its sha256."""
        row, secret = store.create_key(body.name, admin=body.admin)
        log.info("key %s (%s, admin=%s) created by %s", row.id, row.name, row.admin, key.id)
        return S.KeyCreated(**S.key_out(row).model_dump(), secret=secret)

    @app.get("/keys", response_model=S.KeyList, tags=["keys"])
    def list_keys(key=Depends(admin)):
        return S.KeyList(keys=[S.key_out(k) for k in store.list_keys()])

    @app.delete("/keys/{key_id}", response_model=S.KeyOut, tags=["keys"])
    def revoke_key(key_id: str, key=Depends(admin)):
        """Revoke a key: it is refused from its next request on. Revoking it again changes nothing."""
        if store.revoke_key(key_id):
            log.info("key %s revoked by %s", key_id, key.id)
        row = next((k for k in store.list_keys() if k.id == key_id), None)
        if row is None:
            raise HTTPException(404, f"no key {key_id!r}; GET /keys lists them")
        return S.key_out(row)

    # --- jobs ---------------------------------------------------------------------------------
    async def job_body(request: Request) -> dict:
        limit = settings().max_body_bytes
        raw = await read_body(request, limit, f"the job spec is larger than the limit of {limit} bytes")
        try:
            body = json.loads(raw)
        except ValueError as e:
            raise unprocessable(["body"], f"the body is not valid JSON: {e}") from None
        except RecursionError:
            raise unprocessable(["body"], "the body is nested too deeply; a job spec is a few levels deep") from None
        if (bad := first_bad_value(body)) is not None:
            raise unprocessable(["body", *bad[0]], bad[1])
        if not isinstance(body, dict):
            raise unprocessable(["body"], "a job spec is a JSON object of fields (name, backbone, prompt, targets, "
                                          f"upstream, downstream, ...), got {type(body).__name__}")
        return body

    @app.post("/jobs", status_code=202, response_model=S.JobOut, tags=["jobs"], openapi_extra=JOB_BODY_DOC)
    def submit(response: Response, key=Depends(auth), body: dict = Depends(job_body),
               idempotency_key: str | None = Header(None, min_length=1, max_length=200)):
        try:
            spec = core_jobs.check(body, store, key.id)
        except SpecError as e:
            raise HTTPException(422, [{"loc": list(loc), "msg": msg} for loc, msg in e.errors]) from None
        d, most = spec.downstream, settings().max_job_runs
        runs = len(spec.targets) * len(d.seeds) * sum(len(d.ft_lrs if m == "ft" else d.lrs) for m in spec.methods)
        if runs > most:  # counted before core.jobs.units lists them: a million runs would be a million rows
            raise unprocessable(["body", "downstream"], f"the job asks for {runs} downstream runs (targets x methods x "
                                                        f"seeds x learning rates); accepted: at most {most} per job")
        units, message_id = core_jobs.units(spec), str(uuid.uuid4())
        try:  # the job, its units and its first step's dispatch record: one transaction
            job, created = store.create_job(owner=key.id, name=spec.name, spec=spec.model_dump(mode="json"),
                                            spec_hash=core_jobs.spec_hash(body), units=units,
                                            idempotency_key=idempotency_key, first=(*core_jobs.START, message_id))
        except IdempotencyConflict as e:
            raise HTTPException(409, f"Idempotency-Key {idempotency_key!r} was already used for job {e.job_id} "
                                     "with another body; send a new key to submit another job") from None
        warned = core_jobs.warnings(spec)
        if not created:
            response.headers["Idempotent-Replayed"] = "true"
            return view(job).model_copy(update={"warnings": warned})
        for w in warned:  # kept with the job, for whoever reads its events rather than this response
            store.add_event(job.id, f"warning: {w}")
        try:
            enqueue(job.id, message_id)
        except Exception as e:  # recorded as sent: the workers' reconciler sends it again once the broker is back
            log.exception("could not enqueue job %s", job.id)
            store.add_event(job.id, f"the broker could not be reached ({type(e).__name__}); the job stays queued "
                                    "and is sent to the workers when the broker is back")
        # a new job has done no step: no need to ask the store
        return view(job, (0, sum(units.values()))).model_copy(update={"warnings": warned})

    @app.get("/jobs", response_model=S.JobList, tags=["jobs"])
    def list_jobs(key=Depends(auth), status: Literal[STATUSES] | None = None, cursor: str | None = None,
                  limit: int = Query(50, ge=1, le=200)):
        try:
            rows, next_cursor = store.list_jobs(owner(key), status, cursor, limit)
        except KeyError:  # an unknown id, or another key's job
            raise unprocessable(["query", "cursor"], f"cursor {cursor!r} is not the next_cursor of an earlier page; "
                                                     "start without a cursor") from None
        progress = store.job_progress_many(j.id for j in rows)
        return S.JobList(jobs=[view(j, progress[j.id]) for j in rows], next_cursor=next_cursor)

    @app.get("/jobs/{job_id}", response_model=S.JobOut, tags=["jobs"])
    def get_job(job_id: str, key=Depends(auth)):
        found = store.job_with_progress(job_id, owner(key))  # one query, not find_job's and then the progress
        if found is None:
            raise no_job(job_id)
        return view(*found)

    @app.post("/jobs/{job_id}/cancel", response_model=S.JobOut, tags=["jobs"])
    def cancel(job_id: str, key=Depends(auth)):
        job = find_job(job_id, key)
        if job.status in S.TERMINAL and job.status != "cancelled":
            raise HTTPException(409, f"job {job.id} already {job.status}; only queued or running jobs can be "
                                     "cancelled")
        return view(store.request_cancel(job.id))

    @app.get("/jobs/{job_id}/events", response_model=S.EventList, tags=["jobs"])
    def events(job_id: str, key=Depends(auth), after: int = Query(0, ge=0, le=MAX_EVENT_ID),
               limit: int = Query(100, ge=1, le=1000)):
        find_job(job_id, key)
        rows = store.events(job_id, after, limit)
        return S.EventList(events=[S.event_out(e) for e in rows], next_after=rows[-1].id if rows else after)

    @app.get("/jobs/{job_id}/events/stream", tags=["jobs"], response_class=StreamingResponse)
    async def event_stream(job_id: str, key=Depends(auth), after: int = Query(0, ge=0, le=MAX_EVENT_ID),
                           last_event_id: str | None = Header(None)):
        """Server-Sent Events: the job's events as they come, then an `end` event once it has finished."""
        await run_in_threadpool(find_job, job_id, key)
        if last_event_id and last_event_id.isdigit():
            after = max(after, min(int(last_event_id), MAX_EVENT_ID))

        async def stream():
            last = after
            while True:
                job = await run_in_threadpool(store.get_job, job_id)
                finished = job is None or job.status in S.TERMINAL  # read before the events: none is missed
                rows = await run_in_threadpool(store.events, job_id, last, 500)
                for e in rows:
                    last = e.id
                    yield f"id: {e.id}\nevent: {e.kind}\ndata: {S.event_out(e).model_dump_json()}\n\n"
                if not rows:
                    if finished:
                        yield f"event: end\ndata: {json.dumps({'status': job.status if job else None})}\n\n"
                        return
                    await asyncio.sleep(1.0)

        return StreamingResponse(stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    def left_out(tasks, methods) -> list[str]:  # as Results.left_out: PT scored 0, so no relative gain there
        return [r.task for r in tasks if r.method == "pt" and r.mean == 0] if methods else []

    def method_results(job_id: str):
        """The job's task rows, the methods with an ARG, and those whose meta-training diverged."""
        tasks, methods = store.results(job_id)
        return tasks, [m for m in methods if m.diverged is None], {m.method: m.diverged for m in methods if m.diverged}

    @app.get("/jobs/{job_id}/results", response_model=S.Results, tags=["results"])
    def results(job_id: str, key=Depends(auth)):
        job = succeeded_job(job_id, key)
        tasks, methods, diverged = method_results(job.id)
        return S.Results(
            tasks=[S.TaskScore(method=r.method, task=r.task, metric=r.metric, mean=r.mean, std=r.std,
                               relative_gain=r.relative_gain) for r in tasks],
            arg={m.method: m.arg for m in methods},
            left_out_of_arg=left_out(tasks, methods),
            diverged=diverged,
            scores=[S.RunScore(method=s.method, task=s.task, seed=s.seed, lr=s.lr, dev=s.dev, test=s.test,
                               metric=s.metric, best_step=s.best_step, steps=s.steps, reused_from=s.reused_from)
                    for s in store.scores(job.id)])

    @app.get("/jobs/{job_id}/report", response_class=HTMLResponse, tags=["results"])
    def report(job_id: str, key=Depends(auth)):
        job = succeeded_job(job_id, key)
        tasks, methods, diverged = method_results(job.id)
        e = lambda v: html.escape(str(v))  # noqa: E731
        rows = lambda cells: "".join(f"<tr>{''.join(f'<td>{e(c)}</td>' for c in r)}</tr>" for r in cells)  # noqa: E731
        head = lambda *names: "<tr>" + "".join(f"<th>{e(n)}</th>" for n in names) + "</tr>"  # noqa: E731
        gain = lambda g: "—" if g is None else f"{100 * g:+.1f}%"  # noqa: E731
        # embedded as data: URIs, so the page is whole on its own (an <img src> would be fetched
        # without the API key)
        plots = [(n, base64.b64encode(a.data).decode()) for n in PLOTS if (a := store.artifact(job.id, n)) is not None]
        page = [
            f"<!doctype html><html><head><meta charset='utf-8'><title>primer: {e(job.name)}</title>",
            "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
            "td,th{border:1px solid #ccc;padding:.3em .6em;text-align:left}</style></head><body>",
            f"<h1>{e(job.name)}</h1><p>job {e(job.id)}: {e(job.status)}, finished {e(S.iso(job.finished_at))}</p>",
            "<h2>ARG over plain prompt tuning</h2><table>", head("method", "ARG (%)"),
            rows((m.method, "n/a" if m.arg is None else f"{m.arg:+.2f}") for m in methods),
            rows((m, "diverged") for m in diverged), "</table>",
            *(f"<p>Left out: {e(why)}.</p>" for why in diverged.values()),
            *([f"<p>Left out of every ARG: {e(', '.join(left))} (plain prompt tuning scored 0 there, so no "
               "relative gain is defined).</p>"] if (left := left_out(tasks, methods)) else []),
            "<h2>Per target task</h2><table>", head("task", "method", "metric", "test (mean ± std)", "rel. gain"),
            rows((r.task, r.method, r.metric, f"{r.mean:.3f} ± {r.std:.3f}", gain(r.relative_gain)) for r in tasks),
            "</table>",
            *(f"<h2>{e(n.removesuffix('.png').replace('_', ' '))}</h2>"
              f"<img src=\"data:image/png;base64,{data}\" alt=\"{e(n)}\">" for n, data in plots),
            "</body></html>"]
        return HTMLResponse("".join(page))

    @app.get("/jobs/{job_id}/artifacts/{name}", tags=["results"], response_class=Response)
    def artifact(job_id: str, name: str, key=Depends(auth)):
        job = find_job(job_id, key)
        row = store.artifact(job.id, name)
        if row is None:
            raise HTTPException(404, f"job {job.id} has no artifact {name!r}")
        return Response(row.data, media_type=row.content_type)

    # --- prompts ------------------------------------------------------------------------------
    @app.get("/prompts", response_model=S.PromptList, tags=["prompts"])
    def list_prompts(key=Depends(auth), backbone: str | None = None, algorithm: str | None = None,
                     job: str | None = None):
        rows = store.list_prompts(owner(key), backbone=backbone, algorithm=algorithm, job_id=job)
        return S.PromptList(prompts=[S.prompt_info(p) for p in rows])

    @app.get("/prompts/{prompt_id}/info", response_model=S.PromptInfo, tags=["prompts"])
    def prompt_info(prompt_id: str, key=Depends(auth)):
        return S.prompt_info(find_prompt(prompt_id, key))

    @app.get("/prompts/{prompt_id}", tags=["prompts"], response_class=Response)
    def download(prompt_id: str, key=Depends(auth), format: Literal[FORMATS] = "safetensors"):
        """The prompt as safetensors (as stored), a torch .pt, a numpy .npy, or a zipped PEFT adapter."""
        row = find_prompt(prompt_id, key)
        try:
            data = store.verified(row)
        except StoreError:
            raise HTTPException(500, f"prompt {row.id} failed its integrity check: its stored bytes do not match "
                                     "their sha256, so it is not served") from None
        ext = {"safetensors": "safetensors", "pt": "pt", "npy": "npy", "peft": "zip"}[format]
        headers = {"Content-Disposition": f'attachment; filename="{row.id}.{ext}"'}
        if format == "safetensors":
            return Response(data, media_type="application/octet-stream",
                            headers=headers | {"X-Content-SHA256": row.sha256})
        from core.prompts import prompt_from_bytes

        tensor, buf = prompt_from_bytes(data), io.BytesIO()
        if format == "pt":
            import torch

            torch.save({"prompt": tensor}, buf)
        elif format == "npy":
            import numpy as np

            np.save(buf, tensor.numpy())
        else:
            buf = io.BytesIO(peft_zip(row, tensor))
        return Response(buf.getvalue(), media_type="application/zip" if format == "peft" else
                        "application/octet-stream", headers=headers)

    def peft_zip(row, tensor) -> bytes:
        from core.backbones import BackboneError, load
        from core.prompts import export_peft

        allowed = settings().backbone_allowlist()
        if row.backbone not in allowed:
            raise HTTPException(409, f"prompt {row.id} is for backbone {row.backbone!r}, which is no longer served "
                                     f"here (served: {', '.join(allowed)}); download it as safetensors, pt or npy")
        try:
            backbone = load(allowed[row.backbone])
        except BackboneError:
            log.exception("loading backbone %s", row.backbone)
            raise HTTPException(500, f"backbone {row.backbone!r} could not be loaded to export the PEFT adapter; "
                                     "download the prompt as safetensors, pt or npy") from None
        if tensor.ndim != 2 or tensor.shape[1] != backbone.dim:
            raise HTTPException(409, f"prompt {row.id} has shape {list(tensor.shape)}, which does not fit backbone "
                                     f"{row.backbone!r} (width {backbone.dim})")
        buf = io.BytesIO()
        with tempfile.TemporaryDirectory() as tmp, zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
            for file in sorted(export_peft(tensor, backbone, tmp, base_model=row.backbone).iterdir()):
                z.write(file, file.name)
        return buf.getvalue()

    # --- uploaded tasks -----------------------------------------------------------------------
    async def upload_form(request: Request):
        if not request.headers.get("content-type", "").startswith("multipart/form-data"):
            raise unprocessable(["body"], "send the task as multipart/form-data with the fields name, type, "
                                          "options, metric and files")
        limit = settings().max_upload_bytes
        raw = await read_body(request, limit + FORM_SLACK, f"the upload is larger than the limit of {limit} bytes")
        sent = False

        async def replay():  # the form parser reads the body we already hold, not the socket
            nonlocal sent
            if sent:
                return {"type": "http.disconnect"}
            sent = True
            return {"type": "http.request", "body": raw, "more_body": False}

        try:
            form = await Request(request.scope, replay).form(max_files=100, max_fields=20)
        except StarletteHTTPException as e:  # the parser's own 400s say what broke, not what to send
            raise HTTPException(400, f"the body is not valid multipart/form-data ({e.detail.rstrip('.')}); send "
                                     "the fields name, type, options, metric and files") from None
        try:
            yield form
        finally:
            await form.close()

    @app.post("/tasks", status_code=201, response_model=S.TaskOut, tags=["tasks"], openapi_extra=UPLOAD_DOC)
    def upload(key=Depends(auth), form=Depends(upload_form)):
        """Upload a task's files under a name that jobs can then use as a target or source."""
        text = lambda field: str(form.get(field) or "").strip()  # noqa: E731
        name, kind, metric = text("name"), text("type") or None, text("metric") or None
        options = [o.strip() for o in text("options").split(",") if o.strip()] or None
        if not TASK_NAME.fullmatch(name):
            raise unprocessable(["body", "name"], f"task name {name!r} must be 1 to 100 letters, digits, '_', '.' "
                                                  "or '-', not starting with a dot")
        if name in packs.PACKS or name in catalog.catalog():
            what = "task pack" if name in packs.PACKS else "built-in CrossFit task"
            raise HTTPException(409, f"{name!r} is the name of a {what}; pick another name")
        if store.get_task(key.id, name) is not None:
            raise HTTPException(409, f"you already have a task named {name!r}; pick another name")
        if kind is not None and kind not in TASK_TYPES:
            raise unprocessable(["body", "type"], f"unknown task type {kind!r}; accepted: {', '.join(TASK_TYPES)}")
        uploads = form.getlist("files")
        if not uploads or any(isinstance(f, str) for f in uploads):
            raise unprocessable(["body", "files"], "attach the task's files as 'files' (one or more)")
        files: dict[str, bytes] = {}
        for f in uploads:
            filename = f.filename or ""
            # the same rule as task names: no folders, '..', backslashes, NUL or look-alike Unicode
            if not TASK_NAME.fullmatch(filename) or ".." in filename:
                raise unprocessable(["body", "files"], f"file name {filename!r} is not accepted: give a plain "
                                                       "file name, without folders or '..', of 1 to 100 letters, "
                                                       "digits, '_', '.' or '-'")
            if filename in files:
                raise unprocessable(["body", "files"], f"file {filename!r} is attached twice")
            files[filename] = f.file.read()
        if sum(map(len, files.values())) > settings().max_upload_bytes:
            raise HTTPException(413, f"the upload is larger than the limit of {settings().max_upload_bytes} bytes")
        for filename, data in files.items():
            if problem := not_text(data):
                raise unprocessable(["body", "files"], f"file {filename!r} {problem}")

        names = list(files)
        if all(CROSSFIT_FILE.fullmatch(n) for n in names):
            fmt = "crossfit"
        elif names == ["task.json"]:
            fmt = "bigbench"
        elif len(names) == 1 and names[0].endswith(".jsonl"):
            fmt = "jsonl"
        else:
            raise unprocessable(["body", "files"], f"files {names} are none of the accepted formats: CrossFit "
                                                   "<name>_<k>_<seed>_<train|dev|test>.tsv files, one BIG-bench "
                                                   "task.json, or one .jsonl file of {\"input\", \"output\"} objects")
        if kind is None and fmt != "bigbench":
            raise unprocessable(["body", "type"], f"a {fmt} task needs its type; accepted: {', '.join(TASK_TYPES)}")
        most = settings().max_task_examples
        lines = sum(data.count(b"\n") + (not data.endswith(b"\n")) for data in files.values())
        if fmt != "bigbench" and lines > most:  # refused before reading: a million lines would take seconds
            raise unprocessable(["body", "files"], f"the files hold {lines} lines; a task holds at most {most} "
                                                   "examples, one per line")

        with tempfile.TemporaryDirectory() as tmp:
            try:
                for filename, data in files.items():
                    (Path(tmp) / filename).write_bytes(data)
                given = None
                if kind is not None:
                    default = "ACC" if kind in ("classification", "multiple_choice") else "EM"
                    given = catalog.check(TaskInfo(name, kind, metric or default, tuple(options) if options else None))
                if fmt == "crossfit":
                    task = readers.read_crossfit_dir(tmp, given)
                elif fmt == "bigbench":
                    task = readers.read_bigbench(Path(tmp) / "task.json", given)
                else:
                    task = readers.read_table(Path(tmp) / names[0], given, "input", "output")
                info = catalog.check(TaskInfo(name, task.info.type, metric or task.info.metric, task.info.options))
            except (TaskError, ValueError) as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
                raise unprocessable(["body", "files"], str(e).replace(f"{tmp}/", "").replace(tmp, "")) from None
            except RecursionError:
                raise unprocessable(["body", "files"], "the task's JSON is nested too deeply to be a task") from None
            except (TypeError, AttributeError, KeyError, IndexError) as e:
                # a value of a shape the reader did not foresee (a number where text belongs): the
                # file's fault, so a 422; logged, so that the reader learns to name the field
                log.warning("reader failed on an uploaded %s task", fmt, exc_info=e)
                raise unprocessable(["body", "files"], f"the {fmt} file could not be read: a value has a type the "
                                                       f"format does not allow ({type(e).__name__}: {e})") from None
        parts = {"examples": task.examples, "test examples": task.test or []}
        parts |= {f"seed {seed} {part}": getattr(split, part) for seed, split in task.splits.items()
                  for part in ("train", "dev", "test")}
        examples = sum(map(len, parts.values()))
        if examples > most:
            raise unprocessable(["body", "files"], f"the task holds {examples} examples; accepted: at most {most}")
        if problem := too_long(parts, settings().max_example_chars):
            raise unprocessable(["body", "files"], problem)
        try:
            row = store.save_task(key.id, name, info.type, info.metric, list(info.options) if info.options else None,
                                  fmt, examples=examples,
                                  files={"task.jsonl": files[names[0]]} if fmt == "jsonl" else files)
        except TaskExists:  # a concurrent upload of the same name won the race
            raise HTTPException(409, f"you already have a task named {name!r}; pick another name") from None
        return S.task_out(row, [note.replace(f"{tmp}/", "") for note in task.notes])

    @app.get("/tasks", response_model=S.TaskList, tags=["tasks"])
    def list_tasks(key=Depends(auth)):
        return S.TaskList(
            tasks=[S.task_out(t) for t in store.list_tasks(owner(key))],
            packs=[S.PackOut(name=n, type=p.info.type, metric=p.info.metric,
                             options=list(p.info.options) if p.info.options else None,
                             source=f"{p.dist.name}=={p.dist.version}", note=p.dist.gone)
                   for n, p in sorted(packs.PACKS.items())])

    return app
