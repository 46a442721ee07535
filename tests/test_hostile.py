"""Hostile input to the API, in process on SQLite and Postgres: malformed, packed and huge task
uploads, path tricks in names, job specs with NaN, infinities and absurd sizes, a property-based
run over every operation of the OpenAPI schema, key management over HTTP, the rate limit, the
walls between keys, and tampered prompts. Every refusal is a 4xx that names what was wrong and
what is accepted, and nothing is stored."""
import bz2
import gzip
import io
import json
import re
import time
import zipfile
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient
from sqlalchemy import update

from api.app import FORMATS, create_app
from core.settings import settings
from core.store.models import Prompt
from core.tasks import packs
from tests import reliability as R
from tests.test_api import JSONL, SPEC, Api, api, env, finish  # noqa: F401  (api and env are fixtures)

ROOT = Path(__file__).resolve().parent.parent


def multipart(fields: dict[str, bytes], files: list[tuple[bytes, bytes]]) -> tuple[bytes, str]:
    """A multipart/form-data body written by hand, so that file names reach the server byte for
    byte (httpx would percent-escape a NUL or a quote)."""
    boundary = b"hostile-boundary-7f3a"
    parts = [b'Content-Disposition: form-data; name="%s"\r\n\r\n%s' % (k.encode(), v) for k, v in fields.items()]
    parts += [b'Content-Disposition: form-data; name="files"; filename="%s"\r\n'
              b"Content-Type: application/octet-stream\r\n\r\n%s" % (name, data) for name, data in files]
    body = b"".join(b"--" + boundary + b"\r\n" + p + b"\r\n" for p in parts) + b"--" + boundary + b"--\r\n"
    return body, f"multipart/form-data; boundary={boundary.decode()}"


def post_task(api, files, name=b"reviews", type=b"classification", headers=None):
    body, content_type = multipart({"name": name, "type": type}, files)
    return api.client.post("/tasks", content=body, headers={**(headers or api.alice), "Content-Type": content_type})


def save_prompt(store, job_id, name="init/maml"):
    return store.save_prompt(store.get_job(job_id), name, torch.randn(3, 32), backbone="tiny", algorithm="maml")


def detail(r) -> str:
    d = r.json()["detail"]
    return d if isinstance(d, str) else " / ".join(e["msg"] for e in d)


def zip_bomb() -> bytes:
    """50 MB of zeros in a zip of about 50 kB: refused by its first bytes, never inflated."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("task.jsonl", b"\0" * (50 * 1024 * 1024))
    return buf.getvalue()


def torch_pickle() -> bytes:
    buf = io.BytesIO()
    torch.save({"prompt": torch.zeros(2, 2)}, buf)
    return buf.getvalue()


def tsv_split(name: str, lines: bytes) -> list[tuple[bytes, bytes]]:
    return [(f"{name}_16_100_{s}.tsv".encode(), lines) for s in ("train", "dev", "test")]


BIG = 5 * 1024 * 1024  # a single line of 5 MB, under the byte limit the test sets
BOMB = zip_bomb()
UPLOADS = [  # (what, files, what the refusal says)
    ("random bytes", [(b"r.jsonl", bytes(range(256)) * 64)], "is not UTF-8 text: byte 0x80 at offset 128"),
    ("Latin-1 text", [(b"r.jsonl", b'{"input": "caf\xe9", "output": "x"}\n')], "is not UTF-8 text"),
    ("overlong UTF-8 '/'", [(b"r_16_100_train.tsv", b"a\xc0\xafb\tc\n")], "is not UTF-8 text"),
    ("UTF-16", [(b"r.jsonl", '{"input": "a", "output": "b"}\n'.encode("utf-16"))], "is not UTF-8 text"),
    ("a NUL byte", [(b"r.jsonl", b'{"input": "a\0", "output": "b"}\n')], "is binary, not text: it holds a NUL"),
    ("zip bomb as task.json", [(b"task.json", BOMB)], "is a zip archive; archives are not opened"),
    ("zip bomb as .jsonl", [(b"r.jsonl", BOMB)], "is a zip archive"),
    ("gzip as .tsv", tsv_split("r", gzip.compress(b"a\tb\n" * 100_000)), "is a gzip archive"),
    ("gzip as .jsonl", [(b"r.jsonl", gzip.compress(JSONL * 1000))], "is a gzip archive"),
    ("bzip2 as task.json", [(b"task.json", bz2.compress(b"{}" * 1000))], "is a bzip2 archive"),
    ("a torch pickle as prompt.pt", [(b"prompt.pt", torch_pickle())], "is a zip archive"),
    ("a pickle as task.json", [(b"task.json", b"\x80\x04\x95" + b"x" * 20)], "is not UTF-8 text"),
    ("a .safetensors file", [(b"prompt.safetensors", b'{"a": 1}')], "none of the accepted formats"),
    ("an empty .jsonl", [(b"r.jsonl", b"")], "r.jsonl"),
    ("a JSON list as task.json", [(b"task.json", b"[1, 2, 3]")], "task.json"),
    ("a number as BIG-bench's preferred_score",
     [(b"task.json", b'{"examples": [{"input": "q", "target": "a"}], "preferred_score": 1}')],
     "'preferred_score' must be the name of a BIG-bench metric (text, e.g. \"exact_str_match\" or "
     "\"multiple_choice_grade\"), got int"),
    ("task.json nested 100000 deep", [(b"task.json", b"[" * 100_000 + b"]" * 100_000)], "nested too deeply"),
    ("a .jsonl line nested 100000 deep", [(b"r.jsonl", b"[" * 100_000 + b"]" * 100_000 + b"\n")], "nested too deeply"),
    ("a line of 5 MB", [(b"r.jsonl", JSONL + json.dumps({"input": "x" * BIG, "output": "positive"}).encode())],
     f"examples: example 5 has a text of {BIG} characters; accepted: at most 100000"),
    ("a 5 MB answer in task.json",
     [(b"task.json", json.dumps({"examples": [{"input": "q", "target": "y" * BIG}]}).encode())],
     f"has a text of {BIG} characters"),
    ("a million short lines", tsv_split("r", b"a\tb\n" * 1_000_000),
     "the files hold 3000000 lines; a task holds at most 100000"),
    ("150000 examples in task.json",
     [(b"task.json", json.dumps({"examples": [{"input": f"q{i}", "target": "a"} for i in range(150_000)]}).encode())],
     "the task holds 150000 examples; accepted: at most 100000"),
]
# (b"C:\\evil.jsonl" is not here: the multipart parser keeps what follows the last backslash of a
# Windows path, as old browsers send them, so the server sees "evil.jsonl".)
FILE_NAMES = [b"../evil.jsonl", b"/etc/evil.jsonl", b"..\\evil.jsonl", b"dir/evil.jsonl",
              b"evil\0.jsonl", b".jsonl", b"..", "．．／evil.jsonl".encode(), "evil\u202elnosj.jsonl".encode(),
              "e\u0301vil.jsonl".encode(), b"a" * 300 + b".jsonl", b"evil .jsonl", b"evil\r\n.jsonl"]
TASK_NAMES = [b"../x", b"/etc/passwd", b"..\\x", b"a\\b", b"x\0y", b".", b"..", b".hidden", b"a" * 101, b"x/../../y",
              "ｒｅｖｉｅｗｓ".encode(), "sms\u202espam".encode(), "\u0455ms_spam".encode(), "re\u200bviews".encode()]


def test_hostile_uploads_are_refused_quickly_with_the_reason_and_nothing_is_stored(api, store, env):
    env.setenv("PRIMER_MAX_UPLOAD_BYTES", str(20 * 1024 * 1024))
    settings.cache_clear()
    sent = 0
    for what, files, message in UPLOADS:
        start = time.perf_counter()
        r = post_task(api, files, type=b"" if files[0][0] == b"task.json" else b"classification")  # BIG-bench: its own
        seconds = time.perf_counter() - start
        assert r.status_code == 422, (what, r.status_code, r.text[:300])
        assert message in detail(r), (what, detail(r)[:300])
        assert "/tmp" not in r.text and seconds < 5, (what, seconds)  # no server paths; no bomb inflated
        sent += 1
    for name in FILE_NAMES:
        r = post_task(api, [(name, JSONL)])
        refused = (r.status_code == 422 and "is not accepted: give a plain file name" in detail(r)
                   or r.status_code == 400 and "not valid multipart/form-data" in detail(r))  # a CR LF ends the header
        assert refused, (name, r.text)
        sent += 1
    for name in TASK_NAMES:
        r = post_task(api, [(b"r.jsonl", JSONL)], name=name)
        assert r.status_code == 422 and "must be 1 to 100 letters, digits" in detail(r), (name, r.text)
        sent += 1
    for body, content_type in ((b"xx", "multipart/form-data"), (b"garbage", "multipart/form-data; boundary=abc")):
        r = api.client.post("/tasks", content=body, headers={**api.alice, "Content-Type": content_type})
        assert r.status_code == 400 and "not valid multipart/form-data" in detail(r)
        sent += 1
    assert store.list_tasks() == []
    assert post_task(api, [(b"r.jsonl", JSONL)]).status_code == 201  # the same route still takes a good one
    R.count("hostile", "hostile uploads tried", sent)


def test_the_upload_caps_are_settings_and_exact(api, store, env):
    env.setenv("PRIMER_MAX_TASK_EXAMPLES", "1000")
    env.setenv("PRIMER_MAX_EXAMPLE_CHARS", "50")
    settings.cache_clear()

    def rows(n, text="x"):
        return b"".join(json.dumps({"input": f"{text}{i}", "output": "ab"[i % 2]}).encode() + b"\n" for i in range(n))

    assert post_task(api, [(b"r.jsonl", rows(1000))], name=b"at_the_cap").status_code == 201
    r = post_task(api, [(b"r.jsonl", rows(1001))], name=b"over")
    assert r.status_code == 422
    assert detail(r) == "the files hold 1001 lines; a task holds at most 1000 examples, one per line"
    assert post_task(api, [(b"r.jsonl", rows(2, "x" * 49))], name=b"long").status_code == 201  # "x"*49 + "0": 50
    r = post_task(api, [(b"r.jsonl", rows(2, "x" * 50))], name=b"longer")
    assert r.status_code == 422 and detail(r) == ("examples: example 1 has a text of 51 characters; accepted: at most "
                                                  "50 characters per input or answer")
    assert [t.name for t in store.list_tasks()] == ["at_the_cap", "long"]


def test_no_generated_task_file_gets_a_5xx(pg_url, env):
    """Hypothesis writes JSONL, CrossFit TSV and BIG-bench files with odd values where text is
    expected (numbers, lists, nulls, NaN, empty and tab-holding labels) under every type, metric
    and option set: each upload is stored (201) or refused with a 4xx, never a 500."""
    from hypothesis import HealthCheck, given
    from hypothesis import settings as hypothesis_settings
    from hypothesis import strategies as st

    from core.store import Store

    store = Store(pg_url)
    store.upgrade()
    api = Api(store, raise_server_exceptions=False)
    # mostly good rows, and in about half the files one odd row where text is expected
    text = st.text(st.characters(codec="utf-8", exclude_characters="\n\r\t"), min_size=1, max_size=8)
    label = st.sampled_from(["a", "b"])
    odd = st.one_of(st.sampled_from(["", " ", "a\tb", "1.5"]), st.integers(-3, 3), st.floats(), st.none(),
                    st.lists(label, max_size=3), st.dictionaries(label, st.sampled_from([0, 1, 0.5, -1]), max_size=3))

    def files_of(good, bad):
        return st.tuples(st.lists(good, min_size=2, max_size=8), st.lists(bad, max_size=1)).map(lambda t: t[0] + t[1])

    jsonl = files_of(st.fixed_dictionaries({"input": text, "output": label}),
                     st.fixed_dictionaries({"input": st.one_of(text, odd), "output": odd}))
    tsv = files_of(st.tuples(text, label).map("\t".join),
                   st.lists(st.one_of(text, odd.map(str)), max_size=3).map("\t".join))
    bigbench = st.fixed_dictionaries(
        {"examples": files_of(st.fixed_dictionaries({"input": text, "target": label}),
                              st.fixed_dictionaries({"input": st.one_of(text, odd)},
                                                    optional={"target": odd, "target_scores": odd}))},
        optional={"preferred_score": st.one_of(odd, st.sampled_from(["exact_str_match", "multiple_choice_grade"])),
                  "metrics": odd, "task_prefix": odd, "append_choices_to_input": odd})
    names, seen = iter(range(10**6)), {}

    @given(kind=st.sampled_from(["jsonl", "tsv", "bigbench"]), rows=st.data(),
           type=st.sampled_from(["", *("classification", "multiple_choice", "qa", "generation", "regression")]),
           options=st.sampled_from(["", "a,b", "a", "a,b,c"]),
           metric=st.sampled_from(["", "ACC", "EM", "QA-F1", "Classification-F1", "MCC", "Pearson-Correlation", "x"]))
    @hypothesis_settings(max_examples=400, derandomize=True, database=None, deadline=None,
                         suppress_health_check=list(HealthCheck))
    def upload(kind, rows, type, options, metric):
        if kind == "jsonl":
            files = [(b"t.jsonl", "\n".join(map(json.dumps, rows.draw(jsonl))).encode())]
        elif kind == "tsv":
            files = tsv_split("t", "\n".join(rows.draw(tsv)).encode())
        else:
            files = [(b"task.json", json.dumps(rows.draw(bigbench)).encode())]
        body, content_type = multipart({"name": b"t%d" % next(names), "type": type.encode(),
                                        "options": options.encode(), "metric": metric.encode()}, files)
        r = api.client.post("/tasks", content=body, headers={**api.alice, "Content-Type": content_type})
        seen[r.status_code] = seen.get(r.status_code, 0) + 1
        assert r.status_code in (201, 422), (r.status_code, files[0][1][:300], r.text[:300])

    upload()
    store.engine.dispose()
    assert seen[201] > 50 and seen[422] > 50  # both sides of the readers were reached
    R.count("hostile", "generated task files uploaded (hypothesis; stored or refused, no 5xx)", sum(seen.values()))


def raw_spec(text: str) -> bytes:
    """SPEC with `text` put in for the downstream settings, as raw JSON (json.dumps cannot write NaN)."""
    return b'{"name": "demo", "targets": ["sms_spam"], "downstream": %s}' % text.encode()


MILLION = list(range(100_000))
SPECS = [  # (body: a dict, or raw bytes; loc; what the refusal says)
    (raw_spec('{"lrs": [NaN]}'), ["body", "downstream", "lrs", 0], "NaN and Infinity are not JSON numbers"),
    (raw_spec('{"lrs": [Infinity]}'), ["body", "downstream", "lrs", 0], "accepted: finite numbers"),
    (raw_spec('{"weight_decay": -Infinity}'), ["body", "downstream", "weight_decay"], "not JSON numbers"),
    (raw_spec('{"grad_clip": 1e400}'), ["body", "downstream", "grad_clip"], "beyond 1.8e308 reads as Infinity"),
    ({**SPEC, "downstream": {"lrs": [1e308]}}, ["downstream", "lrs", 0], "less than or equal to 100"),
    ({**SPEC, "downstream": {"lrs": [0.0]}}, ["downstream", "lrs", 0], "greater than 0"),
    ({**SPEC, "downstream": {"lrs": [-0.3]}}, ["downstream", "lrs", 0], "greater than 0"),
    ({**SPEC, "downstream": {"max_steps": 1e12}}, ["downstream", "max_steps"], "whole number from 1 to 1000000"),
    ({**SPEC, "downstream": {"max_steps": 10**12}}, ["downstream", "max_steps"], "less than or equal to 1000000"),
    ({**SPEC, "downstream": {"max_steps": 0}}, ["downstream", "max_steps"], "greater than or equal to 1"),
    ({**SPEC, "downstream": {"batch_size": 10**7}}, ["downstream", "batch_size"], "less than or equal to 4096"),
    ({**SPEC, "downstream": {"seeds": MILLION}}, ["downstream", "seeds"], "at most 100 items"),
    ({**SPEC, "downstream": {"seeds": [2**40]}}, ["downstream", "seeds", 0], "less than or equal to 2147483647"),
    ({**SPEC, "downstream": {"seeds": [-1]}}, ["downstream", "seeds", 0], "greater than or equal to 0"),
    ({**SPEC, "downstream": {"shots": 10**9}}, ["downstream", "shots"], "from 1 to 1000000, or 'all'"),
    ({**SPEC, "prompt": {"length": 10**9}}, ["prompt", "length"], "less than or equal to 512"),
    ({**SPEC, "prompt": {"seed": 1e308}}, ["prompt", "seed"], "whole number from 0 to 2147483647"),
    ({**SPEC, "max_input_tokens": 10**9}, ["max_input_tokens"], "less than or equal to 65536"),
    ({**SPEC, "truncation": "right"}, ["truncation"], "Input should be 'middle' or 'left'"),
    ({**SPEC, "upstream": {"sources": ["trec_coarse"], "steps": 10**12}}, ["upstream", "steps"],
     "less than or equal to 1000000"),
    ({**SPEC, "upstream": {"sources": ["trec_coarse"], "inner_lr": 1e308}}, ["upstream", "inner_lr"],
     "less than or equal to 100"),
    ({**SPEC, "upstream": {"sources": ["trec_coarse"] * 2000}}, ["upstream", "sources"],
     "2000 source tasks; accepted: at most 1000"),
    ({**SPEC, "targets": ["sms_spam"] * 2000}, ["targets"], "at most 1000 items"),
    ({**SPEC, "targets": sorted(packs.PACKS)[:3], "downstream": {"seeds": list(range(100)), "lrs": [0.1] * 40}},
     ["body", "downstream"], "the job asks for 12000 downstream runs (targets x methods x seeds x learning rates); "
                             "accepted: at most 10000 per job"),
    ({**SPEC, "name": "a\0b"}, ["body", "name"], "a NUL character is not accepted in text"),
    (b'{"name": "\\ud800", "targets": ["sms_spam"]}', ["body", "name"], "a lone surrogate"),
    (b'{"targets": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", ["body"], "nested too deeply"),
    (b'{"targets": ["sms_spam"], "prompt": {"seed": ' + b"9" * 5000 + b"}}", ["body"], "not valid JSON"),
    (b"\xff\xfe\x00\x00garbage", ["body"], "not valid JSON"),
]
BACKBONES = ["/etc/passwd", "../models/tiny", "tiny=/tmp/x", "gpt2", "smollm2-135m/../../etc", "TINY"]


def test_hostile_job_specs_are_a_422_naming_the_field_and_nothing_is_written(api, tiny_dir):
    sent = 0
    for body, loc, message in SPECS:
        if isinstance(body, bytes):
            r = api.client.post("/jobs", content=body, headers={**api.alice, "Content-Type": "application/json"})
        else:
            r = api.submit(body)
        assert r.status_code == 422, (loc, r.status_code, r.text[:300])
        errors = r.json()["detail"]
        assert any(e["loc"] == loc and message in e["msg"] for e in errors), (loc, message, errors[:3])
        sent += 1
    R.count("hostile", "hostile job specs tried", sent)
    # a backbone off the allowlist, or where the allowlist keeps one, is not a backbone name
    for backbone in [*BACKBONES, str(tiny_dir["causal"])]:
        r = api.submit({**SPEC, "backbone": backbone})
        assert r.status_code == 422
        assert r.json()["detail"] == [{"loc": ["backbone"], "msg": f"backbone {backbone!r} is not served here; "
                                                                   "accepted: smollm2-135m, tiny"}]
    R.count("security", "backbones off the allowlist or given as paths refused (422)", len(BACKBONES) + 1)
    assert api.jobs() == 0 and api.sent == []
    assert api.submit({**SPEC, "backbone": "tiny"}).status_code == 202  # what the allowlist names goes through


# --- the whole OpenAPI schema, generated --------------------------------------------------------
def test_no_request_generated_from_the_openapi_schema_gets_a_5xx(pg_url, env):
    """Schemathesis writes requests for every operation from the app's own schema (valid ones, and
    ones that break the schema on purpose), with an admin key; a few more use a real job's and
    prompt's ids. Deterministic (derandomized), bounded: max_examples per operation and mode."""
    import schemathesis
    from hypothesis import HealthCheck, Phase, given
    from hypothesis import settings as hypothesis_settings
    from hypothesis.errors import Unsatisfiable

    from core.store import Store

    store = Store(pg_url)  # Postgres: it refuses what SQLite lets through (NUL, surrogates, int64 overflow)
    store.upgrade()
    svc = Api(store, raise_server_exceptions=False)
    job_id = svc.submit().json()["id"]
    finish(store, job_id)
    prompt = save_prompt(store, job_id)
    schema = schemathesis.openapi.from_asgi("/openapi.json", svc.client.app)
    sent, failures = [0], []

    def run(operation, mode, examples, **fixed):
        @given(case=operation.as_strategy(generation_mode=mode, **fixed))
        @hypothesis_settings(max_examples=examples, derandomize=True, database=None, deadline=None,
                             suppress_health_check=list(HealthCheck), phases=[Phase.explicit, Phase.generate])
        def call(case):
            sent[0] += 1
            try:
                r = case.call(headers=svc.admin)
            except Exception as e:  # a streamed response that broke after its status line
                failures.append(f"{type(e).__name__}: {e} {case.as_curl_command()[:400]}")
                return
            if r.status_code >= 500:
                failures.append(f"{r.status_code} {case.as_curl_command()[:400]}\n  -> {r.text[:300]}")

        try:
            call()
        except Unsatisfiable:  # nothing to break in an operation without parameters
            pass

    operations = [result.ok() for result in schema.get_all_operations()]
    for operation in operations:
        for mode in (schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE):
            run(operation, mode, 50)
        path = operation.path
        ids = {k: v for k, v in (("job_id", job_id), ("prompt_id", prompt.id)) if "{" + k + "}" in path}
        if ids:
            run(operation, schemathesis.GenerationMode.POSITIVE, 20, path_parameters=ids)
    store.engine.dispose()
    assert failures == [], "\n".join(failures[:10])
    assert len(operations) >= 22 and sent[0] > 2000
    R.count("hostile", "schemathesis requests (every operation, valid and schema-breaking)", sent[0])
    R.note("hostile", "5xx responses", len(failures))


# --- keys, rate limit, walls between keys -------------------------------------------------------
def test_an_admin_manages_keys_over_http_and_no_one_else_can(api, store):
    r = api.client.post("/keys", json={"name": "carol"}, headers=api.admin)
    assert r.status_code == 201
    carol = r.json()
    assert carol["secret"].startswith(carol["prefix"]) and carol["admin"] is False and carol["revoked_at"] is None
    as_carol = {"Authorization": f"Bearer {carol['secret']}"}
    assert api.client.get("/jobs", headers=as_carol).status_code == 200

    listing = api.client.get("/keys", headers=api.admin)
    assert listing.status_code == 200
    keys = {k["id"]: k for k in listing.json()["keys"]}
    assert keys[carol["id"]] == {k: v for k, v in carol.items() if k != "secret"}
    assert set(keys) == {k.id for k in store.list_keys()}
    assert carol["secret"] not in listing.text and all(k.hash not in listing.text for k in store.list_keys())
    assert all(set(k) == {"id", "name", "prefix", "admin", "created_at", "revoked_at"} for k in keys.values())

    refused = 0
    for headers in (api.alice, as_carol):  # not admins: 403 on every key route
        for method, path, body in (("post", "/keys", {"name": "eve", "admin": True}), ("get", "/keys", None),
                                   ("delete", f"/keys/{carol['id']}", None)):
            r = api.client.request(method, path, json=body, headers=headers)
            assert r.status_code == 403 and "needs an admin key" in r.json()["detail"]
            refused += 1
    assert len(store.list_keys()) == 4  # eve was not made
    R.count("security", "key-management requests by non-admin keys refused (403)", refused)

    r = api.client.delete(f"/keys/{carol['id']}", headers=api.admin)
    assert r.status_code == 200 and r.json()["revoked_at"] is not None
    assert api.client.delete(f"/keys/{carol['id']}", headers=api.admin).json() == r.json()  # again: no change
    assert api.client.get("/jobs", headers=as_carol).status_code == 401
    r = api.client.delete("/keys/key_nope", headers=api.admin)
    assert r.status_code == 404 and "no key 'key_nope'" in r.json()["detail"]

    for body, message in (({"name": ""}, "at least 1 character"), ({"name": "x" * 201}, "at most 200 characters"),
                          ({"name": "a\nb"}, "no control characters"), ({"name": "a\0b"}, "no control characters"),
                          ({"name": "x", "admin": "yes"}, "valid boolean"), ({}, "Field required")):
        r = api.client.post("/keys", json=body, headers=api.admin)
        assert r.status_code == 422 and message in detail(r), (body, r.text)
    r = api.client.post("/keys", json={"name": "ops2", "admin": True}, headers=api.admin)
    assert api.client.get("/keys", headers={"Authorization": f"Bearer {r.json()['secret']}"}).status_code == 200


def test_the_python_client_manages_keys_and_says_why_it_was_refused(api):
    from api.client import Client, ClientError

    def client(headers):
        c = Client(url="http://testserver", key="unused")
        c.http = TestClient(api.client.app, headers=headers)  # the in-process app instead of a socket
        return c

    ops, alice = client(api.admin), client(api.alice)
    dave = ops.create_key("dave")
    assert [k["name"] for k in ops.keys()] == ["alice", "bob", "ops", "dave"]
    assert ops.revoke_key(dave["id"])["revoked_at"] is not None
    with pytest.raises(ClientError, match="HTTP 403: managing API keys needs an admin key"):
        alice.keys()
    with pytest.raises(ClientError, match=r"HTTP 422: body.name: String should have at most 200 characters"):
        ops.create_key("x" * 201)


def test_a_revoked_key_gets_401_everywhere(api, store):
    job_id = api.submit().json()["id"]
    store.revoke_key(api.alice_key.id)
    paths = ["/jobs", f"/jobs/{job_id}", f"/jobs/{job_id}/events", "/prompts", "/tasks", "/backbones", "/partitions"]
    for path in paths:
        r = api.client.get(path, headers=api.alice)
        assert r.status_code == 401 and "missing or invalid API key" in r.json()["detail"]
    assert api.client.post(f"/jobs/{job_id}/cancel", headers=api.alice).status_code == 401
    assert api.submit().status_code == 401
    assert store.get_job(job_id).status == "queued" and api.jobs() == 1
    R.count("security", "requests with a revoked key refused (401)", len(paths) + 2)


def limited(store, env, monkeypatch, **limits) -> tuple[Api, list[float]]:
    """An API under these PRIMER_* limits, and the clock its buckets read (moved by hand)."""
    for name, value in limits.items():
        env.setenv(f"PRIMER_{name}", str(value))
    settings.cache_clear()
    clock = [1000.0]
    monkeypatch.setattr("api.limits.time.monotonic", lambda: clock[0])
    return Api(store), clock


def test_the_rate_limit_is_per_key_and_says_when_to_come_back(store, env, monkeypatch):
    api, clock = limited(store, env, monkeypatch, RATE_LIMIT=6)
    for _ in range(6):  # a burst of a minute's worth
        assert api.client.get("/jobs", headers=api.alice).status_code == 200
    r = api.client.get("/jobs", headers=api.alice)
    assert r.status_code == 429 and r.headers["retry-after"] == "10"
    assert r.json()["detail"] == "rate limit reached: at most 6 requests per minute per API key; retry in 10 s"
    assert api.submit().status_code == 429 and api.jobs() == 0  # refused before anything is written
    assert api.client.get("/jobs", headers=api.bob).status_code == 200  # bob has a bucket of his own
    assert api.client.get("/healthz").status_code == 200  # probes take no key, so no bucket
    clock[0] += 4
    assert api.client.get("/jobs", headers=api.alice).headers["retry-after"] == "6"
    clock[0] += 6
    assert api.client.get("/jobs", headers=api.alice).status_code == 200  # one request's worth came back
    assert api.client.get("/jobs", headers=api.alice).status_code == 429
    R.count("security", "rate-limited requests (429)", 4)


def test_the_rate_limit_is_off_at_zero(store, env):
    env.setenv("PRIMER_RATE_LIMIT", "0")
    settings.cache_clear()
    api = Api(store)
    assert all(api.client.get("/healthz", headers=api.alice).status_code == 200 for _ in range(3))
    assert all(api.client.get("/backbones", headers=api.alice).status_code == 200 for _ in range(50))


def test_failed_authentications_are_limited_per_address_without_holding_back_known_keys(store, env, monkeypatch):
    api, clock = limited(store, env, monkeypatch, AUTH_FAILURE_LIMIT=3)
    assert api.client.get("/jobs", headers=api.alice).status_code == 200  # this process now knows alice's key
    lookups, authenticate = [], store.authenticate
    monkeypatch.setattr(store, "authenticate", lambda secret: lookups.append(secret) or authenticate(secret))
    guess = {"Authorization": "Bearer pk_guess"}
    assert [api.client.get("/jobs", headers=guess).status_code for _ in range(3)] == [401] * 3
    r = api.client.get("/jobs", headers=guess)
    assert r.status_code == 429 and r.headers["retry-after"] == "20"
    assert r.json()["detail"] == ("too many failed authentications from testclient: at most 3 a minute per client "
                                  "address; retry in 20 s with a valid API key")
    assert len(lookups) == 3  # the fourth guess never reached the store
    assert api.client.get("/jobs", headers=api.alice).status_code == 200  # a key found valid before goes on
    assert api.client.get("/jobs", headers=api.bob).status_code == 429  # one not seen yet waits with the guesses
    assert api.client.get("/jobs").status_code == 401  # no key, no lookup to spare: the plain answer
    store.revoke_key(api.alice_key.id)
    assert api.client.get("/jobs", headers=api.alice).status_code == 401  # known is no pass: the store decides
    assert api.client.get("/jobs", headers=api.alice).status_code == 429  # and it is known no more
    clock[0] += 20
    assert api.client.get("/jobs", headers=api.bob).status_code == 200  # the bucket refilled by one
    R.count("security", "failed-authentication floods refused per address (429) before a store lookup", 3)


def id_routes(app) -> set[str]:
    return {f"{sorted(r.methods)[0]} {r.path}" for r in app.routes if "{" in r.path}


def test_another_keys_job_prompt_and_results_are_404_on_every_route(api, store):
    job_id = api.submit().json()["id"]
    finish(store, job_id)
    prompt = save_prompt(store, job_id)
    routes = [("GET", f"/jobs/{job_id}"), ("POST", f"/jobs/{job_id}/cancel"), ("GET", f"/jobs/{job_id}/events"),
              ("GET", f"/jobs/{job_id}/events/stream"), ("GET", f"/jobs/{job_id}/results"),
              ("GET", f"/jobs/{job_id}/report"), ("GET", f"/jobs/{job_id}/artifacts/relative_gain.png"),
              ("GET", f"/prompts/{prompt.id}/info"), *(("GET", f"/prompts/{prompt.id}?format={f}") for f in FORMATS)]
    templates = {f"{m} {re.sub(r'(job|prm)_[0-9a-f]+', '{id}', p.split('?')[0])}" for m, p in routes}
    # every route that takes an id is here (the key routes are admin-only, tested above)
    assert {re.sub(r"\{\w+_id\}", "{id}", r) for r in id_routes(api.client.app)} - {"DELETE /keys/{id}"} \
        == {t.replace("/relative_gain.png", "/{name}") for t in templates}
    for method, path in routes:
        r = api.client.request(method, path, headers=api.bob)
        assert r.status_code == 404, (method, path, r.status_code)
        assert (job_id if "/jobs/" in path else prompt.id) in r.json()["detail"]
        assert api.client.request(method, path, headers=api.alice).status_code in (200, 409)
        assert api.client.request(method, path, headers=api.admin).status_code in (200, 409)
    assert store.get_job(job_id).status == "succeeded"  # bob's cancel changed nothing
    assert api.client.get("/prompts", params={"job": job_id}, headers=api.bob).json()["prompts"] == []
    assert api.client.get("/jobs", params={"cursor": job_id}, headers=api.bob).status_code == 422
    R.count("security", "cross-key requests refused (404)", len(routes))


def test_an_uploaded_task_is_only_its_owners(api, store):
    assert post_task(api, [(b"r.jsonl", JSONL)], name=b"private").status_code == 201
    assert api.client.get("/tasks", headers=api.bob).json()["tasks"] == []
    r = api.client.post("/jobs", json={**SPEC, "targets": ["private"]}, headers=api.bob)
    assert r.status_code == 422 and "unknown task 'private'" in r.text
    r = api.client.post("/jobs", json={**SPEC, "upstream": {"sources": ["private"]}}, headers=api.bob)
    assert r.status_code == 422 and "unknown task 'private'" in r.text
    assert api.jobs() == 0
    R.count("security", "jobs naming another key's uploaded task refused (422)", 2)


# --- no pickles, no tampering -------------------------------------------------------------------
def test_no_user_supplied_pickle_is_ever_loaded(api):
    r = post_task(api, [(b"prompt.pt", torch_pickle())], name=b"p")
    assert r.status_code == 422 and "is a zip archive" in detail(r)
    r = api.submit({**SPEC, "prompt": {"init": "file", "path": "upload.pt"}})
    assert r.status_code == 422 and "not read over the API" in r.text
    # the code: every torch.load reads weights only; nothing unpickles
    loads = 0
    for path in [*ROOT.glob("core/**/*.py"), *ROOT.glob("api/**/*.py"), *ROOT.glob("worker/**/*.py")]:
        text = path.read_text()
        for call in re.findall(r"torch\.load\([^\n]*", text):
            assert "weights_only=True" in call, (path, call)
            loads += 1
        assert not re.search(r"pickle\.loads?\(|joblib\.load\(|allow_pickle=True", text), path
    assert loads >= 2
    R.note("security", "torch.load calls in core/, api/, worker/ (all weights_only=True)", loads)


def test_tampered_prompts_are_refused_however_they_were_changed(api, store):
    job_id = api.submit().json()["id"]
    rows = [save_prompt(store, job_id, f"p{i}") for i in range(5)]
    other = save_prompt(store, job_id, "other")
    tampering = [dict(data=rows[0].data[:-1] + bytes([rows[0].data[-1] ^ 1])),  # one bit flipped
                 dict(data=rows[1].data[:100]),  # truncated
                 dict(data=other.data),  # another prompt's valid bytes
                 dict(data=torch_pickle()),  # a pickle in its place
                 dict(sha256="0" * 64)]  # the checksum changed instead
    refused = 0
    for row, values in zip(rows, tampering):
        with store.engine.begin() as conn:
            conn.execute(update(Prompt).where(Prompt.id == row.id).values(**values))
        for format in ("safetensors", "pt", "npy"):
            r = api.client.get(f"/prompts/{row.id}", params={"format": format}, headers=api.alice)
            assert r.status_code == 500 and "failed its integrity check" in r.json()["detail"]
            refused += 1
    assert api.client.get(f"/prompts/{other.id}", headers=api.alice).status_code == 200
    R.count("integrity", "downloads of tampered prompts refused", refused)


def test_cors_headers_only_for_configured_origins(store, env):
    preflight = {"Origin": "https://evil.example", "Access-Control-Request-Method": "GET"}
    r = Api(store).client.options("/jobs", headers=preflight)
    assert not any(h.startswith("access-control-") for h in r.headers)
    env.setenv("PRIMER_CORS_ORIGINS", "https://ui.example")
    settings.cache_clear()
    r = TestClient(create_app(store, lambda *_: None, lambda: True)).options("/jobs", headers=preflight)
    assert "access-control-allow-origin" not in r.headers  # only the configured origin is let in


def test_a_backbone_that_ships_its_own_code_never_runs_it(tiny_dir, tmp_path):
    """An operator allowlists a model directory whose config maps to custom code: the code is
    not imported (trust_remote_code is never set), whatever the loader then does."""
    import shutil

    from core.backbones import BackboneError, load

    model = tmp_path / "evil"
    shutil.copytree(tiny_dir["causal"], model)
    marker = tmp_path / "ran"
    for module, line in (("configuration_evil", "from transformers import LlamaConfig as EvilConfig"),
                         ("modeling_evil", "from transformers import LlamaForCausalLM as EvilModel")):
        (model / f"{module}.py").write_text(f"open({str(marker)!r}, 'w').write('pwned')\n{line}\n")
    config = json.loads((model / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "configuration_evil.EvilConfig",
                          "AutoModelForCausalLM": "modeling_evil.EvilModel"}
    (model / "config.json").write_text(json.dumps(config))
    try:
        load(str(model))
    except (BackboneError, ValueError):
        pass  # refusing is as good as loading the plain architecture
    assert not marker.exists()
    R.count("security", "backbones shipping their own code loaded without running it", 1)
