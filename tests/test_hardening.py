"""Nothing lost: leases, heartbeats and the reconciler, first against the store alone, then
against real uvicorn, Celery worker, Postgres and Redis processes with faults injected."""
import threading
import time

import pytest

from core import jobs
from core.errors import UserError
from core.fetch import FetchError
from core.store import Store
from core.tasks import TaskError
from tests.test_experiment import diverging_at, spec_fields  # noqa: F401 (a fixture)


class Broker:
    """A transport that remembers what was sent, and can lose it all (a restart without persistence)."""

    def __init__(self):
        self.sent: list[tuple[str, list, str]] = []

    def __call__(self, task, args, message_id):
        self.sent.append((task, args, message_id))

    def pending(self) -> set[str]:
        return {m for _, _, m in self.sent}

    def lose_everything(self):
        self.sent.clear()


@pytest.fixture
def job(store):
    key, _ = store.create_key("alice")
    job, _ = store.create_job(key.id, "j", {"name": "j"}, "h", {"downstream/pt/t/100/0.1": 4})
    return job


def reconcile(store, broker, **kw):
    return jobs.reconcile(store, broker, broker.pending(), **({"lease": 60, "grace": 0, "max_attempts": 3} | kw))


def test_a_step_is_sent_once_and_its_lost_message_is_sent_again(store, job):
    broker = Broker()
    assert jobs.send(store, broker, job.id, "start", "primer.start", [job.id])
    assert not jobs.send(store, broker, job.id, "start", "primer.start", [job.id])  # recorded: not sent twice
    assert reconcile(store, broker) == []  # the broker holds it: nothing to do
    first = broker.sent[0][2]
    broker.lose_everything()
    did = reconcile(store, broker)
    assert len(did) == 1 and "no longer in the broker" in did[0]
    assert [(t, a) for t, a, _ in broker.sent] == [("primer.start", [job.id])] and broker.sent[0][2] != first
    assert reconcile(store, broker) == []


def test_a_live_lease_keeps_the_step_and_a_lapsed_one_is_sent_again_until_the_attempts_run_out(store, job):
    broker = Broker()
    jobs.send(store, broker, job.id, "start", "primer.start", [job.id])
    assert store.claim(job.id, "start", "w1", lease=60) == 1
    assert store.claim(job.id, "start", "w2", lease=60) is None  # a second copy of the message finds it taken
    broker.lose_everything()  # a taken step's message is the lease's business, not the broker's
    assert reconcile(store, broker) == []
    assert store.beat(job.id, "start", "w1") and not store.beat(job.id, "start", "w2")
    for attempt in (1, 2):  # w1, then its successor, die without a word
        time.sleep(0.05)
        did = reconcile(store, broker, lease=0.01)
        assert len(did) == 1 and "stopped beating" in did[0]
        assert store.claim(job.id, "start", f"w{attempt + 1}", lease=60) == attempt + 1
    time.sleep(0.05)
    did = reconcile(store, broker, lease=0.01)
    assert "given up after 3 attempts" in did[0]
    failed = store.get_job(job.id)
    assert failed.status == "failed" and failed.error_code == "worker_lost" and "start lost its worker" in failed.error_message
    assert reconcile(store, broker, lease=0.01) == []  # a failed job is left alone


def test_two_reconcilers_send_a_lost_step_once(store, job):
    broker = Broker()
    jobs.send(store, broker, job.id, "start", "primer.start", [job.id])
    broker.lose_everything()
    seen = store.open_dispatches()
    assert jobs.send(store, broker, job.id, "start", "primer.start", [job.id], resend=seen[0])
    assert not jobs.send(store, broker, job.id, "start", "primer.start", [job.id], resend=seen[0])
    assert len(broker.sent) == 1


def test_a_reconciler_does_not_resend_a_step_a_worker_took_meanwhile(store, job):
    broker = Broker()
    jobs.send(store, broker, job.id, "start", "primer.start", [job.id])
    seen = store.open_dispatches()[0]
    assert store.claim(job.id, "start", "w1", lease=60) == 1  # taken between the look and the resend
    assert not jobs.send(store, broker, job.id, "start", "primer.start", [job.id], resend=seen)
    assert store.beat(job.id, "start", "w1")


def test_a_job_stored_but_never_sent_and_an_aggregation_never_sent_are_sent(store, job):
    broker = Broker()
    assert reconcile(store, broker, grace=60) == []  # just stored: the API may still be sending it
    did = reconcile(store, broker)
    assert did == [f"{job.id}: stored but never sent; sent"] and broker.sent[0][:2] == ("primer.start", [job.id])
    store.claim(job.id, "start", "w1", lease=60)
    store.set_status(job.id, "running", phase="downstream")
    store.release(job.id, "start")
    assert not jobs.send_aggregate_if_done(store, broker, job.id)  # a run is left
    store.progress(job.id, "downstream/pt/t/100/0.1", 4, done=True)  # its worker died before sending on
    did = reconcile(store, broker)
    assert len(did) == 1 and "aggregation never sent" in did[0] and broker.sent[-1][:2] == ("primer.aggregate", [job.id])
    assert not jobs.send_aggregate_if_done(store, broker, job.id)  # sent once only


def test_a_done_step_is_not_claimed_again(store, job):
    jobs.send(store, Broker(), job.id, "start", "primer.start", [job.id])
    assert store.claim(job.id, "start", "w1", lease=60) == 1
    store.release(job.id, "start")
    assert store.claim(job.id, "start", "w2", lease=0) is None
    assert store.claim(job.id, "never-sent", "w2", lease=0) is None


def test_a_worker_whose_lease_another_worker_took_stops_at_its_next_step(store, job, monkeypatch):
    from core.settings import settings
    from worker import tasks

    monkeypatch.setenv("PRIMER_HEARTBEAT_SECONDS", "0.05")
    settings.cache_clear()
    monkeypatch.setattr(tasks, "store", lambda: store)
    jobs.send(store, Broker(), job.id, "start", "primer.start", [job.id])
    steps = []

    def body():  # a training loop reporting every step; after step 3 this worker goes silent too long
        report = jobs.Reporter(store, job.id, "upstream/maml")
        for step in range(500):
            report({"phase": "upstream", "method": "maml", "step": step, "loss": 1.0})
            steps.append(step)
            if step == 3:
                assert store.claim(job.id, "start", "w2", lease=0) == 2  # the reconciler resent it; w2 took it
            time.sleep(0.01)

    try:
        tasks.run_step(job.id, "start", body)
    finally:
        settings.cache_clear()
    assert 3 < len(steps) < 100  # stopped within a few beats, not after the 500 steps
    assert [d.worker for d in store.open_dispatches()] == ["w2"]  # w2's lease, not released by the loser
    assert store.beat(job.id, "start", "w2")
    assert any("another worker holds it now" in e.message for e in store.events(job.id))
    assert store.get_job(job.id).status == "queued"  # neither failed nor touched


def test_a_downstream_run_that_diverged_says_so_in_the_jobs_events(store, job, monkeypatch):
    monkeypatch.setattr(jobs, "lease_lost", threading.Event())  # as a worker's step starts: its lease held
    report = jobs.Reporter(store, job.id, "downstream/pt/t/100/0.3")
    report({"phase": "pt", "step": 7, "loss": float("nan"), "best_dev": 0.625, "diverged": True})
    assert [e.message for e in store.events(job.id) if e.kind == "log"] == [
        "downstream/pt/t/100/0.3 stopped at step 7: its loss is nan (diverged); its best dev score so far, 0.625, counts"]


def test_a_method_whose_meta_training_diverges_costs_the_service_job_only_that_method(store, spec_fields,
                                                                                      tiny_dir, monkeypatch):
    """The worker's steps: the diverged method's downstream runs are neither sent nor waited for,
    the job ends succeeded at 100 %, and its results say which method is missing and why."""
    from core.settings import settings

    monkeypatch.setenv("PRIMER_BACKBONES", f"tiny={tiny_dir['causal']}")
    settings.cache_clear()
    monkeypatch.setattr(jobs, "lease_lost", threading.Event())
    spec = jobs.parse_spec({**spec_fields, "backbone": "tiny",
                            "upstream": {**spec_fields["upstream"], "methods": ["maml", "reptile"]}})
    body = spec.model_dump(mode="json")
    key, _ = store.create_key("alice")
    job, _ = store.create_job(key.id, spec.name, body, jobs.spec_hash(body), jobs.units(spec))
    diverging_at(monkeypatch, {"reptile"})
    try:
        cells = jobs.start(store, job.id)
        assert {c.method for c in cells} == {"pt", "maml"} and len(cells) == len(jobs.cells(spec)) * 2 // 3
        assert store.downstream_left(job.id) == len(cells)  # reptile's runs are not waited for
        for cell in cells:
            jobs.run_cell(store, job.id, cell)
        assert store.downstream_left(job.id) == 0
        jobs.aggregate(store, job.id)
    finally:
        settings.cache_clear()
    done = store.get_job(job.id)
    assert done.status == "succeeded" and store.job_progress(job.id)[0] == store.job_progress(job.id)[1]
    tasks, methods = store.results(job.id)
    why = {m.method: m.diverged for m in methods}
    assert {m.method: m.arg is not None for m in methods} == {"maml": True, "reptile": False}
    assert why["maml"] is None and why["reptile"].startswith("upstream reptile diverged at outer step 2: ")
    assert {r.method for r in tasks} == {"pt", "maml"}
    assert {p.name for p in store.list_prompts(job_id=job.id) if p.name.startswith("init/")} == {"init/pt", "init/maml"}
    events = [e.message for e in store.events(job.id) if e.kind == "log"]
    assert any(e.startswith("upstream reptile diverged at outer step 2") and e.endswith(
        "reptile is left out, the other methods go on") for e in events)
    assert "left out: reptile (meta-training diverged; no initial prompt)" in events


def run_job(store, owner: str, fields: dict) -> str:
    """A job through the worker's steps, in this process: start, every cell, aggregate."""
    spec = jobs.parse_spec(fields)
    body = spec.model_dump(mode="json")
    job, _ = store.create_job(owner, spec.name, body, jobs.spec_hash(body), jobs.units(spec))
    for cell in jobs.start(store, job.id):
        jobs.run_cell(store, job.id, cell)
    jobs.aggregate(store, job.id)
    assert store.get_job(job.id).status == "succeeded"
    return job.id


def test_a_job_asking_to_reuse_baselines_takes_the_owners_earlier_runs_with_the_same_inputs(
        store, spec_fields, tiny_dir, monkeypatch):
    """Only PT and FT, only the same owner's, only where every input matches: the backbone, the
    task, the split seed, the lr and each setting the run reads; the rest is trained."""
    import core.experiment as experiment
    from core.settings import settings
    from tests.test_experiment import changed

    monkeypatch.setenv("PRIMER_BACKBONES", f"tiny={tiny_dir['causal']}")
    settings.cache_clear()
    monkeypatch.setattr(jobs, "lease_lost", threading.Event())
    trained, train = [], experiment.run_cell
    monkeypatch.setattr(experiment, "run_cell", lambda prep, method, task, seed, lr, *a: trained.append(
        (method, task, seed, lr)) or train(prep, method, task, seed, lr, *a))
    fields = {**spec_fields, "backbone": "tiny", "upstream": {**spec_fields["upstream"], "methods": ["fomaml"]},
              "downstream": {**spec_fields["downstream"], "finetune": True, "ft_lrs": [1e-4]}}
    alice, bob = (store.create_key(who)[0].id for who in ("alice", "bob"))
    try:
        first = run_job(store, alice, fields)
        assert len(trained) == 2 * 3 * 2  # 2 targets x (pt, fomaml, ft) x 2 seeds, one lr each

        trained.clear()  # another outer lr, one more PT lr, and asking for reuse
        again = changed(changed(fields, "upstream.outer_lr", 0.1), "downstream.lrs", [0.05, 0.1])
        second = run_job(store, alice, changed(again, "downstream.reuse_baselines", True))
        assert sorted({(m, lr) for m, _, _, lr in trained}) == [("fomaml", 0.05), ("fomaml", 0.1), ("pt", 0.1)]
        reused = [e.message for e in store.events(second) if " reused from " in e.message]
        assert len(reused) == 2 * 2 * 2 and all(m.endswith(f"reused from {first}, whose run had the same inputs")
                                                for m in reused)
        for t, seed, method, lr in [(t, seed, m, lr) for t in ("color", "greet") for seed in (100, 13)
                                    for m, lr in (("pt", 0.05), ("ft", 1e-4))]:
            a, b = store.get_score(first, method, t, seed, lr), store.get_score(second, method, t, seed, lr)
            assert (a.dev, a.test, a.curve, a.prompt) == (b.dev, b.test, b.curve, b.prompt)
            assert (a.reused_from, b.reused_from) == (None, first)

        for owner, spec in ((alice, changed(again, "prompt.length", 4)),  # the prompt: every PT run changes
                            (alice, changed(again, "downstream.max_steps", 3)),
                            (bob, again)):  # another owner's runs are never taken
            trained.clear()
            run_job(store, owner, changed(spec, "downstream.reuse_baselines", True))
            assert sum(m == "pt" for m, *_ in trained) == 2 * 2 * 2 and sum(m == "ft" for m, *_ in trained) == 4
        trained.clear()
        run_job(store, alice, again)  # not asked: everything is trained
        assert len(trained) == 2 * 2 * (2 + 2 + 1)
    finally:
        settings.cache_clear()


def test_a_job_asking_to_reuse_starts_takes_the_owners_earlier_meta_training_with_the_same_inputs(
        store, spec_fields, tiny_dir, monkeypatch):
    """Only the same owner's, only where every input of the meta-training matches (the backbone,
    the sources, the split seeds, the prompt, each upstream setting the method reads); a reused
    start is the earlier one to the bit, and one that diverged is left out again without running.
    The downstream runs from a reused start are taken too where their own inputs match."""
    import torch

    import core.experiment as experiment
    from core.settings import settings
    from tests.test_experiment import changed, diverging_at

    monkeypatch.setenv("PRIMER_BACKBONES", f"tiny={tiny_dir['causal']}")
    settings.cache_clear()
    monkeypatch.setattr(jobs, "lease_lost", threading.Event())
    diverging_at(monkeypatch, {"fomaml"})  # in the first job only: its second outer step overall
    trained, train = [], experiment.meta_train
    monkeypatch.setattr(experiment, "meta_train", lambda model, sources, init, cfg, *a, **k: trained.append(
        cfg.algorithm) or train(model, sources, init, cfg, *a, **k))
    tuned, tune = [], experiment.run_cell
    monkeypatch.setattr(experiment, "run_cell", lambda prep, method, task, seed, lr, *a: tuned.append(
        (method, lr)) or tune(prep, method, task, seed, lr, *a))
    fields = {**spec_fields, "backbone": "tiny", "targets": spec_fields["targets"][:1],
              "upstream": {**spec_fields["upstream"], "methods": ["maml", "fomaml"]},
              "downstream": {**spec_fields["downstream"], "seeds": [100]}}
    alice, bob = (store.create_key(who)[0].id for who in ("alice", "bob"))

    def inits(job_id):
        return {p.name: store.prompt_tensor(p) for p in store.list_prompts(job_id=job_id) if p.name.startswith("init/")}

    def reused(job_id):
        return {e.message for e in store.events(job_id) if " reused from " in e.message}

    def started(*methods):
        return {f"upstream/{m} reused from {first}, whose meta-training had the same inputs" for m in methods}

    try:
        first = run_job(store, alice, fields)
        assert trained == ["maml", "fomaml"] and set(inits(first)) == {"init/pt", "init/maml"}  # fomaml diverged

        trained.clear(), tuned.clear()  # FoMAML's own inner lr, another downstream lr, and asking for reuse
        again = changed(changed(fields, "upstream.per_method", {"fomaml": {"inner_lr": 0.2}}), "downstream.lrs", [0.1])
        second = run_job(store, alice, changed(again, "upstream.reuse_starts", True))
        assert trained == ["fomaml"] and torch.equal(inits(second)["init/maml"], inits(first)["init/maml"])
        assert store.load_checkpoint(second, "upstream/maml")["curve"] == store.load_checkpoint(first, "upstream/maml")["curve"]
        assert reused(second) == started("maml")
        assert sorted(tuned) == [("fomaml", 0.1), ("maml", 0.1), ("pt", 0.1)]  # no run at that lr before

        trained.clear(), tuned.clear()  # the first job's inputs again: both starts taken, FoMAML left out as
        third = run_job(store, alice, changed(fields, "upstream.reuse_starts", True))  # it was, MAML's run taken
        assert trained == [] and tuned == [("pt", 0.05)] and reused(third) == started("maml", "fomaml") | {
            f"downstream/maml/color/100/0.05 reused from {first}, whose run had the same inputs"}
        assert set(inits(third)) == {"init/pt", "init/maml"}
        assert {m.method: m.diverged for m in store.results(third)[1]}["fomaml"].startswith(
            "upstream fomaml diverged at outer step 2: ")
        a, b = store.get_score(first, "maml", "color", 100, 0.05), store.get_score(third, "maml", "color", 100, 0.05)
        assert (a.dev, a.test, a.curve, a.prompt, a.reused_from, b.reused_from) == (
            b.dev, b.test, b.curve, b.prompt, None, first)

        tuned.clear()  # the start is taken, but the run reads another max_steps: trained
        fourth = run_job(store, alice, changed(changed(fields, "downstream.max_steps", 3), "upstream.reuse_starts", True))
        assert sorted(tuned) == [("maml", 0.05), ("pt", 0.05)] and reused(fourth) == started("maml", "fomaml")

        for owner, spec in ((alice, changed(fields, "upstream.seeds", [100])),  # the source splits
                            (alice, changed(fields, "prompt.seed", 7)),  # the start and the episodes' order
                            (alice, changed(fields, "upstream.sources", spec_fields["upstream"]["sources"][:2])),
                            (bob, fields)):  # another owner's starts are never taken
            trained.clear(), tuned.clear()
            run_job(store, owner, changed(spec, "upstream.reuse_starts", True))
            assert trained == ["maml", "fomaml"] and sorted(tuned) == [("fomaml", 0.05), ("maml", 0.05), ("pt", 0.05)]
        trained.clear(), tuned.clear()
        run_job(store, alice, fields)  # not asked: every method and run is trained
        assert trained == ["maml", "fomaml"] and sorted(tuned) == [("fomaml", 0.05), ("maml", 0.05), ("pt", 0.05)]
    finally:
        settings.cache_clear()


@pytest.mark.parametrize("error,code", [
    (UserError("prompt has width 64 but backbone tiny embeds tokens in 32 dimensions"), "invalid_input"),
    (TaskError("tiny_sentiment_2_13_train.tsv, line 2: no tab"), "invalid_task"),
    (FetchError("could not download https://files.pythonhosted.org/...: HTTP Error 403: Forbidden"), "data_unavailable"),
    (ValueError("operands could not be broadcast together"), "internal"),  # primer's own bug
])
def test_a_failed_step_says_whether_the_users_input_or_primer_failed(store, job, monkeypatch, error, code):
    from worker import tasks

    monkeypatch.setattr(tasks, "store", lambda: store)
    jobs.send(store, Broker(), job.id, "start", "primer.start", [job.id])

    def body():
        raise error

    with pytest.raises(type(error)):
        tasks.run_step(job.id, "start", body)
    failed = store.get_job(job.id)
    assert failed.status == "failed" and failed.error_code == code
    assert failed.error_message == (f"ValueError: {error}" if code == "internal" else str(error))  # the type only for ours
    assert store.open_dispatches() == []  # released: nothing left for the reconciler to resend


@pytest.mark.parametrize("broker", ["redis", "sqlite"])
def test_the_reconciler_reads_which_messages_each_broker_holds(broker, tmp_path):
    import os
    import subprocess
    import sys

    env = os.environ | ({"PRIMER_BROKER_URL": "redis://127.0.0.1:6379/9"} if broker == "redis" else
                        {"PRIMER_BROKER_URL": f"sqla+sqlite:///{tmp_path / 'broker.db'}"})
    code = """
from worker import app as w
with w.app.connection_for_write() as conn:
    for q in w.QUEUES:
        conn.default_channel.queue_purge(q)
assert w.pending_ids() == set(), w.pending_ids()
w.transport("primer.start", ["job_x"], "m-start")
w.transport("primer.cell", ["job_x", {}], "m-cell")
assert w.pending_ids() == {"m-start", "m-cell"}, w.pending_ids()
with w.app.connection_for_read() as conn:  # a worker takes one: on Redis it stays, unacked, until done
    message = conn.SimpleQueue("upstream").get(timeout=5)
    assert message.headers["id"] == "m-start"
    print(sorted(w.pending_ids()))
    message.ack()
"""
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == (["['m-cell',", "'m-start']"] if broker == "redis" else ["['m-cell']"])


@pytest.mark.parametrize("start_seconds", [3.0, None])
def test_a_worker_process_that_starts_slowly_replaces_the_last_one_unless_it_takes_too_long(tmp_path, start_seconds):
    """Each new process takes 6 s to start (a preload). Celery kills one that has not started
    within worker_proc_alive_timeout (its default, 4 s) when it replaces another, and then the
    next: primer sets it from PRIMER_PROCESS_START_SECONDS (600 s), so the replacement runs."""
    import os
    import subprocess
    import sys

    import redis
    from celery import Celery

    from tests.test_service import stop

    redis.Redis(db=11).flushdb()  # on Redis (the event loop's pool; the SQLite broker's does not check)
    env = os.environ | {"PRIMER_BROKER_URL": "redis://127.0.0.1:6379/11", "PRIMER_CACHE_DIR": str(tmp_path),
                        "PRIMER_DATABASE_URL": f"sqlite:///{tmp_path / 'primer.db'}", "PRIMER_TEST_SLOW_START": "6",
                        "PRIMER_RECONCILE_SECONDS": "3600"}
    if start_seconds is not None:
        env["PRIMER_PROCESS_START_SECONDS"] = str(start_seconds)
    log, pids = tmp_path / "worker.log", tmp_path / "pids"
    sender = Celery(broker=env["PRIMER_BROKER_URL"])
    for _ in range(2):
        sender.send_task("test.pid", args=[str(pids)], queue="downstream")
    with open(log, "w") as out:
        worker = subprocess.Popen([sys.executable, "-m", "celery", "-A", "tests.slow_start", "worker", "-Q", "downstream",
                                   "--concurrency", "1", "--loglevel", "info"], env=env, stdout=out, stderr=out,
                                  start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        ran = lambda: pids.read_text().split() if pids.exists() else []  # noqa: E731
        while len(ran()) < 2 and "Timed out waiting for UP message" not in log.read_text() and time.monotonic() < deadline:
            time.sleep(0.5)
    finally:
        stop(worker)
    if start_seconds is None:
        assert len(set(ran())) == 2, log.read_text()[-3000:]  # two tasks, two processes
        assert "Timed out waiting for UP message" not in log.read_text()
    else:  # what Celery's default did to every replacement: killed, the second task never run
        assert len(ran()) == 1 and "Timed out waiting for UP message" in log.read_text()


def test_store_calls_wait_for_a_database_that_is_away_but_not_for_a_wrong_query(tmp_path, monkeypatch):
    import psycopg
    from sqlalchemy.exc import OperationalError

    store = Store(f"sqlite:///{tmp_path / 'primer.db'}", retry_seconds=20)
    store.upgrade()
    real, calls = Store.list_keys.__wrapped__, []

    def flaky(self):  # Postgres restarting: the first two connections are refused
        calls.append(time.monotonic())
        if len(calls) <= 2:
            raise OperationalError("SELECT", {}, psycopg.OperationalError("connection refused"))
        return real(self)

    monkeypatch.setattr(Store, "list_keys", __import__("core.store", fromlist=["retrying"]).retrying(flaky))
    assert store.list_keys() == [] and len(calls) == 3
    empty = Store(f"sqlite:///{tmp_path / 'empty.db'}", retry_seconds=20)  # never migrated
    t = time.monotonic()
    with pytest.raises(OperationalError, match="no such table"):
        empty.list_jobs()
    assert time.monotonic() - t < 1


def test_a_store_call_made_by_another_waits_only_once(tmp_path):
    import psycopg
    from sqlalchemy.exc import OperationalError

    from core.store import retrying

    calls = {"outer": 0, "inner": 0}

    class Flaky(Store):  # Postgres is down for longer than the wait
        @retrying
        def inner(self):
            calls["inner"] += 1
            raise OperationalError("SELECT", {}, psycopg.OperationalError("connection refused"))

        @retrying
        def outer(self):
            calls["outer"] += 1
            return self.inner()

    store = Flaky(f"sqlite:///{tmp_path / 'primer.db'}", retry_seconds=1)
    t = time.monotonic()
    with pytest.raises(OperationalError):
        store.outer()
    assert calls["outer"] == calls["inner"] >= 2  # the outer call waits; the inner one does not wait again
    assert time.monotonic() - t < 2


# --- faults injected into a real service ------------------------------------------------------
import os  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import threading  # noqa: E402
from contextlib import contextmanager  # noqa: E402

import httpx  # noqa: E402

from tests import reliability as R  # noqa: E402
from tests.test_service import running_service, spec  # noqa: E402


def quick(name):
    """A job with no upstream: start, one downstream run of 2 steps, aggregation."""
    return {"name": name, "backbone": "tiny", "prompt": {"length": 3}, "targets": ["sms_spam"],
            "downstream": {"seeds": [100], "lrs": [0.1], "max_steps": 2, "eval_every": 2, "optimizer": "adamw",
                           "batch_size": 2, "max_test_examples": 8}}


@pytest.fixture(scope="module")
def svc(tmp_path_factory):
    # no rate limit: the load test is one key sending as fast as it can
    with running_service(tmp_path_factory.mktemp("hardening"), PRIMER_RATE_LIMIT="0") as s:
        _, secret = s.store.create_key("sre")
        s.http = s.client(secret)
        yield s


@pytest.fixture(scope="module")
def undisturbed(svc):
    job_id = svc.http.post("/jobs", json=spec("undisturbed")).json()["id"]
    job = svc.wait(svc.http, job_id)
    assert job["status"] == "succeeded", (job["error"], job["name"])
    return outcome(svc, job_id)


def outcome(svc, job_id):
    """What a job made: its prompts' sha256 by name, and each downstream run's dev and test scores."""
    prompts = {p["name"]: p["sha256"] for p in svc.http.get("/prompts", params={"job": job_id}).json()["prompts"]}
    scores = {(s.method, s.task, s.seed, s.lr): (s.dev, s.test) for s in svc.store.scores(job_id)}
    return prompts, scores


def events(svc, job_id):
    return [e["message"] for e in svc.http.get(f"/jobs/{job_id}/events", params={"limit": 1000}).json()["events"]]


HOLD = 4242  # the advisory lock a held worker waits for
WAITING = f"FROM pg_locks WHERE locktype = 'advisory' AND objid = {HOLD} AND NOT granted"  # its backend


@contextmanager
def held(svc, name):
    """Hold the worker of the job called `name` when it writes the progress of a downstream run
    while another of its downstream runs is done: a trigger in the store makes that write wait
    for a lock this test holds. Yields once the worker waits there, so it is known to be
    mid-downstream (a poll for that window can miss it: the runs are short)."""
    from sqlalchemy import create_engine, text

    engine = create_engine(svc.env["PRIMER_DATABASE_URL"], isolation_level="AUTOCOMMIT")
    with engine.connect() as c:
        c.execute(text(f"""
            CREATE FUNCTION test_hold() RETURNS trigger AS $$ BEGIN
              IF NOT NEW.done AND NEW.unit LIKE 'downstream/%' AND EXISTS (
                  SELECT 1 FROM job_units u JOIN jobs j ON j.id = u.job_id
                  WHERE u.job_id = NEW.job_id AND j.name = '{name}' AND u.unit LIKE 'downstream/%' AND u.done)
              THEN PERFORM pg_advisory_xact_lock({HOLD}); END IF;
              RETURN NEW; END $$ LANGUAGE plpgsql"""))
        c.execute(text("CREATE TRIGGER test_hold BEFORE UPDATE ON job_units FOR EACH ROW EXECUTE FUNCTION test_hold()"))
        c.execute(text(f"SELECT pg_advisory_lock({HOLD})"))
        try:
            deadline = time.monotonic() + 240
            while c.scalar(text(f"SELECT pid {WAITING}")) is None:
                assert time.monotonic() < deadline, f"no worker reached the hold of {name!r} in 240 s"
                time.sleep(0.1)
            yield
        finally:
            c.execute(text(f"SELECT pg_terminate_backend(pid) {WAITING}"))
            c.execute(text(f"SELECT pg_advisory_unlock({HOLD})"))
            c.execute(text("DROP TRIGGER test_hold ON job_units"))
            c.execute(text("DROP FUNCTION test_hold()"))
    engine.dispose()


def test_a_worker_killed_mid_downstream_loses_nothing(svc, undisturbed):
    job_id = svc.http.post("/jobs", json=spec("killed-downstream")).json()["id"]
    with held(svc, "killed-downstream"):
        job = svc.http.get(f"/jobs/{job_id}").json()
        assert job["status"] == "running" and job["phase"] == "downstream" and 6 < job["step"] < job["total"], job
        svc.kill(svc.workers[-1])
    R.count("faults", "worker SIGKILLed mid-downstream")
    svc.start_worker()
    job = svc.wait(svc.http, job_id, timeout=300)
    assert job["status"] == "succeeded", (job["error"], job["name"])
    assert outcome(svc, job_id) == undisturbed  # the same prompts, bit for bit, and the same scores
    R.finished(1, same=1)


def test_postgres_restarted_mid_job_is_waited_out(svc, undisturbed):
    job_id = svc.http.post("/jobs", json=spec("postgres-restart")).json()["id"]
    svc.wait(svc.http, job_id, until=("running",), check=lambda j: j["step"] >= 2)
    cluster = sorted(os.listdir("/etc/postgresql"))[0]
    subprocess.run(["pg_ctlcluster", "--skip-systemctl-redirect", cluster, "main", "restart"], check=True, timeout=120)
    R.count("faults", "Postgres restarted mid-job")
    job = svc.wait(svc.http, job_id, timeout=300)
    assert job["status"] == "succeeded", (job["error"], job["name"])
    assert outcome(svc, job_id) == undisturbed
    R.finished(1, same=1)


def restart_redis():
    subprocess.run(["redis-cli", "-p", "6379", "shutdown", "nosave"], timeout=30)
    subprocess.run(["redis-server", "--daemonize", "yes", "--bind", "127.0.0.1", "--port", "6379", "--save", "",
                    "--appendonly", "no"], check=True, timeout=30)
    for _ in range(100):
        if subprocess.run(["redis-cli", "-p", "6379", "ping"], capture_output=True).returncode == 0:
            return
        time.sleep(0.1)
    raise AssertionError("Redis did not come back")


def test_queued_jobs_whose_messages_a_redis_restart_lost_are_sent_again(svc):
    # the only worker is busy with a long job, so the next ones wait in Redis
    slow = spec("busy", steps=100_000, methods=["reptile"], per_method={"reptile": {"inner_steps": 40}})
    busy = svc.http.post("/jobs", json=slow).json()["id"]
    svc.wait(svc.http, busy, until=("running",), check=lambda j: j["step"] >= 2)
    queued = [svc.http.post("/jobs", json=quick(f"queued-{i}")).json()["id"] for i in range(3)]
    restart_redis()  # no persistence: the queued messages are gone
    assert all(svc.http.get(f"/jobs/{j}").json()["status"] == "queued" for j in queued)
    R.count("faults", "Redis restarted (without persistence) with jobs queued")
    R.count("faults", "queued jobs whose broker message was lost", len(queued))
    R.count("faults", "jobs submitted", 1)  # the busy one, cancelled below
    time.sleep(3)
    before = svc.http.get(f"/jobs/{busy}").json()["step"]
    svc.wait(svc.http, busy, until=("running",), check=lambda j: j["step"] > before)  # the worker rode it out
    svc.http.post(f"/jobs/{busy}/cancel")
    for job_id in queued:
        job = svc.wait(svc.http, job_id, timeout=300)
        assert job["status"] == "succeeded", (job["error"], job["name"])
        assert any("no longer in the broker" in m for m in events(svc, job_id))
    assert svc.wait(svc.http, busy)["status"] == "cancelled"
    R.count("faults", "jobs finished (succeeded, or cancelled as asked)", 1)
    R.finished(len(queued))


def test_the_api_killed_mid_request_loses_and_duplicates_nothing(svc):
    """Clients retry with their Idempotency-Key until they get an answer; the API is SIGKILLed
    and restarted under them. One job per key, every one finishes."""
    keys, answers, lock = [f"restart-{i}" for i in range(40)], {}, threading.Lock()

    def client(key):
        with httpx.Client(base_url=svc.url, headers=svc.http.headers, timeout=30) as http:
            while True:
                try:
                    r = http.post("/jobs", json=quick(key), headers={"Idempotency-Key": key})
                except httpx.TransportError:
                    time.sleep(0.2)
                    continue
                assert r.status_code == 202, r.text
                with lock:
                    answers.setdefault(key, set()).add(r.json()["id"])
                return

    threads = [threading.Thread(target=client, args=(k,)) for k in keys]
    for t in threads[:20]:
        t.start()
    time.sleep(0.3)
    svc.stop_api(signal.SIGKILL)
    R.count("faults", "API SIGKILLed mid-request")
    for t in threads[20:]:
        t.start()
    time.sleep(1)
    svc.start_api()
    for t in threads:
        t.join(timeout=120)
    assert sorted(answers) == sorted(keys) and all(len(ids) == 1 for ids in answers.values())
    stored = [j for j in svc.store.list_jobs(limit=200)[0] if j.idempotency_key in answers]
    assert len(stored) == len(keys)  # no duplicates
    for ids in answers.values():
        job = svc.wait(svc.http, next(iter(ids)), timeout=300)
        assert job["status"] == "succeeded", (job["error"], job["name"])
    R.finished(len(keys))


def test_a_job_the_api_stored_but_never_sent_is_sent_by_the_reconciler(svc):
    """As if the API died between storing a job (with its first step, as it does) and handing it
    to the broker: the reconciler finds the step's message missing from the broker."""
    from core import jobs as core_jobs
    from core.spec import parse_spec

    owner = svc.store.authenticate(svc.http.headers["Authorization"].removeprefix("Bearer ")).id
    body = quick("never-sent")
    job, _ = svc.store.create_job(owner, "never-sent", parse_spec(body).model_dump(mode="json"),
                                  core_jobs.spec_hash(body), core_jobs.units(parse_spec(body)),
                                  first=(*core_jobs.START, "never-sent-message"))
    R.count("faults", "jobs stored but never sent (API died before the send)")
    done = svc.wait(svc.http, job.id, timeout=120)
    assert done["status"] == "succeeded", done["error"]
    R.finished(1)


def test_on_the_embedded_sqlite_broker_a_killed_workers_job_is_rescued_by_the_reconciler(tmp_path, tiny_dir):
    """The one-machine default keeps no unacknowledged messages: a worker SIGKILLed mid-upstream
    takes its message with it, and only the lapsed lease brings the step back."""
    from tests.test_service import LEASES, launched

    env = {k: v for k, v in os.environ.items() if not k.startswith("PRIMER_")} | {
        "PRIMER_DATABASE_URL": f"sqlite:///{tmp_path / 'primer.db'}",
        "PRIMER_BROKER_URL": f"sqla+sqlite:///{tmp_path / 'broker.db'}",
        "PRIMER_BACKBONES": f"tiny={tiny_dir['causal']}"} | LEASES
    with launched(env, tmp_path) as embedded:
        _, secret = embedded.store.create_key("solo")
        http = embedded.client(secret)
        # Reptile with 20 inner steps: each outer step takes long enough that the poll below cannot
        # miss the window between step 3 and the end (40 MAML steps on the tiny model once did)
        slow = spec("embedded-killed", steps=30, methods=["reptile"], per_method={"reptile": {"inner_steps": 20}})
        job_id = http.post("/jobs", json=slow).json()["id"]
        embedded.wait(http, job_id, until=("running",), check=lambda j: j["phase"] == "upstream" and j["step"] >= 3)
        embedded.kill(embedded.workers[-1])
        R.count("faults", "worker SIGKILLed mid-upstream on the embedded SQLite broker")
        embedded.start_worker()
        job = embedded.wait(http, job_id, timeout=300)
        assert job["status"] == "succeeded", (job["error"], job["name"])
        assert any("stopped beating" in m["message"] for m in http.get(f"/jobs/{job_id}/events",
                                                                      params={"limit": 1000}).json()["events"])
        R.finished(1)


# --- load -------------------------------------------------------------------------------------
def test_200_concurrent_submissions_and_a_minute_of_reads_lose_nothing(svc):
    """200 jobs submitted at once, 8 clients reading for at least 60 s while two workers drain
    them: no 5xx, one job per submission, every job finished."""
    import asyncio
    import random

    import numpy as np

    svc.start_worker()  # two workers, one per core
    headers, n_jobs, readers, statuses, read_ms = dict(svc.http.headers), 200, 8, [], []

    async def run():
        # Idle connections are dropped before uvicorn's 5 s keep-alive timeout: at equal timeouts
        # a reader can reuse a connection the server is closing (httpx.ReadError, no response).
        limits = httpx.Limits(max_connections=250, max_keepalive_connections=250, keepalive_expiry=2)
        async with httpx.AsyncClient(base_url=svc.url, headers=headers, timeout=60, limits=limits) as http:
            async def submit(i):
                r = await http.post("/jobs", json=quick(f"load-{i}"), headers={"Idempotency-Key": f"load-{i}"})
                statuses.append(r.status_code)
                return r.json().get("id") if r.status_code == 202 else None

            t0 = time.monotonic()
            ids = await asyncio.gather(*(submit(i) for i in range(n_jobs)))
            submit_s = time.monotonic() - t0
            done: dict[str, str] = {}

            async def reader(seed):
                rng = random.Random(seed)
                while time.monotonic() - t0 < 60 or len(done) < n_jobs:
                    job_id = rng.choice(ids)
                    start = time.perf_counter()
                    r = await (http.get(f"/jobs/{job_id}") if rng.random() < 0.8 else http.get("/jobs?limit=50"))
                    read_ms.append(1000 * (time.perf_counter() - start))
                    statuses.append(r.status_code)
                    if r.status_code == 200 and "status" in r.json() and r.json()["status"] in (
                            "succeeded", "failed", "cancelled"):
                        done[job_id] = r.json()["status"]
                    if time.monotonic() - t0 > 600:
                        return
                    await asyncio.sleep(0.1)  # ~10 requests a second each: steady, not saturating

            await asyncio.gather(*(reader(s) for s in range(readers)))
            return ids, submit_s, time.monotonic() - t0, done

    ids, submit_s, total_s, _ = asyncio.run(run())
    server_errors = sum(s >= 500 for s in statuses)
    assert server_errors == 0
    assert all(ids) and len(set(ids)) == n_jobs  # every submission accepted, each its own job
    stored = [j for j in svc.store.list_jobs(limit=1000)[0] if (j.idempotency_key or "").startswith("load-")]
    assert len(stored) == n_jobs
    finished = {j.id: j.status for j in stored}
    assert set(finished) == set(ids) and set(finished.values()) == {"succeeded"}, \
        {s: sum(v == s for v in finished.values()) for s in set(finished.values())}
    assert all(len(svc.store.scores(j)) == 1 for j in ids)  # each run stored once
    R.note("load", "jobs submitted concurrently", n_jobs)
    R.note("load", "jobs accepted (202)", len(set(ids)))
    R.note("load", "seconds to accept all submissions", submit_s)
    R.note("load", "read requests (GET /jobs/{id}, GET /jobs) by 8 clients", len(read_ms))
    R.note("load", "read latency p50 / p99 (ms)", f"{np.percentile(read_ms, 50):.0f} / {np.percentile(read_ms, 99):.0f}")
    R.note("load", "seconds until every job finished (2 workers, 2 cores)", total_s)
    R.note("load", "5xx responses", server_errors)
    R.note("load", "jobs lost", n_jobs - len(finished))
    R.note("load", "jobs duplicated", len(stored) - n_jobs)
    R.note("load", "jobs finished succeeded", sum(v == "succeeded" for v in finished.values()))
