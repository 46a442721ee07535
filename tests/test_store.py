"""The store on SQLite and Postgres: migrations, keys, jobs, progress, prompts, scores, results,
checkpoints and uploaded tasks. Every test but the migration one runs on both databases."""
import math
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import func, inspect, select, text, update
from sqlalchemy.exc import IntegrityError

from core.store import IdempotencyConflict, Store, StoreError, TaskExists
from core.store.models import ApiKey, Artifact, Base, Checkpoint, Event, Job, JobUnit, Prompt, Score, TaskResult
from tests import reliability as R

UNITS = {"upstream/maml": 10, "downstream/pt/sms_spam/13/0.3": 5, "downstream/maml/sms_spam/13/0.3": 5}


def new_job(store, owner, name="job", key=None, spec_hash="h1", units=UNITS, first=None):
    return store.create_job(owner, name, {"name": name}, spec_hash, units, idempotency_key=key, first=first)


def count(store, model, **where) -> int:
    q = select(func.count()).select_from(model)
    for column, value in where.items():
        q = q.where(getattr(model, column) == value)
    with store.engine.connect() as conn:
        return conn.scalar(q)


@pytest.fixture
def alice(store):
    return store.create_key("alice")[0].id


@pytest.fixture
def bob(store):
    return store.create_key("bob")[0].id


# --- migrations ------------------------------------------------------------------------------
@pytest.fixture(params=["sqlite", "postgres"])
def empty_url(request, tmp_path):
    return f"sqlite:///{tmp_path / 'fresh.db'}" if request.param == "sqlite" else request.getfixturevalue("pg_url")


def differences(store) -> list:
    with store.engine.connect() as conn:
        return compare_metadata(MigrationContext.configure(conn), Base.metadata)


def tables(store) -> set[str]:
    with store.engine.connect() as conn:
        return set(inspect(conn).get_table_names())


def test_migrations_go_up_down_and_up_again_and_match_the_models(empty_url):
    store = Store(empty_url)
    try:
        store.upgrade()
        assert tables(store) == set(Base.metadata.tables) | {"alembic_version"}
        assert differences(store) == []
        store.downgrade()
        assert tables(store) == {"alembic_version"}
        store.upgrade()
        assert differences(store) == []
        R.count("integrity", "Alembic upgrade, downgrade, upgrade again: clean and equal to the models "
                             f"({store.engine.dialect.name})")
    finally:
        store.engine.dispose()


def test_a_downgrade_that_would_lose_what_results_record_refuses_and_keeps_them(store):
    key, _ = store.create_key("alice")
    job, _ = store.create_job(key.id, "j", {"name": "j"}, "h", {})
    cell = dict(job_id=job.id, method="pt", task="t", seed=1, lr=0.1, metric="ACC", dev=0.5, test=0.5, best_step=1,
                steps=1, seconds=1.0, curve=[], inputs="d" * 64)
    store.save_score(**cell, reused_from="job_earlier")
    with pytest.raises(RuntimeError, match="cannot downgrade below 0006: 1 scores were reused from earlier jobs"):
        store.downgrade("0005")
    assert store.get_score(job.id, "pt", "t", 1, 0.1).reused_from == "job_earlier"
    with store.engine.begin() as conn:  # a score of its own: the digest alone may go
        conn.execute(update(Score).values(reused_from=None))
    store.downgrade("0005")
    store.save_results(job.id, [], {"maml": None}, diverged={"reptile": "upstream reptile diverged at outer step 3"})
    with pytest.raises(RuntimeError, match="cannot downgrade below 0005: 1 method results record a diverged"):
        store.downgrade("0004")
    store.save_results(job.id, [], {"maml": None})  # no diverged method left: 0004 holds the rest
    store.downgrade("0004")
    with pytest.raises(RuntimeError, match="cannot downgrade below 0004: 1 method results have no ARG"):
        store.downgrade("0003")
    store.upgrade()
    assert [(m.method, m.arg, m.diverged) for m in store.results(job.id)[1]] == [("maml", None, None)]


def test_nan_scores_losses_and_gains_are_stored_and_read_back_as_nan(store):
    # CrossFit's Pearson of constant predictions is NaN, and so is a diverging run's loss: SQLite's
    # REAL would make NaN a NULL (refused where a score is required) and JSON has no NaN at all.
    key, _ = store.create_key("alice")
    job, _ = store.create_job(key.id, "j", {"name": "j"}, "h", {})
    nan = float("nan")
    store.save_score(job_id=job.id, method="pt", task="t", seed=1, lr=0.1, metric="Pearson", dev=nan, test=nan,
                     best_step=0, steps=1, seconds=1.0, curve=[{"step": 0, "dev": nan}, {"step": 1, "loss": 0.5}])
    row = store.get_score(job.id, "pt", "t", 1, 0.1)
    assert math.isnan(row.dev) and math.isnan(row.test) and math.isnan(row.curve[0]["dev"])
    assert row.curve[1] == {"step": 1, "loss": 0.5}
    store.save_results(job.id, [{"method": "maml", "task": "t", "metric": "Pearson", "mean": nan, "std": nan,
                                 "relative_gain": nan}], {"maml": nan})
    (task,), (method,) = store.results(job.id)
    assert all(math.isnan(v) for v in (task.mean, task.std, task.relative_gain, method.arg))
    store.add_event(job.id, kind="metric", name="t/dev", step=1, value=nan)
    assert math.isnan(store.events(job.id)[-1].value)


# --- API keys --------------------------------------------------------------------------------
def test_only_a_hash_of_the_secret_is_stored_and_revoked_keys_stop_working(store):
    key, secret = store.create_key("alice")
    with store.engine.connect() as conn:
        row = conn.execute(select(ApiKey.__table__).where(ApiKey.id == key.id)).one()
    assert all(secret not in str(value) for value in row)

    assert store.authenticate(secret).id == key.id
    assert store.authenticate(secret + "x") is None and store.authenticate("pk_wrong") is None
    assert store.revoke_key(key.id) and not store.revoke_key(key.id)
    assert store.authenticate(secret) is None


# --- jobs ------------------------------------------------------------------------------------
def test_an_idempotency_key_replays_its_job_per_owner(store, alice, bob):
    first, created = new_job(store, alice, key="k1")
    assert created
    again, created = new_job(store, alice, key="k1")
    assert (again.id, created) == (first.id, False)
    with pytest.raises(IdempotencyConflict) as e:
        new_job(store, alice, key="k1", spec_hash="h2")
    assert e.value.job_id == first.id
    bobs, created = new_job(store, bob, key="k1")
    assert created and bobs.id != first.id


def test_concurrent_submissions_with_one_key_make_one_job(store, alice):
    start = threading.Barrier(8)

    def submit(i):
        start.wait()  # all at once: most lose the insert race and must find the winner's job
        return new_job(store, alice, key="race", first=("start", "primer.start", f"m{i}"))

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(submit, range(8)))
    assert len({job.id for job, _ in results}) == 1
    assert sum(created for _, created in results) == 1
    assert count(store, Job, owner=alice) == 1
    assert count(store, JobUnit) == len(UNITS)
    winner = next(i for i, (_, created) in enumerate(results) if created)
    assert [d.message_id for d in store.open_dispatches()] == [f"m{winner}"]


def test_a_job_and_its_first_step_are_stored_together_or_not_at_all(store, alice):
    job, _ = new_job(store, alice, first=("start", "primer.start", "m1"))
    start, = store.open_dispatches()
    assert (start.job_id, start.step, start.task, start.args, start.message_id, start.worker, start.attempts) == \
        (job.id, "start", "primer.start", [job.id], "m1", None, 0)
    assert store.dispatch(job.id, "start", "primer.start", [job.id]) is None  # recorded: not sent twice
    assert store.unsent_jobs(older_than=0) == []
    with pytest.raises(IntegrityError):  # the dispatch record cannot be written (no message id)
        new_job(store, alice, name="half", first=("start", "primer.start", None))
    assert count(store, Job, owner=alice) == 1 and count(store, JobUnit) == len(UNITS)


def test_pages_hold_each_job_once_newest_first_and_respect_owner_and_status(store, alice, bob):
    ids = [new_job(store, alice, f"job{i}")[0].id for i in range(7)]
    bobs = new_job(store, bob)[0].id
    pages, cursor = [], None
    while True:
        page, cursor = store.list_jobs(alice, cursor=cursor, limit=3)
        pages.append([j.id for j in page])
        if cursor is None:
            break
    assert [len(p) for p in pages] == [3, 3, 1]
    assert sum(pages, []) == ids[::-1]

    store.set_status(ids[2], "running")
    store.set_status(bobs, "running")
    assert [j.id for j in store.list_jobs(alice, status="running")[0]] == [ids[2]]
    assert {j.id for j in store.list_jobs(status="running")[0]} == {ids[2], bobs}  # no owner: everyone's
    assert len(store.list_jobs(bob)[0]) == 1

    for cursor in (bobs, "job_nope"):  # someone else's job is as unknown as a missing one
        with pytest.raises(KeyError):
            store.list_jobs(alice, cursor=cursor)
    assert [j.id for j in store.list_jobs(cursor=bobs)[0]] == ids[::-1]


def test_a_finished_job_stays_finished(store, alice):
    job = new_job(store, alice)[0]
    assert store.set_status(job.id, "succeeded", phase="done")
    assert not store.set_status(job.id, "running", phase="loading")
    store.set_phase(job.id, "upstream")
    job = store.get_job(job.id)
    assert (job.status, job.phase, job.started_at) == ("succeeded", "done", None)

    running = new_job(store, alice, "running")[0]
    store.set_status(running.id, "running")
    cancelled = store.request_cancel(running.id)
    assert cancelled.status == "cancelled" and cancelled.finished_at and store.is_cancelled(running.id)
    assert store.request_cancel(job.id).status == "succeeded" and not store.is_cancelled(job.id)


def test_progress_sums_the_units_and_counts_a_done_unit_in_full(store, alice):
    job = new_job(store, alice)[0]
    store.progress(job.id, "upstream/maml", 4)
    store.progress(job.id, "downstream/pt/sms_spam/13/0.3", 9)  # past its total: counts as its total
    store.progress(job.id, "downstream/maml/sms_spam/13/0.3", 2, done=True)  # stopped early, but done
    assert store.job_progress(job.id) == (4 + 5 + 5, 20)

    fresh, empty = new_job(store, alice, "fresh")[0], new_job(store, alice, "empty", units={})[0]
    ids = [job.id, fresh.id, empty.id]
    assert store.job_progress_many(ids) == {i: store.job_progress(i) for i in ids}
    assert store.job_progress_many(ids)[fresh.id] == (0, 20) and store.job_progress(empty.id) == (0, 0)


# --- prompts, scores, results, checkpoints ------------------------------------------------------
def test_event_ids_go_past_32_bits(store, alice):
    job, _ = new_job(store, alice)
    big = 2**31 + 10  # a long-lived service passes 2^31 events
    with store.engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            conn.execute(text("SELECT setval('events_id_seq', :v)"), {"v": big})
        else:
            conn.execute(Event.__table__.insert().values(id=big, job_id=job.id, kind="log", message="old"))
    store.add_event(job.id, "after 2^31 events")
    [event] = store.events(job.id, after=big)
    assert event.id > big and event.message == "after 2^31 events"


def test_a_prompt_round_trips_once_per_name_and_tampering_is_caught(store, alice):
    job = new_job(store, alice)[0]
    tensor = torch.randn(4, 8)
    row = store.save_prompt(job, "init/maml", tensor, backbone="tiny", algorithm="maml")
    assert torch.equal(store.prompt_tensor(store.get_prompt(row.id)), tensor)
    assert store.save_prompt(job, "init/maml", torch.zeros(4, 8), backbone="tiny", algorithm="maml").id == row.id
    assert count(store, Prompt, job_id=job.id) == 1

    with store.engine.begin() as conn:
        conn.execute(update(Prompt).where(Prompt.id == row.id).values(data=row.data[:-1] + b"\0"))
    with pytest.raises(StoreError, match=row.id):
        store.verified(store.get_prompt(row.id))


def score(job_id, dev=0.5, **cell):
    return dict(job_id=job_id, method="pt", task="sms_spam", seed=13, lr=0.3, metric="ACC", dev=dev, test=0.4,
                best_step=5, steps=10, seconds=1.0, curve=[0.1, 0.5]) | cell


def test_a_score_is_stored_once_per_cell(store, alice):
    job = new_job(store, alice)[0]
    assert store.save_score(**score(job.id))
    assert not store.save_score(**score(job.id, dev=0.9))  # a redelivery of the same cell
    assert store.save_score(**score(job.id, seed=21))
    assert count(store, Score, job_id=job.id) == 2 and store.get_score(job.id, "pt", "sms_spam", 13, 0.3).dev == 0.5
    with pytest.raises(IntegrityError):  # not a redelivery: there is no such job
        store.save_score(**score("job_missing"))


def test_results_are_replaced_not_added(store, alice):
    job = new_job(store, alice)[0]
    tasks = [dict(method=m, task="sms_spam", metric="ACC", mean=0.8, std=0.01, relative_gain=g)
             for m, g in (("pt", None), ("maml", 0.1))]
    store.save_results(job.id, tasks, {"maml": 10.0})
    store.save_results(job.id, tasks, {"maml": 12.0})
    rows, args = store.results(job.id)
    assert len(rows) == 2 and [(a.method, a.arg) for a in args] == [("maml", 12.0)]


def test_a_checkpoint_round_trips_and_is_overwritten_by_key(store, alice):
    job = new_job(store, alice)[0]
    state = {"step": 3, "prompt": torch.randn(4, 8), "optimizer": {"m": torch.zeros(2)}}
    store.save_checkpoint(job.id, "upstream/maml", state)
    loaded = store.load_checkpoint(job.id, "upstream/maml")
    assert loaded["step"] == 3 and torch.equal(loaded["prompt"], state["prompt"])
    assert torch.equal(loaded["optimizer"]["m"], torch.zeros(2))
    store.save_checkpoint(job.id, "upstream/maml", {"step": 4})
    assert store.load_checkpoint(job.id, "upstream/maml") == {"step": 4}
    assert store.load_checkpoint(job.id, "upstream/reptile") is None


# --- uploaded tasks --------------------------------------------------------------------------
def test_an_uploaded_task_round_trips_and_its_name_is_per_owner(store, alice, bob):
    files = {"task.jsonl": b'{"input": "hi", "output": "ham"}\n'}
    row = store.save_task(alice, "reviews", "classification", "ACC", ["ham", "spam"], "jsonl", 1, files)
    got = store.get_task(alice, "reviews")
    assert (got.id, got.options, got.examples) == (row.id, ["ham", "spam"], 1)
    assert store.task_files(row.id) == files
    with pytest.raises(TaskExists):
        store.save_task(alice, "reviews", "generation", "EM", None, "jsonl", 1, files)
    assert store.save_task(bob, "reviews", "generation", "EM", None, "jsonl", 1, files).id != row.id
    assert [t.owner for t in store.list_tasks()] == [alice, bob]


def test_a_worker_writes_an_uploaded_task_into_its_cache_whole_and_once(store, alice, tmp_path, monkeypatch):
    """materialize: the job's uploaded task becomes a local file the spec names by path; a second
    job on it (or another worker sharing the cache) reads that copy and does not write it again."""
    from core import jobs
    from core.settings import settings
    from core.spec import parse_spec

    files = {"task.jsonl": b'{"input": "hi", "output": "ham"}\n{"input": "buy now", "output": "spam"}\n'}
    row = store.save_task(alice, "reviews", "classification", "ACC", ["ham", "spam"], "jsonl", 2, files)
    monkeypatch.setenv("PRIMER_CACHE_DIR", str(tmp_path))
    settings.cache_clear()
    try:
        spec = parse_spec({"name": "x", "backbone": "smollm2-135m", "targets": ["reviews"], "downstream": {"max_steps": 2}})
        target = jobs.materialize(store, alice, spec).targets[0]
        assert target.path == str(tmp_path / "uploads" / row.id / "task.jsonl") and target.options == ["ham", "spam"]
        assert (tmp_path / "uploads" / row.id / "task.jsonl").read_bytes() == files["task.jsonl"]
        monkeypatch.setattr(store, "task_files", lambda task_id: pytest.fail("the cached copy was written again"))
        assert jobs.materialize(store, alice, spec).targets[0].path == target.path
    finally:
        settings.cache_clear()


# --- integrity -------------------------------------------------------------------------------
def test_deleting_a_job_deletes_everything_it_owns(store, alice):
    if store.url.startswith("sqlite"):
        with store.engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
    job, other = new_job(store, alice)[0], new_job(store, alice, "other")[0]
    for j in (job, other):
        store.save_prompt(j, "init/maml", torch.randn(2, 4), backbone="tiny", algorithm="maml")
        store.save_score(**score(j.id))
        store.add_event(j.id, "started")
        store.save_checkpoint(j.id, "upstream/maml", {"step": 1})
        store.save_artifact(j.id, "results.json", "application/json", b"{}")
        store.save_results(j.id, [dict(method="pt", task="t", metric="ACC", mean=1.0, std=0.0)], {})
    with store.engine.begin() as conn:
        conn.execute(text("DELETE FROM jobs WHERE id = :id"), {"id": job.id})
    for model in (JobUnit, Prompt, Score, Event, TaskResult, Checkpoint, Artifact):
        assert count(store, model, job_id=job.id) == 0 and count(store, model, job_id=other.id) > 0, model.__name__


def test_concurrent_inserts_of_one_score_leave_one_row(store, alice):
    """Redelivered cells finishing at once: the unique constraint refuses every insert but one,
    and each refused one is told it was a redelivery (False), not an error."""
    job = new_job(store, alice)[0]
    start = threading.Barrier(8)

    def insert(i):
        start.wait()
        return store.save_score(**score(job.id, dev=i / 10))

    with ThreadPoolExecutor(8) as pool:
        stored = list(pool.map(insert, range(8)))
    assert sorted(stored) == [False] * 7 + [True]
    assert count(store, Score, job_id=job.id) == 1
    R.count("integrity", "duplicate score inserts refused by the unique constraint", stored.count(False))
